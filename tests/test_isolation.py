"""Isolation, probed from inside real sandboxes: what agent code can reach, and what it can read.

Test traffic only ever goes to this machine: the node's own addresses and Docker gateways (a
listener the test starts on 0.0.0.0, and the test cluster's real GCS port), another sandbox of
the test, and a network namespace the test creates (standing in for a CIDR a user blocks).
The metadata address 169.254.169.254 is never contacted: its block is proven by the rule we
install, and the same mechanism is proven by the probe of the test's own blocked CIDR. Every
probe that is refused under the policy connects with the policy off, so the block is ours.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import sandbox_actors
from backends.firewall import chains
from backends.network import pool_tag
from sandbox_actors.config import load_config
from tests.conftest import assert_no_actors_left, firewall_rules_of, networks_of

PROBE = r"""
import errno, json, socket, sys
found = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    sock = socket.socket()
    sock.settimeout(3)
    try:
        sock.connect((host, int(port)))
        found[target] = "connected"
    except socket.timeout:
        found[target] = "timeout"
    except OSError as exc:
        found[target] = errno.errorcode.get(exc.errno, str(exc))
    finally:
        sock.close()
print(json.dumps(found))
"""


@dataclass(frozen=True)
class Targets:
    node: str  # this node's address, a listener of the test on it
    gcs: str  # the test cluster's Ray GCS, on the node's address
    ray_client: str  # a listener standing in for the Ray Client server (port 10001 when free)
    docker0: str  # the default Docker bridge's gateway, a listener there
    blocked: str  # a listener in a network namespace whose CIDR the pool blocks
    blocked_cidr: str

    def host_side(self) -> list[str]:
        return [self.node, self.gcs, self.ray_client, self.docker0]


def _listen(port: int = 0) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(64)
    return server


@contextlib.contextmanager
def host_listeners() -> Iterator[tuple[int, int]]:
    """Two TCP listeners on every address of this host: (any port, 10001 when free)."""
    first = _listen()
    try:
        second = _listen(10001)
    except OSError:
        second = _listen()
    stop = threading.Event()

    def accept(server: socket.socket) -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                connection, _ = server.accept()
                connection.close()

    threads = [threading.Thread(target=accept, args=(s,), daemon=True) for s in (first, second)]
    for thread in threads:
        thread.start()
    try:
        yield first.getsockname()[1], second.getsockname()[1]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        first.close()
        second.close()


def _sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True)


@contextlib.contextmanager
def namespace_listener() -> Iterator[tuple[str, str]]:
    """A listener inside a network namespace of the test's own, reached from the host through a
    veth pair (so traffic from a sandbox to it is forwarded, as to any outside address).
    Yields (target "ip:port", its /24)."""
    suffix = uuid.uuid4().hex[:6]
    octet = int(suffix[:2], 16) % 200 + 20
    namespace, host_end, ns_end = f"sat-{suffix}", f"sath{suffix}", f"satn{suffix}"
    cidr, host_ip, ns_ip = f"10.254.{octet}.0/24", f"10.254.{octet}.1", f"10.254.{octet}.2"
    server = None
    try:
        _sh("ip", "netns", "add", namespace)
        _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _sh("ip", "link", "set", ns_end, "netns", namespace)
        _sh("ip", "addr", "add", f"{host_ip}/24", "dev", host_end)
        _sh("ip", "link", "set", host_end, "up")
        _sh("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{ns_ip}/24", "dev", ns_end)
        _sh("ip", "netns", "exec", namespace, "ip", "link", "set", ns_end, "up")
        _sh("ip", "netns", "exec", namespace, "ip", "route", "add", "default", "via", host_ip)
        server = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c",
             "import socket\ns = socket.socket(); s.bind(('0.0.0.0', 8089)); s.listen(64)\n"
             "while True: s.accept()[0].close()"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        yield f"{ns_ip}:8089", cidr
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


@pytest.fixture(scope="module")
def targets(ray_address) -> Iterator[Targets]:
    node_ip = ray_address.rsplit(":", 1)[0]
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "docker0"], capture_output=True, text=True,
                           check=True).stdout
    docker0 = shown.split(" inet ", 1)[1].split("/", 1)[0]  # the default bridge's gateway: an address of ours
    with host_listeners() as (port, client_port), namespace_listener() as (blocked, cidr):
        yield Targets(
            node=f"{node_ip}:{port}", gcs=ray_address, ray_client=f"{node_ip}:{client_port}",
            docker0=f"{docker0}:{port}", blocked=blocked, blocked_cidr=cidr,
        )


def probe(box, targets: list[str]) -> dict[str, str]:
    box.write_file("/tmp/probe.py", PROBE)
    result = box.bash("python3 /tmp/probe.py " + " ".join(targets), timeout=60)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def sandbox_ip(docker_client, box) -> str:
    networks = docker_client.containers.get(box.info["container_id"]).attrs["NetworkSettings"]["Networks"]
    [address] = [n["IPAddress"] for n in networks.values() if n.get("IPAddress")]
    return address


def serve_in(box, port: int = 8080) -> None:
    """A listener inside a sandbox (run as its command user, like any agent's server)."""
    box.exec(f"nohup python3 -m http.server {port} --bind 0.0.0.0 >/dev/null 2>&1 &")
    probe_self = probe(box, [f"127.0.0.1:{port}"])
    for _ in range(50):
        if probe_self[f"127.0.0.1:{port}"] == "connected":
            return
        probe_self = probe(box, [f"127.0.0.1:{port}"])
    raise AssertionError("the listener inside the sandbox did not start")


def token_of(docker_client, box) -> str:
    return docker_client.containers.get(box.info["container_id"]).labels["sandbox-actors.token"]


def readable_holders(box, needle: str, roots: str = "/") -> list[str]:
    """Files under ``roots``, process environments and command lines that a command in the
    sandbox can read and that hold ``needle``. The needle reaches the search in two halves and
    leaves no process's command line or environment whole (else the search would find itself)."""
    search = box.bash(
        'needle="$NEEDLE_A$NEEDLE_B"; unset NEEDLE_A NEEDLE_B\n'
        f'grep -rlsF -f - --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev {roots} <<<"$needle"\n'
        'grep -lsF -f - /proc/[0-9]*/environ /proc/[0-9]*/cmdline <<<"$needle"\n'
        "true",
        env={"NEEDLE_A": needle[:16], "NEEDLE_B": needle[16:]},
        timeout=120,
    )
    return search.stdout.split()


def assert_token_out_of_reach(box, token: str, roots: str = "/") -> None:
    """No process environment, command line or file a command can read (under ``roots``) holds
    the API token; the same search finds a decoy planted where a token could leak."""
    assert token and len(token) >= 32
    decoy = secrets.token_urlsafe(32)
    box.bash('printf %s "$PLANTED" > /tmp/planted.txt; nohup sleep 300 >/dev/null 2>&1 &', env={"PLANTED": decoy})
    try:
        planted = readable_holders(box, decoy, f"{roots} /tmp")
        assert "/tmp/planted.txt" in planted, planted  # the search does find a file...
        assert any(p.endswith("/environ") for p in planted), planted  # ...and a process's environment
    finally:
        box.bash("rm -f /tmp/planted.txt; pkill -f 'sleep 300'; true")
    found = readable_holders(box, token, roots)
    assert found == [], f"the token is readable in: {found}"
    init_env = box.bash("cat /proc/1/environ")  # root's alone under runc; gVisor lets others read it
    assert init_env.exit_code != 0 or (token not in init_env.stdout and "SANDBOX_TOKEN_SHA256=" in init_env.stdout)
    env = box.bash("env").stdout
    assert token not in env and "SANDBOX_TOKEN" not in env


def connect(config, **changes):
    return sandbox_actors.connect(load_config({**config.model_dump(), **changes}))


def test_default_policy_blocks_host_metadata_others_and_listed_cidrs(
    ray_address, config, docker_client, targets, tmp_path
):
    client = connect(config, network={"blocked": [targets.blocked_cidr]})
    try:
        box, other = client.acquire("agent"), client.acquire("neighbour")
        serve_in(other)
        neighbour = f"{sandbox_ip(docker_client, other)}:8080"
        seen = probe(box, [*targets.host_side(), neighbour, targets.blocked])
        # The host, on every address (node, GCS, Ray Client, Docker gateways): refused by our INPUT
        # chain. The listed CIDR: refused by our FORWARD chain. The neighbour: dropped (no ICC).
        for target in [*targets.host_side(), targets.blocked]:
            assert seen[target] == "EHOSTUNREACH", (target, seen)
        assert seen[neighbour] in ("timeout", "EHOSTUNREACH"), seen
        gateway = sandbox_ip(docker_client, box).rsplit(".", 1)[0] + ".1"
        port = targets.node.rsplit(":", 1)[1]
        assert probe(box, [f"{gateway}:{port}"])[f"{gateway}:{port}"] == "EHOSTUNREACH"  # its own gateway
        # Link-local (cloud metadata) is refused by the same kind of rule as the listed CIDR:
        # proven by the rule, never by a connection.
        tag = pool_tag(config.pool_name)
        _chain_in, chain_fw = chains(tag)
        rules = subprocess.run(["iptables", "-S", chain_fw], capture_output=True, text=True, check=True).stdout
        assert f"-A {chain_fw} -d 169.254.0.0/16" in rules and "REJECT" in rules
        assert f"-A {chain_fw} -d {targets.blocked_cidr}" in rules
        jumps = subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True, check=True).stdout
        assert f"-i sbx-{tag}" in jumps and f"-j {chain_fw}" in jumps
        assert box.bash("id -u").stdout.strip() != "0"
        assert box.bash("grep -c . /proc/net/if_inet6 || true").stdout.strip() in ("", "0")  # no IPv6 to get around
        assert_token_out_of_reach(box, token_of(docker_client, box))
        stats = client.stats()
        assert stats["isolation"]["network"]["egress"] == "open" and stats["isolation"]["network"]["enforced"]
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)
    assert networks_of(docker_client, config.pool_name) == [] and firewall_rules_of(config.pool_name) == []


