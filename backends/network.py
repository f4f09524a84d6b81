"""One Docker network per pool, and where its sandboxes' API sockets live.

Each pool's sandboxes sit on a bridge of their own, labelled with the pool,
with inter-container traffic off (``enable_icc=false``: sandboxes cannot
reach each other) and our firewall rules (:mod:`backends.firewall`) keeping
them off the host and the metadata service. With egress 'none' there is no
network at all and the API is reached over a unix socket only.

Everything here is synchronous (the Docker SDK and iptables are); the
backend calls it from worker threads.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import docker
import docker.errors

from .base import LABEL_POOL, LABEL_PROJECT, PROJECT
from .engine import engine_errors
from .errors import IsolationUnavailable, SandboxStartError
from .firewall import Firewall, NetworkPolicy

logger = logging.getLogger(__name__)

LABEL_TAG = "sandbox-actors.tag"
_ICC = "com.docker.network.bridge.enable_icc"
_BRIDGE_NAME = "com.docker.network.bridge.name"
# Unix socket paths hold at most 107 bytes; <dir>/<tag>/<sandbox id>/api.sock must fit.
MAX_SOCKET_DIR = 60


@functools.lru_cache(maxsize=256)
def pool_tag(pool: str) -> str:
    """A short, stable tag for a pool: names its network, bridge, chains and socket directory."""
    return hashlib.sha256(pool.encode("utf-8")).hexdigest()[:10]


def default_socket_dir() -> str:
    """Node-local directory for sandbox API sockets: /run (root) or /tmp (another user)."""
    return "/run/sandbox-actors" if os.geteuid() == 0 else f"/tmp/sandbox-actors-{os.geteuid()}"


class PoolNetwork:
    """The network (and firewall rules) of one pool on one engine.

    Args:
        client: returns the engine's Docker client.
        pool: the pool's name.
        policy: what its sandboxes may reach.
        lock_path: file to lock while changing firewall rules on this node.
        labels: added to the network (e.g. the Ray cluster that made it).
    """

    def __init__(self, client: Callable[[], docker.DockerClient], pool: str, policy: NetworkPolicy,
                 lock_path: str | None = None, labels: Mapping[str, str] | None = None) -> None:
        self._client = client
        self.pool = pool
        self.policy = policy
        self.tag = pool_tag(pool)
        self.name = f"sbx-net-{self.tag}"
        self.bridge = f"sbx-{self.tag}"
        self.firewall = Firewall(self.tag, self.bridge, lock_path)
        self._lock = threading.Lock()  # one ensure at a time in this process
        self._labels = dict(labels or {})
        self.proxy: tuple[str, int] | None = None  # the pool's egress proxy here (gateway, port), when it has one
        self._gateway: str | None = None

    def ensure(self, extra_blocked: Iterable[str] = (), refresh: bool = False) -> str | None:
        """The network's name, after making sure it and its rules exist; None when the policy
        gives sandboxes no network.

        Rules go in before the network exists, so no container is ever attached to an
        unguarded bridge. ``refresh`` rewrites the rules (the node's reaper does, with the
        cluster's node addresses); otherwise existing rules are left alone.

        Raises:
            IsolationUnavailable: the rules cannot be installed, or the network exists with
                a different isolation setting and is in use.
        """
        if not self.policy.networked:
            return None
        with self._lock:
            return self._ensure(extra_blocked, refresh)

    def _ensure(self, extra_blocked: Iterable[str], refresh: bool) -> str:
        if self.policy.enforce:
            self.firewall.install(self.policy, extra_blocked, replace=refresh, proxy=self.proxy)
        network = self._get()
        if network is not None and self._icc(network) != self._wanted_icc():
            if network.attrs.get("Containers"):
                raise IsolationUnavailable(
                    f"network {self.name} of pool {self.pool!r} was made with network.enforce "
                    f"{'on' if self.policy.enforce is False else 'off'} and still has sandboxes; shut the pool "
                    "down (`sandbox-actors down`) before changing network.enforce"
                )
            self._remove_network(network)
            network = None
        if network is None:
            self._create()
        return self.name

    def gateway(self) -> str:
        """The network's gateway address on this host (where the pool's egress proxy listens).

        Raises:
            SandboxStartError: the network does not exist (yet).
        """
        if self._gateway is None:
            network = self._get()
            configs = ((network.attrs.get("IPAM") or {}).get("Config") or []) if network is not None else []
            gateway = next((c.get("Gateway") for c in configs if c.get("Gateway")), None)
            if gateway is None:
                raise SandboxStartError(f"network {self.name} of pool {self.pool!r} has no gateway (is it there?)")
            self._gateway = gateway
        return self._gateway

    def exists(self) -> bool:
        """Whether the policy needs no network, or the network is there."""
        return not self.policy.networked or self._get() is not None

    def _wanted_icc(self) -> bool:
        return not self.policy.enforce

    @staticmethod
    def _icc(network: Any) -> bool:
        return str((network.attrs.get("Options") or {}).get(_ICC, "true")).lower() == "true"

    def _get(self) -> Any | None:
        with engine_errors(f"inspect network {self.name}"):
            try:
                return self._client().networks.get(self.name)
            except docker.errors.NotFound:
                return None

    def _create(self) -> None:
        options = {_ICC: str(self._wanted_icc()).lower(), _BRIDGE_NAME: self.bridge}
        labels = {**self._labels, LABEL_PROJECT: PROJECT, LABEL_POOL: self.pool, LABEL_TAG: self.tag}
        with engine_errors(f"create network {self.name}"):
            try:
                self._client().networks.create(
                    self.name, driver="bridge", options=options, labels=labels, check_duplicate=True,
                    enable_ipv6=False,
                )
                logger.info("pool %s: created network %s (bridge %s)", self.pool, self.name, self.bridge)
            except docker.errors.APIError:
                # Another process of the pool may have made it first (its name and bridge are
                # the pool's, so the engine refuses a second): that one is as good as ours.
                if self._get() is None:
                    raise

    def _remove_network(self, network: Any) -> bool:
        with engine_errors(f"remove network {self.name}"):
            try:
                network.remove()
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as exc:
                if exc.status_code in (403, 409):  # the engine's "has active endpoints": still in use
                    logger.info("network %s still has containers; left for later", self.name)
                    return False
                raise
        return True

    def drop_stale_endpoints(self) -> list[str]:
        """Force the engine to forget the endpoints this network still lists. Only for a network
        none of whose containers exist any more: dockerd 20.10 can keep the endpoint of a
        container removed while it was starting, and then refuses to remove the network ("has
        active endpoints"). Returns the names of the endpoints dropped."""
        network = self._get()
        if network is None:
            return []
        dropped = []
        for endpoint in (network.attrs.get("Containers") or {}).values():
            name = endpoint.get("Name")
            if not name:
                continue
            with engine_errors(f"drop endpoint {name} of network {self.name}"):
                try:
                    network.disconnect(name, force=True)
                except docker.errors.NotFound:
                    continue
            dropped.append(name)
        return dropped

    def remove(self) -> dict[str, int]:
        """Remove the network (once no container uses it) and our rules. Idempotent."""
        network = self._get()
        removed = {"networks": 0, "rules": 0}
        if network is not None and self._remove_network(network):
            removed["networks"] = 1
        if self._get() is None and self.firewall.remove():
            removed["rules"] = 1  # rules go only with the network: never leave a bridge unguarded
        return removed


def our_networks(client: docker.DockerClient) -> list[Any]:
    """Every network of ours on this engine."""
    with engine_errors("list networks"):
        return client.networks.list(filters={"label": f"{LABEL_PROJECT}={PROJECT}"})
