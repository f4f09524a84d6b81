"""sandbox-actors: one isolated, long-lived container per AI-agent thread, served as Ray actors."""

from backends.sandbox_api import BashResult, FileInfo, ShellResult

from .client import PoolClient, SandboxHandle, connect
from .config import SandboxConfig, load_config
from .errors import (
    BackendUnavailable,
    CommandTimeout,
    ConfigError,
    ImageNotFound,
    InvalidRequest,
    InvalidThreadId,
    PoolExhausted,
    PoolShutDown,
    PoolUnavailable,
    ReadinessTimeout,
    SandboxDied,
    SandboxError,
    SandboxFileNotFound,
    SandboxStartError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "BashResult",
    "CommandTimeout",
    "ConfigError",
    "FileInfo",
    "ImageNotFound",
    "InvalidRequest",
    "InvalidThreadId",
    "PoolClient",
    "PoolExhausted",
    "PoolShutDown",
    "PoolUnavailable",
    "ReadinessTimeout",
    "SandboxConfig",
    "SandboxDied",
    "SandboxError",
    "SandboxFileNotFound",
    "SandboxHandle",
    "SandboxStartError",
    "ShellResult",
    "connect",
    "load_config",
]
