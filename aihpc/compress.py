"""Compression stages: pruning, fine-tuning, quantisation, and the artifact formats they write.

* **Structured pruning** removes whole channels with torch-pruning's dependency graph
  (DepGraph: coupled layers across residual connections are pruned together), ranks them
  by L2 magnitude, keeps the classifier, rounds widths to multiples of ``round_to`` and
  rebuilds a genuinely smaller model whose widths go into the spec (``widths``,
  ``inner_widths``), so the artifact still loads with ``torch.load(weights_only=True)``.
* **Unstructured pruning** is global magnitude pruning with ``torch.nn.utils.prune`` made
  permanent with ``prune.remove``; fine-tuning keeps the zeros (:class:`KeepMasks`), with an
  optional cubic schedule that reaches the ratio gradually. The artifact stores each sparse
  tensor as a zlib-compressed bitmask plus its non-zero values (format ``sparse``).
* **Quantisation** exports the model with ``torch.export`` and, for ``int8``, runs torchao's
  PT2E flow (``prepare_pt2e`` / calibration / ``convert_pt2e`` with ``X86InductorQuantizer``;
  the classifier and max-pools stay float); the converted program drops the fp32 weights
  it no longer references and is stored zlib-compressed in the artifact (format
  ``program``) and as a plain ``torch.export.save`` archive for deployment. It runs int8
  when compiled with ``torch.compile`` (Inductor).

Every stage function checks its input, writes its outputs atomically and raises
:class:`~aihpc.errors.InputError` for bad input.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.fusion import fuse_conv_bn_eval

from aihpc.config import QUANT_MODES, DistillConfig, ModelConfig
from aihpc.data import load_split
from aihpc.errors import InputError
from aihpc.files import atomic_path, file_sha256
from aihpc.models import ResidualBlock, build_model, load_artifact, save_artifact

PRUNE_METHODS = ("structured", "unstructured")
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SPARSE_FORMAT = "sparse"
PROGRAM_FORMAT = "program"
# Share of fine-tuning steps over which a gradual schedule reaches its final sparsity.
GRADUAL_END_FRACTION = 0.75
LAYER_COLUMNS = [
    "layer",
    "op",
    "dtype",
    "weight_scale_min",
    "weight_scale_max",
    "weight_zero_point",
    "input_scale",
    "input_zero_point",
    "numel",
    "nonzeros",
    "density",
]


# --- checks ----------------------------------------------------------------------------------


def check_ratio(ratio: float, where: str = "prune ratio") -> float:
    if not isinstance(ratio, int | float) or not 0.0 <= float(ratio) < 1.0:
        raise InputError(f"{where}: {ratio!r} is outside [0, 1)")
    return float(ratio)


def check_method(method: str) -> str:
    if method not in PRUNE_METHODS:
        raise InputError(f"prune method: unknown method {method!r}; known: {list(PRUNE_METHODS)}")
    return method


def check_quant_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise InputError(f"quant mode: unknown mode {mode!r}; known: {list(QUANT_MODES)}")
    return mode


def expect_artifact(
    path: Path,
    record: dict[str, Any],
    *,
    variant: str | None = None,
    arch: str | None = None,
    kwargs: dict[str, Any] | None = None,
    formats: Sequence[str] = ("dense", SPARSE_FORMAT),
) -> None:
    """Raise InputError when an artifact was produced by another variant or model spec, or
    has a format this stage cannot start from."""
    kind = record.get("format", "dense")
    if kind not in formats:
        raise InputError(
            f"{path}: a {kind!r} artifact (quant {record['meta'].get('quant')!r}) cannot be "
            f"the input of this stage; expected one of {list(formats)}"
        )
    spec, meta = record["spec"], record["meta"]
    if variant is not None and meta.get("variant") != variant:
        raise InputError(
            f"{path}: artifact of variant {meta.get('variant')!r}, expected {variant!r}"
        )
    if arch is not None and spec["arch"] != arch:
        raise InputError(f"{path}: artifact of arch {spec['arch']!r}, expected {arch!r}")
    if kwargs is not None and _plain(spec["kwargs"]) != _plain(kwargs):
        raise InputError(
            f"{path}: artifact built with kwargs {spec['kwargs']}, but the config's model "
            f"has {kwargs}: produced by a different model spec (retrain it)"
        )


def _plain(value: Any) -> Any:
    """Tuples as lists, so a spec read back from disk compares equal to the config's."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- sparse artifact format ------------------------------------------------------------------


def _nonzero_mask(tensor: torch.Tensor) -> torch.Tensor:
    """True where any bit is set, so -0.0 counts as a value and round trips bit-exactly."""
    flat = tensor.detach().contiguous().view(-1)
    return flat.view(torch.uint8).view(flat.numel(), flat.element_size()).ne(0).any(dim=1)


