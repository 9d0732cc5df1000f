"""The workflow through a real Slurm cluster (start.sh: one node, four fake GPUs) with
``--profile profiles/slurm --profile tests/slurm/profile``: every job an sbatch job.

The fake GPUs cannot run CUDA, so training runs on CPU (``train.accelerator: cpu``) while
the jobs still request GPUs from Slurm.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from fixtures import deep_update, write_fixture_plan

from aihpc.config import DataConfig
from aihpc.data import prepare
from aihpc.models import load_artifact

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ROOT / "tests" / "data" / "fashion-mnist-tiny"
DATASET = "fashion-mnist-tiny"
PROFILES = (
    "--profile",
    str(ROOT / "profiles/slurm"),
    "--profile",
    str(ROOT / "tests/slurm/profile"),
)
PARTITION = "aihpc"  # start.sh's partition
GPU_TYPE = "fakegpu"  # start.sh's gres.conf
WORKFLOW_TIMEOUT_S = 300  # a hang fails the test instead of blocking CI
# A failing job: a few seconds' run plus the plugin's growing status-poll interval (the
# test profile starts it at 2 s; +10 s per poll that finds nothing finished).
FAILURE_TIMEOUT_S = 90
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+)")
# The tiny config without what only costs time here: the compression stages (three more DAG
# levels, each a round of job start-up and status polls), torch.compile latency timing, and
# two-rank Dask training (test_training_job_gets_the_gpus_it_asks_for runs that).
QUICK = {
    "distributed": {"workers": 1},
    "evaluate": {"compile": False},
    "compress": {"variants": []},
}

pytestmark = pytest.mark.slurm


def write_config(
    workdir: Path, models: dict[str, Any] | None = None, **changes: Any
) -> dict[str, Any]:
    """config/test.yaml with the fixture data, results under workdir; ``models`` replaces
    the sweep."""
    config = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    deep_update(config, {"results": "results", "data": {"root": str(TINY)}})
    deep_update(config, copy.deepcopy(changes))
    if models is not None:
        config["models"] = copy.deepcopy(models)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return config


def seed_cnn(**fields: Any) -> dict[str, Any]:
    """The tiny config's seed_cnn entry, with ``fields`` added (e.g. gpus)."""
    config = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    return {"seed_cnn": {**config["models"]["seed_cnn"], **fields}}


