"""A bounded, seeded chaos run against a real pool.

    python -m tests.chaos --seed 7 --duration 300

Two driver processes do random acquire/exec/write/read/release/destroy on a
handful of threads while a third process SIGKILLs random SandboxActor workers,
``docker kill``s random containers, kills the pool actor (Ray restarts it) and,
now and then, restarts the Docker engine itself. Afterwards the run waits for
quiescence and checks the invariant: the pool's labelled containers, its live
SandboxActors and its records are the same set, and every file a driver was
told it wrote to a thread's mounted workspace is on the host. It also counts
acquires whose first operation failed, and which of those no fault explains
(nothing killed that sandbox, its actor, the pool or the engine from a moment
before the acquire until the failure). It prints counts and exits 0 only when
nothing leaked, nothing was lost and every such failure is explained.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.engine import LocalEngine, shims_left

THREADS = [f"chaos-{i}" for i in range(6)]
OPERATIONS = ["acquire", "exec", "exec", "write", "write", "read", "release", "destroy", "hibernate", "snapshot"]
WORKSPACE = "/mnt/user-data/workspace"
# What killing things underneath a driver may cause: a dead sandbox, a start cut short, an
# engine away for a moment.
EXPECTED_ERRORS = {"SandboxDied", "ActorGone", "SandboxExited", "SandboxStartError", "ReadinessTimeout",
                   "BackendUnavailable", "SandboxNotFound"}
# How long before an acquire a fault may still explain its sandbox's first operation failing. Under
# this run's load a `docker kill` reached the pool as a death report 0.14 s after it began at the
# median and 1.2 s at the most (97 kills, seed 11); a kill is not a clean instant either.
NOTICE_SECONDS = 2.0
ENGINE_RESTART_EVERY = 90.0  # seconds between engine restarts, at most
# A driver or killer still running this long after its chaos ends is stuck: it prints every
# thread's stack (where it waits) and exits, and the run reports it as crashed.
STUCK_AFTER = 240.0


def driver(address: str, pool_name: str, namespace: str, seed: int, duration: float, name: str,
           live: bool = False) -> None:
    """Random operations (hibernations and snapshots ``live`` on a gVisor pool); prints one JSON
    line of counts and the files it wrote."""
    import ray

    import sandbox_actors

    ray.init(address=address, logging_level=logging.ERROR)
    pool = sandbox_actors.connect(pool_name=pool_name, namespace=namespace)
    rng = random.Random(seed)
    held: dict[str, object] = {}
    ops: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    written: list[tuple[str, str, str]] = []
    first: dict[str, tuple[float, str, str]] = {}  # thread -> (acquire began, sandbox id, actor): first op pending
    first_failed: list[tuple[float, float, str, str, str]] = []  # (acquire began, failed, sandbox, actor, error)
    ended: list[tuple[float, str, str]] = []  # sandboxes this driver released or destroyed: (when, what, which)
    unexpected: list[tuple] = []  # beyond the expected errors: (began, failed, sandbox, actor, message, seen)
    tried: collections.Counter[str] = collections.Counter()  # every operation begun, gone through or not
    tries = 0
    # A live run's reason to be is its checkpoints: under this many faults one snapshot in ten picks
    # went through 0-4 times a minute (seed 11), so it picks them three times as often and hibernations
    # twice (3-6 snapshots and 4-5 hibernations a minute then, in three runs).
    choices = OPERATIONS + ["snapshot", "snapshot", "hibernate"] if live else OPERATIONS
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        thread = rng.choice(THREADS)
        op = rng.choice(choices)
        began = time.time()
        pending = None
        try:
            box = held.get(thread)
            if op == "acquire" or box is None:
                op = "acquire"
                tried[op] += 1
                held[thread] = pool.acquire(thread)
                first[thread] = (began, held[thread].sandbox_id, held[thread].info.get("actor_name", ""))
                ops[op] += 1
                continue
            # A sandbox answers its first simple operation; a snapshot (it forks and destroys
            # another sandbox) or a hibernation is not such a probe of it.
            tried[op] += 1
            pending = first.pop(thread, None)
            if op not in ("exec", "write", "read"):
                pending = None
            if op == "exec":
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
            elif op == "release":  # parked warm for every driver: evictable under the other's feet
                released = held.pop(thread)
                ended.append((time.time(), "release", released.sandbox_id))
                pool.release(released)
            elif op == "destroy":  # gone for the other driver too, if it holds the thread
                doomed = held.pop(thread)
                ended.append((time.time(), "destroy", doomed.sandbox_id))
                pool.destroy(doomed)
            elif op == "hibernate":  # its actor ends: the other driver's handle is spent too
                sleeper = held.pop(thread)
                ended.append((time.time(), "hibernate", sleeper.sandbox_id))
                pool.hibernate(sleeper, live=live)
            elif op == "snapshot":  # a snapshot, one fork from it, both removed again
                tries += 1  # names never reused: a failed try may leave its snapshot for the shutdown
                snap = box.snapshot(f"{name}-{tries}", live=live)
                fork_thread = f"{name}-fork-{tries}"
                try:
                    for fork in pool.fork(snap, [fork_thread]):
                        assert fork.exec("echo forked").output.strip() == "forked"
                finally:
                    pool.destroy(pool.sandbox_id(fork_thread))
                    try:
                        pool.remove_snapshot(snap)
                    except sandbox_actors.InvalidRequest:
                        ops["snapshot_kept"] += 1  # its fork's destroy is still owed: shutdown removes it
            ops[op] += 1
        except sandbox_actors.SandboxError as exc:
            failed_at = time.time()
            errors[type(exc).__name__] += 1
            if type(exc).__name__ not in EXPECTED_ERRORS:  # with what happened around it, as for a failure below
                on = (box.sandbox_id, box.info.get("actor_name", "")) if box is not None else ("", "")
                unexpected.append((began, failed_at, *on, f"{op}: {type(exc).__name__}: {str(exc)[:300]}",
                                   seen_by(pool, on[0]) if on[0] else []))
            held.pop(thread, None)
            if pending is not None and isinstance(exc, (sandbox_actors.SandboxDied, sandbox_actors.BackendUnavailable)):
                first_failed.append((pending[0], failed_at, pending[1], pending[2],
                                     f"{type(exc).__name__} in {op}: {str(exc)[:300]}", seen_by(pool, pending[1])))
        except AssertionError as exc:
            errors[f"AssertionError: {exc}"] += 1
    print(json.dumps({"ops": ops, "tried": tried, "errors": errors, "written": written, "first_failed": first_failed,
                      "ended": ended, "unexpected": unexpected}))


def seen_by(pool, sandbox_id: str) -> list[dict]:  # noqa: ANN001
    """What the pool saw of a sandbox (its states and actors), for a failure to be read against."""
    import sandbox_actors

    try:
        return pool.history(sandbox_id)
    except sandbox_actors.SandboxError as gone:
        return [{"error": type(gone).__name__}]


def killer(address: str, pool_name: str, namespace: str, seed: int, duration: float) -> None:
    """Every 0.5-2 s: SIGKILL a random SandboxActor process, docker-kill a random container, or
    kill the pool; at most every ENGINE_RESTART_EVERY s, restart the Docker engine. Prints the
    faults with their times and targets (a sandbox id, or '*' for everything)."""
    import docker
    import ray

    ray.init(address=address, logging_level=logging.ERROR)
    client = docker.from_env()
    rng = random.Random(seed)
    faults: collections.Counter[str] = collections.Counter()
    when: list[tuple] = []  # (time, fault, its sandbox id, actor name or "*"[, until when])
    next_engine_restart = time.monotonic() + rng.uniform(20, ENGINE_RESTART_EVERY)
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.5, 2.0))
        if time.monotonic() > next_engine_restart and time.monotonic() < deadline - 20:
            began = time.time()
            client = restart_engine(client)
            when.append((began, "engine_restart", "*", time.time()))  # it lasts until the engine answers again
            faults["engine_restart"] += 1
            next_engine_restart = time.monotonic() + ENGINE_RESTART_EVERY
            continue
        dice = rng.random()
        if dice < 0.05:
            try:
                when.append((time.time(), "pool_kill", "*"))
                ray.kill(ray.get_actor(pool_name, namespace=namespace), no_restart=False)  # Ray restarts it
                faults["pool_kill"] += 1
            except (ValueError, ray.exceptions.RayError):
                continue
        elif dice < 0.5:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["namespace"] == namespace and a["name"].startswith("sbx-")]
            if not names:
                continue
            try:
                actor = ray.get_actor(rng.choice(names), namespace=namespace)
                info = ray.get(actor.describe.remote(), timeout=5)
                # By name: a spare (no sandbox yet) may be given one between this look and the kill.
                when.append((time.time(), "actor_sigkill", info["actor_name"]))
                os.kill(info["pid"], signal.SIGKILL)
                faults["actor_sigkill"] += 1
            except (ValueError, ray.exceptions.RayError, ProcessLookupError):
                continue
        else:
            try:
                running = pool_containers(client, pool_name)
                if not running:
                    continue
                victim = rng.choice(running)
                when.append((time.time(), "container_kill", victim["Labels"].get("sandbox-actors.sandbox-id", "-")))
                client.api.kill(victim["Id"])
                faults["container_kill"] += 1
            except docker.errors.DockerException:
                continue
    client.close()
    print(json.dumps({"faults": faults, "when": when}))


def restart_engine(client):  # noqa: ANN001, ANN201
    """Stop the local dockerd (its containers stop with it) and start it again as it was started."""
    engine = LocalEngine.find()
    if engine is None:
        raise RuntimeError("no local dockerd to restart")
    client.close()
    return engine.restart(Path(tempfile.gettempdir()) / "chaos-dockerd.log")


def unexplained(first_failed: list, when: list) -> list:  # noqa: ANN001
    """First operations that failed with nothing (a fault, a destroy, a release) on their sandbox,
    its actor or everything, from NOTICE_SECONDS before their acquire began until they failed (an
    engine restart lasts from its start until the engine answers again)."""
    def overlaps(failure, fault) -> bool:  # noqa: ANN001 - a fault is (began, kind, target[, ended])
        began, ended = fault[0], fault[3] if len(fault) > 3 else fault[0]
        return began <= failure[1] and ended >= failure[0] - NOTICE_SECONDS and fault[2] in ("*", failure[2], failure[3])

    return [failure for failure in first_failed if not any(overlaps(failure, fault) for fault in when)]


def last_fault_on(failure: list, when: list) -> str:
    """The last fault (or end) on a failure's sandbox, actor or everything before it failed: what a
    reader of an unexplained failure looks at first."""
    before = [f for f in when if f[0] <= failure[1] and f[2] in ("*", failure[2], failure[3])]
    if not before:
        return "nothing"
    last = max(before, key=lambda f: f[0])
    return f"{last[1]} of {last[2]} at the acquire {last[0] - failure[0]:+.2f}s"


def timeline(failure: list, when: list, around: float = 10.0, began_as: str = "acquire began",
             failed_as: str = "first operation failed") -> str:
    """Everything near an unexplained failure, in order: faults and ends on any target, pool kills
    and engine restarts within ``around`` seconds of its acquire and failure, and what the pool saw
    of its sandbox (each state and serving actor, from ``pool.history``)."""
    began, failed = failure[0], failure[1]
    lines = [(f[0], f"fault {f[1]} of {f[2]}" + (f" (until {f[3] - began:+.2f}s)" if len(f) > 3 else ""))
             for f in when if began - around <= f[0] <= failed + around]
    for seen in failure[5] if len(failure) > 5 else []:
        if "at" in seen:
            lines.append((seen["at"], f"pool: {seen['state']} (actor {seen['actor'] or '-'})"))
        else:
            lines.append((failed, f"pool history unavailable: {seen}"))
    lines += [(began, began_as), (failed, failed_as)]
    return "\n".join(f"      {at - began:+8.3f}s  {text}" for at, text in sorted(lines, key=lambda x: x[0]))


def pool_containers(client, pool_name: str, all: bool = False) -> list[dict]:
    """The engine's list summaries (one call: a container removed meanwhile cannot fail it,
    as the per-container inspect of ``containers.list`` can)."""
    return client.api.containers(all=all, filters={"label": f"sandbox-actors.pool={pool_name}"})


def snapshot(pool, client, namespace: str, pool_name: str) -> dict[str, set[str]]:
    from tests.invariant import sandboxes_served

    containers = {c["Labels"]["sandbox-actors.sandbox-id"] for c in pool_containers(client, pool_name, all=True)}
    running = {c["Labels"]["sandbox-actors.sandbox-id"] for c in pool_containers(client, pool_name)}
    live = sandboxes_served(pool_name, namespace)
    rows = pool.list()
    records = {row["sandbox_id"] for row in rows}
    asleep = {row["sandbox_id"] for row in rows if row["state"] == "hibernated"}
    return {"containers": containers, "running": running, "actors": live, "records": records, "asleep": asleep}


def consistent(view: dict[str, set[str]]) -> bool:
    """Every record has its container; a running one has its actor, a hibernated one a stopped
    container and no actor."""
    awake = view["records"] - view["asleep"]
    return (view["containers"] == view["records"] and view["running"] == view["actors"] == awake
            and view["containers"] - view["running"] == view["asleep"])


def snapshot_images(client, pool_name: str) -> list[str]:
    return [i["Id"] for i in client.api.images(filters={"label": [f"sandbox-actors.pool={pool_name}",
                                                                   "sandbox-actors.snapshot"]})]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of chaos (the run adds ~30 s)")
    parser.add_argument("--live", action="store_true",
                        help="a gVisor pool whose hibernations and snapshots are live (processes and memory)")
    parser.add_argument("role", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        faulthandler.dump_traceback_later(float(args.role[5]) + STUCK_AFTER, exit=True)
    if args.role and args.role[0] == "driver":
        address, pool_name, namespace, seed, duration, name, live = args.role[1:]
        driver(address, pool_name, namespace, int(seed), float(duration), name, live == "live")
        return 0
    if args.role and args.role[0] == "killer":
        address, pool_name, namespace, seed, duration = args.role[1:]
        killer(address, pool_name, namespace, int(seed), float(duration))
        return 0
    return run(args.seed, args.duration, args.live)


def run(seed: int, duration: float, live: bool = False) -> int:
    import docker
    import ray

    import sandbox_actors
    from sandbox_actors.config import SandboxConfig
    from sandbox_actors.threads import thread_dir

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandbox-actors-chaos-") as base_dir:
        kind = "live" if live else "plain"
        # gVisor runs here only without a network namespace; its own threads count toward the limits.
        gvisor = {"runtime": "runsc", "network": {"egress": "none"}, "limits": {"memory": "512m", "cpus": 0.5, "pids": 256}}
        config = SandboxConfig.model_validate({
            "pool_name": f"chaos-{seed}", "namespace": "sandbox_actors_chaos", "container_prefix": f"chaos-{seed}",
            "base_dir": base_dir, "replicas": 4, "reconcile_interval": 2, "idle_check_interval": 1,
            "readiness_timeout": 30, "limits": {"memory": "256m", "cpus": 0.5, "pids": 128}, **(gvisor if live else {}),
        })
        ray.init(address="local", logging_level=logging.ERROR, include_dashboard=False)
        client = docker.from_env()
        pool = None
        crashed: list[str] = []
        try:
            pool = sandbox_actors.connect(config)
            address = ray.get_runtime_context().gcs_address
            common = [address, config.pool_name, config.namespace]
            me = [sys.executable, "-m", "tests.chaos"]
            roles = [["driver", *common, str(seed * 10 + i), str(duration), f"d{i}", kind] for i in (1, 2)]
            roles.append(["killer", *common, str(seed), str(duration)])
            procs = [subprocess.Popen([*me, *role], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for role in roles]
            results = []
            for role, proc in zip(roles, procs):
                try:
                    stdout, stderr = proc.communicate(timeout=duration + STUCK_AFTER + 60)
                except subprocess.TimeoutExpired:  # its own watchdog did not end it either
                    proc.kill()
                    stdout, stderr = proc.communicate()
                    stderr += f"\n(killed: still running {STUCK_AFTER + 60:.0f}s after its chaos ended)"
                lines = stdout.strip().splitlines()
                if proc.returncode != 0 or not lines:
                    crashed.append(f"{role[0]} exited {proc.returncode}: {stderr[-2000:]}")
                    results.append({})
                else:
                    results.append(json.loads(lines[-1]))
            ops = sum((collections.Counter(r.get("ops", {})) for r in results), collections.Counter())
            tried = sum((collections.Counter(r.get("tried", {})) for r in results), collections.Counter())
            errors = sum((collections.Counter(r.get("errors", {})) for r in results), collections.Counter())
            faults = collections.Counter(results[-1].get("faults", {}))
            first_failed = [f for r in results[:2] for f in r.get("first_failed", [])]
            # What ended a sandbox on purpose explains a failure too: the other driver destroyed the
            # thread, or released it (parked warm for both) and the pool evicted it.
            ends = [e for r in results[:2] for e in r.get("ended", [])]
            faults_and_ends = results[-1].get("when", []) + ends
            unexplained_failures = unexplained(first_failed, faults_and_ends)

            deadline = time.monotonic() + 4 * config.reconcile_interval + 30
            view = snapshot(pool, client, config.namespace, config.pool_name)
            while not consistent(view) and time.monotonic() < deadline:
                time.sleep(0.5)
                view = snapshot(pool, client, config.namespace, config.pool_name)
            awake = view["records"] - view["asleep"]
            leaks = len(view["containers"] ^ view["records"]) + len(awake ^ view["actors"])
            leaks += len((view["containers"] - view["running"]) ^ view["asleep"])
            lost = [w for r in results[:2] for w in r.get("written", [])
                    if not (thread_dir(base_dir, w[0]) / "workspace" / w[1]).is_file()
                    or (thread_dir(base_dir, w[0]) / "workspace" / w[1]).read_text() != w[2]]
            unexpected = {k: v for k, v in errors.items() if k not in EXPECTED_ERRORS}
        finally:
            shut = pool.shutdown() if pool is not None else {}
            left = pool_containers(client, config.pool_name, all=True)
            for container in left:
                client.api.remove_container(container["Id"], force=True)
            images_left = snapshot_images(client, config.pool_name)
            for image in images_left:
                client.api.remove_image(image, force=True)
            networks_left = client.api.networks(filters={"label": f"sandbox-actors.pool={config.pool_name}"})
            # Live snapshots' checkpoints (kept under base_dir) go with their snapshots.
            checkpoints_left = sorted(str(p) for p in Path(base_dir, "checkpoints").glob("*"))
            client.close()
            ray.shutdown()
        shims = shims_left() if live else []
    print(f"chaos run: seed {seed}, {duration:.0f}s of chaos on a {'gVisor pool, live' if live else 'runc pool'}, "
          f"{time.monotonic() - started:.0f}s in all")
    print(f"  operations: {sum(ops.values())} ({', '.join(f'{k} {v}' for k, v in sorted(ops.items()))})")
    print(f"  operations begun: {sum(tried.values())} ({', '.join(f'{k} {v}' for k, v in sorted(tried.items()))})")
    print(f"  faults injected: {sum(faults.values())} ({', '.join(f'{k} {v}' for k, v in sorted(faults.items()))})")
    print(f"  errors by type: {dict(sorted(errors.items())) or 'none'}")
    print(f"  after quiescence: {len(view['records'])} sandboxes ({len(view['asleep'])} hibernated), "
          f"containers = actors = records: {consistent(view)}")
    print(f"  workspace files written {sum(len(r['written']) for r in results[:2])}, lost {len(lost)}")
    print(f"  acquires whose first operation failed: {len(first_failed)}, of which with no fault to explain it: "
          f"{len(unexplained_failures)}")
    for failure in unexplained_failures:
        print(f"    UNEXPLAINED: sandbox {failure[2]} (actor {failure[3]}) acquired at {failure[0]:.3f}, "
              f"{failure[4]} at {failure[1]:.3f}; before it: {last_fault_on(failure, faults_and_ends)}")
        print(timeline(failure, faults_and_ends))
    print(f"  shutdown destroyed {shut.get('destroyed', 0)}, containers left {len(left)}, snapshot images left "
          f"{len(images_left)}, networks left {len(networks_left)}, checkpoints left {len(checkpoints_left)}, "
          f"containerd shims left {len(shims)}")
    leaks += len(left) + len(images_left) + len(networks_left) + len(checkpoints_left) + len(shims)
    print(f"  leaks found = {leaks}")
    for line in crashed:
        print(f"  CRASHED: {line}")
    for failure in (u for r in results[:2] for u in r.get("unexpected", [])):
        print(f"  UNEXPECTED ERROR: {failure[4]} (sandbox {failure[2] or '-'}, actor {failure[3] or '-'})")
        print(timeline(failure, faults_and_ends, began_as="operation began", failed_as="it failed"))
    ok = (leaks == 0 and not lost and not unexpected and not crashed and sum(faults.values()) > 0
          and not unexplained_failures)
    print("chaos run " + ("passed" if ok else f"FAILED (unexpected errors: {unexpected})"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
