"""The examples run as a user would run them, small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import TEST_NAMESPACE, assert_no_actors_left

ROOT = Path(__file__).resolve().parents[1]


def test_the_rollouts_job_runs_forks_scores_and_leaves_nothing(ray_address, pool_name, tmp_path, image):
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "examples/rollouts.py", "--rollouts", "8", "--concurrency", "2", "--address", ray_address,
         "--pool", pool_name, "--namespace", TEST_NAMESPACE, "--base-dir", str(tmp_path / "base"),
         "--json", str(report_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["mean_score"] == 1.0
    assert report["from_snapshot"] == 8  # every rollout started from the prepared environment
    assert report["left_in_pool"] == 0 and report["leaks"] == {}
    assert "rollouts/s" in done.stdout and "acquire  p50" in done.stdout and "exec     p50" in done.stdout
    # The floor, measured in the same run: the same episodes through the engine, no Ray.
    assert report["floor"]["ok"] == 8 and report["floor"]["per_s"] > 0
    assert "of that rate" in done.stdout
    assert_no_actors_left(pool_name)
