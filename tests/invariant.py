"""The no-leak invariant: labelled containers of a pool = its live SandboxActors = its records."""

from __future__ import annotations

import time

import ray

from tests.conftest import TEST_NAMESPACE, containers_of


def sandboxes_served(pool_name: str, namespace: str) -> set[str]:
    """Sandbox ids the pool's live SandboxActors serve (spares serve none)."""
    served = set()
    for item in ray.util.list_named_actors(all_namespaces=True):
        if item["namespace"] != namespace or not item["name"].startswith(f"sbx-{pool_name}-"):
            continue
        try:
            info = ray.get(ray.get_actor(item["name"], namespace=namespace).describe.remote(), timeout=10)
        except (ValueError, ray.exceptions.RayError):
            continue  # died meanwhile: not live
        if info.get("sandbox_id") is not None:
            served.add(info["sandbox_id"])
    return served


def views(pool, docker_client, namespace: str = TEST_NAMESPACE) -> dict[str, set[str]]:
    name = pool.config.pool_name
    every = containers_of(docker_client, name)
    return {
        "containers": {c.labels["sandbox-actors.sandbox-id"] for c in every},
        "running": {c.labels["sandbox-actors.sandbox-id"] for c in every if c.status == "running"},
        "actors": sandboxes_served(name, namespace),
        "records": {row["sandbox_id"] for row in pool.list()},
    }


def holds(view: dict[str, set[str]]) -> bool:
    return view["containers"] == view["running"] == view["actors"] == view["records"]


def wait_for_invariant(pool, docker_client, timeout: float) -> dict[str, set[str]]:
    """Wait (up to ``timeout``) for quiescence; fail with the last view if it never holds."""
    deadline = time.monotonic() + timeout
    view = views(pool, docker_client)
    while not holds(view) and time.monotonic() < deadline:
        time.sleep(0.25)
        view = views(pool, docker_client)
    assert holds(view), f"invariant broken after {timeout:.0f}s: {view}"
    return view
