"""What a bench run's figures say: each targeted figure's ratio to its clean floor, the targets
met or not, and the table ``sandbox-actors bench`` prints.

``clean_ratio`` is always "ours over the floor's", lower is better: p50 over the clean floor's
p50 for single figures (cold, resume), wall over the clean floor burst's wall for bursts, p95
over the clean floor's p50 for arrivals, and for rollouts the floor's rate over ours (so 1/0.85,
about 1.18, is "85% of the floor's rate").

Where the run measured it, a target carries ``ray_alone``: the same measure taken of Ray alone,
with no code of ours (the clean floor burst beside idle trivial Ray actors, an exec through a
trivial async actor, a trivial actor's USS). A bound below it cannot be met by any design that
keeps a Ray actor per sandbox.
"""

from __future__ import annotations

import statistics
from typing import Any

# figure -> (its stage, the floor it is held to, the most its clean_ratio may be)
RATIO_TARGETS: dict[str, tuple[str, str, float]] = {
    "cold": ("paths", "single", 1.05),
    "resume": ("lifecycle", "single", 1.0),
    "burst": ("burst", "burst", 1.10),
    "burst_repeat": ("default", "burst", 1.15),
    "fork_burst": ("fork", "burst", 1.15),
    "arrivals_2": ("arrivals", "single", 2.0),
    "live_resume": ("live", "single", 1.0),  # a live resume, to gVisor's cold start
    "live_fork_burst": ("live", "burst", 1.0),  # live forks, to gVisor's bare burst
}
ROLLOUT_TARGET = 1 / 0.85  # ours at least 85% of the floor's rate
ABSOLUTE_TARGETS_MS = {"warm": 3.0, "hot": 3.0, "cross_process": 3.0, "prewarmed": 50.0}
EXEC_OVER_DIRECT_MS = 1.5
ACTOR_USS_MB = 45.0
TIME_KEYS = ["floor", "cold", "warm", "hot", "prewarmed", "cross_process", "exec_actor", "exec_direct",
             "exec_ray_alone", "hibernate",
             "resume", "snapshot", "live_hibernate", "live_resume"]


def _clean_floor(results: dict[str, Any], stage: str, kind: str) -> float | None:
    """The median of a stage's clean floors: ms for single starts, seconds for bursts."""
    floors = results.get("clean_floors", {}).get(stage, {})
    values = floors.get("single_s" if kind == "single" else "burst_s") or []
    if not values:
        return None
    median = statistics.median(values)
    return round(median * 1000, 2) if kind == "single" else round(median, 3)


