"""Hibernate and resume, snapshot and fork: on real Ray, real Docker and real containers.

What a user checks: after hibernation the actor is gone and the container stopped; the thread's
next acquire finds everything the agent left (``/tmp``, its home, what it installed) and not
only the thread mounts; a restarted pool still knows its hibernated sandboxes; a snapshot starts
many independent sandboxes and holds the filesystem, not the thread mounts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

import sandbox_actors
from sandbox_actors import InvalidRequest
from sandbox_actors.records import PoolRecords
from sandbox_actors import spawn
from sandbox_actors.threads import sandbox_id_for
from tests.conftest import (
    assert_no_actors_left,
    containers_of,
    named_actors,
    remove_leftovers,
    snapshot_images_of,
    wait_until,
)

WORKSPACE = "/mnt/user-data/workspace"
# What an agent leaves outside the thread mounts: scratch files, its home, a package it installed
# (a module where `pip install` puts it: /usr/local, which the image gives the command user).
LEAVE = (
    "echo scratch > /tmp/scratch.txt && echo notes > ~/notes.txt"
    " && d=$(python3 -c 'import site; print(site.getsitepackages()[0])') && mkdir -p $d"
    " && echo 'ANSWER = 42' > $d/agentpkg.py && echo $d/agentpkg.py"
)
CHECK = "cat /tmp/scratch.txt ~/notes.txt && python3 -c 'import agentpkg; print(agentpkg.ANSWER)'"
LEFT = "scratch\nnotes\n42"


def _state_of(client, thread: str) -> dict | None:
    return next((r for r in client.list() if r["thread_id"] == thread), None)


def test_a_hibernated_sandbox_resumes_with_everything_the_agent_left(ray_address, config, docker_client):
    client = sandbox_actors.connect(config.model_copy(update={"idle_action": "hibernate"}))
    try:
        box = client.acquire("sleeper")
        installed = box.exec(LEAVE)
        assert installed.exit_code == 0 and installed.output.strip().startswith("/usr/local/lib/python3")
        box.write_file(f"{WORKSPACE}/mounted.txt", "on the host")
        actor_name, actor_pid = box.info["actor_name"], ray.get(box.actor.describe.remote())["pid"]
        assert client.hibernate(client.sandbox_id("sleeper"))  # by id (a handle does as well)
        container = docker_client.containers.get(box.info["container_id"])
        assert container.status == "exited"  # stopped, filesystem kept: it holds no memory
        assert wait_until(lambda: actor_name not in named_actors("sbx-"), timeout=10)
        assert wait_until(lambda: not Path(f"/proc/{actor_pid}").exists(), timeout=10)  # its memory came back
        row = _state_of(client, "sleeper")
        assert row["state"] == "hibernated" and row["hibernated_s"] is not None
        with pytest.raises(sandbox_actors.SandboxDied):
            box.exec("true")  # the old handle is spent
        again = client.acquire("sleeper")
        assert again.path == "resumed" and again.info["container_id"] == box.info["container_id"]
        assert again.info["actor_name"] != actor_name
        assert again.exec(CHECK).output.strip() == LEFT
        assert again.read_file(f"{WORKSPACE}/mounted.txt") == "on the host"
        counters = client.stats()["counters"]
        assert counters["hibernated"] == 1 and counters["resumed"] == 1
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)
    assert containers_of(docker_client, config.pool_name) == []


def test_an_idle_sandbox_hibernates_and_a_restarted_pool_still_resumes_it(ray_address, config, docker_client):
    cfg = config.model_copy(update={"idle_action": "hibernate", "idle_timeout": 1.0, "reconcile_interval": 1})
    client = sandbox_actors.connect(cfg)
    try:
        box = client.acquire("napper")
        assert box.exec(LEAVE).exit_code == 0
        client.release(box)
        assert wait_until(lambda: (_state_of(client, "napper") or {}).get("state") == "hibernated", timeout=20)
        assert box.info["sandbox_id"] in PoolRecords.for_config(cfg).hibernated()
        ray.kill(client.pool, no_restart=False)  # the pool dies; Ray restarts it
        # A few reconcile passes of the new pool (its counters start from nothing): the stopped
        # container must stay, and the sandbox be hibernated in the new pool's view.
        assert wait_until(lambda: client.stats()["counters"].get("reconcile_passes", 0) >= 3, timeout=30)
        assert (_state_of(client, "napper") or {}).get("state") == "hibernated"
        assert docker_client.containers.get(box.info["container_id"]).status == "exited"
        again = client.acquire("napper")
        assert again.path == "resumed" and again.info["container_id"] == box.info["container_id"]
        assert again.exec(CHECK).output.strip() == LEFT
    finally:
        client.shutdown()
    assert_no_actors_left(cfg.pool_name)
    assert containers_of(docker_client, cfg.pool_name) == []
    assert PoolRecords.for_config(cfg).hibernated() == {}


@pytest.mark.parametrize("container_id", [None, "0" * 64], ids=["looked-up-by-name", "by-recorded-id"])
def test_a_resume_whose_stopped_container_was_removed_starts_no_new_one_in_its_place(
        ray_address, config, docker_client, container_id):
    """A SandboxActor asked to resume a hibernated sandbox whose container is gone (removed by
    hand before the pool noticed) says so, and makes no fresh container under the old name: the
    thread would be told its sandbox resumed with everything it left gone (the pool gives the
    thread a new sandbox, path 'cold': tests/test_hibernation_unit.py). Whether it looks the
    container up by name or starts it by the id the pool recorded."""
    actor, _name = spawn.sandbox_actor(config)
    try:
        with pytest.raises(sandbox_actors.SandboxNotFound, match="is gone"):
            ray.get(actor.start.remote(sandbox_id_for(config.pool_name, "gone"), "gone", True, None, None,
                                       container_id), timeout=60)
        assert containers_of(docker_client, config.pool_name) == []
    finally:
        ray.kill(actor)
        remove_leftovers(docker_client, config.pool_name)
    assert_no_actors_left(config.pool_name)


def test_a_resume_by_id_of_a_container_a_live_actor_serves_is_refused(ray_address, config, docker_client):
    """A resume starts the stopped container by the id the pool recorded, without looking first.
    When that container runs already, served by another actor that lives, the engine started
    nothing and the resume must not serve it too: it answers that the container is owned, naming
    the owner (for the pool to decide), and the owner serves on."""
    owner, owner_name = spawn.sandbox_actor(config)
    second, _ = spawn.sandbox_actor(config)
    sandbox_id = sandbox_id_for(config.pool_name, "owned")
    try:
        info = ray.get(owner.start.remote(sandbox_id, "owned"), timeout=60)
        found = ray.get(second.start.remote(sandbox_id, "owned", True, None, None, info["container_id"]), timeout=60)
        assert (found["outcome"], found["owner"], found["started"]) == ("owned", owner_name, False)
        assert [c.id for c in containers_of(docker_client, config.pool_name)] == [info["container_id"]]
        assert ray.get(owner.exec.remote(sandbox_id, "echo still mine"), timeout=30).output.strip() == "still mine"
    finally:
        ray.kill(second)
        ray.kill(owner)
        remove_leftovers(docker_client, config.pool_name)
    assert_no_actors_left(config.pool_name)


def test_hibernated_sandboxes_go_after_their_ttl(ray_address, config, docker_client):
    client = sandbox_actors.connect(config.model_copy(update={"idle_action": "hibernate", "hibernate_ttl": 1.0}))
    try:
        box = client.acquire("brief")
        client.hibernate(box)
        assert wait_until(lambda: _state_of(client, "brief") is None, timeout=20)
        assert wait_until(lambda: containers_of(docker_client, config.pool_name) == [], timeout=10)
        assert client.acquire("brief").path == "cold"  # a new sandbox: the old one is gone for good
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_a_snapshot_forks_into_independent_sandboxes_without_the_thread_mounts(ray_address, config, docker_client):
    client = sandbox_actors.connect(config.model_copy(update={"replicas": 10}))
    try:
        base = client.acquire("prepared")
        assert base.exec(LEAVE).exit_code == 0
        base.write_file(f"{WORKSPACE}/private.txt", "this thread's own")
        snap = base.snapshot("env-v1")
        assert snap.name == "env-v1" and snap.size and snap.thread_id == "prepared"
        assert [s.name for s in client.snapshots()] == ["env-v1"]
        image = docker_client.images.get(snap.image)
        assert image.labels["sandbox-actors.pool"] == config.pool_name
        assert image.labels["sandbox-actors.snapshot"] == "env-v1"
        assert "SANDBOX_TOKEN_SHA256=" not in " ".join(
            e for e in image.attrs["Config"]["Env"] if not e.endswith("="))  # no sandbox's own secrets
        with pytest.raises(InvalidRequest):
            client.snapshot(base, "env-v1")  # names are unique in a pool

        threads = [f"rollout-{i}" for i in range(8)]
        forks = list(client.fork(snap, threads))
        assert sorted(f.thread_id for f in forks) == threads
        assert len({f.info["container_id"] for f in forks}) == 8
        for fork in forks:
            assert fork.exec(CHECK).output.strip() == LEFT  # the filesystem came along
            assert fork.exec(f"test -e {WORKSPACE}/private.txt || echo absent").output.strip() == "absent"
        forks[0].exec("echo changed > /tmp/scratch.txt")
        assert forks[1].read_file("/tmp/scratch.txt").strip() == "scratch"  # independent copies
        with pytest.raises(InvalidRequest):
            client.acquire("prepared", snapshot=snap)  # that thread has a sandbox already
        with pytest.raises(InvalidRequest):
            client.remove_snapshot(snap)  # sandboxes started from it still exist
        for fork in forks:
            client.destroy(fork)
        assert client.remove_snapshot(snap)
        assert snapshot_images_of(docker_client, config.pool_name) == []
        assert client.snapshots() == []
        kept = base.snapshot()  # a default name: the thread and the time
        assert kept.name.startswith("prepared-")
    finally:
        client.shutdown()  # and with it the pool's remaining snapshots
    assert snapshot_images_of(docker_client, config.pool_name) == []
    assert_no_actors_left(config.pool_name)


def test_a_snapshot_image_moves_to_an_engine_that_lacks_it(ray_address, config, docker_client):
    """What a node without the image does (export on the snapshot's engine, import on its own),
    as one round trip on this machine's single engine."""
    import asyncio

    from backends.docker_backend import DockerBackend

    client = sandbox_actors.connect(config)
    try:
        snap = client.acquire("source").snapshot("movable")
        backend = DockerBackend(config.container_prefix)
        archive = asyncio.run(backend.export_image(snap.image))
        image_id = docker_client.images.get(snap.image).id
        docker_client.images.remove(snap.image)
        assert not asyncio.run(backend.has_image(snap.image))
        asyncio.run(backend.import_image(archive))
        assert docker_client.images.get(snap.image).id == image_id  # the same image, by content
    finally:
        client.shutdown()
    assert snapshot_images_of(docker_client, config.pool_name) == []
    assert_no_actors_left(config.pool_name)


def test_what_an_agent_plants_does_not_run_as_root_when_its_sandbox_restarts(ray_address, config, docker_client):
    """The API server starts as root again on resume (and in every fork), from a filesystem the
    agent wrote to: a python3 put first on PATH, or a .pth in site-packages, must not run."""
    plant = (
        "printf '#!/bin/sh\\nid -u > /tmp/planted-binary-ran\\nexec /usr/bin/python3 \"$@\"\\n'"
        " > /usr/local/bin/python3 && chmod +x /usr/local/bin/python3"
        " && d=$(/usr/bin/python3 -c 'import site; print(site.getsitepackages()[0])') && mkdir -p $d"
        " && echo 'import os; open(\"/tmp/planted-pth-ran\", \"w\").write(str(os.getuid()))' > $d/zz.pth"
        " && python3 -c 'print(1)' > /dev/null && cat /tmp/planted-binary-ran /tmp/planted-pth-ran"
        " && rm /tmp/planted-binary-ran /tmp/planted-pth-ran"
    )
    client = sandbox_actors.connect(config.model_copy(update={"idle_action": "hibernate"}))
    try:
        box = client.acquire("planter")
        planted = box.exec(plant)
        assert planted.exit_code == 0 and planted.output.split() == ["10000", "10000"]  # both work, as the agent
        client.hibernate(box)
        again = client.acquire("planter")
        assert again.path == "resumed"
        found = again.exec("ls /tmp/planted-binary-ran /tmp/planted-pth-ran 2>/dev/null; echo end").output.split()
        assert found == ["end"]  # the root server ran neither
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)
