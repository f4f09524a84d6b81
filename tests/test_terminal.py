"""`sandbox-actors shell` driven through a real terminal (tmux): type a command and see its
output, resize, detach, come back and see what was missed replayed, exit. And `box.pty()` from
Python: two clients of one terminal, the second attaching after the first detached."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tmux:
    """A tmux server of this test's own, its sessions' screens read as text."""

    def __init__(self) -> None:
        if shutil.which("tmux") is None:
            if os.environ.get("SANDBOX_ACTORS_CI"):
                pytest.fail("tmux is missing (scripts/bootstrap installs it)")
            pytest.skip("tmux is missing (scripts/bootstrap installs it)")
        self.socket = f"sat-{uuid.uuid4().hex[:8]}"

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout

    def start(self, name: str, command: str, cols: int = 100, rows: int = 30) -> None:
        self.run("new-session", "-d", "-s", name, "-x", str(cols), "-y", str(rows), command)

    def screen(self, name: str) -> str:
        return self.run("capture-pane", "-p", "-J", "-S", "-200", "-t", name)

    def keys(self, name: str, *keys: str) -> None:
        self.run("send-keys", "-t", name, *keys)

    def wait_for(self, name: str, pattern: str, timeout: float = 30) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def shown() -> bool:
            match = re.search(pattern, self.screen(name))
            if match:
                found.append(match)
            return match is not None

        assert wait_until(shown, timeout=timeout, interval=0.2), f"{pattern!r} not on screen:\n{self.screen(name)}"
        return found[-1]

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30, check=False)


def test_the_shell_command_in_a_real_terminal_types_resizes_detaches_and_comes_back(ray_address, pool):
    tmux = Tmux()
    cli = (f"cd {shlex.quote(ROOT)} && RAY_ADDRESS={shlex.quote(ray_address)} {shlex.quote(sys.executable)} -m "
           f"sandbox_actors.cli shell typed --pool {pool.config.pool_name} --namespace {pool.config.namespace}")
    try:
        tmux.start("first", f"{cli}; echo CLI-EXITED-$?; sleep 60")
        tmux.wait_for("first", r"Ctrl-\] detaches")
        tmux.keys("first", "echo hi-$((6*7))", "Enter")
        tmux.wait_for("first", r"\nhi-42")
        tmux.run("resize-window", "-t", "first", "-x", "120", "-y", "40")
        tmux.keys("first", "stty size", "Enter")
        tmux.wait_for("first", r"\n40 120")
        tmux.keys("first", "echo while-away > /tmp/away; sleep 1; echo printed-while-away", "Enter")
        tmux.keys("first", "C-]")
        detached = tmux.wait_for("first", r"--attach ([0-9a-f]{32})")
        tmux.wait_for("first", r"CLI-EXITED-0")
        terminal_id = detached.group(1)
        time.sleep(1.5)  # it prints while nobody reads

        tmux.start("again", f"{cli} --attach {terminal_id}; echo CLI-EXITED-$?; sleep 60", cols=120, rows=40)
        tmux.wait_for("again", r"printed-while-away")  # replayed: it was printed after the detach
        assert "hi-42" in tmux.screen("again")  # and what came before, from its last 64 KB
        tmux.keys("again", "cat /tmp/away; exit 7", "Enter")
        tmux.wait_for("again", r"shell ended: exit 7")
        tmux.wait_for("again", r"CLI-EXITED-7")
    finally:
        tmux.close()
    box = pool.acquire("typed")
    assert box.exec("cat /tmp/away").output.strip() == "while-away"  # the same sandbox, typed into


def test_two_clients_of_one_terminal_from_python(pool):
    box = pool.acquire("pty")
    first = box.pty(cols=90, rows=20)
    first.write("export MARK=kept; stty size\r")
    assert "20 90" in first.read_until("20 90")
    terminal_id = first.detach()
    first_offset = first.offset
    second = box.pty(attach=terminal_id)
    assert "20 90" in second.read_until("20 90")  # the replay
    second.resize(132, 43)
    second.write("echo $MARK; stty size\r")
    assert "43 132" in second.read_until("43 132")
    assert second.offset > first_offset
    assert second.close() is not None and second.ended
    with pytest.raises(Exception, match="no terminal"):
        box.pty_write(terminal_id, "echo gone\r")
    assert [e["kind"] for e in box.audit()] == ["pty"]
