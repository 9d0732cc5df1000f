"""rule plot_confusion: one variant's eval.json -> confusion-matrix figure (aihpc.report)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.report import plot_confusion
from aihpc.stage import rule_log

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    plot_confusion(Path(snakemake.input[0]), Path(snakemake.output[0]))
