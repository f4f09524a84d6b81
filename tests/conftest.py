"""Shared fixtures: a real Docker engine, the real image, a real local Ray.

Every test that makes containers or actors gets a pool name of its own, and
the ``no_leftovers`` fixture fails the test when anything of that pool
survives it (after removing it, so one leak does not cascade).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from backends.firewall import Firewall
from backends.images import ImageStore
from backends.network import default_socket_dir, pool_tag
from sandbox_actors.config import DEFAULT_IMAGE, SandboxConfig
from sandbox_actors.image import build_image
from tests.engine import LocalEngine
from tests.leftovers import Before, rules

PROJECT_FILTER = "sandbox-actors.project=sandbox-actors"
TEST_NAMESPACE = "sandbox_actors_tests"


def containers_of(client: docker.DockerClient, pool: str | None = None) -> list:
    labels = [PROJECT_FILTER] + ([f"sandbox-actors.pool={pool}"] if pool else [])
    for _ in range(4):
        try:
            return client.containers.list(all=True, filters={"label": labels})
        except docker.errors.NotFound:
            continue  # one was removed between the engine's list and its inspect: list again
    return client.containers.list(all=True, filters={"label": labels})


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The engine. What the run makes on it and leaves is removed at the end and fails the run;
    what was there before it (a user's pools) is never touched (see tests/leftovers.py)."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine answers ({exc}); run `bash .ci/run` or start dockerd", pytrace=False)
    before = Before.now(client)
    yield client
    made = before.made_since(client)
    before.remove(client, made)
    client.close()
    assert not any(made.values()), f"the suite left behind: { {k: v for k, v in made.items() if v} }"


@pytest.fixture(scope="session")
def image(docker_client: docker.DockerClient) -> str:
    return build_image(DEFAULT_IMAGE, progress=lambda line: None).tag


@pytest.fixture(scope="session")
def tcp_image(image: str) -> str:
    """Our image without its unix-socket label: served on a TCP port, as an image of another
    project (the public AIO image) is."""
    tag = "sandbox-actors-test-tcp:latest"
    store = ImageStore()
    try:
        dockerfile = f'FROM {image}\nLABEL sandbox-actors.api-socket=""\n'
        store.build(tag, {"Dockerfile": dockerfile.encode()}, {"sandbox-actors.test": "1"})
    finally:
        store.close()
    return tag


@pytest.fixture(scope="session")
def slow_image(image: str) -> str:
    """Our image with an API server that starts 5 s after its container does."""
    tag = "sandbox-actors-test-slow:latest"
    store = ImageStore()
    try:
        dockerfile = f'FROM {image}\nCMD ["sh", "-c", "sleep 5; exec python3 -u /opt/sandbox/server.py"]\n'
        store.build(tag, {"Dockerfile": dockerfile.encode()}, {"sandbox-actors.test": "1"})
    finally:
        store.close()
    return tag


@pytest.fixture(scope="session")
def silent_image(image: str) -> str:
    """Our image with the API server replaced by a process that never answers."""
    tag = "sandbox-actors-test-silent:latest"
    store = ImageStore()
    try:
        dockerfile = f'FROM {image}\nCMD ["sh", "-c", "echo server disabled for this test; exec sleep 3600"]\n'
        store.build(tag, {"Dockerfile": dockerfile.encode()}, {"sandbox-actors.test": "1"})
    finally:
        store.close()
    return tag


def snapshot_images_of(client: docker.DockerClient, pool: str) -> list[str]:
    """Tags (or ids) of a pool's snapshot images."""
    found = client.images.list(filters={"label": [PROJECT_FILTER, f"sandbox-actors.pool={pool}",
                                                  "sandbox-actors.snapshot"]})
    return [(image.tags or [image.id])[0] for image in found]


def networks_of(client: docker.DockerClient, pool: str | None = None) -> list:
    labels = [PROJECT_FILTER] + ([f"sandbox-actors.pool={pool}"] if pool else [])
    return client.networks.list(filters={"label": labels})


firewall_rules_of = rules  # lines of iptables-save that are ours (of one pool, when given)


