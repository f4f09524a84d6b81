"""What dead Ray clusters left on this machine's Docker engine, found without any cluster running.

A driver that ran a private local Ray (the demo, the bench, a test run, a
notebook) and was killed hard takes that Ray with it, but not its
containers. Every container and network of ours carries the session name of
the cluster that made it; while that cluster lives on this machine, one of
its raylets has the session name on its command line. No such process: the
cluster is gone from here, and so is every actor that could own what it left.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from backends import DockerBackend


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


def find(backend: DockerBackend | None = None) -> dict[str, list[dict[str, str]]]:
    """Containers and networks of ours whose cluster no longer runs here (any pool)."""
    return (backend or DockerBackend()).orphans(session_alive)


def remove(found: dict[str, list[dict[str, str]]], backend: DockerBackend | None = None) -> dict[str, int]:
    """Remove what :func:`find` listed; firewall rules whose network is gone go too."""
    backend = backend or DockerBackend()
    removed = backend.remove_orphans(found)
    removed["rules"] += asyncio.run(backend.sweep_rules())
    return removed
