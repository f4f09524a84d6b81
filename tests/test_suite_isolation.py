"""The test suite touches only what it made: a user's pool running on the same engine keeps every
sandbox through a test run (its own session's cleanup included)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import containers_of

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sandbox_actors.cli"]


@pytest.mark.slow
def test_a_user_s_pool_keeps_its_sandboxes_through_a_test_run(image, tmp_path, docker_client):
    # The user's: a Ray head of their own, a pool on it, a sandbox holding a file.
    user_env = {**os.environ, "SANDBOX_ACTORS_HOME": str(tmp_path / "user-home"),
                "SANDBOX_ACTORS_RAY_TEMP": f"/tmp/sau-{uuid.uuid4().hex[:8]}"}
    user_env.pop("RAY_ADDRESS", None)
    pool = f"user-{uuid.uuid4().hex[:6]}"
    opts = ["--pool", pool, "--namespace", "a_user_s_namespace"]

    def user(command: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, command, *opts, *args], env=user_env, capture_output=True, text=True,
                              timeout=300, check=False)

    assert user("up", "--new-head").returncode == 0
    try:
        assert user("exec", "chat", "--", "sh", "-c", "echo mine > /tmp/mine.txt").returncode == 0
        (theirs,) = containers_of(docker_client, pool)
        # A test run beside it: tests that make and remove sandboxes, then their session's cleanup.
        run_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SANDBOX_ACTORS_HOME")}
        run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_pool_ray.py", "-p", "no:cacheprovider",
                              "-q", "-k", "cold_hot_warm or concurrent_acquires_of_one_thread"],
                             cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600, check=False)
        assert run.returncode == 0, run.stdout[-3000:]
        assert "2 passed" in run.stdout
        theirs.reload()
        assert theirs.status == "running"
        kept = user("exec", "chat", "--", "cat", "/tmp/mine.txt")
        assert (kept.returncode, kept.stdout) == (0, "mine\n"), kept.stderr
        assert [c.id for c in containers_of(docker_client, pool)] == [theirs.id]  # the same sandbox, not a new one
    finally:
        down = user("down")
    assert down.returncode == 0, down.stderr
    assert containers_of(docker_client, pool) == []
