"""Does ``client.map`` on one Dask cluster pay off for the stages other than training?

evaluate: N model variants scored as the workflow does it (``aihpc.evaluate.
evaluate_to_json`` with config/config.yaml's evaluate settings), either as one fresh process
per variant with two running at a time (Snakemake with --cores 2 and evaluate.threads 1,
without Snakemake's own per-job cost) or as one process that opens a 2-worker LocalCluster
(``aihpc.distributed.dask_cluster``) and maps ``evaluate_to_json`` over the variants.

preprocess: CIFAR-10 (the 50k+10k npz in ../shared/data/cifar10) through
``aihpc.data.prepare`` in one fresh process, and each phase of it timed in another; the
phases client.map could spread over workers (source checksums, per-channel mean/std) are
then timed in-process against a 2-worker cluster's start plus client.map over the files
and over image shards (shipping the shards included). Reading the npz and writing the
arrays stay with one process either way.

Each path starts as a fresh process (imports count: a Snakemake job pays them too); paths
alternate over rounds in one invocation; ratios are of medians.

    .venv/bin/python bench/dask_map.py [--rounds 2] [--variants 4] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import aihpc  # noqa: F401  (sets the package's OMP_WAIT_POLICY default before torch loads)
from aihpc.files import read_json

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
CORES = 2  # Snakemake --cores on this machine; also the Dask worker count
# config/config.yaml's evaluate section, except compile (a flag here)
EVALUATE = {"threads": 1, "warmup": 3, "repeats": 10, "latency_batch_sizes": [1, 256]}
WIDTHS = [[16, 32, 64], [8, 16, 32], [12, 24, 48], [24, 48, 96], [16, 32, 32], [8, 16, 64]]


def make_variants(root: Path, count: int) -> tuple[Path, list[Path]]:
    """Fashion-MNIST-shaped test data (10,000 images) and ``count`` untrained resnet_s
    artifacts of different widths: only evaluation cost is measured."""
    from aihpc.data import RawDataset, Split, preprocess
    from aihpc.models import build_model, model_spec, save_artifact

    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        return Split(images, rng.integers(0, 10, n).astype(np.int64))

    raw = RawDataset("bench", split(512), split(10_000), [str(i) for i in range(10)], {})
    data = root / "data"
    stats = preprocess(raw, data, val_fraction=0.0, seed=0)
    models = []
    for i in range(count):
        spec = model_spec("resnet_s", stats, widths=WIDTHS[i % len(WIDTHS)])
        models.append(root / f"v{i}" / "model.pt")
        save_artifact(build_model(spec), spec, models[-1], variant=f"v{i}")
    return data, models


def child_evaluate(data: Path, models: list[Path], compile: bool) -> None:
    """One Snakemake evaluate job: one variant per process."""
    from aihpc.evaluate import evaluate_to_json

    for model in models:
        evaluate_to_json(model, data, model.with_name("eval.json"), **EVALUATE, compile=compile)


def child_map(data: Path, models: list[Path], compile: bool, scratch: Path) -> None:
    """All variants in one process: a 2-worker LocalCluster, one task per variant."""
    from aihpc.config import DistributedConfig
    from aihpc.distributed import dask_cluster
    from aihpc.evaluate import evaluate_to_json

    outs = [model.with_name("eval.json") for model in models]
    with dask_cluster(DistributedConfig(workers=CORES), scratch) as client:
        futures = client.map(
            evaluate_to_json, models, [data] * len(models), outs,
            **EVALUATE, compile=compile, pure=False,
        )  # fmt: skip
        client.gather(futures)


def child_prepare(out: Path, phases: bool) -> dict[str, float]:
    """CIFAR-10 through prepare; with ``phases``, the same steps timed one by one."""
    from aihpc.config import DataConfig
    from aihpc.data import _channel_mean_std, _stratified_split, load_dataset, prepare
    from aihpc.files import file_sha256

    cfg = DataConfig(
        name="cifar10",
        format="npz",
        root=str(CIFAR),
        train_file="cifar10-jpeg-train.npz",
        test_file="cifar10-jpeg-test.npz",
    )
    if not phases:
        prepare(cfg, out)
        return {}
    times, started = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        times[name] = time.perf_counter() - started
        started = time.perf_counter()

    raw = load_dataset(cfg.name, cfg.format, CIFAR, train_file=cfg.train_file,
                       test_file=cfg.test_file)  # fmt: skip
    lap("read + checksum")
    for file in (cfg.train_file, cfg.test_file):
        file_sha256(CIFAR / file)
    lap("checksum alone")
    train, _ = _stratified_split(raw.train.labels.astype(np.int64), 10, cfg.val_fraction, 0)
    images = raw.train.images[train]
    lap("split")
    mean_std = _channel_mean_std(images)
    lap("mean/std")
    times["checksum + mean/std"] = times["checksum alone"] + times["mean/std"]

    from aihpc.config import DistributedConfig
    from aihpc.distributed import dask_cluster

    started = time.perf_counter()
    with dask_cluster(DistributedConfig(workers=CORES), out / "dask") as client:
        sums = client.map(file_sha256, [CIFAR / cfg.train_file, CIFAR / cfg.test_file])
        shards = np.array_split(images, CORES)
        parts = client.gather(client.map(_channel_mean_std, shards))
        client.gather(sums)
    lap("client.map: checksum + mean/std")
    if not np.allclose(merge_mean_std(parts, [len(s) for s in shards]), mean_std):
        sys.exit("sharded mean/std differs from prepare's")
    return times


def merge_mean_std(
    parts: list[tuple[list[float], list[float]]], counts: list[int]
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the union of shards from each shard's mean, std, count."""
    means, stds = (np.array([p[i] for p in parts]) for i in (0, 1))
    weights = np.array(counts, dtype=np.float64)[:, np.newaxis] / sum(counts)
    mean = (weights * means).sum(axis=0)
    var = (weights * (stds**2 + means**2)).sum(axis=0) - mean**2
    return mean.tolist(), np.sqrt(var).tolist()


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def child_cmd(mode: str, *args: str) -> list[str]:
    return [sys.executable, __file__, "--child", mode, *args]


