"""rule plot_tradeoffs: summary.csv -> accuracy vs latency/size figure (aihpc.report)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.report import plot_tradeoffs
from aihpc.stage import rule_log

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    plot_tradeoffs(Path(snakemake.input[0]), Path(snakemake.output[0]))
