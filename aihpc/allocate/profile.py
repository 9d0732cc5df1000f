"""Profiling a model for the allocator: short timed runs of its real training step at
several worker counts and local batch sizes.

Every run is :func:`aihpc.distributed.fit_distributed` — the train rule's own DDP path, one
rank per Dask worker (CPU processes with ``distributed.cluster: local``, one per GPU with
``cuda``) — for a few steps in a scratch directory. Its ``step_time_s`` is the median step
after :class:`aihpc.train.StepTimer`'s warm-up. A single worker runs through Dask too: the
driver process then never runs a torch op, which keeps forking CPU workers safe. The rows
are the profile CSV :func:`aihpc.allocate.model.read_profiles` reads.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from aihpc.allocate import CPU_TYPE
from aihpc.allocate.model import PROFILE_COLUMNS
from aihpc.config import DistributedConfig, ModelConfig
from aihpc.data import read_stats
from aihpc.distributed import fit_distributed
from aihpc.errors import InputError
from aihpc.files import write_csv
from aihpc.train import StepTimer, TrainPaths

#: Steps StepTimer discards before timing.
WARMUP_STEPS = StepTimer().warmup


def device_type(device: str) -> str:
    """A GPU type name from a rank's device (``cpu`` or the CUDA device name):
    "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    if device == "cpu":
        return CPU_TYPE
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def default_batch_sizes(model_cfg: ModelConfig) -> list[int]:
    """The model's training batch size and half of it: two points around the batch the
    plan predicts, enough to separate fixed from per-sample step time."""
    batch = model_cfg.train.batch_size
    return sorted({max(batch // 2, 1), batch})


def run_schedule(train_images: int, workers: int, batch: int, steps: int) -> tuple[int, int]:
    """(epochs, batches per epoch) of a run of at least ``steps`` steps.

    Each rank takes a ``1/workers`` shard of every epoch in whole batches; a split too small
    for ``steps`` of them runs several short epochs (StepTimer only times training steps).
    """
    per_epoch = math.ceil(train_images / workers) // batch
    if per_epoch == 0:
        raise InputError(
            f"profile: {workers} worker(s) x local batch {batch} exceed the {train_images} "
            "training images; use smaller allocate.profile.batch_sizes or workers"
        )
    batches = min(per_epoch, steps)
    return math.ceil(steps / batches), batches


def profile_model(
    data_dir: Path,
    model_cfg: ModelConfig,
    dist_cfg: DistributedConfig,
    *,
    workers: Sequence[int],
    batch_sizes: Sequence[int] | None,
    steps: int,
    threads: int,
    scratch_dir: Path,
    gpu_type: str | None = None,
) -> list[dict[str, Any]]:
    """One profile row per (workers, local batch): the median steady-state step time.

    ``threads`` is split among the ranks as in the train rule (give both the same), so a
    run with K workers measures what a train job with K planned "GPUs" will see. Runs are
    one after the other; nothing else should share the node while they run. ``gpu_type``
    names the rows; by default the device the ranks ran on (:func:`device_type`).
    """
    if steps <= WARMUP_STEPS:
        raise InputError(f"profile: steps {steps}: the first {WARMUP_STEPS} are warm-up")
    train_images = read_stats(data_dir)["counts"]["train"]
    rows = []
    scratch_dir.mkdir(parents=True, exist_ok=True)
    for k in sorted(set(workers)):
        for batch in sorted(set(batch_sizes or default_batch_sizes(model_cfg))):
            epochs, batches = run_schedule(train_images, k, batch, steps)
            train = replace(
                model_cfg.train, epochs=epochs, batch_size=batch, limit_train_batches=batches
            )
            # A fresh directory per run: fit would resume a finished run's checkpoint.
            with tempfile.TemporaryDirectory(dir=scratch_dir) as tmp:
                run_dir = Path(tmp)
                paths = TrainPaths(
                    data_dir=data_dir,
                    model_out=run_dir / "model.pt",
                    metrics_out=run_dir / "metrics.csv",
                    work_dir=run_dir / "work",
                )
                record = fit_distributed(
                    paths,
                    replace(model_cfg, train=train),
                    replace(dist_cfg, workers=k),
                    threads=threads,
                )
            device = record["ranks"][0]["device"]
            rows.append(
                {
                    "model": model_cfg.name,
                    "gpu_type": gpu_type or device_type(device),
                    "nodes": len({rank["host"] for rank in record["ranks"]}),
                    "replicas": k,
                    "local_batch": batch,
                    "step_time": record["step_time_s"],
                }
            )
            print(
                f"{model_cfg.name}: {k} worker(s) on {device}, local batch {batch}: "
                f"{record['step_time_s'] * 1000:.2f} ms/step (median of "
                f"{record['global_step'] - WARMUP_STEPS} steps)"
            )
    return rows


def write_profile(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write the profile CSV (``model,gpu_type,nodes,replicas,local_batch,step_time``)."""
    formatted = ({**row, "step_time": f"{row['step_time']:.6g}"} for row in rows)
    write_csv(path, formatted, PROFILE_COLUMNS)
