"""Evaluation stage on a tiny dataset with models whose predictions the tests control."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aihpc import models
from aihpc.evaluate import evaluate_model, evaluate_to_json
from aihpc.provenance import package_versions
from aihpc.report import SUMMARY_COLUMNS, summarize

# Class counts 1..7 (then back down) so that every class has a different support.
COUNTS = [1, 2, 3, 4, 5, 6, 7, 5, 4, 3]
FAST = {"latency_batch_sizes": (1, 4), "warmup": 1, "repeats": 2}


def write_data(
    data_dir: Path,
    labels: np.ndarray,
    *,
    side: int = 28,
    channels: int = 1,
    num_classes: int = 10,
    images: np.ndarray | None = None,
) -> dict:
    data_dir.mkdir(parents=True, exist_ok=True)
    if images is None:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (len(labels), side, side, channels), dtype=np.uint8)
    np.save(data_dir / "test_images.npy", images)
    np.save(data_dir / "test_labels.npy", np.asarray(labels, dtype=np.int64))
    stats = {
        "class_names": [f"class {i}" for i in range(num_classes)],
        "num_classes": num_classes,
        "image_shape": [side, side, channels],
        "dataset": "tiny",
        "data_sha256": "d" * 64,
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
    }
    (data_dir / "stats.json").write_text(json.dumps(stats))
    return stats


def tiny_model(stats: dict, arch: str = "seed_cnn", **kwargs) -> tuple[nn.Module, dict]:
    kwargs = kwargs or {"widths": (4, 8, 8), "hidden": 16}
    spec = models.model_spec(arch, stats, **kwargs)
    torch.manual_seed(0)
    return models.build_model(spec).eval(), spec


def save(model: nn.Module, spec: dict, path: Path, **extra_meta) -> Path:
    meta = {
        "variant": "tiny_cnn",
        "model": spec["arch"],
        "dataset": "tiny",
        "config_hash": "0123456789ab",
        "versions": package_versions(),
        "data_sha256": "d" * 64,
        "train_seconds": 1.5,
        "epochs": 1,
        "best_val_accuracy": 0.5,
        **extra_meta,
    }
    models.save_artifact(model, spec, path, **meta)
    return path


@pytest.fixture
def labels() -> np.ndarray:
    return np.repeat(np.arange(10), COUNTS)


def test_constant_prediction_gives_known_confusion(tmp_path: Path, labels: np.ndarray) -> None:
    stats = write_data(tmp_path / "data", labels)
    model, spec = tiny_model(stats)
    head = model[-1]
    with torch.no_grad():  # every image is predicted as class 3
        head.weight.zero_()
        head.bias.zero_()
        head.bias[3] = 1.0
    path = save(model, spec, tmp_path / "model.pt")

    result = evaluate_model(path, tmp_path / "data", eval_batch_size=16, **FAST)

    assert result["num_test"] == 40
    assert result["test_accuracy"] == pytest.approx(COUNTS[3] / 40)
    expected = np.zeros((10, 10), dtype=int)
    expected[:, 3] = COUNTS
    assert result["confusion_matrix"] == expected.tolist()
    assert result["class_names"] == stats["class_names"]
    assert result["per_class_accuracy"] == {
        name: (1.0 if i == 3 else 0.0) for i, name in enumerate(stats["class_names"])
    }


class PixelOracle(nn.Module):
    """Predicts the class written into pixel (0, 0) of the first channel."""

    def __init__(self, num_classes: int, **_: object) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))  # gives the model one parameter to count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Modulo: the latency benchmark feeds random pixels.
        cls = (x[:, 0, 0, 0] * 255).round().long() % self.num_classes
        return nn.functional.one_hot(cls, self.num_classes).float() * self.scale


def test_arbitrary_confusion_matches_numpy(
    tmp_path: Path, labels: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(models.MODELS, "pixel_oracle", PixelOracle)
    rng = np.random.default_rng(1)
    preds = np.where(rng.random(40) < 0.6, labels, rng.integers(0, 10, 40))
    images = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = preds
    stats = write_data(tmp_path / "data", labels, images=images)
    model, spec = tiny_model(stats, "pixel_oracle", unused=0)
    path = save(model, spec, tmp_path / "model.pt")

    # A batch size that does not divide 40, to check that batching loses nothing.
    result = evaluate_model(path, tmp_path / "data", eval_batch_size=7, **FAST)

    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (labels, preds), 1)
    assert result["confusion_matrix"] == confusion.tolist()
    assert result["test_accuracy"] == pytest.approx(np.mean(preds == labels))
    per_class = np.diag(confusion) / confusion.sum(axis=1)
    assert list(result["per_class_accuracy"].values()) == pytest.approx(per_class.tolist())
    assert result["params"] == 1 and result["nonzeros"] == 1 and result["sparsity"] == 0.0


def test_random_cnn_matches_its_own_predictions(tmp_path: Path, labels: np.ndarray) -> None:
    stats = write_data(tmp_path / "data", labels)
    model, spec = tiny_model(stats, "resnet_s", widths=(4, 8, 8))
    path = save(model, spec, tmp_path / "model.pt")
    images = np.load(tmp_path / "data" / "test_images.npy")
    with torch.inference_mode():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        preds = models.load_artifact(path)[0](x).argmax(1).numpy()

    result = evaluate_model(path, tmp_path / "data", eval_batch_size=16, **FAST)

    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (labels, preds), 1)
    assert result["confusion_matrix"] == confusion.tolist()
    assert result["test_accuracy"] == pytest.approx(np.mean(preds == labels))


def test_sparsity_size_latency_meta_and_threads(tmp_path: Path, labels: np.ndarray) -> None:
    stats = write_data(tmp_path / "data", labels)
    model, spec = tiny_model(stats)
    params = sum(p.numel() for p in model.parameters())
    conv = model[1].weight
    with torch.no_grad():
        conv.view(-1)[: conv.numel() // 2] = 0.0
    path = save(model, spec, tmp_path / "model.pt", prune_method="l1", prune_ratio=0.5)
    ambient = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = evaluate_model(path, tmp_path / "data", threads=1, **FAST)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(ambient)

    assert result["latency_threads"] == 1
    assert result["params"] == params
    assert result["nonzeros"] == params - conv.numel() // 2
    assert result["sparsity"] == pytest.approx((conv.numel() // 2) / params)
    assert result["size_bytes"] == os.path.getsize(path)
    assert result["latency_b1_ms"] > 0 and result["latency_b4_ms"] > 0
    assert result["throughput_b4_per_s"] == pytest.approx(4000 / result["latency_b4_ms"])
    assert result["prune_method"] == "l1" and result["prune_ratio"] == 0.5
    assert result["variant"] == "tiny_cnn" and result["train_seconds"] == 1.5
    assert result["versions"] == package_versions()
    assert result["eval_versions"] == package_versions()
    assert result["device"] == "cpu" and "model" in result["cpu"]


def test_evaluate_to_json_with_default_latency_feeds_summary(
    tmp_path: Path, labels: np.ndarray
) -> None:
    stats = write_data(tmp_path / "data", labels)
    path = save(*tiny_model(stats), tmp_path / "model.pt")
    out_json = tmp_path / "eval" / "tiny.json"

    result = evaluate_to_json(path, tmp_path / "data", out_json, warmup=1, repeats=2)

    assert json.loads(out_json.read_text()) == json.loads(json.dumps(result))
    assert {"latency_b1_ms", "latency_b256_ms", "throughput_b256_per_s"} <= result.keys()
    summary = summarize([out_json], tmp_path / "summary.csv")
    assert list(summary.columns[: len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert summary.loc[0, "acc.class 3"] == result["per_class_accuracy"]["class 3"]


def test_aot_latencies_and_their_speedup_against_the_fp32_package(
    tmp_path: Path, labels: np.ndarray
) -> None:
    stats = write_data(tmp_path / "data", labels)
    jsons = []
    for variant, widths in [("seed_cnn", (8, 16, 16)), ("seed_cnn-narrow", (4, 8, 8))]:
        model, spec = tiny_model(stats, widths=widths, hidden=16)
        path = save(model, spec, tmp_path / f"{variant}.pt", variant=variant)
        jsons.append(tmp_path / f"{variant}.json")
        result = evaluate_to_json(path, tmp_path / "data", jsons[-1], aot=True, warmup=1, repeats=2)
        assert result["aot"] and result["aot_compile_seconds"] > 0
        assert result["latency_aot_b1_ms"] > 0 and result["latency_aot_b256_ms"] > 0
    summary = summarize(jsons, tmp_path / "summary.csv").set_index("variant")
    for b in (1, 256):  # the summary's batch sizes
        expected = (
            summary.loc["seed_cnn", f"latency_aot_b{b}_ms"]
            / summary.loc["seed_cnn-narrow", f"latency_aot_b{b}_ms"]
        )
        assert summary.loc["seed_cnn-narrow", f"speedup_b{b}_aot_vs_aot_fp32"] == pytest.approx(
            expected
        )
        assert summary.loc["seed_cnn", f"speedup_b{b}_aot_vs_aot_fp32"] == 1


@pytest.mark.parametrize(
    ("data_kwargs", "needle"),
    [
        ({"num_classes": 5}, "num_classes=5"),
        ({"side": 32, "channels": 3}, "(32, 32, 3)"),
    ],
)
def test_mismatched_data_is_rejected(tmp_path: Path, data_kwargs: dict, needle: str) -> None:
    path = save(*tiny_model(write_data(tmp_path / "ok", np.arange(10))), tmp_path / "model.pt")
    write_data(tmp_path / "bad", np.arange(5), **data_kwargs)

    with pytest.raises(ValueError, match=r"model\.pt") as info:
        evaluate_model(path, tmp_path / "bad", **FAST)

    assert needle in str(info.value) and str(tmp_path / "bad") in str(info.value)
