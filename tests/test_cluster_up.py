"""`ray up cluster.yaml` for real: a head and two workers, each a container with its own sshd and
its own Docker engine, launched from this machine with the real cluster.yaml plus a small overlay;
then agent jobs use the cluster, one worker is lost, and everything is taken down.

One scenario runs once (module fixture ``observed``) and records what it saw; each test asserts
one part of it, as tests/test_multinode.py does. The scenario's timings are printed and written
to ``~/.cache/sandbox-actors/cluster-test/last-run/report.json`` with the run's logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.cluster import launcher
from tests.cluster.launcher import (
    CLUSTER_YAML,
    JobGone,
    LaunchError,
    RayCli,
    job_result,
    job_state,
    json_block,
    merge,
    overlay,
    overlay_paths,
)
from tests.cluster.node_image import build_node_image
from tests.cluster.nodes import RUN_LABEL, Node, NodeCluster, leftovers, sweep_stale_runs

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sandbox-actors" / "cluster-test"
# cluster.yaml's venv and its copy of this repository, on every node (ssh_user root: HOME /root).
# Absolute: `ray job submit` quotes each word of the entrypoint, so a `~` would not expand.
NODE_PYTHON = "/root/sandbox-actors-venv/bin/python"
JOB = "/root/sandbox-actors/tests/cluster/job.py"
POOL = {"pool": "cluster-test", "namespace": "sandbox_actors_cluster_test"}


def log(line: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {line}", flush=True)


# ── the overlay (fast; no cluster) ──────────────────────────────────────────


def test_overlay_changes_only_what_cannot_run_here(tmp_path):
    base = yaml.safe_load(CLUSTER_YAML.read_text())
    extra = overlay(
        cluster_name="sandbox-actors-test-x", head_ip="10.1.0.2", worker_ips=["10.1.0.3", "10.1.0.4"],
        ssh_key=tmp_path / "key", wheelhouse=tmp_path / "wheels", pip_conf=tmp_path / "pip.conf",
    )
    merged = merge(base, extra)
    # The overlay sets these leaves and no others (README names each).
    assert sorted(overlay_paths(extra)) == sorted([
        ("cluster_name",), ("provider", "head_ip"), ("provider", "worker_ips"), ("auth", "ssh_user"),
        ("auth", "ssh_private_key"), ("file_mounts", launcher.WHEELHOUSE), ("file_mounts", "/etc/pip.conf"),
    ])
    # Everything else of cluster.yaml is there as written: setup, start commands, the token copy.
    for key, value in base.items():
        if key not in extra:
            assert merged[key] == value, key
    assert merged["provider"]["type"] == base["provider"]["type"]
    assert all(merged["file_mounts"][k] == v for k, v in base["file_mounts"].items())
    assert "~/.ray/auth_token" in merged["file_mounts"]


# ── the scenario ────────────────────────────────────────────────────────────


class Scenario:
    """One run: nodes, `ray up`, jobs, node loss, `ray down`, teardown."""

    def __init__(self) -> None:
        self.out: dict[str, Any] = {"timings": {}, "errors": []}
        self.t = self.out["timings"]
        self.logs = CACHE / "last-run"
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="sa-cluster-"))
        self.nodes: NodeCluster | None = None
        self.cli: RayCli | None = None
        self.forward: launcher.DashboardForward | None = None
        self.cluster_name = ""
        self.launched = False
        self.launch_started = 0.0  # wall clock: jobs on the nodes report wall-clock times

    # helpers

    def job(self, name: str, phase: str, args: dict[str, Any], *, on: Node | None = None,
            timeout: float = 600) -> dict[str, Any]:
        """Submit a phase of tests/cluster/job.py with `ray job submit` (on the head, or on the
        node ``on`` through its ``node:<ip>`` resource), wait for it, return its result line."""
        assert self.cli is not None
        submission_id = f"{name}-{os.urandom(3).hex()}"
        entrypoint = [NODE_PYTHON, JOB, phase, json.dumps({**POOL, **args})]
        resources = {f"node:{on.ip}": 0.01} if on is not None else None
        started = time.monotonic()
        address = self.ensure_forward()
        try:
            self.cli.submit(submission_id, address, entrypoint, resources=resources)
        except LaunchError:
            address = self.ensure_forward()
            try:
                job_state(address, self.cli.token(), submission_id)
            except JobGone:  # the submission never arrived: submit again
                self.cli.submit(submission_id, address, entrypoint, resources=resources)
        status, logs = "PENDING", ""
        while status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            if time.monotonic() - started > timeout:
                raise LaunchError(f"job {name} still {status} after {timeout:.0f}s:\n{logs[-3000:]}")
            try:
                status, logs = job_state(address, self.cli.token(), submission_id)
            except (OSError, httpx.HTTPError) as exc:
                address = self.ensure_forward(lost=exc)
                continue
            time.sleep(1)
        (self.logs / f"job-{name}.log").write_text(logs)
        self.t[f"job_{name}"] = round(time.monotonic() - started, 1)
        result = job_result(logs)
        if status != "SUCCEEDED" or result is None:
            raise LaunchError(f"job {name} {status} ({submission_id}):\n{logs[-4000:]}")
        return result

    def ensure_forward(self, lost: BaseException | None = None) -> str:
        """The local address of the head's dashboard, forwarded by `ray dashboard`; a forward that
        stopped answering is recorded (with what the head's sshd and dashboard said) and made again."""
        assert self.cli is not None and self.nodes is not None
        if self.forward is not None and lost is None and self.forward.process.poll() is None and self.forward.answers():
            return self.forward.address
        if self.forward is not None:
            self.forward.stop()
            restarts = self.out.setdefault("dashboard_forward_restarts", [])
            restarts.append(f"{time.strftime('%H:%M:%S')} {type(lost).__name__ if lost else 'not answering'}: {lost}")
            head = self.nodes.head
            (self.logs / f"forward-lost-{len(restarts)}.txt").write_text(
                f"--- head's sshd\n{self.nodes.logs(head, 30)}\n"
                f"--- head's dashboard\n{self.nodes.file_in(head, '/tmp/ray/session_latest/logs/dashboard.log', 40)}"
            )
            log(f"dashboard forward lost ({restarts[-1]}); forwarding again")
        self.forward = self.cli.forward_dashboard(attempt=len(self.out.get("dashboard_forward_restarts", [])) + 1)
        return self.forward.address

    def node_of(self, node_id: str, workers: list[dict[str, Any]]) -> Node:
        assert self.nodes is not None
        ip = next(w["ip"] for w in workers if w["node_id"] == node_id)
        return self.nodes.node_by_ip(ip)

    def head_diagnostics(self) -> str:
        """What the head's autoscaler said (worker setup runs there), for failure messages."""
        if self.nodes is None or not self.nodes.nodes or not self.nodes.running(self.nodes.head):
            return "(no running head)"
        head = self.nodes.head
        return "\n".join(
            f"--- {path}\n{self.nodes.file_in(head, path)}"
            for path in ("/tmp/ray/session_latest/logs/monitor.out", "/tmp/ray/session_latest/logs/monitor.log")
        )

    def wait_for_workers(self, timeout: float) -> None:
        """Until the head's autoscaler has set every worker up (it runs their setup over SSH)."""
        assert self.nodes is not None
        state = f"/tmp/ray/cluster-{self.cluster_name}.state"
        deadline = time.monotonic() + timeout
        statuses: dict[str, str] = {}
        while time.monotonic() < deadline:
            raw = self.nodes.run_in(self.nodes.head, f"cat {state} 2>/dev/null || true").stdout
            try:
                records = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError:
                records = {}  # caught mid-write
            statuses = {
                ip: r.get("tags", {}).get("ray-node-status", "?")
                for ip, r in records.items() if ip != self.nodes.head.ip
            }
            if any(s == "update-failed" for s in statuses.values()):
                raise LaunchError(f"a worker's setup failed: {statuses}\n{self.head_diagnostics()}")
            if len(statuses) == len(self.nodes.worker_nodes) and all(s == "up-to-date" for s in statuses.values()):
                return
            time.sleep(2)
        raise LaunchError(f"workers not set up within {timeout:.0f}s: {statuses}\n{self.head_diagnostics()}")

    # the run

    def run(self) -> dict[str, Any]:
        begun = time.monotonic()
        try:
            self.prepare()
            self.launch()
            self.use()
        except BaseException as exc:
            self.out["errors"].append("".join(traceback.format_exception(exc)))
            raise
        finally:
            try:
                self.take_down()
            except BaseException as exc:  # noqa: BLE001 - recorded and re-raised below
                self.out["errors"].append("teardown: " + "".join(traceback.format_exception(exc)))
            self.t["total"] = round(time.monotonic() - begun, 1)
            (self.logs / "report.json").write_text(json.dumps(self.out, indent=2, default=str))
            log(f"timings (s): {json.dumps(self.t)}")
            log(f"report and logs: {self.logs}")
        if self.out["errors"]:
            raise AssertionError("\n".join(self.out["errors"]))
        return self.out

    def prepare(self) -> None:
        swept = sweep_stale_runs()
        self.out["swept_from_earlier_runs"] = swept
        image = build_node_image(progress=log)
        self.t["node_image"] = round(image.seconds, 1)
        self.t["node_image_rootfs"] = round(image.base_seconds, 1)
        self.out["node_image_reused"] = image.reused
        started = time.monotonic()
        wheels = launcher.wheelhouse(CACHE, progress=log)
        self.t["wheelhouse"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        self.nodes = NodeCluster(image.tag, self.workdir)
        self.cluster_name = f"sandbox-actors-test-{self.nodes.run_id}"
        self.nodes.start()
        self.t["nodes_start"] = round(time.monotonic() - started, 1)
        self.out["nodes"] = {n.name: {"role": n.role, "ip": n.ip} for n in self.nodes.nodes}
        log(f"nodes: {self.out['nodes']}")

        pip_conf = self.workdir / "pip.conf"
        pip_conf.write_text(launcher.pip_conf_text())
        extra = overlay(
            cluster_name=self.cluster_name, head_ip=self.nodes.head.ip,
            worker_ips=[n.ip for n in self.nodes.worker_nodes], ssh_key=self.nodes.key,
            wheelhouse=wheels, pip_conf=pip_conf,
        )
        config = self.workdir / "cluster.yaml"
        config.write_text(yaml.safe_dump(merge(yaml.safe_load(CLUSTER_YAML.read_text()), extra), sort_keys=False))
        shutil.copy(config, self.logs / "cluster-merged.yaml")
        home = self.workdir / "home"
        home.mkdir()
        self.cli = RayCli(config=config, home=home, logs=self.logs)
        self.cli.generate_token()

    def launch(self) -> None:
        assert self.cli is not None and self.nodes is not None
        log("ray up ...")
        started = time.monotonic()
        self.launch_started = time.time()
        self.launched = True
        self.cli.up()
        self.t["ray_up"] = round(time.monotonic() - started, 1)
        log(f"ray up returned after {self.t['ray_up']}s; waiting for the workers")
        self.wait_for_workers(timeout=900)
        self.t["workers_up_since_ray_up"] = round(time.monotonic() - started, 1)
        log(f"workers set up {self.t['workers_up_since_ray_up']}s after ray up began")
        self.ensure_forward()

    def use(self) -> None:
        assert self.nodes is not None and self.cli is not None
        out = self.out
        nodes = self.nodes

        # 1. A job on the head acquires a sandbox for every slot the workers have, then one more.
        place = self.job("place", "place", {"workers": 2})
        out["place"] = place
        first, burst = place["results"][0], place["results"][1:]
        if "answered_at" in first:
            self.t["first_sandbox_since_ray_up"] = round(first["answered_at"] - self.launch_started, 1)
            self.t["first_sandbox_acquire"] = round(first["answered_at"] - place["started_at"], 1)
        answered = [r["answered_at"] for r in burst if "answered_at" in r]
        if answered:
            self.t["burst_all_answered"] = round(max(answered) - place["burst_started_at"], 1)
        workers = place["workers"]
        out["workers"] = workers
        # What each worker's own engine holds, seen from inside the node.
        pool_label = f"sandbox-actors.pool={POOL['pool']}"
        out["inner_after_place"] = {n.name: nodes.inner_containers(n, pool_label) for n in nodes.nodes}

        # `ray status` on the head, what `ray up` suggests next, sees both workers' slots.
        ray_status = self.cli.exec("ray-status", "ray status")
        out["ray_status_slots"] = re.findall(r"([\d.]+)/([\d.]+) sandbox_slots", ray_status)

        # 2. Keep two threads per worker, with a note in each workspace.
        placed = [r for r in place["results"] if "node_id" in r]
        keep: list[str] = []
        for worker in workers:
            keep += sorted(r["thread"] for r in placed if r["node_id"] == worker["node_id"])[:2]
        kept = self.job("keep", "keep", {"keep": keep})
        out["kept"] = kept
        by_thread = {r["thread_id"]: r for r in kept["rows"]}

        # 3. `sandbox-actors status` on the head lists every node's sandboxes.
        status = self.cli.exec(
            "status", f"sandbox-actors status --json --pool {POOL['pool']} --namespace {POOL['namespace']}",
        )
        out["status"] = json_block(status)

        # 4. A job on the other worker gets the same sandbox for a thread of the first worker.
        victim_id = workers[0]["node_id"]
        victim = self.node_of(victim_id, workers)
        survivor = self.node_of(workers[1]["node_id"], workers)
        lost = sorted(t for t in keep if by_thread[t]["node_id"] == victim_id)
        out["victim"] = {"node_id": victim_id, "name": victim.name, "threads": lost}
        out["survivor"] = {"node_id": workers[1]["node_id"], "name": survivor.name}
        same = self.job("same", "same", {"thread": lost[0]}, on=survivor)
        out["same"] = {**same, "expected": by_thread[lost[0]]}

        # 5. Node loss: the victim worker dies at once (SIGKILL to the whole container).
        killed_at = time.time()
        nodes.kill(victim)
        log(f"killed {victim.name}; recovering {lost}")
        recover = self.job("recover", "recover", {"threads": lost, "victim": victim_id, "timeout": 300})
        out["recover"] = recover
        recovered = [a["answered_at"] for a in recover["after"].values() if "answered_at" in a]
        if recovered:
            self.t["node_loss_recovery"] = round(max(recovered) - killed_at, 1)
        out["inner_after_recover"] = {
            n.name: nodes.inner_containers(n, pool_label) for n in nodes.nodes if n is not victim
        }

        # 6. Shut the pool down; then the live nodes' engines hold no container at all.
        out["shutdown"] = self.job("shutdown", "shutdown", {})
        out["inner_after_shutdown"] = {n.name: nodes.inner_containers(n) for n in nodes.nodes if nodes.running(n)}

    def step(self, name: str, action: Any) -> Any:
        """One teardown step: a failure is recorded (and fails the run) but the next step runs."""
        started = time.monotonic()
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - every step must run; the error is reported
            self.out["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            return None
        finally:
            self.t[name] = round(time.monotonic() - started, 1)

    def after_ray_down(self) -> dict[str, Any]:
        """What `ray down` left running on each live node: Ray processes, engine containers."""
        assert self.nodes is not None
        seen = {}
        for node in self.nodes.nodes:
            if not self.nodes.running(node):
                continue
            ray = self.nodes.run_in(
                node, "ps -eo pid=,args= | cut -c1-160 | grep -E '[r]aylet|[g]cs_server|[m]onitor[.]py' || true",
                check=False,
            )
            engine = self.nodes.run_in(node, "docker ps --all --format '{{.Names}}'", check=False)
            containers = engine.stdout.split() if engine.returncode == 0 else [f"(engine: {engine.stderr.strip()})"]
            seen[node.name] = {"ray_processes": ray.stdout.splitlines(), "containers": containers}
        return seen

    def take_down(self) -> None:
        if self.forward is not None:
            self.step("dashboard_forward_stop", self.forward.stop)
        cli, nodes = self.cli, self.nodes
        if self.launched and cli is not None:
            tail = self.step("ray_down", cli.down)
            self.out["ray_down_output_tail"] = (tail or "")[-1500:]
            if nodes is not None:
                self.out["after_ray_down"] = self.step("after_ray_down_check", self.after_ray_down)
        if nodes is not None:
            self.out["left_after_teardown"] = self.step("teardown", nodes.teardown)
            self.out["left_with_run_label"] = leftovers(f"{RUN_LABEL}={nodes.run_id}")
        if self.cluster_name:
            # What the launcher keeps on this machine for this cluster (our cluster name only): its
            # state, and the directory of its SSH control sockets.
            for suffix in ("state", "lock"):
                Path(f"/tmp/ray/cluster-{self.cluster_name}.{suffix}").unlink(missing_ok=True)
            control = launcher.ssh_control_dir(self.cluster_name)
            shutil.rmtree(control, ignore_errors=True)
            with contextlib.suppress(OSError):
                control.parent.rmdir()  # only when no other cluster's directory is left in it
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def observed() -> dict[str, Any]:
    return Scenario().run()


# ── what the run must show ──────────────────────────────────────────────────


@pytest.mark.slow
def test_ray_up_sets_up_a_head_and_two_sandbox_workers(observed):
    workers = observed["workers"]
    assert len(workers) == 2 and all(w["slots"] > 0 for w in workers)
    assert observed["place"]["pool_node"] == observed["place"]["driver_node"]  # the pool is on the head
    assert observed["place"]["driver_node"] not in {w["node_id"] for w in workers}


@pytest.mark.slow
def test_ray_status_on_the_head_sees_every_workers_slots(observed):
    totals = {float(total) for _, total in observed["ray_status_slots"]}
    assert totals == {sum(w["slots"] for w in observed["workers"])}, observed["ray_status_slots"]


@pytest.mark.slow
def test_sandboxes_land_on_workers_only_in_their_own_engines_capped_by_slots(observed):
    place, workers = observed["place"], observed["workers"]
    placed = [r for r in place["results"] if "node_id" in r]
    failed = [r for r in place["results"] if "error" in r]
    counts = Counter(r["node_id"] for r in placed)
    assert not failed, failed
    assert set(counts) == {w["node_id"] for w in workers}  # never the head
    assert all(counts[w["node_id"]] == w["slots"] for w in workers), counts  # every slot, once
    beyond = place["beyond"]  # then no worker has room: a typed, retryable error, no hang
    assert (beyond.get("error"), beyond.get("retryable")) == ("PoolExhausted", True), beyond
    assert 4 < beyond["waited"] < 30
    inner = observed["inner_after_place"]
    ip_of = {w["node_id"]: w["ip"] for w in workers}
    name_of = {v["ip"]: k for k, v in observed["nodes"].items()}
    for r in placed:  # each sandbox's container is in its own worker's engine
        assert r["container"] in inner[name_of[ip_of[r["node_id"]]]], r
    head = next(k for k, v in observed["nodes"].items() if v["role"] == "head")
    assert inner[head] == []
    assert sum(len(v) for v in inner.values()) == len(placed)


@pytest.mark.slow
def test_a_job_on_the_other_worker_gets_the_same_sandbox(observed):
    same = observed["same"]
    expected = same["expected"]
    assert same["driver_node"] == observed["survivor"]["node_id"] != expected["node_id"]
    assert same["sandbox_id"] == expected["sandbox_id"] and same["node_id"] == expected["node_id"]
    assert same["path"] == "hot"
    assert same["note"] == f"{expected['thread_id']} was here"  # written by the job on the head


@pytest.mark.slow
def test_sandbox_actors_status_lists_every_nodes_sandboxes(observed):
    rows = observed["status"]["sandboxes"]
    kept = {r["sandbox_id"]: r["node_id"] for r in observed["kept"]["rows"]}
    assert {r["sandbox_id"]: r["node_id"] for r in rows} == kept
    assert {r["node_id"] for r in rows} == {w["node_id"] for w in observed["workers"]}


@pytest.mark.slow
def test_node_loss_brings_threads_back_on_the_other_worker_with_their_workspace(observed):
    victim, survivor = observed["victim"], observed["survivor"]
    after = observed["recover"]["after"]
    assert victim["threads"] and set(after) == set(victim["threads"])
    for thread, seen in after.items():
        assert "error" not in seen, seen
        assert seen["node_id"] == survivor["node_id"]
        assert seen["exec"] == "alive"
        assert seen["note"] == f"{thread} was here"  # the shared base_dir kept the workspace
        assert seen["tmp_state"] == "gone"  # a new container: the old one died with its node
    # Exactly one container per thread in the survivor's engine: the two it had, the two moved.
    inner = observed["inner_after_recover"][survivor["name"]]
    ids = {r["sandbox_id"] for r in observed["kept"]["rows"]}
    assert sorted(sum(c.endswith(i) for c in inner) for i in ids) == [1] * len(ids), inner


@pytest.mark.slow
def test_ray_down_stops_ray_on_the_head(observed):
    head = next(k for k, v in observed["nodes"].items() if v["role"] == "head")
    assert observed["after_ray_down"][head]["ray_processes"] == [], observed["after_ray_down"][head]


@pytest.mark.slow
def test_teardown_leaves_no_node_no_sandbox_no_network(observed):
    assert all(c == [] for c in observed["inner_after_shutdown"].values()), observed["inner_after_shutdown"]
    assert all(v["containers"] == [] for v in observed["after_ray_down"].values())
    assert observed["left_after_teardown"] == {"containers": [], "volumes": [], "networks": []}
    assert observed["left_with_run_label"] == {"containers": [], "volumes": [], "networks": []}
