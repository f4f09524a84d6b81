"""``sandbox-actors shell THREAD``: a terminal in a thread's sandbox, in the person's own.

Keys go to the sandbox's terminal as typed (the local terminal in raw mode), its output comes
back as it is printed, a resize of the local window resizes it. Ctrl-] detaches: the terminal
goes on in the sandbox, and ``sandbox-actors shell THREAD --attach ID`` comes back to it,
showing what it printed meanwhile (its last 64 KB). The shell's ``exit`` ends it.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

DETACH_KEY = b"\x1d"  # Ctrl-]


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """The local terminal in raw mode (keys as typed, no local echo) while inside; as it was after."""
    if not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(box: Any, attach: str | None = None) -> int:
    """Drive a terminal of ``box`` (a new one, or the one named ``attach``) from this process's
    terminal until it ends (its exit code) or Ctrl-] detaches (0)."""
    stdin = sys.stdin.fileno()
    cols, rows = shutil.get_terminal_size()
    term = box.pty(cols, rows, attach=attach)
    if attach is not None:
        term.resize(cols, rows)
    out = sys.stdout.buffer
    err = sys.stderr
    err.write(f"[sandbox-actors: terminal {term.id} in sandbox {box.sandbox_id}; Ctrl-] detaches]\r\n")
    err.flush()
    done = threading.Event()

    def show() -> None:
        try:
            for data in term.output():
                out.write(data)
                out.flush()
        finally:
            done.set()

    def resized(_signum: int, _frame: Any) -> None:
        try:
            size = os.get_terminal_size(stdin)
        except OSError:
            return  # not a terminal: nothing to follow
        threading.Thread(target=term.resize, args=(size.columns, size.lines), daemon=True).start()

    reader = threading.Thread(target=show, name="terminal-output", daemon=True)
    reader.start()
    previous = signal.signal(signal.SIGWINCH, resized)
    detached = False
    try:
        with _raw(stdin):
            while not done.is_set():
                ready, _, _ = select.select([stdin], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(stdin, 4096)
                if not data or DETACH_KEY in data:
                    typed = data.split(DETACH_KEY, 1)[0]
                    if typed:
                        term.write(typed.decode("utf-8", "surrogateescape"))
                    detached = True
                    break
                term.write(data.decode("utf-8", "surrogateescape"))
    finally:
        signal.signal(signal.SIGWINCH, previous)
        if detached:
            term.detach()
        reader.join(5)
    if detached:
        err.write(f"\r\n[detached; the terminal goes on: sandbox-actors shell {box.thread_id or box.sandbox_id} "
                  f"--attach {term.id}]\r\n")
        return 0
    err.write(f"\r\n[the terminal's shell ended: exit {term.exit_code}]\r\n")
    return term.exit_code or 0
