"""Sandbox containers on a Docker engine, through the ``docker`` SDK.

Every engine call runs in a worker thread (``asyncio.to_thread``): the SDK is
synchronous and the callers are event loops. Engine errors are translated
(:mod:`backends.engine`) into the typed errors of :mod:`backends.errors`;
nothing above this module sees ``docker.errors`` or ``requests``.

Isolation, as the pool's config asks for it: each pool's containers sit on
the pool's own network (:mod:`backends.network`) or on none at all; the API is
served on a unix socket in a per-sandbox host directory when the image can
(ours can; a port on loopback otherwise); the server holds only the hash of
its token; commands run as an unprivileged user; an optional runtime (gVisor),
read-only root filesystem and disk limit.
"""

from __future__ import annotations

import builtins
import dataclasses

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import docker.types
from docker.models.containers import _create_container_args  # type: ignore[attr-defined]  # create, no inspect

from .base import (
    Capability,
    LABEL_ACTOR,
    LABEL_CLUSTER,
    LABEL_ENGINE_ID,
    LABEL_POOL,
    LABEL_PROJECT,
    LABEL_SANDBOX_ID,
    LABEL_SOCKET,
    LABEL_THREAD_ID,
    LABEL_TOKEN,
    PROJECT,
    Backend,
    ContainerEvent,
    Owner,
    SandboxRecord,
    SandboxSpec,
    USAGE_CPU_WINDOW,
    Usage,
    decode_label_value,
    encode_label_value,
)
from .engine import connect, engine_errors
from .errors import (
    BackendUnavailable,
    ImageNotFound,
    IsolationUnavailable,
    NotSupported,
    ReadinessTimeout,
    RestoreFailed,
    SandboxDied,
    SandboxError,
    SandboxNotFound,
    SandboxStartError,
)
from .firewall import Firewall, NetworkPolicy
from .network import LABEL_TAG, PoolNetwork, default_socket_dir, our_networks, pool_tag

logger = logging.getLogger(__name__)

LABEL_PORT = "sandbox-actors.port"
LABEL_CREATED_AT = "sandbox-actors.created-at"
LABEL_SNAPSHOT = "sandbox-actors.snapshot"  # on a snapshot image: its name
LABEL_SNAPSHOT_CREATED = "sandbox-actors.snapshot-created"
# Labels an image sets to say what its API server can do (ours does; the public AIO image not).
IMAGE_API_SOCKET = "sandbox-actors.api-socket"  # serves the API on this unix socket path
IMAGE_COMMAND_USERS = "sandbox-actors.command-users"  # JSON {name: {uid, gid, home}} it can run commands as
# What the server in our image needs to run commands as another user and manage their files;
# commands lose all of it with their uid (and no-new-privileges keeps them from regaining any).
SERVER_CAPABILITIES = ("SETUID", "SETGID", "KILL", "CHOWN", "DAC_OVERRIDE")


@dataclass(frozen=True)
class ImageAPI:
    """What an image's API server supports, from its labels."""

    socket_path: str | None = None
    users: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> ImageAPI:
        try:
            users = json.loads(labels.get(IMAGE_COMMAND_USERS) or "{}")
        except ValueError:
            users = {}
        return cls(labels.get(IMAGE_API_SOCKET) or None, users if isinstance(users, dict) else {})

# What one sandbox's container carries that its snapshot must not: a snapshot is the filesystem,
# and whoever starts from it gets labels and environment of their own.
_PER_SANDBOX_LABELS = (LABEL_SANDBOX_ID, LABEL_THREAD_ID, LABEL_TOKEN, LABEL_SOCKET, LABEL_ENGINE_ID, LABEL_CLUSTER,
                       LABEL_CREATED_AT, "sandbox-actors.actor", "sandbox-actors.ray-node")


