"""The order in which an acquire gets its sandbox, and how a destroy waits its turn.

Each turn asks the pool's state for a decision (no ``await`` inside it), then
carries it out or waits for the operation under way on that sandbox, and
asks again: whatever happened during the wait is judged afresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .errors import BackendUnavailable, PoolExhausted, PoolShutDown
from .hibernation import resume_later
from .lifecycle import Lifecycle, lease
from .operations import OpKind
from .state import (
    Acquired,
    Claimed,
    Decision,
    Entry,
    MustCheck,
    MustCreate,
    MustResume,
    MustWait,
    SandboxState,
)
from .views import HostDirs, Lease

logger = logging.getLogger(__name__)


async def acquire(life: Lifecycle, sandbox_id_now: Callable[[], str], thread_id: str | None, deadline: float,
                  snapshot: str | None = None, host: HostDirs | None = None) -> Lease:
    """The sandbox ``sandbox_id_now()`` names (asked each turn: a thread may be given a spare's id):
    active, else reclaimed warm once it is seen to run, else resumed from hibernation, else a
    spare, else created (from ``snapshot``'s image when given: a new sandbox only; on ``host``'s
    node with its mounts when given).

    Raises:
        PoolShutDown, PoolExhausted (no capacity before ``deadline``), BackendUnavailable (its
        destroy is still owed), InvalidRequest (a snapshot for a sandbox that exists), and the
        start errors of a new sandbox.
    """
    config, state = life.config, life.state
    started_here = False  # a start this acquire made or joined ended, and it asks again (see _untouched)
    while True:
        if life.closed:
            raise PoolShutDown(f"pool {config.pool_name} is shutting down")
        sandbox_id = sandbox_id_now()
        operation = life.ops.get(sandbox_id)
        if operation is not None:
            if operation.kind is OpKind.START:  # a start of this very sandbox: share its outcome
                started = await asyncio.shield(operation.task)
                if _untouched(life, sandbox_id):
                    return started
                started_here = True
                continue  # e.g. its container died as it started: repaired (replaced) first
            state.want_back(sandbox_id)  # an idle stop under way is called off, if it still can be
            await life.ops.wait(sandbox_id)
            continue
        if sandbox_id in state.deaths:  # reported dead while an operation was under way: settled first
            repair = life.settle(sandbox_id)
            if repair is not None:
                await asyncio.shield(repair)
            continue
        # A snapshot starts new sandboxes only; but the one this acquire started from it is its own.
        image = None if started_here and state.entry(sandbox_id) is not None else snapshot
        decision = state.acquire(sandbox_id, thread_id, busy=life.ops.busy(), image=image, host=host)
        got = await _carry_out(life, decision, sandbox_id, deadline)
        if isinstance(got, Lease):
            return got
        started_here = started_here or got == STARTED


STARTED = "started"  # a start this acquire made ended, but something came after it: ask again


async def _carry_out(life: Lifecycle, decision: Decision, sandbox_id: str, deadline: float) -> Lease | str | None:
    """Do what the pool's state decided for an acquire: the lease, or STARTED / None to ask again."""
    config = life.config
    if isinstance(decision, Acquired):
        life.tally.count("acquired_hot")
        return lease(decision.entry, decision.path)
    if isinstance(decision, MustCheck):
        checked = await asyncio.shield(life.check(decision))
        if isinstance(checked, Lease):
            return checked
        if checked is False:  # dead: the repair removes it, the next turn creates anew
            repair = life.repair(sandbox_id)
            outcome = None if repair is None else await asyncio.shield(repair)
            if outcome == "unknown":
                raise BackendUnavailable(
                    f"sandbox {sandbox_id} no longer runs and its engine does not answer, so it cannot be "
                    "removed or replaced yet; retry"
                )
            if outcome == "healthy":
                # The repair's close look (its actor, its container) found it whole where the quick
                # check did not: it is reclaimed on that, never checked again and again.
                reclaimed = life.state.reclaim(sandbox_id, decision.version)
                if reclaimed is not None:
                    logger.warning("warm sandbox %s: its actor said it does not run, but it does; reclaimed",
                                   sandbox_id)
                    life.tally.count("reclaimed")
                    return lease(reclaimed.entry, "warm")
        return None
    if isinstance(decision, Claimed):
        return await asyncio.shield(life.claim(decision.entry))
    for victim in decision.evict:
        logger.info("evicting warm sandbox %s to stay within replicas=%d", victim.sandbox_id, config.replicas)
        life.stop_later(victim)
    if isinstance(decision, MustResume):
        # None: it could not be resumed and is gone; the next turn starts a new one.
        return await asyncio.shield(resume_later(life, decision.entry))
    if isinstance(decision, MustCreate):
        if decision.over_soft_cap:
            _OVER_SOFT_CAP.note(config.replicas, sandbox_id)
        started = await asyncio.shield(life.create(decision.entry))
        # Else e.g. its container died as it started: repaired (replaced) first.
        return started if _untouched(life, decision.entry.sandbox_id) else STARTED
    await _wait_for(life, decision, deadline)
    return None


class _SoftCapWarning:
    """A warning that sandboxes are created past ``replicas``: at once the first time, then at
    most once a minute with how many came meanwhile (under churn it came with every acquire)."""

    EVERY = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock, self._last, self._since = clock, float("-inf"), 0

    def note(self, replicas: int, sandbox_id: str) -> bool:
        """Count one sandbox created past the limit; whether it was logged."""
        self._since += 1
        if self._clock() - self._last < self.EVERY:
            return False
        more = f" (and {self._since - 1} more since the last warning)" if self._since > 1 else ""
        logger.warning("all %d replica slots are in use; creating sandbox %s beyond the soft limit%s",
                       replicas, sandbox_id, more)
        self._last, self._since = self._clock(), 0
        return True


_OVER_SOFT_CAP = _SoftCapWarning()


def _untouched(life: Lifecycle, sandbox_id: str) -> bool:
    """Nothing came after a start just ended: no death reported meanwhile, no repair begun for one."""
    return sandbox_id not in life.state.deaths and life.ops.get(sandbox_id) is None


async def _wait_for(life: Lifecycle, decision: MustWait, deadline: float) -> None:
    config, remaining = life.config, deadline - time.monotonic()
    if decision.reason == "doomed":
        repair = life.repair(decision.sandbox_id)
        if repair is not None:
            await asyncio.shield(repair)
        entry = life.state.entry(decision.sandbox_id)
        if entry is not None and entry.state is SandboxState.DOOMED:
            raise BackendUnavailable(
                f"sandbox {decision.sandbox_id} is still being destroyed (its engine does not answer); retry"
            )
    elif decision.reason == "capacity":
        if remaining <= 0:
            life.tally.count("exhausted")
            raise PoolExhausted(
                f"pool {config.pool_name} is at max_sandboxes={config.max_sandboxes} and none freed up within "
                f"{config.capacity_timeout:.0f}s; release or destroy sandboxes, or retry",
                max_sandboxes=config.max_sandboxes,
            )
        life.capacity_waits += 1
        try:
            await life.changed.wait(remaining)
        finally:
            life.capacity_waits -= 1
    elif life.ops.get(decision.sandbox_id) is not None:
        await life.ops.wait(decision.sandbox_id)  # e.g. the spare this thread will get, still starting
    else:
        await life.changed.wait(min(0.05, max(0.0, remaining)))  # its operation is about to start


async def _when_free(life: Lifecycle, sandbox_id: str, begin: Callable[[str], Entry | MustWait | None]
                     ) -> Entry | None:
    """Once no operation is under way on the sandbox, what ``begin`` makes of it (an entry to act
    on, or None when there is nothing to do); asks again while it says wait."""
    while True:
        if life.ops.get(sandbox_id) is not None:
            await life.ops.wait(sandbox_id)
            continue
        found = begin(sandbox_id)
        if not isinstance(found, MustWait):
            return found
        await life.changed.wait(0.05)


async def destroy(life: Lifecycle, sandbox_id: str) -> bool:
    """Stop and remove a sandbox once no other operation is under way on it; False when unknown.

    Raises:
        BackendUnavailable: its engine did not confirm the removal (the sandbox is DOOMED).
    """
    found = await _when_free(life, sandbox_id, life.state.begin_destroy)
    return False if found is None else await asyncio.shield(life.stop_later(found))


async def hibernate(life: Lifecycle, sandbox_id: str, live: bool = False) -> bool:
    """Hibernate a running sandbox once no other operation is under way on it (``live``: keeping
    its processes and memory); True when it is hibernated (also already), False when it is not
    a sandbox that runs.

    Raises:
        BackendUnavailable: the engine did not stop it; NotSupported, SandboxStartError: no live
            checkpoint. It serves on.
    """
    found = await _when_free(life, sandbox_id, life.state.begin_hibernate)
    if found is None:
        entry = life.state.entry(sandbox_id)
        return entry is not None and entry.state is SandboxState.HIBERNATED
    return await asyncio.shield(life.hibernate_later(found, live))
