"""Every CLI command, run as a user would: separate processes against a real pool."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker.errors
import pytest
import yaml

from tests.conftest import containers_of

CLI = [sys.executable, "-m", "sandbox_actors.cli"]


def cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture
def config_file(config, tmp_path: Path) -> Path:
    path = tmp_path / "sandbox.yaml"
    path.write_text(yaml.safe_dump({"sandbox": json.loads(config.model_dump_json())}))
    return path


def test_every_command_against_a_running_pool(ray_address, config_file, config, docker_client):
    opts = ["--config", str(config_file), "--address", ray_address]
    up = cli("up", *opts, "--json")
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    assert info["pool"] == config.pool_name and info["ray"] == "attached"
    try:
        run = cli("exec", "t1", *opts, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
        assert (run.returncode, run.stdout, run.stderr.strip()) == (7, "out\n", "err")
        assert cli("exec", "t1", *opts, "--shell", "--", "cd /tmp").returncode == 0
        assert cli("exec", "t1", *opts, "--shell", "--", "pwd").stdout.strip() == "/tmp"  # persistent shell
        env = cli("exec", "t1", *opts, "--env", "GREETING=hi", "--", "sh", "-c", "echo $GREETING")
        assert env.stdout == "hi\n"
        timed_out = cli("exec", "t1", *opts, "--timeout", "1", "--", "sleep", "30")
        assert timed_out.returncode == 124 and "timed out" in timed_out.stderr
        local, back = Path(config.base_dir).parent / "in.bin", Path(config.base_dir).parent / "out.bin"
        local.write_bytes(os.urandom(5 * 1024 * 1024 + 3))  # more than one chunk
        copied_in = cli("cp", str(local), "t1:/tmp/copied.bin", *opts)
        assert copied_in.returncode == 0 and "copied 5242883 bytes" in copied_in.stdout, copied_in.stderr
        assert cli("cp", "t1:/tmp/copied.bin", str(back), *opts).returncode == 0
        assert back.read_bytes() == local.read_bytes()
        assert cli("cp", str(local), str(back), *opts).returncode == 2  # no THREAD:PATH side
        assert cli("cp", "t1:/tmp/missing.bin", str(back), *opts).returncode == 3

        status = cli("status", *opts, "--json")
        assert status.returncode == 0, status.stderr
        table = json.loads(status.stdout)
        assert [(r["thread_id"], r["state"]) for r in table["sandboxes"]] == [("t1", "active")]
        assert table["stats"]["counters"]["created"] == 1
        text = cli("status", *opts)
        assert "t1" in text.stdout and "active" in text.stdout
        assert "isolation: egress open, node, Docker gateways, 169.254.0.0/16 blocked; runtime default; " \
               "commands as sandbox" in text.stdout
        assert table["stats"]["isolation"]["network"] == {"egress": "open", "allow": [], "blocked": [],
                                                          "enforced": True}

        def state(thread):
            rows = json.loads(cli("status", *opts, "--json").stdout)["sandboxes"]
            return next((r["state"] for r in rows if r["thread_id"] == thread), None)

        sandbox_id = table["sandboxes"][0]["sandbox_id"]
        assert cli("release", "t1", *opts).returncode == 0
        assert state("t1") == "warm"
        assert cli("release", "never-acquired", *opts).returncode == 3
        assert cli("exec", "t1", *opts, "--", "true").returncode == 0
        assert cli("release", "--id", sandbox_id, *opts).returncode == 0  # by its id, as status shows it
        assert state("t1") == "warm"
        assert cli("release", "--id", "0" * 24, *opts).returncode == 3
        # Hibernate by thread, then by id: each time the next exec resumes it, its files kept.
        cli("exec", "t1", *opts, "--", "sh", "-c", "echo kept > /tmp/kept.txt")
        for named in (["t1"], ["--id", sandbox_id]):
            slept = cli("hibernate", *named, *opts)
            assert slept.returncode == 0 and sandbox_id in slept.stdout, slept.stderr
            assert state("t1") == "hibernated"
            assert [c.status for c in containers_of(docker_client, config.pool_name)] == ["exited"]
            again = cli("exec", "t1", *opts, "--", "cat", "/tmp/kept.txt")
            assert (again.returncode, again.stdout) == (0, "kept\n"), again.stderr
        assert cli("hibernate", "never-acquired", *opts).returncode == 3
        live = cli("hibernate", "t1", "--live", *opts)  # a runc pool: processes cannot be kept here
        assert live.returncode == 1 and "runsc" in live.stderr, live.stderr
        assert state("t1") == "active"  # it serves on
        assert cli("hibernate", *opts).returncode == 2  # neither THREAD nor --id
        assert cli("hibernate", "t1", "--id", sandbox_id, *opts).returncode == 2  # both
        gc = cli("gc", *opts, "--json")
        assert gc.returncode == 0
        assert json.loads(gc.stdout)["reconcile"] == {}  # nothing to collect
        # Snapshots: one taken through the API, listed and removed through the CLI.
        import sandbox_actors

        snap = sandbox_actors.connect(config).acquire("t1").snapshot("cli-snap")
        listed = cli("snapshots", *opts, "--json")
        assert listed.returncode == 0 and [s["name"] for s in json.loads(listed.stdout)] == ["cli-snap"]
        assert "cli-snap" in cli("snapshots", *opts).stdout
        assert docker_client.images.get(snap.image)
        assert cli("snapshot", "rm", "cli-snap", *opts).returncode == 0
        assert cli("snapshot", "rm", "cli-snap", *opts).returncode == 3
        assert cli("snapshots", *opts).stdout.strip() == "no snapshots"
        assert cli("destroy", "t1", *opts).returncode == 0
        assert cli("destroy", "t1", *opts).returncode == 3
        assert containers_of(docker_client, config.pool_name) == []
        cli("exec", "t2", *opts, "--", "true")
        two = json.loads(cli("status", *opts, "--json").stdout)["sandboxes"][0]["sandbox_id"]
        assert cli("destroy", "--id", two, *opts).returncode == 0
        assert containers_of(docker_client, config.pool_name) == []
        cli("exec", "t3", *opts, "--", "true")
    finally:
        down = cli("down", *opts, "--keep-ray", "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["destroyed"] == 1
    assert containers_of(docker_client, config.pool_name) == []
    missing = cli("status", *opts)
    assert missing.returncode == 3 and "no pool" in missing.stderr


def test_gc_removes_an_orphan_container(ray_address, config, docker_client, tmp_path):
    # A long interval, so that `gc` (not a periodic pass) is what finds the orphan.
    slow = json.loads(config.model_copy(update={"reconcile_interval": 600}).model_dump_json())
    config_file = tmp_path / "slow.yaml"
    config_file.write_text(yaml.safe_dump(slow))
    opts = ["--config", str(config_file), "--address", ray_address]
    assert cli("up", *opts).returncode == 0
    try:
        # A container of the pool that no actor made and that never ran (so the engine reports no
        # death the pool could hear of): only a reconcile finds it.
        docker_client.containers.create(
            config.image, name=f"{config.container_prefix}-{'0' * 24}",
            labels={"sandbox-actors.project": "sandbox-actors", "sandbox-actors.pool": config.pool_name,
                    "sandbox-actors.sandbox-id": "0" * 24},
        )
        gc = cli("gc", *opts, "--json")
        assert gc.returncode == 0, gc.stderr
        assert json.loads(gc.stdout)["reconcile"].get("removed_containers", 0) == 1
        assert containers_of(docker_client, config.pool_name) == []
    finally:
        assert cli("down", *opts, "--keep-ray").returncode == 0


def test_exit_codes_for_no_capacity_and_a_command_that_cannot_run(ray_address, config, tmp_path):
    def config_file(name: str, **changes) -> list[str]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(json.loads(config.model_copy(update=changes).model_dump_json())))
        return ["--config", str(path), "--address", ray_address]

    full = config_file("full", replicas=1, max_sandboxes=1, capacity_timeout=1)
    try:
        assert cli("exec", "first", *full, "--", "true").returncode == 0
        busy = cli("exec", "second", *full, "--", "true")
        assert busy.returncode == 4 and "max_sandboxes" in busy.stderr  # no capacity: retry later
    finally:
        assert cli("down", *full, "--keep-ray").returncode == 0
    missing = config_file("missing", image="sandbox-actors-no-such-image:latest")
    try:
        cannot = cli("exec", "t", *missing, "--", "true")
        assert cannot.returncode == 125 and "no-such-image" in cannot.stderr  # it could not run at all
    finally:
        assert cli("down", *missing, "--keep-ray").returncode == 0


def test_usage_errors_and_help(config_file, tmp_path):
    for command in ("up", "status", "exec", "cp", "release", "destroy", "hibernate", "snapshots", "snapshot", "gc",
                    "down", "build-image", "demo", "bench", "shell", "top", "audit"):
        shown = cli(command, "--help")
        assert shown.returncode == 0 and "usage: sandbox-actors" in shown.stdout, command
    assert cli("exec", "t1").returncode == 2  # nothing to run
    assert cli("destroy").returncode == 2  # neither THREAD nor --id
    assert cli("audit").returncode == 2 and cli("shell").returncode == 2  # no thread
    bad = tmp_path / "bad.yaml"
    bad.write_text("replica: 3\n")
    broken = cli("status", "--config", str(bad))
    assert broken.returncode == 2 and "replica" in broken.stderr
    assert cli("frobnicate").returncode == 2


def test_up_starts_a_head_and_down_stops_only_it_with_every_pool_on_it(image, tmp_path, docker_client):
    env = {**os.environ, "SANDBOX_ACTORS_HOME": str(tmp_path / "home"),
           "SANDBOX_ACTORS_RAY_TEMP": f"/tmp/sat-{uuid.uuid4().hex[:8]}"}
    env.pop("RAY_ADDRESS", None)
    pool, other = f"head-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    opts = ["--pool", pool, "--namespace", "sandbox_actors_cli_test"]
    up = cli("up", *opts, "--new-head", "--json", env=env)
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["ray"].startswith("started")
    try:
        run = cli("exec", "t", *opts, "--", "echo", "via-own-head", env=env)
        assert run.returncode == 0 and run.stdout == "via-own-head\n", run.stderr
        # A second pool on the same head (deer-flow's, say), with a sandbox of its own.
        elsewhere = cli("exec", "t", "--pool", other, "--namespace", "another_ns", "--", "true", env=env)
        assert elsewhere.returncode == 0, elsewhere.stderr
        assert len(containers_of(docker_client, other)) == 1
    finally:
        down = cli("down", *opts, "--json", env=env)
    assert down.returncode == 0, down.stderr
    result = json.loads(down.stdout)
    assert result["destroyed"] == 2 and result["ray_head_stopped"] is True
    assert sorted(p["pool"] for p in result["pools"]) == sorted([pool, other])  # every pool on the head
    assert containers_of(docker_client, pool) == containers_of(docker_client, other) == []
    leftovers = subprocess.run(["pgrep", "-f", env["SANDBOX_ACTORS_RAY_TEMP"]], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_build_image_is_reused_when_unchanged_and_rebuilt_when_forced(image, docker_client):
    result = cli("build-image")
    assert result.returncode == 0 and "up to date" in result.stdout
    tag = f"sandbox-actors-cli-test:{uuid.uuid4().hex[:6]}"
    try:
        forced = cli("build-image", "--tag", tag, "--force", timeout=600)
        assert forced.returncode == 0, forced.stdout[-2000:] + forced.stderr[-2000:]
        assert "up to date" not in forced.stdout and docker_client.images.get(tag)
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(tag)


def test_demo_runs_to_a_passing_summary(image):
    result = cli("demo", "--threads", "2", "--turns", "2", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checks:" in result.stdout and "FAILED" not in result.stdout
    assert "leak check: 0 container(s), 0 actor(s) left ok" in result.stdout
    assert "worker processes have been started" not in result.stdout + result.stderr  # Ray's noise, filtered


def _raylets() -> int:
    found = subprocess.run(["pgrep", "-fc", "raylet/raylet"], capture_output=True, text=True).stdout.strip()
    return int(found or 0)


@pytest.mark.parametrize("command, pools", [
    (["demo", "--threads", "2", "--turns", "200"], "sandbox-demo"),
    (["bench", "--tiny"], "bench-"),
], ids=["demo", "bench"])
def test_ctrl_c_stops_the_demo_and_the_bench_and_cleans_up(image, docker_client, command, pools):
    from tests.conftest import sigint_default, wait_until

    def ours() -> list[str]:  # names; the low-level list, which no removal under way can fail
        found = docker_client.api.containers(all=True, filters={"label": "sandbox-actors.project=sandbox-actors"})
        return [c["Names"][0].lstrip("/") for c in found
                if (c.get("Labels") or {}).get("sandbox-actors.pool", "").startswith(pools)
                or c["Names"][0].lstrip("/").startswith(pools)]

    raylets = _raylets()
    proc = subprocess.Popen([*CLI, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=sigint_default)
    try:
        assert wait_until(ours, timeout=240, interval=0.2), "it never started a sandbox"
        time.sleep(1.0)  # well inside its work
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    assert ours() == []
    networks = [n["Name"] for n in docker_client.api.networks(filters={"label": "sandbox-actors.project=sandbox-actors"})
                if (n.get("Labels") or {}).get("sandbox-actors.pool", "").startswith(pools)]
    assert networks == [], out[-3000:]
    assert wait_until(lambda: _raylets() == raylets, timeout=30), "its Ray cluster outlived it"
