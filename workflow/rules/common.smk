import os

from snakemake.utils import min_version

from aihpc.config import validate_config
from aihpc.data import source_files

min_version("9.0")


# The default config only when none is given: Snakemake would otherwise merge a user's
# --configfile into it, leaking the default sweep's models into theirs.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate_config(config, ", ".join(map(str, workflow.configfiles)) or "config")


report: "../report/workflow.rst"


RESULTS = config["results"]
DATASET = config["data"]["name"]
DATA_DIR = f"{RESULTS}/{DATASET}/data"
VARIANT_DIR = f"{RESULTS}/{DATASET}/{{variant}}"
LOGS = f"{RESULTS}/logs/{DATASET}"
# Trained models are the variants for now; compression stages add `<model>-<stage>` names.
MODELS = list(config["models"])
VARIANTS = MODELS


wildcard_constraints:
    model="|".join(MODELS),


def usable_cores():
    """Cores this process may run on. Snakemake caps a job's threads at --cores; cluster
    profiles set a rule's threads with set-threads."""
    return len(os.sched_getaffinity(0))


def raw_dataset_files(wildcards):
    """The raw files preprocessing reads (a missing one names itself in Snakemake's error)."""
    data = config["data"]
    return [
        str(p)
        for p in source_files(
            data["format"], data["root"], data["train_file"], data["test_file"]
        )
    ]


def data_dir_of_inputs(wildcards, input):
    """The preprocessed-data directory, derived from a job's inputs (no hardcoded prefix)."""
    return os.path.dirname(next(f for f in input if f.endswith("stats.json")))


def preprocessed(*splits):
    """Arrays of the given splits plus stats.json."""
    files = [
        f"{DATA_DIR}/{s}_{kind}.npy" for s in splits for kind in ("images", "labels")
    ]
    return files + [f"{DATA_DIR}/stats.json"]


def final_targets():
    """The default run's targets, the summary table and every report figure."""
    return [
        f"{RESULTS}/summary.csv",
        f"{RESULTS}/plots/training_curves.png",
        f"{RESULTS}/plots/tradeoffs.png",
        *expand(f"{RESULTS}/plots/confusion/{{variant}}.png", variant=VARIANTS),
    ]
