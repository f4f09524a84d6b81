"""What our commands print: Ray's worker-start warning replaced by one line of ours.

Each sandbox has an actor process of its own, so a burst of sandboxes starts many Python
workers at once, and the raylet warns on every driver ("N PYTHON worker processes have been
started ... the maximum expected startup concurrency"). Ray caps that concurrency at the
node's CPU count and offers no setting to silence the warning, so our commands filter it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO, TypeVar

T = TypeVar("T")
R = TypeVar("R")

RAYLET_WORKER_WARNING = "worker processes have been started on node"
EXPLANATION = (
    "note: Ray warned that many worker processes started at once: each sandbox has an actor process "
    "of its own, so a burst of sandboxes starts many. This is expected and needs no action."
)


class FilteredStream:
    """A text stream that drops Ray's worker-start warning (printing our explanation once)."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner
        self._explained = False
        self._eat_newline = False

    def write(self, text: str) -> int:
        if self._eat_newline and text == "\n":  # print() writes the line's end apart
            self._eat_newline = False
            return len(text)
        self._eat_newline = False
        if RAYLET_WORKER_WARNING in text:
            lines = text.splitlines(keepends=True)
            kept = "".join(line for line in lines if RAYLET_WORKER_WARNING not in line)
            self._eat_newline = not lines[-1].endswith("\n")
            if not self._explained:
                self._explained = True
                kept += EXPLANATION + "\n"
            self._inner.write(kept)
            return len(text)
        return self._inner.write(text)

    def flush(self) -> None:
        self._inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def filter_ray_warnings() -> None:
    """Filter this process's stdout and stderr (idempotent)."""
    if not isinstance(sys.stdout, FilteredStream):
        sys.stdout = FilteredStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, FilteredStream):
        sys.stderr = FilteredStream(sys.stderr)  # type: ignore[assignment]


def run_all(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``fn`` over ``items`` on ``workers`` threads. On Ctrl-C, return at once (calls not begun
    are dropped; running ones end as the caller cleans up) instead of waiting for every call."""
    executor = ThreadPoolExecutor(workers)
    try:
        results = list(executor.map(fn, items))
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown()
    return results
