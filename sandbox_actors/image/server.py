#!/usr/bin/env python3
"""Minimal AIO-sandbox-compatible HTTP server, standard library only.

Runs inside the sandbox container as ``/usr/bin/python3 -I -S -u /opt/sandbox/server.pyc``
(compiled from this file when the image is built) and implements
the subset of the AIO sandbox API that sandbox_actors and the ``agent-sandbox`` SDK use:

  GET  /v1/sandbox          readiness probe + environment info (SandboxResponse)
  GET  /health              liveness
  POST /v1/shell/exec       command in a persistent bash session (ShellCommandResult);
                            ``async_mode`` starts it in the background (then POST
                            /v1/shell/view, /v1/shell/wait, /v1/shell/kill)
  POST /v1/bash/exec        command in a fresh ``bash -c`` process (BashExecResult)
  POST /v1/file/read|write|list, GET /v1/file/download (``offset``/``length`` for a range)
  PUT  /v1/file/upload      a raw chunk of a file at ``offset`` (the file appears with ``final``)

Both exec endpoints stream their output as server-sent events when the request accepts
``text/event-stream``, and kill their command when the client hangs up.

Every JSON reply is the envelope {"success": bool, "message": str, "data": ...}.
Configuration comes from SANDBOX_* environment variables, which are removed from the
environment after reading so that commands run in the sandbox never see them:

  SANDBOX_SOCKET        serve on this unix socket (else TCP on SANDBOX_BIND:SANDBOX_PORT)
  SANDBOX_TOKEN_SHA256  hex SHA-256 of the bearer token requests must carry (the token
                        itself never enters the container); SANDBOX_TOKEN: the token itself
  SANDBOX_USER          run commands as this user (the server itself stays root, so a
                        command can neither read its memory nor take over its socket)
  SANDBOX_USER_DIRS     colon-separated directories (the thread mounts) given to that user
  SANDBOX_HOME, SANDBOX_MAX_OUTPUT, SANDBOX_PORT, SANDBOX_BIND
"""

import sys

# Every sandbox's start waits for this server to listen, so it loads as little as it can: no
# OpenSSL (it speaks plain HTTP on a unix socket or a local port, and hashes with Python's own
# SHA-256), and modules needed by one endpoint only are imported there; the image runs it compiled
# at build time. Measured in a container here: it listens 33 ms after its exec instead of 52, and
# holds ~15 MB (RSS) instead of ~24.
if __name__ == "__main__":  # as the server only (tests import this module)
    sys.modules.setdefault("ssl", None)       # type: ignore[arg-type]  # http.client imports ssl if it can
    sys.modules.setdefault("_hashlib", None)  # type: ignore[arg-type]  # hashlib and hmac use their builtin hashes

import codecs  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import errno  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pwd  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import socketserver  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from urllib.parse import parse_qs, quote, urlsplit  # noqa: E402

VERSION = "sandbox-actors-minimal/1"
SHELL_TRUNCATE_CHARS = 30000          # AIO's default middle truncation for /v1/shell/exec
READ_SIZE = 65536
MAX_BODY_BYTES = 256 * 1024 * 1024    # request bodies (base64 file uploads are the big ones)
MAX_READ_FILE_BYTES = 256 * 1024 * 1024
MAX_LIST_ENTRIES = 100000
HOLD_BACK_SECONDS = 0.02              # a streamed tail that might begin the sentinel waits this long
SESSION_KILL_GRACE = 1.0              # wait this long for the sentinel after killing a command
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def log(message):
    sys.stderr.write(f"[sandbox-server] {message}\n")
    sys.stderr.flush()


def new_id():
    """A random id (uuid4 hex; uuid is loaded with the first one, off the start path)."""
    import uuid
    return uuid.uuid4().hex


# --------------------------------------------------------------------------- config

class RunAs:
    """The user commands run as: the server's own, or another one it switches to (needs root)."""

    def __init__(self, name, uid, gid, home):
        self.name, self.uid, self.gid, self.home = name, uid, gid, home

    @classmethod
    def current(cls):
        try:
            entry = pwd.getpwuid(os.getuid())
            return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
        except KeyError:
            return cls(str(os.getuid()), os.getuid(), os.getgid(), os.environ.get("HOME") or "/")

    @classmethod
    def named(cls, name):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ValueError(f"SANDBOX_USER: no user {name!r} in this image's /etc/passwd") from None
        if entry.pw_uid != os.getuid() and os.getuid() != 0:
            raise ValueError(f"SANDBOX_USER: the server runs as uid {os.getuid()} and cannot switch to {name!r}")
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    @property
    def switches(self):
        return self.uid != os.getuid()

    def popen_kwargs(self):
        """What subprocess needs to start a command as this user (capabilities go with the uid)."""
        if not self.switches:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, path):
        """Give a file or directory the server just created to this user."""
        if self.switches:
            os.chown(path, self.uid, self.gid)


class Config:
    def __init__(self, port, bind, token_hash, max_output, home, socket_path=None, run_as=None):
        self.port, self.bind, self.token_hash = port, bind, token_hash
        self.max_output, self.home = max_output, home
        self.socket_path = socket_path
        self.run_as = run_as or RunAs.current()
        self.user_dirs = []

    @property
    def token(self):
        return bool(self.token_hash)


def load_config(environ=os.environ):
    """Read SANDBOX_* once, then delete them so child commands cannot see them."""
    names = ("SANDBOX_PORT", "SANDBOX_BIND", "SANDBOX_TOKEN", "SANDBOX_TOKEN_SHA256", "SANDBOX_MAX_OUTPUT",
             "SANDBOX_HOME", "SANDBOX_SOCKET", "SANDBOX_USER", "SANDBOX_USER_DIRS")
    raw = {name: environ.pop(name, "") for name in names}
    try:
        port = int(raw["SANDBOX_PORT"] or 8080)
        max_output = int(raw["SANDBOX_MAX_OUTPUT"] or 8 * 1024 * 1024)
    except ValueError:
        raise ValueError("SANDBOX_PORT and SANDBOX_MAX_OUTPUT must be integers") from None
    token_hash = raw["SANDBOX_TOKEN_SHA256"].strip().lower()
    if raw["SANDBOX_TOKEN"]:
        token_hash = hashlib.sha256(raw["SANDBOX_TOKEN"].encode("utf-8")).hexdigest()
    if token_hash and not re.fullmatch(r"[0-9a-f]{64}", token_hash):
        raise ValueError("SANDBOX_TOKEN_SHA256 must be 64 hex digits")
    run_as = RunAs.named(raw["SANDBOX_USER"]) if raw["SANDBOX_USER"] else RunAs.current()
    home = raw["SANDBOX_HOME"] or (run_as.home if raw["SANDBOX_USER"] else None) or environ.get("HOME") or "/root"
    # A cap below a few KiB would make the head/tail split meaningless.
    cfg = Config(port, raw["SANDBOX_BIND"] or "0.0.0.0", token_hash, max(max_output, 4096),
                 os.path.abspath(home), raw["SANDBOX_SOCKET"] or None, run_as)
    cfg.user_dirs = [path for path in raw["SANDBOX_USER_DIRS"].split(":") if path]
    return cfg


# --------------------------------------------------------------------------- validation

class ApiError(Exception):
    """Turned into an error envelope with the given HTTP status at the handler boundary."""

    def __init__(self, status, message, data=None):
        super().__init__(message)
        self.status, self.message, self.data = status, message, data


# Counters of this container's cgroup that grow when a limit bites: (cgroup v1 path, v2 path, key).
_LIMIT_COUNTERS = {
    "memory": ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events", "oom_kill"),
    "pids": ("/sys/fs/cgroup/pids/pids.events", "/sys/fs/cgroup/pids.events", "max"),
}


def limit_counters():
    """How often each resource limit has bitten so far (0 where the kernel does not say)."""
    counts = {}
    for limit, (*paths, key) in _LIMIT_COUNTERS.items():
        counts[limit] = 0
        for path in paths:
            try:
                with open(path) as handle:
                    for line in handle:
                        name, _, value = line.partition(" ")
                        if name == key:
                            counts[limit] = int(value)
                break
            except (OSError, ValueError):
                continue
    return counts


def limits_hit(before):
    after = limit_counters()
    return sorted(limit for limit, count in after.items() if count > before.get(limit, 0))


def spawn_failed(exc):
    """A command could not even start: blame the process limit when that is what bit."""
    if exc.errno in (errno.EAGAIN, errno.ENOMEM):
        return ApiError(503, "cannot start the command: the sandbox hit its process or memory limit",
                        {"limits_hit": ["pids"] if exc.errno == errno.EAGAIN else ["memory"]})
    return ApiError(500, f"cannot start the command: {exc.strerror}")