def test_every_probe_connects_with_the_policy_off(ray_address, config, docker_client, targets):
    """The control: the same probes, with our rules off, all connect (so the blocks above are ours)."""
    client = connect(config, network={"enforce": False})
    try:
        box, other = client.acquire("agent"), client.acquire("neighbour")
        serve_in(other)
        neighbour = f"{sandbox_ip(docker_client, other)}:8080"
        everything = [*targets.host_side(), neighbour, targets.blocked]
        seen = probe(box, everything)
        assert all(seen[target] == "connected" for target in everything), seen
        assert firewall_rules_of(config.pool_name) == []
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_egress_none_has_no_network_and_still_answers(ray_address, config, docker_client, targets):
    client = connect(config, network={"egress": "none"})
    try:
        box = client.acquire("offline")
        attrs = docker_client.containers.get(box.info["container_id"]).attrs
        assert attrs["HostConfig"]["NetworkMode"] == "none" and not attrs["HostConfig"]["PortBindings"]
        seen = probe(box, [*targets.host_side(), targets.blocked])
        assert set(seen.values()) == {"ENETUNREACH"}, seen
        assert box.exec("echo through the socket").output.strip() == "through the socket"
        assert box.bash("id -un").stdout.strip() == "sandbox"
        assert_token_out_of_reach(box, token_of(docker_client, box))
        assert networks_of(docker_client, config.pool_name) == []  # nothing to make for no network
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def _runsc_registered(docker_client) -> bool:
    return "runsc" in (docker_client.info().get("Runtimes") or {})


