"""Compression stages (aihpc.compress): pruning, sparse storage, fine-tuning with masks,
int8 quantisation, their rules run alone through Snakemake, the sweep's dry run, bad input.

One small resnet_s is trained once per module on the real Fashion-MNIST fixture (a random
network's near-uniform logits would make the int8 agreement check meaningless)."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_workflow import DATA, prepared, snakemake, write_config
from torch import nn

from aihpc import compress, models
from aihpc.compress import (
    compile_for_cpu,
    decode_sparse,
    encode_sparse,
    finetune,
    prunable_zeros,
    prune_artifact,
    prune_structured,
    prune_unstructured,
    quantize_model,
)
from aihpc.config import (
    ConfigError,
    DistillConfig,
    compress_stages,
    finetune_config,
    load_config,
    model_config,
    validate_config,
)
from aihpc.data import load_split
from aihpc.errors import InputError
from aihpc.evaluate import evaluate_model, to_input
from aihpc.train import Distillation, TrainPaths, fit

RESULTS = Path("results/fashion-mnist-tiny")
STATS = {"image_shape": [28, 28, 1], "num_classes": 10, "mean": [0.3], "std": [0.35]}


def random_model(arch: str = "resnet_s", **kwargs) -> tuple[nn.Module, dict]:
    spec = models.model_spec(arch, STATS, **(kwargs or {"widths": [16, 32, 32]}))
    torch.manual_seed(0)
    return models.build_model(spec).eval(), spec


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir with the tiny config, preprocessed data and a trained resnet_s artifact."""
    workdir = tmp_path_factory.mktemp("trained")
    data_dir = prepared(workdir)
    config = load_config(workdir / "config.yaml")
    config["train"].update(epochs=3, lr=0.05)
    out = workdir / RESULTS / "resnet_s"
    paths = TrainPaths(data_dir, out / "model.pt", out / "metrics.csv", workdir / "work")
    fit(paths, model_config(config, "resnet_s"), threads=2)
    shutil.rmtree(workdir / "work")
    return workdir


def copy_workdir(trained: Path, tmp_path: Path, **config_changes) -> Path:
    """A fresh workdir with the trained fixture's results and a config with these changes."""
    shutil.copytree(trained / "results", tmp_path / "results")
    write_config(tmp_path, **config_changes)
    return tmp_path


# --- naming ----------------------------------------------------------------------------------


def test_variant_names_and_prefixes():
    config = validate_config(
        {
            "data": {"name": "d", "format": "idx", "root": "/data"},
            "models": {"net": {"arch": "resnet_s"}},
            "compress": {
                "variants": [
                    {
                        "model": "net",
                        "prune": {"method": "structured", "ratio": 0.5},
                        "quant": "int8",
                    },
                    {"model": "net", "prune": {"method": "unstructured", "ratio": 0.8}},
                    {
                        "model": "net",
                        "prune": {
                            "method": "unstructured",
                            "ratio": 0.8,
                            "gradual": True,
                            "l1": 1e-5,
                        },
                    },
                    {"model": "net", "quant": "fp16"},
                    {"model": "net", "prune": {"method": "structured", "ratio": 0.5}},  # again
                ]
            },
        }
    )
    stages = compress_stages(config)
    assert list(stages) == [
        "net-struct0.5",
        "net-struct0.5-int8",
        "net-unstruct0.8",
        "net-unstruct0.8g_lam1e-05",
        "net-fp16",
    ]
    assert stages["net-struct0.5-int8"].parent == "net-struct0.5"
    assert stages["net-struct0.5-int8"].stage == "quantize"
    assert stages["net-unstruct0.8g_lam1e-05"].gradual
    assert stages["net-fp16"].parent == "net"


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"model": "net", "prune": {"method": "structured", "ratio": 1.0}}, "prune.ratio"),
        ({"model": "net", "prune": {"method": "structured", "ratio": -0.1}}, "prune.ratio"),
        ({"model": "net", "prune": {"method": "magic", "ratio": 0.5}}, "prune.method"),
        ({"model": "net", "quant": "int4"}, "quant"),
        ({"model": "nope", "quant": "int8"}, "model"),
        ({"model": "net"}, ""),
    ],
)
def test_bad_variants_name_the_field(entry, field):
    config = {
        "data": {"name": "d", "format": "idx", "root": "/data"},
        "models": {"net": {"arch": "resnet_s"}},
        "compress": {"variants": [entry]},
    }
    with pytest.raises(
        ConfigError, match=re.escape(f"field 'compress.variants.0{'.' * bool(field)}{field}")
    ):
        compress_stages(validate_config(config, "my.yaml"))


