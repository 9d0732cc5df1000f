"""Compression sweep of the default model: accuracy, size and CPU latency of pruned,
fine-tuned and quantised variants against the eager and the compiled fp32 model.

1. Runs the workflow (Snakemake) on a config (default: config/config.yaml) whose
   ``compress.variants`` is replaced by a wider sweep, in ``--workdir``; the preprocessed
   data and the trained models are copied from ``results/`` when ``make run`` made them
   (``--rerun-triggers mtime`` keeps them), so only the compression stages run.
2. Re-times every variant in this one process, 1 thread: eager and ``torch.compile``
   (frozen Inductor graphs) at batch 1 and 256, the variants interleaved over ``--rounds``,
   each figure the best round's median of ``--repeats``; with ``--aot`` also each
   variant's AOTInductor package (``compress.compile_aot``: no Python per call), compared
   with the fp32 model's package. The workflow's own evaluate jobs run two at a time on a
   2-core machine, so their latencies are noisier.
3. Prints the Pareto table (Markdown) with accuracy from the workflow's evaluation, and the
   goal check for ``--best`` (50 % channels + int8 after fine-tuning) against compiled fp32.

    .venv/bin/python bench/compress.py [--config config/config.yaml] [--rounds 3]
    .venv/bin/python bench/compress.py --skip-workflow   # re-time an earlier sweep only
    .venv/bin/python bench/compress.py --skip-workflow --aot  # ... AOTInductor packages too
    .venv/bin/python bench/compress.py --sweep best --finetune-epochs 10 \\
        --workdir work/bench-compress-long               # the goal's variant, longer fine-tune
    .venv/bin/python bench/compress.py --sweep best --distill-weight 0.9 \\
        --workdir work/bench-compress-kd                 # ... distilled from the unpruned model
    .venv/bin/python bench/compress.py --config config/cifar10.yaml --sweep best \\
        --workdir work/bench-compress-cifar10            # CIFAR-10 (../shared/data)
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aihpc.compress import compile_aot, compile_for_cpu  # noqa: E402
from aihpc.config import QUANT_MODES, load_config  # noqa: E402
from aihpc.evaluate import median_forward_ms  # noqa: E402
from aihpc.models import load_artifact  # noqa: E402
from aihpc.provenance import cpu_info, package_versions  # noqa: E402
from aihpc.report import pareto_mask  # noqa: E402

SWEEP = [
    {"prune": {"method": "structured", "ratio": 0.25}, "quant": "int8"},
    {"prune": {"method": "structured", "ratio": 0.5}, "quant": "int8"},
    {"prune": {"method": "structured", "ratio": 0.7}, "quant": "int8"},
    {"prune": {"method": "unstructured", "ratio": 0.5}},
    {"prune": {"method": "unstructured", "ratio": 0.8}},
    {"prune": {"method": "unstructured", "ratio": 0.8, "gradual": True}},
]
# Every quantisation mode on the unpruned model.
QUANT_ONLY = [{"quant": mode} for mode in QUANT_MODES]
# --sweep best: the goal's variant alone (e.g. with a longer --finetune-epochs); modes: it and
# the quantisation modes.
SWEEPS = {"wide": SWEEP + QUANT_ONLY, "best": [SWEEP[1]], "modes": [SWEEP[1], *QUANT_ONLY]}
BATCHES = (1, 256)


def run_workflow(
    config_path: Path, workdir: Path, cores: int, sweep: str, finetune: dict, distill: dict
) -> Path:
    """The workflow on the config with the chosen sweep; returns the summary CSV."""
    config = load_config(config_path)
    model = next(iter(config["models"]))
    config["compress"]["variants"] = [{"model": model, **entry} for entry in SWEEPS[sweep]]
    config["compress"]["finetune"].update(finetune)
    config["compress"]["distill"].update(distill)
    # A relative data root means the repository root's, as for `make run`.
    config["data"]["root"] = str(ROOT / config["data"]["root"])
    results = Path(config["results"])
    dataset = config["data"]["name"]
    config["results"] = "results"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # Reuse what `make run` made (copy2 keeps the mtimes Snakemake compares).
    source = ROOT / results / dataset
    target = workdir / "results" / dataset
    for name in ["data", *config["models"]]:
        if (source / name).is_dir() and not (target / name).exists():
            shutil.copytree(source / name, target / name, copy_function=shutil.copy2)
            for stale in (target / name).glob("eval.json"):
                stale.unlink()  # older evaluations lack the compiled latencies
    cmd = [
        str(Path(sys.executable).parent / "snakemake"),
        "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"),
        "--cores", str(cores),
        "--rerun-triggers", "mtime",
        "--show-failed-logs",
    ]  # fmt: skip
    started = time.perf_counter()
    with open(workdir / "snakemake.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"workflow: {time.perf_counter() - started:.0f} s (log: {workdir / 'snakemake.log'})")
    return workdir / "results" / "summary.csv"


def retime(
    summary: pd.DataFrame,
    results_dir: Path,
    rounds: int,
    repeats: int,
    threads: int,
    cpp: bool = False,
    aot_dir: Path | None = None,
) -> pd.DataFrame:
    """Best-round median latency, eager and compiled (and AOTInductor-compiled with
    ``aot_dir`` for the packages), for every variant of the summary."""
    torch.set_num_threads(threads)
    first = load_artifact(results_dir / summary["variant"].iloc[0] / "model.pt")[1]["spec"]
    shape = (first["in_channels"], first["input_size"], first["input_size"])
    inputs = {
        b: torch.rand(b, *shape, generator=torch.Generator().manual_seed(0)).contiguous(
            memory_format=torch.channels_last
        )
        for b in BATCHES
    }
    runners = {}  # variant -> mode -> batch size -> callable
    for variant in summary["variant"]:
        model, record = load_artifact(results_dir / variant / "model.pt")
        if record.get("format") != "program":
            model = model.to(memory_format=torch.channels_last)
        compiled = compile_for_cpu(model, cpp_wrapper=cpp)
        runners[variant] = {"eager": dict.fromkeys(BATCHES, model)}
        runners[variant]["compiled"] = dict.fromkeys(BATCHES, compiled)
        if aot_dir is not None:  # one package per batch size
            aot_dir.mkdir(parents=True, exist_ok=True)
            runners[variant]["aot"] = {
                b: compile_aot(model, x, aot_dir / f"{variant}-b{b}.pt2") for b, x in inputs.items()
            }
    best: dict[tuple[str, str, int], float] = {}
    for round_ in range(rounds):
        for variant, modes in runners.items():
            for mode, by_batch in modes.items():
                for b, x in inputs.items():
                    ms = median_forward_ms(by_batch[b], x, warmup=3, repeats=repeats)
                    key = (variant, mode, b)
                    best[key] = min(best.get(key, float("inf")), ms)
        print(f"timing round {round_ + 1}/{rounds} done")
    rows = []
    for variant, modes in runners.items():
        row = {"variant": variant}
        for b in BATCHES:
            for mode in modes:
                row[f"{mode}_b{b}"] = best[(variant, mode, b)]
            row[f"best_b{b}"] = min(row[f"eager_b{b}"], row[f"compiled_b{b}"])
        rows.append(row)
    return pd.DataFrame(rows)


def table(summary: pd.DataFrame, timing: pd.DataFrame) -> pd.DataFrame:
    frame = summary.merge(timing, on="variant")
    base = frame[frame["variant"] == frame["model"]].set_index("model")
    ref = {col: frame["model"].map(base[col]) for col in base.columns}
    out = pd.DataFrame(
        {
            "variant": frame["variant"],
            "acc %": 100 * frame["test_accuracy"],
            "Δacc pts": 100 * (frame["test_accuracy"] - ref["test_accuracy"]),
            "size KiB": frame["size_bytes"] / 1024,
            "x smaller": ref["size_bytes"] / frame["size_bytes"],
            "params": frame["params"],
            "non-zeros": frame["nonzeros"],
            "MMACs": frame["macs"] / 1e6,
        }
    )
    for b in BATCHES:
        out[f"b{b} eager ms"] = frame[f"eager_b{b}"]
        out[f"b{b} compiled ms"] = frame[f"compiled_b{b}"]
        out[f"b{b} x eager fp32"] = ref[f"eager_b{b}"] / frame[f"best_b{b}"]
        out[f"b{b} x compiled fp32"] = ref[f"compiled_b{b}"] / frame[f"best_b{b}"]
        if f"aot_b{b}" in frame:  # both sides AOTInductor-compiled
            out[f"b{b} AOT ms"] = frame[f"aot_b{b}"]
            out[f"b{b} AOT x AOT fp32"] = ref[f"aot_b{b}"] / frame[f"aot_b{b}"]
    fronts = []
    for cost in ("best_b1", "best_b256", "size_bytes"):
        fronts.append(pareto_mask(frame[cost], frame["test_accuracy"]))
    out["Pareto (b1/b256/size)"] = [
        "/".join("★" if f[i] else "·" for f in fronts) for i in range(len(frame))
    ]
    return out.sort_values("variant", ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--workdir", type=Path, default=ROOT / "work" / "bench-compress")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--best", default="resnet_s-struct0.5-int8")
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default="wide")
    parser.add_argument("--finetune-epochs", type=int, help="override compress.finetune.epochs")
    parser.add_argument("--finetune-lr", type=float, help="override compress.finetune.lr")
    parser.add_argument("--distill-weight", type=float, help="override compress.distill.weight")
    parser.add_argument(
        "--distill-temperature", type=float, help="override compress.distill.temperature"
    )
    parser.add_argument("--skip-workflow", action="store_true")
    parser.add_argument("--cpp-wrapper", action="store_true", help="Inductor's C++ wrapper")
    parser.add_argument(
        "--aot", action="store_true", help="also time AOTInductor packages (in WORKDIR/aot)"
    )
    args = parser.parse_args()

    summary_csv = args.workdir / "results" / "summary.csv"
    if not args.skip_workflow:
        finetune = {"epochs": args.finetune_epochs, "lr": args.finetune_lr}
        finetune = {k: v for k, v in finetune.items() if v is not None}
        distill = {"weight": args.distill_weight, "temperature": args.distill_temperature}
        distill = {k: v for k, v in distill.items() if v is not None}
        summary_csv = run_workflow(
            args.config, args.workdir, args.cores, args.sweep, finetune, distill
        )
    summary = pd.read_csv(summary_csv)
    dataset = summary["dataset"].iloc[0]
    timing = retime(
        summary,
        args.workdir / "results" / dataset,
        args.rounds,
        args.repeats,
        args.threads,
        args.cpp_wrapper,
        args.workdir / "aot" if args.aot else None,
    )
    result = table(summary, timing)
    cpu = cpu_info()
    versions = package_versions()
    print(
        f"\n{dataset}, CPU {cpu['model']} ({', '.join(cpu['flags'])}), {args.threads} thread(s), "
        f"torch {versions['torch']}, Python {platform.python_version()}; latency = best of "
        f"{args.rounds} rounds' median of {args.repeats}"
        f"{'; compiled with the C++ wrapper' if args.cpp_wrapper else ''}\n"
    )
    print(result.to_markdown(index=False, floatfmt=".3g"))
    if args.best in set(result["variant"]):
        row = result.set_index("variant").loc[args.best]
        checks = [
            ("≥ 4x smaller file", row["x smaller"], 4.0),
            ("≥ 4x faster at b=256 vs compiled fp32", row["b256 x compiled fp32"], 4.0),
            ("≥ 1.5x faster at b=1 vs compiled fp32", row["b1 x compiled fp32"], 1.5),
        ]
        if args.aot:
            checks += [
                ("≥ 4x faster at b=256, both AOTInductor", row["b256 AOT x AOT fp32"], 4.0),
                ("≥ 1.5x faster at b=1, both AOTInductor", row["b1 AOT x AOT fp32"], 1.5),
            ]
        print(f"\ngoals for {args.best}:")
        for label, value, goal in checks:
            print(f"  {label}: {value:.2f}x {'met' if value >= goal else 'MISSED'}")
        loss = -row["Δacc pts"]
        print(f"  ≤ 0.5 point accuracy loss: {loss:.2f} {'met' if loss <= 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
