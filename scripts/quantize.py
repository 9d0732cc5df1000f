"""rule quantize: a variant's artifact -> its quantised artifact, the deployable
torch.export archive and the per-layer table (aihpc.compress)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.compress import quantize_artifact
from aihpc.stage import rule_log

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    stage = snakemake.params.stage
    quantize_artifact(
        Path(snakemake.input.model),
        Path(snakemake.params.data_dir),
        Path(snakemake.output.model),
        Path(snakemake.output.program),
        Path(snakemake.output.layers),
        variant=stage["name"],
        parent=stage["parent"],
        mode=stage["quant"],
        samples=snakemake.params.calibration_samples,
        seed=snakemake.params.calibration_seed,
        observer=snakemake.params.observer,
        threads=snakemake.threads,
    )
