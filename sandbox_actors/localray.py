"""Finding, starting and stopping the Ray cluster the CLI talks to.

``sandbox-actors up`` attaches to the cluster this machine belongs to, or
starts a local head of its own that outlives the command. That head runs with
a temp dir of its own, and ``down`` stops exactly the processes that use that
dir: never any other Ray cluster (no ``ray stop``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from .config import state_home
from .errors import ConfigError, SandboxError, SandboxNotFound

STATE_DIR = Path(state_home())
HEAD_FILE = STATE_DIR / "ray-head.json"
# Ray puts unix sockets under its temp dir; keep the path short.
HEAD_TEMP_DIR = Path(os.environ.get("SANDBOX_ACTORS_RAY_TEMP", "/tmp/sandbox-actors-ray"))
TOKEN_FILE = Path.home() / ".ray" / "auth_token"


class NoCluster(SandboxNotFound):
    """No Ray cluster to attach to."""


class ClusterMismatch(ConfigError):
    """The Ray cluster found runs another Python or Ray than this process: no driver of this
    process can attach to it."""


def _init(**kwargs: Any) -> None:
    """``ray.init``, its refusal of a cluster of another Python or Ray said as such (Ray raises a
    bare RuntimeError with both versions in its text)."""
    try:
        ray.init(**kwargs)
    except RuntimeError as exc:
        text = str(exc)
        if not text.startswith("Version mismatch"):
            raise
        lines = [line.strip() for line in text.splitlines() if line.strip().startswith(("Ray:", "Python:"))]
        theirs, ours = ", ".join(lines[:2]), ", ".join(lines[2:4])
        versions = f"runs {theirs}, this process {ours}" if theirs and ours else \
            "runs another Python or Ray than this process"
        raise ClusterMismatch(
            f"the Ray cluster found here {versions}: a process attaches only to a cluster of its own Python and "
            "Ray; run this with the cluster's Python, or give --address (RAY_ADDRESS) of a cluster of this one"
        ) from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except (OSError, ValueError):
        return False


def our_head() -> dict | None:
    """The head ``up`` started, if its record exists and its GCS still answers."""
    try:
        record = json.loads(HEAD_FILE.read_text())
    except (OSError, ValueError):
        return None
    return record if _answers(record.get("address", "")) else None


def resolve_address(explicit: str | None = None) -> str | None:
    """Where to attach: the flag, RAY_ADDRESS, the head ``up`` started, else None."""
    if explicit:
        return explicit
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    head = our_head()
    return head["address"] if head else None


def _use_token_auth_when_available() -> None:
    # Ray enables token auth for new clusters but, given an explicit address,
    # connects without a token unless told to: use the token when one is here.
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or TOKEN_FILE.exists():
        os.environ["RAY_AUTH_MODE"] = "token"
        # Ray caches its config at import; have it read the environment again.
        from ray._raylet import Config  # type: ignore[attr-defined]

        Config.initialize("")


def attach(explicit: str | None = None, *, fallback: str = "error") -> str:
    """``ray.init`` against the cluster to use.

    Args:
        explicit: an address given by the user.
        fallback: what to do when no cluster runs: 'error' (raise NoCluster),
            'local' (a local Ray that ends with this process) or 'head' (a
            local head that outlives it, stopped by ``down``).

    Returns:
        How it attached: 'initialized' (already was), 'attached', 'local' or 'started'.
    """
    import logging

    if ray.is_initialized():
        return "initialized"
    with _head_lock() if fallback == "head" else contextlib.nullcontext():
        # Under the lock, processes starting at once (deer-flow's workers) find the head the
        # first of them started instead of each starting one.
        address = resolve_address(explicit)
        how = "attached"
        if address is None:
            try:
                _init(address="auto", logging_level=logging.WARNING)
                return how
            except ConnectionError:
                if fallback == "error":
                    raise NoCluster("no Ray cluster is running here; start one with `sandbox-actors up`") from None
                if fallback == "local":
                    ray.init(logging_level=logging.WARNING)
                    return "local"
                address = start_head()
                how = "started"
        _use_token_auth_when_available()
        _init(address=address, logging_level=logging.WARNING)
        return how


@contextlib.contextmanager
def _head_lock() -> Iterator[None]:
    """This machine's lock on starting the head ``up`` starts (held while one starts)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "ray-head.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def attached_to_our_head() -> bool:
    """Whether this process is attached to the head ``up`` started (not to another cluster)."""
    head = our_head()
    return head is not None and ray.is_initialized() and ray.get_runtime_context().gcs_address == head["address"]


def start_head() -> str:
    """Start a local Ray head (detached from this process); returns its address."""
    port = _free_port()
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
        f"--temp-dir={HEAD_TEMP_DIR}", "--include-dashboard=false", "--disable-usage-stats",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    if result.returncode != 0:
        raise SandboxError(f"could not start a local Ray head:\n{result.stderr[-2000:]}")
    address = _started_address(result.stdout + result.stderr, port)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    HEAD_FILE.write_text(json.dumps({"address": address, "temp_dir": str(HEAD_TEMP_DIR), "started": time.time()}))
    return address


def _started_address(output: str, port: int) -> str:
    """The address `ray start` says to use (it picks the node IP itself)."""
    match = re.search(r"ray start --address='([^']+)'", output)
    return match.group(1) if match else f"{socket.gethostbyname(socket.gethostname())}:{port}"


def head_processes() -> list[int]:
    """PIDs of the head ``up`` started: Ray processes that use its temp dir, and all their
    descendants (Ray workers rename themselves, so only ancestry finds them)."""
    marker = str(HEAD_TEMP_DIR).encode()
    parents: dict[int, int] = {}
    roots = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        argv = cmdline.split(b"\0")
        # Ray's own daemons and workers only (their program lives in the ray package), not
        # any process that happens to mention the directory (say, a `tail -f` of a log there).
        if marker in cmdline and any(b"/ray/" in arg for arg in argv[:4]):
            roots.add(pid)
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return sorted(found)


def stop_head(timeout: float = 15.0) -> int:
    """Stop the head ``up`` started (and nothing else). Returns how many processes were stopped."""
    if not HEAD_FILE.exists():
        return 0
    pids = head_processes()
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    HEAD_FILE.unlink(missing_ok=True)
    return len(pids)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
