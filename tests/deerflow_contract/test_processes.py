"""deer-flow's processes on one cluster: two gateway processes take turns on one conversation,
and with no Ray address anywhere, every process finds the same cluster (the first one starts it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import containers_of

ROOT = Path(__file__).resolve().parents[2]

# One gateway process's turn, through deer-flow's own loader and tools.
TURN = r"""
import json, sys
import ray
from deerflow.sandbox import tools
from deerflow.sandbox.sandbox_provider import get_sandbox_provider
from langchain.tools import ToolRuntime

def runtime(state):
    return ToolRuntime(state=state, context={"thread_id": "chat-1", "user_id": "alice"},
                       config={"configurable": {"thread_id": "chat-1"}}, stream_writer=lambda _: None,
                       tools=[], tool_call_id="call-1", store=None)

turn, state = sys.argv[1], json.loads(sys.argv[2])
out = {}
if turn == "first":
    out["said"] = tools.bash_tool.func(runtime(state), "start", "echo turn one > notes.txt; export TOPIC=ray; pwd")
else:
    out["said"] = tools.bash_tool.func(runtime(state), "go on", "cat notes.txt; echo $TOPIC")
out["state"] = state
out["gcs"] = ray.get_runtime_context().gcs_address
get_sandbox_provider().release(state["sandbox"]["sandbox_id"])
print(json.dumps(out))
"""


def _turn(turn: str, state: dict, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", TURN, turn, json.dumps(state)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_gateway_processes_take_turns_on_one_conversation(deerflow, docker_client, config):
    first = _turn("first", {})
    state = first["state"]  # deer-flow keeps the sandbox id in the conversation's graph state
    second = _turn("second", state)
    assert first["said"] == "/mnt/user-data/workspace\n"
    assert second["said"] == "turn one\nray\n"  # its files and its shell, whichever process serves
    assert second["state"]["sandbox"] == first["state"]["sandbox"]
    assert first["gcs"] == second["gcs"] == deerflow.ray_address
    assert len(containers_of(docker_client, config.pool_name)) == 1


# With no address given, two deer-flow processes in a machine of their own (a PID namespace: no
# other Ray cluster is visible there) find one cluster: the first starts a head that outlives it.
ALONE = r"""
set -e
run() { "$PYTHON" -c "$TURN" "$@"; }
run first '{}' > "$OUT/first.json"
run second "$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["state"]))' "$OUT/first.json")" \
  > "$OUT/second.json"
"$PYTHON" -c '
import json, sys, ray, sandbox_actors, sandbox_actors.localray as lr
lr.attach(None, fallback="error")
sandbox_actors.connect(pool_name=sys.argv[1], namespace=sys.argv[2]).shutdown()
ray.shutdown()
print(json.dumps({"head": lr.our_head()["address"], "stopped": lr.stop_head()}))
' "$POOL" "$NAMESPACE" > "$OUT/down.json"
"""


def test_processes_with_no_address_share_the_cluster_the_first_one_started(deerflow, tmp_path, docker_client,
                                                                            config):
    deerflow.ours.pop("ray_address", None)
    deerflow.write(sandbox_actors=dict(deerflow.ours))  # no ray_address anywhere
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHON=sys.executable, TURN=TURN, OUT=str(out), POOL=config.pool_name, NAMESPACE=config.namespace,
               SANDBOX_ACTORS_HOME=str(tmp_path / "home"), SANDBOX_ACTORS_RAY_TEMP=f"/tmp/sa-df-{os.getpid()}")
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", ALONE], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
    finally:
        shutil.rmtree(env["SANDBOX_ACTORS_RAY_TEMP"], ignore_errors=True)
    assert done.returncode == 0, done.stderr[-4000:]
    first, second = (json.loads((out / f"{name}.json").read_text()) for name in ("first", "second"))
    down = json.loads((out / "down.json").read_text())
    assert first["gcs"] == second["gcs"] == down["head"]  # one cluster: the head the first process started
    assert second["said"] == "turn one\nray\n"
    assert down["stopped"] > 0
    assert containers_of(docker_client, config.pool_name) == []
