"""The ``sandbox-actors`` command line.

Exit codes scripts can rely on:
  0 done; 1 an error (message on stderr); 2 bad usage, config or input;
  3 not found (no Ray cluster, no pool, no such sandbox); 4 no capacity (retry later).
  ``exec`` exits with the command's own code, 124 when it timed out, 125 when
  it could not run at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any

from .config import DEFAULT_IMAGE
from .console import filter_ray_warnings
from .errors import (
    CommandTimeout,
    ConfigError,
    InvalidRequest,
    PoolExhausted,
    SandboxError,
    SandboxFileNotFound,
    SandboxNotFound,
)

EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CAPACITY = 1, 2, 3, 4
EXIT_TIMEOUT, EXIT_CANNOT_RUN = 124, 125


class NotFound(SandboxNotFound):
    """The pool or sandbox named on the command line does not exist."""


def exit_code(exc: SandboxError) -> int:
    """The documented exit code for an error of ours."""
    if isinstance(exc, (ConfigError, InvalidRequest)):
        return EXIT_USAGE
    if isinstance(exc, (SandboxNotFound, SandboxFileNotFound)):
        return EXIT_NOT_FOUND
    if isinstance(exc, PoolExhausted):
        return EXIT_CAPACITY
    return EXIT_ERROR


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _config(args: argparse.Namespace) -> Any:
    from .config import load_config

    return load_config(args.config) if args.config else None


def _client(args: argparse.Namespace, create: bool = False) -> Any:
    """Attach to Ray and the pool; only ``create`` makes a pool that does not exist."""
    from . import localray, raycalls
    from .client import connect
    from .config import SandboxConfig

    config = _config(args)
    localray.attach(args.address)
    base = config or SandboxConfig()
    name = args.pool or base.pool_name
    namespace = args.namespace or base.namespace
    if not create and raycalls.get_actor(name, namespace) is None:
        raise NotFound(f"no pool {name!r} in namespace {namespace!r}; start one with `sandbox-actors up`")
    return connect(config, pool_name=args.pool, namespace=args.namespace)


# ── commands ────────────────────────────────────────────────────────────────


def cmd_up(args: argparse.Namespace) -> int:
    import ray

    from . import localray
    from .client import connect

    fresh = args.new_head and not localray.our_head()
    if fresh:
        localray.start_head()
    how = "started" if fresh else localray.attach(args.address, fallback="head")
    if fresh:
        localray.attach()
    client = connect(_config(args), pool_name=args.pool, namespace=args.namespace)
    node = ray.get(client.pool.ping.remote())
    address = ray.get_runtime_context().gcs_address
    info = {
        "ray_address": address,
        "ray": "started a local head (stop it with `sandbox-actors down`)" if how == "started" else "attached",
        "pool": client.config.pool_name,
        "namespace": client.config.namespace,
        "pool_node": node,
        "image": client.config.image,
    }
    if args.json:
        _print_json(info)
    else:
        print(f"Ray: {info['ray']} at {address}")
        print(f"pool {info['pool']!r} (namespace {info['namespace']!r}) runs on node {node[:16]}")
        print(f"image {info['image']}; try: sandbox-actors exec my-thread -- echo hello")
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    rows, stats = client.list(), client.stats()
    if args.json:
        _print_json({"sandboxes": rows, "stats": stats})
        return 0
    header = (f"{'SANDBOX':<24}  {'THREAD':<24}  {'STATE':<11}  {'NODE':<12}  {'AGE':>6}  {'IDLE':>6}  "
              f"{'INFLIGHT':>8}  {'ASLEEP':>6}")
    print(header)
    for row in sorted(rows, key=lambda r: (r["state"], r["age_s"])):
        thread = row["thread_id"] if row["thread_id"] is not None else "(anonymous)"
        thread = thread if len(thread) <= 24 else thread[:21] + "..."
        asleep = "-" if row.get("hibernated_s") is None else _age(row["hibernated_s"])
        print(
            f"{row['sandbox_id']:<24}  {thread!s:<24}  {row['state']:<11}  {(row['node_id'] or '-')[:12]:<12}  "
            f"{_age(row['age_s']):>6}  {_age(row['idle_s']):>6}  {row['inflight']:>8}  {asleep:>6}"
        )
    states = ", ".join(f"{state} {count}" for state, count in stats["states"].items())
    counters = stats["counters"]
    print(f"\npool {stats['pool']!r}: {stats['total']} sandbox(es) ({states}); replicas {stats['replicas']}, "
          f"max {stats['max_sandboxes'] or '-'}; created {counters.get('created', 0)}, "
          f"reclaimed {counters.get('reclaimed', 0)}, evicted {counters.get('evicted', 0)}, "
          f"reaped {counters.get('reaped', 0)}, failed {counters.get('failed', 0)}, "
          f"hibernated {counters.get('hibernated', 0)}, resumed {counters.get('resumed', 0)}")
    if "spare_target" in stats:
        print(f"spare actors: {stats['spare_actors']} waiting, {stats.get('spares_starting', 0)} starting, "
              f"{stats['spare_target']} wanted")
    print(isolation_line(stats.get("isolation") or {}))
    return 0


def isolation_line(isolation: dict[str, Any]) -> str:
    """One line saying what the pool's sandboxes can reach and how they run."""
    network = isolation.get("network")
    if not isinstance(network, dict):
        return f"isolation: network {network}; runtime {isolation.get('runtime')}"
    reach = {"open": "egress open", "allowlist": f"egress only to {', '.join(network['allow'])}",
             "none": "no network"}[network["egress"]]
    if network["egress"] != "none":
        reach += (", node, Docker gateways, 169.254.0.0/16" + "".join(f", {c}" for c in network["blocked"])
                  + " blocked") if network["enforced"] else ", NOTHING BLOCKED (network.enforce: false)"
    return (f"isolation: {reach}; runtime {isolation.get('runtime')}; commands as {isolation.get('user')}"
            + ("; read-only root filesystem" if isolation.get("read_only_rootfs") else ""))


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if not command:
        print("error: nothing to run; usage: sandbox-actors exec THREAD -- CMD...", file=sys.stderr)
        return EXIT_USAGE
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"error: --env takes NAME=VALUE, got {name!r}", file=sys.stderr)
            return EXIT_USAGE
        env[name] = value
    text = command[0] if len(command) == 1 else " ".join(shlex.quote(part) for part in command)
    try:
        client = _client(args, create=True)
        box = client.acquire(args.thread)
        # Output is printed as it comes; Ctrl-C ends the stream, which kills the command in
        # the sandbox (main() then exits 130).
        if args.shell:
            for item in box.stream(text, timeout=args.timeout):
                if isinstance(item, str):
                    _write(sys.stdout, item)
                else:
                    result = item
        else:
            for item in box.bash_stream(text, env=env or None, timeout=args.timeout):
                if isinstance(item, tuple):
                    _write(sys.stdout if item[0] == "stdout" else sys.stderr, item[1])
                else:
                    result = item
    except CommandTimeout as exc:
        sys.stdout.write(getattr(exc, "output", ""))
        print(f"\nerror: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exit_code(exc)
        return EXIT_CANNOT_RUN if code == EXIT_ERROR else code
    sys.stdout.flush()
    return result.exit_code if result.exit_code is not None else EXIT_ERROR


def _write(stream: Any, text: str) -> None:
    stream.write(text)
    stream.flush()


def cmd_cp(args: argparse.Namespace) -> int:
    """Copy a file in or out of a thread's sandbox: `cp LOCAL THREAD:PATH` or `cp THREAD:PATH LOCAL`."""
    source, target = args.source, args.target
    inbound = ":" in target and not os.path.exists(target)
    outbound = ":" in source and not os.path.exists(source)
    if inbound == outbound:
        print("error: give one side as THREAD:PATH (a path in that thread's sandbox) and the other as a "
              "local file; e.g. `sandbox-actors cp data.csv t1:/mnt/user-data/workspace/data.csv`", file=sys.stderr)
        return EXIT_USAGE
    thread, _, path = (target if inbound else source).partition(":")
    if not path:
        print("error: the sandbox side needs a path after THREAD:", file=sys.stderr)
        return EXIT_USAGE
    if inbound and not os.path.isfile(source):
        print(f"error: {source} is not a local file", file=sys.stderr)
        return EXIT_USAGE
    box = _client(args, create=True).acquire(thread)
    started = time.monotonic()
    size = box.upload(source, path) if inbound else box.download(path, target)
    seconds = time.monotonic() - started
    where = f"{thread}:{path}"
    print(f"copied {size} bytes {source if inbound else where} -> {where if inbound else target} "
          f"in {seconds:.1f}s ({size / max(seconds, 1e-6) / 1e6:.0f} MB/s)")
    return 0


def _named(args: argparse.Namespace) -> tuple[Any, str, str]:
    """The pool and the sandbox a command names: by its thread (THREAD), or by its id (--id).
    Returns the client, the sandbox id and how to call it in a message.

    Raises:
        InvalidRequest: neither or both were given (before anything is asked of Ray).
    """
    if (args.thread is None) == (args.id is None):
        raise InvalidRequest(f"name the sandbox by THREAD or by --id SANDBOX_ID (one of them), e.g. "
                             f"`sandbox-actors {args.command} my-thread`")
    client = _client(args)
    if args.id is not None:
        return client, args.id, f"sandbox {args.id}"
    return client, client.sandbox_id(args.thread), f"thread {args.thread!r}'s sandbox"


def cmd_release(args: argparse.Namespace) -> int:
    client, sandbox_id, what = _named(args)
    if not client.release(sandbox_id):
        raise NotFound(f"{what} is not active in pool {client.config.pool_name!r}")
    print(f"released {sandbox_id} (parked warm)")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    client, sandbox_id, what = _named(args)
    if not client.destroy(sandbox_id):
        raise NotFound(f"{what} does not exist in pool {client.config.pool_name!r}")
    print(f"destroyed {sandbox_id}")
    return 0


def cmd_hibernate(args: argparse.Namespace) -> int:
    client, sandbox_id, what = _named(args)
    if not client.hibernate(sandbox_id, live=args.live):
        raise NotFound(f"{what} is not running in pool {client.config.pool_name!r}")
    kept = "its files, processes and memory" if args.live else "its files"
    print(f"hibernated {sandbox_id} (container stopped with {kept}, actor ended; the next acquire resumes it)")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from . import watch

    client = _client(args)
    while True:
        rows = watch.usage_rows(client)
        if args.json:
            _print_json(rows)
            return 0
        table = watch.render_usage(rows, client.config.pool_name)
        if args.once:
            print(table)
            return 0
        print("\033[H\033[2J" + table, flush=True)  # the screen cleared, then the table
        time.sleep(args.interval)


def cmd_shell(args: argparse.Namespace) -> int:
    from . import shell

    client = _client(args)
    box = client.acquire(args.thread)
    return shell.run(box, attach=args.attach)


def cmd_audit(args: argparse.Namespace) -> int:
    from . import watch

    client = _client(args)
    if args.limit <= 0:
        raise InvalidRequest(f"--limit must be positive, not {args.limit}")
    entries = watch.audit_entries(client, args.thread, args.limit)
    if args.json:
        _print_json(entries)
    else:
        print(watch.render_audit(entries))
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    snaps = _client(args).snapshots()
    if args.json:
        _print_json([vars(s) for s in snaps])
        return 0
    if not snaps:
        print("no snapshots")
        return 0
    print(f"{'NAME':<32}  {'OF THREAD':<24}  {'SIZE':>9}  {'AGE':>6}  {'NODE':<12}  IMAGE")
    now = time.time()
    for snap in snaps:
        size = f"{(snap.size or 0) / 1e6:.1f} MB"
        print(f"{snap.name:<32}  {snap.thread_id or '(anonymous)':<24}  {size:>9}  {_age(now - snap.created):>6}  "
              f"{(snap.node_id or '-')[:12]:<12}  {snap.image}")
    return 0


def cmd_snapshot_rm(args: argparse.Namespace) -> int:
    client = _client(args)
    if not client.remove_snapshot(args.name):
        raise NotFound(f"no snapshot {args.name!r} in pool {client.config.pool_name!r}")
    print(f"removed snapshot {args.name}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from . import localray, orphans

    config = _config(args)
    # No cluster needed: the engine, this machine's processes and files say it all.
    found = orphans.find(base_dirs=[config.base_dir] if config is not None else [])
    result: dict[str, Any] = {**found, "removed": None if args.dry_run else orphans.remove(found)}
    if not (args.dead_clusters or args.dry_run):
        try:
            result["reconcile"] = _client(args).reconcile()
        except (localray.NoCluster, NotFound) as exc:
            result["reconcile"] = None
            result["note"] = f"no pool reconciled: {exc}"
    if args.json:
        _print_json(result)
        return 0
    left = found["containers"] + found["networks"] + found["checkpoints"]
    for item in found["containers"]:
        print(f"container {item['container']:<48} pool {item['pool']!r:<20} of dead cluster {item['cluster']}")
    for item in found["networks"]:
        print(f"network   {item['network']:<48} pool {item['pool']!r:<20} of dead cluster {item['cluster']}")
    for item in found["checkpoints"]:
        print(f"checkpoint {item['checkpoint']} ({item['bytes'] / 1e6:.1f} MB) of dead cluster {item['cluster'] or '?'}")
    if args.dry_run:
        print(f"dry run: {len(left)} thing(s) of dead clusters would be removed" if left else
              "nothing of a dead cluster on this machine")
    elif left:
        removed = result["removed"]
        print(f"removed {removed['containers']} container(s), {removed['networks']} network(s), "
              f"{removed['rules']} rule set(s), {removed['checkpoints']} checkpoint(s) of dead clusters")
    done = result.get("reconcile")
    if done is not None:
        print("reconcile: " + (", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(done.items())) or
                               "nothing to collect: every container has its actor and every actor its container"))
    elif "note" in result:
        print(result["note"])
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Shut the pool down; with the head `up` started, every pool on it (their sandboxes would
    outlive the head unowned otherwise), then the head."""
    import ray

    from . import localray, raycalls
    from .client import connect
    from .config import SandboxConfig

    config = _config(args) or SandboxConfig()
    name, namespace = args.pool or config.pool_name, args.namespace or config.namespace
    stopping_head = not args.keep_ray and localray.HEAD_FILE.exists()
    result: dict[str, Any] = {"pools": [], "destroyed": 0, "ray_head_stopped": False}
    say = (lambda text: None) if args.json else print
    try:
        localray.attach(args.address)
    except localray.NoCluster:
        pass
    if ray.is_initialized():
        targets = raycalls.pools() if stopping_head and localray.attached_to_our_head() else []
        targets = targets or ([(name, namespace)] if raycalls.get_actor(name, namespace) is not None else [])
        if not targets:
            say(f"no pool {name!r} running")
        for pool, space in targets:
            done = connect(pool_name=pool, namespace=space).shutdown()
            result["pools"].append({"pool": pool, "namespace": space, **done})
            result["destroyed"] += done.get("destroyed", 0)
            say(f"pool {pool!r} (namespace {space!r}) shut down: {done.get('destroyed', 0)} sandbox(es) destroyed")
        ray.shutdown()
    if stopping_head:
        stopped = localray.stop_head()
        result["ray_head_stopped"] = True
        say(f"stopped the local Ray head `up` started ({stopped} processes)")
    if args.json:
        _print_json(result)
    return 0


def cmd_operations(args: argparse.Namespace) -> int:
    """Each sandbox operation as declared (sandbox_actors/api.py) and the layers that serve it."""
    from . import layers

    text, whole = layers.table()
    print(text)
    print("\nevery layer serves every operation" if whole else "\nSOME LAYERS LACK OPERATIONS (see ✗ above)")
    return 0 if whole else EXIT_ERROR


def cmd_build_image(args: argparse.Namespace) -> int:
    from .image import build_image

    build_image(args.tag, force=args.force, progress=lambda line: print(line, flush=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import Demo

    return Demo(args.threads, args.turns, out=lambda line: print(line, flush=True)).run()


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import Bench, table

    samples, burst, rounds = (2, 3, 1) if args.tiny else (args.samples, args.burst, args.rounds)
    episodes, concurrency = (4, (2,)) if args.tiny else (args.rollouts, tuple(args.concurrency))
    if min(samples, burst, rounds, episodes, *concurrency) < 1 or args.scale < 0:
        raise InvalidRequest("bench: --samples, --burst, --rounds, --rollouts and each --concurrency must be at "
                             "least 1, --scale at least 0")
    results = Bench(samples, burst, out=lambda line: print(line, flush=True), scale=args.scale, rounds=rounds,
                    runtime=args.runtime, episodes=episodes, concurrency=concurrency,
                    only=tuple(args.only.split(",")) if args.only else ()).run()
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, sort_keys=True)
        print(f"\nwrote {args.json}")
    return 1 if results["failures"] else 0


# ── parser ──────────────────────────────────────────────────────────────────


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    common.add_argument("--pool", metavar="NAME", help="pool name (default: from config, 'sandbox-pool')")
    common.add_argument("--namespace", metavar="NS", help="Ray namespace (default: from config, 'sandbox_actors')")
    common.add_argument("--address", metavar="ADDR", help="Ray address (default: RAY_ADDRESS, `up`'s head, this machine's)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of text")
    top = argparse.ArgumentParser(
        prog="sandbox-actors",
        description="Isolated sandboxes for AI-agent threads, served as Ray actors.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 no capacity; exec: the command's code "
        "(124 timeout, 125 could not run).",
    )
    commands = _Commands(top.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    _sandbox_commands(commands, common, as_json)
    _pool_commands(commands, common, as_json)
    _tool_commands(commands)
    return top


class _Commands:
    """Adds subcommands, each with its help as its description and its function to run."""

    def __init__(self, subparsers: Any) -> None:
        self._subparsers = subparsers

    def add(self, name: str, func: Any, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = self._subparsers.add_parser(name, help=help_text, description=help_text,
                                                                   parents=list(parents))
        sub.set_defaults(run=func)
        return sub


def _pool_commands(commands: _Commands, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    commands.add("snapshots", cmd_snapshots, "list the pool's snapshots", common, as_json)
    snapshot = commands.add("snapshot", cmd_snapshot_rm, "manage snapshots (rm NAME)")
    snapshot_commands = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    snapshot_rm = snapshot_commands.add_parser("rm", help="remove a snapshot's image", parents=[common])
    snapshot_rm.add_argument("name", help="snapshot name (see `sandbox-actors snapshots`)")
    snapshot_rm.set_defaults(run=cmd_snapshot_rm)
    gc = commands.add("gc", cmd_gc, "remove what dead clusters left on this machine, and reconcile the running pool: "
                      "adopt, re-adopt or remove its orphans; print what changed", common, as_json)
    gc.add_argument("--dead-clusters", action="store_true",
                    help="only what clusters that no longer run here left (needs no Ray cluster)")
    gc.add_argument("--dry-run", action="store_true", help="list what dead clusters left; remove nothing")
    down = commands.add("down", cmd_down, "shut the pool down; stop the Ray head `up` started, shutting down every "
                        "pool on it first", common, as_json)
    down.add_argument("--keep-ray", action="store_true", help="leave the local Ray head running")


def _sandbox_commands(commands: _Commands, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    up = commands.add("up", cmd_up, "attach to (or start) Ray and get or create the pool", common, as_json)
    up.add_argument("--new-head", action="store_true", help="start a local Ray head of our own even if a cluster runs")
    commands.add("status", cmd_status, "list the pool's sandboxes and totals", common, as_json)
    run = commands.add("exec", cmd_exec, "run a command in a thread's sandbox (acquired if needed)", common)
    run.add_argument("thread", help="thread id")
    run.add_argument("cmd", nargs="*", help="the command and its arguments, after --")
    run.add_argument("--timeout", type=float, help="seconds before the command is killed")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment")
    run.add_argument("--shell", action="store_true", help="use the persistent shell (stderr merged)")
    cp = commands.add("cp", cmd_cp, "copy a file into or out of a thread's sandbox, in chunks (any size)", common)
    cp.add_argument("source", help="a local file, or THREAD:PATH")
    cp.add_argument("target", help="THREAD:PATH, or a local file")
    for name, func, help_text in (
        ("release", cmd_release, "park a sandbox in the warm pool"),
        ("destroy", cmd_destroy, "destroy a sandbox (its container and its actor)"),
        ("hibernate", cmd_hibernate, "stop a sandbox keeping its files; the thread's next acquire resumes it"),
    ):
        named = commands.add(name, func, f"{help_text}; name it by THREAD, or by --id SANDBOX_ID", common)
        named.add_argument("thread", nargs="?", help="the thread whose sandbox it is")
        named.add_argument("--id", metavar="SANDBOX_ID", help="the sandbox's id instead (see `status`)")
        if name == "hibernate":
            named.add_argument("--live", action="store_true",
                               help="keep its processes and memory too (gVisor pools: runtime runsc)")
    top = commands.add("top", cmd_top, "each sandbox's use, live: CPU, memory, disk, network, processes, commands "
                       "(Ctrl-C ends it)", common, as_json)
    top.add_argument("--once", action="store_true", help="print the table once")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    shell = commands.add("shell", cmd_shell, "an interactive terminal in a thread's sandbox (acquired if needed); "
                         "Ctrl-] detaches, --attach comes back", common)
    shell.add_argument("thread", help="thread id")
    shell.add_argument("--attach", metavar="TERMINAL_ID", help="come back to this terminal (its last 64 KB replayed)")
    audit = commands.add("audit", cmd_audit, "the commands run in a thread's sandbox, oldest first", common, as_json)
    audit.add_argument("thread", help="thread id")
    audit.add_argument("--limit", type=int, default=100, help="at most this many, the newest (default 100)")


def _concurrencies(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 8,16; got {text!r}") from None


def _tool_commands(commands: _Commands) -> None:
    commands.add("operations", cmd_operations,
                 "list each sandbox operation and the layers that serve it (1 if one lacks it)")
    build = commands.add("build-image", cmd_build_image, "build the minimal sandbox image locally (no registry)")
    build.add_argument("--tag", default=DEFAULT_IMAGE, help=f"image to produce (default {DEFAULT_IMAGE})")
    build.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    bench = commands.add("bench", cmd_bench,
                         "measure acquire paths, exec, bursts, rollouts and memory against the machine without us")
    bench.add_argument("--samples", type=int, default=10, help="samples per figure (default 10)")
    bench.add_argument("--burst", type=int, default=32, help="new threads started at once (default 32)")
    bench.add_argument("--rounds", type=int, default=3,
                       help="bursts measured, on each side; the median counts (default 3)")
    bench.add_argument("--scale", type=int, default=0, metavar="N", help="also hold N sandboxes at once (slow)")
    bench.add_argument("--runtime", metavar="NAME",
                       help="also measure cold start and exec under this Docker runtime, e.g. runsc (gVisor)")
    bench.add_argument("--rollouts", type=int, default=64, metavar="N",
                       help="RL rollout episodes at each concurrency (default 64)")
    bench.add_argument("--concurrency", type=_concurrencies, default=[8, 16], metavar="C[,C...]",
                       help="rollout episodes at once, one run per value (default 8,16)")
    bench.add_argument("--only", metavar="STAGE[,STAGE]", help="run only these stages (paths, prewarm, burst, "
                       "default, arrivals, lifecycle, fork, rollouts, scale, runtime)")
    bench.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    bench.add_argument("--tiny", action="store_true", help="2 samples, one burst of 3, 4 rollouts: a smoke run")
    demo = commands.add("demo", cmd_demo, "run agent threads against a private local pool and check everything")
    demo.add_argument("--threads", type=int, default=4, help="concurrent agent threads (default 4)")
    demo.add_argument("--turns", type=int, default=3, help="turns per thread before the return visit (default 3)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "--" in argv:  # everything after the first -- is the sandbox command, verbatim
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = parser().parse_args(argv)
    if command is not None:
        if getattr(args, "cmd", None) is None:
            parser().error("'--' is only for `exec THREAD -- CMD...`")
        args.cmd = [*args.cmd, *command]
    started = time.monotonic()
    filter_ray_warnings()
    try:
        return args.run(args)
    except SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {time.monotonic() - started:.1f}s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
