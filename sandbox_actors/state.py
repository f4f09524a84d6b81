"""The pool's decisions, as plain Python: no Ray, no Docker, an injectable clock.

:class:`PoolState` holds one :class:`Entry` per sandbox and answers the
questions the pool asks: which sandbox does this acquire get, what must be
evicted first, must it wait, what is idle. The pool carries the answers out
(start containers, stop them) and reports back. Every method is synchronous,
so a decision and the state change it makes happen with no ``await`` in
between; after any ``await`` the pool asks again.

Every state a sandbox can be in is in :class:`SandboxState`, and every move
between states is in ``TRANSITIONS``; an illegal move raises.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from backends.errors import InvalidRequest, SandboxError

from .views import HostDirs


class SandboxState(enum.Enum):
    STARTING = "starting"  # actor and container being created
    SPARE = "spare"  # pre-warmed: container running, not yet any thread's
    ACTIVE = "active"  # leased to a thread
    WARM = "warm"  # released; container running, ready to reclaim
    STOPPING = "stopping"  # being removed (an idle stop can still be called off)
    DOOMED = "doomed"  # destroy asked, not confirmed by the engine: retried, never adopted
    HIBERNATING = "hibernating"  # its container being stopped (filesystem kept), its actor ended
    HIBERNATED = "hibernated"  # container stopped, no actor: costs no memory; the next acquire resumes it
    RESUMING = "resuming"  # the same container started again, under a new actor


S = SandboxState
TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    S.STARTING: frozenset({S.ACTIVE, S.SPARE}),
    S.SPARE: frozenset({S.ACTIVE, S.STOPPING}),
    S.ACTIVE: frozenset({S.WARM, S.STOPPING, S.HIBERNATING}),
    S.WARM: frozenset({S.ACTIVE, S.STOPPING, S.HIBERNATING}),
    # Back from STOPPING only when an idle stop was refused (the sandbox got busy) or called off
    # (its thread came back) before it was committed; DOOMED when the engine did not answer;
    # HIBERNATING when the pool hibernates idle sandboxes instead of destroying them.
    S.STOPPING: frozenset({S.ACTIVE, S.WARM, S.DOOMED, S.HIBERNATING}),
    S.DOOMED: frozenset({S.STOPPING}),
    S.HIBERNATING: frozenset({S.HIBERNATED, S.ACTIVE, S.WARM}),  # back when the engine did not stop it
    S.HIBERNATED: frozenset({S.RESUMING, S.STOPPING}),
    # Back to HIBERNATED when its node has no room now; a resume that fails drops the entry (the
    # thread starts afresh).
    S.RESUMING: frozenset({S.ACTIVE, S.HIBERNATED}),
}


class StopReason(enum.StrEnum):
    """Why a STOPPING sandbox is being stopped."""

    IDLE = "idle"  # idle past the timeout (can be called off until committed)
    EVICTED = "evicted"  # its slot is wanted by another thread
    DESTROYED = "destroyed"  # asked for (destroy), or owed from before this pool
    EXPIRED = "expired"  # hibernated too long, or beyond the most kept
    SHUTDOWN = "shutdown"  # the pool is shutting down


class StopPhase(enum.Enum):
    """Where a stop stands: an idle stop can be called off until the pool commits to it."""

    CANCELLABLE = "cancellable"  # an idle stop not yet committed
    CALLED_BACK = "called back"  # its thread came back first: the stop is called off when it checks
    COMMITTED = "committed"  # the container is being removed: no calling it off


JOURNAL_SIZE = 4096  # changes of state or actor the pool remembers (for `history`)
LIVE = (S.STARTING, S.SPARE, S.ACTIVE, S.WARM, S.RESUMING)  # what counts toward replicas
ASLEEP = (S.HIBERNATING, S.HIBERNATED)  # counts toward no cap: no actor, no running container


class IllegalTransition(SandboxError):
    """A bug: the pool tried to move a sandbox between states that do not connect."""


@dataclass
class Entry:
    """One sandbox as the pool sees it.

    ``last_active`` is the pool clock at the last acquire/get/release or
    reported activity; ``released_at`` is set while WARM. ``version`` grows on
    every touch, so a decision taken before an ``await`` can tell whether the
    sandbox was used meanwhile. ``stop`` says why a STOPPING sandbox is being
    stopped and ``stop_phase`` whether that can still be called off.
    """

    sandbox_id: str
    thread_id: str | None
    state: SandboxState
    created_at: float
    last_active: float
    released_at: float | None = None
    actor: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    inflight: int = 0
    version: int = 0
    spare: bool = False  # started ahead of need, for whichever thread comes first
    stop: StopReason | None = None
    stop_phase: StopPhase | None = None  # while STOPPING
    resume_state: SandboxState | None = None  # where a called-off idle stop (or failed hibernation) returns to
    hibernated_at: float | None = None  # pool clock, while HIBERNATED
    image: str | None = None  # a snapshot's image, when started from one
    host: HostDirs | None = None  # the node and directories it was asked to start with

    def move(self, new: SandboxState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"sandbox {self.sandbox_id}: {self.state.value} -> {new.value} is not allowed")
        self.state = new

    @property
    def container_id(self) -> str | None:
        return self.info.get("container_id")


# ── decisions ───────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Acquired:
    """The thread's sandbox is ready: ``path`` is 'hot' (already active) or 'warm' (reclaimed)."""

    entry: Entry
    path: str


