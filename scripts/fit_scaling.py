"""rule fit_scaling: profile CSVs -> THR.csv + fitted parameters (aihpc.allocate.sweep)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package in conda envs

from aihpc.allocate.sweep import cluster_from_config, fit_scaling
from aihpc.config import model_config
from aihpc.stage import rule_log

snakemake = globals()["snakemake"]
with rule_log(snakemake.log[0]):
    config = {"train": snakemake.params.train, "models": snakemake.params.models}
    fits = fit_scaling(
        snakemake.input,
        cluster_from_config(snakemake.params.cluster),
        {name: model_config(config, name).train.batch_size for name in config["models"]},
        multi_node=snakemake.params.multi_node,
        out_csv=snakemake.output.throughput,
        params_json=snakemake.output.params,
    )
    for f in fits:
        priors = f"; priors: {'; '.join(f.priors)}" if f.priors else ""
        print(
            f"{f.model} on {f.gpu_type}: {f.points} points, relative error median "
            f"{f.median_rel_error:.1%}, max {f.max_rel_error:.1%}{priors}"
        )