def _snapshot_changes(container: Mapping[str, Any], base: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """Dockerfile lines for a snapshot's image: the sandbox's own labels and environment blanked
    (the engine merges a commit's config with the container's; nothing can be unset), ours added."""
    base_env = {item.split("=", 1)[0] for item in base.get("Env") or []}
    own_env = sorted({item.split("=", 1)[0] for item in container.get("Env") or []} - base_env)
    changes = [f'ENV {name}=""' for name in own_env]
    changes += [f'LABEL "{key}"=""' for key in _PER_SANDBOX_LABELS if key in (container.get("Labels") or {})]
    changes += [f'LABEL "{key}"={json.dumps(str(value))}' for key, value in labels.items()]
    return changes


def _writable_tmpfs(user: dict[str, Any] | None) -> dict[str, str]:
    """With a read-only root filesystem: what stays writable (besides the mounts)."""
    tmpfs = {
        "/tmp": "rw,nosuid,nodev,mode=1777",
        "/var/tmp": "rw,nosuid,nodev,mode=1777",
        "/run": "rw,nosuid,nodev,mode=755",
    }
    if user is not None and user.get("home"):
        tmpfs[str(user["home"])] = f"rw,nosuid,nodev,mode=755,uid={int(user['uid'])},gid={int(user['gid'])}"
    return tmpfs


class DockerBackend(Backend):
    """Runs each sandbox as one container on a Docker engine.

    Args:
        container_prefix: container names are ``<prefix>-<sandbox_id>``.
        base_url: the engine's address; None uses the environment (DOCKER_HOST
            or the default socket).
        timeout: seconds to wait for any single engine call.
        policy: what the sandboxes may reach (one network per pool).
        socket_dir: node-local directory for per-sandbox API sockets.
        host_socket_dir: ``socket_dir`` as the engine's host sees it
            (Docker-outside-of-Docker); default the same.
        labels: added to every container and network it creates (e.g. the Ray cluster).
    """

    kind = "docker"
    capabilities = frozenset(Capability)  # all of them

    def __init__(
        self,
        container_prefix: str = "sandbox-actors",
        base_url: str | None = None,
        timeout: float = 30.0,
        *,
        policy: NetworkPolicy | None = None,
        socket_dir: str | None = None,
        host_socket_dir: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self._prefix = container_prefix
        self._base_url = base_url
        self._timeout = timeout
        self.policy = policy or NetworkPolicy()
        self.socket_dir = socket_dir or default_socket_dir()
        self._host_socket_dir = host_socket_dir or self.socket_dir
        self._labels = dict(labels or {})
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._engine: dict[str, str] | None = None
        self._networks: dict[str, PoolNetwork] = {}
        self._ready_networks: set[str] = set()  # pools whose network this process has checked
        self._images: dict[str, ImageAPI] = {}
        self._warned: set[str] = set()
        self._sockets: dict[str, str] = {}  # container id -> its API socket, for containers seen here

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
            self._engine = {"id": str(info.get("ID") or ""), "name": str(info.get("Name") or socket.gethostname()),
                            "root": str(info.get("DockerRootDir") or "/var/lib/docker"),
                            "experimental": "yes" if info.get("ExperimentalBuild") else ""}
        return self._engine

    def network(self, pool: str) -> PoolNetwork:
        """The network (and firewall rules) of ``pool`` on this engine."""
        if pool not in self._networks:
            lock = os.path.join(self.socket_dir, ".firewall.lock")
            self._networks[pool] = PoolNetwork(self._docker, pool, self.policy, lock, self._labels)
        return self._networks[pool]

    def _pool_socket_dir(self, pool: str, host: bool = False) -> str:
        return os.path.join(self._host_socket_dir if host else self.socket_dir, pool_tag(pool))

    def _image_api(self, image: str) -> ImageAPI:
        """What ``image``'s API server can do (cached per image name)."""
        if image not in self._images:
            with engine_errors(f"inspect image {image}"):
                try:
                    labels = self._docker().images.get(image).labels or {}
                except docker.errors.ImageNotFound as exc:
                    raise ImageNotFound(
                        f"image {image!r} is not on the Docker engine and is never pulled; "
                        "build it with `sandbox-actors build-image` or set `image` in the config",
                        image=image,
                    ) from exc
            self._images[image] = ImageAPI.from_labels(dict(labels))
        return self._images[image]

    def _get(self, sandbox_id: str) -> Any | None:
        with engine_errors(f"inspect sandbox {sandbox_id}"):
            try:
                return self._docker().containers.get(self.container_name(sandbox_id))
            except docker.errors.NotFound:
                return None

    def _record(self, container: Any) -> SandboxRecord:
        """A record from a full inspect."""
        return self._record_attrs(container.attrs)

    def _record_attrs(self, attrs: dict[str, Any]) -> SandboxRecord:
        """A record from a full inspect's attributes."""
        labels = dict(attrs["Config"].get("Labels") or {})
        port = labels.get(LABEL_PORT, "8080")
        bindings = (attrs.get("NetworkSettings", {}).get("Ports") or {}).get(f"{port}/tcp") or []
        return self._make_record(
            labels,
            host_port=next((b["HostPort"] for b in bindings if b.get("HostPort")), None),
            name=attrs["Name"],
            container_id=attrs["Id"],
            running=bool(attrs.get("State", {}).get("Running")),
            created=time.time(),
            pid=int(attrs.get("State", {}).get("Pid") or 0) or None,
        )

    def _record_from_summary(self, summary: dict[str, Any]) -> SandboxRecord:
        """A record from the list summary (one engine call for every container)."""
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
        created: float, pid: int | None = None,
    ) -> SandboxRecord:
        try:
            created_at = float(labels.get(LABEL_CREATED_AT, ""))
        except ValueError:
            created_at = created
        engine = self._engine_info()
        token = labels.pop(LABEL_TOKEN, "")  # kept out of ``labels``, which get printed
        if labels.get(LABEL_SOCKET):
            url = f"unix:{labels[LABEL_SOCKET]}"
            if len(self._sockets) >= 4096:  # containers removed by others are never popped: bounded
                self._sockets.clear()
            self._sockets[container_id] = labels[LABEL_SOCKET]
        else:
            url = f"http://127.0.0.1:{host_port}" if host_port else ""
        return SandboxRecord(
            sandbox_id=labels.get(LABEL_SANDBOX_ID, ""),
            url=url,
            container_name=name.lstrip("/"),
            container_id=container_id,
            node=engine["name"],
            engine_id=labels.get(LABEL_ENGINE_ID) or engine["id"],
            created_at=created_at,
            running=running,
            labels=labels,
            token=token,
            pid=pid,
        )

    # ── Backend ────────────────────────────────────────────────────────────

    async def engine_id(self) -> str:
        return (await asyncio.to_thread(self._engine_info))["id"]

    async def warm(self, pool: str, image: str) -> str:
        def _warm() -> str:
            engine = self._engine_info()["id"]
            with contextlib.suppress(ImageNotFound):  # the create says so, with what to do
                self._image_api(image)
            self._network_for(pool)  # ~20 ms the first time in a process: checked here, not in a start
            return engine

        return await asyncio.to_thread(_warm)

    async def reached_over_tcp(self, image: str) -> bool:
        api = self._images.get(image) or await asyncio.to_thread(self._try_image_api, image)
        return api is None or not api.socket_path

    async def create(self, spec: SandboxSpec) -> SandboxRecord:
        return await asyncio.to_thread(self._create, spec)

    def _create(self, spec: SandboxSpec) -> SandboxRecord:
        name = self.container_name(spec.sandbox_id)
        for _ in range(3):
            try:
                container = self._create_container(spec, name)
            except _NetworkGone:
                self._ready_networks.discard(spec.pool)  # removed since we checked: make it again
                continue
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
        args = self._create_args(spec)
        with engine_errors(f"create container {name}"):
            try:
                return self._create_model(spec.image, name=name, detach=True, **args)
            except docker.errors.ImageNotFound as exc:
                raise ImageNotFound(
                    f"image {spec.image!r} is not on the Docker engine and is never pulled; "
                    "build it with `sandbox-actors build-image` or set `image` in the config",
                    image=spec.image,
                ) from exc
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    raise _NameConflict() from exc
                if exc.status_code == 404 and "network" in args and "network" in str(exc.explanation or exc):
                    raise _NetworkGone() from exc
                if exc.status_code is not None and exc.status_code < 500:
                    raise SandboxStartError(f"could not create container {name}: {exc.explanation or exc}") from exc
                raise

    def _create_args(self, spec: SandboxSpec) -> dict[str, Any]:
        """Everything a sandbox's container is created with: its labels and environment, its
        mounts, how its API is reached, its command user, limits and hardening."""
        api = self._image_api(spec.image)
        labels = {
            LABEL_PROJECT: PROJECT, LABEL_POOL: spec.pool, LABEL_SANDBOX_ID: spec.sandbox_id,
            LABEL_THREAD_ID: encode_label_value(spec.thread_id), LABEL_ENGINE_ID: self._engine_info()["id"],
            LABEL_PORT: str(spec.port), LABEL_CREATED_AT: f"{time.time():.6f}", **self._labels, **spec.extra_labels,
        }
        environment = {**spec.environment}
        if spec.token:
            # The server gets only the hash: nothing inside the container can authenticate.
            environment["SANDBOX_TOKEN_SHA256"] = hashlib.sha256(spec.token.encode()).hexdigest()
            labels[LABEL_TOKEN] = spec.token
        mounts = [
            docker.types.Mount(target=m.container_path, source=m.host_path, type="bind", read_only=m.read_only)
            for m in spec.mounts
        ]
        options = self._api_access(spec, api, labels, environment, mounts)
        capabilities, user = self._command_user(spec, api, environment)
        limits = spec.limits
        if spec.read_only_rootfs:
            options.update(read_only=True, tmpfs=_writable_tmpfs(user))
        if spec.runtime:
            options["runtime"] = spec.runtime
        if limits.disk:
            options["storage_opt"] = {"size": limits.disk}
        return dict(
            labels=labels, environment=environment, mounts=mounts, mem_limit=limits.memory,
            memswap_limit=limits.memory,  # no swap beyond the memory limit
            nano_cpus=int(limits.cpus * 1e9) if limits.cpus else None, pids_limit=limits.pids,
            security_opt=["no-new-privileges"], cap_drop=["ALL"], cap_add=capabilities or None, privileged=False,
            init=True, **options,
        )

    def _api_access(self, spec: SandboxSpec, api: ImageAPI, labels: dict[str, str], environment: dict[str, str],
                    mounts: list[Any]) -> dict[str, Any]:
        """How the sandbox's API is reached (a unix socket in a host directory of its own, else a
        port published on ``bind_host``) and its network: the container's options for both."""
        network = self._network_for(spec.pool)
        options: dict[str, Any] = {"network_mode": "none"} if network is None else {"network": network}
        if network is not None and self.policy.domains:
            # Names are resolved by the pool's egress proxy on the gateway (allowed ones only).
            options["dns"] = [self.network(spec.pool).gateway()]
        if api.socket_path:
            host_dir = self._socket_dir_for(spec)
            mounts.append(docker.types.Mount(target=os.path.dirname(api.socket_path), source=host_dir, type="bind"))
            environment["SANDBOX_SOCKET"] = api.socket_path
            labels[LABEL_SOCKET] = os.path.join(
                self._pool_socket_dir(spec.pool), spec.sandbox_id, os.path.basename(api.socket_path)
            )
        elif network is None:
            raise SandboxStartError(
                f"image {spec.image!r} serves its API on a TCP port only, and network.egress 'none' gives its "
                "sandboxes no network; use an image that serves it on a unix socket (ours does) or allow egress"
            )
        else:
            options["ports"] = {f"{spec.port}/tcp": (spec.bind_host,)}
        return options

    def _command_user(self, spec: SandboxSpec, api: ImageAPI, environment: dict[str, str]
                      ) -> tuple[list[str], dict[str, Any] | None]:
        """Who commands run as (the image's user of that name, handed the thread's directories):
        the capabilities the server then needs, and the user as the image describes it."""
        capabilities = list(spec.capabilities)
        user = api.users.get(spec.user)
        if user is not None:
            environment["SANDBOX_USER"] = spec.user
            owned = [m.container_path for m in spec.mounts if m.user_owned]
            if owned:
                environment["SANDBOX_USER_DIRS"] = ":".join(owned)
            if int(user.get("uid", 0)) != 0:
                capabilities += [cap for cap in SERVER_CAPABILITIES if cap not in capabilities]
        elif spec.user != "root" and spec.image not in self._warned:
            self._warned.add(spec.image)
            logger.warning("image %s does not say it can run commands as %r; commands run as the image decides",
                           spec.image, spec.user)
        return capabilities, user

    def _create_model(self, image: str, **kwargs: Any) -> Any:
        """``containers.create`` without the inspect it ends with (the start that follows
        inspects anyway): one engine call fewer per sandbox."""
        client = self._docker()
        name = kwargs["name"]
        kwargs.update(image=image, command=None, version=client.api._version)  # type: ignore[attr-defined]
        created = client.api.create_container(**_create_container_args(kwargs))  # (it consumes kwargs)
        return client.containers.prepare_model({"Id": created["Id"], "Name": f"/{name}"})

    def _network_for(self, pool: str) -> str | None:
        """The pool's network name (None: no network). It and its rules are checked once per
        process; a create that finds it gone (`gc` may remove an unused one) makes it again."""
        network = self.network(pool)
        if pool not in self._ready_networks:
            network.ensure()
            self._ready_networks.add(pool)
        return network.name if self.policy.networked else None

    def _socket_dir_for(self, spec: SandboxSpec) -> str:
        """Create the sandbox's private socket directory; returns it as the engine's host sees it."""
        local = os.path.join(self._pool_socket_dir(spec.pool), spec.sandbox_id)
        try:
            os.makedirs(local, mode=0o700, exist_ok=True)
            os.chmod(local, 0o700)  # only this node's actors (and root) may enter
        except OSError as exc:
            raise SandboxStartError(f"could not create the sandbox's socket directory {local}: {exc.strerror}") from exc
        return os.path.join(self._pool_socket_dir(spec.pool, host=True), spec.sandbox_id)

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

    async def list(self, pool: str | None = None) -> builtins.list[SandboxRecord]:
        """Every container of ours (one engine call)."""
        return await asyncio.to_thread(self._list, pool)

    def _list(self, pool: str | None = None) -> builtins.list[SandboxRecord]:
        label_filter = [f"{LABEL_PROJECT}={PROJECT}"]
        if pool is not None:
            label_filter.append(f"{LABEL_POOL}={pool}")
        with engine_errors("list containers"):
            # The summary listing: one call, and no per-container inspect that could
            # race with a container being removed meanwhile.
            summaries = self._docker().api.containers(all=True, filters={"label": label_filter})
        return [self._record_from_summary(summary) for summary in summaries]

    async def destroy(self, sandbox_id: str, container_id: str | None = None) -> bool:
        return await asyncio.to_thread(self._destroy, sandbox_id, container_id)

    def _destroy(self, sandbox_id: str, container_id: str | None = None) -> bool:
        if container_id is not None and container_id in self._sockets:
            return self._destroy_seen(sandbox_id, container_id)
        container = self._get(sandbox_id)
        if container is None or (container_id is not None and container.id != container_id):
            return False  # gone, or the name now belongs to a newer container: not ours to remove
        self._remove_socket_dir(container.labels.get(LABEL_SOCKET))  # first: see container_events
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

    def _destroy_seen(self, sandbox_id: str, container_id: str) -> bool:
        """Remove a container this backend made or inspected, by its id: no inspect first (its
        socket directory is known), and never a newer namesake."""
        self._remove_socket_dir(self._sockets.pop(container_id, None))  # first: see container_events
        with engine_errors(f"remove container {container_id[:12]} of sandbox {sandbox_id}"):
            try:
                self._docker().api.remove_container(container_id, force=True, v=True)
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: removal already in progress elsewhere
                    raise
        logger.info("sandbox %s: removed container %s", sandbox_id, container_id[:12])
        return True

    def _remove_socket_dir(self, socket_path: str | None) -> None:
        """The socket directory goes with its container (when it lives under our socket dir here)."""
        if not socket_path:
            return
        directory = os.path.dirname(socket_path)
        if os.path.commonpath([os.path.abspath(directory), os.path.abspath(self.socket_dir)]) != os.path.abspath(
            self.socket_dir
        ):
            return  # another node's or another config's: not ours to touch
        try:
            shutil.rmtree(directory)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove socket directory %s: %s", directory, exc.strerror)

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

    async def prepare(
        self, pool: str, *, image: str | None = None, runtime: str | None = None, limits: Any = None,
        extra_blocked: Iterable[str] = (),
    ) -> dict[str, object]:
        return await asyncio.to_thread(self._prepare, pool, image, runtime, limits, tuple(extra_blocked))

    def _prepare(
        self, pool: str, image: str | None, runtime: str | None, limits: Any, extra_blocked: tuple[str, ...]
    ) -> dict[str, object]:
        engine = self._engine_info()["name"]
        if runtime:
            with engine_errors("read engine info"):
                known = sorted((self._docker().info().get("Runtimes") or {}).keys())
            if runtime not in known:
                raise IsolationUnavailable(
                    f"runtime {runtime!r} is not registered with the Docker engine on {engine} (it knows: "
                    f"{', '.join(known)}); register it in /etc/docker/daemon.json and reload dockerd "
                    "(`scripts/bootstrap` does this for gVisor's runsc)"
                )
        image_api = self._try_image_api(image)
        if image_api is not None and not self.policy.networked and not image_api.socket_path:
            raise IsolationUnavailable(
                f"image {image!r} serves its API on a TCP port only, and network.egress 'none' gives sandboxes "
                "no network; use an image that serves it on a unix socket (ours does) or allow egress"
            )
        disk = getattr(limits, "disk", None)
        if disk and image and image_api is not None:
            self._check_disk_limit(image, disk, engine)
        network = self.network(pool)
        name = network.ensure(extra_blocked, refresh=True)
        self._ready_networks.add(pool)
        if name is not None and self.policy.enforce and not os.path.exists(f"/sys/class/net/{network.bridge}"):
            raise IsolationUnavailable(
                f"the Docker engine on {engine} does not run in this host's network namespace (bridge "
                f"{network.bridge} is not visible here), so its firewall rules cannot be installed from here; "
                "run Ray on the engine's own host, or set network.enforce: false"
            )
        return {"network": name, "bridge": network.bridge if name else None, "enforced": self.policy.needs_rules}

    async def egress_gateway(self, pool: str) -> str:
        """Where the pool's egress proxy listens on this host: its network's gateway."""
        return await asyncio.to_thread(self.network(pool).gateway)

    async def route_egress(self, pool: str, port: int, extra_blocked: Iterable[str] = ()) -> None:
        """Send the pool's sandboxes to its egress proxy on ``port`` of the gateway (their DNS
        there, and their TCP to the gateway redirected to it), and let them reach nothing else
        of this host (the rules rewritten; ``extra_blocked`` as :meth:`prepare` takes it)."""
        def _route() -> None:
            network = self.network(pool)
            network.proxy = (network.gateway(), port)
            network.ensure(tuple(extra_blocked), refresh=True)

        await asyncio.to_thread(_route)

    async def addresses(self, pool: str) -> dict[str, Owner]:
        """The pool's containers here by their address on its network: whose each is."""
        def _addresses() -> dict[str, Owner]:
            name = self.network(pool).name
            with engine_errors("list containers"):
                found = self._docker().api.containers(filters={"label": f"{LABEL_POOL}={pool}"})
            owners: dict[str, Owner] = {}
            for summary in found:
                labels = summary.get("Labels") or {}
                address = (((summary.get("NetworkSettings") or {}).get("Networks") or {}).get(name) or {}).get(
                    "IPAddress")
                if address and labels.get(LABEL_SANDBOX_ID):
                    owners[address] = Owner(labels[LABEL_SANDBOX_ID], decode_label_value(labels.get(LABEL_THREAD_ID, "")),
                                            labels.get(LABEL_ACTOR, ""))
            return owners

        return await asyncio.to_thread(_addresses)

    def _try_image_api(self, image: str | None) -> ImageAPI | None:
        if not image:
            return None
        try:
            return self._image_api(image)
        except ImageNotFound:
            return None  # the first acquire says so, with how to build it

    def _check_disk_limit(self, image: str, disk: str, engine: str) -> None:
        """Ask the engine for a container with a disk limit (never started) and remove it at once."""
        name = f"{self._prefix}-disk-check-{uuid.uuid4().hex[:8]}"
        with engine_errors("check the disk limit"):
            try:
                container = self._docker().containers.create(image, name=name, storage_opt={"size": disk},
                                                             network_mode="none")
            except docker.errors.APIError as exc:
                raise NotSupported(
                    f"limits.disk: the Docker engine on {engine} cannot limit a container's disk: "
                    f"{exc.explanation or exc}; remove limits.disk or use a storage driver with quotas "
                    "(overlay2 on xfs with pquota, btrfs, zfs)",
                    feature="limits.disk",
                ) from exc
            container.remove(force=True)

    async def teardown(self, pool: str) -> dict[str, int]:
        return await asyncio.to_thread(self._teardown, pool)

    async def clear(self, pool: str, timeout: float = 15.0) -> bool:
        """Remove every container of ``pool``, then its network: asked again while the engine still
        counts a container just removed as on it (for a moment), then made to drop the endpoints
        it keeps listing (dockerd 20.10 can keep one of a container removed while it started).
        False when the network stays all the same (restart dockerd, then `sandbox-actors gc`)."""
        network = self.network(pool)

        async def gone() -> bool:
            for record in await self.list(pool):
                await self.destroy(record.sandbox_id)
            await self.teardown(pool)
            return not network.policy.networked or not await asyncio.to_thread(network.exists)

        deadline = time.monotonic() + timeout
        while not await gone():
            if time.monotonic() >= deadline:
                await asyncio.to_thread(network.drop_stale_endpoints)
                return await gone()
            await asyncio.sleep(0.2)
        return True

    def _teardown(self, pool: str) -> dict[str, int]:
        removed = self.network(pool).remove()
        self._ready_networks.discard(pool)
        left = {record.sandbox_id for record in self._list(pool)}
        root = self._pool_socket_dir(pool)
        if os.path.isdir(root):
            for entry in os.listdir(root):
                if entry not in left:
                    self._remove_socket_dir(os.path.join(root, entry, "api.sock"))
            with contextlib.suppress(OSError):  # not empty: a sandbox of the pool still runs here
                os.rmdir(root)
        return removed

    # ── hibernation and snapshots ──────────────────────────────────────────

    async def stop_container(self, sandbox_id: str, container_id: str) -> bool:
        def _stop() -> bool:
            container = self._get(sandbox_id)
            if container is None or container.id != container_id:
                return False
            with engine_errors(f"stop container {container.name}"):
                container.stop(timeout=5)  # SIGTERM to the server (it kills its commands), SIGKILL after 5 s
            return True

        return await asyncio.to_thread(_stop)

    async def checkpoint(self, sandbox_id: str, container_id: str, name: str) -> dict[str, object]:
        """Save the running container's processes and memory as checkpoint ``name``, stopping it
        (gVisor only, with the engine's experimental mode; its server must be quiet first:
        :meth:`signal` SIGUSR1). Returns the checkpoint's directory and size in bytes.

        Raises:
            NotSupported: the engine or the container's runtime cannot checkpoint.
            SandboxStartError: the runtime refused (the container may have stopped: ask).
        """
        def _checkpoint() -> dict[str, object]:
            api = self._docker().api
            if not self._engine_info()["experimental"]:
                raise NotSupported(
                    f"live checkpoints: the Docker engine on {self._engine_info()['name']} runs without experimental "
                    'mode; set "experimental": true in /etc/docker/daemon.json and restart dockerd',
                    feature="live checkpoint")
            with engine_errors(f"checkpoint the container of sandbox {sandbox_id}"):
                try:
                    response = api._post_json(  # type: ignore[attr-defined]
                        api._url("/containers/{0}/checkpoints", container_id),  # type: ignore[attr-defined]
                        data={"CheckpointID": name, "Exit": True})
                    api._raise_for_status(response)  # type: ignore[attr-defined]
                except docker.errors.NotFound:
                    raise SandboxNotFound(f"the container of sandbox {sandbox_id} is gone") from None
                except docker.errors.APIError as exc:
                    _clear_stale_task(container_id)  # cut short (killed meanwhile): containerd may keep its task
                    try:
                        running = api.inspect_container(container_id)["State"]["Running"]
                    except docker.errors.NotFound:
                        running = False
                    raise _checkpoint_refused(sandbox_id, exc, running) from exc
                # The engine answers before it has seen the container exit: done is stopped.
                deadline = time.monotonic() + 10
                while api.inspect_container(container_id)["State"]["Running"]:
                    if time.monotonic() > deadline:
                        raise SandboxStartError(f"sandbox {sandbox_id} still runs 10 s after its checkpoint")
                    time.sleep(0.02)
            _clear_stale_task(container_id)
            where = self.checkpoint_dir(container_id, name)
            return {"checkpoint": name, "path": where, "bytes": _tree_bytes(where)}

        return await asyncio.to_thread(_checkpoint)

    async def remove_checkpoint(self, sandbox_id: str, container_id: str, name: str) -> None:
        def _remove() -> None:
            api = self._docker().api
            with engine_errors(f"remove checkpoint {name} of sandbox {sandbox_id}"):
                with contextlib.suppress(docker.errors.NotFound):  # gone already, or with its container
                    api._raise_for_status(api._delete(  # type: ignore[attr-defined]
                        api._url("/containers/{0}/checkpoints/{1}", container_id, name)))  # type: ignore[attr-defined]

        await asyncio.to_thread(_remove)

    def checkpoint_dir(self, container_id: str, name: str) -> str:
        """Where the engine keeps checkpoint ``name`` of a container (on this node)."""
        return os.path.join(self._engine_info()["root"], "containers", container_id, "checkpoints", name)

    async def keep_checkpoint(self, sandbox_id: str, container_id: str, name: str, into: str) -> int:
        """Copy checkpoint ``name`` of the container to the directory ``into`` (a live snapshot's,
        which outlives the container); returns its bytes.

        Raises:
            SandboxStartError: it could not be copied (nothing is left at ``into``).
        """
        def _keep() -> int:
            try:
                os.makedirs(os.path.dirname(into), mode=0o700, exist_ok=True)
                shutil.copytree(self.checkpoint_dir(container_id, name), into)
                # Which Ray cluster kept it: `gc` removes checkpoints of clusters gone from here.
                with open(os.path.join(into, CHECKPOINT_CLUSTER_FILE), "w") as mark:
                    mark.write(self._labels.get(LABEL_CLUSTER, ""))
            except OSError as exc:
                shutil.rmtree(into, ignore_errors=True)
                raise SandboxStartError(f"could not keep the checkpoint of sandbox {sandbox_id} in {into}: "
                                        f"{exc.strerror or exc}") from exc
            return _tree_bytes(into)

        return await asyncio.to_thread(_keep)

    async def fork_from_checkpoint(self, spec: SandboxSpec, source: str) -> SandboxRecord:
        """A new sandbox (``spec``: its own id, mounts and token) that goes on from the checkpoint
        in directory ``source`` (on this node): its processes and memory are the checkpointed
        sandbox's, its files its own from then on (a live fork). Its server is quiet until
        :meth:`listen_again`, when it takes ``spec``'s token (it held the source's in memory).
        Docker 20.10 refuses a checkpoint directory of another container, so a copy goes where
        the engine looks for the new container's own.

        Raises:
            SandboxNotFound: no such checkpoint here; RestoreFailed, SandboxStartError: the
            restore failed (the new container is removed).
        """
        def _fork() -> SandboxRecord:
            if not os.path.isdir(source):
                raise SandboxNotFound(f"checkpoint {source} is not on this node")
            name = "fork"
            container = self._create_container(spec, self.container_name(spec.sandbox_id))
            try:
                try:
                    copy = self.checkpoint_dir(container.id, name)
                    shutil.copytree(source, copy, copy_function=_link_or_copy)  # a restore only reads them
                    # A file of its own: containerd receives each restore's checkpoint as a blob named
                    # by its digest, and two forks restoring the same bytes at once would collide.
                    with open(os.path.join(copy, "sandbox-actors-fork"), "w") as mark:
                        mark.write(spec.sandbox_id)
                    socket_dir = os.path.join(self._pool_socket_dir(spec.pool), spec.sandbox_id)
                    if spec.token:
                        with open(os.path.join(socket_dir, FORK_TOKEN_FILE), "w") as token_file:
                            token_file.write(hashlib.sha256(spec.token.encode()).hexdigest())
                    _leave_wake(socket_dir)  # taken at the restored server's first look
                except OSError as exc:
                    raise SandboxStartError(f"could not prepare sandbox {spec.sandbox_id}'s restore from {source}: "
                                            f"{exc.strerror or exc}") from exc
                with engine_errors(f"restore sandbox {spec.sandbox_id} from checkpoint {source}"):
                    self._start_request(spec.sandbox_id, container.id, name, wake_left=True)
                    record = self._record_attrs(self._docker().api.inspect_container(container.id))
                with contextlib.suppress(OSError):  # used: the fork's own stays with it until removed
                    shutil.rmtree(self.checkpoint_dir(container.id, name))
                return record
            except BaseException:
                with contextlib.suppress(SandboxError):
                    self._destroy(spec.sandbox_id, container.id)
                raise

        return await asyncio.to_thread(_fork)

    async def listen_again(self, record: SandboxRecord, timeout: float = 10.0) -> None:
        """After a restore from a checkpoint (or a checkpoint that failed): wait until the sandbox's
        server listens again. The word to is a file beside its socket (WAKE_FILE), left before the
        restore (:meth:`start_container`, :meth:`fork_from_checkpoint`) and again here, which a
        quiet server looks for every 0.1 s: a signal through the engine took 5 s and more while 32
        forks restored at once. SIGUSR2 follows when the socket is not back within a second (an
        image of before the file), and again every 0.2 s (a signal sent while gVisor still restores
        can be lost).

        Raises:
            ReadinessTimeout: no socket within ``timeout``.
        """
        socket_path = record.url[len("unix:"):] if record.url.startswith("unix:") else ""
        if not socket_path:
            raise NotSupported("live checkpoints need a sandbox whose API is on a unix socket", feature="live checkpoint")
        deadline = time.monotonic() + timeout
        signal_at = time.monotonic() + _WAKE_GRACE
        try:
            if not os.path.exists(socket_path):
                _leave_wake(os.path.dirname(socket_path))
            while not os.path.exists(socket_path):
                now = time.monotonic()
                if now > deadline:
                    raise ReadinessTimeout(f"sandbox {record.sandbox_id} did not listen again within {timeout:.0f}s "
                                           f"of its restore; log tail:\n{await self.logs_tail(record.sandbox_id)}")
                if now >= signal_at:
                    await self.signal(record.sandbox_id, record.container_id, "SIGUSR2")
                    signal_at = time.monotonic() + 0.2
                await asyncio.sleep(0.005)
        finally:
            with contextlib.suppress(OSError):  # taken by the server; else not left for its next quiet
                os.unlink(os.path.join(os.path.dirname(socket_path), WAKE_FILE))

    async def signal(self, sandbox_id: str, container_id: str, signal: str) -> None:
        """Send ``signal`` (e.g. SIGUSR1) to the container's main process (through its init)."""
        def _signal() -> None:
            with engine_errors(f"signal the container of sandbox {sandbox_id}"):
                api = self._docker().api
                try:
                    api.kill(container_id, signal=signal)
                except docker.errors.NotFound:
                    raise SandboxNotFound(f"the container of sandbox {sandbox_id} is gone") from None
                except docker.errors.APIError as exc:
                    # Refused because it stopped meanwhile (killed): it died; else the engine's error.
                    # A container being killed refuses a signal while the engine still says it runs
                    # (gVisor: "sandbox is not running"), so its state is asked for a moment.
                    if _stays_running(api, container_id, SIGNAL_SETTLE_SECONDS):
                        raise
                    raise SandboxDied(f"sandbox {sandbox_id} stopped before it could be signalled "
                                      f"({signal}): {str(exc.explanation or exc)[:200]}") from exc

        await asyncio.to_thread(_signal)

    async def start_container(self, sandbox_id: str, container_id: str,
                              checkpoint: str | None = None) -> tuple[SandboxRecord, bool]:
        """Start the stopped container ``container_id`` (a resume knows its id: no look-up by name
        first, ~3 ms a resume would wait for) again, with one inspect after the start for its new
        host port and process. Returns its record and whether it was running already (the engine
        started nothing: it answers 304, which the SDK's ``start`` does not tell apart from 204,
        hence the request made here as ``start`` makes it).

        With ``checkpoint``, the container's processes and memory come back from that checkpoint
        (see :meth:`checkpoint`; its server is quiet until :meth:`listen_again`).

        Raises:
            SandboxNotFound: the container is gone.
        """
        def _start() -> tuple[SandboxRecord, bool]:
            with engine_errors(f"start the container of sandbox {sandbox_id}"):
                try:
                    ran_already = self._start_request(sandbox_id, container_id, checkpoint)
                    attrs = self._docker().api.inspect_container(container_id)
                except docker.errors.NotFound:
                    raise SandboxNotFound(f"the container of sandbox {sandbox_id} is gone") from None
            return self._record_attrs(attrs), ran_already

        return await asyncio.to_thread(_start)

    def _start_request(self, sandbox_id: str, container_id: str, checkpoint: str | None,
                       wake_left: bool = False) -> bool:
        """Start the container (from ``checkpoint`` when given); whether it ran already (the
        engine's 304, which the SDK's ``start`` does not tell apart from 204: hence the request
        made here as ``start`` makes it). Before a restore, the restored server's word to listen
        again is left beside its socket (unless ``wake_left``: it is already).

        Raises:
            RestoreFailed: the engine could not restore the checkpoint.
        """
        api = self._docker().api
        params = {"checkpoint": checkpoint} if checkpoint else None
        if checkpoint and not wake_left:  # the restored server listens at its first look
            socket_path = self._sockets.get(container_id) or (
                api.inspect_container(container_id)["Config"]["Labels"] or {}).get(LABEL_SOCKET)
            if socket_path:
                _leave_wake(os.path.dirname(socket_path))
        for attempt in range(1, _RESTORE_ATTEMPTS + 1):
            try:
                # A restore reads the whole checkpoint (hundreds of MB for a loaded process, and
                # forks restore at once): longer than any other start may take.
                response = api._post(api._url("/containers/{0}/start", container_id),  # type: ignore[attr-defined]
                                     params=params, timeout=_RESTORE_TIMEOUT if checkpoint else self._timeout)
                api._raise_for_status(response)  # type: ignore[attr-defined]
                return bool(response.status_code == 304)
            except docker.errors.NotFound:
                raise
            except docker.errors.APIError as exc:
                if not checkpoint:
                    raise
                why = str(exc.explanation or exc)
                # Docker 20.10 hands the checkpoint to containerd as a blob at each restore, and
                # now and then containerd holds that blob already (seen in about one restore in
                # twenty here, and every time the same checkpoint is restored twice): drop it, again.
                if "already exists" in why and attempt < _RESTORE_ATTEMPTS and _drop_containerd_blob(why):
                    logger.info("sandbox %s: containerd held checkpoint %s already; restoring again",
                                sandbox_id, checkpoint)
                    continue
                _clear_stale_task(container_id)  # so that it can start again, with its files only
                raise RestoreFailed(f"sandbox {sandbox_id} could not be restored from checkpoint "
                                    f"{checkpoint}: {why[-300:]}") from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def commit(self, sandbox_id: str, container_id: str, image: str, labels: Mapping[str, str]) -> dict[str, object]:
        def _commit() -> dict[str, object]:
            container = self._get(sandbox_id)
            if container is None or container.id != container_id:
                raise SandboxNotFound(f"the container of sandbox {sandbox_id} is gone")
            repository, _, tag = image.rpartition(":")
            with engine_errors(f"commit container {container.name}"):
                base = self._docker().images.get(container.attrs["Config"]["Image"])
                committed = container.commit(repository=repository, tag=tag, changes=_snapshot_changes(
                    container.attrs["Config"], base.attrs["Config"], labels))
            return {"image_id": committed.id, "size": int(committed.attrs.get("Size") or 0)}

        return await asyncio.to_thread(_commit)

    async def snapshot_images(self, pool: str) -> builtins.list[dict[str, object]]:
        def _images() -> builtins.list[dict[str, object]]:
            with engine_errors("list snapshot images"):
                found = self._docker().images.list(
                    filters={"label": [f"{LABEL_PROJECT}={PROJECT}", f"{LABEL_POOL}={pool}", LABEL_SNAPSHOT]})
            return [{"image": (image.tags or [str(image.id)])[0], "image_id": image.id,
                     "name": image.labels.get(LABEL_SNAPSHOT, ""),
                     "created_at": float(image.labels.get(LABEL_SNAPSHOT_CREATED) or 0)} for image in found]

        return await asyncio.to_thread(_images)

    async def remove_image(self, image: str) -> bool:
        def _remove() -> bool:
            with engine_errors(f"remove image {image}"):
                try:
                    self._docker().images.remove(image)
                except docker.errors.ImageNotFound:
                    return False
                except docker.errors.APIError as exc:
                    if exc.status_code == 409:  # a container (even a stopped one) still uses it
                        return False
                    raise
            return True

        return await asyncio.to_thread(_remove)

    async def has_image(self, image: str) -> bool:
        def _has() -> bool:
            with engine_errors(f"inspect image {image}"):
                try:
                    self._docker().images.get(image)
                except docker.errors.ImageNotFound:
                    return False
            return True

        return await asyncio.to_thread(_has)

    async def export_image(self, image: str) -> bytes:
        def _export() -> bytes:
            with engine_errors(f"export image {image}"):
                return b"".join(self._docker().images.get(image).save(named=True))

        return await asyncio.to_thread(_export)

    async def import_image(self, archive: bytes) -> None:
        def _import() -> None:
            with engine_errors("import an image"):
                self._docker().images.load(archive)

        await asyncio.to_thread(_import)

    def container_events(self, pool: str) -> Iterator[ContainerEvent]:
        """Deaths of ``pool``'s containers, as the engine reports them (blocking: run it in a thread),
        except the removals of our own destroys (their socket directory went first). Ends when the
        engine's stream does (an engine restart): call again to follow on. Each call first reports
        every container of the pool that is not running: deaths while nobody followed (an engine
        restart stops them all, and a restarted engine keeps no event history) are not lost."""
        labels = [f"{LABEL_PROJECT}={PROJECT}", f"{LABEL_POOL}={pool}"]
        filters = {"type": "container", "event": ["die", "oom", "destroy"], "label": labels}
        with engine_errors("follow container events"):
            # A client of its own: the stream holds its connection for as long as it runs.
            client = connect(self._base_url, self._timeout)
            try:
                stream = client.events(decode=True, filters=filters)  # following from here on...
                for summary in client.api.containers(all=True, filters={"label": labels, "status": "exited"}):
                    sandbox_id = (summary.get("Labels") or {}).get(LABEL_SANDBOX_ID)  # ...and what came before
                    if sandbox_id:
                        yield ContainerEvent(sandbox_id, str(summary.get("Id") or ""), "exited")
                died: collections.OrderedDict[str, None] = collections.OrderedDict()  # the latest "die"s told
                for event in stream:
                    attributes = (event.get("Actor") or {}).get("Attributes") or {}
                    sandbox_id = attributes.get(LABEL_SANDBOX_ID)
                    if not sandbox_id or _removed_on_purpose(attributes.get(LABEL_SOCKET)):
                        continue
                    container_id, status = str(event.get("id") or ""), str(event.get("status") or "")
                    if status == "destroy" and died.pop(container_id, False) is None:
                        continue  # its death was told already (a removal sends "die", then "destroy")
                    if status == "die":
                        died[container_id] = None
                        if len(died) > 1024:
                            died.popitem(last=False)
                    if status == "die" and container_id:
                        # The engine sends "die" before it is done with the exit (the network's and
                        # mounts' cleanup, then its container list, which says "running" until then):
                        # an inspect waits for that, so whoever lists containers on hearing of this
                        # death sees it stopped.
                        with contextlib.suppress(docker.errors.NotFound):
                            client.api.inspect_container(container_id)
                    yield ContainerEvent(sandbox_id, container_id, status)
            finally:
                client.close()

    def orphans(self, alive: Callable[[str], bool]) -> dict[str, builtins.list[dict[str, str]]]:
        """Containers and networks of ours on this engine, of any pool, whose Ray cluster (its
        label) ``alive`` says no longer runs here. Those without a cluster label are not judged."""
        with engine_errors("list containers and networks"):
            summaries = self._docker().api.containers(all=True, filters={"label": f"{LABEL_PROJECT}={PROJECT}"})
            networks = our_networks(self._docker())
        verdicts: dict[str, bool] = {}

        def dead(labels: Mapping[str, str]) -> bool:
            cluster = labels.get(LABEL_CLUSTER)
            if not cluster:
                return False
            if cluster not in verdicts:
                verdicts[cluster] = alive(cluster)
            return not verdicts[cluster]

        containers = [
            {"container": (c.get("Names") or ["/"])[0].lstrip("/"), "container_id": c["Id"],
             "pool": c["Labels"].get(LABEL_POOL, ""), "sandbox_id": c["Labels"].get(LABEL_SANDBOX_ID, ""),
             "cluster": c["Labels"][LABEL_CLUSTER], "socket": c["Labels"].get(LABEL_SOCKET, "")}
            for c in summaries if dead(c.get("Labels") or {})
        ]
        left = {c.get("Labels", {}).get(LABEL_POOL) for c in summaries if not dead(c.get("Labels") or {})}
        found = [
            {"network": n.name, "pool": (n.attrs.get("Labels") or {}).get(LABEL_POOL, ""),
             "cluster": (n.attrs.get("Labels") or {})[LABEL_CLUSTER]}
            for n in networks if dead(n.attrs.get("Labels") or {})
            and (n.attrs.get("Labels") or {}).get(LABEL_POOL) not in left
        ]
        return {"containers": containers, "networks": found}

    def remove_orphans(self, orphans: dict[str, builtins.list[dict[str, str]]]) -> dict[str, int]:
        """Remove what :meth:`orphans` listed: containers by id, then networks with their rules and
        the pool's socket directories that no container of it uses (also those of containers
        removed by other hands)."""
        removed = {"containers": 0, "networks": 0, "rules": 0}
        for item in orphans.get("containers", []):
            with engine_errors(f"remove container {item['container']}"):
                try:
                    self._docker().api.remove_container(item["container_id"], force=True, v=True)
                    removed["containers"] += 1
                except docker.errors.NotFound:
                    pass
            self._remove_socket_dir(item.get("socket") or None)
        for pool in {item["pool"] for item in orphans.get("containers", [])}:
            with contextlib.suppress(OSError):  # not empty: the pool still has a sandbox here
                os.rmdir(self._pool_socket_dir(pool))
        for item in orphans.get("networks", []):
            done = self._teardown(item["pool"])
            removed["networks"] += done["networks"]
            removed["rules"] += done["rules"]
        return removed

    async def usage(self, sandbox_id: str, container_id: str, since: Usage | None = None,
                    disk: bool = True) -> Usage:
        def _sample() -> tuple[float, dict[str, Any]]:
            with engine_errors(f"read the statistics of sandbox {sandbox_id}"):
                try:
                    stats = self._docker().api.stats(container_id, stream=False, one_shot=True)
                except docker.errors.NotFound:
                    raise SandboxNotFound(f"the container of sandbox {sandbox_id} is gone") from None
            return time.time(), stats

        def _disk() -> int | None:
            with engine_errors(f"measure the writable layer of sandbox {sandbox_id}"):
                api = self._docker().api
                try:  # the SDK's inspect has no size: the engine's own query
                    found = api._result(api._get(api._url("/containers/{0}/json", container_id),  # type: ignore[attr-defined]
                                                 params={"size": 1}), True)  # type: ignore[attr-defined]
                    return int(found.get("SizeRw") or 0)
                except docker.errors.NotFound:
                    raise SandboxNotFound(f"the container of sandbox {sandbox_id} is gone") from None

        first = None
        if since is None or time.time() - since.at > _USAGE_STALE_SECONDS:
            first = _usage_of(*await asyncio.to_thread(_sample))
            await asyncio.sleep(USAGE_CPU_WINDOW)
        elif (short := USAGE_CPU_WINDOW - (time.time() - since.at)) > 0:
            await asyncio.sleep(short)  # a CPU percent over less is the throttle's rhythm, not the use
        at, stats = await asyncio.to_thread(_sample)
        now = _usage_of(at, stats, since=first or since)
        if disk:
            now = dataclasses.replace(now, disk_bytes=await asyncio.to_thread(_disk))
        return now

    async def sweep_tasks(self) -> int:
        """containerd tasks, and their shim processes, of containers this engine no longer has:
        Docker 20.10 with gVisor leaves one behind when a restored container is killed while it is
        checkpointed (Docker's own cleanup fails: "cannot delete running task"). Returns how many
        were ended."""
        def _sweep() -> int:
            shims = _shims_by_container()
            if not shims:
                return 0
            with engine_errors("list containers"):
                known = {c["Id"] for c in self._docker().api.containers(all=True, quiet=True)}
            gone = [container_id for container_id in shims if container_id not in known]
            for container_id in gone:
                _clear_stale_task(container_id, force=True)
            return len(gone)

        return await asyncio.to_thread(_sweep)

    async def sweep_rules(self) -> int:
        """Remove firewall rules of ours (any pool's) whose network no longer exists on this engine.
        Returns how many pools' rules went."""

        def _sweep() -> int:
            if not self.policy.enforce:
                return 0
            networks = {(n.attrs.get("Labels") or {}).get(LABEL_TAG) for n in our_networks(self._docker())}
            stale = [tag for tag in Firewall.installed_tags() if tag not in networks]
            for tag in stale:
                Firewall(tag, f"sbx-{tag}", os.path.join(self.socket_dir, ".firewall.lock")).remove()
            return len(stale)

        return await asyncio.to_thread(_sweep)

    async def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)


