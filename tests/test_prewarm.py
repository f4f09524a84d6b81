"""Pre-warmed spare sandboxes and spare actors, on real Ray + Docker."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

import sandbox_actors
from sandbox_actors.threads import sandbox_id_for
from tests.conftest import assert_no_actors_left, containers_of, wait_until
from tests.invariant import wait_for_invariant


@pytest.fixture
def prewarmed(request, ray_address, config):
    # A short idle timeout, so the idle check has the chance to reap spares (which it must not);
    # tests that restart the pool, which takes about that long, ask for a long one.
    idle_timeout = getattr(request, "param", 3)
    client = sandbox_actors.connect(
        config.model_copy(update={"prewarm": 2, "thread_mounts": False, "replicas": 4, "idle_timeout": idle_timeout})
    )
    yield client
    client.shutdown()
    assert_no_actors_left(config.pool_name)


def spares(client) -> int:
    return client.stats()["states"]["spare"]


def test_a_new_thread_takes_a_spare_and_a_replacement_starts(prewarmed, docker_client, config):
    assert wait_until(lambda: spares(prewarmed) == 2, timeout=30)
    box = prewarmed.acquire("fresh-thread")
    assert box.path == "prewarmed"
    assert box.sandbox_id != sandbox_id_for(config.pool_name, "fresh-thread")  # the spare's own id
    assert prewarmed.sandbox_id("fresh-thread") == box.sandbox_id
    box.write_file("/home/sandbox/state.txt", "mine")
    assert wait_until(lambda: spares(prewarmed) == 2, timeout=30)  # replaced in the background
    assert prewarmed.acquire("fresh-thread").path == "hot"
    prewarmed.release(box)
    again = prewarmed.acquire("fresh-thread")
    assert (again.path, again.sandbox_id) == ("warm", box.sandbox_id)
    assert again.read_file("/home/sandbox/state.txt") == "mine"
    anonymous = prewarmed.acquire()
    assert anonymous.path == "prewarmed"


def test_spares_are_not_idle_reaped_and_count_toward_replicas(prewarmed, docker_client, config):
    assert wait_until(lambda: spares(prewarmed) == 2, timeout=30)
    time.sleep(config.idle_check_interval * 2 + 3.5)  # past idle_timeout=3
    assert spares(prewarmed) == 2
    boxes = [prewarmed.acquire(f"t{i}") for i in range(4)]  # replicas=4: spares then new ones
    assert [b.path for b in boxes][:2] == ["prewarmed", "prewarmed"]
    for _ in range(2):  # two seconds with the four in use (idle_timeout is 3 s): no spare may start
        time.sleep(1)
        assert all(b.exec("true").exit_code == 0 for b in boxes)
    assert spares(prewarmed) == 0  # at the soft cap: no new spares
    assert len(containers_of(docker_client, config.pool_name)) == 4


@pytest.mark.parametrize("prewarmed", [600], indirect=True)
def test_a_claimed_spare_survives_pool_restart_and_actor_death(prewarmed, docker_client, config):
    assert wait_until(lambda: spares(prewarmed) == 2, timeout=30)
    box = prewarmed.acquire("claimer")
    box.exec("echo kept > /tmp/kept.txt")
    ray.kill(prewarmed.pool, no_restart=False)
    after_restart = prewarmed.acquire("claimer")
    assert after_restart.sandbox_id == box.sandbox_id  # the mapping lives in the actor and the container
    os.kill(ray.get(after_restart.actor.describe.remote())["pid"], signal.SIGKILL)

    def readopted():
        try:
            again = prewarmed.acquire("claimer")
            return again.sandbox_id == box.sandbox_id and again.exec("cat /tmp/kept.txt").output.strip() == "kept"
        except sandbox_actors.SandboxDied:
            return False

    assert wait_until(readopted, timeout=config.reconcile_interval + 15)
    wait_for_invariant(prewarmed, docker_client, config.reconcile_interval + 5)


def test_prewarm_needs_thread_mounts_off():
    with pytest.raises(sandbox_actors.ConfigError, match="thread_mounts"):
        sandbox_actors.load_config({"prewarm": 1})


def test_spare_actors_grow_to_a_burst_then_decay(ray_address, config):
    """A burst of new threads teaches the pool to keep that many spare actors; the next burst
    takes them (no new Ray worker on its path); a quiet spell of spare_decay ends them."""
    from concurrent.futures import ThreadPoolExecutor

    from sandbox_actors.options import sandbox_actor_prefix
    from tests.conftest import named_actors

    client = sandbox_actors.connect(config.model_copy(update={
        "spare_actors": 1, "spare_actors_max": 5, "spare_decay": 30, "replicas": 8, "idle_check_interval": 0.5,
    }))
    try:
        assert wait_until(lambda: client.stats()["spare_actors"] == 1, timeout=60)

        def burst(prefix: str) -> list:
            with ThreadPoolExecutor(5) as threads:
                return list(threads.map(lambda i: client.acquire(f"{prefix}-{i}"), range(5)))

        for box in burst("first"):
            assert box.exec("true").ok
            client.destroy(box)
        assert client.stats()["spare_target"] == 5
        assert wait_until(lambda: client.stats()["spare_actors"] == 5, timeout=90), client.stats()

        waiting = set(named_actors(sandbox_actor_prefix(config)))
        second = burst("second")
        names = {ray.get(box.actor.describe.remote())["actor_name"] for box in second}
        assert names <= waiting, f"new actors on the burst's path: {names - waiting}"
        for box in second:
            client.destroy(box)

        # No burst of 5 for spare_decay seconds: back to spare_actors.
        assert wait_until(lambda: client.stats()["spare_target"] == 1 and client.stats()["spare_actors"] == 1,
                          timeout=60), client.stats()
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)
