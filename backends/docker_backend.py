"""Sandbox containers on a Docker engine, through the ``docker`` SDK.

Every engine call runs in a worker thread (``asyncio.to_thread``): the SDK is
synchronous and the callers are event loops. Engine errors are translated here
into the typed errors of :mod:`backends.errors`; nothing above this module
sees ``docker.errors`` or ``requests``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import docker.types
import requests.exceptions

from .base import (
    LABEL_ENGINE_ID,
    LABEL_POOL,
    LABEL_PROJECT,
    LABEL_SANDBOX_ID,
    LABEL_THREAD_ID,
    PROJECT,
    Backend,
    SandboxRecord,
    SandboxSpec,
    encode_label_value,
)
from .errors import BackendError, BackendUnavailable, ImageNotFound, SandboxError, SandboxStartError

logger = logging.getLogger(__name__)

LABEL_PORT = "sandbox-actors.port"
LABEL_CREATED_AT = "sandbox-actors.created-at"
TOKEN_ENV = "SANDBOX_TOKEN"

_UNREACHABLE = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    ConnectionError,
    socket.timeout,
)


@contextlib.contextmanager
def engine_errors(action: str) -> Iterator[None]:
    """Translate engine failures met while doing ``action`` into typed errors."""
    try:
        yield
    except SandboxError:
        raise
    except _UNREACHABLE as exc:
        raise BackendUnavailable(
            f"Docker engine did not answer while trying to {action}: {exc}. "
            "Is dockerd running? (`docker info` should answer.)"
        ) from exc
    except docker.errors.APIError as exc:
        raise BackendError(f"Docker engine refused to {action}: {exc.explanation or exc}") from exc
    except docker.errors.DockerException as exc:
        raise BackendUnavailable(
            f"Docker engine unavailable while trying to {action}: {exc}. "
            "Start it (e.g. `dockerd &`) or set DOCKER_HOST."
        ) from exc


def connect(base_url: str | None, timeout: float) -> docker.DockerClient:
    """A client for the engine at ``base_url`` (None: from the environment)."""
    with engine_errors("connect"):
        if base_url:
            return docker.DockerClient(base_url=base_url, timeout=int(timeout))
        return docker.from_env(timeout=int(timeout))


class DockerBackend(Backend):
    """Runs each sandbox as one container on a Docker engine.

    Args:
        container_prefix: container names are ``<prefix>-<sandbox_id>``.
        base_url: the engine's address; None uses the environment (DOCKER_HOST
            or the default socket).
        timeout: seconds to wait for any single engine call.
    """

    def __init__(
        self, container_prefix: str = "sandbox-actors", base_url: str | None = None, timeout: float = 30.0
    ) -> None:
        self._prefix = container_prefix
        self._base_url = base_url
        self._timeout = timeout
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._engine: dict[str, str] | None = None

    # ── plumbing ───────────────────────────────────────────────────────────

    def container_name(self, sandbox_id: str) -> str:
        return f"{self._prefix}-{sandbox_id}"

    def _docker(self) -> docker.DockerClient:
        with self._client_lock:
            if self._client is None:
                self._client = connect(self._base_url, self._timeout)
            return self._client

    def _engine_info(self) -> dict[str, str]:
        if self._engine is None:
            with engine_errors("read engine info"):
                info = self._docker().info()
            self._engine = {"id": str(info.get("ID") or ""), "name": str(info.get("Name") or socket.gethostname())}
        return self._engine

    def _get(self, sandbox_id: str) -> Any | None:
        with engine_errors(f"inspect sandbox {sandbox_id}"):
            try:
                return self._docker().containers.get(self.container_name(sandbox_id))
            except docker.errors.NotFound:
                return None

    def _record(self, container: Any) -> SandboxRecord:
        """A record from a full inspect (it has the token, from the container's environment)."""
        attrs = container.attrs
        labels = dict(attrs["Config"].get("Labels") or {})
        port = labels.get(LABEL_PORT, "8080")
        bindings = (attrs.get("NetworkSettings", {}).get("Ports") or {}).get(f"{port}/tcp") or []
        env = attrs["Config"].get("Env") or []
        return self._make_record(
            labels,
            host_port=next((b["HostPort"] for b in bindings if b.get("HostPort")), None),
            name=attrs["Name"],
            container_id=attrs["Id"],
            running=bool(attrs.get("State", {}).get("Running")),
            created=time.time(),
            token=next((item.split("=", 1)[1] for item in env if item.startswith(TOKEN_ENV + "=")), ""),
        )

    def _record_from_summary(self, summary: dict[str, Any]) -> SandboxRecord:
        """A record from the list summary (no token: use discover for that)."""
        labels = dict(summary.get("Labels") or {})
        port = int(labels.get(LABEL_PORT, "8080"))
        ports = summary.get("Ports") or []
        return self._make_record(
            labels,
            host_port=next((p["PublicPort"] for p in ports if p.get("PrivatePort") == port and p.get("PublicPort")), None),
            name=(summary.get("Names") or ["/"])[0],
            container_id=summary["Id"],
            running=summary.get("State") == "running",
            created=float(summary.get("Created") or 0),
        )

    def _make_record(
        self, labels: dict[str, str], *, host_port: Any, name: str, container_id: str, running: bool,
        created: float, token: str = "",
    ) -> SandboxRecord:
        try:
            created_at = float(labels.get(LABEL_CREATED_AT, ""))
        except ValueError:
            created_at = created
        engine = self._engine_info()
        return SandboxRecord(
            sandbox_id=labels.get(LABEL_SANDBOX_ID, ""),
            url=f"http://127.0.0.1:{host_port}" if host_port else "",
            container_name=name.lstrip("/"),
            container_id=container_id,
            node=engine["name"],
            engine_id=labels.get(LABEL_ENGINE_ID) or engine["id"],
            created_at=created_at,
            running=running,
            labels=labels,
            token=token,
        )

    # ── Backend ────────────────────────────────────────────────────────────

    async def engine_id(self) -> str:
        return (await asyncio.to_thread(self._engine_info))["id"]

    async def create(self, spec: SandboxSpec) -> SandboxRecord:
        return await asyncio.to_thread(self._create, spec)

    def _create(self, spec: SandboxSpec) -> SandboxRecord:
        name = self.container_name(spec.sandbox_id)
        for _ in range(2):
            try:
                container = self._create_container(spec, name)
            except _NameConflict:
                existing = self._get(spec.sandbox_id)
                if existing is None:
                    continue  # removed between our create and inspect: try again
                record = self._record(existing)
                if record.pool != spec.pool:
                    raise SandboxStartError(
                        f"container {name} already exists and belongs to pool {record.pool!r}, not {spec.pool!r}; "
                        "use a different container_prefix per pool"
                    ) from None
                if record.running:
                    logger.info("sandbox %s: container %s already running, discovered", spec.sandbox_id, name)
                    return record
                logger.info("sandbox %s: removing stopped container %s before re-creating", spec.sandbox_id, name)
                self._destroy(spec.sandbox_id, existing.id)
                continue
            return self._start(container, spec)
        raise SandboxStartError(f"could not create container {name}: it kept appearing and vanishing")

    def _create_container(self, spec: SandboxSpec, name: str) -> Any:
        engine = self._engine_info()
        labels = {
            LABEL_PROJECT: PROJECT,
            LABEL_POOL: spec.pool,
            LABEL_SANDBOX_ID: spec.sandbox_id,
            LABEL_THREAD_ID: encode_label_value(spec.thread_id),
            LABEL_ENGINE_ID: engine["id"],
            LABEL_PORT: str(spec.port),
            LABEL_CREATED_AT: f"{time.time():.6f}",
            **spec.extra_labels,
        }
        environment = {**spec.environment}
        if spec.token:
            environment[TOKEN_ENV] = spec.token
        mounts = [
            docker.types.Mount(target=m.container_path, source=m.host_path, type="bind", read_only=m.read_only)
            for m in spec.mounts
        ]
        limits = spec.limits
        with engine_errors(f"create container {name}"):
            try:
                return self._docker().containers.create(
                    spec.image,
                    name=name,
                    detach=True,
                    labels=labels,
                    environment=environment,
                    mounts=mounts,
                    ports={f"{spec.port}/tcp": (spec.bind_host,)},
                    mem_limit=limits.memory,
                    memswap_limit=limits.memory,  # no swap beyond the memory limit
                    nano_cpus=int(limits.cpus * 1e9) if limits.cpus else None,
                    pids_limit=limits.pids,
                    security_opt=["no-new-privileges"],
                    cap_drop=["ALL"],
                    cap_add=list(spec.capabilities) or None,
                    privileged=False,
                    init=True,
                )
            except docker.errors.ImageNotFound as exc:
                raise ImageNotFound(
                    f"image {spec.image!r} is not on the Docker engine and is never pulled; "
                    "build it with `sandbox-actors build-image` or set `image` in the config",
                    image=spec.image,
                ) from exc
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    raise _NameConflict() from exc
                if exc.status_code is not None and exc.status_code < 500:
                    raise SandboxStartError(f"could not create container {name}: {exc.explanation or exc}") from exc
                raise

    def _start(self, container: Any, spec: SandboxSpec) -> SandboxRecord:
        try:
            with engine_errors(f"start container {container.name}"):
                container.start()
                container.reload()
            record = self._record(container)
            if not record.url:
                raise SandboxStartError(f"container {container.name} started but port {spec.port} was not published")
            return record
        except SandboxError as exc:
            # Roll back: a container that did not start is never left behind.
            with contextlib.suppress(SandboxError):
                self._destroy(spec.sandbox_id, container.id)
            if isinstance(exc, (BackendUnavailable, SandboxStartError)):
                raise
            raise SandboxStartError(f"container {container.name} failed to start: {exc.message}") from exc

    async def discover(self, sandbox_id: str) -> SandboxRecord | None:
        def _discover() -> SandboxRecord | None:
            container = self._get(sandbox_id)
            return None if container is None else self._record(container)

        return await asyncio.to_thread(_discover)

    async def list(self, pool: str | None = None) -> list[SandboxRecord]:
        """Every container of ours (one engine call; records carry no token: use discover for that)."""

        def _list() -> list[SandboxRecord]:
            label_filter = [f"{LABEL_PROJECT}={PROJECT}"]
            if pool is not None:
                label_filter.append(f"{LABEL_POOL}={pool}")
            with engine_errors("list containers"):
                # The summary listing: one call, and no per-container inspect that could
                # race with a container being removed meanwhile.
                summaries = self._docker().api.containers(all=True, filters={"label": label_filter})
            return [self._record_from_summary(summary) for summary in summaries]

        return await asyncio.to_thread(_list)

    async def destroy(self, sandbox_id: str, container_id: str | None = None) -> bool:
        return await asyncio.to_thread(self._destroy, sandbox_id, container_id)

    def _destroy(self, sandbox_id: str, container_id: str | None = None) -> bool:
        container = self._get(sandbox_id)
        if container is None or (container_id is not None and container.id != container_id):
            return False  # gone, or the name now belongs to a newer container: not ours to remove
        with engine_errors(f"remove container {container.name}"):
            try:
                container.remove(force=True, v=True)
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: removal already in progress elsewhere
                    raise
        logger.info("sandbox %s: removed container %s", sandbox_id, container.name)
        return True

    async def is_running(self, sandbox_id: str) -> bool:
        def _running() -> bool:
            container = self._get(sandbox_id)
            return container is not None and bool(container.attrs.get("State", {}).get("Running"))

        return await asyncio.to_thread(_running)

    async def logs_tail(self, sandbox_id: str, lines: int = 40) -> str:
        def _logs() -> str:
            container = self._get(sandbox_id)
            if container is None:
                return ""
            with engine_errors(f"read logs of {container.name}"):
                return container.logs(tail=lines).decode("utf-8", "replace")

        return await asyncio.to_thread(_logs)

    async def memory_usage(self, sandbox_id: str) -> int | None:
        """Bytes of memory the container uses now (the engine's cgroup figure), None when it is gone."""

        def _usage() -> int | None:
            container = self._get(sandbox_id)
            if container is None:
                return None
            with engine_errors(f"read stats of {container.name}"):
                stats = container.stats(stream=False)
            memory = stats.get("memory_stats") or {}
            usage = memory.get("usage")
            cache = (memory.get("stats") or {}).get("cache", 0) or (memory.get("stats") or {}).get("inactive_file", 0)
            return None if usage is None else max(0, usage - cache)

        return await asyncio.to_thread(_usage)

    async def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)


class _NameConflict(Exception):
    """Internal: the container name is taken (HTTP 409 on create)."""
