"""The workflow through Snakemake: lint, dry runs, each rule alone on fixtures, bad input,
and one end-to-end run of the tiny config."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from fixtures import deep_update

from aihpc.config import DataConfig, load_config
from aihpc.data import prepare, read_stats
from aihpc.evaluate import evaluate_to_json
from aihpc.models import build_model, model_spec, save_artifact

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ROOT / "tests" / "data" / "fashion-mnist-tiny"
DATA = "results/fashion-mnist-tiny/data"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_config(workdir: Path, **changes) -> dict:
    """config/test.yaml with the fixture data's absolute path, results under workdir."""
    config = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    deep_update(config, {"results": "results", "data": {"root": str(TINY)}})
    deep_update(config, copy.deepcopy(changes))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return config


def snakemake(
    workdir: Path, *args: str, rules: tuple[str, ...] = (), check: bool = True
) -> subprocess.CompletedProcess:
    """Run the workflow in ``workdir``; ``rules`` restricts it (--allowed-rules) to those."""
    cmd = [
        str(BIN / "snakemake"),
        "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"),
        "--cores", "2",
        "--show-failed-logs",
        *args,
    ]  # fmt: skip
    if rules:  # last: the option takes every following word as a rule name
        cmd += ["--allowed-rules", *rules]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def prepared(workdir: Path) -> Path:
    """The preprocess rule's outputs, made by the package directly (fixture for later rules)."""
    config = write_config(workdir)
    data_dir = workdir / DATA
    prepare(DataConfig(**config["data"]), data_dir)
    return data_dir


def untrained_artifact(data_dir: Path, path: Path, arch: str, variant: str) -> Path:
    torch.manual_seed(0)
    spec = model_spec(arch, read_stats(data_dir), widths=[8, 16, 16])
    meta = {"variant": variant, "model": variant, "dataset": "fashion-mnist-tiny"}
    save_artifact(build_model(spec), spec, path, **meta, train_seconds=0.0)
    return path


