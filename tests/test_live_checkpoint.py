"""Live checkpoints on gVisor: a runsc sandbox's processes and memory saved and brought back,
through the engine (DockerBackend and our image, no Ray), and through the pool: a live
hibernation on real Ray, across a pool restart, by hand and when idle.

Needs gVisor's runsc registered and the engine in experimental mode ("experimental": true in
/etc/docker/daemon.json, which scripts/bootstrap sets); skipped otherwise, a failure in CI.
"""

from __future__ import annotations

import asyncio
import glob
import os
import time

import pytest
import ray

import sandbox_actors
from backends import DockerBackend, Limits
from sandbox_actors import checkpoints
from sandbox_actors.bench.run import LIVE_HOLDER
from backends.docker_backend import CHECKPOINT_CLUSTER_FILE
from backends.errors import NotSupported
from backends.firewall import NetworkPolicy
from backends.sandbox_api import UNIX_SCHEME
from tests.conftest import run
from tests.engine import shims_left
from tests.test_backend_docker import ready_api, spec_for

# The background process: 64 MB held in memory, a counter written every 50 ms (whole: a reader
# never sees the file half written).
HOLDER = ("python3 -c \"import os, time; held = bytearray(64 * 2**20); i = 0\n"
          "while True:\n i += 1; open('/tmp/n.new', 'w').write(str(i)); os.replace('/tmp/n.new', '/tmp/n');"
          " time.sleep(0.05)\"")


def _require_live(docker_client) -> None:
    info = docker_client.info()
    missing = [what for what, ok in (("gVisor's runsc", "runsc" in (info.get("Runtimes") or {})),
                                     ("the engine's experimental mode", info.get("ExperimentalBuild"))) if not ok]
    if missing:
        if os.environ.get("SANDBOX_ACTORS_CI"):
            pytest.fail(f"live checkpoints need {' and '.join(missing)}")
        pytest.skip(f"live checkpoints need {' and '.join(missing)}")


async def _count(api) -> int:
    return int((await api.exec("cat /tmp/n 2>/dev/null || echo 0")).output.strip() or 0)


def test_a_live_checkpoint_brings_processes_memory_and_the_shell_back(pool_name, image, docker_client):
    _require_live(docker_client)

    async def body():
        backend = DockerBackend(f"sat-{pool_name}", policy=NetworkPolicy(egress="none"))
        # gVisor's own threads and file cache count toward the limits (as in test_isolation).
        spec = spec_for(pool_name, image, runtime="runsc", limits=Limits(memory="1g", cpus=0.5, pids=512))
        record = await backend.create(spec)
        saved: dict = {}
        try:
            api = await ready_api(backend, record)
            await api.exec("export KEPT=yes; cd /tmp")
            job = await api.start_command(HOLDER)
            while await _count(api) < 3:
                await asyncio.sleep(0.05)
            before = await _count(api)
            await api.aclose()

            assert record.url.startswith(UNIX_SCHEME)  # egress none: the API is on a unix socket
            socket_path = record.url[len(UNIX_SCHEME):]
            await backend.signal(record.sandbox_id, record.container_id, "SIGUSR1")  # the server lets go
            deadline = time.monotonic() + 10
            while os.path.exists(socket_path) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not os.path.exists(socket_path), "the server kept its socket"
            saved = await backend.checkpoint(record.sandbox_id, record.container_id, "live1")
            assert saved["bytes"] > 0
            assert not await backend.is_running(record.sandbox_id)

            again, was_running = await backend.start_container(record.sandbox_id, record.container_id, "live1")
            assert not was_running
            await backend.listen_again(again)
            api = await ready_api(backend, again)
            try:
                resumed = await _count(api)
                assert before <= resumed < before + 40, (before, resumed)  # went on from where it was
                await asyncio.sleep(0.5)
                assert await _count(api) > resumed  # and it still runs
                assert (await api.exec("echo $KEPT $PWD")).output.strip() == "yes /tmp"
                assert (await api.view_command(job)).running
            finally:
                await api.aclose()
        finally:
            await backend.destroy(record.sandbox_id)
            await backend.teardown(pool_name)
        assert saved and not os.path.exists(str(saved["path"]))  # the checkpoint went with its container

    run(body())


