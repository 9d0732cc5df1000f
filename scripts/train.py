"""rule train: preprocessed arrays -> model artifact + training curves.

One process, or DDP ranks on Dask workers when distributed.workers > 1
(aihpc.distributed.train_model).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.config import DistributedConfig, model_config
from aihpc.distributed import train_model
from aihpc.stage import rule_log
from aihpc.train import TrainPaths

ALLOCATION_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")

# dask-cuda starts worker processes by spawning, which re-runs this file as a module: only
# the main process may train.
if __name__ == "__main__":
    snakemake = globals()["snakemake"]
    with rule_log(snakemake.log[0]):
        paths = TrainPaths.of_rule(snakemake)
        config = {
            "train": snakemake.params.train,
            "models": {snakemake.wildcards.model: snakemake.params.model},
        }
        # Which devices and job this run had (set by Slurm; CUDA_VISIBLE_DEVICES also elsewhere).
        allocation = {name: os.environ[name] for name in ALLOCATION_VARS if name in os.environ}
        # With allocate.enabled, the plan's prediction: the summary compares it with the
        # measured train_seconds (prediction_error).
        predicted = snakemake.params.predicted_train_seconds
        planned = {} if predicted is None else {"predicted_train_seconds": predicted}
        train_model(
            paths,
            model_config(config, snakemake.wildcards.model),
            DistributedConfig(**snakemake.params.distributed),
            threads=snakemake.threads,
            extra_meta={"allocation": allocation, **planned},
        )
