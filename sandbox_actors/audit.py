"""A sandbox's audit trail: which commands ran (and, with an egress proxy, which hosts were reached).

The runtime records each command it runs for its sandbox: when, how (exec, bash, stream,
background start), the command's text (its first 2,000 characters; `bash`'s environment, where
secrets go, is never recorded), how it ended, and what it used. A thread's trail is appended to
``<base_dir>/threads/<thread>/audit.jsonl`` on the host (outside every mount: the sandbox cannot
read or rewrite it), so it outlives the actor, a hibernation and a pool restart; an anonymous
sandbox's trail lives with its actor only (its egress attempts sent there by the node's proxy).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COMMAND_CHARS = 2000
KEPT_IN_MEMORY = 1000


class AuditLog:
    """The commands run in one sandbox, newest last."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.count = 0
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=KEPT_IN_MEMORY)
        # Appends go to a thread of their own, in order: the trail may sit on shared storage, and
        # the runtime records from its event loop.
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None

    @contextmanager
    def command(self, kind: str, command: str) -> Iterator[dict[str, Any]]:
        """Record a command around its run: the caller fills in its result (``exit_code``,
        ``status``, ``cpu_seconds``, ``peak_memory_bytes``); an error is recorded as such."""
        entry: dict[str, Any] = {"at": round(time.time(), 3), "kind": kind, "command": command[:COMMAND_CHARS],
                                 "exit_code": None, "status": None, "cpu_seconds": None, "peak_memory_bytes": None}
        began = time.monotonic()
        try:
            yield entry
        except BaseException as exc:
            entry["error"] = type(exc).__name__
            raise
        finally:
            entry["seconds"] = round(time.monotonic() - began, 3)
            self.add(entry)

    def ended(self, entry: dict[str, Any], result: Any) -> None:
        """Fill ``entry`` in from a command's result (ShellResult or BashResult)."""
        for name in ("exit_code", "status", "cpu_seconds", "peak_memory_bytes"):
            entry[name] = getattr(result, name, None)

    def add(self, entry: dict[str, Any], command: bool = True) -> None:
        """Into the trail (``command``: a command run, counted in ``count``; else an egress attempt)."""
        self.count += command
        self._recent.append(entry)
        if self.path is None:
            return
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audit")
        self._writer.submit(append, self.path, entry)

    def close(self) -> None:
        """Finish the appends under way and let their thread go."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def entries(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` entries: the thread's whole trail when it has a file here (every
        entry added before this call written first), else those of this actor."""
        if self._writer is not None:
            self._writer.submit(lambda: None).result()  # the appends queued before it are done
        if self.path is not None and self.path.is_file():
            with open(self.path, encoding="utf-8") as trail:
                lines = collections.deque(trail, maxlen=limit)
            found = []
            for line in lines:
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash mid-write
            return found
        return list(self._recent)[-limit:]


def append(path: Path, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the trail in ``path`` (blocking: call it off any event loop)."""
    try:
        with open(path, "a", encoding="utf-8") as trail:
            trail.write(json.dumps(entry) + "\n")
    except OSError as exc:  # the trail must never fail the command it records
        logger.warning("audit trail %s not written: %s", path, exc.strerror or exc)
