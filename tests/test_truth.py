"""What the pool says is what is true: on real Ray, real Docker and real containers.

Each test here is one way the pool used to say something false (a dead sandbox handed out, a
death noticed only when someone tripped over it, "destroyed" when nothing was, an anonymous
sandbox made twice for one request, a dead cluster's containers nobody could find).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

import sandbox_actors
from backends.docker_backend import CHECKPOINT_CLUSTER_FILE
from sandbox_actors import BackendUnavailable, ConfigError
from tests.conftest import (
    assert_no_actors_left,
    containers_of,
    leftovers_of,
    named_actors,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]


def test_a_warm_sandbox_whose_container_died_is_never_handed_out(ray_address, config, docker_client):
    # A long reconcile interval: only the pool's own liveness can save the acquire.
    client = sandbox_actors.connect(config.model_copy(update={"reconcile_interval": 600}))
    try:
        box = client.acquire("revived")
        client.release(box)
        docker_client.containers.get(box.info["container_id"]).kill()
        again = client.acquire("revived")  # at once: no time for anything to notice
        assert again.exec("echo answers").output.strip() == "answers"
        assert again.info["container_id"] != box.info["container_id"]
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_the_pool_hears_of_a_death_without_anyone_tripping_over_it(ray_address, config, docker_client):
    client = sandbox_actors.connect(config.model_copy(update={"reconcile_interval": 600}))
    try:
        box = client.acquire("watched")
        docker_client.containers.get(box.info["container_id"]).kill()
        # Nobody uses the sandbox; the engine's event reaches the pool, which removes it.
        gone = wait_until(lambda: not any(r["thread_id"] == "watched" for r in client.list()), timeout=10)
        assert gone, client.list()
        assert client.stats()["counters"].get("died", 0) == 1
        assert wait_until(lambda: containers_of(docker_client, config.pool_name) == [], timeout=10)
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


@pytest.mark.slow
def test_deaths_while_the_engine_restarted_reach_the_pool_when_it_is_back(ray_address, config, docker_client,
                                                                         tmp_path, local_engine):
    # No reconcile to save the day: the engine keeps no event history across its restart, so the
    # reaper must look for what died while nobody could follow.
    client = sandbox_actors.connect(config.model_copy(update={"reconcile_interval": 600}))
    try:
        box = client.acquire("restarted")
        local_engine.restart(tmp_path / "dockerd.log")  # the engine goes, and its containers with it
        # Nobody uses the sandbox; the pool learns of its death and removes it.
        assert wait_until(lambda: not any(r["thread_id"] == "restarted" for r in client.list()), timeout=30), \
            client.list()
        again = client.acquire("restarted")
        assert again.path == "cold" and again.info["container_id"] != box.info["container_id"]
        assert again.exec("echo answers").output.strip() == "answers"
    finally:
        if not local_engine.running():
            local_engine.start(tmp_path / "dockerd.log")
        client.shutdown()
    assert_no_actors_left(config.pool_name)


@pytest.mark.slow
def test_destroy_says_so_when_the_engine_did_not_answer_and_the_intent_survives_a_pool_restart(
    ray_address, config, docker_client, tmp_path, local_engine
):
    client = sandbox_actors.connect(config.model_copy(update={"reconcile_interval": 2}))
    paused = False
    try:
        box = client.acquire("doomed")
        box.write_file("/tmp/secret-plan.txt", "must not come back")
        container_id = box.info["container_id"]
        local_engine.pause()  # the engine stops answering (its containers keep running)
        paused = True
        try:
            with pytest.raises(BackendUnavailable):
                client.destroy(box)  # the truth: nothing was destroyed
            rows = {r["thread_id"]: r["state"] for r in client.list()}
            assert rows == {"doomed": "doomed"}  # a state of its own, not forgotten
            ray.kill(client.pool, no_restart=True)  # the pool dies with the destroy still owed
        finally:
            local_engine.resume()
            paused = False
        client = sandbox_actors.connect(config.model_copy(update={"reconcile_interval": 2}))
        # The new pool finishes the destroy instead of adopting the sandbox with its old files.
        assert wait_until(lambda: all(c.id != container_id for c in containers_of(docker_client, config.pool_name)),
                          timeout=30)
        assert all(r["thread_id"] != "doomed" for r in client.list())
        fresh = client.acquire("doomed")
        assert fresh.info["container_id"] != container_id
        assert fresh.bash("test -e /tmp/secret-plan.txt").exit_code == 1
    finally:
        if paused:
            local_engine.resume()
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_a_retried_anonymous_acquire_gets_the_same_sandbox(ray_address, config, docker_client):
    client = sandbox_actors.connect(config)
    try:
        first = client.acquire(None, request_id="req-42")
        again = client.acquire(None, request_id="req-42")  # the client retrying the same call
        assert again.sandbox_id == first.sandbox_id
        other = client.acquire(None)
        assert other.sandbox_id != first.sandbox_id
        # The pool died mid-call and came back: the retry still finds the same sandbox.
        ray.kill(client.pool, no_restart=True)
        assert wait_until(lambda: _gone(config), timeout=10)
        client = sandbox_actors.connect(config)
        retried = client.acquire(None, request_id="req-42")
        assert retried.sandbox_id == first.sandbox_id
        assert retried.info["container_id"] == first.info["container_id"]
        assert len(containers_of(docker_client, config.pool_name)) == 2
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def _gone(config) -> bool:  # noqa: ANN001
    try:
        ray.get_actor(config.pool_name, namespace=config.namespace)
        return False
    except ValueError:
        return True


PRIVATE_CLUSTER = """
import json, logging, sys, time, ray, sandbox_actors
ray.init(address="local", logging_level=logging.ERROR, include_dashboard=False)
pool = sandbox_actors.connect(json.loads(sys.argv[1]))
for i in range(3):
    pool.acquire(f"orphan-{i}").exec("true")