def test_live_forks_go_on_from_the_checkpoint_each_on_its_own(pool_name, image, docker_client, tmp_path):
    """Two sandboxes restored from one checkpoint of a third: each goes on from the checkpoint's
    processes and memory (the counter, the shell's state), and from then on each is its own."""
    _require_live(docker_client)

    async def body():
        backend = DockerBackend(f"sat-{pool_name}", policy=NetworkPolicy(egress="none"))
        limits = Limits(memory="1g", cpus=0.5, pids=512)
        parent = await backend.create(spec_for(pool_name, image, runtime="runsc", limits=limits))
        forks = []
        try:
            api = await ready_api(backend, parent)
            await api.exec("export KEPT=parent; cd /tmp")
            await api.start_command(HOLDER)
            while await _count(api) < 3:
                await asyncio.sleep(0.05)
            at = await _count(api)
            await api.aclose()
            await backend.signal(parent.sandbox_id, parent.container_id, "SIGUSR1")
            while os.path.exists(parent.url[len(UNIX_SCHEME):]):
                await asyncio.sleep(0.02)
            await backend.checkpoint(parent.sandbox_id, parent.container_id, "base")
            kept = backend.checkpoint_dir(parent.container_id, "base")
            # The second restores from a copy that travelled as another node gets it (packed by
            # the node that took it, unpacked where the fork starts).
            shipped = str(tmp_path / "elsewhere" / "base")
            assert checkpoints.unpack(checkpoints.pack(kept), shipped) > 0
            assert checkpoints.unpack(checkpoints.pack(kept), shipped) == 0  # there already: kept as is
            for source in (kept, shipped):
                # Each with a token of its own: the restored server held the parent's in memory, and
                # takes the fork's as it listens again.
                fork = await backend.fork_from_checkpoint(
                    spec_for(pool_name, image, runtime="runsc", limits=limits), source)
                assert fork.token != parent.token
                forks.append(fork)
                await backend.listen_again(fork)
            apis = [await ready_api(backend, fork) for fork in forks]
            try:
                for fork_api in apis:
                    assert at <= await _count(fork_api) < at + 40  # from the checkpoint, not from zero
                    assert (await fork_api.exec("echo $KEPT $PWD")).output.strip() == "parent /tmp"
                await apis[0].exec("echo mine > /tmp/own")
                assert (await apis[1].exec("cat /tmp/own 2>/dev/null || echo absent")).output.strip() == "absent"
                assert len({fork.container_id for fork in forks} | {parent.container_id}) == 3
            finally:
                for fork_api in apis:
                    await fork_api.aclose()
        finally:
            for record in [parent, *forks]:
                await backend.destroy(record.sandbox_id)
            await backend.teardown(pool_name)

    run(body())


def test_a_runc_sandbox_cannot_be_checkpointed_and_says_why(pool_name, image, docker_client):
    _require_live(docker_client)

    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        record = await backend.create(spec_for(pool_name, image))
        try:
            with pytest.raises(NotSupported, match="gVisor"):
                await backend.checkpoint(record.sandbox_id, record.container_id, "live1")
        finally:
            await backend.destroy(record.sandbox_id)
            await backend.teardown(pool_name)

    run(body())


def _state(box) -> tuple[int, int, str]:
    count, entries, digest = box.exec("cat /tmp/state 2>/dev/null || echo 0 0 -").output.split()
    return int(count), int(entries), digest


def _live_config(config, **extra):
    # gVisor runs here only without a network namespace; its own threads and file cache count
    # toward the limits (1 GB for a 200 MB process and its checkpoint's restore).
    return type(config).model_validate({**config.model_dump(), "runtime": "runsc", "network": {"egress": "none"},
                                        "limits": {"memory": "1g", "cpus": 1.0, "pids": 512}, **extra})


def _container_dir(docker_client, container_id: str) -> str:
    return os.path.join(docker_client.info()["DockerRootDir"], "containers", container_id)


