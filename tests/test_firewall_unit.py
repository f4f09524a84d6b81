"""The isolation rules: what they say (pure), how their failures read, and that installing them is
idempotent and removal leaves nothing (on this host's real iptables, for a bridge that does not exist)."""

from __future__ import annotations

import shlex
import subprocess
import uuid

import pytest

from backends.errors import IsolationUnavailable
from backends.firewall import (
    AllowRule,
    Firewall,
    NetworkPolicy,
    chains,
    nat_chain,
    plan_redirect,
    plan_rules,
    restore_script,
)


def test_rules_refuse_the_host_metadata_and_listed_cidrs_and_let_replies_back():
    rules = plan_rules("abc", NetworkPolicy(blocked=("10.9.0.0/16",)), extra_blocked=["192.0.2.7", "10.9.1.1"])
    chain_in, chain_fw = chains("abc")
    as_text = [" ".join(rule) for rule in rules]
    assert as_text[0] == f"{chain_in} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"
    assert as_text[1].startswith(chain_in) and as_text[1].endswith("REJECT --reject-with icmp-admin-prohibited")
    refused = [rule[2] for rule in rules if rule[0] == chain_fw and rule[1] == "-d"]
    assert refused == ["169.254.0.0/16", "10.9.0.0/16", "192.0.2.7/32", "10.9.1.1/32"]
    assert not any("RETURN" in rule[-1] and "-d" in rule for rule in rules)  # open egress: nothing allowed explicitly


def test_allowlist_returns_only_what_is_listed_then_refuses_the_rest():
    policy = NetworkPolicy(egress="allowlist", allow=("10.1.2.3/32:443", "10.0.0.0/8:53/udp", "10.5.0.0/24"))
    rules = plan_rules("abc", policy)
    _chain_in, chain_fw = chains("abc")
    forward = [" ".join(rule[1:]) for rule in rules if rule[0] == chain_fw]
    assert "-d 10.1.2.3/32 -p tcp --dport 443 -j RETURN" in forward
    assert "-d 10.0.0.0/8 -p udp --dport 53 -j RETURN" in forward
    assert "-d 10.5.0.0/24 -j RETURN" in forward
    assert forward[-1].endswith("REJECT --reject-with icmp-admin-prohibited")
    # Always-blocked addresses come before anything allowed: an allow-list cannot reopen metadata.
    assert forward.index("-d 169.254.0.0/16 -m comment --comment sandbox-actors:abc -j REJECT --reject-with "
                         "icmp-admin-prohibited") < forward.index("-d 10.5.0.0/24 -j RETURN")


def test_domains_reach_only_the_proxy_and_its_dns_on_the_gateway():
    policy = NetworkPolicy(egress="allowlist", domains=("allowed.test",))
    rules = plan_rules("abc", policy, proxy=("172.30.0.1", 41000))
    chain_in, chain_fw = chains("abc")
    inbound = [" ".join(rule[1:]) for rule in rules if rule[0] == chain_in]
    assert inbound[1:4] == ["-d 172.30.0.1 -p udp --dport 53 -j RETURN", "-d 172.30.0.1 -p tcp --dport 53 -j RETURN",
                            "-d 172.30.0.1 -p tcp --dport 41000 -j RETURN"]
    assert inbound[-1].endswith("REJECT --reject-with icmp-admin-prohibited")  # and nothing else of the host
    forward = [" ".join(rule[1:]) for rule in rules if rule[0] == chain_fw]
    assert not any("RETURN" in rule and "-d" in rule for rule in forward)  # nothing by address
    assert forward[-1].endswith("REJECT --reject-with icmp-admin-prohibited")
    [redirect] = plan_redirect("abc", ("172.30.0.1", 41000))
    assert " ".join(redirect) == f"{nat_chain('abc')} -d 172.30.0.1 -p tcp ! --dport 53 -j REDIRECT --to-ports 41000"
    assert restore_script("abc", [redirect], "nat").splitlines()[:2] == ["*nat", f":{nat_chain('abc')} - [0:0]"]


def test_restore_script_names_only_our_chains():
    script = restore_script("abc", plan_rules("abc", NetworkPolicy()))
    declared = [line for line in script.splitlines() if line.startswith(":")]
    assert declared == [":SBXA-abc-IN - [0:0]", ":SBXA-abc-FW - [0:0]"]
    assert script.startswith("*filter\n") and script.endswith("COMMIT\n")
    assert all(line.startswith(("-A SBXA-abc-", ":", "*", "COMMIT")) for line in script.splitlines())


