"""Data-parallel training on Dask workers: equivalence with one process, bounded failure
when a worker dies, and resume after it."""

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from aihpc.config import DistributedConfig, ModelConfig, TrainConfig
from aihpc.distributed import (
    DaskClusterEnvironment,
    RankFailure,
    dask_cluster,
    fit_distributed,
    train_model,
)
from aihpc.models import load_artifact
from aihpc.train import TrainPaths, fit

pytestmark = pytest.mark.distributed


def paths(tmp_path: Path, data_dir: Path, tag: str) -> TrainPaths:
    out = tmp_path / tag
    return TrainPaths(data_dir, out / "model.pt", out / "metrics.csv", tmp_path / "work" / tag)


def plain_sgd(batch_size: int, **train) -> ModelConfig:
    """seed_cnn has no BatchNorm, so ranks' batches do not interact through batch statistics;
    no augmentation, momentum or label smoothing: the only difference left between 2 ranks of
    batch b and 1 process of batch 2b is where the gradient average is computed."""
    settings = {
        "epochs": 1,
        "batch_size": batch_size,
        "lr": 0.05,
        "momentum": 0.0,
        "nesterov": False,
        "label_smoothing": 0.0,
        "crop_padding": 0,
        "hflip": False,
        "accelerator": "cpu",
        **train,
    }
    return ModelConfig(
        name="eq",
        arch="seed_cnn",
        kwargs={"widths": [4, 8, 8], "hidden": 16},
        train=TrainConfig(**settings),
    )


def test_environment_is_strict():
    env = DaskClusterEnvironment(world_size=2, global_rank=1, main_address="127.0.0.1", main_port=1)
    assert env.creates_processes_externally and not DaskClusterEnvironment.detect()
    assert (env.world_size(), env.global_rank(), env.node_rank(), env.local_rank()) == (2, 1, 1, 0)
    env.set_world_size(2)
    env.set_global_rank(1)
    env.validate_settings(num_devices=1, num_nodes=2)
    with pytest.raises(RuntimeError, match="world size 1"):
        env.set_world_size(1)
    with pytest.raises(RuntimeError, match="global rank 0"):
        env.set_global_rank(0)
    with pytest.raises(ValueError, match=r"devices=1, num_nodes=2"):
        env.validate_settings(num_devices=2, num_nodes=1)


def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, preprocessed_dir):
    two_ranks = fit_distributed(
        paths(tmp_path, preprocessed_dir, "ddp"),
        plain_sgd(8, precision="64-true"),
        DistributedConfig(workers=2),
        threads=2,
    )
    single = fit(
        paths(tmp_path, preprocessed_dir, "single"),
        plain_sgd(16, precision="64-true"),
        threads=1,
    )
    assert two_ranks["world_size"] == 2 and single["world_size"] == 1
    assert two_ranks["global_step"] == single["global_step"] > 0
    assert [r["rank"] for r in two_ranks["ranks"]] == [0, 1]
    assert all(r["steps"] == single["global_step"] for r in two_ranks["ranks"])

    # The stored tensors: load_artifact's rebuilt model would cast them to float32.
    ddp_weights = load_artifact(tmp_path / "ddp" / "model.pt")[1]["state_dict"]
    single_weights = load_artifact(tmp_path / "single" / "model.pt")[1]["state_dict"]
    assert ddp_weights.keys() == single_weights.keys()
    assert all(w.dtype == torch.float64 for w in ddp_weights.values() if w.is_floating_point())
    max_diff = max((ddp_weights[k] - single_weights[k]).abs().max().item() for k in ddp_weights)
    assert max_diff <= 1e-10


def worker_pids() -> set[int]:
    """Child processes of this test process: the forked Dask workers."""
    me = str(os.getpid())
    pids = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue
        if fields.get("PPid", "").strip() == me:
            pids.add(int(status.parent.name))
    return pids


def test_killed_worker_fails_fast_and_the_rerun_resumes(tmp_path, preprocessed_dir):
    model = plain_sgd(8, epochs=40, lr=0.01)
    cfg = DistributedConfig(workers=2, timeout_s=30)
    run = paths(tmp_path, preprocessed_dir, "killed")
    outcome: dict[str, object] = {}

    def train() -> None:
        try:
            fit_distributed(run, model, cfg, threads=2)
        except Exception as exc:
            outcome["error"] = exc
        outcome["finished"] = time.monotonic()

    thread = threading.Thread(target=train)
    thread.start()
    checkpoints = list(run.work_dir.glob("*/checkpoints/last.ckpt"))
    deadline = time.monotonic() + 120
    while not checkpoints and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.2)
        checkpoints = list(run.work_dir.glob("*/checkpoints/last.ckpt"))
    assert checkpoints, "training never wrote a checkpoint"
    victims = worker_pids()
    assert len(victims) == 2
    killed_at = time.monotonic()
    os.kill(max(victims), signal.SIGKILL)
    thread.join(timeout=90)
    assert not thread.is_alive(), "the driver hung after a worker was killed"
    assert outcome["finished"] - killed_at <= 60
    error = outcome["error"]
    assert isinstance(error, RankFailure)
    assert "KilledWorker" in str(error)  # names the rank whose worker was lost
    assert not run.model_out.exists()

    resumed = fit_distributed(run, model, cfg, threads=2)
    assert resumed["resumed"] is True
    uninterrupted = fit_distributed(
        paths(tmp_path, preprocessed_dir, "uninterrupted"), model, cfg, threads=2
    )
    assert resumed["global_step"] == uninterrupted["global_step"] == 40 * 5
    resumed_weights = load_artifact(run.model_out)[0].state_dict()
    reference = load_artifact(tmp_path / "uninterrupted" / "model.pt")[0].state_dict()
    for name, tensor in reference.items():
        assert torch.allclose(resumed_weights[name], tensor, atol=1e-6), name
    curves = pd.read_csv(run.metrics_out)
    assert sorted(curves["epoch"].unique()) == list(range(40))


def _trim_threshold() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_cluster_leaves_glibc_malloc_alone(tmp_path, monkeypatch):
    # Dask's default MALLOC_TRIM_THRESHOLD_ makes a freshly started process map and unmap
    # every large tensor buffer each step (1.6x slower training steps): neither the
    # workers nor processes later started from the driver may inherit it.
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with dask_cluster(DistributedConfig(workers=2), tmp_path / "dask") as client:
        assert set(client.run(_trim_threshold).values()) == {None}
    assert _trim_threshold() is None


def test_train_model_runs_one_process_for_one_worker(tmp_path, preprocessed_dir):
    record = train_model(
        paths(tmp_path, preprocessed_dir, "one"),
        plain_sgd(16),
        DistributedConfig(workers=1),
        threads=1,
        extra_meta={"allocation": {}},
    )
    assert record["world_size"] == 1 and "launcher" not in record


def test_cuda_cluster_without_gpus_is_a_clear_error(tmp_path, preprocessed_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from aihpc.errors import InputError

    with pytest.raises(InputError, match="torch sees 0 CUDA device"):
        fit_distributed(
            paths(tmp_path, preprocessed_dir, "cuda"),
            plain_sgd(8),
            DistributedConfig(cluster="cuda", workers=2),
            threads=2,
        )
