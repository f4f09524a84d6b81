"""Agentic-RL rollouts on sandbox-actors, as a Ray job.

    python examples/rollouts.py --rollouts 64 --concurrency 16
    ray job submit -- python examples/rollouts.py --rollouts 64   # on a cluster

The driver prepares an environment once (a sandbox set up, then snapshotted), and runs N
rollouts as Ray tasks spread over the cluster (the tasks are in ``sandbox_actors/rollouts.py``,
which the bench runs too). Each rollout starts its own sandbox from the snapshot (``--cold``: from
the plain image), makes a few tool calls (writes a program, runs it, reads its result) and hands
its sandbox handle to a scoring task, which checks the answer and destroys the sandbox. At the end
it prints rollouts per second beside the floor's (the same episodes with no Ray, straight through
this machine's engine, measured first in the same run), the acquire and exec latency, the mean
score, and a leak check (no sandbox, container or snapshot of the run's pool is left).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import uuid
from typing import Any

import ray

import sandbox_actors
from sandbox_actors import rollouts
from sandbox_actors.console import filter_ray_warnings


def _percentiles(samples: list[float]) -> str:
    if not samples:
        return "no samples"
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000
    return f"p50 {pick(0.5):7.1f} ms  p95 {pick(0.95):7.1f} ms  max {ordered[-1] * 1000:7.1f} ms"


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"rollouts": args.rollouts, "concurrency": args.concurrency}
    if args.floor:
        report["floor"] = _floor(args)
    filter_ray_warnings()  # each sandbox's actor is a worker process: Ray warns of many starting at once
    local = {"include_dashboard": False} if not args.address else {}  # the dashboard costs CPU we need
    ray.init(address=args.address or "local", logging_level=logging.ERROR, namespace=args.namespace, **local)
    pool_name = args.pool or f"rollouts-{uuid.uuid4().hex[:8]}"
    base_dir = args.base_dir or tempfile.mkdtemp(prefix="sandbox-actors-rollouts-")
    pool = sandbox_actors.connect(_config(args, pool_name, base_dir))
    report["pool"] = pool_name
    try:
        snapshot = None
        if not args.cold:
            began = time.perf_counter()
            base = pool.acquire("prepare")  # the environment every rollout starts from
            base.exec(rollouts.PREPARE)
            snapshot = base.snapshot("rollout-env").name
            base.destroy()
            report["prepare_s"] = round(time.perf_counter() - began, 3)
            print(f"prepared the environment and snapshotted it in {report['prepare_s']:.2f}s", flush=True)
        if args.warmup:
            # Ray starts a worker process for each task running at once (~0.35 s of CPU each) and
            # the pool learns how many spare actors to keep: a job pays that once, up front.
            warm = rollouts.run(pool_name, args.namespace, args.warmup, args.concurrency, snapshot)
            settled = rollouts.settle(pool)
            print(f"warm-up: {warm['ok']}/{warm['n']} episodes in {warm['wall_s']:.2f}s"
                  + ("" if settled else " (the pool's spare actors were still starting after it)"), flush=True)
        step = max(1, args.rollouts // 8)
        got = rollouts.run(pool_name, args.namespace, args.rollouts, args.concurrency, snapshot,
                           progress=lambda done: print(f"  {done}/{args.rollouts} rollouts scored", flush=True)
                           if done % step == 0 or done == args.rollouts else None)
        episodes = got.pop("episodes")
        report.update(got, mean_score=sum(r["score"] for r in episodes) / max(1, len(episodes)),
                      from_snapshot=sum(1 for r in episodes if r["env"] == "prepared"))
        print(f"\n{args.rollouts} rollouts, {args.concurrency} at a time, in {got['wall_s']:.2f}s: "
              f"{got['per_s']} rollouts/s; mean score {report['mean_score']:.2f}; "
              f"{report['from_snapshot']} started from the snapshot" + (f"; {len(got['failures'])} failed"
                                                                         if got["failures"] else ""))
        if "floor" in report:
            floor = report["floor"]["per_s"]
            print(f"the same episodes with no Ray, straight through the engine: {floor} rollouts/s; "
                  f"this run made {got['per_s'] / floor:.2f}x of that rate" if floor else "")
        print(f"acquire  {_percentiles([r['acquire_s'] for r in episodes])}")
        print(f"exec     {_percentiles([s for r in episodes for s in r['exec_s']])}")
        if snapshot is not None:
            pool.remove_snapshot(snapshot)
    finally:
        left = pool.list()
        shut = pool.shutdown()
        ray.shutdown()
    leaks = _leaks(pool_name) if args.check_engine else {}
    report.update(left_in_pool=len(left), shutdown=shut, leaks=leaks)
    print(f"leak check: {len(left)} sandbox(es) left in the pool before shutdown; "
          + (f"after it: {leaks}" if leaks else "nothing of the pool left on this machine's engine"))
    return report


def _config(args: argparse.Namespace, pool_name: str, base_dir: str) -> dict[str, Any]:
    return {"pool_name": pool_name, "namespace": args.namespace, "base_dir": base_dir,
            "replicas": args.concurrency + 2, "container_prefix": pool_name, "spare_actors": args.concurrency,
            "thread_mounts": False}


def _floor(args: argparse.Namespace) -> dict[str, Any]:
    """The same episodes straight through this machine's engine, before any Ray runs: the rate
    the machine allows without us (the containers the run's pool starts, started from one process)."""
    from sandbox_actors.config import SandboxConfig
    from sandbox_actors.image import build_image

    with tempfile.TemporaryDirectory(prefix="sandbox-actors-rollouts-floor-") as base_dir:
        return _floor_in(args, SandboxConfig(**_config(args, "rollouts-floor", base_dir)),
                         build_image(progress=lambda line: None).tag)


def _floor_in(args: argparse.Namespace, config: Any, image: str) -> dict[str, Any]:
    floor = rollouts.Floor(image, "rollouts-floor", config)
    try:
        floor.prepare()
        got = floor.run(args.rollouts, args.concurrency)
    finally:
        floor.close()
    print(f"floor: {args.rollouts} episodes, {args.concurrency} at a time, with no Ray: {got['per_s']} rollouts/s",
          flush=True)
    return got


def _leaks(pool_name: str) -> dict[str, int]:
    """What of the pool is left on this machine's Docker engine (containers, snapshot images)."""
    import docker

    client = docker.from_env()
    try:
        labels = [f"sandbox-actors.pool={pool_name}"]
        found = {"containers": len(client.containers.list(all=True, filters={"label": labels})),
                 "images": len(client.images.list(filters={"label": labels + ["sandbox-actors.snapshot"]}))}
    finally:
        client.close()
    return {k: v for k, v in found.items() if v}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=64, help="episodes to run (default 64)")
    parser.add_argument("--concurrency", type=int, default=8, help="episodes at once (default 8)")
    parser.add_argument("--cold", action="store_true", help="start each rollout from the plain image, no snapshot")
    parser.add_argument("--warmup", type=int, help="episodes run first, not counted (default: --concurrency)")
    parser.add_argument("--address", help="Ray cluster (default: a local one)")
    parser.add_argument("--pool", help="pool name (default: a new one for this run)")
    parser.add_argument("--namespace", default="sandbox_actors_rollouts")
    parser.add_argument("--base-dir", help="pool base_dir (default: a temporary directory)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the floor (the same episodes with no Ray, through this machine's engine)")
    parser.add_argument("--no-engine-check", dest="check_engine", action="store_false",
                        help="skip the leak check on this machine's Docker engine (a remote cluster)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    if args.rollouts < 1 or args.concurrency < 1:
        parser.error("--rollouts and --concurrency must be at least 1")
    if args.warmup is None:
        args.warmup = args.concurrency
    elif args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    report = run(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    ok = report["mean_score"] == 1.0 and not report["failures"] and not report["leaks"] and report["left_in_pool"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