def judge(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Put ``clean_floor`` and ``clean_ratio`` into each targeted figure (and each rollouts row);
    return every target with its value and whether the run met it."""
    targets = []
    for figure, (stage, kind, bound) in RATIO_TARGETS.items():
        row = _figure(results, figure)
        floor = _clean_floor(results, stage, kind)
        if row is None or not floor:
            continue
        value = row["p95"] if figure.startswith("arrivals") else row["p50"] if kind == "single" else row["wall_s"]
        row["clean_floor"], row["clean_ratio"] = floor, round(value / floor, 3)
        alone = results.get(f"ray_alone_{figure}")
        if alone is not None:
            alone["clean_floor"], alone["clean_ratio"] = floor, round(alone["wall_s"] / floor, 3)
        targets.append(_target(figure, "clean_ratio", row["clean_ratio"], bound,
                               None if alone is None else alone["clean_ratio"]))
    floors = results.get("clean_floors", {}).get("rollouts", {}).get("rollout_per_s", {})
    for row in results.get("rollouts", []):
        rates = floors.get(str(row["concurrency"])) or []
        if rates and row["per_s"]:
            row["floor_per_s"] = round(statistics.median(rates), 3)
            row["clean_ratio"] = round(row["floor_per_s"] / row["per_s"], 3)
            targets.append(_target(f"rollouts_{row['concurrency']}", "clean_ratio", row["clean_ratio"], ROLLOUT_TARGET))
    for figure, bound in ABSOLUTE_TARGETS_MS.items():
        if figure in results:
            targets.append(_target(figure, "p50 ms", results[figure]["p50"], bound))
    if "exec_actor" in results and "exec_direct" in results:
        over = round(results["exec_actor"]["p50"] - results["exec_direct"]["p50"], 2)
        results["exec_actor"]["over_direct_ms"] = over
        alone = results.get("exec_ray_alone", {}).get("p50")
        targets.append(_target("exec_actor", "p50 over direct, ms", over, EXEC_OVER_DIRECT_MS,
                               None if alone is None else round(alone - results["exec_direct"]["p50"], 2)))
    spare, trivial = results.get("spare_idle_cpu_ms_per_s"), results.get("trivial_actor_idle_cpu_ms_per_s")
    if spare is not None and trivial:
        targets.append(_target("spare_idle_cpu_ms_per_s", "ms of CPU per s", spare, trivial))
    if results.get("actor_uss_mb") is not None:
        targets.append(_target("actor_uss_mb", "MB", results["actor_uss_mb"], ACTOR_USS_MB,
                               results.get("trivial_actor_uss_mb")))
    return targets


def _figure(results: dict[str, Any], figure: str) -> dict[str, Any] | None:
    if figure.startswith("arrivals_"):
        rate = float(figure.removeprefix("arrivals_"))
        return next((row for row in results.get("arrivals", []) if row["rate"] == rate), None)
    row = results.get(figure)
    return row if isinstance(row, dict) else None


def _target(figure: str, measure: str, value: float, bound: float, ray_alone: float | None = None) -> dict[str, Any]:
    target = {"figure": figure, "measure": measure, "value": value, "at_most": round(bound, 3), "met": value <= bound}
    return target if ray_alone is None else {**target, "ray_alone": ray_alone}


def table(results: dict[str, Any]) -> str:
    """The figures as a table: timings, bursts, rollouts, idle cost and memory, then the targets
    and any failure."""
    return "\n".join(_time_lines(results) + _burst_lines(results) + _rollout_lines(results)
                     + _other_lines(results) + _target_lines(results))


def _ratio(row: dict[str, Any]) -> str:
    return f"{row['clean_ratio']:.2f}x" if "clean_ratio" in row else ""


def _time_lines(results: dict[str, Any]) -> list[str]:
    floor = results.get("floor", {}).get("p50") or 0
    lines = [f"{'figure':<16}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}{'p50/floor':>11}{'clean':>9}"]
    runtimes = sorted(key.removeprefix("floor_") for key in results
                      if key.startswith("floor_") and key != "floor_burst")
    keys = TIME_KEYS + [f"{key}_{runtime}" for runtime in runtimes for key in ("floor", "cold", "exec_actor",
                                                                              "exec_direct", "exec_ray_alone")]
    for key in keys:
        row = results.get(key)
        if not row:
            continue
        ratio = f"{row['p50'] / floor:.2f}x" if floor else "-"
        lines.append(f"{key:<16}{row['n']:>5}{row['p50']:>10.1f}{row['p95']:>10.1f}{row['max']:>10.1f}{ratio:>11}"
                     f"{_ratio(row):>9}".rstrip())
    return lines


def _burst_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for key in ("floor_burst", "ray_floor_burst", "ray_alone_burst", "burst", "burst_default", "burst_repeat",
                "fork_burst", "live_fork_burst"):
        row = results.get(key)
        if not row:
            continue
        walls = row.get("rounds_wall_s", [])
        over = f"median of {' '.join(f'{w:.2f}' for w in walls)}" if len(walls) > 1 else "1 round"
        if "trivial_actors" in row:
            over += f", beside {row['trivial_actors']} idle trivial Ray actors"
        clean = f"  {row['clean_ratio']:.2f}x of the clean floor burst ({row['clean_floor']:.2f}s)" \
            if "clean_ratio" in row else ""
        at_once = f"  {row['wall_s'] / row['at_once_s']:.2f}x of both floors at once ({row['at_once_s']:.2f}s)" \
            if row.get("at_once_s") else ""
        spares = f", spare actors {row['spare_actors']}" if "spare_actors" in row else ""
        lines.append(f"{key:<16}{row['n']:>5}  ok {row['ok']}/{row['n']}  wall {row['wall_s']:.2f}s{clean}{at_once} "
                     f"({over}{spares})")
        for r, each in enumerate(row.get("rounds", [])):
            lines.append(f"{'':<16}{'':>5}  round {r + 1}: {each['ok']}/{row['n']} ok in {each['wall_s']:.2f}s, "
                         f"per thread p50 {each['p50']:.0f} ms, p95 {each['p95']:.0f} ms, "
                         f"spare actors {each['spare_actors']}")
    return lines


def _rollout_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for row in results.get("rollouts", []):
        floor = f", floor {row['floor_per_s']:.2f}/s: {row['clean_ratio']:.2f}x" if "clean_ratio" in row else ""
        lines.append(f"{'rollouts x' + str(row['concurrency']):<16}{row['n']:>5}  ok {row['ok']}/{row['n']}  "
                     f"{row['per_s']:.2f}/s{floor}  acquire p50 {row['acquire_p50']:.0f} ms p95 "
                     f"{row['acquire_p95']:.0f} ms  exec p50 {row['exec_p50']:.1f} ms")
    return lines


def _other_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    floor = results.get("floor", {}).get("p50") or 0
    for row in results.get("arrivals", []):
        ratio = f"p95 {row['p95'] / floor:.2f}x floor p50" if floor else ""
        clean = f", {row['clean_ratio']:.2f}x clean" if "clean_ratio" in row else ""
        lines.append(f"{'arrivals ' + format(row['rate'], 'g') + '/s':<16}{row['count']:>5}  ok {row['ok']}/{row['count']}  "
                     f"p50 {row['p50']:.0f} ms  p95 {row['p95']:.0f} ms  max {row['max']:.0f} ms  {ratio}{clean} "
                     f"({row['wall_s']}s, spare actors {row['spare_actors']} at the end)")
    idle = results.get("spares_idle")
    if idle:
        lines.append(f"idle: {idle['n']} learned spares hold {idle['uss_mb']} MB USS in all; each uses "
                     f"{results.get('spare_idle_cpu_ms_per_s')} ms of CPU a second, a trivial Ray actor "
                     f"{results.get('trivial_actor_idle_cpu_ms_per_s')}")
    live = [f"{k} {results[k]}" for k in ("checkpoint_idle_mb", "checkpoint_200mb_mb", "live_hibernate_200mb_s",
                                          "live_resume_200mb_s") if results.get(k) is not None]
    if live:
        lines.append("live checkpoints: " + ", ".join(live))
    memory = [f"{k} {results[k]}" for k in ("actor_uss_mb", "actor_uss_mb_max", "trivial_actor_uss_mb", "container_mb",
                                            "pool_uss_mb",
                                            "pool_sandboxes", "hibernate_frees_mb", "snapshot_image_mb")
              if results.get(k) is not None]
    if memory:
        lines.append("memory (MB): " + ", ".join(memory))
    if results.get("scale"):
        s = results["scale"]
        lines.append(f"scale: {s['ok']}/{s['n']} sandboxes started, {s['still_ok']}/{s['n']} answering "
                     f"while all held, {s['wall_s']}s")
    return lines


def _target_lines(results: dict[str, Any]) -> list[str]:
    lines = ["", "targets:"]
    for target in results.get("targets", []):
        mark = "met" if target["met"] else "MISSED"
        alone = f"  (Ray alone: {target['ray_alone']})" if "ray_alone" in target else ""
        lines.append(f"  {target['figure']:<26}{target['measure']:<22}{target['value']:>9}  <= {target['at_most']:<8}"
                     f"{mark}{alone}")
    failures = results.get("failures") or []
    lines.append(f"failures: {len(failures)}" + "".join(f"\n  {failure}" for failure in failures))
    return lines