@pytest.mark.parametrize("bad", ["10.0.0.0/8:0", "10.0.0.0/8:70000", "nonsense", "::1/128:80", "10.0.0.0/8:80/sctp"])
def test_bad_allow_entries_say_what_is_wrong(bad):
    with pytest.raises(ValueError):
        AllowRule.parse(bad)


def _fake(returncode: int = 0, stderr: str = "", missing: bool = False):
    def runner(args, stdin):
        if missing:
            raise FileNotFoundError(args[0])
        return subprocess.CompletedProcess(args, returncode, "", stderr)

    return runner


def test_missing_iptables_or_rights_are_typed_errors_naming_the_way_out():
    with pytest.raises(IsolationUnavailable, match="not installed.*network.enforce: false"):
        Firewall("abc", "sbx-abc", runner=_fake(missing=True)).check_available()
    denied = _fake(4, "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied "
                      "(you must be root)")
    with pytest.raises(IsolationUnavailable, match="CAP_NET_ADMIN") as refused:
        Firewall("abc", "sbx-abc", runner=denied).install(NetworkPolicy())
    assert "network.enforce: false" in str(refused.value)


def _ours(tag: str) -> list[str]:
    dump = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return [line for line in dump.splitlines() if tag in line]


def test_install_is_idempotent_and_remove_leaves_nothing():
    tag = uuid.uuid4().hex[:10]
    firewall = Firewall(tag, f"sbx-{tag}")
    try:
        assert firewall.install(NetworkPolicy(blocked=("10.77.0.0/16",)))
        first = _ours(tag)
        assert firewall.install(NetworkPolicy(blocked=("10.77.0.0/16",)))  # refresh: same rules, not twice
        assert sorted(_ours(tag)) == sorted(first)
        assert firewall.installed() and tag in Firewall.installed_tags()
        assert not firewall.install(NetworkPolicy(), replace=False)  # already there: left alone
        assert any("10.77.0.0/16" in line for line in _ours(tag))
        assert sum(1 for line in first if line.startswith("-A INPUT")) == 1
    finally:
        assert firewall.remove()
    assert _ours(tag) == [] and not firewall.installed()
    assert not firewall.remove()  # nothing left to remove


def test_a_missing_jump_is_noticed_and_put_back_by_a_check():
    """What a SandboxActor's check before its first sandbox relies on: a jump removed by other
    hands (a firewall reload, say) reads as not installed, and the check installs it again."""
    tag = uuid.uuid4().hex[:10]
    firewall = Firewall(tag, f"sbx-{tag}")
    try:
        firewall.install(NetworkPolicy())
        forward = [line for line in _ours(tag) if line.startswith(("-A DOCKER-USER", "-A FORWARD"))]
        assert len(forward) == 1
        subprocess.run(["iptables", "-w", "10", "-D", *shlex.split(forward[0])[1:]], check=True)
        assert not firewall.installed()
        assert firewall.install(NetworkPolicy(), replace=False)
        assert firewall.installed() and len([line for line in _ours(tag) if line == forward[0]]) == 1
    finally:
        firewall.remove()
    assert _ours(tag) == []


def test_the_route_to_an_egress_proxy_is_installed_and_removed_with_the_rest():
    tag = uuid.uuid4().hex[:10]
    firewall = Firewall(tag, f"sbx-{tag}")

    def nat() -> list[str]:
        listed = subprocess.run(["iptables", "-w", "10", "-t", "nat", "-S"], capture_output=True, text=True,
                                check=False).stdout
        return [line for line in listed.splitlines() if tag in line]

    try:
        policy = NetworkPolicy(egress="allowlist", domains=("allowed.test",))
        assert firewall.install(policy, proxy=("172.30.9.1", 41000))
        assert firewall.install(policy, proxy=("172.30.9.1", 41001))  # a new proxy's port: replaced, not added
        rules = nat()
        assert sum(1 for line in rules if line.startswith("-A PREROUTING")) == 1
        assert [line for line in rules if "REDIRECT" in line] == [
            f"-A {nat_chain(tag)} -d 172.30.9.1/32 -p tcp -m tcp ! --dport 53 -j REDIRECT --to-ports 41001"]
    finally:
        assert firewall.remove()
    assert nat() == [] and _ours(tag) == []
