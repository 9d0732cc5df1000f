"""rule evaluate: one variant's model artifact -> eval.json (aihpc.evaluate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.evaluate import evaluate_to_json
from aihpc.stage import rule_log

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    settings = snakemake.params.evaluate
    evaluate_to_json(
        Path(snakemake.input.model),
        Path(snakemake.params.data_dir),
        Path(snakemake.output[0]),
        threads=settings["threads"],
        latency_batch_sizes=settings["latency_batch_sizes"],
        warmup=settings["warmup"],
        repeats=settings["repeats"],
        compile=settings["compile"],
        cpp_wrapper=settings["cpp_wrapper"],
        aot=settings["aot"],
    )
