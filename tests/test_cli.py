"""Every CLI command, run as a user would: separate processes against a real pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

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

        assert cli("release", "t1", *opts).returncode == 0
        assert json.loads(cli("status", *opts, "--json").stdout)["sandboxes"][0]["state"] == "warm"
        assert cli("release", "never-acquired", *opts).returncode == 3
        gc = cli("gc", *opts, "--json")
        assert gc.returncode == 0
        assert json.loads(gc.stdout)["reconcile"] == {}  # nothing to collect
        assert cli("destroy", "--thread", "t1", *opts).returncode == 0
        assert cli("destroy", "--thread", "t1", *opts).returncode == 3
        assert containers_of(docker_client, config.pool_name) == []
        cli("exec", "t2", *opts, "--", "true")
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


def test_usage_errors_and_help(config_file, tmp_path):
    for command in ("up", "status", "exec", "release", "destroy", "gc", "down", "build-image", "demo"):
        shown = cli(command, "--help")
        assert shown.returncode == 0 and "usage: sandbox-actors" in shown.stdout, command
    assert cli("exec", "t1").returncode == 2  # nothing to run
    assert cli("destroy").returncode == 2  # neither id nor --thread
    bad = tmp_path / "bad.yaml"
    bad.write_text("replica: 3\n")
    broken = cli("status", "--config", str(bad))
    assert broken.returncode == 2 and "replica" in broken.stderr
    assert cli("frobnicate").returncode == 2


def test_up_starts_a_head_and_down_stops_only_it(image, tmp_path):
    env = {**os.environ, "SANDBOX_ACTORS_HOME": str(tmp_path / "home"),
           "SANDBOX_ACTORS_RAY_TEMP": f"/tmp/sat-{uuid.uuid4().hex[:8]}"}
    env.pop("RAY_ADDRESS", None)
    opts = ["--pool", f"head-{uuid.uuid4().hex[:6]}", "--namespace", "sandbox_actors_cli_test"]
    up = cli("up", *opts, "--new-head", "--json", env=env)
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["ray"].startswith("started")
    try:
        run = cli("exec", "t", *opts, "--", "echo", "via-own-head", env=env)
        assert run.returncode == 0 and run.stdout == "via-own-head\n", run.stderr
    finally:
        down = cli("down", *opts, "--json", env=env)
    assert down.returncode == 0, down.stderr
    result = json.loads(down.stdout)
    assert result["destroyed"] == 1 and result["ray_head_stopped"] is True
    leftovers = subprocess.run(["pgrep", "-f", env["SANDBOX_ACTORS_RAY_TEMP"]], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_build_image_is_reused_when_unchanged(image):
    result = cli("build-image")
    assert result.returncode == 0 and "up to date" in result.stdout


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
