"""Interactive terminals in a sandbox: ``box.pty()`` and ``box.pty(attach=ID)``.

A terminal is an interactive bash on a pseudo-terminal inside the sandbox; it lives there (see
``api.pty_open``), whoever reads it. A :class:`Terminal` is one client's view of it: what it
types, the size it sets, the output it reads from where it left off. Detaching stops reading and
leaves the terminal running; attaching again (from any process, on any node: the reads go
through the sandbox's actor) replays what was missed, up to the last 64 KB.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from backends.sandbox_api import TerminalExit, TerminalOutput

from . import raycalls
from .api import STREAM_BACKLOG
from .errors import SandboxError


class Terminal:
    """One client of a terminal in a sandbox (see the module's docstring).

    Attributes:
        id: the terminal's id (attach again with ``box.pty(attach=id)``).
        offset: how much of the terminal's output this client has read (bytes since it began).
        exit_code: its shell's exit code once it has ended (None until then).
    """

    def __init__(self, box: Any, terminal_id: str, offset: int = 0) -> None:  # a SandboxHandle
        self.box, self.id, self.offset = box, terminal_id, offset
        self.exit_code: int | None = None
        self.ended = False
        self._reading: Iterator[Any] | None = None

    def write(self, data: str) -> int:
        """Type ``data`` ("\\r" is Enter, "\\x03" Ctrl-C)."""
        return self.box.pty_write(self.id, data)

    def resize(self, cols: int, rows: int) -> None:
        self.box.pty_resize(self.id, cols, rows)

    def output(self) -> Iterator[bytes]:
        """What the terminal prints from where this client left off, as it prints it; ends when
        its shell ends (``exit_code`` set) or the client detaches (from any thread)."""
        # The actor's stream itself (not box.pty_output's iterator): a detach from another thread
        # cancels it while this one waits on it.
        generator = self.box.actor.pty_output.options(_generator_backpressure_num_objects=STREAM_BACKLOG).remote(
            self.box.sandbox_id, self.id, self.offset)
        self._reading = generator
        try:
            for ref in generator:
                try:
                    item = self.box._wait(ref)
                except SandboxError:
                    if self._reading is None:
                        return  # detached meanwhile: its cancel cut the stream
                    raise
                data = _take(self, item)
                if data is None:
                    return
                yield data
        finally:
            self._stop_reading()

    def read_until(self, text: str, timeout: float = 10.0) -> str:
        """Read until ``text`` has come (what came, decoded); TimeoutError when it does not
        come within ``timeout`` seconds (what came is in the message)."""
        seen, deadline = b"", time.monotonic() + timeout
        for data in self.output():
            seen += data
            if text.encode() in seen or time.monotonic() > deadline:
                break
        self._stop_reading()
        decoded = seen.decode(errors="replace")
        if text not in decoded:
            raise TimeoutError(f"{text!r} did not come from terminal {self.id} within {timeout:.0f}s; came: "
                               f"{decoded[-500:]!r}")
        return decoded

    def detach(self) -> str:
        """Stop reading; the terminal goes on. Returns its id (for ``box.pty(attach=...)``)."""
        self._stop_reading()
        return self.id

    def close(self) -> int | None:
        """End the terminal; its shell's exit code."""
        self._stop_reading()
        self.exit_code, self.ended = self.box.pty_close(self.id), True
        return self.exit_code

    def _stop_reading(self) -> None:
        reading, self._reading = self._reading, None
        if reading is not None:
            raycalls.cancel(reading)  # the actor's stream ends, and with it its read of the terminal


class AsyncTerminal:
    """:class:`Terminal`, awaitable (``await box.aio.pty()``)."""

    def __init__(self, box: Any, terminal_id: str, offset: int = 0) -> None:  # an AsyncSandboxHandle
        self.box, self.id, self.offset = box, terminal_id, offset
        self.exit_code: int | None = None
        self.ended = False

    async def write(self, data: str) -> int:
        return await self.box.pty_write(self.id, data)

    async def resize(self, cols: int, rows: int) -> None:
        await self.box.pty_resize(self.id, cols, rows)

    async def output(self) -> AsyncIterator[bytes]:
        async for item in self.box.pty_output(self.id, self.offset):
            data = _take(self, item)
            if data is None:
                return
            yield data

    def detach(self) -> str:
        return self.id

    async def close(self) -> int | None:
        self.exit_code, self.ended = await self.box.pty_close(self.id), True
        return self.exit_code


def _take(client: Terminal | AsyncTerminal, item: TerminalOutput | TerminalExit) -> bytes | None:
    """One item of a terminal's output for ``client``: its bytes (the client's offset moved past
    them), or None when the terminal's shell has ended (its exit code kept)."""
    if isinstance(item, TerminalExit):
        client.exit_code, client.ended = item.exit_code, True
        return None
    client.offset = item.offset + len(item.data)
    return item.data
