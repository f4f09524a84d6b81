"""README's "Use with deer-flow", as written: `sandbox-actors up` in deer-flow's environment,
then deer-flow with the README's config block, in a machine of its own (a PID namespace: the
head `up` starts is the only Ray cluster there; `down` ends it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from backends.base import LABEL_CLUSTER

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- deer-flow config: tests/deerflow_contract/test_readme_config.py runs this block"

TURN = r"""
import json
from deerflow.sandbox import tools
from deerflow.sandbox.sandbox_provider import get_sandbox_provider
from langchain.tools import ToolRuntime

state = {}
runtime = ToolRuntime(state=state, context={"thread_id": "readme-chat", "user_id": "alice"},
                      config={"configurable": {"thread_id": "readme-chat"}}, stream_writer=lambda _: None,
                      tools=[], tool_call_id="call-1", store=None)
said = tools.bash_tool.func(runtime, "hello", "echo hello > /mnt/user-data/outputs/hello.txt; ls /mnt/skills/public")
provider = get_sandbox_provider()
from sandbox_actors import raycalls
print(json.dumps({"said": said, "pool": provider.pool.config.pool_name, "sandboxes": provider.pool.list(),
                  "cluster": raycalls.session_name()}))
"""

SCRIPT = r"""
set -e
"$BIN/sandbox-actors" up --json > "$OUT/up.json"
"$BIN/python" -c "$TURN" > "$OUT/turn.json"
"$BIN/python" -c 'import sandbox_actors; sandbox_actors.connect(pool_name="deerflow").shutdown()'
"$BIN/sandbox-actors" down --json > "$OUT/down.json"
"""


def readme_block() -> dict:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(MARK):]
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", after, re.S).group(1))


def test_the_readme_s_deer_flow_config_works_after_sandbox_actors_up(tmp_path, docker_client, image):
    block = readme_block()
    assert block["sandbox"]["use"] == "sandbox_actors.integrations.deerflow:RaySandboxProvider"
    skills = tmp_path / "skills" / "public" / "demo"
    skills.mkdir(parents=True)
    (skills / "SKILL.md").write_text("---\nname: demo\ndescription: a demo skill\n---\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**block, "skills": {"path": str(tmp_path / "skills")}}))
    out = tmp_path / "out"
    out.mkdir()
    left: list = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DEER_FLOW_"))}
    env.update(BIN=str(Path(sys.executable).parent), TURN=TURN, OUT=str(out), DEER_FLOW_CONFIG_PATH=str(config),
               DEER_FLOW_HOME=str(tmp_path / "deer-flow-home"), SANDBOX_ACTORS_HOME=str(tmp_path / "home"),
               SANDBOX_ACTORS_RAY_TEMP=f"/tmp/sa-rd-{os.getpid()}")
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", SCRIPT], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600, check=False)
    finally:
        shutil.rmtree(env["SANDBOX_ACTORS_RAY_TEMP"], ignore_errors=True)
        turned = out / "turn.json"
        if turned.exists() and turned.stat().st_size:
            # What a script stopped half way left, of this test's cluster only (never a user's pool).
            cluster = json.loads(turned.read_text())["cluster"]
            left = docker_client.containers.list(all=True, filters={"label": f"{LABEL_CLUSTER}={cluster}"})
            for container in left:
                container.remove(force=True)
    assert done.returncode == 0, done.stderr[-4000:]
    up, turn, down = (json.loads((out / f"{name}.json").read_text()) for name in ("up", "turn", "down"))
    assert left == []
    assert up["pool"] == "sandbox-pool" and turn["pool"] == "deerflow"  # the two pools side by side
    assert turn["said"] == "demo\n"
    outputs = tmp_path / "deer-flow-home" / "users" / "alice" / "threads" / "readme-chat" / "user-data" / "outputs"
    assert (outputs / "hello.txt").read_text() == "hello\n"  # deer-flow's own outputs directory
    assert [row["state"] for row in turn["sandboxes"]] == ["active"]
    assert down["ray_head_stopped"] is True
