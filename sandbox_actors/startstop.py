"""How a pool comes up and goes down: the steps, in their order, and why that order.

Coming up, a pool claims its ``base_dir`` (two pools must not share a thread's directories);
going down, it first records that it was shut down (so no client's retry brings it back), then
stops everything that could start new work, then destroys what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from backends.base import Capability

from . import snapshots
from .config import SandboxConfig
from .errors import ConfigError, SandboxError
from .lifecycle import Lifecycle
from .reconciler import Reconciler
from .state import PoolState

logger = logging.getLogger(__name__)


async def claim_base_dir(config: SandboxConfig, life: Lifecycle) -> None:
    """Record this pool as the one using ``config.base_dir``.

    Raises:
        ConfigError: another pool that is running uses it.
    """
    records = life.records
    if not config.thread_mounts or Capability.HOST_MOUNTS not in config.backend.capabilities:
        return
    owner = await asyncio.to_thread(records.base_dir_owner, config.base_dir)
    if owner not in (None, config.pool_name) and await life.fleet.pool_exists(owner):
        raise ConfigError(
            f"base_dir {config.base_dir} is used by pool {owner!r}, which is running; two pools sharing it "
            "would share their threads' workspaces. Give each pool its own base_dir"
        )
    await asyncio.to_thread(records.claim_base_dir, config.base_dir)


async def shut_down(config: SandboxConfig, life: Lifecycle, state: PoolState, reconciler: Reconciler,
                    loops: list[asyncio.Task[None]]) -> dict[str, int]:
    """Destroy every sandbox of the pool (and, unless kept, its snapshots), stop its loops and
    sweep what its engines still hold; returns the counts."""
    await asyncio.to_thread(life.records.mark_shut_down)
    for loop in loops:
        loop.cancel()
    state.close()  # acquires from here on are refused, nothing is topped up or repaired
    life.stop_watching()
    await life.fleet.close()
    await reconciler.finish()
    await life.ops.drain()
    stops = [life.stop_later(entry) for entry in state.begin_shutdown()]
    results = await asyncio.gather(*stops, return_exceptions=True)
    destroyed = sum(1 for r in results if r is True)
    if not config.keep_snapshots and Capability.SNAPSHOT in config.backend.capabilities:
        removed = await snapshots.remove_all(life)
        if removed:
            logger.info("pool %s: %d snapshots removed", config.pool_name, removed)
    swept = await life.fleet.sweep()
    with contextlib.suppress(SandboxError):  # the claim only guards a start; a stale one is replaced
        await asyncio.to_thread(life.records.release_base_dir, config.base_dir)
    logger.info("pool %s shut down: %d destroyed, %s swept", config.pool_name, destroyed, swept)
    return {"destroyed": destroyed, **swept}