def _checkpoints_of(docker_client, container_id: str) -> list[str]:
    return glob.glob(os.path.join(_container_dir(docker_client, container_id), "checkpoints", "*"))


def test_a_live_hibernation_keeps_a_200mb_process_the_shell_and_a_background_command(
        ray_address, config, docker_client):
    """The must-show of a live hibernate: a Python process holding a 200 MB dict and a counter
    goes on after the resume, with its data whole; the shell keeps its variables and directory;
    the background command is still viewable; a pool restart between hibernate and resume changes
    nothing; the checkpoint goes once restored, and everything with the sandbox."""
    _require_live(docker_client)
    from tests.conftest import assert_no_actors_left, containers_of, named_actors, wait_until

    cfg = _live_config(config)
    client = sandbox_actors.connect(cfg)
    try:
        box = client.acquire("alive")
        box.write_file("/tmp/holder.py", LIVE_HOLDER)
        box.exec("export KEPT=yes; cd /tmp")
        job = box.start("python3 /tmp/holder.py")
        assert wait_until(lambda: _state(box)[0] >= 45, timeout=60)  # loaded, and a first digest taken
        count, entries, digest = _state(box)
        actor_name, container_id = box.info["actor_name"], box.info["container_id"]

        assert client.hibernate(box, live=True)
        assert docker_client.containers.get(container_id).status == "exited"
        assert wait_until(lambda: actor_name not in named_actors("sbx-"), timeout=10)
        [saved] = _checkpoints_of(docker_client, container_id)
        row = next(r for r in client.list() if r["thread_id"] == "alive")
        assert row["state"] == "hibernated"

        ray.kill(client.pool, no_restart=False)  # the pool dies between hibernate and resume; Ray restarts it
        assert wait_until(lambda: client.stats()["counters"].get("reconcile_passes", 0) >= 2, timeout=30)

        again = client.acquire("alive")
        assert again.path == "resumed" and again.info["container_id"] == container_id
        assert again.info.get("resumed_live") is True
        resumed = _state(again)
        assert resumed[0] >= count and resumed[1:] == (entries, digest)  # the same process, its data whole
        assert wait_until(lambda: _state(again)[0] > resumed[0] + 40, timeout=30)  # and on it goes, digest again
        assert _state(again)[1:] == (entries, digest)
        assert again.exec("echo $KEPT $PWD").output.strip() == "yes /tmp"
        assert again.view_command(job.session_id, 0).running
        assert not os.path.exists(saved)  # restored: the checkpoint is gone
        assert again.hibernate(live=True)  # asleep again, with a checkpoint, when the pool shuts down
        assert len(_checkpoints_of(docker_client, container_id)) == 1
        assert client.stats()["counters"].get("hibernated_live") == 1  # (the restarted pool's counters)
    finally:
        client.shutdown()
    assert_no_actors_left(cfg.pool_name)
    assert containers_of(docker_client, cfg.pool_name) == []
    assert not os.path.exists(_container_dir(docker_client, container_id))  # its checkpoint with it
    assert shims_left() == []  # nor a containerd task or shim of a container restored and checkpointed again


def test_an_idle_sandbox_hibernates_live_and_comes_back_running(ray_address, config, docker_client):
    """idle_action: hibernate with hibernate_live: an idle sandbox's processes survive its nap."""
    _require_live(docker_client)
    from tests.conftest import assert_no_actors_left, containers_of, wait_until

    cfg = _live_config(config, idle_action="hibernate", hibernate_live=True, idle_timeout=1.0)
    client = sandbox_actors.connect(cfg)
    try:
        box = client.acquire("napper")
        box.exec("sleep 3600 & echo $! > /tmp/sleeper.pid; export NAPPED=yes")
        pid = box.exec("cat /tmp/sleeper.pid").output.strip()
        for nap in range(3):  # the same container, checkpointed and restored again and again
            client.release(box)
            assert wait_until(lambda: next(r for r in client.list() if r["thread_id"] == "napper")["state"]
                              == "hibernated", timeout=30), nap
            box = client.acquire("napper")
            assert box.path == "resumed" and box.info.get("resumed_live") is True, nap
            assert box.exec(f"kill -0 {pid} && echo running; echo $NAPPED").output.split() == ["running", "yes"], nap
    finally:
        client.shutdown()
    assert_no_actors_left(cfg.pool_name)
    assert containers_of(docker_client, cfg.pool_name) == []
    assert shims_left() == []


