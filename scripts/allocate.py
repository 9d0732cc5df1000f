"""rule allocate: THR.csv + the training sweep -> PLAN.json, its CSV and a Gantt chart
(aihpc.allocate.sweep)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.allocate.sweep import allocate_sweep, cluster_from_config, sweep_jobs
from aihpc.config import model_config, model_gpu_bounds
from aihpc.data import read_stats
from aihpc.stage import rule_log

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    config = {"train": snakemake.params.train, "models": snakemake.params.models}
    stats = read_stats(Path(snakemake.input.stats).parent)
    jobs = sweep_jobs(
        stats["counts"]["train"],
        [model_config(config, name) for name in config["models"]],
        {name: model_gpu_bounds(config, name) for name in config["models"]},
    )
    result = allocate_sweep(
        jobs,
        snakemake.input.throughput,
        cluster_from_config(snakemake.params.cluster),
        objective=snakemake.params.objective,
        solver=snakemake.params.solver,
        deadline_s=snakemake.params.deadline_s,
        budget_gpu_hours=snakemake.params.budget_gpu_hours,
        out_json=snakemake.output.plan,
        gantt=snakemake.output.gantt,
    )
    print(
        f"{result.status} {result.objective} plan ({result.schedule}): makespan "
        f"{result.makespan_s:.0f} s, {result.gpu_hours:.3f} GPU-hours"
    )
    for job in result.jobs:
        print(
            f"{job.name}: {job.config.gpus} x {job.config.gpu_type} on {job.config.nodes} "
            f"node(s), {job.start_s:.0f}-{job.end_s:.0f} s"
        )
