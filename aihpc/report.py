"""Summary table and figures built from evaluation JSONs and Lightning training logs.

Figures use matplotlib's object-oriented ``Figure`` API, which renders with the Agg
canvas without going through pyplot: no global backend switch for whoever imports this
module, and no figure registry that could leak memory in long-running processes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from aihpc.errors import InputError
from aihpc.files import atomic_path, read_json

SUMMARY_COLUMNS = [
    "variant",
    "model",
    "dataset",
    "test_accuracy",
    "latency_b1_ms",
    "latency_b256_ms",
    "size_bytes",
    "params",
    "nonzeros",
    "train_seconds",
]
DPI = 120


def flatten_eval(result: Mapping[str, Any]) -> dict[str, Any]:
    """One summary row: nested dicts become dotted keys, per-class accuracy becomes
    ``acc.<class>`` columns, and lists (confusion matrix, class names, ...) are dropped."""
    row: dict[str, Any] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                add(f"{prefix}.{key}", item)
        elif not isinstance(value, list):
            row[prefix] = value

    for key, value in result.items():
        add("acc" if key == "per_class_accuracy" else key, value)
    return row


def summarize(eval_jsons: Sequence[Path], out_csv: Path) -> pd.DataFrame:
    """Collect evaluation JSONs into one CSV row per variant, sorted by variant."""
    if not eval_jsons:
        raise ValueError("summarize needs at least one evaluation JSON")
    rows = []
    for path in eval_jsons:
        row = flatten_eval(read_json(path))
        missing = [column for column in SUMMARY_COLUMNS if column not in row]
        if missing:
            raise InputError(f"{path}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    counts = Counter(row["variant"] for row in rows)
    duplicates = sorted(variant for variant, count in counts.items() if count > 1)
    if duplicates:
        raise InputError(f"duplicate variant name(s) in evaluation JSONs: {duplicates}")

    frame = add_baseline_ratios(pd.DataFrame(rows))
    if "predicted_train_seconds" in frame:  # trained by the allocator's plan
        # Measured over predicted, minus 1: > 0 when training took longer than planned.
        frame["prediction_error"] = frame["train_seconds"] / frame["predicted_train_seconds"] - 1
    extra = sorted(set(frame.columns) - set(SUMMARY_COLUMNS))
    frame = frame[SUMMARY_COLUMNS + extra].sort_values("variant", ignore_index=True)
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def add_baseline_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Each row against its model's uncompressed fp32 row (the one whose variant is the
    model's name): ``speedup_b<B>_vs_eager_fp32`` and ``speedup_b<B>_vs_compiled_fp32``
    (baseline latency / this row's ``latency_b<B>_ms``), ``speedup_b<B>_aot_vs_aot_fp32``
    (AOTInductor packages on both sides), ``size_ratio_vs_fp32`` (times
    smaller on disk) and ``accuracy_delta_vs_fp32``. Rows without a baseline get NaN; a
    frame without eager/compiled latencies or baselines is returned unchanged."""
    if "model" not in frame or not (frame["variant"] == frame["model"]).any():
        return frame
    base = frame[frame["variant"] == frame["model"]].set_index("model")
    ratios: dict[str, pd.Series] = {}
    for column in frame.columns:
        if match := re.fullmatch(r"latency_b(\d+)_ms", column):
            for mode in ("eager", "compiled"):
                reference = f"latency_{mode}_b{match[1]}_ms"
                if reference in frame:
                    ratios[f"speedup_b{match[1]}_vs_{mode}_fp32"] = (
                        frame["model"].map(base[reference]) / frame[column]
                    )
        elif match := re.fullmatch(r"latency_aot_b(\d+)_ms", column):  # package vs package
            ratios[f"speedup_b{match[1]}_aot_vs_aot_fp32"] = (
                frame["model"].map(base[column]) / frame[column]
            )
    if not ratios:
        return frame
    ratios["size_ratio_vs_fp32"] = frame["model"].map(base["size_bytes"]) / frame["size_bytes"]
    ratios["accuracy_delta_vs_fp32"] = frame["test_accuracy"] - frame["model"].map(
        base["test_accuracy"]
    )
    return frame.assign(**ratios)


def save_figure(fig: Figure, out_png: Path) -> None:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")


def epoch_curve(metrics: pd.DataFrame, column: str) -> pd.Series:
    """Per-epoch mean of a metric; rows where it was not logged (NaN) are ignored, so
    per-step training losses average into one point per epoch."""
    if column not in metrics:
        return pd.Series(dtype=float)
    return metrics.groupby("epoch")[column].mean().dropna()


