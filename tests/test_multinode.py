"""Distributed: cluster.yaml validates with Ray's own loader; multi-node behaviour on one machine."""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.test_live_checkpoint import _require_live

ROOT = Path(__file__).resolve().parents[1]


def slots_given(commands: list[str]) -> list[float]:
    """The sandbox_slots each `ray start` in ``commands`` advertises (0 when absent)."""
    found = []
    for command in commands:
        words = shlex.split(command)
        if "start" not in words:
            continue
        resources = {}
        for word in words:
            if word.startswith("--resources="):
                resources = json.loads(word.split("=", 1)[1])
        found.append(resources.get("sandbox_slots", 0))
    return found


def test_cluster_yaml_validates_and_gives_workers_sandbox_slots():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # Ray's own schema check
    assert slots_given(prepared["worker_start_ray_commands"]) and all(
        n > 0 for n in slots_given(prepared["worker_start_ray_commands"])
    )
    assert slots_given(prepared["head_start_ray_commands"]) == [0]  # the head runs the pool, no sandboxes
    starts = prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if " start " in c)  # same auth everywhere
    assert any("auth_token" in dest for dest in raw["file_mounts"])
    assert any("build-image" in c for c in prepared["setup_commands"])  # image built on each node
    broken = copy.deepcopy(raw)
    broken["provider"]["no_such_field"] = True
    broken["not_a_ray_key"] = 1
    with pytest.raises(Exception):  # the validator does bite
        validate_config(prepare_config(broken))


def raylets() -> set[int]:
    found = subprocess.run(["pgrep", "-x", "raylet"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


@pytest.fixture(scope="module")
def observed(image) -> dict:
    before = raylets()
    result = subprocess.run(
        [sys.executable, "-m", "tests.multinode", image],
        capture_output=True, text=True, timeout=900, cwd=ROOT, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    data["raylets_left"] = sorted(raylets() - before)
    print(f"multinode figures: node-loss recovery {data['recovered_after']:.1f}s; "
          f"2 forks from a snapshot of another node {data['fork']['seconds']:.2f}s; live fork on another node: "
          f"{data.get('live_fork')}")
    return data


@pytest.mark.slow
def test_sandboxes_land_only_on_worker_nodes(observed):
    assert observed["pool_node"] == observed["head"]
    placed = list(observed["placement"].values())
    assert set(placed) == set(observed["workers"])  # never the head
    assert sorted(placed.count(w) for w in observed["workers"]) == [2, 2]  # the per-node cap


@pytest.mark.slow
def test_a_full_cluster_waits_then_fails_typed_or_succeeds_after_a_release(observed):
    fifth = observed["fifth"]
    assert fifth["error"] == "PoolExhausted" and fifth["retryable"] and fifth["waited"] >= 7.5
    assert observed["fifth_waited"] is True  # it was waiting for a slot when one was released
    assert observed["fifth_after_release"] == "cold"
    assert observed["d_after_eviction"] == []  # the released one was evicted to free its slot


@pytest.mark.slow
def test_drivers_on_different_nodes_get_the_same_sandbox(observed):
    first, second = observed["cross_node"]
    assert first["node"] != second["node"]
    assert first["sandbox_id"] == second["sandbox_id"] and first["container"] == second["container"]


@pytest.mark.slow
def test_node_loss_moves_threads_to_a_live_node_with_their_files(observed):
    assert set(observed["threads_on_victim"]) - {"a"}  # an active sandbox was on the lost node
    assert observed["moved"] is True, (observed["recovered_after"], observed["counters"])
    for thread, after in observed["after_loss"].items():
        assert after["node"] != observed["victim_node"] and after["node"] in observed["workers"], (
            thread, after, observed["recovered_after"], observed["counters"])
        assert after["workspace"] == f"{thread} was here"
        assert after["exec"] == "alive"
        assert after["tmp_state"] == "in-container"  # the shared engine's container was re-adopted
        assert after["containers"] == 1
    assert all(count == 1 for count in observed["containers_per_thread"].values())  # never two
    assert observed["after_loss"]["a"]["path"] == "resumed"  # hibernated through the loss
    # Every active one on the lost node ("a" was hibernated) was re-adopted by a new actor.
    assert observed["counters"].get("readopted", 0) >= len(observed["threads_on_victim"]) - 1 >= 1
    assert observed["counters"]["resumed"] == 1


@pytest.mark.slow
def test_a_snapshot_forks_onto_both_workers(observed):
    fork = observed["fork"]
    assert fork["env"] == ["prepared", "prepared"]
    assert len(set(fork["nodes"]) | {fork["snapshot_node"]}) == 2  # not all on the snapshot's node
    assert fork["removed"] is True


@pytest.mark.slow
def test_a_live_snapshot_forks_on_another_worker_and_goes_on_from_its_processes(observed, docker_client):
    live = observed.get("live_fork")
    if live is None:  # the scenario found no gVisor or no experimental engine
        _require_live(docker_client)
    assert live["snapshot_node"] == live["source_node"] != live["fork_node"]
    assert live["fork_node"] in observed["workers"]
    assert live["forked_live"] is True and live["checkpoint_bytes"] > 0
    # The fork's counter went on from the snapshot's process (a fresh start counts from 1), and runs.
    assert live["fork_first"] >= live["source_at_snapshot"], live
    assert live["fork_later"] > live["fork_first"]
    assert live["snapshot_removed"] is True and live["checkpoint_left"] is False
    assert live["left_after_shutdown"] == 0


@pytest.mark.slow
def test_nothing_is_left_behind(observed):
    assert observed["left_after_shutdown"] == 0
    assert observed["raylets_left"] == []
