"""The pool's decisions, as plain Python: no Ray, no Docker, an injectable clock.

:class:`PoolState` holds one :class:`Entry` per sandbox and answers the
questions the pool actor asks: which sandbox does this acquire get, what must
be evicted first, must it wait, what is idle. The actor carries out the
answers (start containers, stop them) and reports back. Every method is
synchronous, so a decision and the state change it makes happen with no
``await`` in between; after any ``await`` the actor asks again.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from backends.errors import SandboxError


class SandboxState(enum.Enum):
    STARTING = "starting"  # actor and container being created
    SPARE = "spare"  # pre-warmed: container running, not yet any thread's
    ACTIVE = "active"  # leased to a thread
    WARM = "warm"  # released; container running, ready to reclaim
    STOPPING = "stopping"  # container being removed


_TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    SandboxState.STARTING: frozenset({SandboxState.ACTIVE, SandboxState.SPARE}),
    SandboxState.SPARE: frozenset({SandboxState.ACTIVE, SandboxState.STOPPING}),
    SandboxState.ACTIVE: frozenset({SandboxState.WARM, SandboxState.STOPPING}),
    SandboxState.WARM: frozenset({SandboxState.ACTIVE, SandboxState.STOPPING}),
    # Back out of STOPPING only when the sandbox refused an idle stop (it got busy).
    SandboxState.STOPPING: frozenset({SandboxState.ACTIVE, SandboxState.WARM}),
}


class IllegalTransition(SandboxError):
    """A bug: the pool tried to move a sandbox between states that do not connect."""


@dataclass
class Entry:
    """One sandbox as the pool sees it.

    ``last_active`` is the pool clock at the last acquire/get/release or
    reported activity; ``released_at`` is set while WARM. ``version`` grows on
    every touch, so a decision taken before an ``await`` can tell whether the
    sandbox was used meanwhile.
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
    resume_state: SandboxState | None = None
    spare: bool = False  # started ahead of need, for whichever thread comes first

    def move(self, new: SandboxState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise IllegalTransition(f"sandbox {self.sandbox_id}: {self.state.value} -> {new.value} is not allowed")
        self.state = new


# ── decisions ───────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Acquired:
    """The thread's sandbox is ready: ``path`` is 'hot' (already active) or 'warm' (reclaimed)."""

    entry: Entry
    path: str


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
    """Nothing to return yet: ``reason`` is 'starting', 'stopping' or 'capacity'."""

    sandbox_id: str
    reason: str
    evict: tuple[Entry, ...] = ()


Decision = Acquired | Claimed | MustCreate | MustWait


class PoolState:
    """Every sandbox of one pool and the rules that move them.

    Args:
        replicas: soft cap on STARTING + ACTIVE + WARM sandboxes; reaching it
            evicts the least recently released WARM one, never an ACTIVE one.
        max_sandboxes: optional hard cap on all sandboxes (STOPPING ones
            included, their containers still exist); at it, acquire waits.
        idle_timeout: seconds; 0 disables idle reaping.
        prewarm: how many SPARE sandboxes to keep ready for new threads. They
            count toward the caps and the idle timeout never reaps them.
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

    # ── queries ────────────────────────────────────────────────────────────

    def in_state(self, *states: SandboxState) -> list[Entry]:
        return [entry for entry in self.entries.values() if entry.state in states]

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in SandboxState}
        for entry in self.entries.values():
            counts[entry.state.value] += 1
        return counts

    def _live(self) -> int:
        return len(self.in_state(SandboxState.STARTING, SandboxState.SPARE, SandboxState.ACTIVE, SandboxState.WARM))

    def _mark(self, sandbox_id: str) -> None:
        self.epoch += 1
        self._changed[sandbox_id] = self.epoch

    def changed_since(self, epoch: int) -> set[str]:
        """Sandbox ids created, moved or removed after ``epoch`` (and forget older marks).

        Reconcile compares snapshots taken across awaits; an id changed meanwhile
        is left for the next pass rather than judged on a stale view.
        """
        changed = {sid for sid, at in self._changed.items() if at > epoch}
        self._changed = {sid: self._changed[sid] for sid in changed}
        return changed

    def lookup(self, thread_id: str) -> str | None:
        """The sandbox id the pool holds for ``thread_id``, if any."""
        return self.threads.get(thread_id)

    def _index(self, entry: Entry) -> None:
        if entry.thread_id is not None:
            self.threads[entry.thread_id] = entry.sandbox_id

    def _drop(self, sandbox_id: str) -> None:
        self._mark(sandbox_id)
        entry = self.entries.pop(sandbox_id, None)
        if entry is not None and entry.thread_id is not None and self.threads.get(entry.thread_id) == sandbox_id:
            del self.threads[entry.thread_id]

    def _touch(self, entry: Entry) -> None:
        entry.last_active = self.clock()
        entry.version += 1

    # ── acquire ────────────────────────────────────────────────────────────

    def acquire(self, sandbox_id: str, thread_id: str | None) -> Decision:
        """Decide what an acquire of ``sandbox_id`` gets (SPEC §3 order).

        1. active: return it; 2. warm: reclaim it; 3./4. otherwise create (the
        actor layer adopts a live SandboxActor of that id if one exists).
        """
        entry = self.entries.get(sandbox_id)
        if entry is not None:
            if entry.state is SandboxState.ACTIVE:
                self._touch(entry)
                return Acquired(entry, "hot")
            if entry.state is SandboxState.WARM:
                entry.move(SandboxState.ACTIVE)
                entry.released_at = None
                self._touch(entry)
                self._mark(sandbox_id)
                return Acquired(entry, "warm")
            return MustWait(sandbox_id, entry.state.value)

        spares = self.in_state(SandboxState.SPARE)
        if spares:
            entry = min(spares, key=lambda e: e.created_at)
            entry.move(SandboxState.ACTIVE)
            entry.thread_id = thread_id
            self._index(entry)
            self._touch(entry)
            self._mark(entry.sandbox_id)
            return Claimed(entry)
        if self._live() >= self.replicas:
            # At the cap with a spare on its way: it is the capacity this thread gets.
            coming = [e for e in self.entries.values() if e.spare and e.state is SandboxState.STARTING]
            if coming:
                return MustWait(coming[0].sandbox_id, "starting")
        evict = self._evict_for_one_more()
        if self.max_sandboxes is not None and len(self.entries) >= self.max_sandboxes:
            return MustWait(sandbox_id, "capacity", evict)
        over_soft_cap = self._live() >= self.replicas
        now = self.clock()
        entry = Entry(sandbox_id, thread_id, SandboxState.STARTING, created_at=now, last_active=now)
        self.entries[sandbox_id] = entry
        self._index(entry)
        self._mark(sandbox_id)
        return MustCreate(entry, evict, over_soft_cap)

    def begin_spare(self, sandbox_id: str) -> Entry | None:
        """A new STARTING spare when fewer than ``prewarm`` are ready or starting and there is room.

        Spares never evict anything: with no room under the caps, none is started.
        """
        pending = [e for e in self.entries.values() if e.spare and e.state in (SandboxState.STARTING, SandboxState.SPARE)]
        if len(pending) >= self.prewarm or self._live() >= self.replicas:
            return None
        if self.max_sandboxes is not None and len(self.entries) >= self.max_sandboxes:
            return None
        now = self.clock()
        entry = Entry(sandbox_id, None, SandboxState.STARTING, created_at=now, last_active=now, spare=True)
        self.entries[sandbox_id] = entry
        self._mark(sandbox_id)
        return entry

    def claim_failed(self, sandbox_id: str) -> None:
        """A claimed spare turned out dead: forget it (the acquire tries again)."""
        self._drop(sandbox_id)

    def _evict_for_one_more(self) -> tuple[Entry, ...]:
        """Move least recently released WARM sandboxes to STOPPING until one more fits under ``replicas``."""
        evicted = []
        warm = sorted(self.in_state(SandboxState.WARM), key=lambda e: e.released_at or 0.0)
        while warm and self._live() >= self.replicas:
            victim = warm.pop(0)
            victim.move(SandboxState.STOPPING)
            self._mark(victim.sandbox_id)
            evicted.append(victim)
        return tuple(evicted)

    def evict_lru_warm(self, node_id: str | None = None) -> Entry | None:
        """Move the least recently released WARM sandbox (on ``node_id``, when given) to STOPPING,
        to free a node slot."""
        warm = [e for e in self.in_state(SandboxState.WARM) if node_id is None or e.info.get("node_id") == node_id]
        if not warm:
            return None
        victim = min(warm, key=lambda e: e.released_at or 0.0)
        victim.move(SandboxState.STOPPING)
        self._mark(victim.sandbox_id)
        return victim

    def started(self, sandbox_id: str, actor: Any, info: dict[str, Any]) -> Entry:
        """A STARTING sandbox answered: it becomes ACTIVE."""
        entry = self.entries[sandbox_id]
        entry.move(SandboxState.SPARE if entry.spare else SandboxState.ACTIVE)
        entry.actor = actor
        entry.info = dict(info)
        self._touch(entry)
        self._mark(sandbox_id)
        return entry

    def start_failed(self, sandbox_id: str) -> None:
        entry = self.entries.get(sandbox_id)
        if entry is not None and entry.state is SandboxState.STARTING:
            self._drop(sandbox_id)

    # ── release, get, destroy ──────────────────────────────────────────────

    def release(self, sandbox_id: str) -> bool:
        """ACTIVE -> WARM. Returns True when it is warm now (also when it already was)."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not SandboxState.ACTIVE:
            return entry is not None and entry.state is SandboxState.WARM
        entry.move(SandboxState.WARM)
        entry.released_at = self.clock()
        self._touch(entry)
        self._mark(sandbox_id)
        return True

    def get(self, sandbox_id: str) -> Entry | None:
        """The entry when ACTIVE (its activity refreshed), else None."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state is not SandboxState.ACTIVE:
            return None
        self._touch(entry)
        return entry

    def begin_destroy(self, sandbox_id: str) -> Entry | MustWait | None:
        """SPARE/ACTIVE/WARM -> STOPPING and return the entry to stop; wait if starting/stopping; None if unknown."""
        entry = self.entries.get(sandbox_id)
        if entry is None:
            return None
        if entry.state in (SandboxState.STARTING, SandboxState.STOPPING):
            return MustWait(sandbox_id, entry.state.value)
        entry.move(SandboxState.STOPPING)
        entry.resume_state = None
        self._mark(sandbox_id)
        return entry

    def removed(self, sandbox_id: str) -> None:
        """The sandbox is gone (stopped, lost with its node, or its container vanished)."""
        self._drop(sandbox_id)

    # ── idle ───────────────────────────────────────────────────────────────

    def idle_candidates(self) -> list[tuple[Entry, int]]:
        """ACTIVE and WARM sandboxes idle past the timeout, with their version now.

        The actor must confirm with the sandbox itself (in-flight operations,
        its own last activity) and then call :meth:`begin_idle_stop`.
        """
        if self.idle_timeout <= 0:
            return []
        now = self.clock()
        return [
            (entry, entry.version)
            for entry in self.in_state(SandboxState.ACTIVE, SandboxState.WARM)
            if now - entry.last_active > self.idle_timeout
        ]

    def note_activity(self, sandbox_id: str, idle_for: float, inflight: int) -> None:
        """Fold what the sandbox reports (seconds since its last operation, operations running) into the entry."""
        entry = self.entries.get(sandbox_id)
        if entry is None:
            return
        entry.inflight = inflight
        seen = self.clock() - max(idle_for, 0.0)
        if inflight > 0:
            seen = self.clock()
        # Not a pool-side touch: the version is left alone, the idle check reads last_active.
        entry.last_active = max(entry.last_active, seen)

    def begin_idle_stop(self, sandbox_id: str, version: int) -> Entry | None:
        """Re-check an idle candidate after the actor asked the sandbox; STOPPING if still idle.

        Returns None (keep it) when the sandbox was used since the candidate
        was chosen (its version moved), is busy, or changed state.
        """
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.version != version or entry.inflight > 0:
            return None
        if entry.state not in (SandboxState.ACTIVE, SandboxState.WARM):
            return None
        if self.clock() - entry.last_active <= self.idle_timeout:
            return None
        entry.resume_state = entry.state
        entry.move(SandboxState.STOPPING)
        self._mark(sandbox_id)
        return entry

    def stop_refused(self, sandbox_id: str) -> None:
        """The sandbox refused an idle stop (an operation started): put it back as it was."""
        entry = self.entries.get(sandbox_id)
        if entry is not None and entry.state is SandboxState.STOPPING and entry.resume_state is not None:
            entry.move(entry.resume_state)
            entry.resume_state = None
            self._touch(entry)
            self._mark(sandbox_id)

    # ── reconcile and shutdown ─────────────────────────────────────────────

    def adopt(self, sandbox_id: str, thread_id: str | None, actor: Any, info: dict[str, Any], idle_for: float) -> bool:
        """Take in a live sandbox found by reconcile; parked WARM. False when already known."""
        if sandbox_id in self.entries:
            return False
        if thread_id is not None and thread_id in self.threads:
            return False  # the thread already has a sandbox: never two
        now = self.clock()
        seen = now - max(idle_for, 0.0)
        entry = Entry(
            sandbox_id, thread_id, SandboxState.WARM, created_at=now, last_active=seen, released_at=seen,
            actor=actor, info=dict(info),
        )
        self.entries[sandbox_id] = entry
        self._index(entry)
        self._mark(sandbox_id)
        return True

    def replace_actor(self, sandbox_id: str, actor: Any, info: dict[str, Any]) -> bool:
        """A new SandboxActor re-adopted this sandbox's container (the old actor died)."""
        entry = self.entries.get(sandbox_id)
        if entry is None or entry.state not in (SandboxState.SPARE, SandboxState.ACTIVE, SandboxState.WARM):
            return False
        entry.actor = actor
        entry.info = dict(info)
        self._mark(sandbox_id)
        return True

    def begin_shutdown(self) -> list[Entry]:
        """Every SPARE, ACTIVE and WARM sandbox moves to STOPPING; returned for the actor to stop."""
        doomed = self.in_state(SandboxState.SPARE, SandboxState.ACTIVE, SandboxState.WARM)
        for entry in doomed:
            entry.move(SandboxState.STOPPING)
            entry.resume_state = None
            self._mark(entry.sandbox_id)
        return doomed

    def ids(self, states: Iterable[SandboxState] | None = None) -> set[str]:
        if states is None:
            return set(self.entries)
        wanted = set(states)
        return {sid for sid, entry in self.entries.items() if entry.state in wanted}