# --- structured pruning ----------------------------------------------------------------------


def test_structured_pruning_shrinks_layers_across_residuals(tmp_path):
    model, spec = random_model()
    pruned, new_spec = prune_structured(model, spec, 0.5, round_to=8)

    assert new_spec["kwargs"] == {"widths": [8, 16, 16], "inner_widths": [16, 16]}
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 16, 16, 16, 16, 16]
    assert pruned[-1].out_features == 10  # the classifier keeps its classes
    assert n_params(pruned) < 0.3 * n_params(model)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert pruned(x).shape == (3, 10)  # residual additions still line up

    # The spec alone rebuilds it: the artifact loads with weights_only.
    models.save_artifact(pruned, new_spec, tmp_path / "m.pt", variant="v")
    rebuilt, _ = models.load_artifact(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))


def test_structured_pruning_of_seed_cnn_and_ratio_zero():
    model, spec = random_model("seed_cnn", widths=[16, 16, 32], hidden=32)
    pruned, new_spec = prune_structured(model, spec, 0.5, round_to=8)
    assert new_spec["kwargs"] == {"widths": [8, 8, 16], "hidden": 16}
    assert pruned(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    same, _ = prune_structured(model, spec, 0.0)
    assert n_params(same) == n_params(model)


@pytest.mark.parametrize("ratio", [1.0, -0.5, 1.5])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    model, spec = random_model()
    with pytest.raises(InputError, match=r"outside \[0, 1\)"):
        prune_structured(model, spec, ratio)
    with pytest.raises(InputError, match=r"outside \[0, 1\)"):
        prune_unstructured(model, ratio)


# --- unstructured pruning and sparse storage -------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.93])
def test_unstructured_pruning_reaches_the_global_sparsity_exactly(ratio):
    model, _ = random_model()
    prune_unstructured(model, ratio)
    zeros, total = prunable_zeros(model)
    assert zeros == round(ratio * total)
    per_layer = [
        float((m.weight == 0).float().mean()) for m, _ in compress.prunable_parameters(model)
    ]
    assert max(per_layer) - min(per_layer) > 0.05  # global ranking, not per layer
    assert not any(hasattr(m, "weight_orig") for m in model.modules())  # made permanent
    weights = torch.cat([m.weight.flatten() for m, _ in compress.prunable_parameters(model)])
    assert not torch.signbit(weights[weights == 0]).any()  # no -0.0 left behind


def test_sparse_storage_round_trips_bit_exactly(tmp_path):
    model, spec = random_model()
    prune_unstructured(model, 0.8)
    state = model.state_dict()
    state["odd"] = torch.tensor([0.0, -0.0, float("nan"), 1e-45] * 32)  # signed zero, NaN, denormal
    sparse, dense = encode_sparse(state)
    assert {"1.weight", "4.weight", "16.weight"} <= sparse.keys() and "2.running_mean" in dense
    decoded = decode_sparse(sparse, dense)
    for name, tensor in state.items():
        assert decoded[name].dtype == tensor.dtype and decoded[name].shape == tensor.shape
        assert torch.equal(
            decoded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
        ), name

    del state["odd"]
    compress.save_sparse_artifact(state, spec, tmp_path / "sparse.pt", variant="v")
    models.save_artifact(model, spec, tmp_path / "dense.pt", variant="v")
    record = torch.load(tmp_path / "sparse.pt", weights_only=True)
    assert record["format"] == "sparse"
    assert (tmp_path / "sparse.pt").stat().st_size < 0.35 * (tmp_path / "dense.pt").stat().st_size
    loaded, record = models.load_artifact(tmp_path / "sparse.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert set(record["state_dict"]) == set(state)


# --- quantisation ----------------------------------------------------------------------------


def test_batch_norms_fold_through_max_pools_only_where_every_scale_is_positive():
    model, _ = random_model()
    torch.manual_seed(1)
    with torch.no_grad():  # statistics and affine parameters far from the identity
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.2, 3)
                bn.weight.uniform_(0.3, 2)
                bn.bias.uniform_(-1, 1)
        model[11].weight[3] = -0.5  # one channel of the second post-pool BN flips its sign
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    folded, names = compress.fold_bn_through_max_pools(model)
    assert names == ["6"]  # resnet_s: conv 4 -> max-pool 5 -> BN 6, and conv 9 -> 10 -> BN 11
    assert isinstance(folded[6], nn.Identity) and folded[4].bias is not None
    assert isinstance(folded[11], nn.BatchNorm2d) and isinstance(model[6], nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
        model[11].weight[3] = 0.5  # now every scale is positive: both fold
        _, names = compress.fold_bn_through_max_pools(model)
    assert names == ["6", "11"]
    with pytest.raises(ValueError, match="eval mode"):
        compress.fold_bn_through_max_pools(model.train())


def test_int8_agrees_with_fp32_and_is_smaller(trained, tmp_path):
    data_dir = trained / DATA
    fp32, _ = models.load_artifact(trained / RESULTS / "resnet_s" / "model.pt")
    calibration = compress.calibration_images(data_dir, 256)
    program, converted = quantize_model(fp32, "int8", calibration)
    assert converted is not None
    assert not any(p.dtype == torch.float32 and p.dim() == 4 for p in converted.parameters())
    # Every BN folded into a conv: prepare_pt2e's conv-BN pairs and the post-pool ones.
    assert not [n for n in converted.graph.nodes if "batch_norm" in str(n.target)]
    # Every convolution is int8; the classifier and the max-pools stay float.
    classifier = fp32.get_submodule(compress.classifier_name(fp32))
    int8 = [b for b in program.module().buffers() if b.dtype == torch.int8]
    assert sum(b.numel() for b in int8) == sum(
        m.weight.numel() for m, _ in compress.prunable_parameters(fp32) if m is not classifier
    )
    pools = [n for n in converted.graph.nodes if n.target == torch.ops.aten.max_pool2d.default]
    assert pools and all("dequantize" not in str(n.args[0].target) for n in pools)
    report = compress.layer_report(converted, program.module())
    assert list(report.loc[report["op"] == "linear", "dtype"]) == ["float32"]
    assert set(report.loc[report["op"] == "conv2d", "dtype"]) == {"int8"}

    images, _ = load_split(data_dir, "test")
    x = to_input(images)
    with torch.inference_mode():
        reference = fp32.to(memory_format=torch.channels_last)(x).argmax(1)
        deployed = compile_for_cpu(program.module())(x).argmax(1)  # int8 kernels
    agreement = float((deployed == reference).float().mean())
    assert agreement >= 0.97, agreement

    # The artifact (program) and the plain torch.export archive.
    raw = compress.save_program_artifact(
        program, {"arch": "resnet_s"}, tmp_path / "q.pt", quant="int8"
    )
    record = torch.load(tmp_path / "q.pt", weights_only=True)
    assert record["format"] == "program" and record["meta"]["quant"] == "int8"
    assert torch.export.load(io.BytesIO(raw)).module()(x[:2]).shape == (2, 10)
    dense_size = (trained / RESULTS / "resnet_s" / "model.pt").stat().st_size
    assert (tmp_path / "q.pt").stat().st_size < dense_size / 2


def test_aot_packages_run_fp32_and_int8_kernels(tmp_path):
    fp32, _ = random_model(widths=[8, 16, 16])
    x = torch.rand(16, 1, 28, 28)
    program, _ = quantize_model(fp32, "int8", x, observer="minmax")
    int8 = program.module()
    with torch.no_grad():
        for name, model in [("fp32", fp32), ("int8", int8)]:
            runner = compress.compile_aot(model, x[:4], tmp_path / f"{name}.pt2")
            with zipfile.ZipFile(tmp_path / f"{name}.pt2") as package:
                wrapper = [n for n in package.namelist() if n.endswith("wrapper.cpp")]
                source = package.read(wrapper[0]).decode()
            # int8: oneDNN's int8 convolution on prepacked weights, not float convolutions
            # on weights dequantised in every call (what it compiles to with autograd on).
            assert ("qconv" in source) == (name == "int8")
            # the same kernels as torch.compile runs
            expected = compile_for_cpu(model)(x[:4])
            torch.testing.assert_close(runner(x[:4]), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_half_precision_programs(mode):
    model, _ = random_model(widths=[8, 16, 16])
    x = torch.rand(4, 1, 28, 28)
    program, converted = quantize_model(model, mode, x)
    module = program.module()
    assert converted is None
    dtypes = {p.dtype for p in module.parameters()}
    assert dtypes == {compress.HALF_DTYPES[mode]}
    with torch.no_grad():
        assert module(x).dtype == torch.float32
        assert (module(x) - model(x)).abs().max() < (0.01 if mode == "fp16" else 0.1)


def test_dynamic_int8_quantises_linear_layers():
    model, _ = random_model("seed_cnn", widths=[4, 8, 8], hidden=64)
    x = torch.rand(8, 1, 28, 28)
    program, _ = quantize_model(model, "int8dyn", x)
    module = program.module()
    report = compress.layer_report(None, module)
    assert set(report.loc[report["op"] == "linear", "dtype"]) == {"int8"}
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), atol=0.05)
    with pytest.raises(InputError, match="this model has none"):
        conv_only = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
        quantize_model(conv_only, "int8dyn", x)


def test_empty_calibration_and_untraceable_layer_are_input_errors(tmp_path):
    model, _ = random_model(widths=[8, 8, 8])
    with pytest.raises(InputError, match="calibration set is empty"):
        quantize_model(model, "int8", torch.empty(0, 1, 28, 28))
    with pytest.raises(InputError, match="calibration_samples"):
        compress.calibration_images(tmp_path, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    np.save(empty / "train_images.npy", np.zeros((0, 28, 28, 1), np.uint8))
    np.save(empty / "train_labels.npy", np.zeros(0, np.int64))
    with pytest.raises(InputError, match=r"train_images\.npy: no training images"):
        compress.calibration_images(empty, 16)

    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x  # control flow on values: not traceable

    untraceable = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), DataDependent()))
    with pytest.raises(InputError, match=r"cannot trace layer '1\.1' \(DataDependent\)"):
        quantize_model(untraceable, "int8", torch.rand(4, 1, 28, 28))


