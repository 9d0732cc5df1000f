"""rule summary: every variant's eval.json -> results/summary.csv (aihpc.report)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.report import summarize
from aihpc.stage import rule_log

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    summarize([Path(p) for p in snakemake.input], Path(snakemake.output[0]))