_KINDS = {"str": (str,), "bool": (bool,), "int": (int,), "number": (int, float),
          "dict": (dict,), "list": (list,)}


def get_field(body, name, kind, required=False, default=None):
    """Typed field access; an explicit JSON null counts as absent (the SDK sends nulls)."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(422, f"field '{name}' is required")
        return default
    is_bool = isinstance(value, bool)
    if not isinstance(value, _KINDS[kind]) or (is_bool and kind != "bool"):
        raise ApiError(422, f"field '{name}' must be of type {kind}")
    return value


def get_timeout(body, name):
    value = get_field(body, name, "number")
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise ApiError(422, f"field '{name}' must be a positive number")
    return value


def reject_nul(value, name):
    if "\x00" in value:
        raise ApiError(422, f"field '{name}' must not contain NUL characters")


def ok(data, message="ok"):
    return {"success": True, "message": message, "data": data}


# --------------------------------------------------------------------------- output capture

def decode(data):
    return data.decode("utf-8", errors="replace")


def fs_text(name):
    """File names may hold undecodable bytes (surrogate escapes); make them JSON-safe."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class BoundedBuffer:
    """Keeps the first half and a rolling last half of a byte stream, counting what is dropped.

    Memory stays at most `cap` bytes however much the command prints.
    """

    def __init__(self, cap):
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = collections.deque()   # chunks, so dropping old bytes is cheap
        self.tail_len = 0
        self.dropped = 0

    def feed(self, data):
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail.append(bytes(data))
        self.tail_len += len(data)
        excess = self.tail_len - self.tail_cap
        while excess > 0:
            first = self.tail[0]
            cut = min(len(first), excess)
            if cut == len(first):
                self.tail.popleft()
            else:
                self.tail[0] = first[cut:]
            self.tail_len -= cut
            self.dropped += cut
            excess -= cut

    def text(self):
        tail = b"".join(self.tail)
        if not self.dropped:
            return decode(bytes(self.head) + tail)
        marker = f"\n...[truncated {self.dropped} bytes]...\n"
        return decode(bytes(self.head)) + marker + decode(tail)


def middle_truncate(text, limit):
    """Keep the head and tail of `text` around a marker; limit <= 0 means no limit."""
    if limit <= 0 or len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    return (text[:head] + f"\n...[truncated {len(text) - limit} chars]...\n"
            + text[len(text) - tail:])


# --------------------------------------------------------------------------- processes

def proc_table():
    """pid -> (ppid, pgid) for all visible processes, read from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue  # process exited while we looked
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = data[data.rfind(b")") + 2:].split()
        table[int(name)] = (int(fields[1]), int(fields[2]))
    return table


def descendants(root, table=None, skip=()):
    """All descendants of `root`; pids in `skip` are left out together with their subtrees."""
    table = proc_table() if table is None else table
    children = collections.defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    found, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid in skip:
            continue
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def kill_quietly(func, target):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        func(target, signal.SIGKILL)


def kill_descendants(root, spare=(), spare_pgids=()):
    """SIGKILL every descendant of `root` (except `spare` subtrees) and their process groups.

    Two passes, because a process may fork between our scan and its death.
    """
    own_pgid = os.getpgrp()
    for _ in range(2):
        table = proc_table()
        victims = descendants(root, table, skip=spare)
        for pid in victims:
            kill_quietly(os.kill, pid)
            pgid = table[pid][1]
            if pgid != own_pgid and pgid not in spare_pgids:
                kill_quietly(os.killpg, pgid)
        if not victims:
            return


def kill_group(pid):
    """SIGKILL a command's process group and every descendant of ``pid``."""
    kill_descendants(pid)
    kill_quietly(os.killpg, pid)


def exit_code_of(returncode):
    return returncode if returncode >= 0 else 128 - returncode


METER_SECONDS = 0.05                  # a running command's processes are measured this often
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid):
    """The fields of /proc/PID/stat after the command name, or None (gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


class Meter:
    """A command's CPU seconds and peak memory, as its processes show them. CPU: the ``root``
    process's own time and that of the children it waited for (utime, stime, cutime, cstime),
    from when the command began; exact, for what ended by the command's end. Peak memory: the
    most the command's processes (``root``'s descendants, those in ``known`` left out, and
    ``root`` itself when ``own``) held resident at once, sampled every METER_SECONDS: a command
    shorter than that may show 0."""

    def __init__(self, root, known=(), own=False):
        self.root, self.known, self.own = root, set(known), own
        self.start_ticks = self._ticks() if not own else 0
        self.last_ticks = self.start_ticks
        self.peak = 0
        self.next_sample = time.monotonic() + METER_SECONDS

    def _ticks(self):
        fields = _stat_fields(self.root)
        return self.last_ticks if fields is None else sum(int(f) for f in fields[11:15])

    def wait_ms(self, now):
        return max(0.0, self.next_sample - now) * 1000

    def sample(self, now, ticks=False):
        """Measure when due: the root's CPU and the resident memory of the tree (with ``ticks``,
        the root's CPU every time: a root about to be reaped shows its last figures)."""
        if ticks:
            self.last_ticks = self._ticks()
        if now < self.next_sample:
            return
        self.next_sample = now + METER_SECONDS
        self.last_ticks = self._ticks()
        table = proc_table()
        pids = descendants(self.root, table, skip=self.known) + ([self.root] if self.own else [])
        resident = 0
        for pid in pids:
            fields = _stat_fields(pid)
            if fields is not None and len(fields) > 21:
                resident += int(fields[21]) * _PAGE
        self.peak = max(self.peak, resident)

    def ended(self):
        """Read the root's CPU once more (it may be a zombie: its figures are final then)."""
        self.last_ticks = self._ticks()

    def figures(self):
        return {"cpu_seconds": round((self.last_ticks - self.start_ticks) / _TICKS, 3),
                "peak_memory_bytes": self.peak}


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def hung_up(sock):
    """Whether the client on ``sock`` closed its side. A client sends nothing while it waits
    for a reply, so anything readable is its hang-up (or bytes we do not expect: treated alike)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class ChildRegistry:
    """Every process group we started, so that shutdown can kill all of them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pgids = set()

    def add(self, pgid):
        with self.lock:
            for old in list(self.pgids):
                try:
                    os.killpg(old, 0)
                except ProcessLookupError:
                    self.pgids.discard(old)   # group is gone; forget it
                except PermissionError:
                    pass
            self.pgids.add(pgid)

    def kill_all(self):
        kill_descendants(os.getpid())
        with self.lock:
            for pgid in self.pgids:
                kill_quietly(os.killpg, pgid)


# --------------------------------------------------------------------------- shell sessions

_BASH_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                       b" !\"#$%&()*+,-./:;<=>?@[]^_`{|}~")


def bash_quote(text):
    """Quote as a one-line bash $'...' string (newlines and odd bytes become \\xHH)."""
    raw = text.encode("utf-8", "replace")
    return "$'" + "".join(chr(b) if b in _BASH_SAFE else f"\\x{b:02x}" for b in raw) + "'"


def build_script(command, exec_dir, token):
    """One line for the session bash: run the command, then print the sentinel.

    The command goes through `eval` of a quoted string, so trailing comments, unbalanced
    quotes or heredocs cannot swallow the sentinel. The line starts with a simple command,
    not `{`: after a syntax error inside eval, bash 5.2 fails to recognise a reserved word
    at the start of the next line. stdin is /dev/null so the command cannot read our next
    lines; the sentinel goes to fd 3 (a copy of the original stdout, hidden from the
    command) so `exec >/dev/null` cannot hide it. The token is printed in two halves so
    `set -x`/`set -v` traces never contain it verbatim. Nothing is printed before the token,
    so a streamed line's newline need not wait to be told apart from the sentinel's.
    """
    line = "eval " + bash_quote(command) + " </dev/null 3>&-"
    if exec_dir is not None:
        line = "cd -- " + bash_quote(exec_dir) + " && " + line
    return (f"{line}; printf '%s%s:%s\\n' {token[:16]} {token[16:]} \"$?\" >&3\n").encode()


