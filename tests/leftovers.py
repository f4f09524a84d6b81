"""What a test run made on this machine, told apart from what was there before it.

A person may run the suite on a machine where pools of theirs serve (deer-flow's, say). The
suite must leave those alone: at its start it notes every container, network and firewall rule
of ours that exists, and every Ray cluster that runs here; at its end, what it made is what is
new and belongs to no cluster that ran before it. Only that is removed, and any of it fails
the run (a test leaked it).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import docker

from backends.base import LABEL_CLUSTER, LABEL_POOL
from backends.firewall import Firewall
from backends.network import default_socket_dir, pool_tag

PROJECT_FILTER = "sandbox-actors.project=sandbox-actors"
_SESSION = re.compile(rb"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")


def live_clusters(proc: Path = Path("/proc")) -> set[str]:
    """The sessions of the Ray clusters whose daemons run on this machine."""
    found = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode(errors="replace")).name in ("raylet", "gcs_server"):
            found.update(match.group().decode() for arg in argv for match in [_SESSION.search(arg)] if match)
    return found


def rules(pool: str | None = None) -> list[str]:
    """Lines of iptables-save that are ours (of one pool, when given)."""
    import subprocess

    dump = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    marker = pool_tag(pool) if pool else "sandbox-actors:"
    return [line for line in dump.splitlines() if marker in line and ("SBXA-" in line or "sandbox-actors" in line)]


@dataclass
class Before:
    """What existed of ours when the run began."""

    containers: set[str] = field(default_factory=set)
    networks: set[str] = field(default_factory=set)
    rules: set[str] = field(default_factory=set)
    clusters: set[str] = field(default_factory=set)

    @classmethod
    def now(cls, client: docker.DockerClient) -> Before:
        return cls({c["Id"] for c in client.api.containers(all=True, filters={"label": PROJECT_FILTER})},
                   {n["Id"] for n in client.api.networks(filters={"label": PROJECT_FILTER})},
                   set(rules()), live_clusters())

    def _made(self, labels: dict | None, ident: str, known: set[str]) -> bool:
        return ident not in known and (labels or {}).get(LABEL_CLUSTER) not in self.clusters

    def made_since(self, client: docker.DockerClient) -> dict[str, list[str]]:
        """Names of what the run made and left: containers, networks, rules, socket dirs."""
        containers = [c for c in client.api.containers(all=True, filters={"label": PROJECT_FILTER})
                      if self._made(c.get("Labels"), c["Id"], self.containers)]
        networks = [n for n in client.api.networks(filters={"label": PROJECT_FILTER})
                    if self._made(n.get("Labels"), n["Id"], self.networks)]
        pools = {(item.get("Labels") or {}).get(LABEL_POOL, "") for item in containers + networks}
        sockets = [str(Path(default_socket_dir()) / pool_tag(pool)) for pool in pools
                   if (Path(default_socket_dir()) / pool_tag(pool)).exists()]
        return {"containers": [c["Names"][0].lstrip("/") for c in containers],
                "networks": [n["Name"] for n in networks],
                "rules": [line for line in rules() if line not in self.rules],
                "socket_dirs": sockets}

    def remove(self, client: docker.DockerClient, made: dict[str, list[str]]) -> None:
        """Remove what :meth:`made_since` found (and only that)."""
        for name in made["containers"]:
            client.api.remove_container(name, force=True)
        for name in made["networks"]:
            client.api.remove_network(name)
        for tag in {line.split("SBXA-")[1][:10] for line in made["rules"] if "SBXA-" in line}:
            Firewall(tag, f"sbx-{tag}").remove()
        for path in made["socket_dirs"]:
            shutil.rmtree(path, ignore_errors=True)