# --- static checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["snakefmt", "--check", "Snakefile", "workflow/rules"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_lint(cmd):
    proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakemake_lint(tmp_path):
    write_config(tmp_path)
    proc = snakemake(tmp_path, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_run_tiny_config(tmp_path):
    write_config(tmp_path)
    out = snakemake(tmp_path, "-n").stdout
    for rule in ("preprocess", "train", "evaluate", "summary", "plot_tradeoffs"):
        assert rule in out


def test_dry_run_default_config(tmp_path):
    config = load_config(ROOT / "config" / "config.yaml")
    if not Path(config["data"]["root"]).is_dir():
        pytest.skip(f"default dataset not installed at {config['data']['root']} (make dataset)")
    shutil.copy(ROOT / "config" / "config.yaml", tmp_path / "config.yaml")
    out = snakemake(tmp_path, "-n").stdout
    assert "results/fashion-mnist/resnet_s/model.pt" in out


# --- each rule alone on fixture inputs -----------------------------------------------------


@pytest.mark.rule
def test_rule_preprocess(tmp_path):
    write_config(tmp_path)
    snakemake(tmp_path, f"{DATA}/stats.json", rules=("preprocess",))
    stats = read_stats(tmp_path / DATA)
    counts = stats["counts"]
    assert counts["train"] + counts["val"] == 1200 and counts["test"] == 300
    assert abs(counts["val"] - 120) <= 5  # 10 %, rounded per class (stratified)
    assert stats["image_shape"] == [28, 28, 1]
    assert len(stats["sources"]) == 4
    images = np.load(tmp_path / DATA / "test_images.npy", mmap_mode="r")
    assert images.shape == (300, 28, 28, 1) and images.dtype == np.uint8


@pytest.mark.rule
def test_rule_train(tmp_path):
    prepared(tmp_path)
    target = "results/fashion-mnist-tiny/seed_cnn/model.pt"
    snakemake(tmp_path, target, rules=("train",))
    record = torch.load(tmp_path / target, weights_only=True)
    assert record["meta"]["variant"] == "seed_cnn"
    assert record["meta"]["epochs"] == 2
    curves = pd.read_csv(tmp_path / "results/fashion-mnist-tiny/seed_cnn/metrics.csv")
    assert curves["val_acc"].dropna().size == 2
    assert (tmp_path / "results/logs/fashion-mnist-tiny/train/seed_cnn.log").stat().st_size > 0


@pytest.mark.rule
def test_rule_evaluate(tmp_path):
    data_dir = prepared(tmp_path)
    model = tmp_path / "results/fashion-mnist-tiny/resnet_s/model.pt"
    untrained_artifact(data_dir, model, "resnet_s", "resnet_s")
    snakemake(tmp_path, "results/fashion-mnist-tiny/resnet_s/eval.json", rules=("evaluate",))
    result = json.loads(model.with_name("eval.json").read_text())
    assert result["num_test"] == 300
    assert np.asarray(result["confusion_matrix"]).sum() == 300
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["size_bytes"] == model.stat().st_size
    assert result["latency_b1_ms"] > 0 and result["latency_b256_ms"] > 0


def evaluated(workdir: Path) -> list[Path]:
    data_dir = prepared(workdir)
    write_config(workdir, compress={"variants": []})  # the summary of the two models only
    results = []
    for variant, arch in (("resnet_s", "resnet_s"), ("seed_cnn", "seed_cnn")):
        model = workdir / f"results/fashion-mnist-tiny/{variant}/model.pt"
        untrained_artifact(data_dir, model, arch, variant)
        out = model.with_name("eval.json")
        evaluate_to_json(model, data_dir, out, repeats=1, warmup=0)
        results.append(out)
    return results


@pytest.mark.rule
def test_rule_summary(tmp_path):
    evals = evaluated(tmp_path)
    snakemake(tmp_path, "results/summary.csv", rules=("summary",))
    summary = pd.read_csv(tmp_path / "results/summary.csv")
    assert list(summary["variant"]) == ["resnet_s", "seed_cnn"]
    expected = json.loads(evals[1].read_text())["test_accuracy"]
    assert summary.loc[1, "test_accuracy"] == pytest.approx(expected)


@pytest.mark.rule
def test_rule_plots(tmp_path):
    evaluated(tmp_path)
    for variant in ("resnet_s", "seed_cnn"):
        pd.DataFrame(
            {"epoch": [0, 0, 1, 1], "step": [9, 9, 19, 19], "train_loss": [2.0, None, 1.5, None]}
            | {"val_loss": [None, 1.8, None, 1.2], "val_acc": [None, 0.4, None, 0.6]}
        ).to_csv(tmp_path / f"results/fashion-mnist-tiny/{variant}/metrics.csv", index=False)
    snakemake(tmp_path, "results/summary.csv", rules=("summary",))
    targets = [
        "results/plots/training_curves.png",
        "results/plots/tradeoffs.png",
        "results/plots/confusion/seed_cnn.png",
    ]
    rules = ["plot_training_curves", "plot_tradeoffs", "plot_confusion"]
    snakemake(tmp_path, *targets, rules=tuple(rules))
    for target in targets:
        assert (tmp_path / target).read_bytes()[:8] == PNG_MAGIC


# --- bad input through the workflow ---------------------------------------------------------


def test_schema_violation_is_one_clear_error(tmp_path):
    write_config(tmp_path, data={"val_fraction": 1.0})
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "field 'data.val_fraction'" in proc.stderr + proc.stdout


def test_missing_dataset_dir_names_the_files(tmp_path):
    write_config(tmp_path, data={"root": str(tmp_path / "nowhere")})
    proc = snakemake(tmp_path, f"{DATA}/stats.json", check=False)
    assert proc.returncode != 0
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte") in proc.stderr + proc.stdout


def test_corrupt_file_fails_preprocess_without_partial_outputs(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(TINY, raw)
    images = raw / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:5000])
    write_config(tmp_path, data={"root": str(raw)})
    proc = snakemake(tmp_path, f"{DATA}/stats.json", check=False)
    assert proc.returncode != 0
    assert f"error: {images}" in proc.stdout + proc.stderr  # the log's one line, shown by Snakemake
    leftovers = list((tmp_path / "results").rglob("*.npy")) + list(
        (tmp_path / "results").rglob("stats.json")
    )
    assert leftovers == []


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.e2e
def test_end_to_end_tiny_config(tmp_path):
    write_config(tmp_path)
    snakemake(tmp_path)
    summary = pd.read_csv(tmp_path / "results/summary.csv")
    compressed = ["resnet_s-struct0.5", "resnet_s-struct0.5-int8"]
    assert list(summary["variant"]) == ["resnet_s", *compressed, "seed_cnn"]
    # 2 epochs on 1080 images: far from converged, but well above chance (0.1).
    trained = ~summary["variant"].isin(compressed)
    assert (summary.loc[trained, "test_accuracy"] > 0.25).all()
    # Half the channels and one epoch of fine-tuning: above chance.
    assert (summary["test_accuracy"] > 0.12).all()
    assert summary["config_hash"].str.len().eq(12).all()
    assert summary["data_sha256"].nunique() == 1

    snakemake(tmp_path, "--report", "results/report.html")
    report = (tmp_path / "results/report.html").read_text(errors="replace")
    assert "summary.csv" in report and "tradeoffs.png" in report

    # Everything is up to date: a second run has nothing to do.
    rerun = snakemake(tmp_path)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