def encode_sparse(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a state dict into sparse entries (floating tensors for which a bitmask plus the
    non-zero values is smaller than the dense tensor) and dense ones.

    A sparse entry is ``{"shape", "dtype", "mask", "values"}``: ``mask`` the zlib-compressed
    ``np.packbits`` of the non-zero positions (row-major), ``values`` the non-zeros in
    that order. Only tensors, lists and strings: loadable with ``weights_only=True``."""
    sparse: dict[str, Any] = {}
    dense: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.numel() >= 64:
            mask = _nonzero_mask(tensor)
            nnz = int(mask.sum())
            packed = zlib.compress(np.packbits(mask.numpy()).tobytes(), 9)
            if len(packed) + nnz * tensor.element_size() < tensor.numel() * tensor.element_size():
                sparse[name] = {
                    "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype).removeprefix("torch."),
                    "mask": torch.frombuffer(bytearray(packed), dtype=torch.uint8),
                    "values": tensor.contiguous().view(-1)[mask].clone(),
                }
                continue
        dense[name] = tensor.contiguous()
    return sparse, dense


def decode_sparse(sparse: dict[str, Any], dense: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_sparse`: the dense state dict, bit for bit."""
    state: dict[str, torch.Tensor] = dict(dense)
    for name, entry in sparse.items():
        shape = [int(s) for s in entry["shape"]]
        numel = math.prod(shape)
        bits = np.frombuffer(zlib.decompress(entry["mask"].numpy().tobytes()), dtype=np.uint8)
        mask = torch.from_numpy(np.unpackbits(bits, count=numel).astype(bool))
        values = entry["values"]
        out = torch.zeros(numel, dtype=getattr(torch, entry["dtype"]))
        out[mask] = values
        state[name] = out.view(shape)
    return state


def save_sparse_artifact(
    state_dict: dict[str, torch.Tensor], spec: dict[str, Any], path: Path, /, **meta: Any
) -> None:
    """A ``sparse``-format model file: the spec, sparse and dense tensors, meta."""
    sparse, dense = encode_sparse(state_dict)
    with atomic_path(path) as tmp:
        torch.save(
            {"format": SPARSE_FORMAT, "spec": spec, "sparse": sparse, "dense": dense, "meta": meta},
            tmp,
        )


def load_compressed(path: Any, record: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Load a ``sparse`` or ``program`` artifact (:func:`aihpc.models.load_artifact` calls
    this). A sparse record gets its dense ``state_dict``; a program comes back as the
    exported graph module (runs the quantised graph; compile it to run int8 kernels)."""
    kind = record.get("format")
    if kind == SPARSE_FORMAT:
        state = decode_sparse(record["sparse"], record["dense"])
        record = {**record, "state_dict": state}
        model = build_model(record["spec"])
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise InputError(
                f"{path}: weights do not fit the model spec it carries: "
                f"{str(exc).strip().splitlines()[-1].strip()}"
            ) from None
        return model.eval(), record
    if kind == PROGRAM_FORMAT:
        program = torch.export.load(io.BytesIO(program_bytes(record)))
        return program.module(), record
    raise InputError(f"{path}: unknown artifact format {kind!r}")


def program_bytes(record: dict[str, Any]) -> bytes:
    """The ``torch.export.save`` archive inside a ``program`` artifact."""
    _import_torchao()  # registers the quantised ops and tensor subclasses the program uses
    return zlib.decompress(record["program"].numpy().tobytes())


@functools.cache
def _import_torchao() -> None:
    import torchao
    import torchao.quantization.pt2e  # noqa: F401


# --- counting --------------------------------------------------------------------------------


def prunable_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") of every convolution and linear layer."""
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def classifier_name(model: nn.Module) -> str:
    """The name of the last convolution or linear layer: the classifier, which structured
    pruning leaves whole and int8 quantisation leaves in float."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)][-1]


def prunable_zeros(model: nn.Module) -> tuple[int, int]:
    """(zero weights, all weights) over the conv and linear weights."""
    weights = [getattr(m, n) for m, n in prunable_parameters(model)]
    total = sum(w.numel() for w in weights)
    return total - sum(int(torch.count_nonzero(w)) for w in weights), total


def _plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The stored data of a tensor subclass (torchao's int8 weights keep it in ``qdata``)."""
    return getattr(tensor, "qdata", tensor)


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters): every parameter plus the integer (quantised)
    weights an exported program keeps as buffers."""
    tensors = [_plain_tensor(p) for p in model.parameters()]
    tensors += [b for b in model.buffers() if b.dtype in (torch.int8, torch.uint8)]
    params = sum(t.numel() for t in tensors)
    return params, sum(int(torch.count_nonzero(t)) for t in tensors)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one image (FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    channels, height, width = input_shape
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.rand(1, channels, height, width))
    return int(counter.get_total_flops() // 2)


# --- structured pruning ----------------------------------------------------------------------


def _top_level(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.children() if isinstance(m, kind)]


def _resnet_s_widths(model: nn.Module) -> dict[str, Any]:
    return {
        "widths": [m.out_channels for m in _top_level(model, nn.Conv2d)],
        "inner_widths": [b.body[0].out_channels for b in _top_level(model, ResidualBlock)],
    }


def _seed_cnn_widths(model: nn.Module) -> dict[str, Any]:
    return {
        "widths": [m.out_channels for m in _top_level(model, nn.Conv2d)],
        "hidden": _top_level(model, nn.Linear)[0].out_features,
    }


# How to read a pruned model's per-layer widths back into its architecture's kwargs.
WIDTH_READERS = {"resnet_s": _resnet_s_widths, "seed_cnn": _seed_cnn_widths}


def prune_structured(
    model: nn.Module, spec: dict[str, Any], ratio: float, *, round_to: int = 8
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove ``ratio`` of the channels of every prunable layer group (L2 magnitude,
    DepGraph-coupled across residual connections, classifier kept, widths rounded to
    ``round_to``); returns a model rebuilt from the new spec with the surviving weights."""
    import torch_pruning as tp

    ratio = check_ratio(ratio)
    arch = spec["arch"]
    if arch not in WIDTH_READERS:
        raise InputError(
            f"structured pruning cannot rebuild arch {arch!r}: add a width reader to "
            f"aihpc.compress.WIDTH_READERS (known: {sorted(WIDTH_READERS)})"
        )
    model = copy.deepcopy(model).eval()
    classifier = model.get_submodule(classifier_name(model))
    side, channels = spec["input_size"], spec["in_channels"]
    example = torch.rand(1, channels, side, side)
    if ratio > 0:
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[classifier],
            round_to=round_to,
        )
        pruner.step()
    new_spec = {**spec, "kwargs": {**spec["kwargs"], **WIDTH_READERS[arch](model)}}
    rebuilt = build_model(new_spec)
    rebuilt.load_state_dict(model.state_dict())  # strict: the spec describes every shape
    return rebuilt.eval(), new_spec


