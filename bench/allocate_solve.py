"""Solve time of the GPU allocator's integer program on synthetic batches of jobs.

    python bench/allocate_solve.py [--jobs 100 1000] [--gpus 64 512 2048] [--solvers cbc highs]
                                   [--objective makespan] [--time-limit 60]

Clusters mix four GPU types in the proportions of the Sia testbed (a quarter each: T4-like
nodes of 4 GPUs, three kinds of 8-GPU nodes, 1x/2x/3.5x/1.5x the speed). Eight models with
random Pollux parameters; jobs draw a model and a log-normal sample count (median 3e6, so a
job runs minutes to hours). Prints, per case and solver, the time to build the PuLP models
and the time inside the solver (summed over every program a plan solves), the plan shape
and makespan.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from aihpc.allocate import Cluster, GpuType, candidate_configs
from aihpc.allocate import model as tm
from aihpc.allocate.ilp import Job, plan

SPEED = {"t4": 1.0, "v100": 2.0, "a100": 3.5, "rtx": 1.5}


def make_cluster(gpus: int) -> Cluster:
    quarter = gpus // 4
    return Cluster(
        {
            "t4": GpuType("t4", quarter // 4, 4),
            "v100": GpuType("v100", quarter // 8, 8),
            "a100": GpuType("a100", quarter // 8, 8),
            "rtx": GpuType("rtx", quarter // 8, 8),
        }
    )


def make_instance(
    jobs: int, gpus: int, seed: int = 0
) -> tuple[list[Job], dict[tuple[str, str, int, int], float], Cluster]:
    """Random jobs and THR rows from random Pollux parameters (global batch 64 per GPU)."""
    rng = np.random.default_rng(seed)
    cluster = make_cluster(gpus)
    thr = {}
    models = [f"m{i}" for i in range(8)]
    for model in models:
        a_c, b_c = rng.uniform(0.01, 0.05), rng.uniform(1e-4, 1e-3)
        net = dict(
            alpha_r=rng.uniform(0.005, 0.05),
            beta_r=rng.uniform(1e-4, 5e-3),
            alpha_n=rng.uniform(0.05, 0.2),
            beta_n=rng.uniform(1e-3, 1e-2),
            gamma=rng.uniform(1, 3),
        )
        for name, pool in cluster.gpu_types.items():
            params = tm.PerfParams(alpha_c=a_c / SPEED[name], beta_c=b_c / SPEED[name], **net)
            for c in candidate_configs(pool):
                thr[(model, name, c.nodes, c.gpus)] = float(
                    tm.throughput(params, c.nodes, c.gpus, 64)
                )
    batch = [
        Job(f"j{i}", models[rng.integers(len(models))], float(rng.lognormal(np.log(3e6), 1.0)))
        for i in range(jobs)
    ]
    return batch, thr, cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--gpus", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--solvers", nargs="+", default=["cbc", "highs"])
    parser.add_argument("--objective", default="makespan")
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--gap", type=float, default=1e-4)
    args = parser.parse_args(argv)
    print(
        f"{'jobs':>5} {'GPUs':>5} {'solver':6} {'build s':>8} {'solve s':>8} {'total s':>8} "
        f"{'status':9} {'shape':9} {'makespan h':>10}"
    )
    for jobs in args.jobs:
        for gpus in args.gpus:
            batch, thr, cluster = make_instance(jobs, gpus)
            for solver in args.solvers:
                t0 = time.perf_counter()
                result = plan(
                    batch,
                    thr,
                    cluster,
                    args.objective,
                    solver=solver,
                    time_limit=args.time_limit,
                    gap=args.gap,
                )
                total = time.perf_counter() - t0
                print(
                    f"{jobs:5d} {gpus:5d} {solver:6} {result.build_seconds:8.3f} "
                    f"{result.solve_seconds:8.3f} {total:8.3f} {result.status:9} "
                    f"{result.schedule:9} {result.makespan_s / 3600:10.3f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
