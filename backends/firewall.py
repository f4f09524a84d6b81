"""Host firewall rules that confine one pool's sandbox network (iptables).

A pool's sandboxes sit on a bridge of their own (see :mod:`backends.network`).
Two chains of ours, tagged with the pool's tag, decide what may leave it:

* ``SBXA-<tag>-IN``, jumped to from ``INPUT`` for packets arriving from the
  bridge: traffic from a container to *any address of this host* (Ray's GCS,
  raylet, dashboard, the Docker gateways, anything listening) goes through the
  host's INPUT path, not FORWARD, so it is refused here; only replies to
  connections the host opened (the SandboxActor's own) pass.
* ``SBXA-<tag>-FW``, jumped to from ``DOCKER-USER`` (Docker's hook at the top of
  ``FORWARD``): link-local ``169.254.0.0/16`` (cloud metadata), the user's
  ``blocked`` CIDRs and the cluster's other nodes are refused; with an
  allow-list, everything else not listed too.

Rules are ours only: every jump carries the comment ``sandbox-actors:<tag>``,
chains are filled atomically with ``iptables-restore --noflush`` (which
flushes and refills only the chains it names), and removal deletes exactly
our jumps and chains. Nothing here knows about Docker or Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import IsolationUnavailable

# Always refused, whatever the policy says: link-local holds the cloud metadata service
# (node credentials) on every major cloud.
ALWAYS_BLOCKED = ("169.254.0.0/16",)
REJECT = ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]
CHAIN_PREFIX = "SBXA-"
COMMENT_PREFIX = "sandbox-actors:"
_ALLOW = re.compile(r"^(?P<net>[0-9./]+)(?::(?P<port>\d{1,5})(?:/(?P<proto>tcp|udp))?)?$")

Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class AllowRule:
    """One allow-list entry: a destination network, optionally one port (TCP unless said)."""

    network: str
    port: int | None = None
    proto: str = "tcp"

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """``CIDR``, ``CIDR:PORT`` or ``CIDR:PORT/udp`` (IPv4).

        Raises:
            ValueError: with what is wrong, for a config error.
        """
        match = _ALLOW.match(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not CIDR, CIDR:PORT or CIDR:PORT/udp (e.g. 10.1.2.3/32:443)")
        network = parse_ipv4_network(match["net"])
        port = int(match["port"]) if match["port"] else None
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: port must be 1-65535")
        return cls(network, port, match["proto"] or "tcp")

    def match(self) -> list[str]:
        spec = ["-d", self.network]
        if self.port is not None:
            spec += ["-p", self.proto, "--dport", str(self.port)]
        return spec


def parse_ipv4_network(text: str) -> str:
    """``text`` as a normalized IPv4 CIDR (a bare address is a /32). Raises ValueError."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an IPv4 address or CIDR") from exc
    if network.version != 4:
        raise ValueError(f"{text!r}: sandbox networks are IPv4 only (containers get no IPv6 address)")
    return str(network)


@dataclass(frozen=True)
class NetworkPolicy:
    """What a pool's sandboxes may reach.

    Attributes:
        egress: 'open' (anything but the always-blocked), 'allowlist' (only
            ``allow``) or 'none' (no network at all).
        allow: with 'allowlist': ``CIDR[:PORT[/udp]]`` entries.
        domains: with 'allowlist': names reached through the pool's egress proxy (which the
            rules let the sandboxes reach, on the gateway: its DNS and its proxy port).
        blocked: extra IPv4 CIDRs refused even with open egress.
        enforce: False runs without any rule of ours (the host cannot enforce,
            or isolation is someone else's job); sandboxes can then reach the host.
    """

    egress: str = "open"
    allow: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    enforce: bool = True
    domains: tuple[str, ...] = ()  # names reached through the pool's egress proxy (backends.egress)

    @property
    def networked(self) -> bool:
        return self.egress != "none"

    @property
    def needs_rules(self) -> bool:
        return self.enforce and self.networked

    def describe(self) -> dict[str, object]:
        return {"egress": self.egress, "allow": list(self.allow), "blocked": list(self.blocked),
                "enforced": self.enforce, **({"domains": list(self.domains)} if self.domains else {})}


def chains(tag: str) -> tuple[str, str]:
    """(input chain, forward chain) of a pool's tag."""
    return f"{CHAIN_PREFIX}{tag}-IN", f"{CHAIN_PREFIX}{tag}-FW"


def nat_chain(tag: str) -> str:
    """The nat chain of a pool whose sandboxes reach names through its egress proxy."""
    return f"{CHAIN_PREFIX}{tag}-NAT"


