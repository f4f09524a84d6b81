"""Thread ids: untrusted strings turned into sandbox ids, directories and mounts.

A thread id can be any text a user sends. It never reaches a path or a
container name raw: ids are hashes, and directory names are either a safe
plain name or a hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from backends import Mount

from .errors import InvalidThreadId

if TYPE_CHECKING:
    from .actorconfig import ActorConfig
    from .config import SandboxConfig

MAX_THREAD_ID_BYTES = 1024
SANDBOX_ID_HEX = 24
USER_DATA_MOUNT = "/mnt/user-data"
USER_DATA_DIRS = ("workspace", "uploads", "outputs")
logger = logging.getLogger(__name__)
_SAFE_DIR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_thread_id(thread_id: object) -> str:
    """Return ``thread_id`` if it can name a sandbox.

    Raises:
        InvalidThreadId: not a string, empty, over 1024 UTF-8 bytes, or not
            encodable as UTF-8 (lone surrogates). Pass None for an anonymous
            sandbox instead of an empty string.
    """
    if not isinstance(thread_id, str):
        raise InvalidThreadId(f"thread id must be a string, got {type(thread_id).__name__}")
    if thread_id == "":
        raise InvalidThreadId("thread id is empty; pass None for an anonymous sandbox")
    try:
        size = len(thread_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidThreadId("thread id is not valid Unicode text (lone surrogate)") from None
    if size > MAX_THREAD_ID_BYTES:
        raise InvalidThreadId(f"thread id is {size} bytes; the limit is {MAX_THREAD_ID_BYTES} (hash it first)")
    return thread_id


def sandbox_id_for(pool: str, thread_id: str) -> str:
    """The sandbox id of ``thread_id`` in ``pool``: the same in every process."""
    validate_thread_id(thread_id)
    digest = hashlib.sha256(f"{pool}\0{thread_id}".encode()).hexdigest()
    return digest[:SANDBOX_ID_HEX]


def anonymous_sandbox_id(pool: str | None = None, request_id: str | None = None) -> str:
    """A new anonymous sandbox's id: random, or derived from ``request_id`` so that a retried
    request finds the sandbox its first attempt made (and never makes a second)."""
    if request_id is None:
        return uuid.uuid4().hex[:SANDBOX_ID_HEX]
    return hashlib.sha256(f"{pool}\0anonymous\0{request_id}".encode()).hexdigest()[:SANDBOX_ID_HEX]


def thread_dir_name(thread_id: str) -> str:
    """A directory name for the thread: itself when plainly safe, else a hash.

    Hashed names start with '~', which a plain name cannot, so the two never meet.
    """
    validate_thread_id(thread_id)
    if _SAFE_DIR.match(thread_id) and thread_id not in (".", ".."):
        return thread_id
    return "~" + hashlib.sha256(thread_id.encode()).hexdigest()[:32]


def thread_dir(base_dir: str, thread_id: str) -> Path:
    """``<base_dir>/threads/<name>/user-data``: where a thread's files live."""
    return Path(base_dir) / "threads" / thread_dir_name(thread_id) / "user-data"


def egress_ca_dir(base_dir: str, pool: str) -> Path:
    """``<base_dir>/egress-ca/<pool>``: the pool's egress CA on this node (backends.egress_ca)."""
    return Path(base_dir) / "egress-ca" / pool


def checkpoint_dir(base_dir: str, snapshot: str) -> str:
    """``<base_dir>/checkpoints/<snapshot>``: where a live snapshot's checkpoint is kept on the
    node it was taken on (a cluster whose ``base_dir`` is shared finds it on every node)."""
    return os.path.join(base_dir, "checkpoints", snapshot)


def ensure_thread_dirs(config: SandboxConfig | ActorConfig, thread_id: str) -> Path:
    """Create the thread's workspace/uploads/outputs (on the local filesystem) and return their parent."""
    root = thread_dir(config.base_dir, thread_id)
    for name in USER_DATA_DIRS:
        (root / name).mkdir(parents=True, exist_ok=True)
    return root


def sandbox_mounts(config: SandboxConfig | ActorConfig, thread_id: str | None,
                   given: tuple[Mount, ...] = ()) -> tuple[Mount, ...]:
    """Every bind mount for a sandbox: the thread's directories (``given`` by the acquire, else
    the pool's own under base_dir), skills (read-only), extra mounts. A container path is mounted
    once: the first in that order wins.

    Creates the pool's thread directories. Their mount sources use the host-side base dir so a
    Docker engine outside our container resolves them.
    """
    mounts: list[Mount] = list(given)
    if thread_id is not None and config.thread_mounts and not given:
        ensure_thread_dirs(config, thread_id)
        host_root = thread_dir(config.host_dir, thread_id)
        mounts += [
            Mount(str(host_root / name), f"{USER_DATA_MOUNT}/{name}", user_owned=True) for name in USER_DATA_DIRS
        ]
    if config.skills_path and os.path.isdir(config.skills_path):
        mounts.append(
            Mount(config.host_skills_path or config.skills_path, config.skills_container_path, read_only=True)
        )
    mounts += [Mount(m.host_path, m.container_path, m.read_only) for m in config.mounts]
    taken: set[str] = set()
    unique = []
    for mount in mounts:
        path = mount.container_path.rstrip("/") or "/"
        if path in taken:
            logger.warning("two mounts at %s: keeping the first, not %s", path, mount.host_path)
            continue
        taken.add(path)
        unique.append(mount)
    return tuple(unique)
