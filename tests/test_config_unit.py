"""Config loading and thread-id handling: pure logic, no Ray, no Docker."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from backends.base import Capability

from sandbox_actors.actorconfig import ActorConfig
from sandbox_actors.config import SandboxConfig, load_config
from sandbox_actors.errors import ConfigError, InvalidThreadId
from sandbox_actors.threads import (
    anonymous_sandbox_id,
    sandbox_id_for,
    sandbox_mounts,
    thread_dir,
    thread_dir_name,
)


def test_defaults_match_the_original_provider():
    config = SandboxConfig()
    assert (config.port, config.idle_timeout, config.replicas) == (8080, 600, 3)
    assert config.mounts == () and config.environment == {} and config.provisioner_url is None
    assert config.namespace == "sandbox_actors"


def test_yaml_top_level_and_nested(tmp_path: Path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("replicas: 5\nidle_timeout: 30\nmounts:\n  - {host_path: /srv, container_path: /mnt/srv}\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("sandbox:\n  replicas: 7\n  environment: {API_KEY: $MY_KEY}\n")
    assert load_config(flat).replicas == 5 and load_config(flat).mounts[0].container_path == "/mnt/srv"
    loaded = load_config(nested)
    assert loaded.replicas == 7
    assert loaded.resolved_environment({"MY_KEY": "k"}) == {"API_KEY": "k"}
    assert loaded.resolved_environment({}) == {"API_KEY": ""}


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"replica": 3}, "replica"),  # unknown key (typo)
        ({"replicas": "many"}, "replicas"),
        ({"idle_timeout": -1}, "idle_timeout"),
        ({"readiness_timeout": 0}, "readiness_timeout"),
        ({"port": 70000}, "port"),
        ({"environment": {"BAD-NAME": "x"}}, "environment"),
        ({"mounts": [{"host_path": "/a", "container_path": "relative"}]}, "mounts.0.container_path"),
        ({"limits": {"memory": "lots"}}, "limits.memory"),
        ({"container_prefix": "-bad"}, "container_prefix"),
        ({"max_sandboxes": 1, "replicas": 3}, "max_sandboxes"),
    ],
)
def test_bad_config_names_the_key(data, key):
    with pytest.raises(ConfigError) as caught:
        load_config(data)
    assert key in str(caught.value)


def test_config_file_errors_are_typed(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("replicas: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listed)


def test_secret_values_never_in_config_errors():
    with pytest.raises(ConfigError) as caught:
        load_config({"environment": {"TOKEN": "s3cr3t-value"}, "replicas": "x"})
    assert "s3cr3t-value" not in str(caught.value)


def test_config_is_frozen():
    config = SandboxConfig()
    with pytest.raises(Exception):  # pydantic's frozen-instance error
        config.replicas = 9


def test_sandbox_ids_are_deterministic_long_and_per_pool():
    first = sandbox_id_for("pool", "thread-1")
    assert first == sandbox_id_for("pool", "thread-1")
    assert len(first) >= 16 and int(first, 16) >= 0
    assert first != sandbox_id_for("pool", "thread-2")
    assert first != sandbox_id_for("other-pool", "thread-1")
    assert anonymous_sandbox_id() != anonymous_sandbox_id()


@pytest.mark.parametrize("bad", ["", "x" * 10_000, "\ud800", 42, None])
def test_invalid_thread_ids_are_typed(bad):
    with pytest.raises(InvalidThreadId):
        sandbox_id_for("pool", bad)


@pytest.mark.parametrize(
    "thread_id", ["../../etc/passwd", "a/b", "nul\x00byte", "ctl\x07\n", "ünïcødé 🚀", "..", ".hidden", "a" * 500]
)
def test_hostile_thread_ids_stay_inside_the_base_dir(tmp_path: Path, thread_id):
    base = tmp_path / "base"
    config = SandboxConfig(base_dir=str(base))
    mounts = sandbox_mounts(config, thread_id)
    root = thread_dir(str(base), thread_id)
    assert root.resolve().is_relative_to((base / "threads").resolve())
    assert len(root.parent.name) <= 128
    assert {m.container_path for m in mounts} == {
        "/mnt/user-data/workspace", "/mnt/user-data/uploads", "/mnt/user-data/outputs"
    }
    assert all(Path(m.host_path).is_dir() for m in mounts)


def test_plain_thread_ids_keep_readable_dirs_and_anonymous_gets_no_mounts(tmp_path: Path):
    assert thread_dir_name("thread-42") == "thread-42"
    assert thread_dir_name("a/b").startswith("~")
    config = SandboxConfig(base_dir=str(tmp_path))
    assert sandbox_mounts(config, None) == ()


def test_skills_and_host_base_dir(tmp_path: Path):
    skills = tmp_path / "skills"
    skills.mkdir()
    config = SandboxConfig(
        base_dir=str(tmp_path / "inside"), host_base_dir="/host/base", skills_path=str(skills),
        mounts=[{"host_path": "/data", "container_path": "/mnt/data", "read_only": True}],
    )
    mounts = sandbox_mounts(config, "t1")
    assert mounts[0].host_path == "/host/base/threads/t1/user-data/workspace"  # the engine's view
    assert (tmp_path / "inside" / "threads" / "t1" / "user-data" / "workspace").is_dir()  # made locally
    skills_mount = [m for m in mounts if m.container_path == "/mnt/skills"]
    assert skills_mount and skills_mount[0].read_only
    assert mounts[-1].container_path == "/mnt/data" and mounts[-1].read_only


def test_lifecycle_keys_are_validated_and_hibernation_needs_the_docker_backend():
    config = load_config({"idle_action": "hibernate", "hibernate_ttl": 60, "max_hibernated": 3, "snapshot_ttl": 600})
    assert (config.idle_action, config.hibernate_ttl, config.max_hibernated) == ("hibernate", 60, 3)
    assert SandboxConfig().idle_action == "destroy"  # as the original provider
    with pytest.raises(ConfigError, match="idle_action"):
        load_config({"idle_action": "sleep"})
    with pytest.raises(ConfigError, match="max_hibernated"):
        load_config({"max_hibernated": -1})
    with pytest.raises(ConfigError, match="idle_action: hibernate"):
        load_config({"idle_action": "hibernate", "provisioner_url": "http://127.0.0.1:9"})


def test_a_live_hibernation_needs_gvisor_and_says_so():
    live = load_config({"idle_action": "hibernate", "hibernate_live": True, "runtime": "runsc",
                        "network": {"egress": "none"}})
    assert live.hibernate_live and SandboxConfig().hibernate_live is False
    with pytest.raises(ConfigError, match="runtime: runsc"):
        load_config({"idle_action": "hibernate", "hibernate_live": True})


def test_ray_worker_start_warnings_are_replaced_by_one_line_of_ours():
    import io

    from sandbox_actors.console import EXPLANATION, FilteredStream

    out = io.StringIO()
    stream = FilteredStream(out)
    warning = ("(raylet) WARNING: 8 PYTHON worker processes have been started on node: abc with address: "
               "10.0.0.1, which is 4x the maximum expected startup concurrency (2).")
    print("before", file=stream)
    print(warning, file=stream)
    print(warning.replace("8 PYTHON", "16 PYTHON"), file=stream)
    print("after", file=stream)
    stream.write("a line\n" + warning + "\nanother\n")
    assert out.getvalue() == f"before\n{EXPLANATION}\nafter\na line\nanother\n"


_UNPICKLE_WITHOUT_PYDANTIC = """
import pickle, sys
sys.path.insert(0, sys.argv[1])
sys.modules["pydantic"] = None  # any import of it fails
config = pickle.loads(sys.stdin.buffer.read())
print(config.pool_name, config.limits.memory, config.backend.resolved_api_key({"KEY": "k"}),
      sorted(c.value for c in config.backend.capabilities))
