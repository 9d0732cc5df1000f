"""GPU allocation in the workflow: each new rule alone on fixtures, the DAG with allocation
on, and train jobs taking their resources and Dask workers from the plan."""

import csv
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from fixtures import write_fixture_plan
from test_workflow import PNG_MAGIC, ROOT, prepared, snakemake, write_config

from aihpc.allocate import AllocationError
from aihpc.allocate import model as tm
from aihpc.allocate.planned import train_settings
from aihpc.allocate.profile import run_schedule
from aihpc.allocate.sweep import sweep_jobs
from aihpc.config import ModelConfig, TrainConfig
from aihpc.data import read_stats
from aihpc.errors import InputError
from aihpc.report import summarize

# The overlay config/allocate-cpu.yaml: CPU Dask workers stand in for GPUs.
ALLOCATE = yaml.safe_load((ROOT / "config" / "allocate-cpu.yaml").read_text())["allocate"]
PLAN_DIR = "results/plan"
MODELS = ("resnet_s", "seed_cnn")


def allocating(workdir: Path, **allocate) -> dict:
    """config/test.yaml with allocation on (the overlay, changed by ``allocate``); after
    ``prepared``, which writes the plain test config."""
    return write_config(workdir, allocate={**ALLOCATE, **allocate})


def rule_edges(workdir: Path) -> set[tuple[str, str]]:
    """(upstream, downstream) rule pairs of the rule graph."""
    graph = snakemake(workdir, "--rulegraph", "mermaid-js").stdout
    names = dict(re.findall(r"^\s*(id\d+)\[(\w+)\]", graph, re.M))
    return {(names[a], names[b]) for a, b in re.findall(r"(id\d+) --> (id\d+)", graph)}


# --- the DAG ----------------------------------------------------------------------------------


def test_dag_with_allocation(tmp_path):
    allocating(tmp_path)
    edges = rule_edges(tmp_path)
    for edge in [("profile", "fit_scaling"), ("fit_scaling", "allocate"), ("allocate", "train")]:
        assert edge in edges
    out = snakemake(tmp_path, "-n").stdout
    # Before the plan exists the planned resources are unknown, not guessed.
    assert "gpu=<TBD>, nodes=<TBD>, cpus_per_gpu=<TBD>, runtime=<TBD>, gpu_model=<TBD>" in out
    assert f"{PLAN_DIR}/gantt.png" in out

    write_config(tmp_path / "off")  # allocation off (the default): no new rule in the DAG
    rules = {rule for edge in rule_edges(tmp_path / "off") for rule in edge}
    assert "train" in rules and not rules & {"profile", "fit_scaling", "allocate"}


# --- each rule alone on fixtures --------------------------------------------------------------


@pytest.mark.rule
def test_rule_profile(tmp_path):
    prepared(tmp_path)
    allocating(tmp_path, profile={**ALLOCATE["profile"], "batch_sizes": [32]})
    target = f"{PLAN_DIR}/profile/seed_cnn.csv"
    snakemake(tmp_path, target, rules=("profile",))
    profile = tm.read_profiles([tmp_path / target])[("seed_cnn", "cpu")]
    assert sorted(profile.replicas) == [1, 2]
    assert (profile.nodes == 1).all() and (profile.local_bsz == 32).all()
    assert (profile.step_time > 0).all()
    log = (tmp_path / "results/logs/fashion-mnist-tiny/profile/seed_cnn.log").read_text()
    assert "2 worker(s) on cpu, local batch 32" in log
    assert not any((tmp_path / "work/fashion-mnist-tiny/profile/seed_cnn").iterdir())


@pytest.mark.rule
def test_rule_fit_scaling(tmp_path):
    # Two nodes, but the local Dask cluster cannot span them: one-node configurations only.
    allocating(tmp_path, cluster={"gpu_types": {"cpu": {"nodes": 2, "gpus_per_node": 2}}})
    params = tm.PerfParams(0.002, 0.0003, 0.004, 1e-8, 0.0044, 1e-8, 1.0)
    for scale, model in enumerate(MODELS, start=1):
        path = tmp_path / PLAN_DIR / "profile" / f"{model}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(tm.PROFILE_COLUMNS)
            for replicas in (1, 2):
                for batch in (32, 64):
                    step = scale * tm.step_time(params, 1, replicas, batch)
                    writer.writerow([model, "cpu", 1, replicas, batch, f"{step:.6g}"])
    snakemake(tmp_path, f"{PLAN_DIR}/throughput.csv", rules=("fit_scaling",))
    thr = pd.read_csv(tmp_path / PLAN_DIR / "throughput.csv")
    assert set(zip(thr["model"], thr["gpus"], strict=True)) == {
        (m, g) for m in MODELS for g in (1, 2)
    }
    assert (thr["nodes"] == 1).all() and (thr["gpu_type"] == "cpu").all()
    # Predicted at each model's own batch (64 in config/test.yaml), from exact profiles.
    resnet = thr[thr["model"] == "resnet_s"].set_index("gpus")["samples_per_s"]
    assert resnet[2] == pytest.approx(2 * 64 / tm.step_time(params, 1, 2, 64), rel=0.01)
    fits = json.loads((tmp_path / PLAN_DIR / "fit.json").read_text())["fits"]
    assert [f["model"] for f in fits] == list(MODELS)


