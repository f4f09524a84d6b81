"""The provisioner backend, for real: a provisioner-compatible service on loopback
(tests/provisioner_service.py) that creates real containers of our image.

The whole path runs: pool -> SandboxActor -> provisioner -> container ->
readiness -> exec. Plus what goes wrong with a provisioner: a wrong API key,
the provisioner down, a sandbox that never becomes ready, a 500 with a message.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

import sandbox_actors
from backends import SandboxAPI, SandboxSpec
from backends.errors import (
    BackendError,
    BackendUnauthorized,
    BackendUnavailable,
    NotSupported,
    ReadinessTimeout,
)
from backends.provisioner import ProvisionerBackend
from sandbox_actors.config import SandboxConfig
from tests.conftest import assert_no_actors_left, containers_of, remove_leftovers, run
from tests.provisioner_service import FAIL_MESSAGE, POOL, free_port

API_KEY = "test-key-" + secrets.token_hex(4)


class Service:
    """One provisioner service process; stop() and start() again keep its port."""

    def __init__(self, image: str, mode: str = "normal") -> None:
        self.image, self.mode, self.port = image, mode, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> Service:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.provisioner_service", "--api-key", API_KEY, "--port", str(self.port),
             "--image", self.image, "--mode", self.mode],
            stdout=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline()
        assert line.startswith("listening on"), line
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def sandboxes(self) -> list[dict]:
        response = httpx.get(f"{self.url}/api/sandboxes", headers={"X-API-Key": API_KEY}, timeout=10)
        response.raise_for_status()
        return response.json()["sandboxes"]


@pytest.fixture
def service_factory(tcp_image: str, docker_client) -> Iterator:
    # A provisioner hands out http URLs (sandboxes served on a port, as the public AIO image is).
    services: list[Service] = []

    def make(mode: str = "normal") -> Service:
        services.append(Service(tcp_image, mode).start())
        return services[-1]

    yield make
    for service in services:
        service.stop()
    left = containers_of(docker_client, POOL)
    # The stand-in service is killed, not shut down: its network is its own to clean up.
    remove_leftovers(docker_client, POOL)
    assert not left, f"provisioned containers left behind: {[c.name for c in left]}"


def backend_for(service: Service, api_key: str = API_KEY) -> ProvisionerBackend:
    return ProvisionerBackend(service.url, api_key=api_key, prefix="tprov", pool="tprov-pool", request_timeout=5)


def drive(service: Service, body, api_key: str = API_KEY) -> None:
    """Run ``body(backend)`` against the service, closing the backend however it ends."""

    async def main() -> None:
        backend = backend_for(service, api_key)
        try:
            await body(backend)
        finally:
            await backend.close()

    run(main())


def spec(thread: str | None = "t1") -> SandboxSpec:
    return SandboxSpec(sandbox_id=secrets.token_hex(12), pool="tprov-pool", image="unused", thread_id=thread)


# ── the backend on its own ─────────────────────────────────────────────────


def test_backend_creates_lists_and_deletes_real_sandboxes(service_factory):
    service = service_factory()

    async def body(backend: ProvisionerBackend) -> None:
        assert await backend.health()
        wanted = spec("thread-a")
        record = await backend.create(wanted)
        assert record.sandbox_id == wanted.sandbox_id and record.thread_id == "thread-a"
        assert record.url.startswith("http://127.0.0.1:") and record.running
        assert (await backend.create(wanted)).url == record.url  # idempotent: found, not made twice
        api = SandboxAPI(record.url, record.token)
        await api.wait_ready(20, lambda: backend.is_running(wanted.sandbox_id), lambda: backend.logs_tail("x"))
        assert (await api.exec("echo via-provisioner", timeout=10)).output.strip() == "via-provisioner"
        await api.aclose()
        assert [r.sandbox_id for r in await backend.list()] == [wanted.sandbox_id]
        assert (await backend.discover(wanted.sandbox_id)).url == record.url
        assert await backend.destroy(wanted.sandbox_id) is True
        assert await backend.destroy(wanted.sandbox_id) is False  # a 404 is "already done"
        assert await backend.discover(wanted.sandbox_id) is None

    drive(service, body)
    assert service.sandboxes() == []


def test_wrong_api_key_is_a_typed_unauthorized_error(service_factory):
    service = service_factory()

    async def body(backend: ProvisionerBackend) -> None:
        with pytest.raises(BackendUnauthorized, match="provisioner_api_key"):
            await backend.create(spec())
        with pytest.raises(BackendUnauthorized):
            await backend.list()

    drive(service, body, api_key="wrong")
    assert service.sandboxes() == []


def test_provisioner_down_is_unreachable_and_destroys_nothing(service_factory):
    service = service_factory()

    async def body(backend: ProvisionerBackend) -> None:
        wanted = spec()
        record = await backend.create(wanted)
        service.stop()
        for call in (backend.discover(wanted.sandbox_id), backend.list(), backend.create(spec()),
                     backend.destroy(wanted.sandbox_id)):
            with pytest.raises(BackendUnavailable, match="unreachable") as caught:
                await call
            assert caught.value.retryable
        service.start()  # same port: the service reads what exists from the engine
        assert (await backend.discover(wanted.sandbox_id)).url == record.url
        assert await backend.destroy(wanted.sandbox_id)

    drive(service, body)


def test_server_error_message_surfaces(service_factory):
    service = service_factory("fail")

    async def body(backend: ProvisionerBackend) -> None:
        with pytest.raises(BackendError, match="HTTP 500: " + FAIL_MESSAGE):
            await backend.create(spec())

    drive(service, body)


# ── through the pool ───────────────────────────────────────────────────────


def pool_config(config: SandboxConfig, backend: str, service: Service | None, api_key: str = API_KEY) -> SandboxConfig:
    if backend == "docker":
        return config
    assert service is not None
    values = config.model_dump(exclude={"backend", "provisioner_url", "provisioner_api_key"})
    return SandboxConfig(**{**values, "container_prefix": f"tp-{config.pool_name}",
                            "provisioner_url": service.url, "provisioner_api_key": api_key})


@pytest.mark.parametrize("backend", ["docker", "provisioner"])
def test_same_scenario_on_both_backends(backend, ray_address, config, service_factory, docker_client):
    service = service_factory() if backend == "provisioner" else None
    cfg = pool_config(config, backend, service)
    assert cfg.backend.kind == backend  # a config change is all it takes
    pool = sandbox_actors.connect(cfg)
    try:
        box = pool.acquire("scenario")
        assert box.path == "cold"
        assert box.exec("echo $((6 * 7))").output.strip() == "42"
        box.write_file("/tmp/kept.txt", "still here")
        pool.release(box)
        again = pool.acquire("scenario")
        assert again.path == "warm" and again.sandbox_id == box.sandbox_id
        assert again.read_file("/tmp/kept.txt") == "still here"
        if service is not None:
            [listed] = service.sandboxes()
            assert listed["sandbox_id"] == f"{cfg.container_prefix}-{box.sandbox_id}"
            assert listed["thread_id"] == "scenario"
        pool.destroy(again)
        if service is not None:
            assert service.sandboxes() == []
    finally:
        pool.shutdown()
    assert_no_actors_left(cfg.pool_name)
    assert containers_of(docker_client, cfg.pool_name) == []


@contextlib.contextmanager
def provisioner_pool(config: SandboxConfig, service: Service, api_key: str = API_KEY, **update) -> Iterator:
    """A pool on the service; afterwards it is shut down and nothing of it may remain."""
    cfg = pool_config(config, "provisioner", service, api_key).model_copy(update=update)
    pool = sandbox_actors.connect(cfg)
    try:
        yield pool
    finally:
        pool.shutdown()
    assert service.sandboxes() == []
    assert_no_actors_left(cfg.pool_name)


def test_never_ready_sandbox_is_deleted(ray_address, config, service_factory):
    service = service_factory("pending")
    with provisioner_pool(config, service, readiness_timeout=3.0) as pool:
        started = time.monotonic()
        with pytest.raises(ReadinessTimeout):
            pool.acquire("stuck")
        assert time.monotonic() - started < 30
        assert service.sandboxes() == []  # the pending sandbox was DELETEd, not left behind
        assert pool.stats()["total"] == 0


def test_provisioner_refusals_reach_the_caller_typed(ray_address, config, service_factory):
    with provisioner_pool(config, service_factory(), api_key="wrong") as pool:
        with pytest.raises(BackendUnauthorized, match="provisioner_api_key"):
            pool.acquire("refused")
        assert pool.stats()["total"] == 0
    with provisioner_pool(config, service_factory("fail")) as pool:
        with pytest.raises(BackendError, match=FAIL_MESSAGE):
            pool.acquire("no-quota")
        assert pool.stats()["total"] == 0


def test_provisioner_down_fails_new_threads_and_keeps_running_ones(ray_address, config, service_factory):
    service = service_factory()
    with provisioner_pool(config, service) as pool:
        box = pool.acquire("kept")
        service.stop()
        with pytest.raises(BackendUnavailable):
            pool.acquire("new-while-down")
        assert box.exec("echo alive").output.strip() == "alive"  # the sandbox itself is untouched
        done = pool.reconcile()  # nothing is destroyed or forgotten for want of an answer
        assert not done.get("removed_containers") and not done.get("forgotten"), done
        service.start()
        assert {row["sandbox_id"] for row in pool.list()} == {box.sandbox_id}
        assert pool.acquire("kept").exec("echo back").output.strip() == "back"


def test_actors_request_no_docker_resources_in_provisioner_mode(ray_address, config, service_factory):
    with provisioner_pool(config, service_factory()) as pool:
        box = pool.acquire("resources")
        # No CPU and no custom resource (Ray's own view of what the actor holds): it fits on any
        # node, with Docker or without. Only ray.resources would add some.
        assert box.info["resources"] == {}
        assert box.exec("echo ok").output.strip() == "ok"


def test_prewarm_works_with_a_provisioner(ray_address, config, service_factory):
    # No mounts in this mode, so pre-warming needs no `thread_mounts: false`.
    with provisioner_pool(config, service_factory(), prewarm=1) as pool:
        deadline = time.monotonic() + 30
        while pool.stats()["states"]["spare"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        box = pool.acquire("warm-start")
        assert box.path == "prewarmed" and box.exec("echo ready").output.strip() == "ready"


def test_provisioner_config_errors_are_clear():
    from sandbox_actors.config import load_config
    from sandbox_actors.errors import ConfigError

    with pytest.raises(ConfigError, match="backend decides what its sandboxes get"):
        load_config({"provisioner_url": "http://127.0.0.1:9", "environment": {"A": "b"}})
    with pytest.raises(ConfigError, match="not both"):
        load_config({"provisioner_url": "http://127.0.0.1:9", "backend": {"kind": "docker"}})
    with pytest.raises(ConfigError, match="http"):
        load_config({"backend": {"kind": "provisioner", "url": "ftp://x"}})
    with pytest.raises(ConfigError, match="Kubernetes name"):
        load_config({"provisioner_url": "http://127.0.0.1:9", "container_prefix": "Has_Upper"})
    assert load_config({"provisioner_url": "http://127.0.0.1:9", "prewarm": 2}).prewarm == 2  # no mounts to stop it
    with pytest.raises(ConfigError, match="thread_mounts"):
        load_config({"prewarm": 2})  # the docker backend's thread mounts do
    shortcut = load_config({"provisioner_url": "http://p:8002", "provisioner_api_key": "k"})
    assert load_config({**shortcut.model_dump(), "pool_name": "other"}).backend == shortcut.backend  # a dump loads
    loaded = load_config({"backend": {"kind": "provisioner", "url": "http://p:8002/", "api_key": "$K"}})
    assert loaded.backend.url == "http://p:8002" and loaded.backend.resolved_api_key({"K": "v"}) == "v"


# ── proxies: local sandboxes direct, public ones through the environment's proxy ──


def test_proxy_rule_for_sandbox_urls():
    from backends.sandbox_api import proxy_for

    env = {"HTTP_PROXY": "http://proxy.corp:3128", "https_proxy": "http://proxy.corp:3129",
           "NO_PROXY": ".internal.example"}
    for local in ("http://127.0.0.1:8080", "http://[::1]:8080", "http://10.0.3.4:8080", "http://172.17.0.2:8080",
                  "http://192.168.1.9", "http://169.254.10.1", "http://host.docker.internal:8080",
                  "http://sandbox-abc:8080", "http://localhost:8080", "http://a.internal.example"):
        assert proxy_for(local, env) is None, local
    assert proxy_for("http://sandboxes.example.com:8080", env) == "http://proxy.corp:3128"
    assert proxy_for("https://sandboxes.example.com", env) == "http://proxy.corp:3129"
    assert proxy_for("http://sandboxes.example.com", {}) is None


def test_sandbox_api_sends_public_urls_through_the_proxy_and_local_ones_direct(monkeypatch):
    import asyncio

    seen: list[bytes] = []

    async def body() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append((await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0])
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}')
            await writer.drain()
            writer.close()

        # One loopback server plays the proxy for the public name and the sandbox for the local URL.
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        public = SandboxAPI("http://sandbox-7.sandboxes.example.com:8080")
        await public.context()
        local = SandboxAPI(f"http://127.0.0.1:{port}")
        await local.context()
        await public.aclose()
        await local.aclose()
        server.close()
        await server.wait_closed()

    run(body())
    # A proxy gets the absolute URL; the direct request only the path.
    assert seen == [b"GET http://sandbox-7.sandboxes.example.com:8080/v1/sandbox HTTP/1.1",
                    b"GET /v1/sandbox HTTP/1.1"]



def test_hibernate_and_snapshot_say_the_provisioner_cannot(ray_address, config, service_factory):
    with provisioner_pool(config, service_factory()) as pool:
        box = pool.acquire("lifecycle")
        with pytest.raises(NotSupported, match="provisioner backend cannot hibernate"):
            pool.hibernate(box)
        with pytest.raises(NotSupported, match="provisioner backend cannot snapshot"):
            box.snapshot("nope")
        assert box.exec("echo still serving").output.strip() == "still serving"
