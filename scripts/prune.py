"""rule prune: a trained model artifact -> one variant's pruned artifact (aihpc.compress)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.compress import prune_artifact
from aihpc.stage import rule_log

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    stage, model = snakemake.params.stage, snakemake.params.model
    prune_artifact(
        Path(snakemake.input.model),
        Path(snakemake.output[0]),
        variant=stage["name"],
        model=stage["model"],
        method=stage["prune_method"],
        ratio=stage["prune_ratio"],
        arch=model["arch"],
        kwargs=model.get("kwargs", {}),
        round_to=snakemake.params.round_to,
        l1=stage["l1"],
        gradual=stage["gradual"],
        gradual_steps=snakemake.params.gradual_steps,
    )