def plot_training_curves(metrics_csvs: Mapping[str, Path], out_png: Path) -> None:
    """Loss (train solid, val dashed) and validation accuracy vs epoch, one colour per variant."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, (variant, path) in enumerate(sorted(metrics_csvs.items())):
        metrics = pd.read_csv(path)
        if "epoch" not in metrics:
            raise InputError(f"{path}: no 'epoch' column; not a Lightning CSVLogger metrics file")
        color = f"C{i % 10}"
        for column, style in (("train_loss", "-"), ("val_loss", "--")):
            curve = epoch_curve(metrics, column)
            if not curve.empty:
                label = f"{variant} {column.removesuffix('_loss')}"
                loss_ax.plot(curve.index, curve.values, style, color=color, label=label)
        curve = epoch_curve(metrics, "val_acc")
        if not curve.empty:
            acc_ax.plot(curve.index, curve.values, "o-", color=color, ms=3, label=variant)

    loss_ax.set(title="Loss (solid: train, dashed: val)", xlabel="epoch", ylabel="loss")
    acc_ax.set(title="Validation accuracy", xlabel="epoch", ylabel="val_acc")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    save_figure(fig, out_png)


def plot_confusion(eval_json: Path, out_png: Path) -> None:
    """Confusion matrix normalised per true class (rows sum to 1), with class names."""
    result = read_json(eval_json)
    counts = np.asarray(result["confusion_matrix"], dtype=float)
    names = result["class_names"]
    totals = counts.sum(axis=1, keepdims=True)
    # A class absent from the test set gets an all-zero row instead of a division by zero.
    rates = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    k = len(names)
    side = max(4.5, 0.5 * k + 2.5)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_xticks(range(k), names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(
        f"{result.get('variant', Path(eval_json).stem)}: "
        f"test accuracy {result['test_accuracy']:.2%}"
    )
    if k <= 20:  # beyond that the numbers no longer fit in the cells
        for (row, col), rate in np.ndenumerate(rates):
            color = "white" if rate > 0.5 else "black"
            ax.text(col, row, f"{rate:.2f}", ha="center", va="center", color=color, fontsize=7)
    save_figure(fig, out_png)


def pareto_mask(cost: Sequence[float], score: Sequence[float]) -> np.ndarray:
    """True for points no other point beats: lower-or-equal cost and higher-or-equal score,
    strictly better in at least one. Points with a NaN are never on the front."""
    cost, score = np.asarray(cost, dtype=float), np.asarray(score, dtype=float)
    valid = ~(np.isnan(cost) | np.isnan(score))
    mask = valid.copy()
    for i in np.flatnonzero(valid):
        no_worse = valid & (cost <= cost[i]) & (score >= score[i])
        better = (cost < cost[i]) | (score > score[i])
        mask[i] = not np.any(no_worse & better)
    return mask


def plot_tradeoffs(summary_csv: Path, out_png: Path) -> None:
    """Accuracy vs single-image latency, vs batch-256 latency (when measured) and vs file
    size, with the Pareto front marked. Latency is each variant's best (eager or compiled)."""
    summary = pd.read_csv(summary_csv)
    panels = [
        ("latency_b1_ms", "latency, batch 1 (ms)", "Accuracy vs latency (batch 1)"),
        ("latency_b256_ms", "latency, batch 256 (ms)", "Accuracy vs latency (batch 256)"),
        ("size_bytes", "model file size (KiB)", "Accuracy vs size"),
    ]
    panels = [panel for panel in panels if panel[0] in summary]
    fig = Figure(figsize=(6 * len(panels), 5), layout="constrained")
    for ax, (column, xlabel, title) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        scale = 1024.0 if column == "size_bytes" else 1.0
        x = summary[column].to_numpy(dtype=float) / scale
        y = summary["test_accuracy"].to_numpy(dtype=float)
        front = pareto_mask(x, y)
        ax.scatter(x[~front], y[~front], color="C0", label="dominated")
        ax.scatter(x[front], y[front], color="C3", zorder=3, label="Pareto front")
        order = np.argsort(x[front])
        ax.plot(x[front][order], y[front][order], color="C3", drawstyle="steps-post", lw=1)
        for xi, yi, name in zip(x, y, summary["variant"], strict=True):
            if not (math.isnan(xi) or math.isnan(yi)):
                ax.annotate(
                    str(name), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
        ax.set(xlabel=xlabel, ylabel="test accuracy", title=title)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.margins(x=0.12, y=0.08)  # room for the variant labels right of the points
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    save_figure(fig, out_png)
