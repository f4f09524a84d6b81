"""What a SandboxActor needs of the pool's config, as plain frozen dataclasses.

The pool validates its :class:`~sandbox_actors.config.SandboxConfig` (pydantic) once; each
SandboxActor gets this copy of the part it uses instead. A process that unpickles a pydantic
model must import pydantic and build the config's models; without them (see
``sandbox.py``'s ``_ray_without_pydantic``) a SandboxActor's process starts on ~60 ms less CPU
and holds ~6 MB less, which each of a burst's new actors pays. Nothing here imports pydantic:
a key the actors need is added to :meth:`ActorConfig.of` as well as to the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backends.base import Limits, Mount
from backends.firewall import NetworkPolicy
from backends.specs import ENV_NAME, BackendSpec, resolve, resolve_environment

__all__ = ["ENV_NAME", "ActorConfig", "resolve", "resolve_environment"]

if TYPE_CHECKING:
    from .config import SandboxConfig


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
    backend: BackendSpec  # where its sandbox runs (it builds that backend)
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
    usage_interval: float = 0.0
    egress_ca: bool = False  # its sandboxes trust the pool's egress CA (network.inject: HTTPS ended at the proxy)

    @classmethod
    def of(cls, config: SandboxConfig) -> ActorConfig:
        limits = config.limits
        return cls(
            pool_name=config.pool_name, namespace=config.namespace, image=config.image, port=config.port,
            container_prefix=config.container_prefix, readiness_timeout=config.readiness_timeout,
            exec_timeout=config.exec_timeout, backend=config.backend.spec(), network_policy=config.network.policy(),
            limits=Limits(memory=limits.memory, cpus=limits.cpus, pids=limits.pids, disk=limits.disk),
            capabilities=tuple(config.capabilities), bind_host=config.bind_host, user=config.user,
            runtime=config.runtime, read_only_rootfs=config.read_only_rootfs, socket_dir=config.socket_dir,
            host_socket_dir=config.host_socket_dir, environment=dict(config.environment),
            thread_mounts=config.thread_mounts, base_dir=config.base_dir, host_dir=config.host_dir,
            mounts=tuple(Mount(m.host_path, m.container_path, m.read_only) for m in config.mounts),
            skills_path=config.skills_path, host_skills_path=config.host_skills_path,
            skills_container_path=config.skills_container_path, usage_interval=config.usage_interval,
            egress_ca=bool(config.network.allow_domains and config.network.inject),
        )

    def resolved_environment(self, source: Mapping[str, str] | None = None) -> dict[str, str]:
        """``environment`` with ``$NAME`` values read from ``source`` (default: this node's env)."""
        return resolve_environment(self.environment, source)
