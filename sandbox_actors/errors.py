"""The error tree users catch: backend errors plus the pool's own.

Everything derives from :class:`SandboxError`; ``retryable`` says whether the
same call may succeed later.
"""

from __future__ import annotations

from backends.errors import (
    BackendError,
    BackendUnauthorized,
    BackendUnavailable,
    CommandTimeout,
    ImageNotFound,
    InvalidRequest,
    IsolationUnavailable,
    NotSupported,
    ReadinessTimeout,
    ResourceLimitExceeded,
    SandboxAuthError,
    SandboxDied,
    SandboxError,
    SandboxExited,
    SandboxFileNotFound,
    SandboxNotFound,
    SandboxOperationError,
    SandboxOwned,
    SandboxStartError,
    SandboxUnreachable,
)


class ConfigError(SandboxError, ValueError):
    """The configuration has an unknown key or a bad value (the key is named)."""


class InvalidThreadId(InvalidRequest):
    """A thread id that cannot name a sandbox (empty, too long, not text)."""


class PoolExhausted(SandboxError):
    """No capacity within the deadline (hard cap reached or no free node slot). Retry later."""

    retryable = True


class PoolShutDown(SandboxError):
    """The pool was shut down; connect again to get a new one."""


class PoolUnavailable(SandboxError):
    """The pool actor could not be reached (restarting for too long, or Ray is gone)."""

    retryable = True


__all__ = [
    "BackendError",
    "BackendUnauthorized",
    "BackendUnavailable",
    "CommandTimeout",
    "ConfigError",
    "ImageNotFound",
    "InvalidRequest",
    "InvalidThreadId",
    "IsolationUnavailable",
    "NotSupported",
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
]