# --- evaluation of compressed artifacts ------------------------------------------------------


def test_sparse_and_int8_artifacts_evaluate_like_any_other(trained, tmp_path):
    data_dir = trained / DATA
    base = trained / RESULTS / "resnet_s" / "model.pt"
    prune_artifact(
        base,
        tmp_path / "u.pt",
        variant="resnet_s-unstruct0.7",
        model="resnet_s",
        method="unstructured",
        ratio=0.7,
    )
    net, record = models.load_artifact(tmp_path / "u.pt")
    compress.save_sparse_artifact(
        net.state_dict(), record["spec"], tmp_path / "sparse.pt", **record["meta"]
    )
    fast = {"latency_batch_sizes": (1, 8), "warmup": 0, "repeats": 1}
    dense = evaluate_model(base, data_dir, **fast)
    sparse = evaluate_model(tmp_path / "sparse.pt", data_dir, **fast)
    assert sparse["artifact_format"] == "sparse" and sparse["prune_method"] == "unstructured"
    assert sparse["params"] == dense["params"] and sparse["macs"] == dense["macs"] > 0
    zeros, total = prunable_zeros(net)
    assert sparse["nonzeros"] == dense["params"] - zeros and zeros == round(0.7 * total)
    assert sparse["size_bytes"] < 0.6 * dense["size_bytes"]  # 13k weights: framing matters

    calibration = compress.calibration_images(data_dir, 64)
    program, _ = quantize_model(net, "int8", calibration)
    compress.save_program_artifact(
        program, record["spec"], tmp_path / "q.pt", **{**record["meta"], "quant": "int8"}
    )
    quantized = evaluate_model(tmp_path / "q.pt", data_dir, **fast)  # eager: reference graph
    assert quantized["quant"] == "int8" and quantized["artifact_format"] == "program"
    # The int8 convolution weights, then every float parameter kept (biases, the classifier).
    classifier = net.get_submodule(compress.classifier_name(net)).weight.numel()
    assert quantized["params"] == total - classifier + sum(
        p.numel() for p in program.module().parameters()
    )
    assert abs(quantized["test_accuracy"] - sparse["test_accuracy"]) < 0.05


