"""SandboxPool + SandboxActor on a real local Ray cluster and a real Docker engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray

import sandbox_actors
from sandbox_actors import CommandTimeout, ImageNotFound, PoolExhausted, SandboxDied
from sandbox_actors.threads import thread_dir
from tests.conftest import (
    assert_no_actors_left,
    containers_of,
    leftovers_of,
    serving_actors,
    wait_until,
)


def _engine_time(stamp: str) -> float:
    """A Docker timestamp (RFC 3339, nanoseconds) as seconds since the epoch."""
    import datetime

    whole, _, fraction = stamp.rstrip("Z").partition(".")
    moment = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp() + float(f"0.{fraction or 0}")


def running_names(docker_client, pool_name):
    return sorted(c.name for c in containers_of(docker_client, pool_name) if c.status == "running")




def test_cold_hot_warm_paths_and_container_counts(pool, docker_client, config):
    box = pool.acquire("thread-a")
    assert box.path == "cold" and len(box.sandbox_id) >= 16
    assert len(running_names(docker_client, config.pool_name)) == 1
    assert box.exec("echo ready").output.strip() == "ready"
    box.write_file("/mnt/user-data/workspace/note.txt", "kept across turns")
    box.write_file("/tmp/scratch.txt", "kept in the container too")

    again = pool.acquire("thread-a")
    assert (again.path, again.sandbox_id) == ("hot", box.sandbox_id)
    assert len(running_names(docker_client, config.pool_name)) == 1

    assert pool.release(box) is True
    assert [row["state"] for row in pool.list()] == ["warm"]
    assert len(running_names(docker_client, config.pool_name)) == 1  # warm: container keeps running

    reclaimed = pool.acquire("thread-a")
    assert (reclaimed.path, reclaimed.sandbox_id) == ("warm", box.sandbox_id)
    assert reclaimed.read_file("/mnt/user-data/workspace/note.txt") == "kept across turns"
    assert reclaimed.read_file("/tmp/scratch.txt") == "kept in the container too"
    assert len(running_names(docker_client, config.pool_name)) == 1
    stats = pool.stats()
    assert stats["counters"]["created"] == 1 and stats["states"]["active"] == 1


def test_operations_through_the_actor(pool):
    box = pool.acquire("ops")
    assert box.exec("false").exit_code == 1
    split = box.bash("echo $GREETING; echo oops >&2; exit 4", env={"GREETING": "hi"})
    assert (split.stdout, split.stderr, split.exit_code) == ("hi\n", "oops\n", 4)
    blob = os.urandom(3000) + bytes(range(256))
    box.write_file("/home/sandbox/b.bin", blob)
    assert box.read_bytes("/home/sandbox/b.bin") == blob
    assert {f.name for f in box.list_files("/home/sandbox")} >= {"b.bin"}
    with pytest.raises(sandbox_actors.SandboxFileNotFound):
        box.read_file("/home/sandbox/nope.txt")
    with pytest.raises(CommandTimeout):
        box.exec("sleep 20", timeout=1)
    assert box.exec("echo still-usable").output.strip() == "still-usable"


def test_async_conveniences(pool):
    import asyncio

    async def body():
        box = await pool.aio.acquire("async-thread")
        result = await box.aio.exec("echo async")
        await box.aio.write_file("/home/sandbox/a.txt", "x")
        direct = await box.actor.read_file.remote(box.sandbox_id, "/home/sandbox/a.txt")
        return box, result, direct

    box, result, direct = asyncio.run(body())
    assert result.output.strip() == "async" and direct == "x"
    assert box.path == "cold"


def test_concurrent_acquires_of_one_thread_make_one_container(pool, docker_client, config):
    with ThreadPoolExecutor(20) as workers:
        boxes = list(workers.map(lambda _: pool.acquire("shared-thread"), range(20)))
    assert len({b.sandbox_id for b in boxes}) == 1
    assert len(containers_of(docker_client, config.pool_name)) == 1
    assert pool.stats()["counters"]["created"] == 1


def test_different_threads_start_in_parallel(ray_address, config, docker_client, slow_image):
    # Containers that take 5 s to answer, so that any serializing of starts would show whatever
    # the machine's load; no spare actors: every start pays for its actor too.
    client = sandbox_actors.connect(config.model_copy(update={"spare_actors": 0, "replicas": 10,
                                                              "image": slow_image}))
    try:
        with ThreadPoolExecutor(8) as workers:
            boxes = list(workers.map(lambda i: client.acquire(f"parallel-{i}"), range(8)))
        assert len({b.sandbox_id for b in boxes}) == 8
        assert len(containers_of(docker_client, config.pool_name)) == 8
        # The engine's own records: when it created each container and when it started it. The
        # image's server answers 5 s after its container starts, so had the pool started them one
        # after another, a container would be created only after the one before it answered.
        # All eight were created before the first of them could answer.
        created, started = [], []
        for container in containers_of(docker_client, config.pool_name):
            created.append(_engine_time(container.attrs["Created"]))
            started.append(_engine_time(container.attrs["State"]["StartedAt"]))
        assert max(created) < min(started) + 5, (sorted(created), sorted(started))
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_new_threads_right_after_a_destroy_are_not_left_waiting_for_its_actor(ray_address, config):
    # While destroyed sandboxes' actors are being handed to waiting starts, the pool starts no
    # worker for them. When no more are destroyed, the waiting starts must get workers of their
    # own (no idle or reconcile pass here to start any: both come once an hour).
    client = sandbox_actors.connect(config.model_copy(update={
        "spare_actors": 0, "spare_actors_max": 0, "replicas": 10, "idle_check_interval": 3600,
        "reconcile_interval": 3600}))
    workers = ThreadPoolExecutor(4)
    try:
        first = client.acquire("fed-0")
        waiting = workers.submit(client.acquire, "fed-1")  # waits for an actor: one is started
        assert wait_until(lambda: client.stats()["starts_waiting"] == 1, timeout=30)
        client.destroy(first)  # its actor goes to the waiting start
        handed = waiting.result(timeout=60)
        assert handed.info["actor_name"] == first.info["actor_name"], "the destroyed sandbox's actor was not handed over"
        later = [workers.submit(client.acquire, f"fed-{i}") for i in (2, 3, 4)]  # nothing destroyed now
        boxes = [f.result(timeout=30) for f in later]  # not left waiting for destroyed sandboxes' actors
        assert client.stats()["counters"]["created"] == 5
        assert [box.exec("echo ok").output.strip() for box in boxes] == ["ok"] * 3
    finally:
        client.shutdown()  # ends any acquire still waiting
        workers.shutdown()
    assert_no_actors_left(config.pool_name)


@pytest.fixture
def small_pool(ray_address, config):
    client = sandbox_actors.connect(config.model_copy(update={"replicas": 2}))
    yield client
    client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_replicas_evicts_oldest_warm_never_active(small_pool, docker_client, config):
    a, b = small_pool.acquire("a"), small_pool.acquire("b")
    small_pool.release(a)
    time.sleep(0.05)
    small_pool.release(b)
    c = small_pool.acquire("c")  # at the cap: the least recently released warm one (a) goes
    assert c.path == "cold"
    states = {row["thread_id"]: row["state"] for row in small_pool.list()}
    assert states == {"b": "warm", "c": "active"}
    assert f"{config.container_prefix}-{a.sandbox_id}" not in running_names(docker_client, config.pool_name)
    small_pool.acquire("b")
    d = small_pool.acquire("d")  # all active: created beyond the soft cap, nobody evicted
    assert d.path == "cold"
    assert sorted(r["state"] for r in small_pool.list()) == ["active", "active", "active"]
    assert small_pool.stats()["counters"]["evicted"] == 1


def test_hard_cap_waits_then_fails_typed_or_succeeds_after_release(ray_address, config):
    client = sandbox_actors.connect(
        config.model_copy(update={"replicas": 1, "max_sandboxes": 1, "capacity_timeout": 1.5})
    )
    try:
        first = client.acquire("one")
        started = time.monotonic()
        with pytest.raises(PoolExhausted) as caught:
            client.acquire("two")
        assert caught.value.retryable and time.monotonic() - started >= 1.4
        result = {}
        waiter = threading.Thread(target=lambda: result.update(box=client.acquire("two")))
        waiter.start()
        assert wait_until(lambda: client.stats()["capacity_waits"] == 1, timeout=10)  # it waits for room
        client.release(first)  # warm one is evicted to make room for the waiter
        waiter.join(30)
        assert result["box"].path == "cold"
        assert [r["thread_id"] for r in client.list()] == ["two"]
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_idle_timeout_reaps_idle_but_not_a_long_command(ray_address, config, docker_client):
    client = sandbox_actors.connect(config.model_copy(update={"idle_timeout": 2.0, "idle_check_interval": 0.5}))
    try:
        idle = client.acquire("idle-active")
        parked = client.acquire("idle-warm")
        client.release(parked)
        busy = client.acquire("busy")
        ran = {}
        runner = threading.Thread(target=lambda: ran.update(result=busy.exec("sleep 5; echo done")))
        runner.start()
        gone = wait_until(lambda: {r["thread_id"] for r in client.list()} == {"busy"}, timeout=10)
        assert gone, client.list()
        runner.join(15)
        assert ran["result"].output.strip() == "done"  # never reaped mid-command
        running = running_names(docker_client, config.pool_name)
        assert running == [f"{config.container_prefix}-{busy.sandbox_id}"]
        with pytest.raises(SandboxDied):
            idle.exec("echo too late")
        assert client.stats()["counters"]["reaped"] == 2
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_a_running_background_command_keeps_its_sandbox_from_the_idle_timeout(ray_address, config):
    """A thread that starts a long job and comes back for its result later finds it: the idle
    timer counts a background command that still runs as activity, and reaps the sandbox once
    the command has ended and the sandbox sat idle."""
    client = sandbox_actors.connect(config.model_copy(update={"idle_timeout": 2.0, "idle_check_interval": 0.5}))
    try:
        box = client.acquire("trainer")
        job = box.start("sleep 6; echo trained > /tmp/result.txt")
        began = time.monotonic()
        while time.monotonic() - began < 5.0:  # well past the idle timeout, no call to the sandbox
            assert [r["thread_id"] for r in client.list()] == ["trainer"]
            time.sleep(0.25)
        assert job.wait(10).status == "completed"
        assert box.read_file("/tmp/result.txt").strip() == "trained"
        assert wait_until(lambda: client.list() == [], timeout=15), client.list()
        assert client.stats()["counters"]["reaped"] == 1
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_destroy_active_and_warm_and_shutdown_twice(ray_address, config, docker_client):
    client = sandbox_actors.connect(config)
    active, warm = client.acquire("d-active"), client.acquire("d-warm")
    client.release(warm)
    assert client.destroy(active) is True
    assert client.destroy_thread("d-warm") is True
    assert client.destroy(active) is False  # idempotent
    assert containers_of(docker_client, config.pool_name) == []
    client.acquire("left-for-shutdown")
    assert client.shutdown()["destroyed"] == 1
    assert client.shutdown() == {}
    with pytest.raises(sandbox_actors.PoolShutDown):
        client.acquire("after")
    assert containers_of(docker_client, config.pool_name) == []
    assert_no_actors_left(config.pool_name)


def test_thread_mounts_on_host_and_read_only_skills(ray_address, config, tmp_path):
    skills = tmp_path / "skills"
    (skills / "demo").mkdir(parents=True)
    (skills / "demo" / "SKILL.md").write_text("# a skill")
    client = sandbox_actors.connect(config.model_copy(update={"skills_path": str(skills)}))
    try:
        box = client.acquire("mounted thread/../x")
        box.write_file("/mnt/user-data/outputs/report.txt", "from inside")
        host_dir = thread_dir(config.base_dir, "mounted thread/../x")
        assert (host_dir / "outputs" / "report.txt").read_text() == "from inside"
        assert host_dir.is_relative_to(Path(config.base_dir))
        assert box.read_file("/mnt/skills/demo/SKILL.md") == "# a skill"
        denied = box.bash("echo x > /mnt/skills/demo/new.txt")
        assert denied.exit_code != 0 and "Read-only" in denied.stderr
        anonymous = client.acquire()
        assert anonymous.path == "cold" and anonymous.thread_id is None
        assert "user-data" not in anonymous.exec("ls /mnt").output
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_directories_given_at_acquire_are_the_new_sandbox_s_mounts(pool, config, tmp_path, docker_client):
    chat = tmp_path / "app-data" / "chat-1"
    for name in ("workspace", "outputs"):
        (chat / name).mkdir(parents=True)
        (chat / name).chmod(0o777)  # the app's directories, writable by the sandbox's command user
    (chat / "workspace" / "upload.txt").write_text("from the app")
    mounts = [{"host_path": str(chat / "workspace"), "container_path": "/mnt/user-data/workspace"},
              sandbox_actors.Mount(str(chat / "outputs"), "/mnt/user-data/outputs")]
    box = pool.acquire("chat-1", mounts=mounts)
    assert box.read_file("/mnt/user-data/workspace/upload.txt") == "from the app"
    box.exec("echo made inside > /mnt/user-data/outputs/report.txt")
    assert (chat / "outputs" / "report.txt").read_text() == "made inside\n"
    assert box.info["node_id"] == ray.get_runtime_context().get_node_id()  # where the directories are
    assert not thread_dir(config.base_dir, "chat-1").exists()  # the pool's own directories were not made
    container = containers_of(docker_client, config.pool_name)[0]
    sources = {m["Destination"]: m["Source"] for m in container.attrs["Mounts"]}
    assert sources["/mnt/user-data/workspace"] == str(chat / "workspace")
    assert "/mnt/user-data/uploads" not in sources  # not the pool's thread directories beside them
    again = pool.acquire("chat-1", mounts=[{"host_path": "/elsewhere", "container_path": "/mnt/x"}])
    assert (again.path, again.sandbox_id) == ("hot", box.sandbox_id)  # an existing sandbox comes as it is
    for bad in ({"host_path": "relative/dir", "container_path": "/mnt/x"},
                {"host_path": "/srv/x", "container_path": "/mnt/../etc"}):
        with pytest.raises(sandbox_actors.InvalidRequest):
            pool.acquire("chat-2", mounts=[bad])
    with pytest.raises(sandbox_actors.InvalidRequest, match="not a live node"):
        pool.acquire("chat-2", node_id="f" * 56)
    assert [row["thread_id"] for row in pool.list()] == ["chat-1"]


def test_two_pools_on_default_base_dirs_run_side_by_side(ray_address, config, tmp_path, monkeypatch,
                                                           docker_client):
    monkeypatch.setenv("SANDBOX_ACTORS_HOME", str(tmp_path / "home"))
    defaults = {k: v for k, v in config.model_dump().items() if k != "base_dir"}
    first = sandbox_actors.SandboxConfig(**defaults)
    second = sandbox_actors.SandboxConfig(**{**defaults, "pool_name": f"{config.pool_name}-b"})
    assert first.base_dir != second.base_dir
    assert Path(first.base_dir).is_relative_to(tmp_path / "home")
    pools = [sandbox_actors.connect(first)]
    try:
        pools.append(sandbox_actors.connect(second))  # refused while both defaulted to ~/.sandbox-actors
        for pool, text in zip(pools, ("first", "second")):
            pool.acquire("same-thread").write_file("/mnt/user-data/workspace/who.txt", text)
        assert [p.acquire("same-thread").read_file("/mnt/user-data/workspace/who.txt") for p in pools] == [
            "first", "second"]
    finally:
        for pool in pools:
            pool.shutdown()
    assert_no_actors_left(config.pool_name)
    assert_no_actors_left(second.pool_name)
    assert not any(leftovers_of(docker_client, second.pool_name).values())


def test_unknown_image_fails_typed_and_leaves_nothing(ray_address, config, docker_client):
    client = sandbox_actors.connect(config.model_copy(update={"image": "sandbox-actors-missing:nope"}))
    try:
        with pytest.raises(ImageNotFound):
            client.acquire("no-image")
        assert client.list() == []
        assert wait_until(lambda: not serving_actors(), timeout=10)
        assert containers_of(docker_client, config.pool_name) == []
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


CROSS_PROCESS = """
import json, sys, ray, sandbox_actors
ray.init(address=sys.argv[1], logging_level="WARNING")
pool = sandbox_actors.connect(pool_name=sys.argv[3], namespace=sys.argv[4])
box = pool.acquire(sys.argv[2])
seen = box.read_file("/mnt/user-data/workspace/from-first.txt")
box.write_file("/tmp/from-second.txt", "second process was here")
print(json.dumps({"sandbox_id": box.sandbox_id, "path": box.path, "container": box.info["container_name"], "seen": seen}))
"""


def test_second_process_gets_the_same_sandbox(ray_address, config, docker_client):
    client = sandbox_actors.connect(config)
    try:
        box = client.acquire("cross-process")
        box.write_file("/mnt/user-data/workspace/from-first.txt", "first process was here")
        out = subprocess.run(
            [sys.executable, "-c", CROSS_PROCESS, ray_address, "cross-process", config.pool_name, config.namespace],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        import json

        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["sandbox_id"] == box.sandbox_id and seen["path"] == "hot"
        assert seen["container"] == box.info["container_name"]
        assert seen["seen"] == "first process was here"
        assert box.read_file("/tmp/from-second.txt") == "second process was here"
        assert len(containers_of(docker_client, config.pool_name)) == 1
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_pool_restart_keeps_sandboxes_and_readopts_after_sigkill(pool, config, docker_client):
    box = pool.acquire("survivor")
    box.exec("echo in-container-state > /tmp/state.txt")
    container_id = box.info["container_id"]

    ray.kill(pool.pool, no_restart=False)  # Ray restarts the pool; its memory is gone
    again = pool.acquire("survivor")
    assert again.sandbox_id == box.sandbox_id
    assert again.info["container_id"] == container_id
    assert pool.stats()["counters"].get("created", 0) == 0  # the restarted pool created nothing
    assert len(containers_of(docker_client, config.pool_name)) == 1

    pid = ray.get(again.actor.describe.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(SandboxDied):
        again.exec("echo via-dead-actor")

    def readopted():
        box = pool.acquire("survivor")
        try:
            return box if box.exec("cat /tmp/state.txt").output.strip() == "in-container-state" else None
        except SandboxDied:
            return None

    back = wait_until(readopted, timeout=config.reconcile_interval + 10, interval=0.5)
    assert back, "the container was not re-adopted"
    assert back.info["container_id"] == container_id
    assert len(containers_of(docker_client, config.pool_name)) == 1
    assert pool.stats()["counters"].get("created", 0) == 0


def test_handles_travel_to_other_ray_tasks_and_aio_covers_the_pool(pool):
    import asyncio
    import pickle

    box = pool.acquire("traveller")

    @ray.remote(num_cpus=0)
    def use_elsewhere(handle):
        handle.write_file("/home/sandbox/from-a-task.txt", "sent along")
        return handle.exec("cat /home/sandbox/from-a-task.txt").output

    assert ray.get(use_elsewhere.remote(box)) == "sent along"
    assert pickle.loads(pickle.dumps(pool)).list()[0]["thread_id"] == "traveller"

    async def body():
        rows = await pool.aio.list()
        stats = await pool.aio.stats()
        sandbox_id = await pool.aio.sandbox_id("traveller")
        released = await box.aio.release()
        return rows, stats, sandbox_id, released

    rows, stats, sandbox_id, released = asyncio.run(body())
    assert [r["thread_id"] for r in rows] == ["traveller"] and stats["states"]["active"] == 1
    assert sandbox_id == box.sandbox_id and released is True


def test_a_ray_worker_with_our_package_leaves_out_httpx_s_command_line_tool(pool):
    """Every sandbox's actor is a Ray worker process: httpx's CLI (click and pygments, ~1.6 MB)
    stays out of such a process, and httpx works there; a driver's import of it is left alone."""
    box = pool.acquire("lean")

    @ray.remote(num_cpus=0)
    def in_a_worker(handle):
        loaded = sorted(m for m in ("click", "pygments", "httpx._main") if sys.modules.get(m) is not None)
        return loaded, handle.exec("echo fine").output.strip()

    assert ray.get(in_a_worker.remote(box)) == ([], "fine")
    assert sys.modules.get("httpx._main", "not blocked") is not None  # this driver's is httpx's own affair


