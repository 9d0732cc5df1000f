import os
import re

from snakemake.utils import min_version

from aihpc.allocate.planned import slurm_gpu_model, train_settings
from aihpc.config import compress_stages, finetune_config, validate_config
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
MODELS = list(config["models"])
# Compression variants named once from config["compress"] (aihpc.config.compress_stages):
# <model>-<prune> (prune + finetune) and <parent>-<quant> (quantize).
COMPRESSED = compress_stages(config)
PRUNED = [name for name, stage in COMPRESSED.items() if stage.stage == "prune"]
QUANTIZED = [name for name, stage in COMPRESSED.items() if stage.stage == "quantize"]
TRAINED = MODELS + PRUNED  # variants with training curves
VARIANTS = MODELS + list(COMPRESSED)


wildcard_constraints:
    model="|".join(MODELS),


def parent_model(name):
    """The model file a compression stage starts from (a trained or pruned variant's)."""
    return f"{RESULTS}/{DATASET}/{COMPRESSED[name].parent}/model.pt"


def alternatives(names):
    """A wildcard constraint matching exactly these names (none: matches nothing)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


def usable_cores():
    """Cores this process may run on. Snakemake caps a job's threads at --cores; cluster
    profiles set a rule's threads with set-threads."""
    return len(os.sched_getaffinity(0))


def train_gpus(wildcards):
    """GPUs a training job asks the cluster scheduler for, as train's `gpu` resource.
    The model's `gpus`; by default one per Dask worker with `distributed.cluster: cuda`.
    """
    gpus = config["models"][wildcards.model].get("gpus")
    if gpus is None and config["distributed"]["cluster"] == "cuda":
        return config["distributed"]["workers"]
    return gpus or 0


# GPU allocation (allocate.enabled): rules profile -> fit_scaling -> allocate write the plan
# under PLAN_DIR, and each train job takes its resources and Dask workers from it.
ALLOCATE = config["allocate"]
PLAN_DIR = f"{RESULTS}/plan"
PLAN = f"{PLAN_DIR}/allocation.json"
PLANNED_RESOURCES = ("gpu", "nodes", "cpus_per_gpu", "runtime", "gpu_model")
if ALLOCATE["enabled"]:  # a GPU type Slurm cannot name fails now, not after profiling
    for pool in ALLOCATE["cluster"]["gpu_types"]:
        slurm_gpu_model(ALLOCATE["cluster"], pool)


def allocation_plan(wildcards):
    """train's input: the plan when allocation is on (its resources come from it), else none."""
    return PLAN if ALLOCATE["enabled"] else []


def from_plan(key, default):
    """A train resource or parameter: `key` of aihpc.allocate.planned.train_settings for
    the job's model when allocation is on, else `default`. Snakemake evaluates it once the
    plan exists; a dry run before that shows <TBD>."""
    if not ALLOCATE["enabled"]:
        return default
    return lambda wildcards, input: train_settings(
        input.plan, wildcards.model, ALLOCATE, config["distributed"]
    )[key]


def train_resources():
    """train's scheduler resources: its GPUs (train_gpus), or with allocation on the GPUs,
    nodes, CPUs per GPU, runtime (minutes) and Slurm GPU type (none on CPU workers) of its
    planned job; 4 h without a plan."""
    if not ALLOCATE["enabled"]:
        # A default here, not in a profile's set-resources: that would override the plan's.
        return {"gpu": train_gpus, "runtime": 240}
    return {key: from_plan(key, None) for key in PLANNED_RESOURCES}


def profile_gpus():
    """GPUs of a profile job: its largest run's, on a GPU node (distributed.cluster cuda)."""
    if config["distributed"]["cluster"] == "cuda":
        return max(ALLOCATE["profile"]["workers"])
    return 0


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
        *([f"{PLAN_DIR}/gantt.png"] if ALLOCATE["enabled"] else []),
    ]
