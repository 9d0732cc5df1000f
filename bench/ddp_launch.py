"""What launching DDP ranks through Dask costs: the same 2-rank training step launched by
Dask (aihpc.distributed), by torchrun running the same Lightning code, and by torchrun
running a plain-PyTorch DDP loop; plus 1 rank vs 2 ranks through Dask.

All variants train the default resnet_s on the same in-memory arrays with gloo, the same
per-rank batch and one torch thread per rank, and report the median step time after
warm-up (aihpc.train.StepTimer; the plain loop times its steps the same way). Variants
alternate over several rounds in one invocation; ratios are of medians.

The torchrun children get the environment this process had before any Dask cluster
started (plus OMP_NUM_THREADS=1): a Dask nanny exports its pre-spawn variables into the
driver's os.environ, and glibc honours MALLOC_TRIM_THRESHOLD_ in a freshly started
process (not in a forked Dask worker), which once made the torchrun ranks 1.6x slower.
Every rank reports its torch thread count and malloc/OpenMP variables; the benchmark
stops if the launchers differ.

    .venv/bin/python bench/ddp_launch.py [--rounds 3] [--epochs 1] [--train-images 6144]
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
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import aihpc  # noqa: F401  (sets the package's OMP_WAIT_POLICY default before torch loads)

BATCH = 128  # per rank
THREADS = 1  # per rank
# What the ranks of every launcher must agree on.
ENV_KEYS = ("OMP_WAIT_POLICY", "MALLOC_TRIM_THRESHOLD_")
# The environment before any Dask cluster touched os.environ.
LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}


def rank_settings(threads: int, env: Mapping[str, str] = os.environ) -> dict:
    """What a rank runs with that changes its speed: torch threads and the variables that
    the OpenMP runtime and glibc read when the process starts."""
    return {"threads": threads, **{key: env.get(key) for key in ENV_KEYS}}


def make_data(root: Path, n_train: int) -> Path:
    """Fashion-MNIST-shaped arrays (synthetic pixels: only speed is measured)."""
    from aihpc.data import RawDataset, Split, preprocess

    rng = np.random.default_rng(0)
    raw = RawDataset(
        name="bench",
        train=Split(
            rng.integers(0, 256, (n_train, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, 10, n_train).astype(np.int64),
        ),
        test=Split(
            rng.integers(0, 256, (256, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, 10, 256).astype(np.int64),
        ),
        class_names=[str(i) for i in range(10)],
        sources={},
    )
    preprocess(raw, root, val_fraction=0.0, seed=0)
    return root


def model_config(epochs: int):
    from aihpc.config import ModelConfig, TrainConfig

    train = TrainConfig(epochs=epochs, batch_size=BATCH, accelerator="cpu", crop_padding=0)
    return ModelConfig(name="bench", arch="resnet_s", kwargs={"widths": [16, 32, 64]}, train=train)


def run_dask(data: Path, work: Path, epochs: int, workers: int) -> dict:
    from aihpc.config import DistributedConfig
    from aihpc.distributed import fit_distributed
    from aihpc.train import TrainPaths

    paths = TrainPaths(data, work / "model.pt", work / "metrics.csv", work / "work")
    started = time.perf_counter()
    record = fit_distributed(
        paths, model_config(epochs), DistributedConfig(workers=workers), threads=workers * THREADS
    )
    setup = max(r["wall_seconds"] - r["train_seconds"] for r in record["ranks"])
    return {
        # Forked workers keep the OpenMP and malloc state this process set up at start.
        "settings": rank_settings(record["ranks"][0]["threads"], LAUNCH_ENV),
        "step_time_s": record["step_time_s"],
        "cluster_start_s": record["cluster_start_seconds"],
        "rank_setup_s": setup,  # process-group init + Lightning setup inside the ranks
        "total_s": time.perf_counter() - started,
    }


def run_torchrun(mode: str, data: Path, work: Path, epochs: int) -> dict:
    work.mkdir(parents=True)
    out = work / "result.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        __file__, "--child", mode, "--data", str(data), "--work", str(work),
        "--epochs", str(epochs), "--out", str(out),
    ]  # fmt: skip
    subprocess.run(
        cmd, check=True, env=LAUNCH_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return json.loads(out.read_text())


def free_port() -> int:
    from aihpc.distributed import free_port as pick

    return pick()


def child_lightning(data: Path, work: Path, epochs: int) -> dict:
    """The same fit() the Dask ranks run, with rank and rendezvous from torchrun."""
    from datetime import timedelta

    from pytorch_lightning.strategies import DDPStrategy

    from aihpc.distributed import DaskClusterEnvironment
    from aihpc.train import TrainPaths, fit

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    env = DaskClusterEnvironment(
        world, rank, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    )
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=120))
    paths = TrainPaths(data, work / "model.pt", work / "metrics.csv", work / "work")
    record = fit(
        paths,
        model_config(epochs),
        threads=THREADS,
        env=env,
        strategy=strategy,
        num_nodes=world,
    )
    return {"step_time_s": record["step_time_s"], "settings": rank_settings(record["threads"])}


def child_plain(data: Path, epochs: int) -> dict:
    """Plain-PyTorch DDP: same model, data slicing, sampler, optimizer and loss."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    from aihpc.data import load_split, read_stats
    from aihpc.models import build_model, model_spec

    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = model_config(epochs)
    model = build_model(model_spec("resnet_s", read_stats(data), **cfg.kwargs))
    model = DistributedDataParallel(model.to(memory_format=torch.channels_last))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    images, labels = load_split(data, "train", mmap=False)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(labels)
    sampler = DistributedSampler(range(len(labels)), num_replicas=world, rank=rank, seed=0)
    times, step = [], 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        for start in range(0, len(order) - BATCH + 1, BATCH):
            index = order[start : start + BATCH]
            started = time.perf_counter()
            x = images[index].float().div_(255).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), labels[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step > 5:  # the same warm-up StepTimer skips
                times.append(time.perf_counter() - started)
    dist.destroy_process_group()
    return {
        "step_time_s": statistics.median(times),
        "settings": rank_settings(torch.get_num_threads()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=6144)
    parser.add_argument("--child", choices=["lightning", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child == "lightning":
            result = child_lightning(args.data, args.work, args.epochs)
        else:
            result = child_plain(args.data, args.epochs)
        if int(os.environ["RANK"]) == 0:
            args.out.write_text(json.dumps(result))
        return

    results: dict[str, list[dict]] = {
        "dask, 2 ranks": [],
        "torchrun + Lightning, 2 ranks": [],
        "torchrun + plain DDP, 2 ranks": [],
        "dask, 1 rank": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", args.train_images)
        for round_ in range(args.rounds):
            for label in results:
                work = Path(tmp) / f"{round_}-{label.replace(' ', '_').replace(',', '')}"
                if label.startswith("dask"):
                    workers = 2 if "2 ranks" in label else 1
                    result = run_dask(data, work, args.epochs, workers)
                else:
                    mode = "lightning" if "Lightning" in label else "plain"
                    result = run_torchrun(mode, data, work, args.epochs)
                results[label].append(result)

    settings = {json.dumps(r["settings"], sort_keys=True) for rs in results.values() for r in rs}
    if len(settings) != 1:
        sys.exit(f"launchers ran with different settings, not comparable: {sorted(settings)}")
    print(f"every rank: {settings.pop()}; load average {os.getloadavg()[0]:.2f}")

    def median(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

    print(f"per-rank batch {BATCH}, {THREADS} thread(s) per rank, gloo, rounds {args.rounds}")
    print(f"{'launcher':34s} {'step ms':>8s} {'samples/s':>10s}")
    for label in results:
        ranks = 2 if "2 ranks" in label else 1
        step = median(label, "step_time_s")
        print(f"{label:34s} {step * 1000:8.1f} {ranks * BATCH / step:10.0f}")
    dask = median("dask, 2 ranks", "step_time_s")
    for baseline in ("torchrun + Lightning, 2 ranks", "torchrun + plain DDP, 2 ranks"):
        ratio = median(baseline, "step_time_s") / dask
        print(f"throughput dask / {baseline}: {ratio:.3f}")
    scaling = 2 * median("dask, 1 rank", "step_time_s") / dask
    print(f"scaling 1 -> 2 ranks (throughput ratio): {scaling:.2f}")
    print(f"cluster start: {median('dask, 2 ranks', 'cluster_start_s'):.2f} s")
    setup = median("dask, 2 ranks", "rank_setup_s")
    print(f"process-group init + Lightning setup in ranks: {setup:.2f} s")


if __name__ == "__main__":
    main()
