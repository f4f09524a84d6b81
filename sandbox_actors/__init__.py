"""sandbox-actors: one isolated, long-lived container per AI-agent thread, served as Ray actors.

The error types load with the package; the client, config and result types on
first use, so an actor process does not pay for what only drivers need.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def _skip_httpx_cli() -> None:
    """In a Ray worker process (every SandboxActor is one), keep httpx from loading its
    command-line tool. httpx's package init imports it when it can (click and pygments, which Ray
    and pytest install: ~1.6 MB of every sandbox's process) and falls back to a stub when that
    import fails. Nothing in a worker runs httpx's CLI; a driver's httpx is left as it is."""
    if "httpx" not in sys.modules and sys.argv and os.path.basename(sys.argv[0]) == "default_worker.py":
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]  # None: its import raises ImportError


_skip_httpx_cli()

from . import errors as _errors  # noqa: E402  (it imports httpx, through backends)

__version__ = "0.1.0"

_EXPORTS = {
    "connect": "client",
    "PoolClient": "client",
    "SandboxHandle": "client",
    "Snapshot": "views",
    "SandboxConfig": "config",
    "load_config": "config",
    "BashResult": "backends.sandbox_api",
    "FileInfo": "backends.sandbox_api",
    "Mount": "backends.base",
    "ShellResult": "backends.sandbox_api",
    **{name: "errors" for name in _errors.__all__},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox_actors' has no attribute {name!r}")
    target = importlib.import_module(module if module.startswith("backends") else f"{__name__}.{module}")
    value = getattr(target, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
