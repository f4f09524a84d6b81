"""Multi-node scenarios on one machine: a head and two worker nodes via ray.cluster_utils.Cluster.

Run by tests/test_multinode.py in a process of its own (a process attaches to one Ray
cluster only). Prints one JSON object of observations; the test asserts on them.
All three Ray nodes share this machine's Docker engine: one reaper must act for it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time

import docker
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import sandbox_actors
from sandbox_actors.config import SandboxConfig
from sandbox_actors.threads import checkpoint_dir
from tests.conftest import wait_until

WORKSPACE = "/mnt/user-data/workspace"


class Driver:
    """A client living on one node, as an agent job would."""

    def acquire(self, pool_name: str, namespace: str, thread: str) -> dict:
        pool = sandbox_actors.connect(pool_name=pool_name, namespace=namespace)
        box = pool.acquire(thread)
        box.write_file(f"{WORKSPACE}/{ray.get_runtime_context().get_node_id()[:8]}.txt", "hello")
        return {"node": ray.get_runtime_context().get_node_id(), "sandbox_id": box.sandbox_id,
                "container": box.info["container_name"]}


# A process whose counter lives in memory (and is written to /tmp/n every 50 ms).
COUNTER = ("python3 -c \"import os, time\ni = 0\nwhile True:\n i += 1; open('/tmp/n.new', 'w').write(str(i));"
           " os.replace('/tmp/n.new', '/tmp/n'); time.sleep(0.05)\"")


def live_capable(engine: docker.DockerClient) -> bool:
    """gVisor's runsc registered and the engine in experimental mode (checkpoints)."""
    info = engine.info()
    return "runsc" in (info.get("Runtimes") or {}) and bool(info.get("ExperimentalBuild"))


def live_fork_across_nodes(image: str, base: str, worker_ids: list[str], containers) -> dict:
    """A live snapshot taken on one worker, forked on the other: the fork goes on from the
    snapshot's process (its counter), not from zero. A pool of its own (gVisor, no network: the
    only way gVisor runs here), shut down before the rest of the scenario."""
    config = SandboxConfig(
        image=image, pool_name="multinode-live", namespace="sandbox_actors_multinode", container_prefix="mnlive",
        base_dir=base, runtime="runsc", network={"egress": "none"}, replicas=4, spare_actors=0,
        ray={"resources": {"sandbox_slots": 1}}, limits={"memory": "1g", "cpus": 0.5, "pids": 512},
    )
    live = sandbox_actors.connect(config)
    out: dict = {}
    try:
        source = live.acquire("live-source")
        source.start(COUNTER)
        count = lambda box: int(box.exec("cat /tmp/n 2>/dev/null || echo 0").output.strip() or 0)  # noqa: E731
        wait_until(lambda: count(source) >= 20, timeout=30)
        at = count(source)
        snap = live.snapshot(source, "multinode-live", live=True)
        other = next(w for w in worker_ids if w != source.info["node_id"])
        fork = live.acquire("live-fork", snapshot=snap, node_id=other)
        first = count(fork)
        time.sleep(0.3)
        out = {"snapshot_node": snap.node_id, "source_node": source.info["node_id"], "fork_node": fork.info["node_id"],
               "forked_live": fork.info.get("forked_live"), "source_at_snapshot": at, "fork_first": first,
               "fork_later": count(fork), "source_later": count(source), "checkpoint_bytes": snap.checkpoint_bytes}
        for box in (fork, source):
            live.destroy(box)
        out["snapshot_removed"] = live.remove_snapshot(snap)
        out["checkpoint_left"] = os.path.exists(checkpoint_dir(base, "multinode-live"))
    finally:
        out["shutdown"] = live.shutdown()
        out["left_after_shutdown"] = len(containers.list(all=True, filters={"label": ["sandbox-actors.pool=multinode-live"]}))
    return out


