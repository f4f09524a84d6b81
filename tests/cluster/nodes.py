"""Node containers that behave like separate machines: a head and workers on a network of ours.

Each node runs sshd and, once ``cluster.yaml``'s setup starts it, a Docker engine of its own
(Docker-in-Docker). ``--privileged`` fails on this machine (its capability bounding set lacks
CAP_SYS_RESOURCE, so runc cannot apply "all" capabilities), so a node gets, by name, every
capability the host's bounding set has, no seccomp or AppArmor profile, unmasked /proc and /sys
paths, a private cgroup namespace (its entrypoint mounts cgroup v1 hierarchies there), a tmpfs
at /run, and a volume for /var/lib/docker (overlay2 on overlayfs does not nest).

Everything created here carries the label ``sandbox-actors.test-cluster=<run id>`` (never the
project's label: the main suite removes every container that has that one) and the creating
process's pid, so a later run can sweep what a killed run left.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

RUN_LABEL = "sandbox-actors.test-cluster"
OWNER_LABEL = "sandbox-actors.test-cluster.owner-pid"
SHARED_MOUNT = "/mnt/sandbox-actors"  # cluster.yaml's shared storage for base_dir, on every worker

# Capability numbers 0-37 by the names Docker knows (bpf, perfmon and checkpoint_restore, 38-40,
# are unknown to the engine here).
_CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
)


class NodeError(RuntimeError):
    """A node could not be created, reached or removed; the message carries Docker's words."""


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run the host's ``docker`` CLI (the SDK cannot express ``systempaths=unconfined``)."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise NodeError(f"`docker {' '.join(args[:3])} ...` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def bounding_capabilities() -> list[str]:
    """The capabilities this machine lets a container have: the names in our bounding set."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            mask = int(line.split()[1], 16)
            return [name for bit, name in enumerate(_CAPABILITIES) if mask & (1 << bit)]
    raise NodeError("no CapBnd line in /proc/self/status")


@dataclass
class Node:
    name: str
    role: str  # "head" or "worker"
    ip: str = ""
    volume: str = ""


@dataclass
class NodeCluster:
    """A head and ``workers`` worker containers of ``image`` on a network of this run."""

    image: str
    workdir: Path
    workers: int = 2
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    nodes: list[Node] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"sa-cluster-{self.run_id}"

    @property
    def network(self) -> str:
        return f"{self.prefix}-net"

    @property
    def labels(self) -> list[str]:
        return ["--label", f"{RUN_LABEL}={self.run_id}", "--label", f"{OWNER_LABEL}={os.getpid()}"]

    @property
    def key(self) -> Path:
        return self.workdir / "ssh" / "id_ed25519"

    @property
    def shared_dir(self) -> Path:
        return self.workdir / "shared"

    @property
    def head(self) -> Node:
        return next(n for n in self.nodes if n.role == "head")

    @property
    def worker_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "worker"]

    def node_by_ip(self, ip: str) -> Node:
        return next(n for n in self.nodes if n.ip == ip)

    # ── lifecycle ───────────────────────────────────────────────────────────

    def start(self, ssh_timeout: float = 60) -> None:
        """Create the network, the key, the shared directory and the nodes; wait for their sshd."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key.parent.mkdir(mode=0o700, exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.prefix}", "-f", str(self.key)],
            check=True, capture_output=True, timeout=30,
        )
        self.shared_dir.mkdir(exist_ok=True)
        docker("network", "create", *self.labels, self.network)
        roles = ["head"] + ["worker"] * self.workers
        for index, role in enumerate(roles):
            name = f"{self.prefix}-{role}" if role == "head" else f"{self.prefix}-worker{index}"
            node = Node(name=name, role=role, volume=f"{name}-docker")
            self.nodes.append(node)  # before creating it: teardown removes whatever exists
            self._create(node)
        for node in self.nodes:
            node.ip = self._ip(node)
        deadline = time.monotonic() + ssh_timeout
        for node in self.nodes:
            while not _port_open(node.ip, 22):
                if time.monotonic() > deadline:
                    raise NodeError(f"sshd of {node.name} did not answer within {ssh_timeout:.0f}s:\n{self.logs(node)}")
                time.sleep(0.2)

    def _create(self, node: Node) -> None:
        docker("volume", "create", *self.labels, node.volume)
        mounts = [
            "--volume", f"{self.key}.pub:/root/.ssh/authorized_keys:ro",
            "--volume", f"{node.volume}:/var/lib/docker",
        ]
        if node.role == "worker":
            # One host directory in every worker: storage the workers share, as cluster.yaml asks.
            mounts += ["--volume", f"{self.shared_dir}:{SHARED_MOUNT}"]
        capabilities = [arg for name in bounding_capabilities() for arg in ("--cap-add", name)]
        docker(
            "run", "--detach", "--name", node.name, "--hostname", node.name, *self.labels,
            "--label", f"{RUN_LABEL}.role={node.role}", "--network", self.network, "--init",
            *capabilities,
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
            "--security-opt", "systempaths=unconfined", "--cgroupns=private", "--tmpfs", "/run",
            *mounts, self.image,
        )

    def _ip(self, node: Node) -> str:
        raw = docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", node.name).stdout
        return json.loads(raw)[self.network]["IPAddress"]

    def kill(self, node: Node) -> None:
        """Node loss: SIGKILL the whole node (its sshd, raylet, engine and sandboxes go at once)."""
        docker("kill", node.name)

    def running(self, node: Node) -> bool:
        result = docker("inspect", "--format", "{{.State.Running}}", node.name, check=False)
        return result.stdout.strip() == "true"

    # ── looking inside ──────────────────────────────────────────────────────

    def run_in(self, node: Node, command: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """A shell command in ``node`` (to observe it; the cluster itself is driven over SSH by Ray)."""
        return docker("exec", node.name, "sh", "-c", command, timeout=timeout, check=check)

    def inner_containers(self, node: Node, label: str | None = None) -> list[str]:
        """Names of the containers in the node's own Docker engine (with ``label``, if given)."""
        filters = ["--filter", f"label={label}"] if label else []
        result = docker("exec", node.name, "docker", "ps", "--all", *filters, "--format", "{{.Names}}", timeout=60)
        return result.stdout.split()

    def logs(self, node: Node, lines: int = 40) -> str:
        result = docker("logs", "--tail", str(lines), node.name, check=False)
        return (result.stdout + result.stderr).strip()

    def file_in(self, node: Node, path: str, lines: int = 60) -> str:
        """The tail of a file in a running node, or why it could not be read."""
        result = docker("exec", node.name, "sh", "-c", f"tail -n {lines} {path} 2>&1", check=False, timeout=30)
        return result.stdout + result.stderr

    # ── teardown ────────────────────────────────────────────────────────────

    def teardown(self) -> dict[str, list[str]]:
        """Remove every node, volume and the network of this run; return what still exists
        afterwards (empty lists when nothing is left)."""
        for node in self.nodes:
            docker("rm", "--force", "--volumes", node.name, check=False, timeout=180)
        for node in self.nodes:
            docker("volume", "rm", "--force", node.volume, check=False)
        docker("network", "rm", self.network, check=False)
        left = leftovers(f"{RUN_LABEL}={self.run_id}")
        if self.workdir.exists():
            # Sandboxes wrote the shared directory as root and as their own users: we are root.
            shutil.rmtree(self.workdir, ignore_errors=False)
        return left


def leftovers(label: str) -> dict[str, list[str]]:
    """Containers, volumes and networks carrying ``label``."""
    return {
        "containers": docker("ps", "--all", "--filter", f"label={label}", "--format", "{{.Names}}").stdout.split(),
        "volumes": docker("volume", "ls", "--filter", f"label={label}", "--format", "{{.Name}}").stdout.split(),
        "networks": docker("network", "ls", "--filter", f"label={label}", "--format", "{{.Name}}").stdout.split(),
    }


def sweep_stale_runs() -> list[str]:
    """Remove what earlier runs left when their process died before its teardown (their owner
    pid no longer runs). Returns what was removed."""
    removed: list[str] = []
    kinds: Sequence[tuple[str, list[str], list[str]]] = (
        ("container", ["ps", "--all"], ["rm", "--force", "--volumes"]),
        ("volume", ["volume", "ls"], ["volume", "rm", "--force"]),
        ("network", ["network", "ls"], ["network", "rm"]),
    )
    for kind, listing, removal in kinds:
        template = "{{.Name}}" if kind != "container" else "{{.Names}}"
        fmt = template + '\t{{.Label "' + OWNER_LABEL + '"}}'
        rows = docker(*listing, "--filter", f"label={RUN_LABEL}", "--format", fmt).stdout.splitlines()
        for row in rows:
            name, _, owner = row.partition("\t")
            if owner.isdigit() and _pid_alive(int(owner)):
                continue
            docker(*removal, name, check=False, timeout=180)
            removed.append(f"{kind} {name}")
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
