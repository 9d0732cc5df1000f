"""rule plot_training_curves: metrics.csv of every model -> one figure (aihpc.report)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.report import plot_training_curves
from aihpc.stage import rule_log

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    curves = dict(zip(snakemake.params.models, map(Path, snakemake.input), strict=True))
    plot_training_curves(curves, Path(snakemake.output[0]))