print(ray.get_runtime_context().gcs_address, flush=True)
time.sleep(600)
"""


def living_container(docker_client, box) -> str:  # noqa: ANN001
    """The Ray session label of a live sandbox's container."""
    return docker_client.containers.get(box.info["container_id"]).labels["sandbox-actors.cluster"]


def _raylets_of(session: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if session.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_gc_finds_and_removes_the_containers_of_a_dead_private_cluster(ray_address, config, pool, docker_client,
                                                                       tmp_path):
    living = pool.acquire("alive-and-well")  # a live cluster's sandbox: gc must leave it alone
    orphans_config = json.loads(config.model_copy(update={"pool_name": f"{config.pool_name}-o",
                                                          "container_prefix": f"{config.container_prefix}-o",
                                                          "base_dir": str(tmp_path / "o")}).model_dump_json())
    child = subprocess.Popen([sys.executable, "-c", PRIVATE_CLUSTER, json.dumps(orphans_config)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        assert child.stdout.readline().strip()
        orphans = containers_of(docker_client, orphans_config["pool_name"])
        assert len(orphans) == 3
        session = orphans[0].labels["sandbox-actors.cluster"]
        os.killpg(child.pid, signal.SIGKILL)  # the driver and the Ray it started die hard, all at once
        child.wait(10)
        assert wait_until(lambda: not _raylets_of(session), timeout=30)
        assert all(c.status == "running" for c in containers_of(docker_client, orphans_config["pool_name"]))
        orphans[0].remove(force=True)  # by other hands: its socket directory stays, and no container names it
        orphans = orphans[1:]
        # Live snapshots' checkpoints name the cluster that kept them: the dead one's go, the living one's stay.
        kept = {}
        for name, cluster in (("dead-snap", session), ("living-snap", living_container(docker_client, living))):
            kept[name] = tmp_path / "o" / "checkpoints" / name
            kept[name].mkdir(parents=True)
            (kept[name] / "checkpoint.img").write_bytes(b"x" * 1000)
            (kept[name] / CHECKPOINT_CLUSTER_FILE).write_text(cluster)
        config_file = tmp_path / "o.yaml"
        config_file.write_text(yaml.safe_dump(orphans_config))
        cli = [sys.executable, "-m", "sandbox_actors.cli", "gc", "--dead-clusters", "--json", "--config", str(config_file)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        dry = subprocess.run([*cli, "--dry-run"], capture_output=True, text=True, timeout=120, env=env, check=False)
        assert dry.returncode == 0, dry.stderr
        listed = json.loads(dry.stdout)
        assert sorted(item["container"] for item in listed["containers"]) == sorted(c.name for c in orphans)
        assert all(item["cluster"] == session for item in listed["containers"])
        assert [item["checkpoint"] for item in listed["checkpoints"]] == [str(kept["dead-snap"])]
        assert listed["checkpoints"][0]["bytes"] >= 1000
        assert len(containers_of(docker_client, orphans_config["pool_name"])) == 2  # a dry run removes nothing
        assert kept["dead-snap"].is_dir()
        done = subprocess.run(cli, capture_output=True, text=True, timeout=120, env=env, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["removed"]["containers"] == 2
        assert json.loads(done.stdout)["removed"]["checkpoints"] == 1
        assert not kept["dead-snap"].exists() and kept["living-snap"].is_dir()
        left = leftovers_of(docker_client, orphans_config["pool_name"])  # the socket directories too
        assert not any(left.values()), left
        assert living.exec("echo still").output.strip() == "still"  # the live cluster's sandbox is untouched
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def test_two_pools_cannot_share_a_base_dir(ray_address, config, pool):
    other = config.model_copy(update={"pool_name": f"{config.pool_name}-b",
                                      "container_prefix": f"{config.container_prefix}-b"})
    with pytest.raises(ConfigError, match="base_dir") as refused:
        sandbox_actors.connect(other)
    assert config.pool_name in str(refused.value)
    assert not [n for n in named_actors() if n == other.pool_name or n.startswith(f"sbx-{other.pool_name}-")]
