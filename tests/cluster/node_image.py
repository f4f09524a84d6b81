"""The image of a test cluster node: a Debian machine with sshd and a Docker engine of its own.

Built with no registry, like the sandbox image (``sandbox_actors/image/build.py``), in two
layers, each cached by a digest of its inputs so a rerun with nothing changed takes a second:

1. ``sandbox-actors-test-node-base:<suite>-<digest>``: a root filesystem that ``mmdebstrap``
   makes from the host's own Debian package sources, imported with ``docker import``;
2. ``sandbox-actors-test-node:<digest>``: that plus the node's entrypoint (cgroup mounts for its
   engine, host keys, sshd) and a little configuration.

The node image stands in for the machines a user launches ``cluster.yaml`` on: it carries what
such a machine has (sshd, sudo, rsync, python3) and the Debian packages ``cluster.yaml``'s
setup installs (docker.io, mmdebstrap, python3-venv), so that setup's ``apt-get install``
finds them in place. Nothing else of ``cluster.yaml`` is done here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import docker
import docker.errors

from backends.images import ImageStore
from sandbox_actors.image.build import debian_suite, package_sources

BUILDER_VERSION = "1"
INPUTS_LABEL = "sandbox-actors.test-node-inputs"
BASE_REPOSITORY = "sandbox-actors-test-node-base"
REPOSITORY = "sandbox-actors-test-node"

NODE_PACKAGES = (
    "docker.io",  # the node's own engine; cluster.yaml installs it too (found in place)
    "mmdebstrap",  # cluster.yaml installs it: `sandbox-actors build-image` runs it on each node
    "python3-venv",  # cluster.yaml installs it: the node's venv for Ray and this project
    "python3",
    "iptables",  # dockerd's networks, and per-pool network policies that Ray (as root) installs
    "iproute2",
    "kmod",  # dockerd runs modprobe at start (a warning without it)
    "procps",  # `uptime`, which `ray up` runs to see that SSH works; ps and pgrep
    "openssh-server",  # `ray up` reaches every node over SSH
    "openssh-client",  # the head's autoscaler reaches the workers over SSH
    "rsync",  # file_mounts are copied with rsync, from the host to the head, then to workers
    "sudo",  # cluster.yaml's setup uses sudo, as on a cloud image
    "ca-certificates",
)
_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")

ENTRYPOINT = """\
#!/bin/sh
# A test cluster node's start, as a machine's init would do it. docker-init (--init) is PID 1
# and reaps the orphans Ray and sshd leave; this script ends by becoming sshd.
set -eu
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
  echo "node: this host runs cgroup v2; the node recipe was measured on cgroup v1 only" >&2
  exit 1
fi
# The node's own Docker engine needs cgroup hierarchies it can write. In the node's private
# cgroup namespace each v1 hierarchy mounts with the node's cgroup as its root. cpu and
# cpuacct mount apart; net_cls, net_prio and perf_event cannot be mounted here, and dockerd
# does without them.
mount -t tmpfs -o mode=755,nosuid,nodev,noexec cgroup /sys/fs/cgroup
for hierarchy in cpu cpuacct cpuset memory pids devices freezer blkio; do
  mkdir -p "/sys/fs/cgroup/$hierarchy"
  mount -t cgroup -o "$hierarchy" cgroup "/sys/fs/cgroup/$hierarchy"
