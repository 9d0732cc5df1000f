"""rule profile: preprocessed arrays -> one model's profile CSV (aihpc.allocate.profile).

Short timed training runs at each allocate.profile worker count and local batch size.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.allocate.profile import profile_model, write_profile
from aihpc.config import DistributedConfig, model_config
from aihpc.stage import rule_log

# dask-cuda starts worker processes by spawning, which re-runs this file as a module: only
# the main process may profile.
if __name__ == "__main__":
    snakemake = globals()["snakemake"]
    with rule_log(snakemake.log[0]):
        model = snakemake.wildcards.model
        config = {"train": snakemake.params.train, "models": {model: snakemake.params.model}}
        settings = snakemake.params.profile
        rows = profile_model(
            Path(snakemake.params.data_dir),
            model_config(config, model),
            DistributedConfig(**snakemake.params.distributed),
            workers=settings["workers"],
            batch_sizes=settings["batch_sizes"],
            steps=settings["steps"],
            threads=snakemake.threads,
            scratch_dir=Path(snakemake.params.scratch_dir),
            gpu_type=settings["gpu_type"],
        )
        write_profile(rows, snakemake.output[0])
