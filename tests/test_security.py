"""Security defaults, verified on real containers the pool made."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest
import ray

import sandbox_actors
from sandbox_actors import InvalidRequest
from tests.conftest import assert_no_actors_left


def test_containers_are_locked_down(pool, config, docker_client):
    box = pool.acquire("locked")
    attrs = docker_client.containers.get(box.info["container_id"]).attrs
    host = attrs["HostConfig"]
    assert not host["PortBindings"]  # nothing published: the API is on a unix socket only its actor can reach
    assert host["Privileged"] is False
    assert "no-new-privileges" in host["SecurityOpt"]
    # Every capability dropped; the server gets back only what it needs to run commands as
    # another user (commands lose them all with their uid).
    assert host["CapDrop"] == ["ALL"]
    assert {cap.removeprefix("CAP_") for cap in host["CapAdd"]} == {"SETUID", "SETGID", "KILL", "CHOWN", "DAC_OVERRIDE"}
    assert host["Memory"] == 256 * 2**20 and host["MemorySwap"] == 256 * 2**20
    assert host["NanoCpus"] == 5 * 10**8 and host["PidsLimit"] == 128
    assert host["Init"] is True
    status = box.bash("grep -E 'Cap(Eff|Prm|Bnd)' /proc/self/status").stdout.split()
    assert int(status[1], 16) == 0 and int(status[3], 16) == 0  # a command has no capabilities at all
    assert box.bash("id -u").stdout.strip() == "10000"  # and is not root


def test_root_commands_on_purpose(ray_address, config, docker_client):
    client = sandbox_actors.connect(config.model_copy(update={"user": "root"}))
    try:
        box = client.acquire("root-on-purpose")
        host = docker_client.containers.get(box.info["container_id"]).attrs["HostConfig"]
        assert not host["CapAdd"]  # root in the container, with nothing to escalate to
        assert box.bash("id -u").stdout.strip() == "0"
        assert int(box.bash("grep CapEff /proc/self/status").stdout.split()[-1], 16) == 0
        assert client.stats()["isolation"]["user"] == "root"
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)


def test_the_api_needs_the_sandbox_token(pool):
    box = pool.acquire("token")
    url = box.info["url"]
    assert url.startswith("unix:") and "token" not in box.info  # only the SandboxActor holds it
    transport = httpx.HTTPTransport(uds=url.removeprefix("unix:"))
    with httpx.Client(base_url="http://sandbox", transport=transport, timeout=10) as anonymous:
        assert anonymous.get("/v1/sandbox").status_code == 401
        refused = anonymous.post("/v1/shell/exec", json={"command": "touch /tmp/pwned"})
        assert refused.status_code == 401
        guessed = anonymous.post(
            "/v1/shell/exec", json={"command": "touch /tmp/pwned"}, headers={"Authorization": "Bearer guess"}
        )
        assert guessed.status_code == 401
    assert box.bash("test -e /tmp/pwned").exit_code == 1
    assert "SANDBOX_TOKEN" not in box.bash("env").stdout  # commands never see it (nor its hash)
    assert box.bash("test -r /run/sandbox-api").exit_code != 0  # nor can they reach the socket


def _session_logs() -> list[Path]:
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [p for p in (session / "logs").rglob("*") if p.is_file()]


def test_secret_values_never_reach_logs_or_errors(ray_address, config, docker_client):
    in_config, in_call, in_bad_call = (f"s3cr3t-{name}-{secrets.token_hex(8)}" for name in ("cfg", "call", "bad"))
    client = sandbox_actors.connect(
        config.model_copy(update={"environment": {"API_SECRET": in_config, "FROM_HOST": "$SAT_NOT_SET_ANYWHERE"}})
    )
    captured = []
    try:
        box = client.acquire("secrets")
        assert box.bash('test "$API_SECRET" = "$EXPECTED"', env={"EXPECTED": in_config}).exit_code == 0
        assert box.bash("exit 3", env={"CALL_SECRET": in_call}).exit_code == 3
        with pytest.raises(InvalidRequest) as bad:
            box.bash("true", env={"NOT-VALID": in_bad_call})
        captured.append(str(bad.value))
        failed = box.bash("ls /nope", env={"CALL_SECRET": in_call})
        captured += [failed.stderr, failed.stdout]
        captured.append(docker_client.containers.get(box.info["container_id"]).logs().decode())
        captured += [repr(row) for row in client.list()] + [repr(client.stats()), repr(box.info)]
    finally:
        client.shutdown()
    assert_no_actors_left(config.pool_name)
    captured += [p.read_text(errors="replace") for p in _session_logs()]
    for secret in (in_config, in_call, in_bad_call):
        leaks = [text[:200] for text in captured if secret in text]
        assert not leaks, f"a secret value leaked into logs or errors: {leaks}"