class ShellSession:
    def __init__(self, session_id, cfg, registry):
        self.id, self.cfg, self.registry = session_id, cfg, registry
        self.lock = threading.Lock()   # serializes commands in this session
        self.proc = None

    def _ensure_started(self):
        if self.proc is not None and self.proc.poll() is None:
            return
        self.discard()
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=self.cfg.home, start_new_session=True, bufsize=0,
            env=command_env(self.cfg), **self.cfg.run_as.popen_kwargs())
        self.registry.add(self.proc.pid)
        write_all(self.proc.stdin.fileno(), b"exec 3>&1\n")

    def discard(self):
        """Kill the whole session (bash, its jobs, anything they spawned)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        kill_descendants(proc.pid)
        kill_quietly(os.killpg, proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()

    def run(self, command, exec_dir, hard_timeout, idle_timeout, on_output=None, client=None):
        """Run one command; ``on_output`` gets its output as it comes; a hang-up of the
        ``client`` socket (or a failing ``on_output``) kills it (status 'terminated') and
        leaves the shell usable."""
        with self.lock:
            self._ensure_started()
            token = new_id()
            script = build_script(command, exec_dir, token)
            # Background jobs from earlier commands (and what they spawn later) survive a
            # timeout of this command.
            known = set(descendants(self.proc.pid))
            meter = Meter(self.proc.pid, known)  # before the command: its CPU from here
            try:
                write_all(self.proc.stdin.fileno(), script)
            except OSError:  # bash died between calls (e.g. killed from outside): start over once
                self.discard()
                self._ensure_started()
                known = set()
                meter = Meter(self.proc.pid, known)
                write_all(self.proc.stdin.fileno(), script)
            return SessionRead(self, token, hard_timeout, idle_timeout, meter, on_output, client).run()


class SessionRead:
    """Reads one session command's output up to its sentinel (``token:EXIT``), feeding
    ``on_output`` as it comes, and kills the command's new processes when a limit passes or
    the client hangs up. A session whose sentinel never comes (or whose bash ends) is discarded."""

    def __init__(self, session, token, hard_timeout, idle_timeout, meter, on_output=None, client=None):
        self.session, self.proc = session, session.proc
        self.marker = token.encode() + b":"   # no newline of ours before it: output keeps its own
        self.hard_timeout, self.idle_timeout, self.known = hard_timeout, idle_timeout, meter.known
        self.buf, self.pending = BoundedBuffer(session.cfg.max_output), b""
        self.on_output, self.gone, self.client = on_output, False, client
        self.status, self.exit_code, self.reset, self.kill_deadline = "completed", None, False, None
        self.start = self.last_output = time.monotonic()
        self.meter = meter

    def emit(self, data):
        self.buf.feed(data)
        if self.on_output is not None and data:
            try:
                self.on_output(data)
            except OSError:   # the client of a stream went away
                self.on_output, self.gone = None, True

    def run(self):
        fd = self.proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        client_fd = self.client.fileno() if self.client is not None else None
        if client_fd is not None:
            poller.register(client_fd, select.POLLIN)
        while not self._enforce(time.monotonic()):
            held = self.pending and self.marker not in self.pending
            self.meter.sample(time.monotonic())
            ready = {f for f, _ in poller.poll(self._wait_ms(time.monotonic(), held))}
            if client_fd in ready:
                poller.unregister(client_fd)
                client_fd = None
                self.gone = hung_up(self.client)
                continue
            if held and not ready:   # a held-back tail nothing followed: it is output
                self.emit(self.pending)
                self.pending = b""
            if fd in ready and self._take(os.read(fd, READ_SIZE)):
                break
        self.emit(self.pending)
        exit_code = self.exit_code if self.status == "completed" else None
        if not self.reset:
            self.meter.ended()
        return {"status": self.status, "output": self.buf.text(), "exit_code": exit_code, "reset": self.reset,
                **self.meter.figures()}

    def _enforce(self, now):
        """Kill the command once a limit passes; True when the session must go (the sentinel
        never came after the kill: bash itself is busy, e.g. a builtin loop)."""
        if self.kill_deadline is not None:
            if now < self.kill_deadline:
                return False
            self.session.discard()
            self.reset = True
            return True
        if self.hard_timeout and now - self.start >= self.hard_timeout:
            self.status = "hard_timeout"
        elif self.idle_timeout and now - self.last_output >= self.idle_timeout:
            self.status = "no_change_timeout"
        elif self.gone:
            self.status = "terminated"
        if self.status != "completed":
            kill_descendants(self.proc.pid, spare=self.known, spare_pgids={self.proc.pid})
            self.kill_deadline = now + SESSION_KILL_GRACE
        return False

    def _wait_ms(self, now, held):
        deadlines = [self.kill_deadline] if self.kill_deadline else [
            self.start + self.hard_timeout if self.hard_timeout else None,
            self.last_output + self.idle_timeout if self.idle_timeout else None]
        waits = [d - now for d in deadlines if d is not None]
        if held:   # see _take: a held-back tail goes out once nothing follows it at once
            waits.append(HOLD_BACK_SECONDS)
        waits.append(self.meter.wait_ms(now) / 1000)
        return max(0, min(waits)) * 1000

    def _take(self, chunk):
        """Take a read; True when the command is done (its sentinel came, or bash exited)."""
        if not chunk:   # bash exited (`exit`, `set -e`, killed): next call starts a new one
            self.exit_code = exit_code_of(self.proc.wait())
            self.session.discard()
            self.reset = True
            return True
        self.last_output = time.monotonic()
        self.pending += chunk
        marker, pending = self.marker, self.pending
        idx = pending.find(marker)
        if idx < 0:
            # Hold back a tail that could begin the sentinel: it may straddle two reads.
            # The sentinel is one small write, so when it straddles, its rest is in the
            # pipe already; a tail nothing follows within HOLD_BACK_SECONDS is output.
            keep = next((k for k in range(min(len(marker) - 1, len(pending)), 0, -1)
                         if pending.endswith(marker[:k])), 0)
            self.emit(pending[:len(pending) - keep])
            self.pending = pending[len(pending) - keep:]
            return False
        self.emit(pending[:idx])
        self.pending = pending = pending[idx:]
        end = pending.find(b"\n", len(marker))
        if end < 0:
            return False
        with contextlib.suppress(ValueError):
            self.exit_code = int(pending[len(marker):end])
        self.pending = b""
        return True


class SessionManager:
    def __init__(self, cfg, registry):
        self.cfg, self.registry = cfg, registry
        self.lock = threading.Lock()
        self.sessions = {}

    def get(self, session_id):
        with self.lock:
            if session_id not in self.sessions:
                self.sessions[session_id] = ShellSession(session_id, self.cfg, self.registry)
            return self.sessions[session_id]

    def kill_all(self):
        with self.lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            with contextlib.suppress(Exception):
                session.discard()


# --------------------------------------------------------------------------- background jobs

class Job:
    """A command started with ``async_mode``: its own process group, its output spooled to a
    file only the server can read (memory stays flat however much it prints)."""

    def __init__(self, job_id, command, proc, spool):
        self.id, self.command, self.proc, self.spool = job_id, command, proc, spool
        self.killed = False

    def status(self):
        code = self.proc.poll()
        if code is None:
            return "running", None
        return ("terminated" if self.killed else "completed"), exit_code_of(code)

    def output(self, offset, limit):
        """(text, next offset) of the spooled output from byte ``offset``, at most ``limit``
        bytes; a character cut at the end is left for the next read."""
        running = self.proc.poll() is None
        with open(self.spool, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
        if running or len(data) == limit:
            data = data[:utf8_complete(data)]
        return decode(data), offset + len(data)

    def kill(self):
        if self.proc.poll() is None:
            self.killed = True
            kill_descendants(self.proc.pid)
            kill_quietly(os.killpg, self.proc.pid)
            self.proc.wait()


def utf8_complete(data):
    """The length of ``data`` without a UTF-8 character cut off at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:   # ASCII or the first byte of a character
            need = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)


class JobTable:
    def __init__(self, cfg, registry):
        self.cfg, self.registry = cfg, registry
        self.lock = threading.Lock()
        self.jobs = {}
        self.spool_dir = None

    def start(self, job_id, command, cwd):
        with self.lock:
            if job_id in self.jobs and self.jobs[job_id].proc.poll() is None:
                raise ApiError(400, f"session {job_id} still runs a command; wait for it or kill it")
            if self.spool_dir is None:
                import tempfile
                self.spool_dir = tempfile.mkdtemp(prefix="sandbox-jobs-")   # 0700, the server's
            spool = os.path.join(self.spool_dir, job_id.replace("/", "_") + ".out")
            with open(spool, "wb") as out:
                proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, cwd=cwd, env=command_env(self.cfg),
                                        start_new_session=True, **self.cfg.run_as.popen_kwargs())
            self.registry.add(proc.pid)
            self.jobs[job_id] = Job(job_id, command, proc, spool)
            return self.jobs[job_id]

    def get(self, job_id):
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no background command in session {job_id}")
        return job

    def kill_all(self):
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.kill()


