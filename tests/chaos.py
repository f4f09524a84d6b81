"""A bounded, seeded chaos run against a real pool.

    python -m tests.chaos --seed 7 --duration 60

Two driver processes do random acquire/exec/write/read/release/destroy on a
handful of threads while a third process SIGKILLs random SandboxActor workers
and ``docker kill``s random containers. Afterwards the run waits for
quiescence and checks the invariant: the pool's labelled containers, its live
SandboxActors and its records are the same set, and every file a driver was
told it wrote to a thread's mounted workspace is on the host. It prints counts
(operations, faults injected, errors by type, leaks found) and exits 0 only
when nothing leaked and nothing was lost.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

THREADS = [f"chaos-{i}" for i in range(6)]
WORKSPACE = "/mnt/user-data/workspace"
# What killing things underneath a driver may cause: a dead sandbox, or a start cut short.
EXPECTED_ERRORS = {"SandboxDied", "ActorGone", "SandboxExited", "SandboxStartError", "ReadinessTimeout"}


def driver(address: str, pool_name: str, namespace: str, seed: int, duration: float, name: str) -> None:
    """Random operations; prints one JSON line of counts and the files it wrote."""
    import ray

    import sandbox_actors

    ray.init(address=address, logging_level=logging.ERROR)
    pool = sandbox_actors.connect(pool_name=pool_name, namespace=namespace)
    rng = random.Random(seed)
    held: dict[str, object] = {}
    ops: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    written: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        thread = rng.choice(THREADS)
        op = rng.choice(["acquire", "exec", "exec", "write", "write", "read", "release", "destroy"])
        try:
            box = held.get(thread)
            if op == "acquire" or box is None:
                op = "acquire"
                held[thread] = pool.acquire(thread)
            elif op == "exec":
                result = box.exec("echo $((6 * 7))", timeout=30)
                assert result.output.strip() == "42", result
            elif op == "write":
                fname = f"{name}-{ops['write']}.txt"
                content = f"{name} {thread} {time.time()}\n"
                box.write_file(f"{WORKSPACE}/{fname}", content)
                written.append((thread, fname, content))
            elif op == "read" and written:
                mine = [w for w in written if w[0] == thread]
                if mine:
                    _, fname, content = rng.choice(mine)
                    assert box.read_file(f"{WORKSPACE}/{fname}") == content, "workspace file changed"
            elif op == "release":
                pool.release(held.pop(thread))
            elif op == "destroy":
                pool.destroy(held.pop(thread))
            ops[op] += 1
        except sandbox_actors.SandboxError as exc:
            errors[type(exc).__name__] += 1
            held.pop(thread, None)
        except AssertionError as exc:
            errors[f"AssertionError: {exc}"] += 1
    print(json.dumps({"ops": ops, "errors": errors, "written": written}))


def killer(address: str, pool_name: str, namespace: str, seed: int, duration: float) -> None:
    """Every 0.5-2 s: SIGKILL a random SandboxActor process, or docker-kill a random container."""
    import docker
    import ray

    ray.init(address=address, logging_level=logging.ERROR)
    client = docker.from_env()
    rng = random.Random(seed)
    faults: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.5, 2.0))
        if rng.random() < 0.5:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["namespace"] == namespace and a["name"].startswith("sbx-")]
            if not names:
                continue
            try:
                actor = ray.get_actor(rng.choice(names), namespace=namespace)
                pid = ray.get(actor.describe.remote(), timeout=5)["pid"]
                os.kill(pid, signal.SIGKILL)
                faults["actor_sigkill"] += 1
            except (ValueError, ray.exceptions.RayError, ProcessLookupError):
                continue
        else:
            running = pool_containers(client, pool_name)
            if not running:
                continue
            try:
                client.api.kill(rng.choice(running)["Id"])
                faults["container_kill"] += 1
            except docker.errors.APIError:
                continue
    client.close()
    print(json.dumps({"faults": faults}))


def pool_containers(client, pool_name: str, all: bool = False) -> list[dict]:
    """The engine's list summaries (one call: a container removed meanwhile cannot fail it,
    as the per-container inspect of ``containers.list`` can)."""
    return client.api.containers(all=all, filters={"label": f"sandbox-actors.pool={pool_name}"})


def snapshot(pool, client, namespace: str, pool_name: str) -> dict[str, set[str]]:
    from tests.invariant import sandboxes_served

    containers = {c["Labels"]["sandbox-actors.sandbox-id"] for c in pool_containers(client, pool_name, all=True)}
    running = {c["Labels"]["sandbox-actors.sandbox-id"] for c in pool_containers(client, pool_name)}
    live = sandboxes_served(pool_name, namespace)
    records = {row["sandbox_id"] for row in pool.list()}
    return {"containers": containers, "running": running, "actors": live, "records": records}


def consistent(view: dict[str, set[str]]) -> bool:
    return view["containers"] == view["running"] == view["actors"] == view["records"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos (the run adds ~30 s)")
    parser.add_argument("role", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role and args.role[0] == "driver":
        address, pool_name, namespace, seed, duration, name = args.role[1:]
        driver(address, pool_name, namespace, int(seed), float(duration), name)
        return 0
    if args.role and args.role[0] == "killer":
        address, pool_name, namespace, seed, duration = args.role[1:]
        killer(address, pool_name, namespace, int(seed), float(duration))
        return 0
    return run(args.seed, args.duration)


def run(seed: int, duration: float) -> int:
    import docker
    import ray

    import sandbox_actors
    from sandbox_actors.config import SandboxConfig
    from sandbox_actors.threads import thread_dir

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandbox-actors-chaos-") as base_dir:
        config = SandboxConfig(
            pool_name=f"chaos-{seed}", namespace="sandbox_actors_chaos", container_prefix=f"chaos-{seed}",
            base_dir=base_dir, replicas=4, reconcile_interval=2, idle_check_interval=1, readiness_timeout=30,
            limits={"memory": "256m", "cpus": 0.5, "pids": 128},
        )
        ray.init(address="local", logging_level=logging.ERROR, include_dashboard=False)
        client = docker.from_env()
        pool = None
        crashed: list[str] = []
        try:
            pool = sandbox_actors.connect(config)
            address = ray.get_runtime_context().gcs_address
            common = [address, config.pool_name, config.namespace]
            me = [sys.executable, "-m", "tests.chaos"]
            roles = [["driver", *common, str(seed * 10 + i), str(duration), f"d{i}"] for i in (1, 2)]
            roles.append(["killer", *common, str(seed), str(duration)])
            procs = [subprocess.Popen([*me, *role], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for role in roles]
            results = []
            for role, proc in zip(roles, procs):
                stdout, stderr = proc.communicate(timeout=duration + 300)
                lines = stdout.strip().splitlines()
                if proc.returncode != 0 or not lines:
                    crashed.append(f"{role[0]} exited {proc.returncode}: {stderr[-2000:]}")
                    results.append({})
                else:
                    results.append(json.loads(lines[-1]))
            ops = sum((collections.Counter(r.get("ops", {})) for r in results), collections.Counter())
            errors = sum((collections.Counter(r.get("errors", {})) for r in results), collections.Counter())
            faults = collections.Counter(results[-1].get("faults", {}))

            deadline = time.monotonic() + 4 * config.reconcile_interval + 30
            view = snapshot(pool, client, config.namespace, config.pool_name)
            while not consistent(view) and time.monotonic() < deadline:
                time.sleep(0.5)
                view = snapshot(pool, client, config.namespace, config.pool_name)
            leaks = len(view["containers"] ^ view["actors"]) + len(view["records"] ^ view["actors"])
            leaks += len(view["containers"] - view["running"])
            lost = [w for r in results[:2] for w in r.get("written", [])
                    if not (thread_dir(base_dir, w[0]) / "workspace" / w[1]).is_file()
                    or (thread_dir(base_dir, w[0]) / "workspace" / w[1]).read_text() != w[2]]
            unexpected = {k: v for k, v in errors.items() if k not in EXPECTED_ERRORS}
        finally:
            shut = pool.shutdown() if pool is not None else {}
            left = pool_containers(client, config.pool_name, all=True)
            for container in left:
                client.api.remove_container(container["Id"], force=True)
            client.close()
            ray.shutdown()
    print(f"chaos run: seed {seed}, {duration:.0f}s of chaos, {time.monotonic() - started:.0f}s in all")
    print(f"  operations: {sum(ops.values())} ({', '.join(f'{k} {v}' for k, v in sorted(ops.items()))})")
    print(f"  faults injected: {sum(faults.values())} ({', '.join(f'{k} {v}' for k, v in sorted(faults.items()))})")
    print(f"  errors by type: {dict(sorted(errors.items())) or 'none'}")
    print(f"  after quiescence: {len(view['records'])} sandboxes, containers = actors = records: {consistent(view)}")
    print(f"  workspace files written {sum(len(r['written']) for r in results[:2])}, lost {len(lost)}")
    print(f"  shutdown destroyed {shut.get('destroyed', 0)}, containers left {len(left)}")
    print(f"  leaks found = {leaks + len(left)}")
    for line in crashed:
        print(f"  CRASHED: {line}")
    ok = leaks == 0 and not left and not lost and not unexpected and not crashed and sum(faults.values()) > 0
    print("chaos run " + ("passed" if ok else f"FAILED (unexpected errors: {unexpected})"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
