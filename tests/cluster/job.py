"""The agent job of the cluster test, run on the cluster by ``ray job submit``.

    python job.py PHASE '<json arguments>'

Its driver runs where Ray puts the job (the head by default; a worker when the submission asks
for that worker's ``node:<ip>`` resource) and attaches to the cluster Ray gives it. It uses
only this project and Ray, as a user's job would, and prints one line, ``CLUSTER-JOB-RESULT
{json}``, with what it saw; the test asserts on that. Times are wall-clock (``time.time()``):
the nodes share the host's clock, so the test can compare them with its own.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

import sandbox_actors

RESULT_MARK = "CLUSTER-JOB-RESULT "
WORKSPACE = "/mnt/user-data/workspace"
NOTE = f"{WORKSPACE}/note.txt"


def pool(args: dict[str, Any], **overrides: Any) -> sandbox_actors.PoolClient:
    """The test's pool: one slot per sandbox, thread directories on the workers' shared storage."""
    return sandbox_actors.connect({
        "pool_name": args["pool"],
        "namespace": args["namespace"],
        "ray": {"resources": {"sandbox_slots": 1}},
        "base_dir": "/mnt/sandbox-actors",
        "replicas": 32,
        "spare_actors": 0,  # no slot held by a spare: the per-worker count is sandboxes only
        # The default 60 s: the pool bounds the wait for an actor's placement by it, and a burst
        # of actors on a worker starts its Ray worker processes two at a time (as many as it has
        # CPUs), so 8 at once on a busy 2-core machine take well over 10 s to answer.
        "capacity_timeout": 60,
        "readiness_timeout": 120,  # many sandboxes start at once on a 2-core machine
        "reconcile_interval": 3,
        "limits": {"memory": "256m", "cpus": 0.5, "pids": 128},
        **overrides,
    })


def here() -> str:
    return ray.get_runtime_context().get_node_id()


def wait_for_workers(count: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        workers = [
            {"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "slots": n["Resources"].get("sandbox_slots", 0)}
            for n in ray.nodes() if n["Alive"] and n["Resources"].get("sandbox_slots", 0) > 0
        ]
        if len(workers) >= count or time.monotonic() > deadline:
            return workers
        time.sleep(0.5)


def phase_place(args: dict[str, Any]) -> dict[str, Any]:
    """A first sandbox alone, then sandboxes for every other slot at once; then one more sandbox,
    from a second pool, which finds no slot on any worker."""
    workers = wait_for_workers(args["workers"], timeout=120)
    threads = [f"agent-{i:02d}" for i in range(int(sum(w["slots"] for w in workers)))]
    client = pool(args)
    started = time.time()

    def one(thread: str) -> dict[str, Any]:
        try:
            box = client.acquire(thread)
            hostname = box.exec("hostname").output.strip()  # the sandbox answers
            return {"thread": thread, "sandbox_id": box.sandbox_id, "node_id": box.info["node_id"],
                    "container": box.info["container_name"], "hostname": hostname, "answered_at": time.time()}
        except sandbox_actors.SandboxError as exc:
            return {"thread": thread, "error": type(exc).__name__, "retryable": exc.retryable,
                    "message": str(exc)[:300], "failed_at": time.time()}

    first = one(threads[0])  # alone, on an idle cluster: the first sandbox's cold start
    burst_started = time.time()
    with ThreadPoolExecutor(len(threads) - 1) as executor:
        results = [first, *executor.map(one, threads[1:])]

    # Slots are the workers' Ray resources, whoever asks: a sandbox of another pool finds none.
    # (Its own short capacity_timeout: the main pool's 60 s would only make the test wait.)
    # A base_dir of its own too: a pool refuses one that a running pool uses.
    overflow = pool({**args, "pool": args["pool"] + "-overflow"}, capacity_timeout=5,
                    base_dir="/mnt/sandbox-actors/overflow")
    asked = time.time()
    try:
        box = overflow.acquire("one-too-many")
        beyond = {"node_id": box.info["node_id"]}
    except sandbox_actors.SandboxError as exc:
        beyond = {"error": type(exc).__name__, "retryable": exc.retryable, "waited": time.time() - asked}
    finally:
        beyond["shutdown"] = overflow.shutdown()
    return {
        "driver_node": here(),
        "pool_node": ray.get(client.pool.ping.remote()),
        "workers": workers,
        "started_at": started,
        "burst_started_at": burst_started,
        "results": results,
        "beyond": beyond,
        "rows": client.list(),
    }


def phase_keep(args: dict[str, Any]) -> dict[str, Any]:
    """Destroy every sandbox but the kept threads'; leave a note in each kept workspace and a
    marker in its container."""
    client = pool(args)
    for row in client.list():
        if row["thread_id"] not in args["keep"]:
            client.destroy(row["sandbox_id"])
    for thread in args["keep"]:
        box = client.acquire(thread)
        box.write_file(NOTE, f"{thread} was here")
        box.exec("echo in-container > /tmp/state.txt")
    return {"driver_node": here(), "rows": client.list()}


def phase_same(args: dict[str, Any]) -> dict[str, Any]:
    """From wherever this driver runs: the same sandbox for the same thread, files both ways."""
    client = pool(args)
    box = client.acquire(args["thread"])
    box.write_file(f"{WORKSPACE}/from-{here()[:8]}.txt", "hello from the other side")
    return {
        "driver_node": here(),
        "sandbox_id": box.sandbox_id,
        "node_id": box.info["node_id"],
        "container": box.info["container_name"],
        "path": box.path,
        "note": box.read_file(NOTE),
    }


def phase_recover(args: dict[str, Any]) -> dict[str, Any]:
    """After node loss: each lost thread comes back on a live worker, its workspace kept."""
    client = pool(args)
    deadline = time.monotonic() + args["timeout"]
    after: dict[str, Any] = {}
    for thread in args["threads"]:
        attempts, last_error = 0, None
        while time.monotonic() < deadline:
            attempts += 1
            try:
                box = client.acquire(thread)
                if box.info["node_id"] == args["victim"]:
                    # The pool has not heard of the loss yet: its record still names the dead node.
                    raise sandbox_actors.SandboxDied("still on the lost node")
                answer = box.exec("echo alive").output.strip()
            except sandbox_actors.SandboxError as exc:
                last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                time.sleep(0.5)
                continue
            after[thread] = {
                "node_id": box.info["node_id"],
                "answered_at": time.time(),
                "exec": answer,
                "note": box.read_file(NOTE),
                "tmp_state": box.bash("cat /tmp/state.txt 2>/dev/null || echo gone").stdout.strip(),
                "attempts": attempts,
            }
            break
        else:
            after[thread] = {"error": last_error, "attempts": attempts}
    return {"driver_node": here(), "after": after, "rows": client.list(), "stats": client.stats()}


def phase_shutdown(args: dict[str, Any]) -> dict[str, Any]:
    client = pool(args)
    return {"driver_node": here(), "shutdown": client.shutdown()}


PHASES = {
    "place": phase_place,
    "keep": phase_keep,
    "same": phase_same,
    "recover": phase_recover,
    "shutdown": phase_shutdown,
}


def main() -> None:
    phase, args = sys.argv[1], json.loads(sys.argv[2])
    ray.init()  # the cluster this job was submitted to (Ray sets RAY_ADDRESS for the driver)
    result = PHASES[phase](args)
    print(RESULT_MARK + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
