"""Throughput-model accuracy and plan quality of the GPU allocator on the shared research data.

    python bench/allocate_quality.py fit     # fit errors per model / GPU type
    python bench/allocate_quality.py plan [--workloads 1 2 ...] [--solver highs|cbc] [--scale 4]

``fit``: Pollux's model fitted per (model, GPU type) on ``scaling/<model>/placements-*.csv``
and ``scalability-*.csv``; relative throughput errors on the training points, on every 4th
(nodes, GPUs) configuration held out, and on the configurations with the largest GPU count
held out.

``plan``: each Philly workload (160 jobs) planned as one batch (objective makespan) on a
cluster of the data's GPU kinds (``--scale`` x 64 GPUs: T4 nodes of 4, V100, A100 and RTX
2080Ti nodes of 8), then executed by the simulator (list scheduling on the nodes, in the
plan's priority order). Makespan, mean run time and mean completion time against three
baselines (each job's own ``num_replicas``; equal share; Optimus-style greedy) and three
lower bounds: the LP relaxation of the GPU-time program, the largest target makespan whose
target program (with its valid inequalities) has an infeasible LP relaxation ("LP+cuts"),
and the bound the list-mode search proves (where the plan is one wave, a list-shaped plan
is made too, shown as "list plan").

Throughputs come from the fitted model at the job's own global batch size (each of k GPUs
gets batch/k samples, as gradient accumulation above the largest local batch profiled). A
job's samples are those its model needs at that batch size to come within 1 % of the final
validation metric of ``validation-<batch>.csv`` (the first epoch at least 99 % as good as
the last, in the direction the metric moves), times the batch size. The simulator runs jobs
at the same predicted throughputs, so the figures measure the allocation, not the model.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np

from aihpc.allocate import Cluster, Config, GpuType, candidate_configs
from aihpc.allocate import model as tm
from aihpc.allocate.ilp import Job, plan, relaxation_bound
from aihpc.allocate.simulate import (
    equal_share_policy,
    greedy_policy,
    plan_policy,
    rigid_policy,
    simulate,
    summarize,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def fit_table() -> None:
    print(
        f"{'model':12} {'gpu':8} {'points':>6} {'train med':>9} {'train max':>9} "
        f"{'every-4th':>9} {'largest-K':>9}  priors"
    )
    for model_dir in sorted((DATA / "scaling").iterdir()):
        for (model, gpu), profile in sorted(tm.read_scaling_data(model_dir).items()):
            fit = tm.fit(model, gpu, profile)
            every = tm.holdout_errors(profile, "every", 4)
            largest = tm.holdout_errors(profile, "largest")
            print(
                f"{model:12} {gpu:8} {fit.points:6d} {fit.median_rel_error:9.1%} "
                f"{fit.max_rel_error:9.1%} {np.median(every):9.1%} {np.median(largest):9.1%}"
                f"  {'; '.join(fit.priors)}"
            )


def samples_to_target(model: str, batch: int) -> float:
    """Samples to come within 1 % of the final metric of ``validation-<batch>.csv``."""
    with (DATA / "scaling" / model / f"validation-{batch}.csv").open() as handle:
        rows = [(float(r["iteration"]), float(r["metric"])) for r in csv.DictReader(handle)]
    final = rows[-1][1]
    sign = 1 if final >= rows[0][1] else -1  # accuracy rises, error rates and losses fall
    target = final - sign * 0.01 * abs(final)
    iteration = next(it for it, metric in rows if sign * (metric - target) >= 0)
    return iteration * batch


def cluster(scale: int) -> Cluster:
    """The data's four GPU kinds, ``scale`` x (4 T4 nodes of 4, 2 V100, 2 A100, 2 RTX of 8)."""
    shape = {"aws": (4, 4), "azure": (2, 8), "dgx": (2, 8), "rtx": (2, 8)}
    return Cluster({t: GpuType(t, n * scale, g) for t, (n, g) in shape.items()})


def fit_apps(apps: set[str], gpu_types: set[str]) -> dict[tuple[str, str], tm.FitResult]:
    fits = {}
    for app in sorted(apps):
        for (model, gpu), profile in tm.read_scaling_data(DATA / "scaling" / app).items():
            if gpu in gpu_types:
                fits[(model, gpu)] = tm.fit(model, gpu, profile)
    return fits