# --------------------------------------------------------------------------- bash -c

def command_env(cfg, extra=None):
    """The environment a command starts with: ours (SANDBOX_* already removed), as its user."""
    env = dict(os.environ, HOME=cfg.home)
    if cfg.run_as.switches:
        env.update(USER=cfg.run_as.name, LOGNAME=cfg.run_as.name)
    env.update(extra or {})
    return env


def run_bash(command, env, cwd, hard_timeout, cap, registry, run_as, client=None, on_output=None):
    """Run `bash -c command` in its own process group; capture stdout/stderr separately.
    ``on_output(name, data)`` gets each stream's output as it comes. A hang-up of the
    ``client`` socket (or a failing ``on_output``) kills the group (status 'terminated')."""
    proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
                            start_new_session=True, **run_as.popen_kwargs())
    registry.add(proc.pid)
    bufs = {proc.stdout.fileno(): BoundedBuffer(cap), proc.stderr.fileno(): BoundedBuffer(cap)}
    out_buf, err_buf = bufs.values()
    names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    poller = select.poll()
    for fd in bufs:
        poller.register(fd, select.POLLIN)
    client_fd = client.fileno() if client is not None else None
    if client_fd is not None:
        poller.register(client_fd, select.POLLIN)
    deadline = time.monotonic() + hard_timeout if hard_timeout else None
    timed_out, exited_at, terminated = False, None, False
    meter = Meter(proc.pid, own=True)
    try:
        while bufs:
            now = time.monotonic()
            if deadline is not None and not timed_out and now >= deadline:
                timed_out = True
                kill_group(proc.pid)
            if exited_at is None:
                meter.sample(now, ticks=True)  # before poll() reaps it: a zombie's figures are its last
                exited_at = now if proc.poll() is not None else None
            # Background jobs may keep the pipes open after bash exits: drain what is
            # immediately available, then stop waiting for an EOF that may never come.
            wait = min(0.1, meter.wait_ms(now) / 1000) if exited_at is None else 0.2
            if deadline is not None and not timed_out:
                wait = min(wait, max(0.0, deadline - now))
            events = poller.poll(wait * 1000)
            if not events and exited_at is not None:
                break
            if exited_at is not None and now - exited_at > 1.0:
                break
            for fd, _ in events:
                if fd == client_fd:
                    poller.unregister(client_fd)
                    client_fd = None
                    if hung_up(client) and not timed_out:
                        timed_out = terminated = True
                        kill_group(proc.pid)
                    continue
                chunk = os.read(fd, READ_SIZE)
                if chunk:
                    bufs[fd].feed(chunk)
                    if on_output is not None:
                        try:
                            on_output(names[fd], chunk)
                        except OSError:   # the client of a stream went away
                            on_output = None
                            if not timed_out:
                                timed_out = terminated = True
                                kill_group(proc.pid)
                else:
                    poller.unregister(fd)
                    del bufs[fd]
        # Both pipes closed, but the process may still run (it closed its own stdout).
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if proc.returncode is None:
            meter.ended()
        try:
            returncode = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid)
            returncode = proc.wait()
    finally:
        if proc.poll() is None:   # the request failed half-way: don't leak the process
            kill_quietly(os.killpg, proc.pid)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    exit_code = None if timed_out else exit_code_of(returncode)
    status = "terminated" if terminated else "timed_out" if timed_out else "completed"
    return status, out_buf.text(), err_buf.text(), exit_code, meter.figures()


# --------------------------------------------------------------------------- files

@contextlib.contextmanager
def fs_errors(path, not_dir_status=404):
    """Map OS errors to API errors: missing 404, directory 400, permission 403."""
    try:
        yield
    except FileNotFoundError:
        raise ApiError(404, f"File not found: {path}") from None
    except NotADirectoryError:
        if not_dir_status == 404:
            raise ApiError(404, f"File not found: {path}") from None
        raise ApiError(not_dir_status, f"Not a directory (a parent is a file): {path}") from None
    except IsADirectoryError:
        raise ApiError(400, f"Is a directory: {path}") from None
    except PermissionError:
        raise ApiError(403, f"Permission denied: {path}") from None
    except OSError as exc:
        raise ApiError(400, f"{exc.strerror or type(exc).__name__}: {path}") from None


