"""What a person watches: each sandbox's use (``sandbox-actors top``) and trail (``audit``).

Both ask the sandboxes' own actors (through Ray, from any node) for what the pool lists; neither
is an activity: watching a sandbox never keeps it from its idle timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from . import raycalls
from .audit import AuditLog
from .errors import SandboxError, SandboxNotFound
from .threads import thread_dir

USAGE_TIMEOUT = 10.0
# The states whose container runs (a warm one is parked, yet runs).
RUNNING_STATES = ("active", "warm")


def usage_rows(client: Any, rows: Iterable[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The pool's sandboxes (``client.list()`` rows), each running one with ``usage`` (its
    :class:`~backends.base.Usage` as a dict) or ``usage_error`` (why not)."""
    rows = [dict(row) for row in (client.list() if rows is None else rows)]
    namespace = client.config.namespace

    async def look(row: dict[str, Any]) -> None:
        actor = await asyncio.to_thread(raycalls.get_actor, row["actor_name"], namespace)
        if actor is None:
            row["usage_error"] = "its actor is gone"
            return
        try:
            used = await raycalls.call(actor.usage.remote(row["sandbox_id"]), USAGE_TIMEOUT, "usage")
        except SandboxError as exc:
            row["usage_error"] = f"{type(exc).__name__}: {exc.message}"
            return
        row["usage"] = used.as_dict()

    async def look_at_all() -> None:
        await asyncio.gather(*(look(r) for r in rows if r["state"] in RUNNING_STATES and r.get("actor_name")))

    asyncio.run(look_at_all())
    return rows


def _size(count: float | None) -> str:
    if count is None:
        return "-"
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return f"{count:.0f}B"


def render_usage(rows: list[dict[str, Any]], pool: str) -> str:
    """The table ``sandbox-actors top`` prints."""
    lines = [f"{'THREAD':<24}  {'NODE':<8}  {'STATE':<10}  {'CPU%':>6}  {'MEM':>7}  {'DISK':>7}  {'NET IN':>7}  "
             f"{'NET OUT':>7}  {'PIDS':>4}  {'CMDS':>5}"]
    totals = {"cpu_percent": 0.0, "memory_bytes": 0}
    for row in sorted(rows, key=lambda r: (r["state"], str(r["thread_id"]))):
        thread = row["thread_id"] if row["thread_id"] is not None else f"({row['sandbox_id'][:10]})"
        thread = thread if len(thread) <= 24 else thread[:21] + "..."
        used = row.get("usage")
        node = (row.get("node_id") or "-")[:8]
        if used is None:
            lines.append(f"{thread:<24}  {node:<8}  {row['state']:<10}  {'-':>6}  {'-':>7}  {'-':>7}  {'-':>7}  "
                         f"{'-':>7}  {'-':>4}  {'-':>5}")
            continue
        totals["cpu_percent"] += used["cpu_percent"]
        totals["memory_bytes"] += used["memory_bytes"]
        lines.append(
            f"{thread:<24}  {node:<8}  {row['state']:<10}  {used['cpu_percent']:>6.1f}  {_size(used['memory_bytes']):>7}  "
            f"{_size(used['disk_bytes']):>7}  {_size(used['net_rx_bytes']):>7}  {_size(used['net_tx_bytes']):>7}  "
            f"{used['pids']:>4}  {used['commands']:>5}")
    running = sum(1 for r in rows if r.get("usage"))
    lines.append(f"\npool {pool!r}: {len(rows)} sandbox(es), {running} running; CPU {totals['cpu_percent']:.1f}% "
                 f"of one core, memory {_size(totals['memory_bytes'])}  ({time.strftime('%H:%M:%S')})")
    return "\n".join(lines)


def render_audit(entries: list[dict[str, Any]]) -> str:
    """The trail ``sandbox-actors audit`` prints, oldest first."""
    lines = []
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.get("at", 0)))
        if entry.get("kind") == "egress":
            verdict = "allowed" if entry.get("allowed") else "REFUSED"
            where = entry.get("host") or "?"
            if entry.get("via") != "dns":
                where += f":{entry.get('port')}"
            moved = (f", {_size(entry.get('bytes_out'))} out, {_size(entry.get('bytes_in'))} in"
                     if entry.get("via") != "dns" else "")
            headers = f", headers added: {', '.join(entry['injected'])}" if entry.get("injected") else ""
            lines.append(f"{when}  {'egress':<11}  {verdict:<18}  {entry.get('via', '?'):>8}  {where}{moved}{headers}")
            continue
        if "error" in entry:
            ended = f"error {entry['error']}"
        else:
            ended = f"exit {entry.get('exit_code')}" + (f" ({entry['status']})" if entry.get("status") not in
                                                        (None, "completed") else "")
        used = ""
        if entry.get("cpu_seconds") is not None:
            used = f", cpu {entry['cpu_seconds']:.2f}s, peak {_size(entry.get('peak_memory_bytes'))}"
        command = entry.get("command", "").replace("\n", "\\n")
        lines.append(f"{when}  {entry.get('kind', '?'):<11}  {ended:<18}  {entry.get('seconds', 0):>7.2f}s{used}  "
                     f"$ {command[:200]}")
    return "\n".join(lines) if lines else "(no commands run)"


def audit_entries(client: Any, thread: str, limit: int) -> list[dict[str, Any]]:
    """A thread's trail: from its sandbox's actor when it runs, else from the file it left on
    this machine (a hibernated or destroyed sandbox's).

    Raises:
        SandboxNotFound: the pool has no sandbox of the thread and this machine no trail of it.
    """
    sandbox_id = client.sandbox_id(thread)
    row = next((r for r in client.list() if r["sandbox_id"] == sandbox_id), None)
    if row is not None and row["state"] in RUNNING_STATES and row.get("actor_name"):
        actor = raycalls.get_actor(row["actor_name"], client.config.namespace)
        if actor is not None:
            entries: list[dict[str, Any]] = raycalls.value(actor.audit.remote(sandbox_id, limit))
            return entries
    path = thread_dir(client.config.base_dir, thread).parent / "audit.jsonl"
    if path.is_file():
        return AuditLog(path).entries(limit)
    if row is None:
        raise SandboxNotFound(f"no sandbox of thread {thread!r} in pool {client.config.pool_name!r}, and no trail "
                              f"of it on this machine ({path})")
    return []
