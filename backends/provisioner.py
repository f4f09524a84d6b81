"""ProvisionerBackend: sandboxes created by a remote provisioner service (e.g. pods on Kubernetes).

The provisioner's API (the original provider's, kept compatible):

- ``GET /health`` -> ``{"status": "ok"}``
- ``POST /api/sandboxes`` ``{"sandbox_id", "thread_id"}`` -> ``{"sandbox_id", "sandbox_url", "status"}``;
  idempotent for an existing id
- ``GET /api/sandboxes/{id}`` -> the sandbox, or 404
- ``DELETE /api/sandboxes/{id}`` -> ``{"ok": true}``; 404 counts as done
- ``GET /api/sandboxes`` -> ``{"sandboxes": [...], "count": n}``

Every ``/api`` call carries ``X-API-Key``. The provisioner keeps no labels, so
the pool a sandbox belongs to is in its id: we ask for ``<prefix>-<sandbox id>``,
as the Docker backend names containers. Images, mounts, environment and
limits are the provisioner's business, not ours.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from .base import (
    Capability,
    LABEL_ACTOR,
    LABEL_ENGINE_ID,
    LABEL_POOL,
    LABEL_SANDBOX_ID,
    LABEL_THREAD_ID,
    Backend,
    SandboxRecord,
    SandboxSpec,
    encode_label_value,
)
from .errors import (
    BackendError,
    BackendUnauthorized,
    BackendUnavailable,
    SandboxStartError,
)
from .sandbox_api import context_for

logger = logging.getLogger(__name__)

# Statuses after which a sandbox never serves again (compared lower-case). Anything else,
# e.g. "Pending" or "Running", is a sandbox that is, or may still become, ready.
_ENDED = {"failed", "succeeded", "terminated", "terminating", "error", "stopped", "deleted", "completed"}


class ProvisionerBackend(Backend):
    """Drives one provisioner service.

    Args:
        url: the provisioner's base URL.
        api_key: sent as ``X-API-Key`` on every ``/api`` call ("" sends none).
        prefix: sandbox ids are asked for as ``<prefix>-<sandbox id>`` (one prefix per pool).
        pool: our pool's name, recorded in the records this backend returns.
        create_timeout / delete_timeout / request_timeout: seconds per call.
    """

    records_creator = False  # the provisioner keeps no labels: who created a sandbox is not recorded

    kind = "provisioner"
    capabilities = frozenset[Capability]()  # the provisioner decides what its sandboxes get

    def __init__(
        self,
        url: str,
        api_key: str = "",
        prefix: str = "sandbox-actors",
        pool: str = "",
        create_timeout: float = 30.0,
        delete_timeout: float = 15.0,
        request_timeout: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self._prefix = prefix
        self._pool = pool
        self._timeouts = {"create": create_timeout, "delete": delete_timeout, "request": request_timeout}
        headers = {"X-API-Key": api_key} if api_key else {}
        import httpx  # here: a SandboxActor of a Docker pool never loads it

        # The provisioner is ours to reach as configured: no proxy from the environment.
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, trust_env=False, verify=context_for(self.url))
        self._engine_id = "provisioner-" + hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def container_name(self, sandbox_id: str) -> str:
        return f"{self._prefix}-{sandbox_id}"

    # ── transport ──────────────────────────────────────────────────────────

    async def _call(self, method: str, path: str, timeout: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON body or None). Raises BackendUnavailable, BackendUnauthorized, BackendError (5xx)."""
        import httpx

        what = f"{method} {path}"
        try:
            response = await self._http.request(method, path, json=body, timeout=self._timeouts[timeout])
        except httpx.TimeoutException as exc:
            raise BackendUnavailable(f"provisioner at {self.url} did not answer {what} in time") from exc
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"provisioner at {self.url} is unreachable ({type(exc).__name__}: {exc}); nothing was changed"
            ) from exc
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code in (401, 403):
            raise BackendUnauthorized(
                f"provisioner at {self.url} refused {what} (HTTP {response.status_code}): check provisioner_api_key"
            )
        if response.status_code >= 500 or (response.status_code >= 400 and response.status_code != 404):
            raise BackendError(
                f"provisioner {what} failed with HTTP {response.status_code}: {_message(data, response.text)}"
            )
        return response.status_code, data

    def _record(self, item: dict[str, Any], thread_id: str | None = None, creator: str = "") -> SandboxRecord:
        name = str(item.get("sandbox_id") or "")
        sandbox_id = name[len(self._prefix) + 1:] if name.startswith(self._prefix + "-") else name
        status = str(item.get("status") or "")
        thread = item.get("thread_id", thread_id)
        labels = {
            LABEL_POOL: self._pool,
            LABEL_SANDBOX_ID: sandbox_id,
            LABEL_THREAD_ID: encode_label_value(thread if isinstance(thread, str) else None),
            LABEL_ENGINE_ID: self._engine_id,
        }
        if creator:
            labels[LABEL_ACTOR] = creator
        return SandboxRecord(
            sandbox_id=sandbox_id,
            url=str(item.get("sandbox_url") or ""),
            container_name=name,
            container_id=name,  # the provisioner's id is the only one there is
            node=self.url,
            engine_id=self._engine_id,
            created_at=_number(item.get("created_at"), time.time()),
            running=status.lower() not in _ENDED,
            labels=labels,
        )

    # ── Backend ────────────────────────────────────────────────────────────

    async def engine_id(self) -> str:
        return self._engine_id

    async def health(self) -> bool:
        """True when ``GET /health`` says ok. Raises BackendUnavailable when it does not answer."""
        status, data = await self._call("GET", "/health", "request")
        return status == 200 and isinstance(data, dict) and data.get("status") == "ok"

    async def create(self, spec: SandboxSpec) -> SandboxRecord:
        """Ask for the sandbox; one that already exists is returned as found (with no creator)."""
        existing = await self.discover(spec.sandbox_id)
        if existing is not None:
            return existing
        name = self.container_name(spec.sandbox_id)
        status, data = await self._call(
            "POST", "/api/sandboxes", "create", {"sandbox_id": name, "thread_id": spec.thread_id}
        )
        if status == 404 or not isinstance(data, dict) or not data.get("sandbox_url"):
            raise SandboxStartError(f"provisioner gave no sandbox_url for {name} (HTTP {status}: {data!r})")
        return self._record(data, spec.thread_id, creator=spec.extra_labels.get(LABEL_ACTOR, ""))

    async def discover(self, sandbox_id: str) -> SandboxRecord | None:
        status, data = await self._call("GET", f"/api/sandboxes/{self.container_name(sandbox_id)}", "request")
        if status == 404 or not isinstance(data, dict):
            return None
        return self._record(data)

    async def list(self, pool: str | None = None) -> list[SandboxRecord]:
        """This backend's sandboxes (those whose id carries our prefix); ``pool`` is ours by construction."""
        _, data = await self._call("GET", "/api/sandboxes", "request")
        items = data.get("sandboxes") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise BackendError(f"provisioner listed no 'sandboxes' array: {data!r}")
        return [
            self._record(item) for item in items
            if isinstance(item, dict) and str(item.get("sandbox_id") or "").startswith(self._prefix + "-")
        ]

    async def destroy(self, sandbox_id: str, container_id: str | None = None) -> bool:
        name = self.container_name(sandbox_id)
        if container_id is not None and container_id != name:
            return False
        status, _ = await self._call("DELETE", f"/api/sandboxes/{name}", "delete")
        return status != 404

    async def is_running(self, sandbox_id: str) -> bool:
        record = await self.discover(sandbox_id)
        return record is not None and record.running

    async def logs_tail(self, sandbox_id: str, lines: int = 40) -> str:
        record = await self.discover(sandbox_id)
        state = "gone" if record is None else ("running or pending" if record.running else "ended")
        return f"(the provisioner serves no logs; sandbox {self.container_name(sandbox_id)} is {state})"

    async def close(self) -> None:
        await self._http.aclose()


def _message(data: Any, text: str) -> str:
    """The error message a provisioner put in its body (FastAPI's ``detail`` and the like)."""
    if isinstance(data, dict):
        for key in ("detail", "error", "message"):
            if data.get(key):
                return str(data[key])
    return text.strip()[:500] or "(empty body)"


def _number(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default
