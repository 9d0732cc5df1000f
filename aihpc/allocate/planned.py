"""A train job's settings from the plan (rule allocate's PLAN.json), read by the train
rule's resource and parameter functions in common.smk.

Kept apart from :mod:`aihpc.allocate.sweep` so that parsing the Snakefile does not import
the solver and the fitting code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aihpc.allocate import CPU_TYPE, AllocationError


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


def train_settings(
    plan_path: str | os.PathLike[str],
    model: str,
    allocate_cfg: Mapping[str, Any],
    distributed_cfg: Mapping[str, Any],
) -> dict[str, Any]:
    """What the train rule takes from the plan for ``model``.

    Scheduler resources: ``gpu`` (0 for CPU workers: they ask no GPU), ``nodes``,
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
        "nodes": job.nodes,
        "cpus_per_gpu": allocate_cfg["cpus_per_gpu"],
        "runtime": math.ceil(runtime + allocate_cfg["runtime_overhead_min"]),
        "distributed": {**distributed_cfg, "workers": job.gpus},
        "predicted_train_seconds": round(job.seconds, 3),
    }
