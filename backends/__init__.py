"""Where sandbox containers run, and how to talk to them. Knows nothing of Ray."""

from .base import Backend, Limits, Mount, SandboxRecord, SandboxSpec
from .docker_backend import DockerBackend
from .provisioner import ProvisionerBackend
from .sandbox_api import BashResult, FileInfo, SandboxAPI, ShellResult

__all__ = [
    "Backend",
    "BashResult",
    "DockerBackend",
    "FileInfo",
    "Limits",
    "Mount",
    "ProvisionerBackend",
    "SandboxAPI",
    "SandboxRecord",
    "SandboxSpec",
    "ShellResult",
]
