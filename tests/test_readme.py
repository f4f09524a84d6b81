"""README stays true: its quickstart runs, its config reference covers every key, metrics exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import httpx
import ray

from sandbox_actors.config import SandboxConfig
from tests.conftest import containers_of

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"


def quickstart() -> str:
    text = README.read_text()
    marker = text.index("<!-- quickstart")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)


def test_quickstart_runs_as_written(ray_address, image, tmp_path, docker_client):
    env = {**os.environ, "RAY_ADDRESS": ray_address, "HOME": str(tmp_path)}
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        env["RAY_AUTH_TOKEN"] = token.read_text().strip()
    result = subprocess.run(
        [sys.executable, "-c", quickstart()], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("hello from ")
    assert "# kept between turns" in lines and "42" in lines
    pool_dir = tmp_path / ".sandbox-actors" / "pools" / "sandbox_actors" / "sandbox-pool"  # the pool's own base_dir
    assert (pool_dir / "threads" / "thread-42" / "user-data" / "workspace" / "notes.md").exists()
    assert containers_of(docker_client, "sandbox-pool") == []


def config_keys() -> list[str]:
    keys = []
    for name, field in SandboxConfig.model_fields.items():
        variants = [m for m in typing.get_args(field.annotation) if hasattr(m, "model_fields")]
        if len(variants) > 1:  # a discriminated union (backend): the key, and every variant's keys
            keys += [name] + sorted({f"{name}.{sub}" for model in variants for sub in model.model_fields})
            continue
        nested = getattr(field.annotation, "model_fields", None)
        keys += [f"{name}.{sub}" for sub in nested] if nested else [name]
    return keys


def test_every_config_key_is_in_the_config_reference():
    text = (DOCS / "configuration.md").read_text()
    reference = text[text.index("<!-- config reference"):]
    missing = [key for key in config_keys() if f"| `{key}` |" not in reference]
    assert not missing, f"the config reference (docs/configuration.md) lacks {missing}"


METRICS = [
    "ray_sandbox_actors_sandboxes",
    "ray_sandbox_actors_created_total",
    "ray_sandbox_actors_reclaimed_total",
    "ray_sandbox_actors_acquire_seconds_bucket",
    "ray_sandbox_actors_exec_seconds_bucket",
]


def test_metric_names_appear_on_the_metrics_endpoint(pool):
    box = pool.acquire("metrics")
    box.exec("true")
    box.bash("true")
    pool.release(box)
    pool.acquire("metrics")
    ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}
    # This pool's gauge: names alone may come from earlier pools of the session.
    active = re.compile(
        r'ray_sandbox_actors_sandboxes\{[^}]*pool="%s"[^}]*state="active"[^}]*\} 1(\.0)?|'
        r'ray_sandbox_actors_sandboxes\{[^}]*state="active"[^}]*pool="%s"[^}]*\} 1(\.0)?'
        % (pool.config.pool_name, pool.config.pool_name)
    )
    deadline = time.monotonic() + 60
    missing = METRICS
    while time.monotonic() < deadline:
        text = "".join(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text for port in ports)
        missing = [name for name in METRICS if name not in text]
        if not missing and active.search(text):
            break
        time.sleep(1)
    assert not missing, f"not exported: {missing}"
    assert active.search(text), "this pool's active-sandboxes gauge never read 1"


def test_readme_names_both_setup_commands():
    text = README.read_text()
    assert "./scripts/bootstrap && .venv/bin/sandbox-actors demo" in text
    assert "./scripts/bootstrap && .venv/bin/python -m pytest" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "./scripts/bootstrap && .venv/bin/python -m pytest" in ci


def test_the_docs_figures_of_the_code_are_the_code_s():
    """Sizes and constants the docs state, computed from the code (figures of runs name their run)."""
    import inspect

    from backends.sandbox_api import SandboxAPI
    from sandbox_actors import spares as fleet

    text = (DOCS / "design.md").read_text()
    stated = int(re.search(r"`pool\.py` is (\d+) lines", text).group(1))
    assert stated == len((README.parent / "sandbox_actors" / "pool.py").read_text().splitlines())
    spawns = re.search(r"at most (\d+) under way in the (\d+) s after", text)
    assert (int(spawns.group(1)), float(spawns.group(2))) == (fleet.WAITER_SPAWNS, fleet.RECYCLE_WINDOW)
    assert re.search(r"none for (\d+) s after one is kept", text).group(1) == f"{fleet.RECYCLE_GAP:g}"
    polls = re.search(r"(\d+) ms polls backing off", text).group(1)
    assert int(polls) == round(inspect.signature(SandboxAPI.wait_ready).parameters["interval"].default * 1000)


def test_the_readme_is_short_and_its_links_lead_somewhere():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\((docs/[\w.-]+\.md)", text):
        assert (README.parent / target).exists(), target