# --- each rule alone through Snakemake -------------------------------------------------------

UNSTRUCT = {
    "compress": {
        "finetune": {"epochs": 1},
        "gradual_steps": 3,
        "variants": [
            {
                "model": "resnet_s",
                "prune": {"method": "unstructured", "ratio": 0.8, "gradual": True, "l1": 1e-4},
            }
        ],
    }
}


@pytest.mark.rule
def test_rule_prune(trained, tmp_path):
    workdir = copy_workdir(trained, tmp_path)
    target = RESULTS / "resnet_s-struct0.5" / "pruned.pt"
    snakemake(workdir, str(target), rules=("prune",))
    record = torch.load(workdir / target, weights_only=True)
    assert record["spec"]["kwargs"] == {"widths": [4, 8, 8], "inner_widths": [8, 8]}
    assert record["meta"]["variant"] == "resnet_s-struct0.5"
    assert record["meta"]["params_after"] < record["meta"]["params_before"] / 3
    assert (workdir / "results/logs/fashion-mnist-tiny/prune/resnet_s-struct0.5.log").exists()


@pytest.mark.rule
def test_rule_finetune_keeps_gradual_sparsity_exactly(trained, tmp_path):
    workdir = copy_workdir(trained, tmp_path, **copy.deepcopy(UNSTRUCT))
    name = "resnet_s-unstruct0.8g_lam0.0001"
    pruned = workdir / RESULTS / name / "pruned.pt"
    meta = prune_artifact(
        workdir / RESULTS / "resnet_s" / "model.pt",
        pruned,
        variant=name,
        model="resnet_s",
        method="unstructured",
        ratio=0.8,
        gradual=True,
        gradual_steps=3,
        l1=1e-4,
    )
    assert meta["pruned_ratio_applied"] == pytest.approx(0.8 * (1 - (2 / 3) ** 3))

    snakemake(workdir, str(RESULTS / name / "model.pt"), rules=("finetune",))

    record = torch.load(workdir / RESULTS / name / "model.pt", weights_only=True)
    assert record["format"] == "sparse" and record["meta"]["finetune_epochs"] == 1
    model, _ = models.load_artifact(workdir / RESULTS / name / "model.pt")
    zeros, total = prunable_zeros(model)
    assert zeros == round(0.8 * total)  # the schedule's last step, kept to the end
    start, _ = models.load_artifact(pruned)
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(start.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert changed
    curves = pd.read_csv(workdir / RESULTS / name / "metrics.csv")
    assert curves["val_acc"].dropna().size == 1


def test_distillation_loss_and_frozen_teacher():
    student, _ = random_model()
    teacher = copy.deepcopy(student).train()
    distill = Distillation(teacher, "t", temperature=2.0, weight=0.75)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(8, 1, 28, 28)
    hard = torch.tensor(2.0)
    # A student that equals its teacher has nothing left to learn from it.
    assert distill.loss(x, teacher(x), hard).item() == pytest.approx(0.25 * 2.0, abs=1e-6)
    logits = torch.randn(8, 10, requires_grad=True)
    p_teacher = torch.softmax(teacher(x) / 2.0, dim=1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(logits / 2.0, dim=1))).sum(1).mean()
    loss = distill.loss(x, logits, hard)
    assert loss.item() == pytest.approx(0.25 * 2.0 + 0.75 * 4.0 * kl.item(), rel=1e-5)
    loss.backward()
    assert logits.grad is not None and all(p.grad is None for p in teacher.parameters())