# --- unstructured pruning --------------------------------------------------------------------


@contextmanager
def _contiguous_weights(params: list[tuple[nn.Module, str]]) -> Iterator[None]:
    """torch.nn.utils.prune flattens with .view(-1), which channels_last weights refuse;
    the Parameter objects (and so the optimizer's references) stay the same."""
    formats = []
    for module, name in params:
        weight = getattr(module, name)
        formats.append(
            torch.channels_last
            if weight.dim() == 4 and not weight.is_contiguous()
            else torch.contiguous_format
        )
        weight.data = weight.data.contiguous()
    try:
        yield
    finally:
        for (module, name), memory_format in zip(params, formats, strict=True):
            weight = getattr(module, name)
            weight.data = weight.data.contiguous(memory_format=memory_format)


def prune_unstructured(model: nn.Module, ratio: float) -> nn.Module:
    """Global magnitude pruning of all conv/linear weights, in place and permanent: exactly
    ``round(ratio * total)`` weights become (positive) zero."""
    ratio = check_ratio(ratio)
    params = prunable_parameters(model)
    with torch.no_grad(), _contiguous_weights(params):
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=ratio)
        for module, name in params:
            prune.remove(module, name)
            weight = getattr(module, name)
            weight.masked_fill_(weight == 0, 0.0)  # orig * 0 leaves -0.0 for negative weights
    return model


def gradual_sparsity(step: int, steps: int, target: float) -> float:
    """Cubic schedule (Zhu & Gupta, 2017): sparsity after pruning step ``step`` of ``steps``."""
    return target * (1.0 - (1.0 - min(step, steps) / steps) ** 3)


class L1Penalty(Callback):
    """Adds ``lam * sign(w)`` (the gradient of ``lam * |w|_1``) to the conv/linear weight
    gradients before each optimizer step (after AMP unscaling)."""

    def __init__(self, lam: float) -> None:
        self.lam = float(lam)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        for module, name in prunable_parameters(pl_module):
            weight = getattr(module, name)
            if weight.grad is not None:
                weight.grad.add_(torch.sign(weight.detach()), alpha=self.lam)


