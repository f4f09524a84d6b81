"""What dead Ray clusters left on this machine's Docker engine, found without any cluster running.

A driver that ran a private local Ray (the demo, the bench, a test run, a
notebook) and was killed hard takes that Ray with it, but not its
containers. Every container and network of ours carries the session name of
the cluster that made it; while that cluster lives on this machine, one of
its raylets has the session name on its command line. No such process: the
cluster is gone from here, and so is every actor that could own what it left.
A live snapshot's checkpoint, kept outside the engine under the pool's base_dir,
names the cluster that kept it in a file of its own, and is judged the same way.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from backends import DockerBackend
from backends.docker_backend import CHECKPOINT_CLUSTER_FILE

from .config import state_home


def session_alive(session: str, proc: Path = Path("/proc")) -> bool:
    """Whether a Ray daemon (raylet, GCS) of ``session`` runs on this machine."""
    needle = session.encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        program = os.path.basename(argv[0]) if argv else b""
        if program in (b"raylet", b"gcs_server") and any(needle in arg for arg in argv):
            return True
    return False


# A checkpoint being unpacked (a fork fetching it from another node) is staged under this prefix;
# one older than this was left by an actor killed mid-way.
_STAGING_PREFIX = ".incoming-"
_STAGING_STALE_SECONDS = 600.0


def checkpoint_roots(base_dirs: Iterable[str] = ()) -> list[Path]:
    """Where live snapshots' checkpoints are kept on this machine: ``<base_dir>/checkpoints`` of
    every pool on the default base_dir (under the state home) and of each of ``base_dirs``."""
    defaults = Path(state_home()) / "pools"
    found = {Path(base) / "checkpoints" for base in base_dirs if base}
    found |= set(defaults.glob("*/*/checkpoints"))
    return sorted(root for root in found if root.is_dir())


def dead_checkpoints(roots: Iterable[Path], alive: Callable[[str], bool],
                     now: float | None = None) -> list[dict[str, Any]]:
    """Checkpoints in ``roots`` kept by a Ray cluster that ``alive`` says no longer runs here (each
    names its cluster in a file of its own), and half-unpacked ones left long ago."""
    now = time.time() if now is None else now
    verdicts: dict[str, bool] = {}
    found: list[dict[str, Any]] = []
    for root in roots:
        for path in sorted(root.iterdir()):
            if not path.is_dir():
                continue
            if path.name.startswith(_STAGING_PREFIX):
                if now - path.stat().st_mtime > _STAGING_STALE_SECONDS:
                    found.append({"checkpoint": str(path), "snapshot": "", "cluster": "", "bytes": _bytes(path)})
                continue
            try:
                cluster = (path / CHECKPOINT_CLUSTER_FILE).read_text().strip()
            except OSError:
                continue  # not one we marked: not judged
            if not cluster:
                continue
            if cluster not in verdicts:
                verdicts[cluster] = alive(cluster)
            if not verdicts[cluster]:
                found.append({"checkpoint": str(path), "snapshot": path.name, "cluster": cluster, "bytes": _bytes(path)})
    return found


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def find(backend: DockerBackend | None = None, base_dirs: Iterable[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Containers, networks and live snapshots' checkpoints of ours whose cluster no longer runs
    here (any pool; checkpoints under the default base_dirs and ``base_dirs``)."""
    found: dict[str, list[dict[str, Any]]] = dict((backend or DockerBackend()).orphans(session_alive))
    found["checkpoints"] = dead_checkpoints(checkpoint_roots(base_dirs), session_alive)
    return found


def remove(found: dict[str, list[dict[str, Any]]], backend: DockerBackend | None = None) -> dict[str, int]:
    """Remove what :func:`find` listed; firewall rules whose network is gone go too."""
    backend = backend or DockerBackend()
    removed = backend.remove_orphans(found)
    removed["rules"] += asyncio.run(backend.sweep_rules())
    removed["checkpoints"] = 0
    for item in found.get("checkpoints", []):
        shutil.rmtree(item["checkpoint"], ignore_errors=True)
        removed["checkpoints"] += not os.path.exists(item["checkpoint"])
    return removed
