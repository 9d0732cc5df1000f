"""rule preprocess: raw dataset -> arrays + stats.json (aihpc.data.prepare)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.config import DataConfig
from aihpc.data import prepare
from aihpc.stage import rule_log

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    prepare(DataConfig(**snakemake.params.data), Path(snakemake.output[0]).parent)
