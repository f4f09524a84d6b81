"""The benchmark keeps working: a tiny run with every key in its JSON (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TIME_KEYS = ["floor", "cold", "warm", "hot", "prewarmed", "cross_process", "exec_actor", "exec_direct", "hibernate",
             "resume", "snapshot"]


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
    for key in ("burst", "floor_burst", "ray_floor_burst", "burst_default", "burst_repeat", "fork_burst"):
        assert figures[key]["ok"] == figures[key]["n"] == 3, key
    assert [len(figures[key]["rounds"]) for key in ("burst", "burst_default", "burst_repeat")] == [1, 1, 1]
    assert figures["burst_repeat"]["spare_actors"] >= 3  # learned from the first burst
    assert figures["spares_idle"]["n"] >= 3 and figures["spares_idle"]["uss_mb"] > 0
    assert [(row["rate"], row["ok"], row["count"]) for row in figures["arrivals"]] == [(2.0, 6, 6), (8.0, 6, 6)]
    assert figures["actor_uss_mb"] > 0
    # Hibernating ends the sandbox's actor and stops its container: measured before and after.
    assert figures["hibernate_actor_ended"] == 1.0
    assert figures["actor_uss_mb"] / 2 < figures["hibernate_frees_mb"] <= figures["actor_uss_mb_max"] + 64
    # Floors measured beside the pool's figures, in the same moments (the machine's speed drifts).
    assert figures["cold"]["floor_beside"] > 0 and figures["resume"]["floor_beside"] > 0
    for key in ("burst", "burst_default", "burst_repeat", "fork_burst"):
        assert len(figures[key]["floor_beside_rounds_s"]) == 1 and figures[key]["floor_beside_s"] > 0, key
    assert figures["burst_default"]["ray_floor_beside_s"] > 0 and "ray_floor_beside_s" not in figures["burst"]
    # A first burst's own floor: trivial actors and bare containers started at once.
    assert figures["burst_default"]["at_once_beside_s"] > 0 and "at_once_beside_s" not in figures["burst_repeat"]
    assert "of both floors at once" in result.stdout
    assert "p50/floor" in result.stdout and "p50/beside" in result.stdout  # the table with ratios
    assert "beside: " in result.stdout
    def of_bench(items):  # the bench's pools are named bench-...: anything else is not its to judge
        return [item for item in items if (item.labels or {}).get("sandbox-actors.pool", "").startswith("bench-")]

    assert of_bench(docker_client.containers.list(all=True, filters={"label": "sandbox-actors.project"})) == []
    assert of_bench(docker_client.images.list(filters={"label": "sandbox-actors.snapshot"})) == []  # snapshots too
