"""Summary table and figures from hand-written evaluation JSONs and training logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aihpc.report import (
    SUMMARY_COLUMNS,
    pareto_mask,
    plot_confusion,
    plot_tradeoffs,
    plot_training_curves,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["cat", "dog", "T-shirt/top"]


def eval_result(variant: str, accuracy: float, latency: float, size: int, **extra) -> dict:
    return {
        "variant": variant,
        "model": "seed_cnn",
        "dataset": "tiny",
        "test_accuracy": accuracy,
        "latency_b1_ms": latency,
        "latency_b256_ms": 40 * latency,
        "size_bytes": size,
        "params": size // 4,
        "nonzeros": size // 8,
        "train_seconds": 12.5,
        "per_class_accuracy": dict(zip(CLASSES, [accuracy, 1.0, 0.0], strict=True)),
        "confusion_matrix": [[5, 1, 0], [0, 6, 0], [2, 2, 2]],
        "class_names": CLASSES,
        "versions": {"torch": "2.13.0", "python": "3.11.7"},
        "cpu": {"model": "Test CPU", "flags": ["avx2"]},
        "latency_threads": 1,
        **extra,
    }


def write_evals(directory: Path, *results: dict) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, result in enumerate(results):
        paths.append(directory / f"{i}.json")
        paths[-1].write_text(json.dumps(result))
    return paths


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_summarize_orders_flattens_and_sorts(tmp_path: Path) -> None:
    paths = write_evals(
        tmp_path / "eval",
        eval_result("resnet_s", 0.91, 2.0, 80_000),
        eval_result("pruned", 0.90, 1.5, 80_000, prune_method="l1", prune_ratio=0.5),
        eval_result("baseline", 0.88, 1.0, 40_000),
    )
    out_csv = tmp_path / "out" / "summary.csv"

    frame = summarize(paths, out_csv)

    assert list(frame.columns[: len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert list(frame["variant"]) == ["baseline", "pruned", "resnet_s"]
    columns = set(frame.columns)
    assert {"versions.torch", "cpu.model", "acc.cat", "acc.T-shirt/top", "prune_ratio"} <= columns
    assert not columns & {"confusion_matrix", "class_names", "per_class_accuracy", "cpu.flags"}
    assert frame.loc[1, "acc.dog"] == 1.0 and frame.loc[1, "prune_method"] == "l1"
    assert math.isnan(frame.loc[0, "prune_ratio"])
    written = pd.read_csv(out_csv)
    pd.testing.assert_frame_equal(written, frame)


def test_summarize_rejects_duplicate_variants_without_writing(tmp_path: Path) -> None:
    paths = write_evals(
        tmp_path / "eval",
        eval_result("a", 0.9, 1.0, 10),
        eval_result("b", 0.9, 1.0, 10),
        eval_result("a", 0.8, 1.0, 10),
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "summary.csv").write_text("old\n")

    with pytest.raises(ValueError, match=r"duplicate variant.*'a'"):
        summarize(paths, out_dir / "summary.csv")

    assert [p.name for p in out_dir.iterdir()] == ["summary.csv"]
    assert (out_dir / "summary.csv").read_text() == "old\n"


def test_summarize_names_file_and_missing_field(tmp_path: Path) -> None:
    broken = eval_result("b", 0.9, 1.0, 10)
    del broken["latency_b1_ms"]
    paths = write_evals(tmp_path / "eval", eval_result("a", 0.9, 1.0, 10), broken)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    with pytest.raises(ValueError, match="latency_b1_ms") as info:
        summarize(paths, out_dir / "summary.csv")

    assert str(paths[1]) in str(info.value)
    assert list(out_dir.iterdir()) == []


def test_pareto_mask() -> None:
    cost = [1.0, 2.0, 3.0, 2.0, 4.0, float("nan"), 1.0]
    score = [0.5, 0.7, 0.9, 0.6, 0.8, 0.99, 0.5]
    # The duplicate of point 0 (last) does not dominate it, so both stay on the front.
    assert pareto_mask(cost, score).tolist() == [True, True, True, False, False, False, True]


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    steps = pd.DataFrame(
        {
            "epoch": [0, 0, 0, 1, 1, 1, 2, 2, 2],
            "step": [4, 9, 9, 14, 19, 19, 24, 29, 29],
            "train_loss": [2.2, 1.9, np.nan, 1.5, 1.3, np.nan, 1.1, 1.0, np.nan],
            "val_loss": [np.nan, np.nan, 1.7, np.nan, np.nan, 1.2, np.nan, np.nan, 1.0],
            "val_acc": [np.nan, np.nan, 0.4, np.nan, np.nan, 0.6, np.nan, np.nan, 0.7],
        }
    )
    steps.to_csv(tmp_path / "a.csv", index=False)
    # A second run that never logged val_acc or lr.
    steps.drop(columns=["val_acc"]).assign(train_loss=steps["train_loss"] * 0.8).to_csv(
        tmp_path / "b.csv", index=False
    )
    figures = tmp_path / "figures"
    plot_training_curves({"a": tmp_path / "a.csv", "b": tmp_path / "b.csv"}, figures / "curves.png")
    assert_png(figures / "curves.png")

    paths = write_evals(
        tmp_path / "eval",
        eval_result("baseline", 0.88, 1.0, 40_000),
        eval_result("pruned", 0.90, 1.5, 80_000),
        eval_result("resnet_s", 0.91, 2.0, 60_000),
        eval_result("slow", 0.80, 3.0, 90_000),
    )
    plot_confusion(paths[0], figures / "confusion.png")
    assert_png(figures / "confusion.png")

    summarize(paths, tmp_path / "summary.csv")
    plot_tradeoffs(tmp_path / "summary.csv", figures / "tradeoffs.png")
    assert_png(figures / "tradeoffs.png")


def test_training_curves_need_an_epoch_column(tmp_path: Path) -> None:
    pd.DataFrame({"step": [1], "train_loss": [1.0]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match=r"m\.csv.*epoch"):
        plot_training_curves({"a": tmp_path / "m.csv"}, tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()