def run_workload(
    rows: list[dict[str, str]], fits: dict, pools: Cluster, solver: str
) -> dict[str, float]:
    """Makespans (s) and more of the plan, the baselines and the bounds for one workload."""
    samples = {r["name"]: samples_to_target(r["application"], int(r["batch_size"])) for r in rows}
    spec = {r["name"]: (r["application"], int(r["batch_size"])) for r in rows}

    def rate(app: str, batch: int, config: Config) -> float:
        f = fits[(app, config.gpu_type)]
        local = batch / config.gpus
        return float(tm.throughput(f.params, config.nodes, config.gpus, local, f.max_local_bsz))

    def duration(name: str, config: Config) -> float:
        return samples[name] / rate(*spec[name], config)

    jobs = [Job(n, f"{app}@{b}", samples[n]) for n, (app, b) in spec.items()]
    thr = {
        (f"{app}@{b}", c.gpu_type, c.nodes, c.gpus): rate(app, b, c)
        for app, b in set(spec.values())
        for t in pools.gpu_types.values()
        for c in candidate_configs(t)
    }
    t0 = time.perf_counter()
    result = plan(jobs, thr, pools, "makespan", solver=solver, time_limit=60)
    seconds = time.perf_counter() - t0
    chosen = {a.name: (a.config, duration(a.name, a.config)) for a in result.jobs}
    order = [a.name for a in sorted(result.jobs, key=lambda a: a.priority)]
    names = list(spec)
    requested = {r["name"]: int(r["num_replicas"]) for r in rows}
    out = {
        "ILP plan": summarize(simulate(pools, order, plan_policy(chosen))),
        "rigid": summarize(simulate(pools, names, rigid_policy(pools, requested, duration))),
        "equal share": summarize(simulate(pools, names, equal_share_policy(pools, duration))),
        "greedy": summarize(simulate(pools, names, greedy_policy(pools, duration))),
    }
    shape = result.schedule
    if result.makespan_lower_bound_s is None:  # one wave: bound every schedule, any shape
        staged = plan(jobs, thr, pools, "makespan", solver=solver, time_limit=60, shape="list")
        out["list plan"] = summarize(
            simulate(
                pools,
                [a.name for a in sorted(staged.jobs, key=lambda a: a.priority)],
                plan_policy({a.name: (a.config, duration(a.name, a.config)) for a in staged.jobs}),
            )
        )
        result = staged
    return {
        "outcomes": out,
        "seconds": seconds,
        "schedule": shape,
        "lp_bound": relaxation_bound(jobs, thr, pools, "makespan"),
        "cut_bound": relaxation_bound(jobs, thr, pools, "makespan", cuts=True),
        "proven_bound": result.makespan_lower_bound_s,
    }


def plan_table(workloads: list[int], solver: str, scale: int) -> None:
    pools = cluster(scale)
    tables = [
        list(csv.DictReader((DATA / "workloads" / "philly" / f"workload-{w}.csv").open()))
        for w in workloads
    ]
    apps = {r["application"] for rows in tables for r in rows}
    fits = fit_apps(apps, set(pools.gpu_types))
    print(f"cluster: {pools.gpus} GPUs ({pools.gpu_types}), solver {solver}")
    print(
        f"{'workload':8} {'policy':12} {'makespan h':>10} {'/ plan':>7} {'mean run h':>10} "
        f"{'mean JCT h':>10} {'GPU-h':>8}"
    )
    ratios: dict[str, list[float]] = {}
    for w, rows in zip(workloads, tables, strict=True):
        res = run_workload(rows, fits, pools, solver)
        base = res["outcomes"]["ILP plan"].makespan_s
        for policy, o in res["outcomes"].items():
            ratios.setdefault(policy, []).append(o.makespan_s / base)
            print(
                f"{w:8d} {policy:12} {o.makespan_s / 3600:10.3f} {o.makespan_s / base:7.3f} "
                f"{o.mean_duration_s / 3600:10.2f} {o.mean_completion_s / 3600:10.2f} "
                f"{o.gpu_hours:8.1f}"
            )
        for label, key in (
            ("LP bound", "lp_bound"),
            ("LP+cuts", "cut_bound"),
            ("proven bound", "proven_bound"),
        ):
            ratios.setdefault(label, []).append(res[key] / base)
            print(f"{w:8d} {label:12} {res[key] / 3600:10.3f} {res[key] / base:7.3f}")
        print(f"{w:8d} plan: {res['schedule']}, planned in {res['seconds']:.1f} s")
    print("geometric mean over the workloads of makespan / the plan's makespan:")
    for policy, values in ratios.items():
        print(f"  {policy:12} {math.exp(np.mean(np.log(values))):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("fit")
    p = sub.add_parser("plan")
    p.add_argument("--workloads", type=int, nargs="+", default=list(range(1, 9)))
    p.add_argument("--solver", choices=("cbc", "highs"), default="highs")
    p.add_argument("--scale", type=int, default=1, help="cluster size in units of 64 GPUs")
    args = parser.parse_args(argv)
    if not (DATA / "scaling").is_dir():
        print(f"shared data not found at {DATA}", file=sys.stderr)
        return 1
    if args.what == "fit":
        fit_table()
    else:
        plan_table(args.workloads, args.solver, args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
