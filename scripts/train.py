"""rule train: preprocessed arrays -> model artifact + training curves (aihpc.train.fit)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.config import model_config
from aihpc.stage import rule_log
from aihpc.train import TrainPaths, fit

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    paths = TrainPaths(
        data_dir=Path(snakemake.params.data_dir),
        model_out=Path(snakemake.output.model),
        metrics_out=Path(snakemake.output.metrics),
        work_dir=Path(snakemake.params.work_dir),
    )
    config = {
        "train": snakemake.params.train,
        "models": {snakemake.wildcards.model: snakemake.params.model},
    }
    fit(paths, model_config(config, snakemake.wildcards.model), threads=snakemake.threads)