def kl_to_teacher(student: nn.Module, teacher: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        target = torch.log_softmax(teacher(images), dim=1)
        log_q = torch.log_softmax(student(images), dim=1)
        return float((target.exp() * (target - log_q)).sum(1).mean())


@pytest.mark.rule
def test_rule_finetune_distills_from_the_unpruned_model(trained, tmp_path):
    distill = {"weight": 1.0, "temperature": 1.0}
    finetuning = {"epochs": 3, "lr": 0.05}
    workdir = copy_workdir(trained, tmp_path, compress={"distill": distill, "finetune": finetuning})
    name = "resnet_s-struct0.5"
    teacher_path = workdir / RESULTS / "resnet_s" / "model.pt"
    pruned = workdir / RESULTS / name / "pruned.pt"
    prune_artifact(
        teacher_path, pruned, variant=name, model="resnet_s", method="structured", ratio=0.5
    )
    snakemake(workdir, str(RESULTS / name / "model.pt"), rules=("finetune",))
    distilled, record = models.load_artifact(workdir / RESULTS / name / "model.pt")
    assert (record["meta"]["distill_weight"], record["meta"]["distill_temperature"]) == (1.0, 1.0)

    # The same fine-tuning on the labels alone, for comparison.
    config = load_config(workdir / "config.yaml")
    out = tmp_path / "plain"
    plain_paths = TrainPaths(workdir / DATA, out / "model.pt", out / "metrics.csv", out / "work")
    stage = compress_stages(config)[name]
    finetune(pruned, plain_paths, finetune_config(config, stage), threads=2)
    plain, _ = models.load_artifact(out / "model.pt")

    teacher, _ = models.load_artifact(teacher_path)
    images = to_input(load_split(workdir / DATA, "val")[0])
    assert kl_to_teacher(distilled, teacher, images) < 0.7 * kl_to_teacher(plain, teacher, images)

    # A teacher from another training run than the one the variant was pruned from.
    other = torch.load(teacher_path, weights_only=True)
    other["meta"]["config_hash"] = "another-run"
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(InputError, match="pruned from run"):
        finetune(
            pruned,
            plain_paths,
            finetune_config(config, stage),
            teacher=tmp_path / "other.pt",
            distill=DistillConfig(weight=0.5),
        )


@pytest.mark.rule
def test_rule_quantize(trained, tmp_path):
    workdir = copy_workdir(trained, tmp_path)
    parent = workdir / RESULTS / "resnet_s-struct0.5"
    prune_artifact(
        workdir / RESULTS / "resnet_s" / "model.pt",
        parent / "model.pt",
        variant="resnet_s-struct0.5",
        model="resnet_s",
        method="structured",
        ratio=0.5,
        round_to=4,
    )
    out = workdir / RESULTS / "resnet_s-struct0.5-int8"
    snakemake(workdir, str(out.relative_to(workdir) / "model.pt"), rules=("quantize",))

    record = torch.load(out / "model.pt", weights_only=True)
    assert record["meta"]["variant"] == "resnet_s-struct0.5-int8"
    assert record["meta"]["calibration_samples"] == 128  # config/test.yaml
    assert record["meta"]["calibration_top1_agreement"] >= 0.9
    assert torch.export.load(out / "model.pt2").module()(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    layers = pd.read_csv(out / "quant_layers.csv")
    assert list(layers["layer"]) == [
        "1",
        "4",
        "8.body.0",
        "8.body.3",
        "9",
        "13.body.0",
        "13.body.3",
        "16",
    ]
    convs, classifier = layers.iloc[:-1], layers.iloc[-1]
    assert (convs["dtype"] == "int8").all() and (convs["weight_scale_min"] > 0).all()
    assert convs["input_zero_point"].between(0, 255).all()
    assert classifier["dtype"] == "float32" and pd.isna(classifier["input_scale"])
    assert ((layers["density"] > 0) & (layers["density"] <= 1)).all()


def test_dry_run_expands_the_sweep(tmp_path):
    variants = [
        {"model": "resnet_s", "prune": {"method": "structured", "ratio": 0.5}, "quant": "int8"},
        {"model": "resnet_s", "prune": {"method": "structured", "ratio": 0.25}},
        {"model": "resnet_s", "prune": {"method": "unstructured", "ratio": 0.8}},
        {"model": "seed_cnn", "quant": "int8"},
    ]
    write_config(tmp_path, compress={"variants": variants})
    out = snakemake(tmp_path, "-n").stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.MULTILINE))
    assert counts == {
        "preprocess": "1",
        "train": "2",
        "prune": "3",
        "finetune": "3",
        "quantize": "2",
        "evaluate": "7",
        "plot_confusion": "7",
        "plot_training_curves": "1",
        "summary": "1",
        "plot_tradeoffs": "1",
        "all": "1",
        "total": "29",
    }
    for name in (
        "resnet_s-struct0.5-int8",
        "resnet_s-struct0.25",
        "resnet_s-unstruct0.8",
        "seed_cnn-int8",
    ):
        assert f"{RESULTS}/{name}/eval.json" in out


