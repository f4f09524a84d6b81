"""What a pool keeps in Ray's GCS key-value store: facts that must outlive the pool actor.

Out of every sandbox's reach, and still there when Ray restarts the pool or
a new one is connected:

* the tombstone of a pool shut down on purpose (clients then do not bring it back);
* claims: which thread a pre-warmed sandbox was given to;
* destroy intents: sandboxes whose destroy was asked but not yet confirmed by
  their engine (a restarted pool finishes them instead of adopting them);
* hibernated sandboxes (their stopped containers are kept, not reaped) and snapshots;
* which pool uses a ``base_dir`` (two pools must not share thread directories).

Every method is synchronous (Ray's KV client is); the pool calls them in a
worker thread. :class:`MemoryRecords` is the same store in a dict, for tests
of the pool's logic without Ray.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Protocol

from .config import SandboxConfig


class Store(Protocol):
    def put(self, key: str, value: bytes) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def delete(self, key: str) -> None: ...
    def keys(self, prefix: str) -> list[str]: ...


class RayStore:
    """Ray's GCS KV, in one namespace."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key.encode(), value, namespace=self._namespace)

    def get(self, key: str) -> bytes | None:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(key.encode(), namespace=self._namespace)

    def delete(self, key: str) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(key.encode(), namespace=self._namespace)

    def keys(self, prefix: str) -> list[str]:
        from ray.experimental import internal_kv

        return [key.decode() for key in internal_kv._internal_kv_list(prefix.encode(), namespace=self._namespace)]


class MemoryStore:
    """A store in a dict (tests of pure logic)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def keys(self, prefix: str) -> list[str]:
        return [key for key in self.data if key.startswith(prefix)]


class PoolRecords:
    """One pool's records in a store."""

    def __init__(self, pool: str, store: Store) -> None:
        self.pool = pool
        self._store = store
        self._prefix = "sandbox-actors"

    @classmethod
    def for_config(cls, config: SandboxConfig) -> PoolRecords:
        return cls(config.pool_name, RayStore(config.namespace))

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self._prefix}/{kind}/{self.pool}" + (f"/{name}" if name else "")

    # ── shut down on purpose ───────────────────────────────────────────────

    def mark_shut_down(self) -> None:
        self._store.put(self._key("shut-down"), b"1")

    def clear_shut_down(self) -> None:
        self._store.delete(self._key("shut-down"))

    def was_shut_down(self) -> bool:
        return self._store.get(self._key("shut-down")) is not None

    # ── claims of pre-warmed sandboxes ─────────────────────────────────────

    def put_claim(self, sandbox_id: str, thread_id: str) -> None:
        self._store.put(self._key("claims", sandbox_id), thread_id.encode())

    def get_claim(self, sandbox_id: str) -> str | None:
        value = self._store.get(self._key("claims", sandbox_id))
        return None if value is None else value.decode()

    def drop_claim(self, sandbox_id: str) -> None:
        self._store.delete(self._key("claims", sandbox_id))

    # ── destroy intents ────────────────────────────────────────────────────

    def mark_doomed(self, sandbox_id: str, container_id: str | None) -> None:
        """Record that ``sandbox_id`` must be destroyed (its container, when known, too)."""
        self._store.put(self._key("doomed", sandbox_id), json.dumps({"container_id": container_id}).encode())

    def doomed(self) -> dict[str, str | None]:
        """Sandbox id -> container id of every destroy still owed."""
        prefix = self._key("doomed") + "/"
        found: dict[str, str | None] = {}
        for key in self._store.keys(prefix):
            raw = self._store.get(key)
            if raw is None:
                continue
            try:
                record: Mapping[str, object] = json.loads(raw)
            except ValueError:
                record = {}
            container = record.get("container_id")
            found[key[len(prefix):]] = container if isinstance(container, str) else None
        return found

    def clear_doomed(self, sandbox_id: str) -> None:
        self._store.delete(self._key("doomed", sandbox_id))

    # ── hibernated sandboxes and snapshots ─────────────────────────────────

    def _put_json(self, kind: str, name: str, record: Mapping[str, object]) -> None:
        self._store.put(self._key(kind, name), json.dumps(record).encode())

    def _all_json(self, kind: str) -> dict[str, dict[str, object]]:
        prefix = self._key(kind) + "/"
        found: dict[str, dict[str, object]] = {}
        for key in self._store.keys(prefix):
            raw = self._store.get(key)
            try:
                record = json.loads(raw) if raw is not None else None
            except ValueError:
                record = None
            if isinstance(record, dict):
                found[key[len(prefix):]] = record
        return found

    def put_hibernated(self, sandbox_id: str, record: Mapping[str, object]) -> None:
        """``sandbox_id`` is hibernated: its thread, container, engine, node, and since when (unix time)."""
        self._put_json("hibernated", sandbox_id, record)

    def hibernated(self) -> dict[str, dict[str, object]]:
        return self._all_json("hibernated")

    def drop_hibernated(self, sandbox_id: str) -> None:
        self._store.delete(self._key("hibernated", sandbox_id))

    def put_snapshot(self, name: str, record: Mapping[str, object]) -> None:
        self._put_json("snapshots", name, record)

    def snapshots(self) -> dict[str, dict[str, object]]:
        return self._all_json("snapshots")

    def drop_snapshot(self, name: str) -> None:
        self._store.delete(self._key("snapshots", name))

    # ── base_dir ───────────────────────────────────────────────────────────

    def base_dir_owner(self, base_dir: str) -> str | None:
        """The pool recorded as using ``base_dir`` (None when none is)."""
        value = self._store.get(f"{self._prefix}/base-dir/{base_dir}")
        return None if value is None else value.decode()

    def claim_base_dir(self, base_dir: str) -> None:
        self._store.put(f"{self._prefix}/base-dir/{base_dir}", self.pool.encode())

    def release_base_dir(self, base_dir: str) -> None:
        if self.base_dir_owner(base_dir) == self.pool:
            self._store.delete(f"{self._prefix}/base-dir/{base_dir}")


class MemoryRecords(PoolRecords):
    """A pool's records in memory (tests of the pool's logic without Ray)."""

    def __init__(self, pool: str, store: MemoryStore | None = None) -> None:
        super().__init__(pool, store or MemoryStore())