def run_separate(data: Path, models: list[Path], compile: bool) -> float:
    flag = ["--compile"] if compile else ["--no-compile"]
    started = time.perf_counter()
    with ThreadPoolExecutor(CORES) as pool:
        cmds = [child_cmd("evaluate", str(data), str(m), *flag) for m in models]
        list(pool.map(timed, cmds))
    return time.perf_counter() - started


def eval_field(models: list[Path], key: str) -> list[float]:
    """``key`` of each model's eval.json."""
    return [read_json(m.with_name("eval.json"))[key] for m in models]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--child", choices=["evaluate", "map", "prepare", "phases"],
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child in ("evaluate", "map"):
        data, *models = args.paths
        if args.child == "evaluate":
            child_evaluate(data, models, args.compile)
        else:
            child_map(data, models, args.compile, data.parent / "dask")
        return
    if args.child:
        times = child_prepare(args.paths[0], phases=args.child == "phases")
        print(json.dumps(times))
        return

    flag = "--compile" if args.compile else "--no-compile"
    walls: dict[str, list[float]] = {"separate": [], "map": [], "prepare": []}
    phases: list[dict[str, float]] = []
    seen: dict[str, list[list[float]]] = {"separate": [], "map": []}
    with tempfile.TemporaryDirectory() as tmp:
        data, models = make_variants(Path(tmp), args.variants)
        for round_ in range(args.rounds):
            walls["separate"].append(run_separate(data, models, args.compile))
            seen["separate"].append(eval_field(models, "latency_b256_ms"))
            separate_acc = eval_field(models, "test_accuracy")
            cmd = child_cmd("map", str(data), *map(str, models), flag)
            walls["map"].append(timed(cmd))
            seen["map"].append(eval_field(models, "latency_b256_ms"))
            if eval_field(models, "test_accuracy") != separate_acc:
                sys.exit("client.map and separate processes scored the variants differently")
            walls["prepare"].append(timed(child_cmd("prepare", f"{tmp}/cifar-{round_}")))
            out = subprocess.run(
                child_cmd("phases", f"{tmp}/phases"), check=True, capture_output=True, text=True
            ).stdout
            phases.append(json.loads(out.splitlines()[-1]))

    wall = {k: statistics.median(v) for k, v in walls.items()}
    print(f"load average {os.getloadavg()[0]:.2f}; rounds {args.rounds}; compile {args.compile}")
    print(f"evaluate {args.variants} variants, {CORES} at a time:")
    print(f"  separate processes      {wall['separate']:7.1f} s")
    print(f"  client.map, 2 workers   {wall['map']:7.1f} s  (cluster start included)")
    print(f"  speed-up of client.map: {wall['separate'] / wall['map']:.2f}x")
    for path, runs in seen.items():
        per_variant = [statistics.median(v) for v in zip(*runs, strict=True)]
        print(f"  latency b256 ms, {path:9s}: " + " ".join(f"{x:.1f}" for x in per_variant))
    print(f"preprocess CIFAR-10 (prepare, fresh process): {wall['prepare']:.1f} s; in-process:")
    phase = {name: statistics.median(p[name] for p in phases) for name in phases[0]}
    for name, seconds in phase.items():
        print(f"  {name:34s} {seconds:6.2f} s")
    gain = phase["checksum + mean/std"] / phase["client.map: checksum + mean/std"]
    print(f"  speed-up of client.map on the shardable part: {gain:.2f}x")


if __name__ == "__main__":
    main()
