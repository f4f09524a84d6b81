"""A pool's egress proxy on one node, run by the node's reaper: it starts the proxy on the pool
network's gateway, routes the sandboxes to it, and writes what each sandbox reached or was
refused into that sandbox's audit trail (see :mod:`backends.egress` and :mod:`.audit`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from backends.base import Backend, Owner
from backends.egress import EgressProxy
from backends.errors import IsolationUnavailable, SandboxError

from . import raycalls
from .audit import append
from .config import SandboxConfig
from .threads import egress_ca_dir, thread_dir

if TYPE_CHECKING:
    from backends.egress_ca import EgressCA

logger = logging.getLogger(__name__)

_OWNERS_FRESH_SECONDS = 2.0  # a look at which sandbox has which address is trusted this long
_TELL_SECONDS = 10.0  # an actor told of its sandbox's egress answers within this
_ACTORS_KEPT = 256  # handles of the actors told last, kept for the next attempts

class Outbound:
    """The pool's egress proxy here, while the reaper lives."""

    def __init__(self, config: SandboxConfig, backend: Backend) -> None:
        self._config, self._backend, self._pool = config, backend, config.pool_name
        self.proxy: EgressProxy | None = None
        self._owners: dict[str, Owner] = {}
        self._looking: asyncio.Task[dict[str, Owner]] | None = None
        self._actors: dict[str, Any] = {}  # sandbox actors by name, for the trails kept by actors
        self._owners_at = 0.0
        self._writing: set[asyncio.Task[None]] = set()
        self._ca: EgressCA | None = None

    def _make_ca(self) -> EgressCA:
        from backends.egress_ca import EgressCA  # cryptography: loaded only by pools that inject

        directory = egress_ca_dir(self._config.base_dir, self._pool)
        try:
            return EgressCA(directory).ensure()
        except (OSError, ValueError) as exc:
            raise IsolationUnavailable(f"the egress CA of pool {self._pool!r} cannot be made at {directory}: "
                                       f"{exc}") from exc

    async def ensure(self, cluster_addresses: list[str]) -> dict[str, Any]:
        """The proxy running and the sandboxes routed to it (idempotent: the rules are refreshed).

        Raises:
            IsolationUnavailable: it cannot listen on the gateway, or the backend cannot route.
        """
        rules = self._config.network.egress_rules()
        # An allowed name must not lead where the sandboxes' own rules refuse: the cluster's nodes
        # and the pool's blocked networks besides what is always refused.
        rules.refused = (*rules.refused, *self._config.network.blocked, *cluster_addresses, *_own_addresses())
        if rules.inject:  # HTTPS to those domains is ended here: the CA the sandboxes will trust, made first
            rules.ca = self._ca = self._ca or await asyncio.to_thread(self._make_ca)
        if self.proxy is not None:
            self.proxy.rules = rules
        else:
            gateway = await self._backend.egress_gateway(self._pool)
            proxy = EgressProxy(rules, gateway, self._log)
            try:
                await proxy.start(dns_port=53)
            except OSError as exc:
                raise IsolationUnavailable(f"the egress proxy of pool {self._pool!r} cannot listen on {gateway} "
                                           f"(port 53 for its DNS): {exc.strerror or exc}") from exc
            self.proxy = proxy
            logger.info("pool %s: egress proxy on %s (DNS :53, proxy :%d) for %s", self._pool, gateway,
                        proxy.proxy_port, ", ".join(self._config.network.allow_domains))
        await self._backend.route_egress(self._pool, self.proxy.proxy_port, cluster_addresses)
        return {"egress_proxy": f"{self.proxy.address}:{self.proxy.proxy_port}"}

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
            self.proxy = None
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)

    def _log(self, source: str, entry: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._record(source, entry))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _record(self, source: str, entry: dict[str, Any]) -> None:
        """Into the audit trail of the sandbox at ``source`` (logged here too when it is unknown)."""
        owner = self._owners.get(source)
        if owner is None or time.monotonic() - self._owners_at > _OWNERS_FRESH_SECONDS:
            # A sandbox new here, or a look too old to trust (a gone sandbox's address may be a new
            # one's now): look again, one look for all who wait on it.
            if self._looking is None or self._looking.done():
                self._looking = asyncio.get_running_loop().create_task(self._backend.addresses(self._pool))
                self._owners_at = time.monotonic()
            try:
                self._owners = await asyncio.shield(self._looking)
            except SandboxError as exc:
                logger.info("egress from %s not attributed (%s)", source, exc.message)
            owner = self._owners.get(source)
        verdict = "allowed" if entry.get("allowed") else "refused"
        logger.info("pool %s: egress %s %s:%s from %s (%s)", self._pool, verdict, entry.get("host"),
                    entry.get("port", 53), owner.sandbox_id if owner else source, entry.get("kind"))
        if owner is None:
            return
        record = {"at": round(time.time(), 3), "kind": "egress", "via": entry.get("protocol") or entry.get("kind"),
                  **{k: v for k, v in entry.items() if k not in ("kind", "protocol")}}
        if owner.thread_id is not None and self._config.thread_mounts:
            await asyncio.to_thread(append, thread_dir(self._config.base_dir, owner.thread_id).parent / "audit.jsonl",
                                    record)
        elif owner.actor:  # a trail with no file (an anonymous sandbox's): its actor keeps it
            await self._tell_actor(owner, record)

    async def _tell_actor(self, owner: Owner, record: dict[str, Any]) -> None:
        """Into the trail ``owner``'s actor keeps (it drops what is not its sandbox's any more)."""
        actor = self._actors.pop(owner.actor, None)
        if actor is None:
            actor = await asyncio.to_thread(raycalls.get_actor, owner.actor, self._config.namespace)
        try:
            if actor is None:
                raise raycalls.ActorGone(f"no actor named {owner.actor}")
            await raycalls.call(actor.record_egress.remote(owner.sandbox_id, record), _TELL_SECONDS, "record egress")
        except SandboxError as exc:
            logger.info("egress of sandbox %s not kept by its actor %s: %s", owner.sandbox_id, owner.actor,
                        exc.message)
            return
        self._actors[owner.actor] = actor  # the most recently told last
        while len(self._actors) > _ACTORS_KEPT:
            self._actors.pop(next(iter(self._actors)))


def _own_addresses(fib_trie: str = "/proc/net/fib_trie") -> list[str]:
    """Every IPv4 address of this host (its interfaces, Docker's gateways), as the kernel's
    routing table marks them local: the sandboxes' rules refuse the host on all of them, and so
    does the proxy."""
    found: list[str] = []
    last = ""
    try:
        with open(fib_trie, encoding="ascii") as table:
            for line in table:
                words = line.split()
                if words[:1] == ["|--"] and len(words) == 2:
                    last = words[1]
                elif "/32 host LOCAL" in line and last and f"{last}/32" not in found:
                    found.append(f"{last}/32")
    except OSError as exc:
        logger.warning("this host's addresses are unknown (%s): the egress proxy refuses only the rest", exc)
    return found