def main(image: str) -> dict:
    out: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, resources={"sandbox_slots": 2}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.ERROR)
    engine = docker.from_env()
    base = tempfile.mkdtemp(prefix="sandbox-actors-multinode-")
    config = SandboxConfig(
        image=image, pool_name="multinode", namespace="sandbox_actors_multinode", container_prefix="multinode",
        base_dir=base, replicas=10, reconcile_interval=2, idle_check_interval=1, capacity_timeout=8,
        ray={"resources": {"sandbox_slots": 1}}, limits={"memory": "256m", "cpus": 0.5, "pids": 128},
        spare_actors=2,  # spares hold slots too: they give way to sandboxes when nodes are full
    )
    head_id = ray.get_runtime_context().get_node_id()
    worker_ids = [w.node_id for w in workers]
    out["head"], out["workers"] = head_id, worker_ids

    def containers(thread=None):
        labels = ["sandbox-actors.pool=multinode"]
        found = engine.containers.list(all=True, filters={"label": labels})
        return [c for c in found if thread is None or c.labels["sandbox-actors.sandbox-id"] == pool.sandbox_id(thread)]

    if live_capable(engine):
        out["live_fork"] = live_fork_across_nodes(image, base, worker_ids, containers=engine.containers)
    pool = sandbox_actors.connect(config)
    try:
        out["pool_node"] = ray.get(pool.pool.ping.remote())

        # Snapshot and fork: a snapshot taken on one worker starts sandboxes on both (a node whose
        # engine lacks the image fetches it from the snapshot's engine; here the nodes share one).
        source = pool.acquire("snap-source")
        source.exec("echo prepared > /tmp/env.txt")
        snap = source.snapshot("multinode-env")
        started = time.monotonic()
        forks = list(pool.fork(snap, ["fork-1", "fork-2"]))
        out["fork"] = {"seconds": time.monotonic() - started, "snapshot_node": snap.node_id,
                       "nodes": sorted(f.info["node_id"] for f in forks),
                       "env": [f.read_file("/tmp/env.txt").strip() for f in forks]}
        for box in (source, *forks):
            pool.destroy(box)
        out["fork"]["removed"] = pool.remove_snapshot(snap)

        # Placement: 4 sandboxes fill both workers' 2 slots each; none lands on the head.
        boxes = {t: pool.acquire(t) for t in ("a", "b", "c", "d")}
        out["placement"] = {t: b.info["node_id"] for t, b in boxes.items()}

        # Capacity: a 5th waits, then fails typed...
        started = time.monotonic()
        try:
            pool.acquire("e")
            out["fifth"] = "acquired"
        except sandbox_actors.PoolExhausted as exc:
            out["fifth"] = {"error": type(exc).__name__, "retryable": exc.retryable,
                            "waited": time.monotonic() - started}
        # ...or succeeds when one is released within the deadline (the warm one is evicted).
        result: dict = {}
        def wait_for_e():
            try:
                result["box"] = pool.acquire("e")
            except sandbox_actors.SandboxError as exc:
                result["error"] = repr(exc)

        waiter = threading.Thread(target=wait_for_e)
        waiter.start()
        # The fifth waits for a node slot (its actor is not placed): only then is one released.
        out["fifth_waited"] = bool(wait_until(
            lambda: [r["state"] for r in pool.list() if r["thread_id"] == "e"] == ["starting"], timeout=10))
        pool.release(boxes["d"])
        waiter.join(60)
        out["fifth_after_release"] = result["box"].path if "box" in result else result.get("error")
        out["d_after_eviction"] = [r["state"] for r in pool.list() if r["thread_id"] == "d"]
        pool.destroy(boxes["c"])

        # Cross-node discovery: drivers on different nodes get the same sandbox.
        drivers = [
            ray.remote(Driver).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote()
            for node in worker_ids
        ]
        seen = ray.get([d.acquire.remote(config.pool_name, config.namespace, "shared") for d in drivers])
        out["cross_node"] = seen
        for d in drivers:
            ray.kill(d)

        # Node loss: keep "a" and "shared" only, so the surviving worker has room for what the
        # lost one held; then kill the worker node holding "a" (not gracefully).
        for row in pool.list():
            if row["thread_id"] not in ("a", "shared"):
                pool.destroy(row["sandbox_id"])
        victim_node = pool.acquire("a").info["node_id"]
        out["victim_node"] = victim_node
        # A sandbox that stays active on the lost node: "shared", when Ray put it there, else one
        # pinned there, and "shared" goes (the survivor's two slots must take what the lost node
        # held: the mover, and "a" when it resumes).
        if all(r["thread_id"] == "a" for r in pool.list() if r["node_id"] == victim_node):
            pool.destroy(pool.sandbox_id("shared"))
            pool.acquire("mover", node_id=victim_node)
        on_victim = sorted(r["thread_id"] for r in pool.list() if r["node_id"] == victim_node)
        out["threads_on_victim"] = on_victim
        for thread in on_victim:
            box = pool.acquire(thread)
            box.write_file(f"{WORKSPACE}/before-loss.txt", f"{thread} was here")
            box.exec("echo in-container > /tmp/state.txt")
        # "a" sleeps through the loss: its stopped container is on an engine the surviving
        # worker shares, so it resumes there (with an engine of its own, it would start afresh).
        pool.hibernate(pool.sandbox_id("a"))
        survivors_free = [r for r in pool.list() if r["node_id"] != victim_node]
        out["sandboxes_on_survivor_before"] = len(survivors_free)
        victim = next(w for w in workers if w.node_id == victim_node)
        cluster.remove_node(victim, allow_graceful=False)
        lost_at = time.monotonic()

        def moved():
            # Ray first declares the node dead (until then a process there can still answer, and
            # "a" would resume there when it was the only thread on it), then the pool moves the rest.
            if victim_node in {n["NodeID"] for n in ray.nodes() if n.get("Alive")}:
                return False
            rows = [r for r in pool.list() if r["thread_id"] in on_victim and r["thread_id"] != "a"]
            return len(rows) == len(on_victim) - 1 and all(r["node_id"] not in (None, victim_node) for r in rows)

        out["moved"] = bool(wait_until(moved, timeout=4 * config.reconcile_interval + 30, interval=0.25))
        out["recovered_after"] = time.monotonic() - lost_at
        after = {}
        for thread in on_victim:
            box = pool.acquire(thread)
            after[thread] = {
                "path": box.path,
                "node": box.info["node_id"],
                "workspace": box.read_file(f"{WORKSPACE}/before-loss.txt"),
                "exec": box.exec("echo alive").output.strip(),
                "tmp_state": box.bash("cat /tmp/state.txt 2>/dev/null || echo gone").stdout.strip(),
                "containers": len(containers(thread)),
            }
        out["after_loss"] = after
        out["containers_per_thread"] = {
            t: len(containers(t)) for t in {r["thread_id"] for r in pool.list()}
        }
        out["counters"] = pool.stats()["counters"]
    finally:
        out["shutdown"] = pool.shutdown()
        out["left_after_shutdown"] = len(containers())
        ray.shutdown()
        cluster.shutdown()
        engine.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
