"""GPU check of the Dask launcher (run through bench/gpu_check.sh, which installs what a GPU
machine lacks first).

1. 1 GPU through dask-cuda (``aihpc.distributed``, cluster ``cuda``, 1 worker) against
   plain single-GPU Lightning (``aihpc.train.fit`` in this process): median step time,
   alternating over rounds; goal throughput ratio >= 0.97.
2. 2 ranks with NCCL through dask-cuda when 2 or more GPUs are visible: scaling 1 -> 2.
3. bf16: every run above trains with precision ``auto`` (bf16-mixed on GPU) on a
   learnable synthetic task; the check fails unless the record says bf16-mixed and the
   validation accuracy is far above chance.

``--dry`` runs the same code on the CPU (cluster ``local``, gloo, bf16-mixed on CPU, a
smaller task) so everything but the CUDA specifics is checked without a GPU.

    bench/gpu_check.sh [--dry] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import aihpc  # noqa: F401  (sets the package's OMP_WAIT_POLICY default before torch loads)
from aihpc.files import write_json

if TYPE_CHECKING:
    from aihpc.config import ModelConfig
    from aihpc.train import TrainPaths

GOAL = 0.97  # throughput through dask-cuda / plain Lightning
MIN_ACCURACY = 0.5  # 10 classes: chance is 0.1
THREADS = 2  # torch threads per rank


def model_config(dry: bool) -> ModelConfig:
    """precision auto on the GPU: what the workflow trains with there (bf16-mixed); the dry
    run asks for bf16-mixed on the CPU."""
    from aihpc.config import ModelConfig, TrainConfig

    # No augmentation: a flipped or shifted class pattern is no longer that pattern.
    common = {"lr": 0.05, "crop_padding": 0, "hflip": False}
    if dry:
        train = TrainConfig(
            epochs=1, batch_size=64, accelerator="cpu", precision="bf16-mixed", **common
        )
    else:
        train = TrainConfig(epochs=3, batch_size=512, accelerator="gpu", **common)
    return ModelConfig(name="gpu-check", arch="resnet_s", train=train)


def make_data(root: Path, n_train: int, size: int) -> Path:
    """CIFAR-shaped images whose class is recoverable: a fixed random pattern per class
    plus noise, so a training run that works (bf16 included) beats chance clearly."""
    from aihpc.data import RawDataset, Split, preprocess

    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (10, size, size, 3))

    def split(n: int) -> Split:
        labels = rng.integers(0, 10, n)
        noise = rng.integers(-64, 65, (n, size, size, 3))
        images = np.clip(patterns[labels] // 2 + noise + 64, 0, 255).astype(np.uint8)
        return Split(images, labels.astype(np.int64))

    raw = RawDataset("gpu-check", split(n_train), split(512), [str(i) for i in range(10)], {})
    preprocess(raw, root, val_fraction=0.1, seed=0)
    return root


def train_paths(data: Path, work: Path) -> TrainPaths:
    from aihpc.train import TrainPaths

    return TrainPaths(data, work / "model.pt", work / "metrics.csv", work / "work")


def run(data: Path, work: Path, dry: bool, cluster: str | None, workers: int = 1) -> dict:
    """One training run: plain Lightning in a fresh process, as the train rule runs it
    (``cluster`` None; it also keeps CUDA and OpenMP state out of this process, whose
    CPU workers are forked), or ranks on a Dask cluster."""
    from aihpc.config import DistributedConfig
    from aihpc.distributed import fit_distributed

    started = time.perf_counter()
    if cluster is None:
        cmd = [sys.executable, __file__, "--plain", str(data), str(work)]
        record = json.loads(
            subprocess.run(
                [*cmd, *(["--dry"] if dry else [])], check=True, capture_output=True, text=True
            ).stdout.splitlines()[-1]
        )
    else:
        cfg = DistributedConfig(cluster=cluster, workers=workers)
        record = fit_distributed(
            train_paths(data, work), model_config(dry), cfg, threads=THREADS * workers
        )
    record["wall_s"] = time.perf_counter() - started
    return record


def check_record(label: str, record: dict, precision: str) -> list[str]:
    problems = []
    if record["precision"] != precision:
        problems.append(f"{label}: precision {record['precision']}, expected {precision}")
    if not record["best_val_accuracy"] or record["best_val_accuracy"] < MIN_ACCURACY:
        problems.append(f"{label}: val accuracy {record['best_val_accuracy']} < {MIN_ACCURACY}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU only: no CUDA, same code")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--plain", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.plain:
        from aihpc.train import fit

        record = fit(train_paths(*args.plain), model_config(args.dry), threads=THREADS)
        print(json.dumps(record, default=str))
        return
    precision = "bf16-mixed"
    if args.dry:
        cluster, gpus, n_train, size = "local", 0, 2048, 16
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --dry on a CPU machine")
        cluster, gpus, n_train, size = "cuda", torch.cuda.device_count(), 32768, 32
    device = "cpu" if args.dry else torch.cuda.get_device_name(0)
    print(f"device {device}, {gpus} GPU(s), torch {torch.__version__}, cluster {cluster}")

    figures: dict = {"device": device, "gpus": gpus, "dry": args.dry}
    problems: list[str] = []
    steps: dict[str, list[float]] = {"plain": [], "dask": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", n_train, size)
        for round_ in range(args.rounds):
            for label, via in (("plain", None), ("dask", cluster)):
                record = run(data, Path(tmp) / f"{label}-{round_}", args.dry, via)
                steps[label].append(record["step_time_s"])
                problems += check_record(f"{label} round {round_}", record, precision)
                print(
                    f"{label:5s} round {round_}: step {record['step_time_s'] * 1000:.2f} ms, "
                    f"val acc {record['best_val_accuracy']:.3f}, {record['precision']}, "
                    f"wall {record['wall_s']:.1f} s"
                )
        plain, dask = (statistics.median(steps[k]) for k in ("plain", "dask"))
        figures.update(plain_step_ms=plain * 1000, dask_step_ms=dask * 1000, ratio=plain / dask)
        print(f"throughput 1 GPU dask-{cluster} / plain Lightning: {plain / dask:.3f} "
              f"(goal >= {GOAL})")  # fmt: skip
        if gpus >= 2:
            record = run(data, Path(tmp) / "two", args.dry, cluster, workers=2)
            problems += check_record("2 ranks", record, precision)
            two = record["step_time_s"]
            # Same per-rank batch, twice the samples per step.
            figures.update(two_rank_step_ms=two * 1000, scaling=2 * dask / two)
            print(f"2 ranks (NCCL): step {two * 1000:.2f} ms, scaling 1 -> 2: {2 * dask / two:.2f}")
        else:
            print("2 ranks (NCCL): skipped, fewer than 2 GPUs")
    figures["problems"] = problems
    if args.out:
        write_json(args.out, figures)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems:
        sys.exit(1)
    print("gpu check passed" + (" (dry run on CPU)" if args.dry else ""))


if __name__ == "__main__":
    main()
