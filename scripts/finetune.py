"""rule finetune: a pruned artifact -> the fine-tuned variant + its curves (aihpc.compress)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.compress import finetune
from aihpc.config import DistillConfig, ModelConfig, TrainConfig
from aihpc.stage import rule_log
from aihpc.train import TrainPaths

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    paths = TrainPaths.of_rule(snakemake)
    settings = snakemake.params.finetune
    model_cfg = ModelConfig(**{**settings, "train": TrainConfig(**settings["train"])})
    finetune(
        Path(snakemake.input.model),
        paths,
        model_cfg,
        threads=snakemake.threads,
        gradual_steps=snakemake.params.gradual_steps,
        teacher=Path(snakemake.input.teacher),
        distill=DistillConfig(**snakemake.params.distill),
    )