def cluster_env(**extra: str) -> dict[str, str]:
    """This environment without the caller's Slurm/profile settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIHPC_SLURM_", "SLURM_"))}
    env["AIHPC_SLURM_PARTITION"] = PARTITION
    env.update(extra)
    return env


@dataclass
class Run:
    returncode: int
    output: str  # stdout and stderr
    seconds: float

    @property
    def jobids(self) -> list[str]:
        return SUBMITTED.findall(self.output)


class Workflow:
    """One Snakemake run in ``workdir`` (its own process, so tests can act while it runs)."""

    def __init__(
        self, workdir: Path, *args: str, slurm: bool = True, env: dict[str, str] | None = None
    ) -> None:
        cmd = [str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile")]
        cmd += ["--configfile", str(workdir / "config.yaml")]
        # Targets only after another option: --configfile takes every following word.
        cmd += [*PROFILES, *args] if slurm else ["--cores", "2", *args]
        self.log = workdir / "snakemake.out"
        self.started = time.monotonic()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env or cluster_env()
            )

    def wait(self, timeout: float = WORKFLOW_TIMEOUT_S) -> Run:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGINT: Snakemake cancels its Slurm jobs before exiting.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            pytest.fail(f"snakemake did not finish in {timeout} s:\n{self.log.read_text()}")
        return Run(self.proc.returncode, self.log.read_text(), time.monotonic() - self.started)


def succeeded(run: Run) -> Run:
    assert run.returncode == 0, run.output
    return run


def slurm_jobs(jobids: list[str]) -> pd.DataFrame:
    """squeue's view of jobs (finished ones stay listed for MinJobAge=300 s)."""
    out = subprocess.run(
        [
            "squeue",
            "--states=all",
            "--noheader",
            "--format=%i|%T|%P|%k|%Z",
            "--jobs",
            ",".join(jobids),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    frame = pd.DataFrame(rows, columns=["jobid", "state", "partition", "comment", "workdir"])
    frame["comment"] = frame["comment"].str.strip()
    return frame.set_index("jobid")


def job_detail(jobid: str) -> dict[str, str]:
    """``scontrol show job`` as key=value pairs."""
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", jobid], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


def model_meta(workdir: Path, model: str) -> dict[str, Any]:
    path = workdir / "results" / DATASET / model / "model.pt"
    return torch.load(path, weights_only=True)["meta"]


def prepared(workdir: Path) -> None:
    """The preprocess rule's outputs, made by the package directly (saves a Slurm job)."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    prepare(DataConfig(**config["data"]), workdir / "results" / DATASET / "data")


def metrics(workdir: Path, model: str) -> pd.DataFrame:
    return pd.read_csv(workdir / "results" / DATASET / model / "metrics.csv")


# --- the tiny config end to end --------------------------------------------------------------


def test_tiny_workflow_runs_every_job_through_sbatch_and_matches_a_local_run(
    slurm_cluster: None, tmp_path: Path
) -> None:
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    write_config(local_dir, **QUICK)
    write_config(slurm_dir, **QUICK)
    # Side by side: the Slurm run mostly waits for status polls.
    local = Workflow(local_dir, slurm=False)
    run = succeeded(Workflow(slurm_dir).wait())
    succeeded(local.wait())

    # Every job but the target rule `all` (no command) was an sbatch job on the cluster.
    assert re.findall(r"^localrule (\w+):", run.output, re.MULTILINE) == ["all"]
    ran = sorted(re.findall(r"^rule (\w+):", run.output, re.MULTILINE))
    jobs = slurm_jobs(run.jobids)
    assert len(jobs) == len(run.jobids) == len(ran)
    assert {"preprocess", "train", "evaluate", "summary"} <= set(ran)
    assert sorted(jobs["comment"].str.extract(r"^rule_(.+?)(?:_wildcards_|$)")[0]) == ran
    assert (jobs["state"] == "COMPLETED").all(), jobs
    assert (jobs["partition"] == PARTITION).all(), jobs
    assert (jobs["workdir"] == str(slurm_dir)).all(), jobs
    # ... and its training record names that job.
    for model in ("resnet_s", "seed_cnn"):
        jobid = jobs.index[jobs["comment"] == f"rule_train_wildcards_{model}"].item()
        assert model_meta(slurm_dir, model)["allocation"]["SLURM_JOB_ID"] == jobid
        assert (slurm_dir / f"results/logs/slurm/rule_train/{model}/{jobid}.log").is_file()

    # Training is deterministic on CPU: the same numbers as the local run.
    local_summary = pd.read_csv(local_dir / "results/summary.csv").set_index("variant")
    slurm_summary = pd.read_csv(slurm_dir / "results/summary.csv").set_index("variant")
    for column in ("test_accuracy", "config_hash", "params"):
        assert slurm_summary[column].to_dict() == local_summary[column].to_dict(), column
    print(f"slurm run {run.seconds:.0f} s, jobs {', '.join(run.jobids)}")


# --- GPUs ------------------------------------------------------------------------------------


def test_training_job_gets_the_gpus_it_asks_for(slurm_cluster: None, tmp_path: Path) -> None:
    # Two data-parallel ranks (Dask CPU workers) inside the one job step that has the GPUs.
    changes = {**QUICK, "distributed": {"cluster": "local", "workers": 2}}
    write_config(tmp_path, seed_cnn(gpus=2), train={"epochs": 1, "accelerator": "cpu"}, **changes)
    prepared(tmp_path)
    target = f"results/{DATASET}/seed_cnn/model.pt"
    env = cluster_env(AIHPC_SLURM_GPU_MODEL=GPU_TYPE)
    run = succeeded(Workflow(tmp_path, target, "--allowed-rules", "train", env=env).wait())

    (jobid,) = run.jobids
    # Slurm allocated two GPUs of the requested type ...
    assert job_detail(jobid)["TresPerJob"] == f"gres:gpu:{GPU_TYPE}:2"
    # ... and the job's one task (the plugin's srun -n1) saw both; its two ranks trained.
    meta = model_meta(tmp_path, "seed_cnn")
    allocation = meta["allocation"]
    assert allocation["SLURM_JOB_ID"] == jobid
    assert len(allocation["CUDA_VISIBLE_DEVICES"].split(",")) == 2, allocation
    # SLURM_JOB_GPUS is the batch step's; the plugin strips it before its srun, whose step
    # has SLURM_STEP_GPUS.
    assert len(allocation["SLURM_STEP_GPUS"].split(",")) == 2, allocation
    assert meta["world_size"] == 2 and meta["accelerator"] == "cpu"


def test_planned_training_job_gets_the_planned_gpu_type(
    slurm_cluster: None, tmp_path: Path
) -> None:
    # Allocation on: the plan (written here, as rule allocate would) puts seed_cnn on two
    # GPUs of the cluster's type; no AIHPC_SLURM_GPU_MODEL, the type comes from the plan.
    allocate = {
        "enabled": True,
        "cluster": {"gpu_types": {GPU_TYPE: {"nodes": 1, "gpus_per_node": 4}}},
    }
    write_config(
        tmp_path, seed_cnn(), train={"epochs": 1, "accelerator": "cpu"}, allocate=allocate, **QUICK
    )
    prepared(tmp_path)
    write_fixture_plan(
        tmp_path / "results" / "plan" / "allocation.json", {"seed_cnn": (GPU_TYPE, 1, 2, 60.0)}
    )
    target = f"results/{DATASET}/seed_cnn/model.pt"
    run = succeeded(Workflow(tmp_path, target, "--allowed-rules", "train").wait())

    (jobid,) = run.jobids
    assert job_detail(jobid)["TresPerJob"] == f"gres:gpu:{GPU_TYPE}:2"
    assert model_meta(tmp_path, "seed_cnn")["world_size"] == 2  # one Dask worker per GPU


def test_more_gpus_than_the_cluster_has_fails_at_submission(
    slurm_cluster: None, tmp_path: Path
) -> None:
    write_config(tmp_path, seed_cnn(gpus=5), train={"accelerator": "cpu"}, **QUICK)
    prepared(tmp_path)
    target = f"results/{DATASET}/seed_cnn/model.pt"
    run = Workflow(tmp_path, target, "--allowed-rules", "train").wait(timeout=120)
    assert run.returncode != 0
    assert "SLURM sbatch failed" in run.output, run.output
    assert "Requested node configuration is not available" in run.output, run.output
    assert run.jobids == []


# --- preemption ------------------------------------------------------------------------------


def wait_for(predicate: Any, what: str, run: Workflow, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if run.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {what}; snakemake:\n{run.log.read_text()}")
        time.sleep(0.2)
    return value


def test_requeued_training_job_resumes_from_its_checkpoint(
    slurm_cluster: None, tmp_path: Path
) -> None:
    epochs = 30  # a few seconds per ten epochs: the requeue lands mid-run
    train = {"epochs": epochs, "accelerator": "cpu", "crop_padding": 0, "hflip": False}
    changes = {"train": train, "models": seed_cnn(), **QUICK}
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    for workdir in (local_dir, slurm_dir):
        write_config(workdir, **copy.deepcopy(changes))
        prepared(workdir)
    target = f"results/{DATASET}/seed_cnn/model.pt"
    reference = Workflow(local_dir, target, "--allowed-rules", "train", slurm=False)
    run = Workflow(slurm_dir, target, "--allowed-rules", "train")

    # Preempt after the first epoch's checkpoint: SIGTERM, back to the queue.
    wait_for(
        lambda: list(slurm_dir.glob("work/*/seed_cnn/*/checkpoints/last.ckpt")),
        "checkpoint",
        run,
    )
    jobid = wait_for(lambda: SUBMITTED.findall(run.log.read_text()), "sbatch", run)[0]
    subprocess.run(["scontrol", "requeue", jobid], check=True)
    # A requeued job waits for cred_expire (30 s) before it may start again; skip the wait.
    wait_for(lambda: job_detail(jobid)["JobState"] == "PENDING", "pending state", run)
    subprocess.run(["scontrol", "update", f"jobid={jobid}", "starttime=now"], check=True)

    slurm_run = succeeded(run.wait())
    succeeded(reference.wait())
    assert slurm_run.jobids == [jobid]  # Snakemake waited for the same job, no resubmission
    detail = job_detail(jobid)
    assert detail["Restarts"] == "1" and detail["JobState"] == "COMPLETED", detail

    meta, reference_meta = model_meta(slurm_dir, "seed_cnn"), model_meta(local_dir, "seed_cnn")
    assert meta["resumed"] is True and reference_meta["resumed"] is False
    # The first attempt stopped mid-run; the second went on from its checkpoint.
    attempts = sorted(slurm_dir.glob("work/*/seed_cnn/*/logs/version_*/metrics.csv"))
    assert len(attempts) == 2
    assert 1 <= pd.read_csv(attempts[0])["epoch"].max() + 1 < epochs
    # The same optimizer steps and epochs as the uninterrupted run ...
    curves, reference_curves = metrics(slurm_dir, "seed_cnn"), metrics(local_dir, "seed_cnn")
    per_epoch = curves.groupby("epoch")["step"].max()
    assert per_epoch.to_dict() == reference_curves.groupby("epoch")["step"].max().to_dict()
    assert list(per_epoch.index) == list(range(epochs))
    (checkpoint,) = slurm_dir.glob("work/*/seed_cnn/*/checkpoints/last.ckpt")
    (reference_checkpoint,) = local_dir.glob("work/*/seed_cnn/*/checkpoints/last.ckpt")
    steps = [
        torch.load(c, weights_only=False)["global_step"] for c in (checkpoint, reference_checkpoint)
    ]
    assert steps[0] == steps[1] == epochs * (per_epoch[0] + 1)
    # ... and the same result. Exactly: the data order comes from per-epoch seeds, and with
    # random augmentation off nothing draws from the global RNG, which checkpoints do not
    # restore (with augmentation on, a resumed run ends close to, not equal to, this one).
    weights = load_artifact(slurm_dir / f"results/{DATASET}/seed_cnn/model.pt")[0].state_dict()
    reference_model = load_artifact(local_dir / f"results/{DATASET}/seed_cnn/model.pt")[0]
    for name, tensor in reference_model.state_dict().items():
        assert torch.allclose(weights[name], tensor, atol=1e-6), name
    columns = ["epoch", "step", "train_loss", "val_loss", "val_acc"]
    pd.testing.assert_frame_equal(
        curves[columns].groupby("epoch").max(),
        reference_curves[columns].groupby("epoch").max(),
        atol=1e-6,
    )
    assert meta["best_val_accuracy"] == pytest.approx(reference_meta["best_val_accuracy"])


# --- failures --------------------------------------------------------------------------------


def test_failing_job_is_reported_as_failed(slurm_cluster: None, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for source in TINY.iterdir():
        (raw / source.name).write_bytes(source.read_bytes())
    images = raw / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:5000])  # truncated: preprocess fails
    write_config(tmp_path, data={"root": str(raw)})
    # No retry (the profile's one retry would fail the same way, only later).
    target = f"results/{DATASET}/data/stats.json"
    run = Workflow(tmp_path, target, "--retries", "0").wait(timeout=FAILURE_TIMEOUT_S)

    assert run.returncode != 0
    # Slurm reported the job as failed ...
    (jobid,) = run.jobids
    assert slurm_jobs([jobid]).loc[jobid, "state"] == "FAILED"
    assert f"SLURM-job '{jobid}' failed, SLURM status is: 'FAILED'" in run.output
    # ... and the rule's own one-line error is shown from its log (--show-failed-logs).
    assert f"error: {images}" in run.output, run.output
    print(f"failure reported after {run.seconds:.0f} s")