def test_a_runc_pool_asked_for_a_live_hibernation_says_what_is_missing_and_serves_on(ray_address, config):
    from tests.conftest import assert_no_actors_left

    client = sandbox_actors.connect(config)
    try:
        box = client.acquire("plain")
        with pytest.raises(sandbox_actors.NotSupported, match="runsc"):
            client.hibernate(box, live=True)
        assert box.exec("echo still here").output.strip() == "still here"
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_eight_live_forks_of_a_200mb_process_each_go_on_and_diverge(ray_address, config, docker_client):
    """A live snapshot of a sandbox running a Python process that holds a 200 MB dict: each of 8
    sandboxes forked from it goes on from that process (its data whole, its counter from where
    it was) and from the shell's state, each on its own from then on; the parent goes on too.
    The checkpoint goes with the snapshot."""
    _require_live(docker_client)
    from tests.conftest import assert_no_actors_left, containers_of, wait_until

    cfg = _live_config(config, replicas=10, max_sandboxes=12, spare_actors=8)
    client = sandbox_actors.connect(cfg)
    try:
        parent = client.acquire("parent")
        parent.write_file("/tmp/holder.py", LIVE_HOLDER)
        parent.exec("export ROLE=forked; cd /tmp")
        parent.start("python3 /tmp/holder.py")
        assert wait_until(lambda: _state(parent)[0] >= 45, timeout=60)
        snap = client.snapshot(parent, "env-live", live=True)
        assert snap.live and snap.checkpoint_bytes > 150e6  # 200 MB of random bytes, kept
        count, entries, digest = _state(parent)
        assert wait_until(lambda: _state(parent)[0] > count, timeout=10)  # the parent goes on
        # Restored from its checkpoint, its container runs under a new first process: its actor
        # still knows it runs, and its thread, back after a release, reclaims it warm (the pool
        # once checked and repaired it forever here, and the acquire never answered).
        assert ray.get(parent.actor.alive.remote(), timeout=10) is True
        client.release(parent)
        again = client.acquire("parent")
        assert (again.path, again.info["container_id"]) == ("warm", parent.info["container_id"])
        assert client.stats()["counters"].get("reclaimed") == 1

        forks = list(client.fork(snap, [f"fork-{i}" for i in range(8)]))
        assert len(forks) == 8 and all(f.info.get("forked_live") is True for f in forks)
        for fork in forks:
            forked = _state(fork)
            assert forked[1:] == (entries, digest) and forked[0] >= count - 40  # its process, from the snapshot
            assert fork.exec("echo $ROLE $PWD").output.strip() == "forked /tmp"
        for i, fork in enumerate(forks):
            fork.exec(f"echo {i} > /tmp/mine")
        assert [f.exec("cat /tmp/mine").output.strip() for f in forks] == [str(i) for i in range(8)]
        assert parent.exec("cat /tmp/mine 2>/dev/null || echo none").output.strip() == "none"
        assert all(wait_until(lambda f=f: _state(f)[0] > count + 40, timeout=30) for f in forks)  # all go on
        assert len({f.info["container_id"] for f in forks} | {parent.info["container_id"]}) == 9
        for fork in forks:
            client.destroy(fork)
        kept = os.path.join(cfg.base_dir, "checkpoints", "env-live")
        # It names the cluster that kept it (`gc` removes it once that cluster is gone from here).
        with open(os.path.join(kept, CHECKPOINT_CLUSTER_FILE)) as mark:
            assert mark.read() == docker_client.containers.get(parent.info["container_id"]).labels["sandbox-actors.cluster"]
        assert client.remove_snapshot(snap) and not os.path.exists(kept)  # the checkpoint went with it
    finally:
        client.shutdown()
    assert_no_actors_left(cfg.pool_name)
    assert containers_of(docker_client, cfg.pool_name) == []
    assert shims_left() == []