"""


def test_the_actors_copy_of_the_config_says_what_the_config_says(tmp_path: Path, monkeypatch):
    skills = tmp_path / "skills"
    skills.mkdir()
    config = SandboxConfig(
        base_dir=str(tmp_path / "inside"), host_base_dir="/host/base", skills_path=str(skills),
        mounts=[{"host_path": "/data", "container_path": "/mnt/data", "read_only": True}],
        environment={"A": "plain", "B": "$SBX_TEST_B"}, limits={"memory": "2g", "pids": 64},
        network={"egress": "allowlist", "allow": ["10.1.0.0/16:443"]},
    )
    copy = ActorConfig.of(config)
    assert sandbox_mounts(copy, "t1") == sandbox_mounts(config, "t1")
    monkeypatch.setenv("SBX_TEST_B", "from the node")
    assert copy.resolved_environment() == config.resolved_environment() == {"A": "plain", "B": "from the node"}
    assert copy.network_policy == config.network.policy()
    assert copy.backend.capabilities == config.backend.capabilities == frozenset(Capability)
    assert (copy.limits.memory, copy.limits.pids, copy.limits.cpus) == ("2g", 64, 1.0)

    remote = ActorConfig.of(SandboxConfig(backend={"kind": "provisioner", "url": "http://p:8002", "api_key": "$KEY"},
                                          container_prefix="sbx", pool_name="far"))
    assert remote.backend.url == "http://p:8002" and "KEY" not in repr(remote)
    assert remote.backend.capabilities == frozenset()
    repo = str(Path(__file__).resolve().parent.parent)
    child = subprocess.run([sys.executable, "-c", _UNPICKLE_WITHOUT_PYDANTIC, repo], input=pickle.dumps(remote),
                           capture_output=True, timeout=60)
    assert child.returncode == 0, child.stderr.decode()
    assert child.stdout.decode().split() == ["far", "1g", "k", "[]"]


def test_a_pool_s_actors_are_told_from_those_of_a_pool_whose_name_extends_its_own():
    """Pools 'p' and 'p-b' run side by side: 'p' must not count 'p-b''s SandboxActors or reapers
    as its own (it ended them as unknown: a sandbox of the other pool died under its user)."""
    from sandbox_actors.options import reaper_prefix, sandbox_actor_prefix
    from sandbox_actors.raycalls import named_by

    first, second = SandboxConfig(pool_name="p"), SandboxConfig(pool_name="p-b")
    theirs = f"{sandbox_actor_prefix(second)}0123456789abcdef"
    ours = f"{sandbox_actor_prefix(first)}0123456789abcdef"
    assert named_by(sandbox_actor_prefix(first), ours) and named_by(sandbox_actor_prefix(second), theirs)
    assert not named_by(sandbox_actor_prefix(first), theirs)
    assert not named_by(reaper_prefix(first), f"{reaper_prefix(second)}0123456789abcdef")


@pytest.mark.parametrize("network, said", [
    ({"egress": "open", "allow_domains": ["a.test"]}, "only with egress 'allowlist'"),
    ({"egress": "allowlist", "allow_domains": ["not a name"]}, "is not a host name"),
    ({"egress": "allowlist", "allow_domains": ["a.test"], "enforce": False}, "needs network.enforce"),
    ({"egress": "allowlist", "allow_domains": ["a.test"], "inject": {"b.test": {"X": {"env": "T"}}}},
     "not in allow_domains"),
    ({"egress": "allowlist", "allow_domains": ["a.test"], "inject": {"a.test": {"X": {}}}}, "one of them"),
    ({"egress": "allowlist", "allow_domains": ["a.test"], "hosts": {"a.test": "somewhere"}}, "ADDRESS:PORT"),
])
def test_egress_by_domain_is_checked_as_it_is_read(network, said):
    with pytest.raises(ConfigError, match=said):
        load_config({"network": network})


def test_egress_by_domain_gives_the_proxy_its_rules():
    config = load_config({"network": {"egress": "allowlist", "allow_domains": ["API.GitHub.com", "*.openai.com"],
                                      "inject": {"api.github.com": {"Authorization": {"env": "GH_TOKEN"}}},
                                      "hosts": {"Internal.test": "10.1.2.3:8080"}}})
    assert config.network.policy().domains == ("api.github.com", "*.openai.com")
    rules = config.network.egress_rules()
    assert rules.allow == ("api.github.com", "*.openai.com") and rules.resolve("internal.test", 80) == ("10.1.2.3", 8080)
    assert rules.inject["api.github.com"]["Authorization"].env == "GH_TOKEN"
