"""sandbox-actors: one isolated, long-lived container per AI-agent thread, served as Ray actors.

Names are imported on first use, so an actor process that only needs
``sandbox_actors.sandbox`` does not pay for the client and CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "connect": "client",
    "PoolClient": "client",
    "SandboxHandle": "client",
    "SandboxConfig": "config",
    "load_config": "config",
    "BashResult": "backends.sandbox_api",
    "FileInfo": "backends.sandbox_api",
    "ShellResult": "backends.sandbox_api",
    **{
        name: "errors"
        for name in (
            "BackendError",
            "BackendUnavailable",
            "CommandTimeout",
            "ConfigError",
            "ImageNotFound",
            "InvalidRequest",
            "InvalidThreadId",
            "PoolExhausted",
            "PoolShutDown",
            "PoolUnavailable",
            "ReadinessTimeout",
            "ResourceLimitExceeded",
            "SandboxAuthError",
            "SandboxDied",
            "SandboxError",
            "SandboxExited",
            "SandboxFileNotFound",
            "SandboxNotFound",
            "SandboxOperationError",
            "SandboxOwned",
            "SandboxStartError",
            "SandboxUnreachable",
        )
    },
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