@pytest.mark.rule
def test_rule_allocate(tmp_path):
    train_images = read_stats(prepared(tmp_path))["counts"]["train"]
    config = allocating(tmp_path)
    # Unbounded, resnet_s on both workers then seed_cnn on both is the shortest plan; the
    # models' gpus bound the plan instead.
    config["models"]["resnet_s"]["gpus"] = 1
    config["models"]["seed_cnn"]["gpus"] = {"min": 2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    thr = tmp_path / PLAN_DIR / "throughput.csv"
    thr.parent.mkdir(parents=True)
    thr.write_text(
        "model,gpu_type,nodes,gpus,samples_per_s\n"
        "resnet_s,cpu,1,1,100\nresnet_s,cpu,1,2,190\nseed_cnn,cpu,1,1,400\nseed_cnn,cpu,1,2,700\n"
    )
    snakemake(tmp_path, f"{PLAN_DIR}/allocation.json", rules=("allocate",))
    plan = json.loads((tmp_path / PLAN_DIR / "allocation.json").read_text())
    assert plan["objective"] == "makespan"
    jobs = {job["name"]: job for job in plan["jobs"]}
    assert {name: job["gpus"] for name, job in jobs.items()} == {"resnet_s": 1, "seed_cnn": 2}
    # 1 + 2 workers do not fit the 2 side by side: one after the other
    assert plan["makespan_s"] == pytest.approx(2 * train_images * (1 / 100 + 1 / 700))
    for name, job in jobs.items():  # 2 epochs of the training split at the planned rate
        duration = job["end_s"] - job["start_s"]
        assert duration == pytest.approx(2 * train_images / job["samples_per_s"]), name
    assert plan["makespan_s"] == pytest.approx(max(job["end_s"] for job in jobs.values()))
    assert len(pd.read_csv(tmp_path / PLAN_DIR / "allocation.csv")) == 2
    assert (tmp_path / PLAN_DIR / "gantt.png").read_bytes()[:8] == PNG_MAGIC


# --- train from the plan ----------------------------------------------------------------------


def test_train_resources_come_from_the_plan(tmp_path):
    prepared(tmp_path)
    pools = {
        "a100": {"nodes": 2, "gpus_per_node": 4},
        "nvidia-h100": {"nodes": 1, "gpus_per_node": 8, "gpu_model": "h100"},
        "cpu": {"nodes": 1, "gpus_per_node": 2},
    }
    allocating(tmp_path, cluster={"gpu_types": pools}, cpus_per_gpu=8)
    plan = {
        "seed_cnn": ("a100", 1, 4, 3600.0),
        "resnet_s": ("nvidia-h100", 1, 8, 60.0),
    }
    write_fixture_plan(tmp_path / PLAN_DIR / "allocation.json", plan)
    targets = [f"results/fashion-mnist-tiny/{m}/model.pt" for m in MODELS]
    out = snakemake(tmp_path, "-n", *targets, rules=("train",)).stdout
    # runtime: 1 h x margin 1.5 + 5 min overhead; Slurm's GPU type: the pool's name ...
    assert "gpu=4, nodes=1, cpus_per_gpu=8, runtime=95, gpu_model=a100" in out
    # ... or its gpu_model, where the name is not one Slurm takes
    assert "gpu=8, nodes=1, cpus_per_gpu=8, runtime=7, gpu_model=h100" in out

    write_fixture_plan(tmp_path / PLAN_DIR / "allocation.json", {"seed_cnn": ("cpu", 1, 2, 60.0)})
    out = snakemake(tmp_path, "-n", targets[1], rules=("train",)).stdout
    assert "gpu=0, nodes=1, cpus_per_gpu=8, runtime=7" in out and "gpu_model" not in out


def test_gpu_type_slurm_cannot_name_fails_at_parse(tmp_path):
    pools = {"nvidia-a100": {"nodes": 1, "gpus_per_node": 4}}
    allocating(tmp_path, cluster={"gpu_types": pools})
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    assert "allocate.cluster.gpu_types.nvidia-a100: 'nvidia-a100' is not a GPU type" in (
        result.stdout + result.stderr
    )


@pytest.mark.rule
def test_rule_train_workers_from_plan(tmp_path):
    prepared(tmp_path)
    allocating(tmp_path)
    write_fixture_plan(tmp_path / PLAN_DIR / "allocation.json", {"seed_cnn": ("cpu", 1, 2, 4.0)})
    target = "results/fashion-mnist-tiny/seed_cnn/model.pt"
    snakemake(tmp_path, target, "--resources", "gpu=0", rules=("train",))
    meta = torch.load(tmp_path / target, weights_only=True)["meta"]
    assert meta["world_size"] == 2 and len(meta["ranks"]) == 2  # a CPU plan asks no GPU
    assert meta["predicted_train_seconds"] == 4.0


# --- the helpers behind the rules -------------------------------------------------------------


def test_train_settings(tmp_path):
    plan = tmp_path / "allocation.json"
    write_fixture_plan(plan, {"m": ("cpu", 1, 2, 61.0), "g": ("h100", 2, 8, 600.0)})
    pools = {"cpu": {"nodes": 1, "gpus_per_node": 2}, "h100": {"nodes": 2, "gpus_per_node": 8}}
    cfg = {
        "cpus_per_gpu": 4,
        "runtime_margin": 2.0,
        "runtime_overhead_min": 1,
        "cluster": {"gpu_types": pools},
    }
    dist = {"cluster": "connect", "workers": 1, "timeout_s": 60}
    cpu = train_settings(plan, "m", cfg, dist)
    assert cpu["gpu"] == 0 and cpu["gpu_model"] is None and cpu["distributed"]["workers"] == 2
    assert cpu["runtime"] == math.ceil(61 * 2 / 60 + 1)
    gpu = train_settings(plan, "g", cfg, dist)
    assert (gpu["gpu"], gpu["nodes"], gpu["cpus_per_gpu"], gpu["runtime"]) == (8, 2, 4, 21)
    assert gpu["gpu_model"] == "h100"
    assert gpu["distributed"] == {**dist, "workers": 8}
    assert gpu["predicted_train_seconds"] == 600.0
    with pytest.raises(AllocationError, match="no job 'other'"):
        train_settings(plan, "other", cfg, dist)
    with pytest.raises(FileNotFoundError):  # Snakemake's cue to defer (<TBD>)
        train_settings(tmp_path / "missing.json", "m", cfg, dist)
    # A plan of another cluster (a stale plan) names the type and what to do.
    other = {**cfg, "cluster": {"gpu_types": {"cpu": pools["cpu"]}}}
    with pytest.raises(AllocationError, match=r"GPU type 'h100'.*re-run rule allocate"):
        train_settings(plan, "g", other, dist)


def test_sweep_jobs_count_epochs_and_batch_limits():
    full = ModelConfig("a", "seed_cnn", train=TrainConfig(epochs=3))
    capped = TrainConfig(epochs=2, batch_size=10, limit_train_batches=5)  # 50 a epoch
    limited = ModelConfig("b", "seed_cnn", train=capped)
    jobs = sweep_jobs(1000, [full, limited], {"a": (1, None), "b": (2, 4)})
    assert [(j.name, j.model, j.samples) for j in jobs] == [("a", "a", 3000), ("b", "b", 100)]
    assert [(j.min_gpus, j.max_gpus) for j in jobs] == [(1, None), (2, 4)]


def test_profile_run_schedule():
    assert run_schedule(1080, 1, 64, 12) == (1, 12)
    assert run_schedule(1080, 2, 64, 12) == (2, 8)  # 540 per rank: 8 batches an epoch
    with pytest.raises(InputError, match="exceed the 100 training images"):
        run_schedule(100, 2, 64, 12)


def test_summary_compares_predicted_and_measured(tmp_path):
    evals = []
    for variant, predicted in (("a", 10.0), ("b", None)):
        result = {
            "variant": variant,
            "model": variant,
            "dataset": "d",
            "test_accuracy": 0.5,
            "latency_b1_ms": 1.0,
            "latency_b256_ms": 9.0,
            "size_bytes": 100,
            "params": 10,
            "nonzeros": 10,
            "train_seconds": 12.0,
        }
        if predicted is not None:
            result["predicted_train_seconds"] = predicted
        evals.append(tmp_path / f"{variant}.json")
        evals[-1].write_text(json.dumps(result))
    summary = summarize(evals, tmp_path / "summary.csv").set_index("variant")
    assert summary.loc["a", "prediction_error"] == pytest.approx(0.2)
    assert math.isnan(summary.loc["b", "prediction_error"])
