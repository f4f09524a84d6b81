"""The deer-flow provider on real sandboxes: two processes act as two deer-flow workers on one
pool, taking turns on one conversation (user, thread), as deer-flow's tools call the sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sandbox_actors
from tests.conftest import assert_no_actors_left, containers_of

ROOT = Path(__file__).resolve().parents[1]
WORKER = r"""
import json, sys
from sandbox_actors.integrations.deerflow import RaySandboxProvider

address, config, turn = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
provider = RaySandboxProvider(config, address=address)
sid = provider.acquire("chat-1", user_id="alice")
box = provider.get(sid)
out = {"sid": sid}
if turn == "first":
    out["cwd"] = box.execute_command("cd /mnt/user-data/workspace && echo turn one > notes.txt && pwd")
    out["secret"] = box.execute_command("printf %s \"$TOKEN\" | wc -c", env={"TOKEN": "s3cret"})
    out["failed"] = box.execute_command("echo on stderr >&2; (exit 3)")  # `exit` alone would end the shell
    box.write_file("/mnt/user-data/workspace/src/app.py", "def main():\n    return 'needle'\n")
    box.write_file("/mnt/user-data/workspace/notes.txt", "turn one, more\n", append=True)
    box.update_file("/mnt/user-data/outputs/blob.bin", bytes(range(256)))
    box.write_file("/mnt/user-data/workspace/node_modules/dep.py", "needle = 1\n")
else:
    out["cwd"] = box.execute_command("pwd")  # the persistent shell kept the first worker's cd
    out["notes"] = box.read_file("/mnt/user-data/workspace/notes.txt")
    out["line2"] = box.read_file("/mnt/user-data/workspace/src/app.py", start_line=2, end_line=2)
    out["ls"] = box.list_dir("/mnt/user-data/workspace", max_depth=1)
    out["glob"] = box.glob("/mnt/user-data/workspace", "**/*.py")
    matches, truncated = box.grep("/mnt/user-data/workspace", "NEEDLE")
    out["grep"] = [[m.path, m.line_number, m.line] for m in matches], truncated
    out["grep_literal"] = len(box.grep("/mnt/user-data/workspace", "ne.dle", literal=True)[0])
    out["blob"] = box.download_file("/mnt/user-data/outputs/blob.bin") == bytes(range(256))
    for name, path in (("outside", "/etc/passwd"), ("traversal", "/mnt/user-data/../../etc/passwd")):
        try:
            box.download_file(path)
            out[name] = "allowed"
        except PermissionError:
            out[name] = "refused"
    out["bob"] = provider.acquire("chat-1", user_id="bob")  # same thread, another user
    provider.release(out["bob"])
provider.release(sid)
out["after_release"] = provider.get(sid) is None
print(json.dumps(out))
"""


def _worker(address: str, config: dict, turn: str) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, address, json.dumps(config), turn], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_deerflow_workers_share_a_conversations_sandbox(ray_address, config, docker_client):
    as_json = config.model_dump(mode="json")
    pool = sandbox_actors.connect(config)
    try:
        first = _worker(ray_address, as_json, "first")
        second = _worker(ray_address, as_json, "second")
        assert first["sid"] == second["sid"]  # one sandbox per (user, thread), whichever worker asks
        assert first["cwd"].strip() == second["cwd"].strip() == "/mnt/user-data/workspace"
        assert first["secret"].strip() == "6"  # the secret reached the command, not its text
        assert first["failed"].strip() == "on stderr"  # output whatever the exit code
        assert second["notes"] == "turn one\nturn one, more\n"
        assert second["line2"] == "    return 'needle'\n"
        assert "/mnt/user-data/workspace/src" in second["ls"] and "/mnt/user-data/workspace/notes.txt" in second["ls"]
        assert second["glob"] == [["/mnt/user-data/workspace/src/app.py"], False]  # node_modules skipped
        assert second["grep"] == [[["/mnt/user-data/workspace/src/app.py", 2, "    return 'needle'"]], False]
        assert second["grep_literal"] == 0  # '.' taken literally
        assert second["blob"] is True
        assert (second["outside"], second["traversal"]) == ("refused", "refused")
        assert second["bob"] != second["sid"]
        assert first["after_release"] and second["after_release"]  # released: no longer active
        assert {row["state"] for row in pool.list()} == {"warm"}
    finally:
        pool.shutdown()
    assert_no_actors_left(config.pool_name)
    assert containers_of(docker_client, config.pool_name) == []
