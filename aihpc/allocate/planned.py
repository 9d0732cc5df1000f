"""A train job's settings from the plan (rule allocate's PLAN.json), read by the train
rule's resource and parameter functions in common.smk.

Kept apart from :mod:`aihpc.allocate.sweep` so that parsing the Snakefile does not import
the solver and the fitting code.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aihpc.allocate import CPU_TYPE, AllocationError

#: A GPU model name snakemake-executor-plugin-slurm accepts (its utils.set_gres).
SLURM_GPU_MODEL = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class PlannedJob:
    """One job of a plan: its configuration and predicted run time."""

    name: str
    gpu_type: str
    nodes: int
    gpus: int
    seconds: float


def planned_job(plan_path: str | os.PathLike[str], name: str) -> PlannedJob:
    """Job ``name`` of PLAN.json.

    A missing plan raises FileNotFoundError unchanged: Snakemake recognises its own input
    and defers the train job's resources and parameters (``<TBD>``) until the plan exists.
    """
    text = Path(plan_path).read_text()
    try:
        entry = next(job for job in json.loads(text)["jobs"] if job["name"] == name)
        return PlannedJob(
            name=name,
            gpu_type=str(entry["gpu_type"]),
            nodes=int(entry["nodes"]),
            gpus=int(entry["gpus"]),
            seconds=float(entry["end_s"]) - float(entry["start_s"]),
        )
    except StopIteration:
        raise AllocationError(f"{plan_path}: no job {name!r}; re-run rule allocate") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise AllocationError(f"{plan_path}: not a plan of 'aihpc allocate': {exc}") from exc


def slurm_gpu_model(cluster_cfg: Mapping[str, Any], gpu_type: str) -> str | None:
    """Slurm's name of pool ``gpu_type`` of ``allocate.cluster``: its ``gpu_model``, else the
    pool's name; None for CPU workers. AllocationError when the pool is not in the config
    (a plan of another cluster) or the name is one Slurm's --gpus cannot take.
    """
    if gpu_type == CPU_TYPE:
        return None
    pools = cluster_cfg["gpu_types"]
    if gpu_type not in pools:
        raise AllocationError(
            f"the plan uses GPU type {gpu_type!r}, which allocate.cluster.gpu_types does not "
            f"have ({', '.join(pools)}); re-run rule allocate"
        )
    name = pools[gpu_type].get("gpu_model") or gpu_type
    if not SLURM_GPU_MODEL.match(name):
        raise AllocationError(
            f"allocate.cluster.gpu_types.{gpu_type}: {name!r} is not a GPU type Slurm's "
            f"--gpus=<type>:N takes (letters, digits, '_' and '.'); set its gpu_model to the "
            f"cluster's name for it (gres.conf Type, e.g. a100)"
        )
    return name


def train_settings(
    plan_path: str | os.PathLike[str],
    model: str,
    allocate_cfg: Mapping[str, Any],
    distributed_cfg: Mapping[str, Any],
) -> dict[str, Any]:
    """What the train rule takes from the plan for ``model``.

    Scheduler resources: ``gpu`` (0 for CPU workers: they ask no GPU), ``gpu_model``
    (:func:`slurm_gpu_model`, None for CPU workers: no such resource), ``nodes``,
    ``cpus_per_gpu`` (``allocate.cpus_per_gpu``) and ``runtime`` in minutes, the predicted
    run time times ``allocate.runtime_margin`` plus ``allocate.runtime_overhead_min``
    (start-up, validation and checkpoints, which the throughput model does not see).
    ``distributed``: the config's settings with one Dask worker (DDP rank) per planned GPU.
    ``predicted_train_seconds``: the plan's prediction, compared with the measured time in
    the summary.
    """
    job = planned_job(plan_path, model)
    runtime = job.seconds * allocate_cfg["runtime_margin"] / 60
    return {
        "gpu": 0 if job.gpu_type == CPU_TYPE else job.gpus,
        "gpu_model": slurm_gpu_model(allocate_cfg["cluster"], job.gpu_type),
        "nodes": job.nodes,
        "cpus_per_gpu": allocate_cfg["cpus_per_gpu"],
        "runtime": math.ceil(runtime + allocate_cfg["runtime_overhead_min"]),
        "distributed": {**distributed_cfg, "workers": job.gpus},
        "predicted_train_seconds": round(job.seconds, 3),
    }
