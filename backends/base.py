"""What a backend is: create, discover, list and destroy sandbox containers.

Nothing here knows about Ray. A backend turns a :class:`SandboxSpec` into a
running container and describes running containers as :class:`SandboxRecord`.
Talking to the sandbox once it runs is :mod:`backends.sandbox_api`'s job.
"""

from __future__ import annotations

import builtins

import abc
import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import NotSupported

# Label keys every container of ours carries. Reconcile and the reapers decide
# what to adopt or remove from these alone.
LABEL_PROJECT = "sandbox-actors.project"
LABEL_POOL = "sandbox-actors.pool"
LABEL_SANDBOX_ID = "sandbox-actors.sandbox-id"
LABEL_THREAD_ID = "sandbox-actors.thread-id"
LABEL_ENGINE_ID = "sandbox-actors.engine-id"
LABEL_ACTOR = "sandbox-actors.actor"  # the actor that created the container
# The API token. A label is visible to whoever may talk to the engine (who can exec into the
# container anyway), never from inside the container: the server there holds only its hash.
LABEL_TOKEN = "sandbox-actors.token"
LABEL_SOCKET = "sandbox-actors.socket"  # the API's unix socket, as the host sees it
# Who made a container or network: the Ray cluster (its session name). Once no process of that
# cluster runs on the engine's host, what it left there is an orphan (`sandbox-actors gc`).
LABEL_CLUSTER = "sandbox-actors.cluster"
PROJECT = "sandbox-actors"


def encode_label_value(text: str | None) -> str:
    """Make any thread id safe for a label value, reversibly (NUL, newlines...)."""
    if text is None:
        return ""
    return text.encode("unicode_escape").decode("ascii")


def decode_label_value(value: str) -> str | None:
    if value == "":
        return None
    return value.encode("ascii").decode("unicode_escape")


@dataclass(frozen=True)
class Mount:
    """A host directory bind-mounted into the sandbox."""

    host_path: str
    container_path: str
    read_only: bool = False
    user_owned: bool = False  # the command user gets the mounted directory (thread directories)


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to every container."""

    memory: str | None = "1g"
    cpus: float | None = 1.0
    pids: int | None = 512
    disk: str | None = None  # writable layer size; needs an engine whose storage driver has quotas


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a backend needs to start one sandbox.

    ``environment`` may hold secrets: it is never logged, and it is excluded
    from ``repr``.
    """

    sandbox_id: str
    pool: str
    image: str
    thread_id: str | None = None
    port: int = 8080
    mounts: tuple[Mount, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict, repr=False)
    token: str = field(default="", repr=False)
    limits: Limits = Limits()
    capabilities: tuple[str, ...] = ()
    bind_host: str = "127.0.0.1"
    extra_labels: Mapping[str, str] = field(default_factory=dict)
    user: str = "sandbox"  # who commands run as: 'sandbox' (unprivileged) or 'root'
    runtime: str | None = None  # the engine's runtime, e.g. 'runsc' (gVisor); None: its default
    read_only_rootfs: bool = False  # only tmpfs (/tmp, /run, home) and mounts are writable


# A CPU percent is measured over at least this long: the engine throttles a limited container in
# 100 ms periods, so a shorter window measures where in them it started (a 0.3 s window of a
# sandbox at its 0.5-core limit reads 40-60 %).
USAGE_CPU_WINDOW = 1.0


@dataclass(frozen=True)
class Usage:
    """What one sandbox uses, from its engine's statistics (the figures ``docker stats`` shows).

    ``cpu_percent``: of one core, over ``interval`` seconds (at least USAGE_CPU_WINDOW) up to ``at``;
    ``memory_bytes``: resident use as the engine reports it (page cache that could be dropped
    left out); ``disk_bytes``: the container's own writable layer (None: not measured);
    ``commands``: run through the sandbox's actor (exec, bash, streams, background starts).
    """

    at: float
    cpu_percent: float
    cpu_seconds: float
    memory_bytes: int
    memory_limit_bytes: int
    pids: int
    net_rx_bytes: int
    net_tx_bytes: int
    block_read_bytes: int
    block_write_bytes: int
    disk_bytes: int | None = None
    interval: float = 0.0
    commands: int = 0

    def as_dict(self) -> dict[str, float | int | None]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def usage_baseline(looks: Sequence[Usage], now: float) -> Usage | None:
    """Of earlier looks at one sandbox (oldest first), the one to measure its CPU percent from:
    the newest at least USAGE_CPU_WINDOW old, else the oldest (the backend waits out the rest)."""
    old_enough = [look for look in looks if now - look.at >= USAGE_CPU_WINDOW]
    return old_enough[-1] if old_enough else (looks[0] if looks else None)


@dataclass(frozen=True)
class Owner:
    """Whose a container is: its sandbox, thread (None: anonymous) and actor (its name)."""

    sandbox_id: str
    thread_id: str | None
    actor: str


@dataclass(frozen=True)
class ContainerEvent:
    """The engine saw a container of ours die ('die', 'oom') or go ('destroy'), or found it stopped when
    following began ('exited')."""

    sandbox_id: str
    container_id: str
    event: str