@dataclass(frozen=True)
class MustCheck:
    """A warm sandbox to reclaim once its actor confirms it still runs (then :meth:`PoolState.reclaim`)."""

    entry: Entry
    version: int


@dataclass(frozen=True)
class MustResume:
    """Start a HIBERNATED sandbox's container again (``entry`` is RESUMING now); stop ``evict`` first."""

    entry: Entry
    evict: tuple[Entry, ...] = ()


@dataclass(frozen=True)
class Claimed:
    """A pre-warmed spare was given to the thread: tell its actor (``entry.thread_id``)."""

    entry: Entry


@dataclass(frozen=True)
class MustCreate:
    """Start a new sandbox for ``entry`` (now STARTING); stop ``evict`` first or alongside."""

    entry: Entry
    evict: tuple[Entry, ...] = ()
    over_soft_cap: bool = False


@dataclass(frozen=True)
class MustWait:
    """Nothing to return yet: ``reason`` is 'starting', 'stopping', 'doomed' or 'capacity'."""

    sandbox_id: str
    reason: str
    evict: tuple[Entry, ...] = ()


Decision = Acquired | MustCheck | MustResume | Claimed | MustCreate | MustWait


class PoolState:
    """Every sandbox of one pool and the rules that move them.

    Args:
        replicas: soft cap on STARTING + SPARE + ACTIVE + WARM sandboxes;
            reaching it evicts the least recently released WARM one, never an
            ACTIVE one.
        max_sandboxes: optional hard cap on all sandboxes (STOPPING and DOOMED
            ones included: their containers still exist); at it, acquire waits.
        idle_timeout: seconds; 0 disables idle reaping.
        prewarm: how many SPARE sandboxes to keep ready for new threads. They
            count toward the caps and the idle timeout never stops them.
        clock: seconds, monotonic; tests pass a fake.
    """

    def __init__(
        self,
        replicas: int,
        max_sandboxes: int | None = None,
        idle_timeout: float = 600.0,
        prewarm: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replicas = replicas
        self.max_sandboxes = max_sandboxes
        self.idle_timeout = idle_timeout
        self.prewarm = prewarm
        self.clock = clock
        self.entries: dict[str, Entry] = {}
        self.threads: dict[str, str] = {}  # thread id -> sandbox id (a claimed spare's id is not the hash)
        self.epoch = 0  # grows with every change to any entry
        self._changed: dict[str, int] = {}  # sandbox id -> epoch of its last change
        self.journal: collections.deque[dict[str, Any]] = collections.deque(maxlen=JOURNAL_SIZE)
        self._last_seen: dict[str, tuple[str, str]] = {}  # sandbox id -> (state, actor) last journalled
        self.deaths: set[str] = set()  # reported dead during an operation; repaired when it ends
        self.closed = False  # shutting down: nothing new starts, nothing is repaired
        self.on_change: Callable[[], None] = lambda: None  # told after every change (the pool wakes its waiters)

    # ── queries ────────────────────────────────────────────────────────────

    def entry(self, sandbox_id: str) -> Entry | None:
        return self.entries.get(sandbox_id)

    def in_state(self, *states: SandboxState) -> list[Entry]:
        return [entry for entry in self.entries.values() if entry.state in states]

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in SandboxState}
        for entry in self.entries.values():
            counts[entry.state.value] += 1
        return counts

    def _live(self) -> int:
        return len(self.in_state(*LIVE))

    def _held(self) -> int:
        """Sandboxes whose container runs or is being handled (what ``max_sandboxes`` caps)."""
        return sum(1 for entry in self.entries.values() if entry.state not in ASLEEP)

    def _move(self, entry: Entry, new: SandboxState, **fields: Any) -> Entry:
        """The one way a sandbox changes state: the move checked against ``TRANSITIONS``, the
        fields that go with it set, the change journalled and told."""
        entry.move(new)
        for name, value in fields.items():
            setattr(entry, name, value)
        self._mark(entry.sandbox_id)
        return entry

    def _mark(self, sandbox_id: str) -> None:
        self.epoch += 1
        self._changed[sandbox_id] = self.epoch
        entry = self.entries.get(sandbox_id)
        seen = (entry.state.value, str(entry.info.get("actor_name") or "")) if entry is not None else ("gone", "")
        if self._last_seen.get(sandbox_id) != seen:
            self.journal.append({"at": time.time(), "sandbox_id": sandbox_id, "state": seen[0], "actor": seen[1],
                                 "thread_id": entry.thread_id if entry is not None else None})
            if entry is None:
                self._last_seen.pop(sandbox_id, None)
            else:
                self._last_seen[sandbox_id] = seen
        self.on_change()

    def history(self, sandbox_id: str | None = None) -> list[dict[str, Any]]:
        """What happened to the pool's sandboxes (of one, when given), oldest first: each change of
        state or of the actor that serves it, with the wall-clock time (the last JOURNAL_SIZE)."""
        return [dict(e) for e in self.journal if sandbox_id is None or e["sandbox_id"] == sandbox_id]

    def changed_since(self, epoch: int) -> set[str]:
        """Sandbox ids created, moved or removed after ``epoch`` (older marks are forgotten).

        Reconcile compares views taken across awaits; an id changed meanwhile
        is left for the next pass rather than judged on a stale view.
        """
        changed = {sid for sid, at in self._changed.items() if at > epoch}
        self._changed = {sid: self._changed[sid] for sid in changed}
        return changed

    def lookup(self, thread_id: str) -> str | None:
        """The sandbox id the pool holds for ``thread_id``, if any."""
        return self.threads.get(thread_id)

    def ids(self, states: Iterable[SandboxState] | None = None) -> set[str]:
        if states is None:
            return set(self.entries)
        wanted = set(states)
        return {sid for sid, entry in self.entries.items() if entry.state in wanted}

    def _index(self, entry: Entry) -> None:
        if entry.thread_id is not None:
            self.threads[entry.thread_id] = entry.sandbox_id

    def _drop(self, sandbox_id: str) -> None:
        entry = self.entries.pop(sandbox_id, None)
        self._mark(sandbox_id)
        if entry is not None and entry.thread_id is not None and self.threads.get(entry.thread_id) == sandbox_id:
            del self.threads[entry.thread_id]

    def _touch(self, entry: Entry) -> None:
        entry.last_active = self.clock()
        entry.version += 1

    def _new(self, sandbox_id: str, thread_id: str | None, state: SandboxState, **fields: Any) -> Entry:
        now = self.clock()
        entry = Entry(sandbox_id, thread_id, state, created_at=now, last_active=now, **fields)
        self.entries[sandbox_id] = entry
        self._index(entry)
        self._mark(sandbox_id)
        return entry

    # ── acquire ────────────────────────────────────────────────────────────

    def acquire(self, sandbox_id: str, thread_id: str | None, busy: Collection[str] = (),
                image: str | None = None, host: HostDirs | None = None) -> Decision:
        """Decide what an acquire of ``sandbox_id`` gets (SPEC §3 order).

        1. active: return it; 2. warm: reclaim it once its actor confirms it
        runs; hibernated: resume it; 3./4. otherwise a spare, or create (the
        fleet adopts a live SandboxActor of that id if one exists). With
        ``image`` (a snapshot's) only a new sandbox will do; with ``host`` (a
        node and its directories) too, since a spare's mounts are fixed. Sandboxes in
        ``busy`` (an operation is under way on them) are never evicted to make room.

        Raises:
            InvalidRequest: ``image`` given for a sandbox that exists.
        """
        entry = self.entries.get(sandbox_id)
        if entry is not None and image is not None:
            raise InvalidRequest(
                f"sandbox {sandbox_id} exists already ({entry.state.value}); a snapshot starts new sandboxes "
                "only: destroy it first, or use another thread"
            )
        if entry is not None:
            if entry.state is S.ACTIVE:
                self._touch(entry)
                return Acquired(entry, "hot")
            if entry.state is S.WARM:
                return MustCheck(entry, entry.version)
            if entry.state is S.HIBERNATED:
                return self._resume(entry, busy)
            self.want_back(sandbox_id)
            return MustWait(sandbox_id, entry.state.value)

        made_to_order = image is not None or host is not None  # no spare will do
        spares = [] if made_to_order else self.in_state(S.SPARE)
        if spares:
            entry = min(spares, key=lambda e: e.created_at)
            entry.thread_id = thread_id
            self._index(entry)
            self._touch(entry)
            return Claimed(self._move(entry, S.ACTIVE))
        if self._live() >= self.replicas:
            # At the cap with a spare on its way: it is the capacity this thread gets.
            coming = [e for e in self.entries.values() if e.spare and e.state is S.STARTING]
            if coming and not made_to_order:
                return MustWait(coming[0].sandbox_id, "starting")
        evict = self._evict_for_one_more(busy)
        if self.max_sandboxes is not None and self._held() >= self.max_sandboxes:
            return MustWait(sandbox_id, "capacity", evict)
        over_soft_cap = self._live() >= self.replicas
        entry = self._new(sandbox_id, thread_id, S.STARTING, image=image, host=host)
        return MustCreate(entry, evict, over_soft_cap)

    def _resume(self, entry: Entry, busy: Collection[str]) -> MustResume | MustWait:
        """A hibernated sandbox comes back: it needs room like a new one."""
        evict = self._evict_for_one_more(busy)
        if self.max_sandboxes is not None and self._held() >= self.max_sandboxes:
            return MustWait(entry.sandbox_id, "capacity", evict)
        self._touch(entry)
        return MustResume(self._move(entry, S.RESUMING), evict)

    def reclaim(self, sandbox_id: str, version: int) -> Acquired | None:
        """WARM -> ACTIVE for a :class:`MustCheck` whose actor confirmed the sandbox runs.
        None when it changed meanwhile (decide again)."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.WARM or entry.version != version:
            return None
        self._touch(entry)
        return Acquired(self._move(entry, S.ACTIVE, released_at=None), "warm")

    def begin_spare(self, sandbox_id: str) -> Entry | None:
        """A new STARTING spare when fewer than ``prewarm`` are ready or starting and there is room.

        Spares never evict anything: with no room under the caps, none is started.
        """
        pending = [e for e in self.entries.values() if e.spare and e.state in (S.STARTING, S.SPARE)]
        if len(pending) >= self.prewarm or self._live() >= self.replicas:
            return None
        if self.max_sandboxes is not None and self._held() >= self.max_sandboxes:
            return None
        return self._new(sandbox_id, None, S.STARTING, spare=True)

    def claim_failed(self, sandbox_id: str) -> None:
        """A claimed spare turned out dead: forget it (the acquire tries again)."""
        self._drop(sandbox_id)

    def _evict_for_one_more(self, busy: Collection[str]) -> tuple[Entry, ...]:
        """Move least recently released WARM sandboxes to STOPPING until one more fits under ``replicas``."""
        evicted = []
        warm = sorted((e for e in self.in_state(S.WARM) if e.sandbox_id not in busy), key=lambda e: e.released_at or 0.0)
        while warm and self._live() >= self.replicas:
            evicted.append(self._begin_stop(warm.pop(0), StopReason.EVICTED))
        return tuple(evicted)

    def evict_lru_warm(self, node_id: str | None = None, busy: Collection[str] = ()) -> Entry | None:
        """Move the least recently released WARM sandbox (on ``node_id``, when given; not one in
        ``busy``) to STOPPING, to free a node slot."""
        warm = [e for e in self.in_state(S.WARM)
                if (node_id is None or e.info.get("node_id") == node_id) and e.sandbox_id not in busy]
        if not warm:
            return None
        return self._begin_stop(min(warm, key=lambda e: e.released_at or 0.0), StopReason.EVICTED)

    def started(self, sandbox_id: str, actor: Any, info: dict[str, Any]) -> Entry | None:
        """A STARTING sandbox answered: ACTIVE (SPARE when pre-warmed). None when the entry went
        meanwhile (the caller must not keep what it started)."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.STARTING:
            return None
        self._touch(entry)
        return self._move(entry, S.SPARE if entry.spare else S.ACTIVE, actor=actor, info=dict(info))

    def start_failed(self, sandbox_id: str) -> None:
        entry = self.entries.get(sandbox_id)
        if entry is not None and entry.state is S.STARTING:
            self._drop(sandbox_id)

    def update_info(self, sandbox_id: str, info: dict[str, Any]) -> None:
        """What the sandbox's actor now says about it (after a claim)."""
        entry = self.entries.get(sandbox_id)
        if entry is not None:
            entry.info = dict(info)

    # ── release, get ───────────────────────────────────────────────────────

    def release(self, sandbox_id: str) -> bool:
        """ACTIVE -> WARM. Returns True when it is warm now (also when it already was)."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.ACTIVE:
            return entry is not None and entry.state is S.WARM
        self._touch(entry)
        self._move(entry, S.WARM, released_at=self.clock())
        return True

    def get(self, sandbox_id: str) -> Entry | None:
        """The entry when ACTIVE (its activity refreshed), else None."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.ACTIVE:
            return None
        self._touch(entry)
        return entry

    # ── stopping ───────────────────────────────────────────────────────────

    def _begin_stop(self, entry: Entry, why: StopReason, resume: SandboxState | None = None) -> Entry:
        phase = StopPhase.COMMITTED if resume is None else StopPhase.CANCELLABLE
        return self._move(entry, S.STOPPING, stop=why, stop_phase=phase, resume_state=resume)

    def begin_destroy(self, sandbox_id: str) -> Entry | MustWait | None:
        """SPARE/ACTIVE/WARM/DOOMED/HIBERNATED -> STOPPING and return the entry to stop; wait if it is
        starting, stopping, hibernating or resuming; None if unknown."""
        entry = self.entries.get(sandbox_id)
        if entry is None:
            return None
        if entry.state in (S.STARTING, S.STOPPING, S.HIBERNATING, S.RESUMING):
            return MustWait(sandbox_id, entry.state.value)
        return self._begin_stop(entry, StopReason.DESTROYED)

    def begin_idle_stop(self, sandbox_id: str, version: int) -> Entry | None:
        """Re-check an idle candidate after the pool asked the sandbox; STOPPING if still idle.

        Returns None (keep it) when the sandbox was used since the candidate
        was chosen (its version moved), is busy, or changed state. The stop
        stays cancellable until :meth:`commit_stop`.
        """
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.version != version or entry.inflight > 0:
            return None
        if entry.state not in (S.ACTIVE, S.WARM):
            return None
        if self.clock() - entry.last_active <= self.idle_timeout:
            return None
        return self._begin_stop(entry, StopReason.IDLE, resume=entry.state)

    def want_back(self, sandbox_id: str) -> None:
        """Its thread came back while an idle stop is pending: the stop is called off, unless
        already committed (then the thread waits for it and gets a new sandbox)."""
        entry = self.entries.get(sandbox_id)
        if entry is not None and entry.state is S.STOPPING and entry.stop_phase is StopPhase.CANCELLABLE:
            entry.stop_phase = StopPhase.CALLED_BACK

    def commit_stop(self, sandbox_id: str) -> bool:
        """The pool is about to remove the container: no calling the stop off from here on.
        False when it was called off (an acquire wants the sandbox back)."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.STOPPING:
            return False
        if entry.stop_phase is StopPhase.CALLED_BACK:
            return False
        entry.stop_phase = StopPhase.COMMITTED
        return True

    def stop_called_off(self, sandbox_id: str) -> None:
        """An idle stop was refused by the sandbox (it got busy) or called off by an acquire:
        back to where it was."""
        entry = self.entries.get(sandbox_id)
        if (entry is None or entry.state is not S.STOPPING or entry.resume_state is None
                or entry.stop_phase is StopPhase.COMMITTED):
            return
        self._touch(entry)
        self._move(entry, entry.resume_state, stop=None, stop_phase=None, resume_state=None)

    def stop_failed(self, sandbox_id: str) -> Entry | None:
        """The engine did not confirm the removal: DOOMED (retried; never adopted again)."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.STOPPING:
            return None
        return self._move(entry, S.DOOMED, stop_phase=None)

    def retry_destroy(self, sandbox_id: str) -> Entry | None:
        """DOOMED -> STOPPING, to try the removal again."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.DOOMED:
            return None
        return self._begin_stop(entry, entry.stop or StopReason.DESTROYED)

    def doomed_found(self, sandbox_id: str, thread_id: str | None, container_id: str | None) -> Entry | None:
        """A destroy owed from before this pool (Ray's KV says so): DOOMED, so that nothing adopts it."""
        if sandbox_id in self.entries:
            return None
        entry = self._new(sandbox_id, thread_id, S.DOOMED, stop=StopReason.DESTROYED)
        entry.info = {"container_id": container_id} if container_id else {}
        return entry

    def removed(self, sandbox_id: str) -> None:
        """The sandbox is gone (stopped, lost with its node, or its container vanished)."""
        self._drop(sandbox_id)

    # ── hibernation ────────────────────────────────────────────────────────

    def begin_hibernate(self, sandbox_id: str) -> Entry | MustWait | None:
        """ACTIVE/WARM -> HIBERNATING (on demand); wait while something else is under way; None if
        it is not a sandbox that runs."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state in (S.HIBERNATED, S.DOOMED, S.SPARE):
            return None
        if entry.state not in (S.ACTIVE, S.WARM):
            return MustWait(sandbox_id, entry.state.value)
        return self._move(entry, S.HIBERNATING, resume_state=entry.state)

    def stop_to_hibernate(self, sandbox_id: str) -> Entry | None:
        """A committed idle stop hibernates instead (idle_action: hibernate)."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.STOPPING:
            return None
        return self._move(entry, S.HIBERNATING, stop_phase=None)

    def hibernated(self, sandbox_id: str, checkpoint: dict[str, Any] | None = None) -> Entry | None:
        """HIBERNATING -> HIBERNATED; with the live ``checkpoint`` (name, bytes) its resume restores."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.HIBERNATING:
            return None
        info = {key: value for key, value in entry.info.items() if key != "checkpoint"}
        if checkpoint:
            info["checkpoint"] = dict(checkpoint)
        return self._move(entry, S.HIBERNATED, actor=None, hibernated_at=self.clock(), resume_state=None, stop=None,
                          released_at=None, info=info)

    def hibernate_failed(self, sandbox_id: str) -> None:
        """The engine did not stop the container: the sandbox serves on as it was."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.HIBERNATING:
            return
        back = entry.resume_state or S.WARM
        released_at = self.clock() if back is S.WARM and entry.released_at is None else entry.released_at
        self._move(entry, back, released_at=released_at, resume_state=None, stop=None)

    def resumed(self, sandbox_id: str, actor: Any, info: dict[str, Any]) -> Entry | None:
        """RESUMING -> ACTIVE: its container answers again, under ``actor``."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.RESUMING:
            return None
        self._touch(entry)
        return self._move(entry, S.ACTIVE, actor=actor, info=dict(info), hibernated_at=None)

    def resume_failed(self, sandbox_id: str) -> None:
        """RESUMING -> HIBERNATED: no room to start it now; it sleeps on."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not S.RESUMING:
            return
        self._move(entry, S.HIBERNATED, hibernated_at=entry.hibernated_at or self.clock())

    def hibernated_found(self, sandbox_id: str, thread_id: str | None, info: dict[str, Any], asleep_for: float) -> bool:
        """A hibernated sandbox a previous pool left (Ray's KV says so). False when already known."""
        if sandbox_id in self.entries or (thread_id is not None and thread_id in self.threads):
            return False
        entry = self._new(sandbox_id, thread_id, S.HIBERNATED, info=dict(info))
        entry.hibernated_at = self.clock() - max(asleep_for, 0.0)
        return True

    def expired_hibernated(self, ttl: float, most: int | None) -> list[Entry]:
        """HIBERNATED sandboxes past ``ttl`` seconds (0: none), and the oldest beyond ``most``:
        moved to STOPPING, to be removed for good."""
        now = self.clock()
        asleep = sorted(self.in_state(S.HIBERNATED), key=lambda e: e.hibernated_at or 0.0)
        expired = [e for e in asleep if ttl > 0 and now - (e.hibernated_at or now) > ttl]
        keep = [e for e in asleep if e not in expired]
        if most is not None and len(keep) > most:
            expired += keep[:len(keep) - most]
        return [self._begin_stop(entry, StopReason.EXPIRED) for entry in expired]

    # ── idle ───────────────────────────────────────────────────────────────

    def idle_candidates(self) -> list[tuple[Entry, int]]:
        """ACTIVE and WARM sandboxes idle past the timeout, with their version now.

        The pool must confirm with the sandbox itself (in-flight operations,
        its own last activity) and then call :meth:`begin_idle_stop`.
        """
        if self.idle_timeout <= 0:
            return []
        now = self.clock()
        return [
            (entry, entry.version)
            for entry in self.in_state(S.ACTIVE, S.WARM)
            if now - entry.last_active > self.idle_timeout
        ]

    def note_activity(self, sandbox_id: str, idle_for: float, inflight: int) -> None:
        """Fold what the sandbox reports (seconds since its last operation, operations running) into the entry."""
        entry = self.entries.get(sandbox_id)
        if entry is None:
            return
        entry.inflight = inflight
        seen = self.clock() if inflight > 0 else self.clock() - max(idle_for, 0.0)
        # Not a pool-side touch: the version is left alone, the idle check reads last_active.
        entry.last_active = max(entry.last_active, seen)

    # ── reconcile and shutdown ─────────────────────────────────────────────

    def adopt(self, sandbox_id: str, thread_id: str | None, actor: Any, info: dict[str, Any], idle_for: float) -> bool:
        """Take in a live sandbox found by reconcile; parked WARM. False when already known."""
        if sandbox_id in self.entries:
            return False
        if thread_id is not None and thread_id in self.threads:
            return False  # the thread already has a sandbox: never two
        seen = self.clock() - max(idle_for, 0.0)
        entry = self._new(sandbox_id, thread_id, S.WARM, released_at=seen, actor=actor, info=dict(info))
        entry.last_active = seen
        return True

    def replace_actor(self, sandbox_id: str, actor: Any, info: dict[str, Any]) -> bool:
        """A new SandboxActor re-adopted this sandbox's container (the old actor died)."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state not in (S.SPARE, S.ACTIVE, S.WARM):
            return False
        entry.actor = actor
        entry.info = dict(info)
        self._mark(sandbox_id)
        return True

    def report_death(self, sandbox_id: str) -> bool:
        """A death reported while an operation is under way on the sandbox: kept until it is
        settled (:meth:`death_settled`). False when one was reported already."""
        if sandbox_id in self.deaths:
            return False
        self.deaths.add(sandbox_id)
        return True

    def death_settled(self, sandbox_id: str) -> None:
        """The repair a reported death called for has begun (or there is none to make)."""
        self.deaths.discard(sandbox_id)

    def close(self) -> None:
        """Shutting down (or refusing to start): nothing new is decided from here on."""
        self.closed = True
        self.on_change()

    def begin_shutdown(self) -> list[Entry]:
        """Every SPARE, ACTIVE, WARM, DOOMED and HIBERNATED sandbox moves to STOPPING; returned for
        the pool to stop."""
        return [self._begin_stop(entry, StopReason.SHUTDOWN)
                for entry in self.in_state(S.SPARE, S.ACTIVE, S.WARM, S.DOOMED, S.HIBERNATED)]