def split_lines(text):
    """Like readlines(): split on '\\n' only, keeping line ends."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def file_info(path, name, st, include_size, include_permissions):
    is_dir = stat.S_ISDIR(st.st_mode)
    import datetime
    modified = datetime.datetime.fromtimestamp(st.st_mtime, tz=datetime.timezone.utc)
    return {
        "name": fs_text(name),
        "path": fs_text(path),
        "is_directory": is_dir,
        "size": st.st_size if include_size else None,
        "modified_time": modified.isoformat(),
        "permissions": stat.filemode(st.st_mode)[1:] if include_permissions else None,
        "extension": None if is_dir else (os.path.splitext(fs_text(name))[1] or None),
    }


def list_entries(root, recursive, max_depth, show_hidden, file_types):
    """Yield (path, name, stat) under root, depth-first, not following directory symlinks."""
    stack = [(root, 1)]
    while stack:
        directory, depth = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            if directory == root:
                raise
            continue   # an unreadable subdirectory should not fail the whole listing
        for entry in entries:
            if not show_hidden and entry.name.startswith("."):
                continue
            try:
                st = entry.stat()
            except OSError:
                st = entry.stat(follow_symlinks=False)   # broken symlink
            is_dir = stat.S_ISDIR(st.st_mode)
            if recursive and entry.is_dir(follow_symlinks=False) and (
                    max_depth is None or depth < max_depth):
                stack.append((entry.path, depth + 1))
            extension = os.path.splitext(entry.name)[1].lower()
            if file_types and not is_dir and extension not in file_types:
                continue
            yield entry.path, entry.name, st


# --------------------------------------------------------------------------- application

PTY_REPLAY_BYTES = 64 * 1024           # what a terminal keeps of its output, replayed on attach
PTY_MAX_OPEN = 16


class Terminal:
    """An interactive shell on a pseudo-terminal: its output kept (the last PTY_REPLAY_BYTES),
    counted from 0 since it began, read by any number of clients from any offset."""

    def __init__(self, term_id, cfg, cols, rows):
        import fcntl
        import termios
        self.id = term_id
        master, slave = os.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, _winsize(cols, rows))
        env = command_env(cfg, {"TERM": "xterm-256color"})
        try:
            # setsid -c: a session of its own whose controlling terminal is this one (job control, ^C).
            self.proc = subprocess.Popen(["setsid", "-c", "bash", "--noprofile", "--norc", "-i"], stdin=slave,
                                         stdout=slave, stderr=slave, cwd=cfg.home, env=env, close_fds=True,
                                         **cfg.run_as.popen_kwargs())
        finally:
            os.close(slave)
        self.master = master
        self.kept = bytearray()
        self.total = 0                 # bytes of output since it began; kept holds the last ones
        self.ended = None              # exit code once the shell has ended
        self.changed = threading.Condition()
        threading.Thread(target=self._read, name=f"pty-{term_id}", daemon=True).start()

    def _read(self):
        """Keep what the terminal prints; at its end, its exit code (and its master closed here,
        by the one thread that reads it: never under a read, never twice)."""
        while True:
            try:
                data = os.read(self.master, READ_SIZE)
            except OSError:            # EIO: every process on the terminal has ended
                data = b""
            with self.changed:
                if not data:
                    self.ended = exit_code_of(self.proc.wait())
                    os.close(self.master)
                    self.changed.notify_all()
                    return
                self.kept += data
                del self.kept[:max(0, len(self.kept) - PTY_REPLAY_BYTES)]
                self.total += len(data)
                self.changed.notify_all()

    def output(self, offset, wait):
        """(offset of the bytes returned, the bytes) from ``offset`` on (from the oldest kept,
        when ``offset`` is older), waiting up to ``wait`` seconds for some; and the exit code
        once the shell has ended and all was read."""
        with self.changed:
            self.changed.wait_for(lambda: self.total > offset or self.ended is not None, timeout=wait)
            start = max(offset, self.total - len(self.kept))
            data = bytes(self.kept[len(self.kept) - (self.total - start):]) if self.total > start else b""
            return start, data, (self.ended if self.total <= start + len(data) else None)

    def write(self, data):
        with self.changed:             # the master stays open meanwhile
            if self.ended is not None:
                raise ApiError(409, f"terminal {self.id} has ended (exit code {self.ended})")
            write_all(self.master, data)

    def resize(self, cols, rows):
        import fcntl
        import termios
        size = _winsize(cols, rows)
        with self.changed:
            if self.ended is not None:
                raise ApiError(409, f"terminal {self.id} has ended (exit code {self.ended})")
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)  # the kernel sends SIGWINCH

    def close(self):
        if self.ended is None:
            kill_descendants(self.proc.pid)
            kill_quietly(os.killpg, self.proc.pid)
            kill_quietly(os.kill, self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        with self.changed:             # the reader closes the master as it sees the end
            self.changed.wait_for(lambda: self.ended is not None, timeout=2)
        return self.ended


def _winsize(cols, rows):
    import struct
    if not (0 < cols < 10000 and 0 < rows < 10000):
        raise ApiError(422, f"a terminal's size must be 1-9999 columns and rows, not {cols}x{rows}")
    return struct.pack("HHHH", rows, cols, 0, 0)


class App:
    """The endpoint implementations; the HTTP handler only does transport."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.registry = ChildRegistry()
        self.sessions = SessionManager(cfg, self.registry)
        self.jobs = JobTable(cfg, self.registry)
        self.terminals = {}
        self.info = self._build_info()

    def _build_info(self):
        user = self.cfg.run_as.name
        home = self.cfg.home
        uname = os.uname()
        system = {"os": "linux", "os_version": uname.release, "arch": uname.machine,
                  "user": user, "home_dir": home, "workspace": None,
                  "timezone": time.tzname[0] or "UTC", "occupied_ports": []}
        # The SDK's SandboxResponse wants these at top level, not inside "data".
        return {"success": True, "message": "ok", "data": None, "home_dir": home,
                "workspace": None, "version": VERSION,
                "detail": {"system": system, "runtime": {"python": [], "nodejs": []}, "utils": []}}

    def authorized(self, header):
        if not self.cfg.token_hash:
            return True
        scheme, _, value = (header or "").partition(" ")
        presented = hashlib.sha256(value.strip().encode("utf-8", "replace")).hexdigest()
        return scheme.lower() == "bearer" and hmac.compare_digest(presented, self.cfg.token_hash)

    def resolve(self, path, field="file"):
        """Absolute path; relative paths and '~' are taken relative to the sandbox home."""
        reject_nul(path, field)
        if path == "~" or path.startswith("~/"):
            path = self.cfg.home + path[1:]
        return os.path.normpath(os.path.join(self.cfg.home, path))

    def sandbox_info(self, body):
        return self.info

    def health(self, body):
        return ok({"status": "ok"})

    def shell_exec(self, body, request=None):
        """The command in a persistent session; with ``async_mode`` in the background (then
        view, wait, kill); with ``Accept: text/event-stream`` its output as it comes (events
        'output' {"output"}, then 'result' {the reply's data without output}). A client that
        hangs up kills the command."""
        command = get_field(body, "command", "str", required=True)
        reject_nul(command, "command")
        exec_dir = get_field(body, "exec_dir", "str")
        if exec_dir is not None:
            exec_dir = self.resolve(exec_dir, "exec_dir")
            if not os.path.isdir(exec_dir):
                raise ApiError(400, f"exec_dir does not exist or is not a directory: {exec_dir}")
        if get_field(body, "async_mode", "bool", default=False):
            job_id = get_field(body, "id", "str") or new_id()
            try:
                self.jobs.start(job_id, command, exec_dir or self.cfg.home)
            except OSError as exc:
                raise spawn_failed(exc) from exc
            return ok({"session_id": job_id, "command": command, "status": "running", "output": None,
                       "exit_code": None, "console": []}, "command started in the background")
        session_id = get_field(body, "id", "str") or "default"
        hard, timeout = get_timeout(body, "hard_timeout"), get_timeout(body, "timeout")
        idle = get_timeout(body, "no_change_timeout")
        truncate = get_field(body, "truncate", "bool", default=True)
        before = limit_counters()
        session = self.sessions.get(session_id)
        client = request.connection if request is not None else None
        if request is not None and "text/event-stream" in request.headers.get("Accept", ""):
            return self._shell_stream(session, command, exec_dir, hard or timeout, idle, request, before)
        try:
            result = session.run(command, exec_dir, hard or timeout, idle, client=client)
        except OSError as exc:
            raise spawn_failed(exc) from exc
        output = result["output"]
        if truncate:
            output = middle_truncate(output, SHELL_TRUNCATE_CHARS)
        message = "ok"
        if result["status"] != "completed":
            message = f"command stopped: {result['status']}"
        if result["reset"]:
            message += "; shell session was reset"
        return ok({"session_id": session_id, "command": command, "status": result["status"],
                   "output": output, "exit_code": result["exit_code"], "limits_hit": limits_hit(before),
                   "cpu_seconds": result["cpu_seconds"], "peak_memory_bytes": result["peak_memory_bytes"],
                   "console": [{"ps1": "$ ", "command": command, "output": output}]}, message)

    def _shell_stream(self, session, command, exec_dir, hard, idle, request, before):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        request.start_events()

        def on_output(data):
            text = decoder.decode(data)
            if text:
                request.send_event("output", {"output": text})

        try:
            result = session.run(command, exec_dir, hard, idle, on_output=on_output, client=request.connection)
        except OSError as exc:
            request.send_event("error", {"message": spawn_failed(exc).message})
            return STREAMED
        with contextlib.suppress(OSError):
            tail = decoder.decode(b"", final=True)
            if tail:
                request.send_event("output", {"output": tail})
            request.send_event("result", {"session_id": session.id, "command": command, "status": result["status"],
                                          "exit_code": result["exit_code"], "reset": result["reset"],
                                          "limits_hit": limits_hit(before), "cpu_seconds": result["cpu_seconds"],
                                          "peak_memory_bytes": result["peak_memory_bytes"]})
        return STREAMED

    def shell_view(self, body):
        """A background command's status and output (from byte ``offset``, at most ``max_bytes``;
        ``next_offset`` continues)."""
        job = self.jobs.get(get_field(body, "id", "str", required=True))
        offset = get_field(body, "offset", "int", default=0)
        limit = get_field(body, "max_bytes", "int", default=self.cfg.max_output)
        if offset < 0 or limit <= 0:
            raise ApiError(422, "offset must be >= 0 and max_bytes > 0")
        status, code = job.status()
        output, next_offset = job.output(offset, limit)
        return ok({"session_id": job.id, "command": job.command, "status": status, "exit_code": code,
                   "output": output, "next_offset": next_offset, "console": []})

    def shell_wait(self, body):
        """Wait up to ``seconds`` for a background command to end."""
        job = self.jobs.get(get_field(body, "id", "str", required=True))
        seconds = get_timeout(body, "seconds")
        with contextlib.suppress(subprocess.TimeoutExpired):
            job.proc.wait(timeout=seconds)
        status, code = job.status()
        return ok({"status": status, "exit_code": code})

    def shell_kill(self, body):
        """Kill a background command's process group."""
        job = self.jobs.get(get_field(body, "id", "str", required=True))
        before, code = job.status()
        job.kill()
        status, after = job.status()
        return ok({"status": status, "exit_code": after if before == "running" else code,
                   "returncode": after if before == "running" else code})

    def bash_exec(self, body, request=None):
        command = get_field(body, "command", "str", required=True)
        reject_nul(command, "command")
        env = command_env(self.cfg)
        for name, value in get_field(body, "env", "dict", default={}).items():
            # Never echo values: they may be secrets.
            if not ENV_NAME_RE.fullmatch(name):
                raise ApiError(422, f"field 'env' has an invalid variable name: {name!r}")
            if value is None:
                env.pop(name, None)
            elif not isinstance(value, str) or "\x00" in value:
                raise ApiError(422, f"field 'env' value for {name!r} must be a string without NUL")
            else:
                env[name] = value
        cwd = self.cfg.home
        exec_dir = get_field(body, "exec_dir", "str")
        if exec_dir is not None:
            cwd = self.resolve(exec_dir, "exec_dir")
            if not os.path.isdir(cwd):
                raise ApiError(400, f"exec_dir does not exist or is not a directory: {cwd}")
        hard, timeout = get_timeout(body, "hard_timeout"), get_timeout(body, "timeout")
        max_len = get_field(body, "max_output_length", "int", default=0)
        session_id = get_field(body, "session_id", "str") or new_id()
        before = limit_counters()
        client = request.connection if request is not None else None
        streaming = request is not None and "text/event-stream" in request.headers.get("Accept", "")
        on_output = None
        if streaming:   # events 'output' {"stream": "stdout"|"stderr", "output"}, then 'result'
            decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
            request.start_events()

            def stream_output(name, data):
                text = decoders[name].decode(data)
                if text:
                    request.send_event("output", {"stream": name, "output": text})
            on_output = stream_output
        try:
            status, out, err, code, figures = run_bash(command, env, cwd, hard or timeout,
                                              self.cfg.max_output, self.registry, self.cfg.run_as,
                                              client=client, on_output=on_output)
        except OSError as exc:
            if not streaming:
                raise spawn_failed(exc) from exc
            request.send_event("error", {"message": spawn_failed(exc).message})
            return STREAMED
        if streaming:
            with contextlib.suppress(OSError):
                for name, decoder in decoders.items():
                    tail = decoder.decode(b"", final=True)
                    if tail:
                        request.send_event("output", {"stream": name, "output": tail})
                request.send_event("result", {"session_id": session_id, "command": command, "status": status,
                                              "exit_code": code, "limits_hit": limits_hit(before), **figures})
            return STREAMED
        out, err = middle_truncate(out, max_len), middle_truncate(err, max_len)
        return ok({"session_id": session_id, "command_id": new_id(), "command": command,
                   "status": status, "stdout": out, "stderr": err, "exit_code": code,
                   "offset": len(out), "stderr_offset": len(err), "limits_hit": limits_hit(before), **figures},
                  "ok" if status == "completed" else "command timed out and was killed")

    def file_read(self, body):
        path = self.resolve(get_field(body, "file", "str", required=True))
        start = get_field(body, "start_line", "int")
        end = get_field(body, "end_line", "int")
        if os.path.isdir(path):
            raise ApiError(400, f"Is a directory: {path}")
        with fs_errors(path), open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_READ_FILE_BYTES:
                raise ApiError(413, f"File too large to read, use /v1/file/download: {path}")
            text = decode(f.read(MAX_READ_FILE_BYTES))
        if start is not None or end is not None:
            text = "".join(split_lines(text)[start:end])
        return ok({"content": text, "file": path})

    def file_write(self, body):
        path = self.resolve(get_field(body, "file", "str", required=True))
        content = get_field(body, "content", "str", required=True)
        encoding = get_field(body, "encoding", "str", default="utf-8").lower()
        append = get_field(body, "append", "bool", default=False)
        leading = get_field(body, "leading_newline", "bool", default=False)
        trailing = get_field(body, "trailing_newline", "bool", default=False)
        if encoding == "base64":
            import base64
            import binascii
            try:   # tolerate line-wrapped base64, but nothing else
                data = base64.b64decode("".join(content.split()), validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(422, "field 'content' is not valid base64") from None
        elif encoding in ("utf-8", "utf8", "raw"):
            text = ("\n" if leading else "") + content + ("\n" if trailing else "")
            data = text.encode("utf-8", "replace")
        else:
            raise ApiError(422, "field 'encoding' must be 'utf-8' or 'base64'")
        if os.path.isdir(path):
            raise ApiError(400, f"Is a directory: {path}")
        with fs_errors(path, not_dir_status=400):
            self.makedirs(os.path.dirname(path))
            existed = os.path.lexists(path)
            with open(path, "ab" if append else "wb") as f:
                f.write(data)
            if not existed:
                self.cfg.run_as.own(path)
        return ok({"file": path, "bytes_written": len(data)})

    def makedirs(self, directory):
        """os.makedirs, with every directory it creates given to the command user."""
        missing = []
        while directory and not os.path.isdir(directory):
            missing.append(directory)
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory = parent
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise NotADirectoryError(path) from None
                continue   # made meanwhile by another request
            self.cfg.run_as.own(path)

    def file_list(self, body):
        path = self.resolve(get_field(body, "path", "str", required=True), "path")
        recursive = get_field(body, "recursive", "bool", default=False)
        show_hidden = get_field(body, "show_hidden", "bool", default=False)
        max_depth = get_field(body, "max_depth", "int")
        include_size = get_field(body, "include_size", "bool", default=True)
        include_perms = get_field(body, "include_permissions", "bool", default=True)
        sort_by = get_field(body, "sort_by", "str", default="name")
        sort_desc = get_field(body, "sort_desc", "bool", default=False)
        wanted = get_field(body, "file_types", "list", default=[])
        file_types = {("" if t.startswith(".") else ".") + t.lower()
                      for t in wanted if isinstance(t, str)}
        if sort_by not in ("name", "size", "modified", "type"):
            raise ApiError(422, "field 'sort_by' must be one of name, size, modified, type")
        with fs_errors(path):
            if not os.path.isdir(path):
                os.stat(path)   # raises 404 when missing
                raise ApiError(400, f"Not a directory: {path}")
            rows = []
            entries = list_entries(path, recursive, max_depth, show_hidden, file_types)
            for entry_path, name, st in entries:
                info = file_info(entry_path, name, st, include_size, include_perms)
                rows.append((entry_path, st, info))
                if len(rows) >= MAX_LIST_ENTRIES:
                    break
        keys = {"name": lambda r: r[0], "size": lambda r: (r[1].st_size, r[0]),
                "modified": lambda r: (r[1].st_mtime, r[0]),
                "type": lambda r: (not r[2]["is_directory"], r[0])}
        rows.sort(key=keys[sort_by], reverse=sort_desc)
        files = [row[2] for row in rows]
        dirs = sum(1 for f in files if f["is_directory"])
        return ok({"path": path, "files": files, "total_count": len(files),
                   "directory_count": dirs, "file_count": len(files) - dirs})

    def _terminal(self, body):
        term = self.terminals.get(get_field(body, "id", "str", required=True))
        if term is None:
            raise ApiError(404, f"no terminal {body.get('id')!r} (it was closed, or the sandbox restarted)")
        return term

    def pty_open(self, body):
        """A new terminal of ``cols`` x ``rows`` running an interactive bash."""
        cols, rows = get_field(body, "cols", "int", default=80), get_field(body, "rows", "int", default=24)
        open_now = [t for t in self.terminals.values() if t.ended is None]
        if len(open_now) >= PTY_MAX_OPEN:
            raise ApiError(429, f"{PTY_MAX_OPEN} terminals are open in this sandbox; close one first")
        term_id = get_field(body, "id", "str") or new_id()
        if term_id in self.terminals:
            raise ApiError(409, f"terminal {term_id!r} exists already")
        for ended in [t.id for t in self.terminals.values() if t.ended is not None][:-PTY_MAX_OPEN]:
            del self.terminals[ended]  # the oldest ended ones (their replay) go
        try:
            self.terminals[term_id] = Terminal(term_id, self.cfg, cols, rows)
        except OSError as exc:
            raise spawn_failed(exc) from exc
        return ok({"id": term_id, "cols": cols, "rows": rows})

    def pty_write(self, body):
        data = get_field(body, "data", "str", required=True)
        raw = data.encode("utf-8", "surrogateescape")
        self._terminal(body).write(raw)
        return ok({"written": len(raw)})

    def pty_resize(self, body):
        self._terminal(body).resize(get_field(body, "cols", "int", required=True),
                                    get_field(body, "rows", "int", required=True))
        return ok({})

    def pty_close(self, body):
        term = self._terminal(body)
        code = term.close()
        self.terminals.pop(term.id, None)
        return ok({"exit_code": code})

    def pty_output(self, body, request=None):
        """The terminal's output from ``offset`` (the oldest kept when older: the last 64 KB
        replayed), as events 'output' {"offset", "data" (base64)} as it comes, then 'exit'
        {"exit_code"} when the shell ends; until then, until the client hangs up."""
        import base64
        term = self._terminal(body)
        offset = get_field(body, "offset", "int", default=0)
        request.start_events()
        while True:
            start, data, ended = term.output(offset, wait=1.0)
            if data:
                request.send_event("output", {"offset": start, "data": base64.b64encode(data).decode()})
                request.wfile.flush()
                offset = start + len(data)
            if ended is not None:
                request.send_event("exit", {"exit_code": ended})
                return STREAMED
            if not data and hung_up(request.connection):
                return STREAMED

    def shutdown(self):
        for term in list(self.terminals.values()):
            term.close()
        self.jobs.kill_all()
        self.sessions.kill_all()
        self.registry.kill_all()


# --------------------------------------------------------------------------- HTTP

ROUTES = {
    "/v1/sandbox": {"GET": "sandbox_info"},
    "/health": {"GET": "health"},
    "/v1/shell/exec": {"POST": "shell_exec"},
    "/v1/shell/view": {"POST": "shell_view"},
    "/v1/shell/wait": {"POST": "shell_wait"},
    "/v1/shell/kill": {"POST": "shell_kill"},
    "/v1/file/upload": {"PUT": "upload"},
    "/v1/bash/exec": {"POST": "bash_exec"},
    "/v1/file/read": {"POST": "file_read"},
    "/v1/file/write": {"POST": "file_write"},
    "/v1/file/list": {"POST": "file_list"},
    "/v1/file/download": {"GET": "download"},
    "/v1/tunnel": {"GET": "tunnel"},
    "/v1/pty/open": {"POST": "pty_open"},
    "/v1/pty/write": {"POST": "pty_write"},
    "/v1/pty/resize": {"POST": "pty_resize"},
    "/v1/pty/output": {"POST": "pty_output"},
    "/v1/pty/close": {"POST": "pty_close"},
}


TAKES_REQUEST = {"shell_exec", "bash_exec", "pty_output"}   # these watch the client (a hang-up ends them)
STREAMED = object()                             # the reply went out as events already


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: every response carries Content-Length
    server_version = VERSION
    sys_version = ""
    timeout = 300                   # idle keep-alive connections give their thread back

    def setup(self):
        super().setup()
        self.server.connections.add(self.connection)
        # Headers and body go out in separate writes; without NODELAY, Nagle plus the
        # client's delayed ACK adds ~40 ms to every keep-alive request.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def finish(self):
        self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format, *args):
        pass   # no per-request lines; errors are logged explicitly

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method):
        self._body_consumed = False
        self._headers_done = False
        try:
            app = self.server.app
            url = urlsplit(self.path)
            path = url.path.rstrip("/") or "/"
            if not app.authorized(self.headers.get("Authorization")):
                raise ApiError(401, "missing or invalid sandbox token")
            methods = ROUTES.get(path)
            if methods is None:
                raise ApiError(404, f"Not found: {path}")
            if method not in methods:
                raise ApiError(405, f"Method {method} not allowed for {path}")
            name = methods[method]
            if name == "download":
                self._download(app, parse_qs(url.query))
                return
            if name == "upload":
                self._send_json(200, self._upload(app, parse_qs(url.query)))
                return
            if name == "tunnel":
                self._tunnel(parse_qs(url.query))
                return
            body = self._read_json() if method == "POST" else {}
            extra = {"request": self} if name in TAKES_REQUEST else {}
            reply = getattr(app, name)(body, **extra)
            if reply is not STREAMED:
                self._send_json(200, reply)
        except ApiError as exc:
            self._send_error(exc.status, exc.message, exc.data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True   # client went away; nothing to report
        except Exception as exc:
            import traceback
            log(f"error in {method} {self.path.split('?')[0]}: {type(exc).__name__}: {exc}\n"
                + traceback.format_exc())
            self._send_error(500, f"internal server error ({type(exc).__name__})")

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                try:
                    size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    raise ApiError(400, "invalid chunked encoding") from None
                if size == 0:
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    raise ApiError(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(16)
            while self.rfile.readline(1024).strip():
                pass   # trailers
            self._body_consumed = True
            return b"".join(chunks)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "invalid Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise ApiError(413, "request body too large")
        self._body_consumed = True
        return self.rfile.read(length)

    def _read_json(self):
        raw = self._read_body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise ApiError(422, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(422, "request body must be a JSON object")
        return body

    def _request_has_unread_body(self):
        has_body = (self.headers.get("Content-Length", "0") not in ("", "0")
                    or "Transfer-Encoding" in self.headers)
        return has_body and not self._body_consumed

    def _send_json(self, status, payload):
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8", "replace")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self._request_has_unread_body():
            # The unread body would be parsed as the next request on this connection.
            self.send_header("Connection", "close")
        self.end_headers()
        self._headers_done = True
        self.wfile.write(data)

    def start_events(self):
        """Begin a text/event-stream reply (the connection closes at its end)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self._headers_done = True
        self.close_connection = True

    def send_event(self, event, data):
        self.wfile.write(f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
                         .encode("utf-8", "replace"))

    def _upload(self, app, query):
        """``PUT /v1/file/upload?path=&offset=&final=``: the raw body is written at ``offset``
        of a part file beside ``path`` (offset 0 starts it anew; any other offset must be its
        size so far), read 1 MiB at a time; ``final=1`` renames it to ``path``."""
        raw = (query.get("path") or [""])[0]
        if not raw:
            raise ApiError(422, "query parameter 'path' is required")
        path = app.resolve(raw, "path")
        try:
            offset = int((query.get("offset") or ["0"])[0])
            length = int(self.headers.get("Content-Length") or "-1")
        except ValueError:
            raise ApiError(422, "offset and Content-Length must be integers") from None
        if offset < 0 or length < 0 or length > MAX_BODY_BYTES:
            raise ApiError(411 if length < 0 else 413 if length > MAX_BODY_BYTES else 422,
                           f"bad upload chunk (offset {offset}, length {length})")
        final = (query.get("final") or ["0"])[0] in ("1", "true")
        if os.path.isdir(path):
            raise ApiError(400, f"Is a directory: {path}")
        part = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.part")
        with fs_errors(path, not_dir_status=400):
            app.makedirs(os.path.dirname(path))
            if offset == 0:
                with open(part, "wb"):
                    pass
                app.cfg.run_as.own(part)
            size = os.path.getsize(part) if os.path.exists(part) else -1
            if size != offset:
                raise ApiError(409, f"upload of {path} is at byte {max(size, 0)}, not {offset}; start again at 0")
            with open(part, "ab") as f:
                left = length
                while left:
                    chunk = self.rfile.read(min(left, 1024 * 1024))
                    if not chunk:
                        raise ApiError(400, "request body ended early")
                    f.write(chunk)
                    left -= len(chunk)
            self._body_consumed = True
            if final:
                os.replace(part, path)
        return ok({"path": path, "size": offset + length, "final": final})

    def _tunnel(self, query):
        """``GET /v1/tunnel?port=N`` with ``Upgrade: tcp``: this connection becomes a byte pipe
        to port N on the sandbox's loopback (a preview URL's way in: the host end checks its
        own token first). 502 when nothing listens there."""
        try:
            port = int((query.get("port") or [""])[0])
        except ValueError:
            raise ApiError(422, "port must be a number") from None
        if not 0 < port < 65536:
            raise ApiError(422, f"port must be 1-65535, not {port}")
        if self.headers.get("Upgrade", "").lower() != "tcp":
            raise ApiError(400, "a tunnel needs the header Upgrade: tcp")
        try:
            inner = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError as exc:
            raise ApiError(502, f"nothing answers on port {port} in the sandbox ({exc.strerror or exc})") from None
        inner.settimeout(None)
        self.send_response_only(101)
        self.send_header("Upgrade", "tcp")
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        pipe_both_ways(self.connection, inner)

    def _send_error(self, status, message, data=None):
        if self._headers_done:   # a streamed download failed half-way: just drop the connection
            self.close_connection = True
            return
        with contextlib.suppress(OSError):
            self._send_json(status, {"success": False, "message": message, "data": data})

    def _download(self, app, query):
        raw = (query.get("path") or [""])[0]
        if not raw:
            raise ApiError(422, "query parameter 'path' is required")
        path = app.resolve(raw, "path")
        if os.path.isdir(path):
            raise ApiError(400, f"Is a directory: {path}")
        try:   # a range of the file: offset and length (our extension, for chunked downloads)
            offset = int((query.get("offset") or ["0"])[0])
            length = int((query.get("length") or ["-1"])[0])
        except ValueError:
            raise ApiError(422, "offset and length must be integers") from None
        if offset < 0:
            raise ApiError(422, "offset must be >= 0")
        with fs_errors(path), open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            f.seek(min(offset, total))
            size = max(0, total - offset) if length < 0 else max(0, min(length, total - offset))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("X-File-Size", str(total))
            self.send_header("Content-Disposition", content_disposition(os.path.basename(path)))
            self.end_headers()
            self._headers_done = True
            sent = 0
            while sent < size:   # stream: never hold the whole file in memory
                chunk = f.read(min(1024 * 1024, size - sent))
                if not chunk:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
            if sent < size:   # file shrank under us; the client sees a short body
                self.close_connection = True


def pipe_both_ways(outer, inner):
    """Copy bytes between two sockets until both directions end. (The tunnel's client sends
    nothing after its request until it has the 101: nothing of it waits in a read buffer.)"""
    def copy(source, target):
        try:
            while True:
                data = source.recv(READ_SIZE)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    back = threading.Thread(target=copy, args=(inner, outer), daemon=True)
    back.start()
    copy(outer, inner)
    back.join()
    inner.close()


def content_disposition(name):
    name = fs_text(name)
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    value = f'attachment; filename="{ascii_name or "download"}"'
    if ascii_name != name:
        value += f"; filename*=UTF-8''{quote(name)}"
    return value


class _Tracked:
    """Each accepted connection is in ``connections`` before its thread starts: once serve_forever
    has returned, Listener.close() sees every connection there is (a checkpoint must hold none)."""

    def process_request(self, request, client_address):
        self.connections.add(request)
        super().process_request(request, client_address)


class Server(_Tracked, ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


class UnixServer(_Tracked, socketserver.ThreadingUnixStreamServer):
    """HTTP on a unix socket: the sandbox then needs no network to be reached, and nothing
    on the host's network can reach it."""

    daemon_threads = True
    request_queue_size = 64


TOKEN_FILE = ".token-sha256"   # beside the socket: a live fork's own token's hash (Listener)
WAKE_FILE = ".listen"   # beside the socket: the host's word, after a restore, to listen again (Listener)
QUIET_LOOK = 0.1   # how often a quiet server looks for WAKE_FILE (seconds): a look costs gVisor ~1 ms of CPU


class Listener:
    """The server's listening socket and its open connections, which a checkpoint must not hold.

    gVisor cannot save a socket bound or connected on the host (``--host-uds``: our unix socket),
    so before a live checkpoint SIGUSR1 makes the server let go of them all (the socket file
    goes: the host sees it is quiet). Before the restore the host leaves WAKE_FILE beside the
    socket, which the quiet server looks for every QUIET_LOOK, and it listens again (SIGUSR2 does
    the same: a signal to a restoring gVisor container took the engine 5 s and more when 32 forks
    restored at once). The app (sessions, background commands, their processes and memory) is
    untouched by all of it.
    """

    def __init__(self, cfg, app, ended):
        self._cfg, self._app, self._ended = cfg, app, ended
        self._lock = threading.Lock()
        self.httpd, self.where = None, None

    def _serve(self, httpd):
        try:
            httpd.serve_forever(poll_interval=0.2)
        finally:
            if self.httpd is httpd:   # not closed on purpose: the server is broken, end it
                self._ended()

    def open(self):
        with self._lock:
            if self.httpd is not None:
                return
            self._take_new_token()
            httpd, self.where = listen(self._cfg)
            httpd.app, httpd.connections = self._app, set()
            self.httpd = httpd
            threading.Thread(target=self._serve, args=(httpd,), name="http", daemon=True).start()

    def close(self):
        with self._lock:
            httpd, self.httpd = self.httpd, None
            if httpd is None:
                return
            stopping = threading.Thread(target=httpd.shutdown, daemon=True)   # serve_forever returns
            stopping.start()
            while stopping.is_alive():
                self._wake(httpd)   # now, not at its next look (every 0.2 s)
                stopping.join(0.01)
            httpd.server_close()   # no new connection is accepted
            for connection in list(httpd.connections):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    connection.close()
            if self._cfg.socket_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._cfg.socket_path)
            self.told_to_listen()   # an old word to listen again (left by a host that signalled too) is not this quiet's

    def told_to_listen(self):
        """Whether the host has left WAKE_FILE beside the socket (taken: it wakes once)."""
        if not self._cfg.socket_path:
            return False
        try:
            os.unlink(os.path.join(os.path.dirname(self._cfg.socket_path), WAKE_FILE))
        except FileNotFoundError:
            return False
        except OSError as exc:
            log(f"cannot take the host's word to listen again: {exc}")
            return False
        return True

    def _take_new_token(self):
        """A sandbox restored from another's checkpoint (a live fork) holds that one's token in its
        memory: before it listens again, the host leaves the fork's own token's hash beside the
        socket (a directory the command user cannot enter), and it is taken from then on."""
        if not self._cfg.socket_path:
            return
        path = os.path.join(os.path.dirname(self._cfg.socket_path), TOKEN_FILE)
        try:
            with open(path) as handle:
                token_hash = handle.read().strip().lower()
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log(f"cannot read the new token in {path}: {exc}")
            return
        if re.fullmatch(r"[0-9a-f]{64}", token_hash):
            self._cfg.token_hash = token_hash
            log("took a new token")
        else:
            log(f"ignored {path}: not a SHA-256 hash")

    def _wake(self, httpd):
        """Make the server's wait for connections end: a connection of our own (it ends at once)."""
        if not self._cfg.socket_path:
            return   # TCP: shutdown waits for the next look
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as poke:
            poke.connect(self._cfg.socket_path)


def listen(cfg):
    """The server for cfg: on its unix socket when one is given, else on TCP."""
    if cfg.socket_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cfg.socket_path)   # a stale socket of an earlier run of this container
        httpd = UnixServer(cfg.socket_path, Handler)
        # Who may connect is decided by the directory the socket lives in (the host makes it
        # private to the sandbox's actor; the command user cannot enter it) and by the token.
        os.chmod(cfg.socket_path, 0o666)
        return httpd, cfg.socket_path
    server_cls = Server
    if ":" in cfg.bind:
        server_cls = type("Server6", (Server,), {"address_family": socket.AF_INET6})
    httpd = server_cls((cfg.bind, cfg.port), Handler)
    return httpd, f"{cfg.bind}:{httpd.server_address[1]}"