done
mkdir -p /sys/fs/cgroup/systemd
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
# Host keys of this node alone: the image carries none.
ssh-keygen -A >/dev/null
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e
"""

SSHD_CONFIG = """\
# Key logins only (the test's key is mounted as root's authorized_keys).
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
# No DNS: nodes have no resolver for the test network's addresses.
UseDNS no
# `ray up`, the autoscaler and the test open several sessions at once.
MaxStartups 64:30:128
"""

# pam_env gives every SSH session this environment, whatever shell runs the command: no node
# may report Ray usage statistics (their only way out of the machine would be that report).
ENVIRONMENT = "RAY_USAGE_STATS_ENABLED=0\n"

DOCKERFILE = """\
FROM {base}
COPY node-entrypoint /usr/local/sbin/node-entrypoint
COPY sshd.conf /etc/ssh/sshd_config.d/sandbox-actors-node.conf
COPY environment /etc/environment
ENV RAY_USAGE_STATS_ENABLED=0
CMD ["/bin/sh", "/usr/local/sbin/node-entrypoint"]
"""


class NodeImageError(RuntimeError):
    """The node image could not be built; the message says which step and why."""


@dataclass(frozen=True)
class NodeImage:
    tag: str
    digest: str
    reused: bool
    seconds: float
    base_seconds: float  # the mmdebstrap layer's build time (0 when it was reused)


def _digest(*parts: str | bytes) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part if isinstance(part, bytes) else part.encode())
        sha.update(b"\0")
    return sha.hexdigest()


def base_digest(suite: str) -> str:
    return _digest(BUILDER_VERSION, suite, *NODE_PACKAGES, *_EXCLUDES)


def inputs_digest(suite: str) -> str:
    return _digest(base_digest(suite), DOCKERFILE, ENTRYPOINT, SSHD_CONFIG, ENVIRONMENT)


def build_node_image(*, force: bool = False, progress: Callable[[str], None] = print) -> NodeImage:
    """Build (or reuse) the node image; older node images of ours that nothing uses are removed.

    Raises:
        NodeImageError: mmdebstrap is missing or failed, or the host has no Debian sources.
    """
    started = time.monotonic()
    suite = debian_suite()
    digest = inputs_digest(suite)
    tag = f"{REPOSITORY}:{digest[:12]}"
    base_tag = f"{BASE_REPOSITORY}:{suite}-{base_digest(suite)[:12]}"
    base_seconds = 0.0
    store = ImageStore()
    try:
        labels = store.labels(tag)
        if not force and labels is not None and labels.get(INPUTS_LABEL) == digest:
            progress(f"node image {tag} is up to date")
            return NodeImage(tag, digest, True, time.monotonic() - started, 0.0)
        if force or store.labels(base_tag) is None:
            base_started = time.monotonic()
            _build_base(store, base_tag, suite, progress)
            base_seconds = time.monotonic() - base_started
        progress(f"node image: building {tag} from {base_tag}")
        store.build(
            tag,
            {
                "Dockerfile": DOCKERFILE.format(base=base_tag).encode(),
                "node-entrypoint": ENTRYPOINT.encode(),
                "sshd.conf": SSHD_CONFIG.encode(),
                "environment": ENVIRONMENT.encode(),
            },
            {INPUTS_LABEL: digest},
        )
    finally:
        store.close()
    _remove_stale_images(keep={tag, base_tag}, progress=progress)
    seconds = time.monotonic() - started
    progress(f"node image {tag} built in {seconds:.1f}s (root filesystem {base_seconds:.1f}s)")
    return NodeImage(tag, digest, False, seconds, base_seconds)


def _build_base(store: ImageStore, base_tag: str, suite: str, progress: Callable[[str], None]) -> None:
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise NodeImageError("mmdebstrap is not installed (scripts/bootstrap installs it)")
    sources = package_sources(suite)
    if not sources:
        raise NodeImageError(f"no apt source on this host serves Debian {suite!r} (looked in /etc/apt)")
    progress(f"node image: root filesystem of Debian {suite} + {len(NODE_PACKAGES)} packages (mmdebstrap)")
    with tempfile.TemporaryDirectory(prefix="sandbox-actors-node-rootfs-") as tmp:
        tar_path = os.path.join(tmp, "rootfs.tar")
        command = [
            mmdebstrap, "--mode=auto", "--variant=minbase", f"--include={','.join(NODE_PACKAGES)}",
            "--format=tar", *(f"--dpkgopt=path-exclude={pattern}" for pattern in _EXCLUDES),
            '--aptopt=Acquire::Retries "3"', suite, tar_path, *sources,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise NodeImageError(f"mmdebstrap failed (exit {result.returncode}):\n{tail}")
        progress(f"node image: importing the root filesystem ({os.path.getsize(tar_path) // 2**20} MiB)")
        store.import_rootfs(tar_path, base_tag, changes=['CMD ["/bin/bash"]'])


def _remove_stale_images(keep: set[str], progress: Callable[[str], None]) -> None:
    """Remove node images of older inputs (ours by repository name) that no container uses."""
    client = docker.from_env()
    try:
        for repository in (REPOSITORY, BASE_REPOSITORY):
            for image in client.images.list(name=repository):
                tags = set(image.tags)
                if not tags or tags & keep:
                    continue
                try:
                    client.images.remove(image.id)
                    progress(f"node image: removed the stale {', '.join(sorted(tags))}")
                except docker.errors.APIError:
                    continue  # used by a container (another run's node) or a child image: keep it
    finally:
        client.close()
