"""Configuration: one closed pydantic model, validated once, never mutated.

The keys of the original single-process provider keep their names and
defaults (``image``, ``port``, ``container_prefix``, ``idle_timeout``,
``replicas``, ``mounts``, ``environment``, ``provisioner_url``); the rest is
what an actor-based pool needs. Load it from YAML (:func:`load_config`) or
build it in Python (``SandboxConfig(replicas=5)``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from backends.base import Capability
from backends.egress import EgressRules, Secret, name_allowed
from backends.firewall import AllowRule, NetworkPolicy, parse_ipv4_network
from backends.network import MAX_SOCKET_DIR

from backends.settings import BackendConfig, DockerBackendConfig, shortcut
from backends.specs import ENV_NAME, resolve_environment
from .errors import ConfigError

DEFAULT_IMAGE = "sandbox-actors-minimal:latest"
_CONTAINER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$")
_MEMORY = re.compile(r"^\d+(\.\d+)?[bkmgBKMG]?$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class MountConfig(_Closed):
    """An extra bind mount for every sandbox of the pool."""

    host_path: str = Field(description="Directory on the engine's host.")
    container_path: str = Field(description="Absolute path inside the sandbox.")
    read_only: bool = Field(default=False, description="Mount read-only.")

    @field_validator("container_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or ".." in Path(value).parts:
            raise ValueError("must be an absolute path without '..'")
        return value


class LimitsConfig(_Closed):
    """Per-container resource limits (None removes a limit)."""

    memory: str | None = Field(default="1g", description="Memory limit, e.g. '512m', '2g'.")
    cpus: float | None = Field(default=1.0, gt=0, description="CPU limit in cores.")
    pids: int | None = Field(default=512, gt=0, description="Maximum processes in the container.")
    disk: str | None = Field(
        default=None, description="Writable-layer size limit, e.g. '10g' (needs a storage driver with quotas)."
    )

    @field_validator("memory", "disk")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and not _MEMORY.match(value):
            raise ValueError("must look like '512m' or '2g'")
        return value


class SecretSource(_Closed):
    """Where an injected header's value is read on the host: one of ``env`` and ``file``."""

    env: str | None = Field(default=None, description="an environment variable of the node's Ray processes")
    file: str | None = Field(default=None, description="a file on the node (its content, stripped)")

    @model_validator(mode="after")
    def _one(self) -> SecretSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret is {env: NAME} or {file: PATH}, one of them")
        return self


_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?$",
                     re.IGNORECASE)


