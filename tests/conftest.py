"""Shared fixtures: a real Docker engine, the real image, a real local Ray.

Every test that makes containers or actors gets a pool name of its own, and
the ``no_leftovers`` fixture fails the test when anything of that pool
survives it (after removing it, so one leak does not cascade).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from backends.images import ImageStore
from sandbox_actors.config import DEFAULT_IMAGE, SandboxConfig
from sandbox_actors.image import build_image

PROJECT_FILTER = "sandbox-actors.project=sandbox-actors"
TEST_NAMESPACE = "sandbox_actors_tests"


def containers_of(client: docker.DockerClient, pool: str | None = None) -> list:
    labels = [PROJECT_FILTER] + ([f"sandbox-actors.pool={pool}"] if pool else [])
    return client.containers.list(all=True, filters={"label": labels})


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine answers ({exc}); run `bash .ci/run` or start dockerd", pytrace=False)
    yield client
    left = containers_of(client)
    for container in left:
        container.remove(force=True)
    client.close()
    assert not left, f"containers of ours left after the suite: {[c.name for c in left]}"


@pytest.fixture(scope="session")
def image(docker_client: docker.DockerClient) -> str:
    return build_image(DEFAULT_IMAGE, progress=lambda line: None).tag


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


@pytest.fixture
def pool_name(docker_client: docker.DockerClient) -> Iterator[str]:
    """A pool name for this test alone; anything of it left afterwards fails the test."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    left = containers_of(docker_client, name)
    for container in left:
        container.remove(force=True)
    assert not left, f"test left containers behind: {[c.name for c in left]}"


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
    )


def run(coro):  # noqa: ANN001, ANN201 - tiny helper for async code in sync tests
    return asyncio.run(coro)


@pytest.fixture(scope="session", autouse=True)
def _quiet_ray_env() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