@dataclass(frozen=True)
class SandboxRecord:
    """A sandbox container as the backend sees it.

    Attributes:
        sandbox_id: our id (from the container's label).
        url: where its API answers, on loopback of the engine's host.
        container_name / container_id: the engine's names for it.
        node: the host (engine) it runs on.
        engine_id: the engine's own id; reapers only touch their engine's.
        created_at: unix time the container was created.
        running: True when the engine reports the container running.
        labels: every label on the container.
        token: the API token the container was started with.
        pid: its init process on the engine's host, when known and running.
    """

    sandbox_id: str
    url: str
    container_name: str
    container_id: str
    node: str
    engine_id: str
    created_at: float
    running: bool
    labels: Mapping[str, str] = field(default_factory=dict)
    token: str = field(default="", repr=False)
    pid: int | None = None  # the container's init process on the engine's host (a full inspect only)

    @property
    def pool(self) -> str:
        return self.labels.get(LABEL_POOL, "")

    @property
    def thread_id(self) -> str | None:
        return decode_label_value(self.labels.get(LABEL_THREAD_ID, ""))


class Capability(enum.Enum):
    """What a backend can do beyond creating, listing and removing sandboxes."""

    HIBERNATE = "hibernate"  # stop a sandbox keeping its filesystem, and start it again
    LIVE_CHECKPOINT = "live checkpoint"  # save a sandbox's processes and memory too, and restore them (gVisor)
    SNAPSHOT = "snapshot"  # save a sandbox's filesystem as an image to start others from
    HOST_MOUNTS = "host mounts"  # mount directories of the node's host (thread directories, skills, mounts)
    NETWORK_POLICY = "network policy"  # a network of the pool's own, with the isolation rules
    RUNTIMES = "runtimes"  # a container runtime of the pool's choice (gVisor's runsc)
    SANDBOX_SETTINGS = "sandbox settings"  # the pool sets each sandbox's environment, disk limit, root filesystem