# --- bad input through the workflow ----------------------------------------------------------


def test_bad_ratio_stops_the_workflow_with_one_line(tmp_path):
    variants = [{"model": "resnet_s", "prune": {"method": "structured", "ratio": 1.0}}]
    write_config(tmp_path, compress={"variants": variants})
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "field 'compress.variants.0.prune.ratio'" in proc.stdout + proc.stderr


def test_stage_inputs_are_checked(trained, tmp_path):
    base = trained / RESULTS / "resnet_s" / "model.pt"
    with pytest.raises(InputError, match="unknown method 'magic'"):
        prune_artifact(
            base, tmp_path / "p.pt", variant="v", model="resnet_s", method="magic", ratio=0.5
        )
    # The config now says other widths than the trained artifact was built with.
    with pytest.raises(InputError, match="produced by a different model spec"):
        prune_artifact(
            base,
            tmp_path / "p.pt",
            variant="v",
            model="resnet_s",
            method="structured",
            ratio=0.5,
            arch="resnet_s",
            kwargs={"widths": [8, 8, 8]},
        )
    with pytest.raises(InputError, match="artifact of variant 'resnet_s', expected 'other'"):
        prune_artifact(
            base, tmp_path / "p.pt", variant="v", model="other", method="structured", ratio=0.5
        )
    model, record = models.load_artifact(base)
    program, _ = quantize_model(model, "fp16", torch.rand(2, 1, 28, 28))
    compress.save_program_artifact(
        program, record["spec"], tmp_path / "q.pt", **{**record["meta"], "quant": "fp16"}
    )
    with pytest.raises(InputError, match="cannot be the input of this stage"):
        compress.quantize_artifact(
            tmp_path / "q.pt",
            trained / DATA,
            tmp_path / "o.pt",
            tmp_path / "o.pt2",
            tmp_path / "o.csv",
            variant="x",
            parent="resnet_s",
            mode="int8",
        )
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob("p.pt"))
    bad = record["state_dict"] | {"16.weight": torch.zeros(10, 3)}
    torch.save({"spec": record["spec"], "state_dict": bad, "meta": {}}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match=r"bad\.pt: weights do not fit the model spec"):
        models.load_artifact(tmp_path / "bad.pt")
    json.dumps(record["meta"])  # meta stays JSON-friendly for eval.json
