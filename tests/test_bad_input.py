"""Hostile and odd input: each gets a typed error or a documented behaviour, and the pool keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest

import sandbox_actors
from sandbox_actors import (
    CommandTimeout,
    InvalidRequest,
    InvalidThreadId,
    SandboxFileNotFound,
)
from sandbox_actors.threads import thread_dir


@pytest.mark.parametrize("bad", ["", "x" * 10_000, "\ud800"])
def test_unusable_thread_ids_are_refused_typed(pool, bad):
    with pytest.raises(InvalidThreadId):
        pool.acquire(bad)


def test_pool_refuses_bad_thread_ids_itself(pool):
    """Callers that skip the client (raw actor calls) get the same typed error."""
    import ray

    with pytest.raises(InvalidThreadId):
        try:
            ray.get(pool.pool.acquire.remote(""))
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause from None
    assert pool.acquire("still-serving").exec("echo ok").output.strip() == "ok"


def test_odd_but_valid_thread_ids_work_and_stay_inside_base_dir(pool, config, docker_client):
    odd = ["nul\x00and\x07control\n", "ünïcødé 🚀 スレッド", "../../etc/passwd", "a" * 1000]
    boxes = [pool.acquire(thread) for thread in odd]
    assert len({b.sandbox_id for b in boxes}) == len(odd)
    for thread, box in zip(odd, boxes):
        box.write_file("/mnt/user-data/workspace/mine.txt", repr(thread))
        host = thread_dir(config.base_dir, thread) / "workspace" / "mine.txt"
        assert host.read_text() == repr(thread)
        assert host.resolve().is_relative_to(Path(config.base_dir).resolve())
        assert box.thread_id == thread
    labels = {c.labels["sandbox-actors.sandbox-id"]: c.labels["sandbox-actors.thread-id"]
              for c in docker_client.containers.list(filters={"label": f"sandbox-actors.pool={config.pool_name}"})}
    assert len(labels) == len(odd)
    assert sorted(r["thread_id"] for r in pool.list()) == sorted(odd)


def test_huge_non_utf8_and_slow_commands(pool):
    box = pool.acquire("commands")
    huge = box.bash("head -c 50000000 /dev/zero | tr '\\0' a", timeout=120)
    assert huge.exit_code == 0
    assert len(huge.stdout) < 9 * 2**20 and "...[truncated" in huge.stdout  # bounded, marked
    shell = box.exec("head -c 5000000 /dev/zero | tr '\\0' b")
    assert len(shell.output) <= 30_100 and "truncated" in shell.output
    binary = box.bash("printf 'ok \\377\\376 end'")
    assert binary.stdout.startswith("ok ") and binary.stdout.endswith(" end") and "\ufffd" in binary.stdout
    box.exec("cd /tmp && export MARK=kept")
    with pytest.raises(CommandTimeout):
        box.exec("sleep 60", timeout=1)
    after = box.exec("echo $MARK $(pwd)")
    assert after.exit_code == 0 and after.output.strip() == "kept /tmp"  # the shell survived the kill


def test_file_edge_cases(pool):
    box = pool.acquire("files")
    with pytest.raises(SandboxFileNotFound):
        box.read_file("/home/sandbox/missing.txt")
    with pytest.raises(SandboxFileNotFound):
        box.read_bytes("/home/sandbox/missing.bin")
    with pytest.raises(InvalidRequest):
        box.read_file("/home/sandbox")  # a directory read as a file
    blob = bytes(range(256)) * 512
    box.write_file("/home/sandbox/deep/new/dir/blob.bin", blob)
    assert box.read_bytes("/home/sandbox/deep/new/dir/blob.bin") == blob
    # Paths are the sandbox's own: '..' walks the container's filesystem, never the host's.
    inside = box.read_file("/mnt/user-data/workspace/../../../etc/hostname").strip()
    assert inside == box.exec("hostname").output.strip()
    assert box.exec("echo serving").output.strip() == "serving"


def test_env_names_are_checked_and_values_never_echoed(pool):
    box = pool.acquire("env")
    secret = "hunter2-do-not-print"
    for bad in ("BAD-NAME", "1STARTS_WITH_DIGIT", "has space", ""):
        with pytest.raises(InvalidRequest) as caught:
            box.bash("true", env={bad: secret})
        assert secret not in str(caught.value)
    ok = box.bash('test "$TOKEN" = hunter2-do-not-print', env={"TOKEN": secret})
    assert ok.exit_code == 0 and secret not in ok.stdout + ok.stderr
    assert box.exec("echo serving").output.strip() == "serving"


def test_bad_configs_are_refused_at_connect(ray_address):
    for bad in ({"replicas": 0}, {"idle_timeout": -5}, {"unknown_key": 1}, {"limits": {"cpus": "lots"}}):
        with pytest.raises(sandbox_actors.ConfigError):
            sandbox_actors.connect(bad)
