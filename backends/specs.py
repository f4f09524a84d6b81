"""Where a pool's sandboxes run, as plain data each backend builds itself from.

A SandboxActor's process gets these (never the pydantic config: see
``sandbox_actors/actorconfig.py``). Each names its backend, which declares what it can do
(:class:`~backends.base.Capability`); nothing outside ``backends/`` asks which backend it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .base import Backend, Capability
from .docker_backend import DockerBackend
from .firewall import NetworkPolicy
from .provisioner import ProvisionerBackend


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def resolve(value: str, source: Mapping[str, str] | None = None) -> str:
    """A config value, or with ``$NAME`` the variable NAME of ``source`` (default: this
    process's environment; '' when unset)."""
    if not value.startswith("$"):
        return value
    return (os.environ if source is None else source).get(value[1:], "")


def resolve_environment(environment: Mapping[str, str], source: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environment`` with each ``$NAME`` value read from ``source`` (default: os.environ)."""
    return {key: resolve(value, source) for key, value in environment.items()}


@dataclass(frozen=True)
class DockerSpec:
    """Sandboxes are containers on the Docker engine of the node their actor runs on."""

    backend: ClassVar[type[Backend]] = DockerBackend

    @property
    def capabilities(self) -> frozenset[Capability]:
        return self.backend.capabilities

    def build(self, *, prefix: str, pool: str, policy: NetworkPolicy | None = None, socket_dir: str | None = None,
              host_socket_dir: str | None = None, labels: Mapping[str, str] | None = None) -> Backend:
        return DockerBackend(prefix, policy=policy, socket_dir=socket_dir, host_socket_dir=host_socket_dir,
                             labels=dict(labels) if labels else None)


@dataclass(frozen=True)
class ProvisionerSpec:
    """Sandboxes come from a remote provisioner service (e.g. pods on Kubernetes)."""

    backend: ClassVar[type[Backend]] = ProvisionerBackend
    url: str
    api_key: str | None = field(default=None, repr=False)
    create_timeout: float = 30
    delete_timeout: float = 15
    request_timeout: float = 10

    @property
    def capabilities(self) -> frozenset[Capability]:
        return self.backend.capabilities

    def resolved_api_key(self, source: Mapping[str, str] | None = None) -> str:
        """``api_key`` with a ``$NAME`` value read from ``source`` (default: this node's env)."""
        return resolve(self.api_key or "", source)

    def build(self, *, prefix: str, pool: str, **_docker_only: Any) -> Backend:
        return ProvisionerBackend(self.url, api_key=self.resolved_api_key(), prefix=prefix, pool=pool,
                                  create_timeout=self.create_timeout, delete_timeout=self.delete_timeout,
                                  request_timeout=self.request_timeout)


BackendSpec = DockerSpec | ProvisionerSpec
