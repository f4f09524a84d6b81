"""The benchmark keeps working: a tiny run with every key and ratio in its JSON (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TIME_KEYS = ["floor", "cold", "warm", "hot", "prewarmed", "cross_process", "exec_actor", "exec_direct", "hibernate",
             "resume", "snapshot", "live_hibernate", "live_resume"]


@pytest.mark.slow
def test_bench_tiny_writes_every_figure(image, tmp_path, docker_client):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "sandbox_actors.cli", "bench", "--tiny", "--json", str(out)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in TIME_KEYS:
        assert set(figures[key]) >= {"p50", "p95", "max", "n"} and figures[key]["n"] > 0, key
    for key in ("burst", "floor_burst", "ray_floor_burst", "ray_alone_burst", "burst_default", "burst_repeat",
                "fork_burst"):
        assert figures[key]["ok"] == figures[key]["n"] == 3, key
    assert [len(figures[key]["rounds"]) for key in ("burst", "burst_default", "burst_repeat")] == [1, 1, 1]
    assert figures["burst_repeat"]["spare_actors"] >= 3  # learned from the first burst
    assert figures["spares_idle"]["n"] >= 3 and figures["spares_idle"]["uss_mb"] > 0
    assert [(row["rate"], row["ok"], row["count"]) for row in figures["arrivals"]] == [(2.0, 6, 6), (8.0, 6, 6)]
    assert figures["actor_uss_mb"] > 0
    # Hibernating ends the sandbox's actor and stops its container: measured before and after.
    assert figures["hibernate_actor_ended"] == 1.0
    assert figures["actor_uss_mb"] / 2 < figures["hibernate_frees_mb"] <= figures["actor_uss_mb_max"] + 64
    # Clean floors: measured around each stage with nothing of ours running, into every targeted figure.
    for key, stage in (("cold", "paths"), ("resume", "lifecycle")):
        assert len(figures["clean_floors"][stage]["single_s"]) == 4, stage  # 2 before the stage, 2 after
        assert figures[key]["clean_ratio"] == round(figures[key]["p50"] / figures[key]["clean_floor"], 3), key
    for key in ("burst", "burst_repeat", "fork_burst"):
        assert figures[key]["clean_ratio"] == round(figures[key]["wall_s"] / figures[key]["clean_floor"], 3), key
    assert figures["arrivals"][0]["clean_ratio"] > 0
    assert figures["burst_default"]["at_once_s"] > 0  # a first burst, beside both floors at once
    [rollouts] = figures["rollouts"]
    assert (rollouts["concurrency"], rollouts["n"], rollouts["ok"]) == (2, 4, 4)
    assert set(rollouts) >= {"per_s", "floor_per_s", "clean_ratio", "acquire_p50", "acquire_p95", "exec_p50"}
    assert rollouts["clean_ratio"] == round(rollouts["floor_per_s"] / rollouts["per_s"], 3)
    assert figures["spare_idle_cpu_ms_per_s"] > 0 and figures["trivial_actor_idle_cpu_ms_per_s"] > 0
    assert 10 < figures["trivial_actor_uss_mb"] < figures["actor_uss_mb_max"] + 20  # Ray's own worker, beside ours
    # Live checkpoints (this machine's engine has gVisor and the experimental mode; CI's too).
    assert figures["live_resume"]["clean_ratio"] > 0 and len(figures["clean_floors"]["live"]["single_s"]) == 4
    assert 0 < figures["checkpoint_idle_mb"] < figures["checkpoint_200mb_mb"]
    assert figures["checkpoint_200mb_mb"] > 150  # 200 MB of random bytes cannot shrink much
    assert figures["live_fork_burst"]["ok"] == 3 and figures["live_fork_burst"]["clean_ratio"] > 0
    looked = figures["usage_look"]  # what watching a sandbox's use costs
    assert looked["looks"] >= 4 and looked["actor_cpu_ms"] > 0 and looked["engine_cpu_ms"] > 0
    assert looked["cpu_ms_per_s_per_sandbox"] == round((looked["actor_cpu_ms"] + looked["engine_cpu_ms"]) / 15, 3)
    # Ray's own share, beside the bounds it bears on: no code of ours in any of them.
    assert figures["ray_alone_burst"]["trivial_actors"] == 3
    alone = {target["figure"]: target["ray_alone"] for target in figures["targets"] if "ray_alone" in target}
    assert alone == {"burst": figures["ray_alone_burst"]["clean_ratio"], "actor_uss_mb": figures["trivial_actor_uss_mb"],
                     "exec_actor": round(figures["exec_ray_alone"]["p50"] - figures["exec_direct"]["p50"], 2)}
    judged = {target["figure"] for target in figures["targets"]}
    assert judged >= {"cold", "resume", "burst", "burst_repeat", "fork_burst", "arrivals_2", "rollouts_2",
                      "spare_idle_cpu_ms_per_s", "actor_uss_mb", "exec_actor", "warm", "hot", "prewarmed",
                      "live_resume", "live_fork_burst"}
    assert figures["failures"] == []
    assert "targets:" in result.stdout and "failures: 0" in result.stdout and "clean" in result.stdout
    def of_bench(items):  # the bench's pools are named bench-...: anything else is not its to judge
        return [item for item in items if (item.labels or {}).get("sandbox-actors.pool", "").startswith("bench-")]

    assert of_bench(docker_client.containers.list(all=True, filters={"label": "sandbox-actors.project"})) == []
    assert of_bench(docker_client.images.list(filters={"label": "sandbox-actors.snapshot"})) == []  # snapshots too