class KeepMasks(Callback):
    """Keeps pruned weights at zero while fine-tuning: the masks (non-zero weights at the
    start, or after a resume) zero the gradients before each optimizer step and the weights
    after it. With ``target``, it also prunes further on the cubic schedule of
    :func:`gradual_sparsity`: step 1 happened in the prune stage, steps 2..``steps`` are
    spread over the first 75 % of fine-tuning steps, the last one reaching ``target``."""

    def __init__(self, target: float | None = None, steps: int = 1) -> None:
        self.target, self.steps = target, steps
        self.masks: list[torch.Tensor] = []
        self.schedule: list[tuple[int, float]] = []

    def _update_masks(self, pl_module: pl.LightningModule) -> None:
        self.masks = [getattr(m, n).detach() != 0 for m, n in prunable_parameters(pl_module)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update_masks(pl_module)
        self.schedule = []
        if self.target is not None and self.steps > 1:
            total = int(trainer.estimated_stepping_batches)
            end = GRADUAL_END_FRACTION * total
            self.schedule = [
                (
                    round((k - 1) / (self.steps - 1) * end),
                    gradual_sparsity(k, self.steps, self.target),
                )
                for k in range(2, self.steps + 1)
            ]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        due = [s for step, s in self.schedule if step <= trainer.global_step]
        if not due:
            return
        zeros, total = prunable_zeros(pl_module)
        if max(due) > zeros / total + 0.5 / total:
            prune_unstructured(pl_module, max(due))
            self._update_masks(pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        for (module, name), mask in zip(prunable_parameters(pl_module), self.masks, strict=True):
            grad = getattr(module, name).grad
            if grad is not None:
                grad.masked_fill_(~mask, 0.0)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        with torch.no_grad():
            for (module, name), mask in zip(
                prunable_parameters(pl_module), self.masks, strict=True
            ):
                getattr(module, name).masked_fill_(~mask, 0.0)


# --- the prune and fine-tune stages ----------------------------------------------------------


def prune_artifact(
    in_path: Path,
    out_path: Path,
    *,
    variant: str,
    model: str,
    method: str,
    ratio: float,
    arch: str | None = None,
    kwargs: dict[str, Any] | None = None,
    round_to: int = 8,
    l1: float = 0.0,
    gradual: bool = False,
    gradual_steps: int = 4,
) -> dict[str, Any]:
    """The prune stage: the trained ``model``'s artifact -> the pruned artifact of
    ``variant`` (dense; fine-tuning reads it). Returns the meta written."""
    method, ratio = check_method(method), check_ratio(ratio)
    if gradual and method != "unstructured":
        raise InputError(f"{variant}: only unstructured pruning has a gradual schedule")
    net, record = load_artifact(in_path)
    expect_artifact(in_path, record, variant=model, arch=arch, kwargs=kwargs)
    spec = record["spec"]
    params_before = sum(p.numel() for p in net.parameters())
    if method == "structured":
        net, spec = prune_structured(net, spec, ratio, round_to=round_to)
        applied = ratio
    else:
        applied = gradual_sparsity(1, gradual_steps, ratio) if gradual else ratio
        prune_unstructured(net, applied)
    zeros, total = prunable_zeros(net)
    meta = {
        **record["meta"],
        "variant": variant,
        "model": model,
        "parent": model,
        "stage": "prune",
        "prune_method": method,
        "prune_ratio": ratio,
        "prune_l1": float(l1),
        "prune_gradual": bool(gradual),
        "pruned_ratio_applied": applied,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in net.parameters()),
        "prunable_sparsity": zeros / total,
        "quant": "fp32",
        "kwargs_after": repr(spec["kwargs"]),
    }
    save_artifact(net, spec, out_path, **meta)
    print(
        f"{variant}: {method} {ratio:g} -> {meta['params_after']:,} of {params_before:,} "
        f"parameters, conv/linear sparsity {zeros / total:.4f}, kwargs {spec['kwargs']}"
    )
    return meta


def finetune(
    pruned_path: Path,
    paths: Any,
    model_cfg: ModelConfig,
    *,
    threads: int | None = None,
    gradual_steps: int = 4,
    teacher: Path | None = None,
    distill: DistillConfig | None = None,
) -> dict[str, Any]:
    """The fine-tune stage: a short :func:`aihpc.train.fit` from the pruned weights
    (``init_from``), with the masks kept (unstructured) and the L1 penalty if configured.
    With ``distill.weight`` > 0, the loss distills from ``teacher``: the artifact of the
    trained model the variant was pruned from (frozen, fp32). ``paths`` is an
    :class:`aihpc.train.TrainPaths`; an unstructured model is written in the ``sparse``
    format. Returns the run record."""
    from aihpc.train import Distillation, fit

    record = torch.load(pruned_path, map_location="cpu", weights_only=True)
    expect_artifact(pruned_path, record, variant=model_cfg.name, formats=("dense",))
    meta = record["meta"]
    method, ratio = check_method(meta["prune_method"]), check_ratio(meta["prune_ratio"])
    distill = distill or DistillConfig()
    distillation = None
    if distill.weight > 0:
        if teacher is None:
            raise InputError(f"{model_cfg.name}: compress.distill.weight > 0 needs a teacher")
        distillation = Distillation(
            _teacher_of(teacher, meta),
            file_sha256(teacher),
            temperature=distill.temperature,
            weight=distill.weight,
        )
    callbacks: list[Callback] = []
    if meta.get("prune_l1"):
        callbacks.append(L1Penalty(meta["prune_l1"]))
    if method == "unstructured":
        target = ratio if meta.get("prune_gradual") else None
        callbacks.append(KeepMasks(target=target, steps=gradual_steps))
    keep = ("model", "parent", "prune_method", "prune_ratio", "prune_l1", "prune_gradual")
    extra_meta = {
        **{k: meta[k] for k in keep if k in meta},
        "stage": "finetune",
        "quant": "fp32",
        "finetune_epochs": model_cfg.train.epochs,
        "params_before": meta.get("params_before"),
        "distill_weight": distill.weight,
        "distill_temperature": distill.temperature if distillation else None,
    }
    # An unstructured variant is fine-tuned dense, then stored sparse.
    sparse = method == "unstructured"
    dense = Path(paths.work_dir) / "finetuned-dense.pt"
    result = fit(
        replace(paths, model_out=dense) if sparse else paths,
        model_cfg,
        threads=threads,
        init_from=pruned_path,
        callbacks=callbacks,
        extra_meta=extra_meta,
        distill=distillation,
    )
    if not sparse:
        return result
    net, dense_record = load_artifact(dense)
    zeros, total = prunable_zeros(net)
    expected = round(ratio * total)
    if zeros < expected:
        raise RuntimeError(f"fine-tuning lost sparsity: {zeros} zeros, expected {expected}")
    save_sparse_artifact(
        net.state_dict(),
        dense_record["spec"],
        paths.model_out,
        **dense_record["meta"],
        prunable_sparsity=zeros / total,
    )
    dense.unlink()
    print(f"{model_cfg.name}: conv/linear sparsity after fine-tuning {zeros / total:.4f}")
    return result


def _teacher_of(path: Path, pruned_meta: dict[str, Any]) -> nn.Module:
    """The trained model a pruned variant came from, checked to be that very model: a dense
    artifact of the variant's ``model`` whose training run (config hash) is the one the
    pruned artifact's meta inherited."""
    teacher, record = load_artifact(path)
    expect_artifact(path, record, variant=pruned_meta["model"], formats=("dense",))
    trained = pruned_meta.get("config_hash")
    if record["meta"].get("config_hash") != trained:
        raise InputError(
            f"{path}: teacher from training run {record['meta'].get('config_hash')!r}, but the "
            f"variant was pruned from run {trained!r} (retrain or re-prune)"
        )
    return teacher


# --- export-time rewrites ------------------------------------------------------------------


def fold_bn_through_max_pools(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` (in eval mode) in which every ``Conv2d -> max-pool -> BatchNorm2d``
    run inside an ``nn.Sequential`` becomes ``Conv2d (the BN folded in) -> max-pool``.

    Exact: an eval-mode BN is the per-channel map ``s * x + b``; where every ``s > 0`` it is
    increasing, so it commutes with taking a maximum. ``resnet_s`` pools between each stage's
    convolution and its BN, where no conv-BN fusion (Inductor's, PT2E's) finds the pair; int8
    then quantises and dequantises around each such BN. A BN with some ``s <= 0`` (max would
    turn into min there) stays where it is. Returns the copy and the names of the folded
    BNs."""
    if model.training:
        raise ValueError("folding batch norms needs a model in eval mode (running statistics)")
    model = copy.deepcopy(model)
    folded = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 2):
            conv, pool, bn = seq[i], seq[i + 1], seq[i + 2]
            if not (
                isinstance(conv, nn.Conv2d)
                and isinstance(pool, nn.MaxPool2d | nn.AdaptiveMaxPool2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.running_var is not None
            ):
                continue
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.detach()
            if not bool((scale > 0).all()):
                continue
            seq[i] = fuse_conv_bn_eval(conv, bn)
            seq[i + 2] = nn.Identity()
            folded.append(f"{name}.{i + 2}" if name else str(i + 2))
    return model, folded


# --- quantisation ----------------------------------------------------------------------------


def calibration_images(data_dir: Path, samples: int, seed: int = 0) -> torch.Tensor:
    """A seeded random subset of the training split, float NCHW in [0, 1]."""
    if samples < 1:
        raise InputError(f"calibration_samples: {samples} must be at least 1")
    images, _ = load_split(Path(data_dir), "train")
    if len(images) == 0:
        raise InputError(
            f"{Path(data_dir) / 'train_images.npy'}: no training images to calibrate with"
        )
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(images), size=min(samples, len(images)), replace=False))
    return torch.from_numpy(np.array(images[index])).permute(0, 3, 1, 2).float().div_(255)


@contextmanager
def _layer_trace(model: nn.Module) -> Iterator[list[str]]:
    """The stack of module names whose forward is running (innermost last)."""
    stack: list[str] = []
    handles = []
    for name, module in model.named_modules():

        def enter(_module: nn.Module, _args: Any, name: str = name) -> None:
            stack.append(name)

        def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
            stack.pop()

        handles += [
            module.register_forward_pre_hook(enter),
            module.register_forward_hook(leave),
        ]
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def export_model(
    model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension (or ``example``'s batch size only); a
    model it cannot trace raises InputError naming the innermost layer that failed."""
    batch = {0: torch.export.Dim.DYNAMIC} if dynamic_batch else None
    with _layer_trace(model) as stack:
        try:
            return torch.export.export(model, (example,), dynamic_shapes=(batch,))
        except Exception as exc:
            layer = stack[-1] if stack else ""
            module = model.get_submodule(layer) if layer else model
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc))
            raise InputError(
                f"torch.export cannot trace layer '{layer or '(model)'}' "
                f"({type(module).__name__}): {first}"
            ) from None


def _strip_unreferenced(graph_module: torch.fx.GraphModule) -> int:
    """Delete parameters and buffers no ``get_attr`` node reads (the fp32 weights that
    ``convert_pt2e`` replaced by int8 constants); returns how many elements were dropped."""
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    dropped = 0
    for name, tensor in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = graph_module.get_submodule(owner_name) if owner_name else graph_module
        dropped += tensor.numel()
        delattr(owner, attr)
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return dropped


class CastTo(nn.Module):
    """Runs a half-precision model on float32 input and returns float32 logits."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def _same(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    return graph_module


def int8_config(observer: str = "histogram") -> Any:
    """The X86 Inductor quantizer's default static config (uint8 per-tensor activations,
    int8 per-channel symmetric weights). ``observer`` picks the activation range observer:
    ``histogram`` (the default: error-minimising ranges, a few seconds per model) or
    ``minmax`` (the observed range, instant)."""
    from dataclasses import replace as replace_spec

    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    config = xiq.get_default_x86_inductor_quantization_config()
    if observer == "histogram":
        return config
    if observer != "minmax":
        raise InputError(f"observer: unknown {observer!r}; known: ['histogram', 'minmax']")
    activation = replace_spec(
        config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12)
    )
    return replace_spec(config, input_activation=activation, output_activation=activation)


def quantize_model(
    model: nn.Module,
    mode: str,
    calibration: torch.Tensor,
    *,
    batch_size: int = 128,
    observer: str = "histogram",
) -> tuple[torch.export.ExportedProgram, torch.fx.GraphModule | None]:
    """Quantise ``model`` (fp32, eval) into an exported program.

    ``int8``: static int8 activations and per-channel int8 weights via torchao PT2E with
    the X86 Inductor quantizer (max-pools and the classifier left in float), calibrated on
    ``calibration`` (activation ranges from ``observer``, see :func:`int8_config`); also
    returns the converted graph module (for :func:`layer_report`). ``int8dyn``: torchao's
    dynamic int8 activation + int8 weight config on the Linear layers. ``fp16``/``bf16``:
    weights and compute in half precision behind a float32 interface. Batch norms behind
    max-pools are folded into their convolutions first (:func:`fold_bn_through_max_pools`)."""
    check_quant_mode(mode)
    if len(calibration) == 0:
        raise InputError("calibration set is empty")
    model, folded = fold_bn_through_max_pools(copy.deepcopy(model).eval())
    if folded:
        print(f"folded the batch norms {folded} into the convolutions before their max-pools")
    example = calibration[:2].clone()  # a view would store the whole calibration set
    if mode == "int8":
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        captured = export_model(model, example).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(int8_config(observer))
        # Max-pools and the classifier stay float: at these sizes oneDNN's int8 max-pool and
        # linear cost more per call than the float ops, which Inductor fuses with the
        # (de)quantisation around them anyway. On resnet_s-struct0.5 this took compiled b=1
        # from 0.56 to 0.48 ms and b=256 from 18.9 to 16.3 ms (docs/benchmarks.md).
        quantizer.set_module_type_qconfig(nn.MaxPool2d, None)
        quantizer.set_module_name_qconfig(classifier_name(model), None)
        prepared = prepare_pt2e(captured, quantizer)
        with torch.no_grad():
            for start in range(0, len(calibration), batch_size):
                prepared(calibration[start : start + batch_size])
        # convert_pt2e also folds QAT conv-BN patterns, exporting ~100 pattern graphs
        # (~30 s on 2 cores) whenever a BN is left in the graph (ours follow max-pools). A
        # post-training graph has no QAT pattern: prepare_pt2e already folded conv-BN pairs.
        with mock.patch("torchao.quantization.pt2e.quantize_pt2e._fold_conv_bn_qat", _same):
            converted = convert_pt2e(prepared)
        dropped = _strip_unreferenced(converted)
        print(f"int8: dropped {dropped:,} fp32 weight elements the converted graph no longer uses")
        return export_model(converted, example), converted
    if mode == "int8dyn":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise InputError("int8dyn quantises Linear layers, and this model has none")
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        return export_model(model, example), None
    return export_model(CastTo(model, HALF_DTYPES[mode]), example), None


def _stored_weight(tensor: torch.Tensor) -> dict[str, Any]:
    """A stored weight's dtype, elements, non-zeros and density rho = non-zeros / total."""
    nonzeros = int(torch.count_nonzero(tensor))
    return {
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "numel": tensor.numel(),
        "nonzeros": nonzeros,
        "density": nonzeros / tensor.numel(),
    }


def layer_report(converted: torch.fx.GraphModule | None, program_module: nn.Module) -> Any:
    """Per conv/linear layer: weight dtype, weight scale range (per-channel alpha) and zero point,
    input activation scale and zero point (int8), weight elements, non-zeros and density
    rho = non-zeros / total of the stored weight."""
    rows = []
    if converted is not None:
        tensors = dict(converted.named_buffers()) | dict(converted.named_parameters())
        for node in converted.graph.nodes:
            if node.op != "call_function" or node.target not in (
                torch.ops.aten.conv2d.default,
                torch.ops.aten.linear.default,
            ):
                continue
            activation, weight = node.args[0], node.args[1]
            stack = node.meta.get("nn_module_stack") or {}
            layer = list(stack.values())[-1][0] if stack else node.name
            row: dict[str, Any] = {"layer": layer, "op": str(node.target).split(".")[-2]}
            if getattr(weight, "op", None) == "call_function" and "dequantize_per_channel" in str(
                weight.target
            ):
                qweight, scale, zero = (tensors[a.target] for a in weight.args[:3])
                row |= _stored_weight(qweight) | {
                    "weight_scale_min": float(scale.min()),
                    "weight_scale_max": float(scale.max()),
                    "weight_zero_point": int(zero.abs().max()),
                }
            elif getattr(weight, "op", None) == "get_attr":  # a layer left in float
                row |= _stored_weight(tensors[weight.target])
            if getattr(
                activation, "op", None
            ) == "call_function" and "dequantize_per_tensor" in str(activation.target):
                row |= {
                    "input_scale": float(activation.args[1]),
                    "input_zero_point": int(activation.args[2]),
                }
            rows.append(row)
    else:
        for name, module in program_module.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
                continue
            scale = getattr(weight, "scale", None)
            row = {
                "layer": name,
                "op": {2: "linear", 4: "conv2d"}.get(weight.dim(), type(module).__name__.lower()),
                **_stored_weight(_plain_tensor(weight)),
            }
            if isinstance(scale, torch.Tensor):
                row |= {
                    "weight_scale_min": float(scale.min()),
                    "weight_scale_max": float(scale.max()),
                    "weight_zero_point": 0,
                }
            rows.append(row)
    import pandas as pd  # not needed to load or evaluate artifacts

    return pd.DataFrame(rows, columns=LAYER_COLUMNS)


def save_program_artifact(
    program: torch.export.ExportedProgram, spec: dict[str, Any], path: Path, /, **meta: Any
) -> bytes:
    """A ``program``-format model file (the zlib-compressed ``torch.export.save`` archive,
    the spec and meta; loadable with ``weights_only=True``); returns the raw archive."""
    for node in program.graph.nodes:  # debug provenance, often most of the archive
        for key in ("stack_trace", "from_node"):
            node.meta.pop(key, None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    raw = buffer.getvalue()
    packed = torch.frombuffer(bytearray(zlib.compress(raw, 9)), dtype=torch.uint8)
    with atomic_path(path) as tmp:
        torch.save({"format": PROGRAM_FORMAT, "spec": spec, "program": packed, "meta": meta}, tmp)
    return raw


def quantize_artifact(
    in_path: Path,
    data_dir: Path,
    out_model: Path,
    out_program: Path,
    out_layers: Path,
    *,
    variant: str,
    parent: str,
    mode: str,
    samples: int = 512,
    seed: int = 0,
    observer: str = "histogram",
    threads: int | None = None,
) -> dict[str, Any]:
    """The quantize stage: ``parent``'s artifact -> the quantised artifact of ``variant``
    (``out_model``), the deployable ``torch.export`` archive (``out_program``) and the
    per-layer table (``out_layers``). Returns the meta written."""
    check_quant_mode(mode)
    if threads:
        torch.set_num_threads(threads)
    model, record = load_artifact(in_path)
    expect_artifact(in_path, record, variant=parent)
    # Calibrates int8; for every mode, the images the top-1 agreement is checked on.
    calibration = calibration_images(data_dir, samples, seed)
    started = time.perf_counter()
    program, converted = quantize_model(model, mode, calibration, observer=observer)
    seconds = time.perf_counter() - started
    module = program.module()
    with torch.no_grad():
        reference = model(calibration).argmax(1)
        agreement = float((module(calibration).argmax(1) == reference).float().mean())
    layers = layer_report(converted, module)
    params, nonzeros = weight_counts(module)
    meta = {
        **record["meta"],
        "variant": variant,
        "parent": parent,
        "stage": "quantize",
        "quant": mode,
        "quantize_seconds": round(seconds, 3),
        "calibration_samples": len(calibration) if mode == "int8" else 0,
        "calibration_observer": observer if mode == "int8" else None,
        "calibration_top1_agreement": agreement,
        "macs": count_macs(model, calibration.shape[1:]),
        "params_fp32": sum(p.numel() for p in model.parameters()),
    }
    meta.setdefault("prune_method", "none")
    raw = save_program_artifact(program, record["spec"], out_model, **meta)
    with atomic_path(out_program) as tmp:
        tmp.write_bytes(raw)
    with atomic_path(out_layers) as tmp:
        layers.to_csv(tmp, index=False)
    print(
        f"{variant}: {mode} from {parent} in {seconds:.1f} s; {params:,} weights "
        f"({nonzeros:,} non-zero); top-1 agreement with fp32 on the calibration set "
        f"{agreement:.4f}; archive {len(raw):,} bytes, artifact "
        f"{os.path.getsize(out_model):,} bytes"
    )
    print(layers.to_string(index=False))
    return meta


# --- compiled inference ----------------------------------------------------------------------


def _folded_for_inference(model: nn.Module) -> nn.Module:
    """An ``nn.Module`` (not an exported program's graph module) in eval mode with its batch
    norms behind max-pools folded, as :func:`quantize_model` does, so that compiled fp32
    and int8 models compare like for like; any other model as it is."""
    if isinstance(model, torch.fx.GraphModule) or model.training:
        return model
    return fold_bn_through_max_pools(model)[0]


def compile_for_cpu(model: nn.Module, *, cpp_wrapper: bool = False) -> nn.Module:
    """``torch.compile`` for CPU inference: Inductor with frozen weights (constant-folded,
    prepacked oneDNN kernels; what lowers PT2E int8 graphs to int8 kernels), one static
    graph per input shape. Compiling many models in one process would hit Dynamo's
    recompile limit (every ``nn.Sequential`` shares one ``forward``), so it is raised;
    Inductor's on-disk FX graph cache makes later runs of the same graph cheap.
    ``cpp_wrapper`` generates the per-call wrapper in C++ instead of Python (less overhead
    per call, which dominates small batches; slower to compile). Batch norms behind
    max-pools are folded first (:func:`_folded_for_inference`)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    model = _folded_for_inference(model)

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    inductor_config.fx_graph_cache = True
    # Global, not a per-call option: the int8 weight prepacking runs only when the setting
    # is on while AOT autograd decides what to freeze.
    inductor_config.freezing = True
    return torch.compile(model, dynamic=False, options={"cpp_wrapper": cpp_wrapper})


def compile_aot(model: nn.Module, example: torch.Tensor, package: Path) -> Any:
    """AOTInductor: ``model`` exported for ``example``'s shape (:func:`export_model`),
    compiled ahead of time into the ``package`` file (generated C++ kernels and wrapper,
    frozen weights, the same oneDNN fp32 and int8 kernels as :func:`compile_for_cpu`) and
    loaded back; the runner takes that batch size only. A call runs no Python: no Dynamo
    guards and no Python wrapper, the fixed cost that weighs most at batch 1. Batch norms
    behind max-pools are folded first, as there."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    model = _folded_for_inference(model)
    # A static batch: with a dynamic one, torch 2.13 compiles PT2E int8 graphs into
    # packages whose outputs are wrong (9 % accuracy on Fashion-MNIST).
    program = export_model(model, example, dynamic_batch=False)
    # Freezing, and with it the int8 weight prepacking, runs only with autograd off.
    with torch.no_grad():
        aoti_compile_and_package(
            program, package_path=str(package), inductor_configs={"freezing": True}
        )
    return aoti_load_package(str(package))