class Backend(abc.ABC):
    """Where sandbox containers run. All methods are coroutines.

    Attributes:
        kind: the backend's name in config (``backend: {kind: ...}``).
        capabilities: what it can do besides create, list and remove.

    Raises:
        BackendUnavailable: from any method when the engine does not answer.
            Callers must never read that as "the sandbox is dead".
    """

    kind: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]] = frozenset()

    #: Whether records name the actor that created a sandbox (``LABEL_ACTOR``). When not,
    #: the creator writes an owner record inside the sandbox, as an adopter does.
    records_creator = True

    @abc.abstractmethod
    async def engine_id(self) -> str:
        """The id of the engine this backend drives."""

    async def warm(self, pool: str, image: str) -> str:
        """Look up ahead of need what the first create of ``pool``'s sandboxes of ``image`` would
        (a spare actor does this while it waits); returns the engine id. A missing image is no
        error here: the create reports it."""
        return await self.engine_id()

    async def reached_over_tcp(self, image: str) -> bool:
        """Whether sandboxes of ``image`` answer on a TCP port (their client is httpx, which a
        spare loads ahead of need) rather than on a unix socket; True when unsure."""
        return True

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> SandboxRecord:
        """Start a container for ``spec``.

        A container that already exists under the same name is returned as
        found (discovered), not treated as an error.

        Raises:
            ImageNotFound, SandboxStartError, BackendUnavailable.
        """

    @abc.abstractmethod
    async def discover(self, sandbox_id: str) -> SandboxRecord | None:
        """The container for ``sandbox_id``, or None when there is none."""

    @abc.abstractmethod
    async def list(self, pool: str | None = None) -> builtins.list[SandboxRecord]:
        """Every container of ours on this engine (of one pool when given)."""

    @abc.abstractmethod
    async def destroy(self, sandbox_id: str, container_id: str | None = None) -> bool:
        """Stop and remove the container (only if it is ``container_id``, when given).

        Returns False when there was none (or the name now belongs to another container).
        """

    @abc.abstractmethod
    async def is_running(self, sandbox_id: str) -> bool:
        """True when the container exists and runs; False when it is gone or exited."""

    @abc.abstractmethod
    async def logs_tail(self, sandbox_id: str, lines: int = 40) -> str:
        """The container's last log lines (empty when it is gone)."""

    async def prepare(
        self, pool: str, *, image: str | None = None, runtime: str | None = None, limits: Limits | None = None,
        extra_blocked: Iterable[str] = (),
    ) -> dict[str, object]:
        """Make this engine ready for ``pool``'s sandboxes (its network and firewall rules, with
        ``extra_blocked`` addresses refused too) and check it can give them what is asked for.
        Idempotent; refreshes the rules. Returns what it found (for status).

        Raises:
            IsolationUnavailable: the policy cannot be enforced, or ``runtime`` is unknown.
            NotSupported: a limit the engine cannot apply (e.g. ``limits.disk``).
        """
        return {}

    async def teardown(self, pool: str) -> dict[str, int]:
        """Remove what :meth:`prepare` made for ``pool`` once none of its containers is left."""
        return {}

    async def sweep_rules(self) -> int:
        """Remove isolation rules of ours left behind by pools whose network is gone."""
        return 0

    async def usage(self, sandbox_id: str, container_id: str, since: Usage | None = None,
                    disk: bool = True) -> Usage:
        """What the container uses now (:class:`Usage`); its CPU percent since the look ``since``
        (a first look measures over a short wait); its writable layer's size with ``disk``.

        Raises:
            SandboxNotFound: the container is gone. NotSupported: the backend cannot tell.
        """
        raise self._cannot("usage")

    async def egress_gateway(self, pool: str) -> str:
        """Where the pool's egress proxy listens on this host (network.allow_domains)."""
        raise self._cannot("egress by domain")

    async def route_egress(self, pool: str, port: int, extra_blocked: Iterable[str] = ()) -> None:
        """Send the pool's sandboxes to its egress proxy's ``port`` (their DNS and their TCP)."""
        raise self._cannot("egress by domain")

    async def addresses(self, pool: str) -> dict[str, Owner]:
        """The pool's containers here by network address: whose each is."""
        raise self._cannot("egress by domain")

    async def sweep_tasks(self) -> int:
        """End what the engine's runtime kept of containers the engine no longer has (after live
        checkpoints cut short by a kill, a task and its process can outlive their container)."""
        return 0

    # ── lifecycle beyond create and destroy (hibernation, snapshots) ───────

    def _cannot(self, feature: str) -> NotSupported:
        return NotSupported(f"{feature}: the {type(self).__name__} cannot do this (its sandboxes are created and "
                            "destroyed only)", feature=feature)

    async def stop_container(self, sandbox_id: str, container_id: str) -> bool:
        """Stop the container, keeping its filesystem (for hibernation). False: it is gone."""
        raise self._cannot("hibernate")

    async def start_container(self, sandbox_id: str, container_id: str,
                              checkpoint: str | None = None) -> tuple[SandboxRecord, bool]:
        """Start a stopped container of ours again (resume): its record, and whether it was
        running already. With ``checkpoint``, its processes and memory come back from that live
        checkpoint (RestoreFailed when they cannot; the container is left as it was). Raises
        SandboxNotFound when it is gone."""
        raise self._cannot("resume")

    async def checkpoint(self, sandbox_id: str, container_id: str, name: str) -> dict[str, object]:
        """Save the running container's processes and memory as checkpoint ``name``, stopping it
        (its API server must have let go of its socket first: :meth:`signal` SIGUSR1). Returns
        the checkpoint's ``path`` and ``bytes``."""
        raise self._cannot("live checkpoint")

    async def keep_checkpoint(self, sandbox_id: str, container_id: str, name: str, into: str) -> int:
        """Copy checkpoint ``name`` of the container to directory ``into``; its bytes."""
        raise self._cannot("live checkpoint")

    async def fork_from_checkpoint(self, spec: SandboxSpec, source: str) -> SandboxRecord:
        """A new sandbox of ``spec`` restored from the checkpoint in directory ``source`` (a live
        fork); quiet until :meth:`listen_again`, which gives it ``spec``'s token."""
        raise self._cannot("live checkpoint")

    async def remove_checkpoint(self, sandbox_id: str, container_id: str, name: str) -> None:
        """Remove a live checkpoint of the container (one restored, no longer needed)."""
        raise self._cannot("live checkpoint")

    async def signal(self, sandbox_id: str, container_id: str, signal: str) -> None:
        """Send ``signal`` (e.g. SIGUSR1) to the container's main process."""
        raise self._cannot("live checkpoint")

    async def listen_again(self, record: SandboxRecord, timeout: float = 10.0) -> None:
        """After a restore from a live checkpoint: have the sandbox's API server listen again."""
        raise self._cannot("live checkpoint")

    async def commit(self, sandbox_id: str, container_id: str, image: str, labels: Mapping[str, str]) -> dict[str, object]:
        """Save the container's filesystem as ``image`` (snapshot); returns its id and size."""
        raise self._cannot("snapshot")

    async def snapshot_images(self, pool: str) -> builtins.list[dict[str, object]]:
        """The pool's snapshot images on this engine."""
        return []

    async def remove_image(self, image: str) -> bool:
        """Remove a snapshot image; False when a container still uses it or it is gone."""
        raise self._cannot("snapshot")

    async def has_image(self, image: str) -> bool:
        raise self._cannot("snapshot")

    async def export_image(self, image: str) -> bytes:
        """The image as a tar archive (to load it into another engine)."""
        raise self._cannot("snapshot")

    async def import_image(self, archive: bytes) -> None:
        raise self._cannot("snapshot")

    def container_events(self, pool: str) -> Iterator[ContainerEvent]:
        """Deaths of ``pool``'s containers as the engine reports them (blocking; runs until the
        engine's stream ends: the caller reconnects). Backends without events yield nothing."""
        return iter(())

    async def close(self) -> None:
        """Release client resources. Containers are untouched."""