_USAGE_STALE_SECONDS = 60.0  # a previous look older than this is not measured from
SIGNAL_SETTLE_SECONDS = 2.0  # how long a container that refused a signal may take to show it stopped


def _stays_running(api: Any, container_id: str, within: float) -> bool:
    """Whether the engine still says the container runs after ``within`` seconds (False as soon
    as it says stopped or gone)."""
    deadline = time.monotonic() + within
    while True:
        try:
            if not api.inspect_container(container_id)["State"]["Running"]:
                return False
        except docker.errors.NotFound:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)


def _removed_on_purpose(socket_path: str | None) -> bool:
    """Whether a container's death is our own removal: its socket directory goes first (the pool
    asked for it and knows; telling it costs an inspect and a call per removed sandbox). Only
    where the pool's socket directory is here to tell (a node's reboot empties both)."""
    if not socket_path:
        return False
    directory = os.path.dirname(socket_path)
    return os.path.isdir(os.path.dirname(directory)) and not os.path.isdir(directory)


def _usage_of(at: float, stats: Mapping[str, Any], since: Usage | None = None) -> Usage:
    """A :class:`Usage` from the engine's statistics of a container (computed as ``docker stats``
    computes them); its CPU percent over the time since the look ``since``."""
    cpu = (stats.get("cpu_stats") or {}).get("cpu_usage") or {}
    cpu_seconds = float(cpu.get("total_usage") or 0) / 1e9
    memory = stats.get("memory_stats") or {}
    detail = memory.get("stats") or {}
    used = int(memory.get("usage") or 0)
    cache = int(detail.get("inactive_file", detail.get("total_inactive_file", 0)) or 0)
    networks = (stats.get("networks") or {}).values()
    blocks = (stats.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
    interval = at - since.at if since is not None else 0.0
    percent = (cpu_seconds - since.cpu_seconds) / interval * 100 if since is not None and interval > 0 else 0.0
    return Usage(
        at=at, cpu_percent=round(max(0.0, percent), 2), cpu_seconds=round(cpu_seconds, 3),
        memory_bytes=used - cache if cache < used else used, memory_limit_bytes=int(memory.get("limit") or 0),
        pids=int((stats.get("pids_stats") or {}).get("current") or 0),
        net_rx_bytes=sum(int(n.get("rx_bytes") or 0) for n in networks),
        net_tx_bytes=sum(int(n.get("tx_bytes") or 0) for n in networks),
        block_read_bytes=sum(int(b.get("value") or 0) for b in blocks if str(b.get("op")).lower() == "read"),
        block_write_bytes=sum(int(b.get("value") or 0) for b in blocks if str(b.get("op")).lower() == "write"),
        interval=round(interval, 3),
    )


def _leave_wake(socket_dir: str) -> None:
    """Leave the word for a quiet sandbox's server to listen again (WAKE_FILE) in its socket's
    directory, which only this node's actors may enter; a directory gone (the sandbox destroyed
    meanwhile) is left to the wait for its socket to tell."""
    try:
        with open(os.path.join(socket_dir, WAKE_FILE), "w"):
            pass
    except OSError as exc:
        logger.debug("no word to listen again in %s: %s", socket_dir, exc.strerror or exc)


def _checkpoint_refused(sandbox_id: str, exc: docker.errors.APIError, running: bool) -> SandboxError:
    """The engine's refusal of a checkpoint, typed: a runtime that cannot checkpoint is
    NotSupported (runc here: CRIU fails on this kernel, and may leave the container stopped); a
    container that stopped meanwhile (killed) died; anything else, a refusal to act on."""
    why = str(exc.explanation or exc)
    if "criu" in why.lower():  # runc's checkpoints are CRIU's, which fails on this kind of kernel
        return NotSupported(f"live checkpoints need gVisor (runtime: runsc); the engine said: {why[:300]}",
                            feature="live checkpoint")
    if not running or "not running" in why:  # killed (or stopped) meanwhile: nothing to keep
        return SandboxDied(f"sandbox {sandbox_id} stopped before its checkpoint: {why[:300]}")
    if "runsc" not in why:
        return NotSupported(f"live checkpoints need gVisor (runtime: runsc); the engine said: {why[:300]}",
                            feature="live checkpoint")
    if "bound host socket" in why:
        return SandboxStartError(f"sandbox {sandbox_id} still held a socket on the host (its server was not "
                                 "quiet) and could not be checkpointed")
    return SandboxStartError(f"gVisor could not checkpoint sandbox {sandbox_id}: {why[-300:]}")


_RESTORE_ATTEMPTS = 3
_RESTORE_TIMEOUT = 600.0
CHECKPOINT_CLUSTER_FILE = "sandbox-actors-cluster"  # in a kept checkpoint: the Ray session that took it
WAKE_FILE = ".listen"  # beside a quiet sandbox's socket: the word to listen again (the image's server takes it)
_WAKE_GRACE = 1.0  # seconds a restored server has to take WAKE_FILE before it is signalled too
FORK_TOKEN_FILE = ".token-sha256"  # beside a live fork's socket: its own token's hash (the image's server takes it)
_BLOB = re.compile(r"content (sha256:[0-9a-f]{64}): already exists")


def _ctr(*args: str) -> subprocess.CompletedProcess[str] | None:
    """Run containerd's own client on the engine's containerd (namespace moby); None when this
    machine has no ``ctr`` or no such containerd socket."""
    ctr = shutil.which("ctr")
    address = next((a for a in ("/var/run/docker/containerd/containerd.sock", "/run/containerd/containerd.sock")
                    if os.path.exists(a)), None)
    if ctr is None or address is None:
        return None
    return subprocess.run([ctr, "--address", address, "--namespace", "moby", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def _drop_containerd_blob(why: str) -> bool:
    """Remove the blob a restore found already in containerd's content store; whether it could."""
    found = _BLOB.search(why)
    done = _ctr("content", "rm", found.group(1)) if found is not None else None
    if done is None:
        return False
    if done.returncode != 0:
        logger.info("could not drop containerd blob %s: %s", found.group(1) if found else "", done.stderr.strip()[:200])
    return True  # dropped, or gone meanwhile: worth one more try either way


def _clear_stale_task(container_id: str, force: bool = False) -> bool:
    """After a checkpoint of a container that was itself restored from one, Docker 20.10 with
    this gVisor leaves containerd's task of it behind, stopped yet undeletable, with its shim
    process: the container could not start again ("id already in use"), and the shim would
    outlive it. End that shim, then remove the task and containerd's container object (Docker
    makes a new one at the next start). Whether there was one (``force``: its shim is ended
    even when containerd no longer lists the task)."""
    listed = _ctr("task", "ls", "--quiet")
    if not force and (listed is None or container_id not in listed.stdout.split()):
        return False
    for pid in _shims_of(container_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    deadline = time.monotonic() + 5
    while _shims_of(container_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    _ctr("task", "rm", "--force", container_id)
    _ctr("container", "rm", container_id)
    logger.info("container %s: cleared the task containerd kept after its checkpoint", container_id[:12])
    return True


def _shims_of(container_id: str) -> list[int]:
    """The containerd shim processes serving ``container_id`` (running, not yet reaped)."""
    return _shims_by_container().get(container_id, [])


def _shims_by_container() -> dict[str, list[int]]:
    """containerd's shim processes on this machine (running, not yet reaped), by the container
    each serves."""
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            if not argv or b"containerd-shim" not in argv[0] or b"-id" not in argv:
                continue
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        at = argv.index(b"-id") + 1
        if state != "Z" and at < len(argv):
            found.setdefault(argv[at].decode(errors="replace"), []).append(int(entry))
    return found


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (no bytes copied: hundreds of MB per fork of a loaded process), or a copy
    when the two are on different filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _tree_bytes(path: str) -> int:
    """Bytes in the files under ``path`` (0 when it cannot be read here: another node's engine)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class _NameConflict(Exception):
    """Internal: the container name is taken (HTTP 409 on create)."""


class _NetworkGone(Exception):
    """Internal: the pool's network was removed since this process checked it (HTTP 404 on create)."""