def plan_rules(tag: str, policy: NetworkPolicy, extra_blocked: Iterable[str] = (),
               proxy: tuple[str, int] | None = None) -> list[list[str]]:
    """The rules of our two chains, as ``iptables -A`` argument lists (pure; unit-tested). With
    ``proxy`` (the egress proxy's gateway address and port), the sandboxes may reach it and its
    DNS there, and nothing else of the host."""
    chain_in, chain_fw = chains(tag)
    comment = ["-m", "comment", "--comment", f"{COMMENT_PREFIX}{tag}"]
    replies = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"]
    rules = [[chain_in, *replies]]
    if proxy is not None:
        gateway, port = proxy
        rules += [[chain_in, "-d", gateway, "-p", proto, "--dport", "53", "-j", "RETURN"] for proto in ("udp", "tcp")]
        rules.append([chain_in, "-d", gateway, "-p", "tcp", "--dport", str(port), "-j", "RETURN"])
    rules += [
        [chain_in, *comment, *REJECT],  # the host itself, on every address it has
        [chain_fw, *replies],
    ]
    refused: list[str] = []
    for cidr in (*ALWAYS_BLOCKED, *policy.blocked, *extra_blocked):
        network = parse_ipv4_network(cidr)
        if network not in refused:
            refused.append(network)
    rules += [[chain_fw, "-d", network, *comment, *REJECT] for network in refused]
    if policy.egress == "allowlist":
        rules += [[chain_fw, *AllowRule.parse(entry).match(), "-j", "RETURN"] for entry in policy.allow]
        rules.append([chain_fw, *comment, *REJECT])
    return rules


def plan_redirect(tag: str, proxy: tuple[str, int]) -> list[list[str]]:
    """The nat rule that sends a sandbox's TCP to the gateway (where DNS sent it for an allowed
    name) to the egress proxy's port, whatever port it asked for (the proxy reads which)."""
    gateway, port = proxy
    return [[nat_chain(tag), "-d", gateway, "-p", "tcp", "!", "--dport", "53", "-j", "REDIRECT",
             "--to-ports", str(port)]]


def restore_script(tag: str, rules: list[list[str]], table: str = "filter") -> str:
    """An ``iptables-restore --noflush`` input that (re)creates and fills exactly our chains."""
    names = chains(tag) if table == "filter" else (nat_chain(tag),)
    lines = [f"*{table}", *(f":{chain} - [0:0]" for chain in names)]
    for rule in rules:
        chain, *spec = rule
        lines.append(" ".join(["-A", chain, *(_quote(word) for word in spec)]))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _quote(word: str) -> str:
    return f'"{word}"' if re.search(r"\s", word) else word


def _run(args: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=30, check=False)