def test_gvisor_sandbox_with_no_network(ray_address, config, docker_client, targets):
    assert _runsc_registered(docker_client), "gVisor's runsc is not registered with Docker: run scripts/bootstrap"
    # gVisor's own threads and file cache count toward the sandbox's limits: the tests' usual
    # 128 processes and 256 MB are too few for it (the defaults, 512 and 1 GB, are enough).
    limits = {**config.limits.model_dump(), "memory": "1g", "pids": 512}
    client = connect(config, runtime="runsc", network={"egress": "none"}, limits=limits)
    try:
        box = client.acquire("gvisor")
        attrs = docker_client.containers.get(box.info["container_id"]).attrs
        assert attrs["HostConfig"]["Runtime"] == "runsc"
        host_kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True, check=True).stdout
        assert box.bash("uname -r").stdout != host_kernel  # gVisor's own kernel answers, not the host's
        seen = probe(box, [*targets.host_side(), targets.blocked])
        assert all(result != "connected" for result in seen.values()), seen
        box.write_file("/home/sandbox/kept.txt", "kept")
        assert box.exec("cat ~/kept.txt").output == "kept"
        assert box.bash("id -u").stdout.strip() == "10000"
        assert_token_out_of_reach(box, token_of(docker_client, box))
        assert client.stats()["isolation"]["runtime"] == "runsc"
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_a_runtime_the_engine_does_not_know_refuses_to_start(ray_address, config, docker_client):
    with pytest.raises(sandbox_actors.IsolationUnavailable, match="no-such-runtime") as refused:
        connect(config, runtime="no-such-runtime")
    assert "runsc" in str(refused.value) or "daemon.json" in str(refused.value)  # what it knows, how to add one
    assert_no_actors_left(config.pool_name)  # the refused pool ended, with its reapers
    assert networks_of(docker_client, config.pool_name) == []


