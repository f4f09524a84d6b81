"""Tests for the in-container sandbox HTTP server (sandbox_actors/image/server.py).

The server runs as a subprocess on the host, bound to a free loopback port, with a token
and a temporary home directory. Nothing here needs Docker or Ray.
"""

import ast
import asyncio
import contextlib
import base64
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

SERVER = Path(__file__).resolve().parents[1] / "sandbox_actors" / "image" / "server.py"
TOKEN = "tok-" + uuid.uuid4().hex
# The interpreter that runs the server; set e.g. to "/usr/bin/python3 -I -S" to check that the
# server works on a bare system Python with the standard library only (as in the image).
SERVER_PYTHON = shlex.split(os.environ.get("SANDBOX_SERVER_PYTHON", "")) or [sys.executable]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, home, log_path, extra_env=None):
        self.port = _free_port()
        self.home = home
        env = dict(os.environ)
        env.update({"SANDBOX_PORT": str(self.port), "SANDBOX_BIND": "127.0.0.1",
                    "SANDBOX_TOKEN": TOKEN, "SANDBOX_HOME": str(home)})
        env.update(extra_env or {})
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([*SERVER_PYTHON, str(SERVER)], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        socket_path = (extra_env or {}).get("SANDBOX_SOCKET")  # then it serves there, not on TCP
        self.client = httpx.Client(base_url="http://sandbox" if socket_path else self.url, timeout=60,
                                   headers={"Authorization": f"Bearer {TOKEN}"},
                                   transport=httpx.HTTPTransport(uds=socket_path) if socket_path else None)
        self._wait_ready()

    def _wait_ready(self):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early: {self.read_log()}")
            try:
                if self.client.get("/v1/sandbox").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready: {self.read_log()}")

    def read_log(self):
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def post(self, path, body, **kw):
        return self.client.post(path, json=body, **kw)

    def shell(self, command, **fields):
        r = self.post("/v1/shell/exec", {"command": command, **fields})
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def bash(self, command, **fields):
        r = self.post("/v1/bash/exec", {"command": command, **fields})
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def stop(self):
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("sandbox")
    srv = RunningServer(base / "home", base / "server.log")
    try:
        yield srv
    finally:
        srv.stop()


def _alive(pid):
    """True if pid exists and is not a zombie (the test host's init may reap slowly)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# --------------------------------------------------------------------------- pure helpers

def _load_module():
    spec = importlib.util.spec_from_file_location("sandbox_server_under_test", SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bounded_buffer_keeps_head_and_tail():
    mod = _load_module()
    buf = mod.BoundedBuffer(100)
    for i in range(1000):
        buf.feed(b"%04d" % i)
    text = buf.text()
    assert text.startswith("0000000100020003")
    assert text.endswith("0999")
    assert "...[truncated 3900 bytes]..." in text
    assert buf.tail_len == 50 and len(buf.head) == 50
    small = mod.BoundedBuffer(100)
    small.feed(b"abc")
    assert small.text() == "abc"


def test_middle_truncate_and_quote():
    mod = _load_module()
    assert mod.middle_truncate("abcdef", 0) == "abcdef"
    assert mod.middle_truncate("abcdefghij", 4) == "ab\n...[truncated 6 chars]...\nij"
    quoted = mod.bash_quote("a'b\n\\ é")
    assert "\n" not in quoted and quoted.startswith("$'")
    out = subprocess.run(["bash", "-c", "printf %s " + quoted], capture_output=True).stdout
    assert out == "a'b\n\\ é".encode()


def test_server_uses_only_stdlib():
    """The container has Debian's python3 without pip packages."""
    names = set()
    for node in ast.walk(ast.parse(SERVER.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0])
    assert names and not [n for n in names if n not in sys.stdlib_module_names]


# --------------------------------------------------------------------------- info and auth

def test_readiness_parses_as_sandbox_response(server):
    from agent_sandbox.types import SandboxResponse

    r = server.client.get("/v1/sandbox")
    assert r.status_code == 200
    info = SandboxResponse.model_validate(r.json())
    assert info.success is True
    assert info.home_dir == str(server.home)
    assert info.version == "sandbox-actors-minimal/1"
    assert info.detail.system.os == "linux"
    assert server.client.get("/health").json() == {"success": True, "message": "ok",
                                                   "data": {"status": "ok"}}


def test_token_required(server):
    with httpx.Client(base_url=server.url) as anon:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = anon.get("/v1/sandbox", headers=headers)
            assert r.status_code == 401
            assert r.json() == {"success": False, "message": "missing or invalid sandbox token",
                                "data": None}
        assert anon.post("/v1/shell/exec", json={"command": "echo x"}).status_code == 401
        assert anon.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_errors_are_envelopes(server):
    r = server.client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["success"] is False
    r = server.client.post("/v1/shell/exec", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["success"] is False
    r = server.post("/v1/shell/exec", {"cmd": "echo x"})
    assert r.status_code == 422 and "command" in r.json()["message"]
    r = server.post("/v1/shell/exec", {"command": ["echo"]})
    assert r.status_code == 422 and "command" in r.json()["message"]
    r = server.post("/v1/shell/exec", {"command": "echo x", "hard_timeout": "soon"})
    assert r.status_code == 422 and "hard_timeout" in r.json()["message"]
    # Explicit nulls (as the SDK sends them) count as absent; unknown fields are ignored.
    r = server.post("/v1/shell/exec", {"command": "echo x", "id": None, "hard_timeout": None,
                                       "whatever": 1})
    assert r.status_code == 200 and r.json()["data"]["session_id"] == "default"


# --------------------------------------------------------------------------- shell sessions

def test_shell_echo_and_exit_code(server):
    data = server.shell("echo hello", id="basic")
    assert data["status"] == "completed"
    assert data["output"] == "hello\n"
    assert data["exit_code"] == 0
    assert data["session_id"] == "basic"
    assert data["console"] == [{"ps1": "$ ", "command": "echo hello", "output": "hello\n"}]
    data = server.shell("echo oops; exit_status() { return 7; }; exit_status", id="basic")
    assert data["exit_code"] == 7 and data["output"] == "oops\n"


def test_shell_state_persists_and_stderr_merged(server, tmp_path):
    server.shell(f"cd {tmp_path}; export MY_VAR=persisted; greet() {{ echo hi $1; }}", id="state")
    data = server.shell("pwd; echo $MY_VAR; greet bob; echo to-stderr >&2", id="state")
    assert data["output"] == f"{tmp_path}\npersisted\nhi bob\nto-stderr\n"
    assert server.shell("echo ${MY_VAR:-unset}", id="other")["output"] == "unset\n"


def test_shell_tricky_commands(server, tmp_path):
    sid = "tricky"
    assert server.shell("echo a # trailing comment", id=sid)["output"] == "a\n"
    data = server.shell("echo 'unbalanced", id=sid)
    assert data["status"] == "completed" and data["exit_code"] != 0
    assert server.shell("if true; then echo fine; fi", id=sid)["output"] == "fine\n"
    assert server.shell("cat <<EOF\nheredoc\nEOF", id=sid)["output"] == "heredoc\n"
    # stdin is /dev/null, so `cat` returns at once
    assert server.shell("cat; printf no-newline", id=sid)["output"] == "no-newline"
    data = server.shell("pwd", id=sid, exec_dir=str(tmp_path))
    assert data["output"] == f"{tmp_path}\n"
    r = server.post("/v1/shell/exec", {"command": "pwd", "id": sid, "exec_dir": "/no/such/dir"})
    assert r.status_code == 400 and r.json()["success"] is False
    data = server.shell("exit 3", id=sid)
    assert data["exit_code"] == 3
    assert server.shell("echo back", id=sid)["output"] == "back\n"


def test_sandbox_env_vars_hidden_from_commands(server):
    out = server.shell("env")["output"] + server.bash("env")["stdout"]
    assert TOKEN not in out
    assert "SANDBOX_TOKEN" not in out and "SANDBOX_PORT" not in out


def test_shell_sessions_run_in_parallel(server):
    results = {}

    def run(sid):
        results[sid] = server.shell("sleep 1; echo done", id=sid)

    threads = [threading.Thread(target=run, args=(sid,)) for sid in ("par-a", "par-b")]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert all(r["output"] == "done\n" for r in results.values())
    assert elapsed < 1.9, elapsed


def test_one_session_is_serialized(server):
    results = {}

    def run(tag):
        cmd = f"for i in $(seq 1 300); do echo {tag}$i; done; sleep 0.2; echo {tag}-end"
        results[tag] = server.shell(cmd, id="serial")["output"]

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tag in ("A", "B"):
        expected = "".join(f"{tag}{i}\n" for i in range(1, 301)) + f"{tag}-end\n"
        assert results[tag] == expected


def test_shell_hard_timeout_keeps_session(server):
    server.shell("export KEEP=me", id="timeout")
    start = time.monotonic()
    data = server.shell("echo before; sleep 30", id="timeout", hard_timeout=1)
    assert time.monotonic() - start < 4
    assert data["status"] == "hard_timeout"
    assert data["exit_code"] in (None, 137)
    assert data["output"].startswith("before\n")
    data = server.shell("echo ok $KEEP", id="timeout")
    assert data["status"] == "completed" and data["output"].endswith("ok me\n")


def test_shell_builtin_loop_replaces_session(server):
    start = time.monotonic()
    data = server.shell("while :; do :; done", id="loop", hard_timeout=1)
    assert time.monotonic() - start < 5
    assert data["status"] == "hard_timeout"
    data = server.shell("echo ok", id="loop")
    assert data == {**data, "status": "completed", "output": "ok\n", "exit_code": 0}


def test_shell_no_change_timeout(server):
    start = time.monotonic()
    data = server.shell("echo tick; sleep 30", id="idle", no_change_timeout=1)
    assert time.monotonic() - start < 4
    assert data["status"] == "no_change_timeout"
    assert server.shell("echo ok", id="idle")["output"] == "ok\n"


# --------------------------------------------------------------------------- bash -c

def test_bash_exec_env_streams_and_exit_code(server):
    data = server.bash("echo out $SECRET_X; echo err >&2; exit 5", env={"SECRET_X": "v4lue"})
    assert data["stdout"] == "out v4lue\n"
    assert data["stderr"] == "err\n"
    assert data["exit_code"] == 5 and data["status"] == "completed"
    assert data["offset"] == len(data["stdout"]) and data["stderr_offset"] == 4
    assert len(data["command_id"]) == 32 and data["session_id"]
    assert server.bash("echo ${SECRET_X:-unset}")["stdout"] == "unset\n"
    assert server.shell("echo ${SECRET_X:-unset}")["output"] == "unset\n"
    assert server.bash("echo $HOME", env={"HOME": None})["stdout"] == "\n"
    assert server.bash("pwd")["stdout"] == f"{server.home}\n"
    assert server.bash("kill -9 $$")["exit_code"] == 137


def test_bash_exec_invalid_env_name(server):
    secret = "do-not-echo-" + uuid.uuid4().hex
    r = server.post("/v1/bash/exec", {"command": "true", "env": {"BAD-NAME": secret}})
    assert r.status_code == 422
    assert "BAD-NAME" in r.json()["message"]
    assert secret not in r.text
    assert secret not in server.read_log()
    r = server.post("/v1/bash/exec", {"command": "true", "env": {"OK": 5}})
    assert r.status_code == 422


def test_bash_exec_timeout_and_max_output_length(server):
    start = time.monotonic()
    data = server.bash("echo partial; sleep 30", hard_timeout=1)
    assert time.monotonic() - start < 4
    assert data["status"] == "timed_out" and data["exit_code"] in (None, -9)
    assert data["stdout"] == "partial\n"
    data = server.bash("seq 1 100000", max_output_length=100)
    assert data["stdout"].startswith("1\n2\n") and data["stdout"].endswith("100000\n")
    assert "...[truncated" in data["stdout"]


def test_huge_output_is_bounded(server):
    cmd = "head -c 50000000 /dev/zero | tr '\\0' a"
    r = server.post("/v1/bash/exec", {"command": cmd})
    assert r.status_code == 200
    assert len(r.content) < 10_000_000
    data = r.json()["data"]
    assert data["exit_code"] == 0 and "...[truncated " in data["stdout"]
    data = server.shell(cmd, id="huge")
    assert data["exit_code"] == 0 and "...[truncated " in data["output"]
    assert len(data["output"]) < 31000
    assert server.shell("echo ok", id="huge")["output"] == "ok\n"


def test_non_utf8_output(server):
    assert server.shell("printf '\\xff\\xfe'")["output"] == "\ufffd\ufffd"
    data = server.bash("printf 'a\\xffb'; printf '\\xfe' >&2")
    assert data["stdout"] == "a\ufffdb" and data["stderr"] == "\ufffd"


# --------------------------------------------------------------------------- files

def test_file_write_read_text(server):
    path = str(server.home / "dir" / "sub" / "a.txt")
    r = server.post("/v1/file/write", {"file": path, "content": "l0\nl1\nl2\n"})
    assert r.json()["data"] == {"file": path, "bytes_written": 9}
    assert server.post("/v1/file/read", {"file": path}).json()["data"] == {
        "content": "l0\nl1\nl2\n", "file": path}
    data = server.post("/v1/file/read", {"file": "dir/sub/a.txt", "start_line": 1,
                                         "end_line": 2}).json()["data"]
    assert data == {"content": "l1\n", "file": path}
    server.post("/v1/file/write", {"file": path, "content": "tail", "append": True,
                                   "leading_newline": True})
    content = server.post("/v1/file/read", {"file": path}).json()["data"]["content"]
    assert content.endswith("l2\n\ntail")


def test_file_binary_roundtrip_and_download(server):
    payload = bytes(range(256))
    path = str(server.home / "bin" / "all.bytes")
    r = server.post("/v1/file/write", {"file": path, "encoding": "base64",
                                       "content": base64.b64encode(payload).decode()})
    assert r.json()["data"]["bytes_written"] == 256
    r = server.client.get("/v1/file/download", params={"path": path})
    assert r.status_code == 200
    assert r.content == payload
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == 'attachment; filename="all.bytes"'
    download = server.client.get
    assert download("/v1/file/download", params={"path": path + ".nope"}).status_code == 404
    assert download("/v1/file/download", params={"path": str(server.home)}).status_code == 400
    r = server.post("/v1/file/write", {"file": path, "encoding": "base64", "content": "!!notb64"})
    assert r.status_code == 422


def test_file_errors(server):
    r = server.post("/v1/file/read", {"file": str(server.home / "missing.txt")})
    assert r.status_code == 404 and r.json()["message"].startswith("File not found")
    r = server.post("/v1/file/read", {"file": str(server.home)})
    assert r.status_code == 400 and r.json()["success"] is False
    r = server.post("/v1/file/write", {"file": str(server.home), "content": "x"})
    assert r.status_code == 400
    r = server.post("/v1/file/list", {"path": str(server.home / "missing")})
    assert r.status_code == 404


def test_file_list(server):
    root = server.home / "listing"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bb")
    (root / "a.py").write_text("a")
    (root / ".hidden").write_text("h")
    (root / "sub" / "c.txt").write_text("ccc")
    data = server.post("/v1/file/list", {"path": str(root)}).json()["data"]
    assert [f["name"] for f in data["files"]] == ["a.py", "b.txt", "sub"]
    assert (data["total_count"], data["directory_count"], data["file_count"]) == (3, 1, 2)
    by_name = {f["name"]: f for f in data["files"]}
    assert by_name["sub"]["is_directory"] and not by_name["b.txt"]["is_directory"]
    assert by_name["b.txt"]["size"] == 2 and by_name["b.txt"]["extension"] == ".txt"
    assert by_name["b.txt"]["path"] == str(root / "b.txt")
    assert len(by_name["b.txt"]["permissions"]) == 9 and "T" in by_name["b.txt"]["modified_time"]
    data = server.post("/v1/file/list", {"path": str(root), "recursive": True,
                                         "show_hidden": True, "sort_by": "size",
                                         "sort_desc": True}).json()["data"]
    names = [f["name"] for f in data["files"]]
    assert set(names) == {"a.py", "b.txt", ".hidden", "sub", "c.txt"}
    assert names.index("c.txt") < names.index("b.txt") < names.index("a.py")
    r = server.post("/v1/file/list", {"path": str(root / "b.txt")})
    assert r.status_code == 400


# --------------------------------------------------------------------------- SDK contract

def test_agent_sandbox_sdk_contract(server):
    from agent_sandbox import Sandbox
    from agent_sandbox.errors import UnprocessableEntityError

    sdk = Sandbox(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"})
    result = sdk.shell.exec_command(command="echo sdk; echo err >&2")
    assert result.success and result.data.output == "sdk\nerr\n" and result.data.exit_code == 0
    assert result.data.status == "completed" and result.data.console[0].ps_1 == "$ "
    path = str(server.home / "sdk" / "f.txt")
    written = sdk.file.write_file(file=path, content="from sdk")
    assert written.success and written.data.bytes_written == 8
    read = sdk.file.read_file(file=path)
    assert read.data.content == "from sdk" and read.data.file == path
    listing = sdk.file.list_path(path=str(server.home / "sdk"))
    assert [f.name for f in listing.data.files] == ["f.txt"]
    context = sdk.sandbox.get_context()
    assert context.home_dir == str(server.home) and context.detail.system.os == "linux"
    assert b"".join(sdk.file.download_file(path=path)) == b"from sdk"
    bash = sdk.bash.exec(command="echo $V", env={"V": "1"})
    assert bash.data.stdout == "1\n" and bash.data.exit_code == 0
    # Our 422 envelope must still parse as the SDK's HttpValidationError.
    with pytest.raises(UnprocessableEntityError):
        sdk.bash.exec(command="true", env={"not-valid": "x"})
    # Background commands: async_mode, then view, wait and kill, as the SDK calls them.
    started = sdk.shell.exec_command(command="echo bg; sleep 0.3; exit 4", async_mode=True)
    assert started.data.status == "running"
    waited = sdk.shell.wait_for_process(id=started.data.session_id, seconds=10)
    assert waited.data.status == "completed"
    viewed = sdk.shell.view(id=started.data.session_id)
    assert (viewed.data.output, viewed.data.status, viewed.data.exit_code) == ("bg\n", "completed", 4)
    long = sdk.shell.exec_command(command="sleep 300", async_mode=True).data.session_id
    killed = sdk.shell.kill_process(id=long)
    assert killed.data.status == "terminated"


# --------------------------------------------------------------------------- shutdown

def test_sigterm_exits_promptly_and_kills_children(tmp_path):
    srv = RunningServer(tmp_path / "home", tmp_path / "server.log")
    try:
        session_bg = int(srv.shell("sleep 300 & echo $!", id="s")["output"])
        exec_bg = int(srv.bash("sleep 300 >/dev/null 2>&1 & echo $!")["stdout"])
        pid_file = tmp_path / "running.pid"

        def run_until_killed():
            try:   # the server may answer (process killed) or drop the connection
                srv.post("/v1/bash/exec", {"command": f"echo $$ > {pid_file}; exec sleep 300"})
            except httpx.HTTPError:
                pass

        running = threading.Thread(target=run_until_killed, daemon=True)
        running.start()
        deadline = time.monotonic() + 5
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        exec_fg = int(pid_file.read_text())
        pids = [session_bg, exec_bg, exec_fg]
        assert all(_alive(pid) for pid in pids)

        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=2)
        assert time.monotonic() - start < 2
        deadline = time.monotonic() + 1
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if _alive(pid)]
        running.join(5)
    finally:
        srv.stop()


# ── streaming, hang-ups, background commands, chunked files ────────────────

def _api(server):
    from backends.sandbox_api import SandboxAPI

    return SandboxAPI(server.url, TOKEN)


def test_shell_output_streams_as_events_before_the_command_ends(server, tmp_path):
    marker = tmp_path / "reached"

    async def body():
        api = _api(server)
        items, seen_before_end = [], None
        async for item in api.stream(f"echo one; sleep 1; touch {marker}; echo two"):
            if seen_before_end is None:
                seen_before_end = not marker.exists()
            items.append(item)
        await api.aclose()
        return items, seen_before_end

    items, seen_before_end = asyncio.run(body())
    assert seen_before_end is True
    assert "".join(i for i in items if isinstance(i, str)) == "one\ntwo\n"
    assert items[-1].exit_code == 0 and items[-1].status == "completed"


def test_a_client_hang_up_kills_its_command_and_the_session_lives_on(server):
    tag = uuid.uuid4().hex[:8]

    def pids(pattern):
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        return [int(p) for p in out]

    async def hang_up_during(path, command, pattern):
        api = _api(server)
        task = asyncio.create_task(api._call("POST", path, json={"command": command}, timeout=60))
        deadline = time.monotonic() + 10
        while not pids(pattern) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert pids(pattern), "the command never started"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.aclose()

    for path, n in (("/v1/shell/exec", 401), ("/v1/bash/exec", 402)):
        pattern = f"sleep {n}.{tag}"
        asyncio.run(hang_up_during(path, f"bash -c \"exec -a '{pattern}' sleep 300\"", pattern))
        deadline = time.monotonic() + 5
        while pids(pattern) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pids(pattern), f"{path}: the command outlived its client"
    assert server.shell("echo alive")["output"] == "alive\n"


def test_background_commands_over_http(server):
    started = server.shell("echo a; sleep 0.5; echo b; exit 2", async_mode=True)
    assert started["status"] == "running"
    job = started["session_id"]
    waited = server.post("/v1/shell/wait", {"id": job, "seconds": 10}).json()["data"]
    assert waited == {"status": "completed", "exit_code": 2}
    view = server.post("/v1/shell/view", {"id": job}).json()["data"]
    assert view["output"] == "a\nb\n" and view["next_offset"] == 4
    assert server.post("/v1/shell/view", {"id": job, "offset": 2}).json()["data"]["output"] == "b\n"
    long = server.shell("sleep 300", async_mode=True, id="long-one")["session_id"]
    assert long == "long-one"
    assert server.post("/v1/shell/exec", {"command": "true", "id": long, "async_mode": True}).status_code == 400
    killed = server.post("/v1/shell/kill", {"id": long}).json()["data"]
    assert killed["status"] == "terminated"
    assert server.post("/v1/shell/view", {"id": "nope"}).status_code == 404


def test_files_move_in_chunks_and_appear_whole(server):
    path = str(server.home / "chunked.bin")
    data = os.urandom(3 * 1024 * 1024 + 17)

    async def body():
        api = _api(server)
        offset = 0
        for start in range(0, len(data), 1024 * 1024):
            offset = await api.upload_chunk(path, offset, data[start:start + 1024 * 1024], False)
            assert not os.path.exists(path)  # not there until whole
        assert await api.upload_chunk(path, offset, b"", True) == len(data)
        with pytest.raises(Exception, match="not 5"):
            await api.upload_chunk(path + ".x", 5, b"late", False)  # no upload under way at 5
        got, total = b"", None
        while total is None or len(got) < total:
            chunk, total = await api.download_chunk(path, len(got), 1000_000)
            got += chunk
        await api.aclose()
        return got

    assert asyncio.run(body()) == data


def test_sigusr1_lets_go_of_every_socket_and_sigusr2_listens_again(tmp_path):
    """Before a live checkpoint the server must hold no host socket (gVisor cannot save one):
    SIGUSR1 closes its listening socket (the file goes) and every open connection; a shell's
    state and a background process live on; SIGUSR2 listens again on the same path."""
    socket_path = tmp_path / "api" / "api.sock"
    socket_path.parent.mkdir()
    srv = RunningServer(tmp_path / "home", tmp_path / "server.log", {"SANDBOX_SOCKET": str(socket_path)})
    try:
        srv.shell("export KEPT=yes; cd /tmp")
        held = socket.socket(socket.AF_UNIX)
        held.connect(str(socket_path))  # a kept-alive connection of a client
        srv.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not socket_path.exists()
        held.settimeout(5)
        try:
            ended = held.recv(1)
        except ConnectionResetError:
            ended = b""  # closed by the server: as a reset rather than an EOF, at times
        assert ended == b""  # the server closed it
        held.close()
        assert not [link for link in Path(f"/proc/{srv.proc.pid}/fd").iterdir()
                    if os.readlink(link).startswith("socket:")], "a socket is still open"
        srv.proc.send_signal(signal.SIGUSR2)
        srv._wait_ready()
        assert srv.shell("echo $KEPT $PWD")["output"].strip() == "yes /tmp"
        assert "quiet: no listening socket" in srv.read_log() and "listening again" in srv.read_log()
    finally:
        srv.stop()


def test_a_live_fork_takes_its_own_token_when_the_host_says_listen(tmp_path):
    """A fork restored from another sandbox's checkpoint holds that one's token in memory; the
    host leaves the fork's own token's hash beside the socket, then the word to listen again (a
    file: no signal), and from then on only the new token is let in (both files used up). A word
    left from before the server went quiet does not wake it."""
    import hashlib

    socket_path = tmp_path / "api" / "api.sock"
    socket_path.parent.mkdir()
    srv = RunningServer(tmp_path / "home", tmp_path / "server.log", {"SANDBOX_SOCKET": str(socket_path)})
    try:
        (socket_path.parent / ".listen").touch()  # stale: from before the quiet
        srv.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # thirty looks for the word
        assert not socket_path.exists() and not (socket_path.parent / ".listen").exists()
        new = "fork-token-" + "x" * 20
        (socket_path.parent / ".token-sha256").write_text(hashlib.sha256(new.encode()).hexdigest() + "\n")
        (socket_path.parent / ".listen").touch()
        deadline = time.monotonic() + 5
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        transport = httpx.HTTPTransport(uds=str(socket_path))
        with httpx.Client(base_url="http://sandbox", transport=transport, timeout=10) as client:
            assert client.get("/v1/sandbox", headers={"Authorization": f"Bearer {new}"}).status_code == 200
            assert client.get("/v1/sandbox", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
        assert not (socket_path.parent / ".token-sha256").exists() and not (socket_path.parent / ".listen").exists()
    finally:
        srv.stop()


# A process that holds ~80 MB resident for a while and burns ~0.4 s of CPU.
HOG = ("python3 -c \"import time; held = bytearray(80 * 2**20); held[::4096] = b'x' * len(held[::4096]); "
       "end = time.process_time() + 0.4\nwhile time.process_time() < end: pass\ntime.sleep(0.2)\"")


def test_each_command_result_carries_its_cpu_seconds_and_peak_memory(server):
    shell = server.shell(HOG)
    assert shell["exit_code"] == 0
    assert 0.35 <= shell["cpu_seconds"] < 2.0, shell
    assert 80 * 2**20 <= shell["peak_memory_bytes"] < 400 * 2**20, shell
    quick = server.shell("true")  # the session's earlier command is not counted again
    assert quick["cpu_seconds"] < 0.1 and quick["peak_memory_bytes"] < 80 * 2**20, quick
    bash = server.post("/v1/bash/exec", {"command": HOG}).json()["data"]
    assert 0.35 <= bash["cpu_seconds"] < 2.0, bash
    assert 80 * 2**20 <= bash["peak_memory_bytes"] < 400 * 2**20, bash


def _pty_output(server, term_id, offset, until, timeout=10.0):
    """Read a terminal's events from ``offset`` until ``until`` shows up in what came; returns
    (everything read, the next offset)."""
    seen, deadline = b"", time.monotonic() + timeout
    with server.client.stream("POST", "/v1/pty/output", json={"id": term_id, "offset": offset},
                              headers={"Accept": "text/event-stream"}, timeout=timeout) as response:
        assert response.status_code == 200
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "output":
                item = __import__("json").loads(line[6:])
                seen += base64.b64decode(item["data"])
                offset = item["offset"] + len(base64.b64decode(item["data"]))
                if until.encode() in seen or time.monotonic() > deadline:
                    break
            elif line.startswith("data: ") and event == "exit":
                break
    return seen, offset


def test_a_terminal_runs_an_interactive_shell_resizes_and_replays(server):
    term = server.post("/v1/pty/open", {"cols": 100, "rows": 30}).json()["data"]["id"]
    server.post("/v1/pty/write", {"id": term, "data": "echo hi-$((6*7)); stty size\n"})
    seen, offset = _pty_output(server, term, 0, "30 100")
    assert b"hi-42" in seen and b"30 100" in seen
    assert server.post("/v1/pty/resize", {"id": term, "cols": 120, "rows": 40}).status_code == 200
    server.post("/v1/pty/write", {"id": term, "data": "stty size\n"})
    seen, offset = _pty_output(server, term, offset, "40 120")
    assert b"40 120" in seen
    replay, _ = _pty_output(server, term, 0, "40 120")  # a client attaching from 0 sees what it missed
    assert b"hi-42" in replay and b"40 120" in replay
    assert server.post("/v1/pty/open", {"cols": 0, "rows": 30}).status_code == 422
    closed = server.post("/v1/pty/close", {"id": term}).json()["data"]
    assert closed["exit_code"] is not None
    assert server.post("/v1/pty/write", {"id": term, "data": "x"}).status_code == 404


def test_a_preview_url_tunnels_to_a_port_behind_the_server_with_its_token_only(server, tmp_path):
    """backends.preview.Exposure against the server (here on the host, its 'sandbox' this machine's
    loopback): the token in the URL or a header reaches the port; none, a wrong one, nothing
    listening, or a closed exposure, does not."""
    import http.server

    from backends.preview import Exposure

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("behind the tunnel\n")
    seen = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "site"), **kwargs)

        def log_message(self, format, *args):
            seen.append(self.path)

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=site.serve_forever, daemon=True).start()

    async def body():
        exposure = Exposure(server.url, TOKEN, site.server_address[1])
        url = await exposure.open()
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(url)).text == "behind the tunnel\n"
            bare = url.split("?")[0] + "index.html?keep=1"
            assert (await client.get(bare, headers={"X-Sandbox-Token": exposure.token})).status_code == 200
            assert (await client.get(bare)).status_code == 401
            assert (await client.get(bare + "&sandbox_token=wrong")).status_code == 401
            nothing = Exposure(server.url, TOKEN, _free_port())
            assert (await client.get(await nothing.open())).status_code == 502
            await nothing.close()
            await exposure.close()
            with pytest.raises(httpx.TransportError):
                await client.get(url)

    try:
        asyncio.run(body())
    finally:
        site.shutdown()
    assert "/index.html?keep=1" in seen and not any("sandbox_token" in path for path in seen)  # never forwarded