class Firewall:
    """Our rules for one bridge on this host.

    Args:
        tag: the pool's tag (names our chains and marks our rules).
        bridge: the bridge interface of the pool's network.
        lock_path: a file to lock while changing rules, so two processes on a
            node never interleave a check and an insert.
        runner: runs a command (tests pass a fake); default subprocess.
    """

    def __init__(self, tag: str, bridge: str, lock_path: str | None = None, runner: Runner = _run) -> None:
        self.tag = tag
        self.bridge = bridge
        self._lock_path = lock_path
        self._runner = runner

    # ── plumbing ───────────────────────────────────────────────────────────

    def _iptables(self, *args: str, stdin: str | None = None, check: bool = True,
                  program: str = "iptables") -> subprocess.CompletedProcess[str]:
        try:
            result = self._runner([program, "-w", "10", *args], stdin)
        except FileNotFoundError:
            raise IsolationUnavailable(
                f"network policy cannot be enforced here: `{program}` is not installed (install iptables, "
                "or set network.enforce: false to run sandboxes without isolation rules)"
            ) from None
        except subprocess.TimeoutExpired:
            raise IsolationUnavailable(f"`{program}` did not finish within 30 s (xtables lock held?)") from None
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            reason = detail[-1] if detail else f"exit {result.returncode}"
            if "ermission denied" in reason or "must be root" in reason:
                reason += " (the Ray processes that host sandboxes must run as root, or with CAP_NET_ADMIN)"
            raise IsolationUnavailable(
                f"network policy cannot be enforced here: `{program} {' '.join(args[:3])}...` failed: {reason}; "
                "fix that, or set network.enforce: false to run sandboxes without isolation rules"
            )
        return result

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock_path is None:
            yield
            return
        Path(self._lock_path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _jumps(self, forward: str | None = None) -> list[tuple[str, list[str]]]:
        """Our jump rules: (chain they sit in, the rule's match and target). The forward jump sits
        in DOCKER-USER where the engine made it (``forward`` when the caller knows), else FORWARD."""
        chain_in, chain_fw = chains(self.tag)
        comment = ["-m", "comment", "--comment", f"{COMMENT_PREFIX}{self.tag}"]
        if forward is None:
            forward = "DOCKER-USER" if self._has_chain("DOCKER-USER") else "FORWARD"
        return [
            ("INPUT", ["-i", self.bridge, *comment, "-j", chain_in]),
            (forward, ["-i", self.bridge, *comment, "-j", chain_fw]),
        ]

    def _has_chain(self, chain: str) -> bool:
        return self._iptables("-S", chain, check=False).returncode == 0

    # ── what callers use ───────────────────────────────────────────────────

    def check_available(self) -> None:
        """Raise IsolationUnavailable unless iptables runs here with the rights to change rules."""
        self._iptables("-S", "INPUT")

    def installed(self) -> bool:
        """Whether our chains and both jumps are in place: one read of the filter table (every
        SandboxActor asks before its first sandbox, so a burst of new ones asks many times at once,
        beside the engine's own iptables calls for the containers starting)."""
        listed = self._iptables("-S", check=False)
        if listed.returncode != 0:
            return False
        rules = set()
        for line in listed.stdout.splitlines():
            with contextlib.suppress(ValueError):  # a comment we cannot split is not one of ours
                rules.add(tuple(shlex.split(line)))
        if not all(("-N", chain) in rules for chain in chains(self.tag)):
            return False
        forward = "DOCKER-USER" if ("-N", "DOCKER-USER") in rules else "FORWARD"
        return all(("-A", chain, *rule) in rules for chain, rule in self._jumps(forward))

    def install(self, policy: NetworkPolicy, extra_blocked: Iterable[str] = (), replace: bool = True,
                proxy: tuple[str, int] | None = None) -> bool:
        """Put our rules in place (idempotent). With ``replace`` False, rules already installed are
        left as they are (a SandboxActor checks; the node's reaper refreshes). With ``proxy``
        (address, port), the sandboxes' way to the pool's egress proxy too. Returns True when
        it changed anything."""
        with self._locked():
            if not replace and self.installed():
                return False
            rules = plan_rules(self.tag, policy, extra_blocked, proxy)
            self._iptables("--noflush", stdin=restore_script(self.tag, rules), program="iptables-restore")
            for chain, rule in self._jumps():
                if self._iptables("-C", chain, *rule, check=False).returncode != 0:
                    # First in the chain: the host's own ACCEPT rules (ufw, firewalld) come after ours.
                    self._iptables("-I", chain, "1", *rule)
            if proxy is not None:
                self._iptables("--noflush", stdin=restore_script(self.tag, plan_redirect(self.tag, proxy), "nat"),
                               program="iptables-restore")
                jump = self._nat_jump()
                if self._iptables("-t", "nat", "-C", "PREROUTING", *jump, check=False).returncode != 0:
                    self._iptables("-t", "nat", "-I", "PREROUTING", "1", *jump)
            return True

    def _nat_jump(self) -> list[str]:
        return ["-i", self.bridge, "-m", "comment", "--comment", f"{COMMENT_PREFIX}{self.tag}", "-j",
                nat_chain(self.tag)]

    def remove(self) -> bool:
        """Delete our jumps and chains (idempotent). Returns True when something was removed."""
        removed = False
        with self._locked():
            for chain, rule in self._jumps():
                while self._iptables("-D", chain, *rule, check=False).returncode == 0:
                    removed = True
            for chain in chains(self.tag):
                if self._has_chain(chain):
                    self._iptables("-F", chain)
                    self._iptables("-X", chain)
                    removed = True
            while self._iptables("-t", "nat", "-D", "PREROUTING", *self._nat_jump(), check=False).returncode == 0:
                removed = True
            if self._iptables("-t", "nat", "-S", nat_chain(self.tag), check=False).returncode == 0:
                self._iptables("-t", "nat", "-F", nat_chain(self.tag))
                self._iptables("-t", "nat", "-X", nat_chain(self.tag))
                removed = True
        return removed

    @staticmethod
    def installed_tags(runner: Runner = _run) -> set[str]:
        """Tags of every pool whose chains exist on this host (any pool of ours)."""
        try:
            result = runner(["iptables", "-w", "10", "-S"], None)
        except FileNotFoundError:
            return set()
        found = set()
        for line in result.stdout.splitlines():
            match = re.match(rf"^-N {CHAIN_PREFIX}([0-9a-f]+)-(IN|FW)$", line)
            if match:
                found.add(match[1])
        return found