def main():
    try:
        cfg = load_config()
    except ValueError as exc:
        log(f"configuration error: {exc}")
        return 2
    if not os.path.isdir(cfg.home):
        try:
            os.makedirs(cfg.home, exist_ok=True)
            cfg.run_as.own(cfg.home)
        except OSError as exc:
            log(f"cannot create home directory {cfg.home}: {exc}")
    for path in cfg.user_dirs:
        try:
            cfg.run_as.own(path)   # the thread's mounted directories are the command user's to write
        except OSError as exc:
            log(f"cannot give {path} to {cfg.run_as.name}: {exc}")
    # The main thread waits for signals: to stop; to be quiet for a checkpoint and back after a
    # restore (see Listener). A handler only notes what is wanted. The wait is a select on a pipe
    # that every signal writes to (signal.set_wakeup_fd), whichever thread the signal lands on: a
    # signal landing on another thread would not cut a plain wait short (its handler runs once
    # that wait ends), which made a quiet take 0.2 s; the loop still looks every 0.2 s (after a
    # restore one wait was seen to last 10 s and more: 1 restore in 6 never listened again while
    # it waited 1 s at a time).
    wanted = {"open": True, "stop": False}
    woken, wake = os.pipe()
    os.set_blocking(wake, False)
    signal.set_wakeup_fd(wake)

    def want(**what):
        wanted.update(what)

    app = App(cfg)
    listener = Listener(cfg, app, ended=lambda: want(stop=True))
    try:
        listener.open()
    except OSError as exc:
        log(f"cannot listen on {cfg.socket_path or f'{cfg.bind}:{cfg.port}'}: {exc}")
        return 1
    signal.signal(signal.SIGTERM, lambda *_: want(stop=True))
    signal.signal(signal.SIGINT, lambda *_: want(stop=True))
    signal.signal(signal.SIGUSR1, lambda *_: want(open=False))
    signal.signal(signal.SIGUSR2, lambda *_: want(open=True))
    log(f"listening on {listener.where} (auth {'on' if cfg.token else 'off'}, commands as {cfg.run_as.name}, "
        f"home {cfg.home}, max output {cfg.max_output} bytes)")
    while not wanted["stop"]:
        quiet = listener.httpd is None
        if select.select([woken], [], [], QUIET_LOOK if quiet else 0.2)[0]:
            os.read(woken, 512)  # (the handlers run as this returns)
        if quiet and not wanted["open"] and listener.told_to_listen():
            wanted["open"] = True
        if wanted["open"] and listener.httpd is None and not wanted["stop"]:
            try:
                listener.open()
                log(f"listening again on {listener.where}")
            except OSError as exc:
                log(f"cannot listen again on {listener.where}: {exc}")
        elif not wanted["open"] and listener.httpd is not None:
            listener.close()
            log("quiet: no listening socket, no connection (for a checkpoint)")
    log("shutting down")
    app.shutdown()
    listener.close()
    sys.stderr.flush()
    # Handler threads may be blocked on pipes or sockets; don't wait for them.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