def test_a_sandbox_s_actor_process_does_without_pydantic(pool):
    """A SandboxActor gets a plain copy of the config: its process never loads pydantic
    (~40 ms of CPU and ~3 MB in each of a burst's new actors), and the sandbox works."""
    box = pool.acquire("plain")
    assert box.exec("echo works").output.strip() == "works"
    pid = ray.get(box.actor.describe.remote())["pid"]
    with open(f"/proc/{pid}/maps") as maps:
        libraries = {line.split()[-1] for line in maps if line.rstrip().endswith(".so")}
    assert any("_raylet" in path for path in libraries)  # the actor's process, read right
    assert not [path for path in libraries if "pydantic" in path]


def test_a_pool_shut_down_elsewhere_stays_down(ray_address, config):
    from sandbox_actors import PoolShutDown
    from tests.conftest import named_actors

    first = sandbox_actors.connect(config)
    first.acquire("t")
    sandbox_actors.connect(config).shutdown()  # another process, or `sandbox-actors down`
    with pytest.raises(PoolShutDown, match="connect"):
        first.acquire("t")  # not quietly brought back with a fresh sandbox
    assert config.pool_name not in named_actors()
    again = sandbox_actors.connect(config)  # asking again does start it
    try:
        assert again.acquire("t").exec("echo up").output.strip() == "up"
    finally:
        again.shutdown()
    assert_no_actors_left(config.pool_name)
