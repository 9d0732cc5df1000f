"""Training-step throughput of the default model under different OpenMP settings.

Each setting runs in fresh processes (OMP_WAIT_POLICY is read when the OpenMP runtime
starts), alternating settings over several rounds; prints images/s and the ratio against
the 1-thread baseline measured in the same invocation. "x2 concurrent" runs two training
processes at once, as Snakemake does with two jobs on this machine.

    .venv/bin/python bench/omp_threads.py [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SETTINGS = [  # (label, threads per process, OMP_WAIT_POLICY, concurrent processes)
    ("1 thread", 1, "PASSIVE", 1),
    ("2 threads, PASSIVE", 2, "PASSIVE", 1),
    ("2 threads, ACTIVE", 2, "ACTIVE", 1),
    ("2 threads x2 concurrent, PASSIVE", 2, "PASSIVE", 2),
    ("2 threads x2 concurrent, ACTIVE", 2, "ACTIVE", 2),
]


def step_rate(threads: int, steps: int) -> float:
    """Images/s of SGD steps of the default resnet_s on a 256-image batch (in this process)."""
    import torch

    from aihpc.models import build_model, model_spec

    torch.set_num_threads(threads)
    stats = {"image_shape": [28, 28, 1], "num_classes": 10, "mean": [0.29], "std": [0.35]}
    model = build_model(model_spec("resnet_s", stats, widths=[16, 32, 64]))
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.rand(256, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (256,))
    for step in range(steps + 3):
        if step == 3:  # warm-up steps excluded
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * 256 / (time.perf_counter() - start)


def run_setting(threads: int, policy: str, processes: int, steps: int) -> float:
    """Mean images/s per process of ``processes`` concurrent child processes."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    cmd = [sys.executable, __file__, "--child", str(threads), "--steps", str(steps)]
    children = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)
    ]
    rates = [float(child.communicate()[0]) for child in children]
    return statistics.mean(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(step_rate(args.child, args.steps))
        return
    rates: dict[str, list[float]] = {label: [] for label, *_ in SETTINGS}
    for _ in range(args.rounds):
        for label, threads, policy, processes in SETTINGS:
            rates[label].append(run_setting(threads, policy, processes, args.steps))
    baseline = statistics.median(rates[SETTINGS[0][0]])
    print(f"{'setting':36s} {'img/s per process':>18s} {'vs 1 thread':>12s}")
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"{label:36s} {rate:18.0f} {rate / baseline:12.2f}")


if __name__ == "__main__":
    main()
