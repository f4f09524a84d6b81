"""What a SandboxActor needs of the pool's config, as plain frozen dataclasses.

The pool validates its :class:`~sandbox_actors.config.SandboxConfig` (pydantic) once; each
SandboxActor gets this copy of the part it uses instead. A process that unpickles a pydantic
model must import pydantic and build the config's models; without them (see
``sandbox.py``'s ``_ray_without_pydantic``) a SandboxActor's process starts on ~60 ms less CPU
and holds ~6 MB less, which each of a burst's new actors pays. Nothing here imports pydantic:
a key the actors need is added to :meth:`ActorConfig.of` as well as to the config.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backends.base import Limits, Mount
from backends.firewall import NetworkPolicy

if TYPE_CHECKING:
    from .config import SandboxConfig

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
class Provisioner:
    """A provisioner backend (``backend: {kind: provisioner, ...}``)."""

    url: str
    api_key: str | None = field(default=None, repr=False)
    create_timeout: float = 30
    delete_timeout: float = 15
    request_timeout: float = 10

    def resolved_api_key(self, source: Mapping[str, str] | None = None) -> str:
        """``api_key`` with a ``$NAME`` value read from ``source`` (default: this node's env)."""
        return resolve(self.api_key or "", source)


@dataclass(frozen=True)
class ActorConfig:
    """The pool's config as its SandboxActors see it (see :class:`SandboxConfig` for each key)."""

    pool_name: str
    namespace: str
    image: str
    port: int
    container_prefix: str
    readiness_timeout: float
    exec_timeout: float
    provisioner: Provisioner | None  # None: the Docker engine of the actor's node
    network_policy: NetworkPolicy
    limits: Limits
    capabilities: tuple[str, ...]
    bind_host: str
    user: str
    runtime: str | None
    read_only_rootfs: bool
    socket_dir: str | None
    host_socket_dir: str | None
    environment: Mapping[str, str]
    thread_mounts: bool
    base_dir: str
    host_dir: str
    mounts: tuple[Mount, ...]  # the extra mounts of every sandbox (``mounts``)
    skills_path: str | None
    host_skills_path: str | None
    skills_container_path: str

    @classmethod
    def of(cls, config: SandboxConfig) -> ActorConfig:
        backend = config.backend
        provisioner = None
        if backend.kind == "provisioner":
            provisioner = Provisioner(backend.url, backend.api_key, backend.create_timeout, backend.delete_timeout,
                                      backend.request_timeout)
        limits = config.limits
        return cls(
            pool_name=config.pool_name, namespace=config.namespace, image=config.image, port=config.port,
            container_prefix=config.container_prefix, readiness_timeout=config.readiness_timeout,
            exec_timeout=config.exec_timeout, provisioner=provisioner, network_policy=config.network.policy(),
            limits=Limits(memory=limits.memory, cpus=limits.cpus, pids=limits.pids, disk=limits.disk),
            capabilities=tuple(config.capabilities), bind_host=config.bind_host, user=config.user,
            runtime=config.runtime, read_only_rootfs=config.read_only_rootfs, socket_dir=config.socket_dir,
            host_socket_dir=config.host_socket_dir, environment=dict(config.environment),
            thread_mounts=config.thread_mounts, base_dir=config.base_dir, host_dir=config.host_dir,
            mounts=tuple(Mount(m.host_path, m.container_path, m.read_only) for m in config.mounts),
            skills_path=config.skills_path, host_skills_path=config.host_skills_path,
            skills_container_path=config.skills_container_path,
        )

    def resolved_environment(self, source: Mapping[str, str] | None = None) -> dict[str, str]:
        """``environment`` with ``$NAME`` values read from ``source`` (default: this node's env)."""
        return resolve_environment(self.environment, source)