def test_allowlist_lets_only_listed_destinations_through(ray_address, config, docker_client, targets):
    allowed_ip, allowed_port = targets.blocked.rsplit(":", 1)
    client = connect(config, network={"egress": "allowlist", "allow": [f"{allowed_ip}/32:{allowed_port}"]})
    try:
        box = client.acquire("allowlisted")
        seen = probe(box, [targets.blocked, f"{allowed_ip}:8090", targets.node])
        assert seen[targets.blocked] == "connected", seen
        assert seen[f"{allowed_ip}:8090"] == "EHOSTUNREACH"  # same host, a port not listed
        assert seen[targets.node] == "EHOSTUNREACH"  # the node stays off limits whatever is allowed
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_read_only_root_filesystem_keeps_tmp_home_and_mounts_writable(ray_address, config):
    client = connect(config, read_only_rootfs=True)
    try:
        box = client.acquire("readonly")
        assert box.bash("touch /usr/local/x").exit_code != 0
        for path in ("/tmp/x", "/home/sandbox/x", "/mnt/user-data/workspace/x"):
            assert box.bash(f"echo ok > {path} && cat {path}").stdout == "ok\n", path
        box.write_file("/home/sandbox/by-api.txt", "api")
        assert box.exec("cat ~/by-api.txt").output == "api"
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_a_disk_limit_the_engine_cannot_apply_is_a_clear_error(ray_address, config, docker_client):
    driver = docker_client.info().get("Driver")
    backing = dict(docker_client.info().get("DriverStatus") or []).get("Backing Filesystem")
    if driver == "overlay2" and backing == "xfs":
        pytest.skip("this engine may support disk quotas (overlay2 on xfs)")
    with pytest.raises(sandbox_actors.NotSupported, match="limits.disk") as refused:
        connect(config, limits={**config.limits.model_dump(), "disk": "1g"})
    assert "storage" in str(refused.value)  # the engine's own reason is in the message
    assert_no_actors_left(config.pool_name)
    assert networks_of(docker_client, config.pool_name) == []
