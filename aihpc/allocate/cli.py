"""``aihpc allocate`` and ``aihpc fit``: the allocator's command-line subcommands."""

from __future__ import annotations

import argparse
import sys

from aihpc.allocate import MAX_GPUS_PER_JOB, ilp, read_cluster
from aihpc.allocate import model as tm
from aihpc.files import write_json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``allocate`` and ``fit`` subcommands to the ``aihpc`` parser."""
    p = sub.add_parser(
        "allocate",
        help="choose GPU configurations for a batch of jobs (integer program)",
        description="Choose one configuration (GPU type, nodes, GPUs) per job and schedule "
        "them. Exit status 0: a plan; 1: bad input; 3: no plan satisfies the constraints "
        "(the message names the jobs and constraints at fault).",
    )
    p.add_argument("--jobs", required=True, help="JOBS.csv: name,model,samples[,...]")
    p.add_argument("--throughput", required=True, help="THR.csv from 'aihpc fit'")
    p.add_argument("--cluster", required=True, help="CLUSTER.yaml: gpu_types: {...}")
    p.add_argument("--objective", choices=ilp.OBJECTIVES, default="makespan")
    p.add_argument("--deadline", type=float, help="every job ends by this many seconds")
    p.add_argument("--budget", type=float, help="at most this many GPU-hours in all")
    p.add_argument("--solver", choices=ilp.SOLVERS, default="cbc")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per solver call")
    p.add_argument("--gap", type=float, default=1e-4, help="relative optimality gap")
    p.add_argument("--max-gpus", type=int, default=MAX_GPUS_PER_JOB, help="GPUs per job cap")
    p.add_argument(
        "--shape",
        choices=ilp.SHAPES,
        default="auto",
        help="auto: one wave when the jobs fit side by side; list: always a list schedule",
    )
    p.add_argument("--out", required=True, help="PLAN.json (PLAN.csv is written next to it)")
    p.add_argument("--gantt", help="also draw the plan as a Gantt chart PNG")
    p.set_defaults(func=run_allocate)

    p = sub.add_parser(
        "fit",
        help="fit the throughput model to profiles and write THR.csv",
        description="Fit Pollux's throughput model per (model, GPU type) to profiled step "
        "times and predict every candidate configuration of the cluster.",
    )
    p.add_argument("--profiles", required=True, nargs="+", help="profile CSV(s)")
    p.add_argument("--cluster", required=True, help="CLUSTER.yaml")
    batch = p.add_mutually_exclusive_group(required=True)
    batch.add_argument("--local-batch", type=float, help="samples per GPU per step")
    batch.add_argument("--global-batch", type=float, help="samples per step over all GPUs")
    p.add_argument(
        "--accumulate",
        action="store_true",
        help="local batches above the largest profiled one run as gradient accumulation",
    )
    p.add_argument("--max-gpus", type=int, default=MAX_GPUS_PER_JOB, help="GPUs per job cap")
    p.add_argument("--out", required=True, help="THR.csv")
    p.add_argument("--params-out", help="also write the fitted parameters (JSON)")
    p.set_defaults(func=run_fit)


def run_allocate(args: argparse.Namespace) -> int:
    jobs = ilp.read_jobs(args.jobs)
    thr = ilp.read_throughput(args.throughput)
    cluster = read_cluster(args.cluster)
    result = ilp.plan(
        jobs,
        thr,
        cluster,
        args.objective,
        deadline=args.deadline,
        budget=args.budget,
        solver=args.solver,
        time_limit=args.time_limit,
        gap=args.gap,
        max_gpus=args.max_gpus,
        shape=args.shape,
    )
    csv_path = ilp.write_plan(result, args.out, args.gantt)
    print(
        f"{result.status} {result.objective} plan ({result.schedule}, {result.waves} wave(s)): "
        f"makespan {result.makespan_s:.0f} s, {result.gpu_hours:.2f} GPU-hours; "
        f"built in {result.build_seconds:.2f} s, solved in {result.solve_seconds:.2f} s "
        f"({result.solver}) -> {args.out}, {csv_path}"
    )
    return 0


def run_fit(args: argparse.Namespace) -> int:
    profiles = tm.read_profiles(args.profiles)
    cluster = read_cluster(args.cluster)
    fits, skipped = tm.fit_cluster(profiles, cluster, args.cluster)
    if skipped:
        print(f"not in the cluster, not fitted: {', '.join(skipped)}", file=sys.stderr)
    rows = tm.throughput_rows(
        fits,
        cluster,
        local_batch=args.local_batch,
        global_batch=args.global_batch,
        accumulate=args.accumulate,
        max_gpus=args.max_gpus,
    )
    tm.write_throughput(rows, args.out)
    if args.params_out:
        write_json(args.params_out, {"fits": [f.to_dict() for f in fits]})
    for f in fits:
        priors = f"; priors: {'; '.join(f.priors)}" if f.priors else ""
        print(
            f"{f.model} on {f.gpu_type}: {f.points} points, relative error median "
            f"{f.median_rel_error:.1%}, max {f.max_rel_error:.1%}{priors}"
        )
    print(f"{len(rows)} throughput rows -> {args.out}")
    return 0
