"""deer-flow's own code against our provider: fixtures of the contract tier.

This tier runs in ``.venv-deerflow`` (Python 3.12+, deer-flow installed from its source; made by
``scripts/bootstrap``), started by ``tests/test_deerflow_contract.py``; the main suite never
collects it. It reuses ``tests/conftest.py`` (a real Docker engine, our image, a local Ray of this
Python, a pool name of each test's own with its leftovers checked).

Each test gets a deer-flow of its own: a ``config.yaml`` naming our provider (``sandbox.use``)
with our keys under ``sandbox.sandbox_actors``, a deer-flow home (``DEER_FLOW_HOME``) with a
skills directory, and deer-flow's singletons reset before and after.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

DEERFLOW_SRC = Path(os.environ.get("DEERFLOW_SRC") or (Path(sys.prefix) / "DEERFLOW_SRC").read_text().strip())
BACKEND = DEERFLOW_SRC / "backend"
sys.path += [str(BACKEND), str(BACKEND / "tests")]  # deer-flow's gateway app and its test helpers (after ours)


def pool_keys(config: Any) -> dict[str, Any]:
    """Our keys of a test's pool config (tests/conftest.py's ``config``), as a deer-flow user
    writes them under ``sandbox.sandbox_actors``."""
    keys = ("image", "pool_name", "namespace", "container_prefix", "readiness_timeout", "idle_check_interval",
            "reconcile_interval", "capacity_timeout", "spare_actors_max")
    return {**{k: getattr(config, k) for k in keys}, "limits": config.limits.model_dump()}


def reset_deerflow() -> None:
    """Forget deer-flow's process-wide provider, paths and config (the next use reads them anew)."""
    from deerflow.config import paths
    from deerflow.sandbox.sandbox_provider import reset_sandbox_provider
    from deerflow.skills.storage import reset_skill_storage

    reset_sandbox_provider()
    reset_skill_storage()
    paths._paths = None


@pytest.fixture
def deerflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: Any, ray_address: str) -> Iterator[Any]:
    """A deer-flow set up to use our provider; yields a helper that writes its config.yaml."""
    home = tmp_path / "deer-flow-home"
    skills = tmp_path / "skills" / "public" / "demo"
    skills.mkdir(parents=True)
    (skills / "SKILL.md").write_text("---\nname: demo\ndescription: a demo skill\n---\n# Demo\n")
    monkeypatch.setenv("DEER_FLOW_HOME", str(home))
    monkeypatch.setenv("DEER_FLOW_CONFIG_PATH", str(tmp_path / "config.yaml"))
    setup = DeerFlow(tmp_path, home, pool_keys(config), ray_address)
    setup.write()
    reset_deerflow()
    try:
        yield setup
    finally:
        setup.shutdown_pool()
        reset_deerflow()


class DeerFlow:
    """One test's deer-flow: where its files are, and its config."""

    def __init__(self, root: Path, home: Path, ours: dict[str, Any], ray_address: str) -> None:
        self.root, self.home, self.ours, self.ray_address = root, home, ours, ray_address

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def write(self, **sandbox: Any) -> None:
        """config.yaml with ``sandbox.use`` ours, our keys under ``sandbox_actors`` (``sandbox``
        adds or replaces keys of the ``sandbox:`` section)."""
        section = {"use": "sandbox_actors.integrations.deerflow:RaySandboxProvider",
                   "sandbox_actors": {**self.ours, "ray_address": self.ray_address}, **sandbox}
        document = {"sandbox": section, "skills": {"path": str(self.root / "skills")}}
        self.config_path.write_text(yaml.safe_dump(document))

    def paths(self) -> Any:
        from deerflow.config.paths import get_paths

        return get_paths()

    def shutdown_pool(self) -> None:
        """End the test's pool, if it runs on the test's cluster (deer-flow's shutdown leaves the
        shared pool running, by design)."""
        import ray

        import sandbox_actors

        try:
            ray.get_actor(self.ours["pool_name"], namespace=self.ours["namespace"])
        except ValueError:
            return  # none was made here
        sandbox_actors.connect(pool_name=self.ours["pool_name"], namespace=self.ours["namespace"]).shutdown()


def tool_runtime(thread_id: str, user_id: str, state: dict[str, Any] | None = None) -> Any:
    """A ToolRuntime as deer-flow's agent gives its tools one: the thread and the user in the
    context, the graph state (where the sandbox's id is kept between tool calls)."""
    from langchain.tools import ToolRuntime

    return ToolRuntime(state=state if state is not None else {}, context={"thread_id": thread_id, "user_id": user_id},
                       config={"configurable": {"thread_id": thread_id}}, stream_writer=lambda _: None, tools=[],
                       tool_call_id="call-1", store=None)
