"""Live snapshots' checkpoints on the move: packed on the node that took one, unpacked on a node
that forks from it and does not have it (a cluster whose ``base_dir`` is not shared).

A checkpoint is a directory of files the engine wrote (gVisor's state file and a few small ones);
it travels as an uncompressed tar through Ray, as a snapshot's image does.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile

from .errors import SandboxNotFound


def pack(path: str) -> bytes:
    """The checkpoint in directory ``path`` as a tar archive (its files at the archive's top).

    Raises:
        SandboxNotFound: no checkpoint there.
    """
    if not os.path.isdir(path):
        raise SandboxNotFound(f"checkpoint {path} is not on this node (its snapshot was removed?)")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in sorted(os.listdir(path)):
            archive.add(os.path.join(path, name), arcname=name)
    return buffer.getvalue()


def unpack(archive: bytes, path: str) -> int:
    """Put the checkpoint ``archive`` in directory ``path``, whole or not at all: it is unpacked
    beside and renamed into place, so a fork that finds ``path`` finds all of it, and two forks
    fetching at once leave one copy. Returns the bytes written (0: it was there already).

    Raises:
        OSError: the disk refused it (nothing is left half-written).
    """
    if os.path.isdir(path):
        return 0
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".incoming-", dir=parent)
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
            tar.extractall(staging, filter="data")  # names and modes checked: it came over the network
        try:
            os.rename(staging, path)
        except OSError:
            if not os.path.isdir(path):
                raise
            return 0  # another fork put it there first
        return len(archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