class NetworkConfig(_Closed):
    """What a pool's sandboxes may reach over the network."""

    egress: Literal["open", "allowlist", "none"] = Field(
        default="open",
        description="'open': anything but what is always blocked; 'allowlist': only `allow`; 'none': no network.",
    )
    allow: tuple[str, ...] = Field(
        default=(), description="With egress 'allowlist': destinations as CIDR, CIDR:PORT or CIDR:PORT/udp."
    )
    blocked: tuple[str, ...] = Field(
        default=(), description="IPv4 CIDRs refused besides the node, its Docker gateways and 169.254.0.0/16."
    )
    enforce: bool = Field(
        default=True,
        description="Install the isolation rules (iptables; needs root). False runs sandboxes without them.",
    )
    allow_domains: tuple[str, ...] = Field(
        default=(), description="With egress 'allowlist': host names reachable through the pool's egress proxy "
        "(HTTP by Host, HTTPS by SNI, DNS answered only for these), exact or '*.suffix'.",
    )
    inject: dict[str, dict[str, SecretSource]] = Field(
        default_factory=dict, description="Headers the egress proxy adds to HTTP and HTTPS requests for a domain "
        "(name or '*.suffix'): {DOMAIN: {HEADER: {env: NAME} or {file: PATH}}}, read on the host. HTTPS to such a "
        "domain is ended at the proxy with the pool's CA, which its sandboxes trust.",
    )
    upstream_ca: str | None = Field(
        default=None, description="A CA bundle file on each node that the egress proxy verifies the servers of "
        "`inject` domains with, instead of the node's trusted CAs (an internal CA).",
    )
    hosts: dict[str, str] = Field(
        default_factory=dict, description="Names the egress proxy resolves to these IPv4 addresses "
        "('ADDRESS' or 'ADDRESS:PORT') instead of by DNS.",
    )

    @field_validator("allow_domains")
    @classmethod
    def _domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            name = entry[2:] if entry.startswith("*.") else entry
            if not _DOMAIN.match(name):
                raise ValueError(f"{entry!r} is not a host name or '*.suffix' (e.g. api.github.com, *.openai.com)")
        return tuple(entry.lower().rstrip(".") for entry in value)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: dict[str, str]) -> dict[str, str]:
        for name, target in value.items():
            address, _, port = target.partition(":")
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                raise ValueError(f"hosts: {name!r} -> {target!r} is not ADDRESS or ADDRESS:PORT (IPv4)") from None
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"hosts: {name!r} -> {target!r}: the port must be 1-65535")
        return value

    @field_validator("allow")
    @classmethod
    def _allow(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            AllowRule.parse(entry)  # raises with what is wrong
        return tuple(entry.strip() for entry in value)

    @field_validator("blocked")
    @classmethod
    def _blocked(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(parse_ipv4_network(entry) for entry in value)

    @model_validator(mode="after")
    def _allow_needs_allowlist(self) -> NetworkConfig:
        if self.egress == "allowlist" and not (self.allow or self.allow_domains):
            raise ValueError("egress 'allowlist' needs at least one `allow` or `allow_domains` entry")
        if (self.allow or self.allow_domains) and self.egress != "allowlist":
            raise ValueError("`allow` and `allow_domains` are used only with egress 'allowlist'")
        if self.allow_domains and not self.enforce:
            raise ValueError("`allow_domains` needs network.enforce (the rules send a sandbox's traffic to the proxy)")
        for domain in self.inject:
            if domain.lower() not in self.allow_domains and not name_allowed(domain, self.allow_domains):
                raise ValueError(f"inject: {domain!r} is not in allow_domains (headers go only to allowed domains)")
        if self.upstream_ca is not None and not self.inject:
            raise ValueError("upstream_ca verifies the servers of `inject` domains, and there are none")
        return self

    def policy(self) -> NetworkPolicy:
        return NetworkPolicy(self.egress, self.allow, self.blocked, self.enforce, self.allow_domains)

    def egress_rules(self) -> EgressRules:
        """What the pool's egress proxy lets through and adds (see backends.egress)."""
        return EgressRules(
            allow=self.allow_domains,
            inject={domain: {header: Secret(env=source.env, file=source.file) for header, source in headers.items()}
                    for domain, headers in self.inject.items()},
            hosts={name.lower(): address for name, address in self.hosts.items()},
            upstream_ca=self.upstream_ca,
        )






class RayConfig(_Closed):
    """How SandboxActors are placed on the Ray cluster."""

    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom resources each SandboxActor needs, e.g. {'sandbox_slots': 1} so only nodes "
        "that advertise slots host sandboxes and each node holds at most its slot count.",
    )
    scheduling: Literal["default", "spread"] = Field(
        default="default",
        description="'default' packs sandboxes onto nodes Ray picks; 'spread' spreads them over nodes.",
    )
    pool_on_head: bool = Field(
        default=True, description="Pin the SandboxPool actor to the head node (it survives worker loss)."
    )


class SandboxConfig(_Closed):
    """Everything a pool needs. Every key is documented in README's config reference."""

    # keys of the original provider
    image: str = Field(default=DEFAULT_IMAGE, description="Sandbox image (never pulled).")
    port: int = Field(default=8080, ge=1, le=65535, description="Container port of the sandbox API.")
    container_prefix: str = Field(default="sandbox-actors", description="Containers are named <prefix>-<sandbox id>.")
    idle_timeout: float = Field(default=600, ge=0, description="Seconds idle before a sandbox is destroyed; 0 disables.")
    replicas: int = Field(default=3, ge=1, description="Soft cap on active + warm sandboxes (LRU-evicts warm ones).")
    mounts: tuple[MountConfig, ...] = Field(default=(), description="Extra bind mounts for every sandbox.")
    environment: dict[str, str] = Field(
        default_factory=dict, description="Environment for every sandbox; a value '$NAME' is read from the host env."
    )
    provisioner_url: str | None = Field(
        default=None, description="Shortcut for backend: {kind: provisioner, url: ...}."
    )
    # what an actor pool adds
    provisioner_api_key: str | None = Field(
        default=None, description="With provisioner_url: the backend's api_key.", repr=False
    )
    backend: BackendConfig = Field(
        default_factory=DockerBackendConfig, discriminator="kind", description="Where sandboxes run."
    )
    pool_name: str = Field(default="sandbox-pool", min_length=1, description="Name of the SandboxPool actor.")
    namespace: str = Field(default="sandbox_actors", min_length=1, description="Ray namespace of all our actors.")
    readiness_timeout: float = Field(default=60, gt=0, description="Seconds a new sandbox may take to answer.")
    idle_check_interval: float = Field(default=60, gt=0, description="Seconds between idle checks.")
    usage_interval: float = Field(
        default=15, ge=0, description="Seconds between looks at each running sandbox's use for its metrics "
        "(sandbox_actors_sandbox_*); 0: none (box.usage() and `sandbox-actors top` still look when asked)."
    )
    reconcile_interval: float = Field(default=30, gt=0, description="Seconds between reconcile passes.")
    max_sandboxes: int | None = Field(default=None, ge=1, description="Hard cap; acquire waits, then fails.")
    capacity_timeout: float = Field(
        default=60, ge=0, description="Seconds acquire waits for capacity (hard cap, full nodes) before failing."
    )
    exec_timeout: float = Field(default=600, gt=0, description="Default timeout of one command, seconds.")
    prewarm: int = Field(
        default=0, ge=0, description="Ready spare sandboxes kept for new threads (needs thread_mounts: false)."
    )
    spare_actors: int = Field(
        default=2, ge=0, description="Started SandboxActors kept waiting, so a cold start skips Ray worker start-up."
    )
    spare_actors_max: int = Field(
        default=64, ge=0,
        description="Spares grow past spare_actors to the most new sandboxes asked for at once lately, up to this "
        "many (and a quarter of the pool node's free memory); spare_actors or less turns learning off.",
    )
    spare_decay: float = Field(
        default=600, gt=0, description="Seconds a burst is remembered: learned spares end when none that large came."
    )
    idle_action: Literal["destroy", "hibernate"] = Field(
        default="destroy",
        description="What idle_timeout does: 'destroy' the sandbox, or 'hibernate' it (container stopped, its "
        "filesystem kept, its actor ended; the next acquire resumes it).",
    )
    hibernate_live: bool = Field(
        default=False,
        description="idle_action 'hibernate' keeps each sandbox's processes and memory too (a live checkpoint: "
        "its servers, background commands and shell go on after the resume). Needs runtime: runsc (gVisor) and "
        "the Docker engine's experimental mode.",
    )
    hibernate_ttl: float = Field(
        default=86400, ge=0, description="Seconds a sandbox stays hibernated before it is removed; 0 keeps it."
    )
    max_hibernated: int | None = Field(
        default=None, ge=0, description="Most hibernated sandboxes kept; over it the oldest is removed."
    )
    snapshot_ttl: float = Field(
        default=0, ge=0, description="Seconds a snapshot is kept; 0 keeps it until removed or the pool shuts down."
    )
    keep_snapshots: bool = Field(default=False, description="Keep the pool's snapshots when it shuts down.")
    thread_mounts: bool = Field(
        default=True, description="Mount per-thread workspace/uploads/outputs dirs from base_dir."
    )
    base_dir: str = Field(
        default="",  # filled in by _own_base_dir: each pool's own
        description="Where per-thread directories are created (default: ~/.sandbox-actors/pools/<namespace>/"
        "<pool_name>, SANDBOX_ACTORS_HOME in place of ~/.sandbox-actors when set).",
    )
    host_base_dir: str | None = Field(
        default=None, description="base_dir as the engine's host sees it (Docker-outside-of-Docker)."
    )
    skills_path: str | None = Field(default=None, description="Skills directory, mounted read-only when it exists.")
    host_skills_path: str | None = Field(default=None, description="skills_path as the engine's host sees it.")
    skills_container_path: str = Field(default="/mnt/skills", description="Where skills appear in the sandbox.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Per-container resource limits.")
    capabilities: tuple[str, ...] = Field(
        default=(), description="Linux capabilities added back after dropping all (the minimal image needs none)."
    )
    bind_host: str = Field(
        default="127.0.0.1", description="Host address the sandbox port is published on (images without a socket)."
    )
    network: NetworkConfig = Field(default_factory=NetworkConfig, description="What sandboxes may reach.")
    user: Literal["sandbox", "root"] = Field(
        default="sandbox", description="Who commands run as: 'sandbox' (unprivileged) or 'root' (on purpose)."
    )
    runtime: str | None = Field(default=None, description="Docker runtime for sandboxes, e.g. 'runsc' (gVisor).")
    read_only_rootfs: bool = Field(
        default=False, description="Read-only root filesystem; /tmp, /run, the home and mounts stay writable."
    )
    socket_dir: str | None = Field(
        default=None, description="Node-local directory for sandbox API sockets (default /run/sandbox-actors)."
    )
    host_socket_dir: str | None = Field(
        default=None, description="socket_dir as the engine's host sees it (Docker-outside-of-Docker)."
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Placement of SandboxActors.")

    @model_validator(mode="before")
    @classmethod
    def _provisioner_shortcut(cls, data: Any) -> Any:
        """``provisioner_url`` (the original provider's key) stands for a provisioner backend."""
        return shortcut(data) if isinstance(data, Mapping) else data

    @model_validator(mode="before")
    @classmethod
    def _own_base_dir(cls, data: Any) -> Any:
        """A pool's default ``base_dir`` is its own, so any two pools on defaults keep their threads'
        directories apart."""
        if not isinstance(data, Mapping) or data.get("base_dir"):
            return data
        name, namespace = str(data.get("pool_name") or "sandbox-pool"), str(data.get("namespace") or "sandbox_actors")
        return {**data, "base_dir": str(Path(state_home()) / "pools" / dir_name(namespace) / dir_name(name))}

    @field_validator("container_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _CONTAINER_NAME.match(value):
            raise ValueError("must start with a letter or digit and hold only letters, digits, '_', '.', '-'")
        return value

    @field_validator("environment")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ENV_NAME.match(name):
                raise ValueError(f"invalid environment variable name {name!r}")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name an image, e.g. 'sandbox-actors-minimal:latest'")
        return value

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, value: str | None) -> str | None:
        if value is not None and not _CONTAINER_NAME.match(value):
            raise ValueError("must be the name of a runtime registered with the Docker engine, e.g. 'runsc'")
        return value

    @field_validator("socket_dir", "host_socket_dir")
    @classmethod
    def _socket_dir(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = str(Path(value).expanduser().absolute())
        if len(path.encode()) > MAX_SOCKET_DIR:
            raise ValueError(
                f"must be at most {MAX_SOCKET_DIR} bytes long (unix socket paths are limited to 107 bytes)"
            )
        return path

    @field_validator("base_dir", "host_base_dir", "skills_path", "host_skills_path")
    @classmethod
    def _abs_dir(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return str(Path(value).expanduser().absolute())

    @model_validator(mode="after")
    def _cross_field(self) -> SandboxConfig:
        if self.max_sandboxes is not None and self.max_sandboxes < self.replicas:
            raise ValueError(f"max_sandboxes ({self.max_sandboxes}) must be >= replicas ({self.replicas})")
        can = self.backend.capabilities
        if self.prewarm and self.thread_mounts and Capability.HOST_MOUNTS in can:
            raise ValueError(
                "prewarm needs thread_mounts: false: a spare sandbox starts before its thread is known, and a "
                "container's mounts cannot change after it starts"
            )
        self.backend.check_prefix(self.container_prefix)
        needs = {"mounts": Capability.HOST_MOUNTS, "environment": Capability.SANDBOX_SETTINGS,
                 "runtime": Capability.RUNTIMES, "read_only_rootfs": Capability.SANDBOX_SETTINGS}
        given = [key for key, capability in needs.items() if getattr(self, key) and capability not in can]
        given += ["idle_action: hibernate"] if self.idle_action == "hibernate" and Capability.HIBERNATE not in can else []
        given += ["limits.disk"] if self.limits.disk and Capability.SANDBOX_SETTINGS not in can else []
        given += ["hibernate_live"] if self.hibernate_live and Capability.LIVE_CHECKPOINT not in can else []
        if self.hibernate_live and self.runtime != "runsc":
            raise ValueError(
                "hibernate_live keeps processes and memory through gVisor's checkpoints: it needs runtime: runsc "
                "(runc would need a CRIU that passes `criu check`, which Debian's does not on this kind of kernel)"
            )
        given += ["network"] if self.network != NetworkConfig() and Capability.NETWORK_POLICY not in can else []
        if given:
            raise ValueError(
                f"{' and '.join(given)}: the {self.backend.kind} backend decides what its sandboxes get; these keys "
                "need a backend that sets them (docker)"
            )
        return self

    def resolved_environment(self, source: Mapping[str, str] | None = None) -> dict[str, str]:
        """``environment`` with ``$NAME`` values read from ``source`` (default: os.environ)."""
        return resolve_environment(self.environment, source)

    @property
    def host_dir(self) -> str:
        return self.host_base_dir or self.base_dir


def state_home() -> str:
    """Where sandbox-actors keeps what it writes on this machine: SANDBOX_ACTORS_HOME, else
    ~/.sandbox-actors."""
    return str(Path(os.environ.get("SANDBOX_ACTORS_HOME", "~/.sandbox-actors")).expanduser().absolute())


def dir_name(name: str) -> str:
    """A directory name for a pool or namespace name: itself when plainly safe, else a hash."""
    if _SAFE_NAME.match(name) and name not in (".", ".."):
        return name
    return "~" + hashlib.sha256(name.encode()).hexdigest()[:32]


def load_config(source: SandboxConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None) -> SandboxConfig:
    """Build a config from a model, a mapping, or a YAML file path.

    A YAML file may hold the keys at top level or under a ``sandbox:`` key.

    Raises:
        ConfigError: the file is missing or unreadable, or a key is unknown or
            has a bad value; the message names every offending key.
    """
    if source is None:
        return SandboxConfig()
    if isinstance(source, SandboxConfig):
        return source
    where = "config"
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        try:
            with open(source, encoding="utf-8") as handle:
                data = yaml.safe_load(handle) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {where}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where} is not valid YAML: {exc}") from exc
    else:
        data = source
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(data).__name__}")
    if set(data) == {"sandbox"} and isinstance(data["sandbox"], Mapping):
        data = data["sandbox"]
    try:
        return SandboxConfig.model_validate(dict(data))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(config)'}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"invalid {where}: {problems}") from None