def leftovers_of(client: docker.DockerClient, pool: str) -> dict[str, list[str]]:
    """Everything of a pool that may still exist on this machine: containers, snapshot images,
    networks, firewall rules, socket directories."""
    socket_root = Path(default_socket_dir()) / pool_tag(pool)
    return {
        "containers": [c.name for c in containers_of(client, pool)],
        "snapshot_images": snapshot_images_of(client, pool),
        "networks": [n.name for n in networks_of(client, pool)],
        "rules": firewall_rules_of(pool),
        "socket_dirs": [str(p) for p in socket_root.iterdir()] + [str(socket_root)] if socket_root.exists() else [],
    }


def remove_leftovers(client: docker.DockerClient, pool: str) -> None:
    for container in containers_of(client, pool):
        container.remove(force=True)
    for image in snapshot_images_of(client, pool):
        client.images.remove(image, force=True)
    for network in networks_of(client, pool):
        network.remove()
    Firewall(pool_tag(pool), f"sbx-{pool_tag(pool)}").remove()
    shutil.rmtree(Path(default_socket_dir()) / pool_tag(pool), ignore_errors=True)


@pytest.fixture
def pool_name(docker_client: docker.DockerClient) -> Iterator[str]:
    """A pool name for this test alone; anything of it left afterwards fails the test."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    left = leftovers_of(docker_client, name)
    if any(left.values()):
        remove_leftovers(docker_client, name)
    assert not any(left.values()), f"test left things behind: { {k: v for k, v in left.items() if v} }"


@pytest.fixture
def config(pool_name: str, image: str, tmp_path: Path) -> SandboxConfig:
    """A small, fast config for one test's pool."""
    return SandboxConfig(
        image=image,
        pool_name=pool_name,
        namespace=TEST_NAMESPACE,
        container_prefix=f"sat-{pool_name}",
        base_dir=str(tmp_path / "base"),
        readiness_timeout=20,
        idle_check_interval=0.5,
        reconcile_interval=2,
        capacity_timeout=20,
        limits={"memory": "256m", "cpus": 0.5, "pids": 128},
        spare_actors_max=4,  # tests start a few sandboxes at once: learn a little, not a burst's worth
    )


def unavailable(reason: str) -> None:
    """This machine lacks what a test needs: a skip saying why, or in CI (SANDBOX_ACTORS_CI set)
    a failure, since CI's machine must have it."""
    if os.environ.get("SANDBOX_ACTORS_CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def local_engine() -> LocalEngine:
    """The local dockerd, for tests that stop, pause and start it (see tests/engine.py)."""
    engine = LocalEngine.find()
    if engine is None:
        unavailable("this test stops and starts the Docker engine: it needs a local dockerd process")
    return engine


def run(coro):
    return asyncio.run(coro)


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.1):
    """Poll ``predicate`` until it returns something true or ``timeout`` passes; return its last value."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="session", autouse=True)
def _quiet_ray_env() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A private local Ray cluster for the session; its address for other processes."""
    import logging

    import ray

    ray.init(address="local", logging_level=logging.WARNING, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def named_actors(prefix: str = "") -> list[str]:
    import ray

    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == TEST_NAMESPACE and a["name"].startswith(prefix)
    )


def serving_actors() -> list[str]:
    """Names of SandboxActors that serve a sandbox (spares, which serve none, are left out)."""
    import ray

    serving = []
    for name in named_actors("sbx-"):
        try:
            info = ray.get(ray.get_actor(name, namespace=TEST_NAMESPACE).describe.remote(), timeout=10)
        except (ValueError, ray.exceptions.RayError):
            continue  # died meanwhile
        if info.get("sandbox_id") is not None:
            serving.append(name)
    return serving


@pytest.fixture
def pool(ray_address: str, config: SandboxConfig):
    """A connected pool for this test; shut down after it, and nothing of it may remain."""
    import sandbox_actors

    client = sandbox_actors.connect(config)
    yield client
    client.shutdown()
    assert_no_actors_left(config.pool_name)


def assert_no_actors_left(pool_name: str, wait: float = 10.0) -> None:
    """Fail when sandbox actors, reapers or the pool itself outlive a shutdown (kills are async: wait a bit)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        left = [n for n in named_actors() if n.startswith(("sbx-", f"reaper-{pool_name}")) or n == pool_name]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"actors left after shutdown: {left}"


def sigint_default() -> None:
    """``preexec_fn`` for a child that a test interrupts as a user's Ctrl-C would. A run started
    in the background by a non-interactive shell (as CI may start the suite) has SIGINT ignored,
    children inherit that, and Python then never raises KeyboardInterrupt; a terminal's Ctrl-C
    reaches a process whose SIGINT is the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
