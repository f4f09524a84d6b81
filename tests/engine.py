"""The local Docker engine, as the fault tests stop, pause and start it again.

One way for every test that does so (test_faults, test_truth, the chaos run): the running
dockerd is found by its process, stopped with SIGTERM (its containers stop with it) and started
again with the command line it was started with.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import docker
import docker.errors

class LocalEngine:
    """The dockerd process of this machine."""

    def __init__(self, pid: int, command: list[bytes]) -> None:
        self.pid, self.command = pid, command

    @classmethod
    def find(cls) -> LocalEngine | None:
        """The running dockerd (not a zombie an earlier restart left), or None when none runs here."""
        found = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True, check=False)
        for pid in (int(word) for word in found.stdout.split()):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            except OSError:
                continue
            if _alive(pid):
                return cls(pid, command)
        return None

    def running(self) -> bool:
        """Its process exists and is not a zombie (one that exited but was not reaped yet)."""
        return _alive(self.pid)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM, and wait until it is gone (its containers stop with it)."""
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.running():
            raise RuntimeError(f"dockerd {self.pid} did not stop within {timeout:.0f} s")

    def start(self, log: Path | None = None, timeout: float = 60) -> docker.DockerClient:
        """Start it again as it was started; a client once it answers. It is started detached,
        through a shell that exits at once: no test process is its parent, so whichever process
        stops it next (a test, the chaos run) never leaves it a zombie that its parent must reap."""
        out = log or Path(tempfile.gettempdir()) / "sandbox-actors-tests-dockerd.log"
        launched = subprocess.run(
            ["sh", "-c", 'out="$1"; shift; setsid "$@" >>"$out" 2>&1 </dev/null & echo $!', "sh", str(out),
             *(os.fsdecode(word) for word in self.command)],
            capture_output=True, text=True, check=True,
        )
        self.pid = int(launched.stdout.split()[-1])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                client = docker.from_env()
                client.ping()
                return client
            except docker.errors.DockerException:
                time.sleep(0.5)
        raise RuntimeError(f"the Docker engine did not answer within {timeout:.0f} s of its start")

    def restart(self, log: Path | None = None) -> docker.DockerClient:
        self.stop()
        return self.start(log)

    def pause(self) -> None:
        """SIGSTOP: it stops answering; its containers keep running."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def shims_left() -> list[str]:
    """containerd shims of containers the engine no longer has (ours leaked one per checkpoint of
    a restored container, until the backend cleared containerd's task after each checkpoint)."""
    client = docker.from_env()
    try:
        known = {c.id for c in client.containers.list(all=True)}
    finally:
        client.close()
    left = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and "containerd-shim" in argv[0] and "-id" in argv:
            container = argv[argv.index("-id") + 1]
            if container not in known:
                left.append(container)
    return left
