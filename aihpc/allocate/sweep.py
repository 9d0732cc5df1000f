"""The allocator inside the workflow: fitting the profiles and planning the config's
training sweep.

Rules, in order: ``profile`` (:mod:`aihpc.allocate.profile`) -> ``fit_scaling``
(:func:`fit_scaling`) -> ``allocate`` (:func:`allocate_sweep`) -> ``train``, whose resource
and parameter functions read the plan with :mod:`aihpc.allocate.planned`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from aihpc.allocate import Cluster, GpuType, ilp
from aihpc.allocate import model as tm
from aihpc.config import ModelConfig
from aihpc.files import write_json

#: Seconds per solver call; a sweep's few jobs solve in well under a second.
SOLVER_TIME_LIMIT = 60.0


def cluster_from_config(spec: Mapping[str, Any]) -> Cluster:
    """The ``allocate.cluster`` section (already checked by the schema) as a Cluster."""
    return Cluster(
        {
            str(name): GpuType(str(name), pool["nodes"], pool["gpus_per_node"])
            for name, pool in spec["gpu_types"].items()
        }
    )


def fit_scaling(
    profile_csvs: Iterable[str | os.PathLike[str]],
    cluster: Cluster,
    local_batches: Mapping[str, int],
    *,
    multi_node: bool,
    out_csv: str | os.PathLike[str],
    params_json: str | os.PathLike[str],
) -> list[tm.FitResult]:
    """Fit the throughput model to the profiles; write THR.csv and the fitted parameters.

    Each model's throughputs are predicted at its own training batch size per GPU
    (``local_batches``: DDP gives every rank a full batch). Without ``multi_node`` (a Dask
    cluster that spans nodes, ``distributed.cluster: connect``) only one-node configurations
    get a throughput, so the plan never picks one the train job could not run.
    """
    fits, _ = tm.fit_cluster(tm.read_profiles(profile_csvs), cluster, "allocate.cluster")
    rows = [
        row
        for f in fits
        for row in tm.throughput_rows([f], cluster, local_batch=local_batches[f.model])
        if multi_node or row["nodes"] == 1
    ]
    tm.write_throughput(rows, out_csv)
    write_json(params_json, {"fits": [f.to_dict() for f in fits]})
    return fits


def samples_per_epoch(train_images: int, model_cfg: ModelConfig) -> int:
    """Training samples one epoch of ``model_cfg`` processes: the training split, or
    ``limit_train_batches`` batches of it (counted for one worker)."""
    limit = model_cfg.train.limit_train_batches
    if limit is None:
        return train_images
    return min(train_images, limit * model_cfg.train.batch_size)


def sweep_jobs(
    train_images: int,
    models: Iterable[ModelConfig],
    gpu_bounds: Mapping[str, tuple[int, int | None]],
) -> list[ilp.Job]:
    """One job per model of the sweep, named after it: epochs x samples per epoch, between
    the (min, max) GPUs of ``gpu_bounds`` (:func:`aihpc.config.model_gpu_bounds`)."""
    jobs = []
    for cfg in models:
        low, high = gpu_bounds[cfg.name]
        jobs.append(
            ilp.Job(
                name=cfg.name,
                model=cfg.name,
                samples=float(cfg.train.epochs * samples_per_epoch(train_images, cfg)),
                min_gpus=low,
                max_gpus=high,
            )
        )
    return jobs


def allocate_sweep(
    jobs: list[ilp.Job],
    throughput_csv: str | os.PathLike[str],
    cluster: Cluster,
    *,
    objective: str,
    solver: str,
    deadline_s: float | None,
    budget_gpu_hours: float | None,
    out_json: str | os.PathLike[str],
    gantt: str | os.PathLike[str],
) -> ilp.Plan:
    """Plan the sweep (:func:`aihpc.allocate.ilp.plan`); write PLAN.json, its CSV and a Gantt."""
    result = ilp.plan(
        jobs,
        ilp.read_throughput(throughput_csv),
        cluster,
        objective,
        deadline=deadline_s,
        budget=budget_gpu_hours,
        solver=solver,
        time_limit=SOLVER_TIME_LIMIT,
    )
    ilp.write_plan(result, out_json, gantt)
    return result
