"""Model registry and rebuild-from-spec.

Every model takes uint8-scaled float input in [0, 1] (N, C, H, W) and normalises it
itself, so a saved artifact is self-contained: evaluation, compression and deployment
never need the dataset statistics separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from aihpc.errors import InputError
from aihpc.files import atomic_path

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def decorator(factory: ModelFactory) -> ModelFactory:
        MODELS[name] = factory
        return factory

    return decorator


class Normalize(nn.Module):
    """Per-channel (x - mean) / std with the statistics stored as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut; ``inner`` channels between the two
    convolutions (default ``channels``; structured pruning makes it narrower)."""

    def __init__(self, channels: int, inner: int | None = None) -> None:
        super().__init__()
        inner = channels if inner is None else inner
        self.body = nn.Sequential(*conv_bn(channels, inner), nn.GELU(), *conv_bn(inner, channels))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


@register("seed_cnn")
def seed_cnn(
    in_channels: int,
    num_classes: int,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    widths: Sequence[int] = (32, 64, 64),
    hidden: int = 128,
) -> nn.Module:
    """The seed's baseline: three conv layers (ReLU, 2x2 max-pool after the first two)
    and two dense layers."""
    c1, c2, c3 = widths
    side = input_size // 4
    return nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(in_channels, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c3 * side * side, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register("resnet_s")
def resnet_s(
    in_channels: int,
    num_classes: int,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    widths: Sequence[int] = (32, 64, 128),
    inner_widths: Sequence[int] | None = None,
) -> nn.Module:
    """A small residual CNN for 28-32 px images (airbench-style: each stage is a conv,
    a 2x2 max-pool, BN, GELU, then one residual block at the pooled resolution).

    ``inner_widths`` (one per residual block, default: the stage widths) are the channels
    inside each block; with ``widths`` they fix every layer's width (structured pruning)."""
    del input_size  # global pooling makes the network size-agnostic
    inner = list(widths[1:]) if inner_widths is None else list(inner_widths)
    if len(inner) != len(widths) - 1:
        raise ValueError(f"inner_widths needs {len(widths) - 1} entries, got {inner}")
    layers: list[nn.Module] = [Normalize(mean, std), *conv_bn(in_channels, widths[0]), nn.GELU()]
    c_in = widths[0]
    for c_out, c_inner in zip(widths[1:], inner, strict=True):
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(c_out),
            nn.GELU(),
            ResidualBlock(c_out, c_inner),
        ]
        c_in = c_out
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes, bias=False)]
    return nn.Sequential(*layers)


def model_spec(arch: str, dataset_stats: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """The description an artifact carries so any stage can rebuild the model."""
    if arch not in MODELS:
        raise ValueError(f"unknown model '{arch}'; registered: {sorted(MODELS)}")
    height, width, channels = dataset_stats["image_shape"]
    if height != width:
        raise ValueError(f"models expect square images, got {height}x{width}")
    return {
        "arch": arch,
        "in_channels": channels,
        "num_classes": dataset_stats["num_classes"],
        "input_size": height,
        "mean": list(dataset_stats["mean"]),
        "std": list(dataset_stats["std"]),
        "kwargs": kwargs,
    }


def build_model(spec: dict[str, Any]) -> nn.Module:
    arch = spec["arch"]
    if arch not in MODELS:
        raise ValueError(f"unknown model '{arch}'; registered: {sorted(MODELS)}")
    return MODELS[arch](
        in_channels=spec["in_channels"],
        num_classes=spec["num_classes"],
        input_size=spec["input_size"],
        mean=spec["mean"],
        std=spec["std"],
        **spec["kwargs"],
    )


def save_artifact(model: nn.Module, spec: dict[str, Any], path: Any, /, **meta: Any) -> None:
    """Write a self-describing model file: the spec to rebuild it, its weights, and meta
    (who produced it, config hash, ...). Loadable with ``torch.load(weights_only=True)``."""
    with atomic_path(path) as tmp:
        torch.save({"spec": spec, "state_dict": model.state_dict(), "meta": meta}, tmp)


def load_artifact(path: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from its artifact; returns the model (eval mode, CPU) and the record.

    Compressed artifacts (``record["format"]``: ``sparse`` bitmask + values, ``program`` a
    quantised ``torch.export`` program) load through :func:`aihpc.compress.load_compressed`;
    a sparse record comes back with its dense ``state_dict`` filled in."""
    record = torch.load(path, map_location="cpu", weights_only=True)
    if record.get("format", "dense") != "dense":
        from aihpc.compress import load_compressed  # compress imports this module

        return load_compressed(path, record)
    model = build_model(record["spec"])
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise InputError(
            f"{path}: weights do not fit the model spec it carries "
            f"(arch {record['spec']['arch']!r}, kwargs {record['spec']['kwargs']}): {first}"
        ) from None
    return model.eval(), record


def update_artifact_meta(path: Any, **meta: Any) -> dict[str, Any]:
    """Add ``meta`` to an artifact's record in place (atomically); returns the new meta."""
    record = torch.load(path, map_location="cpu", weights_only=True)
    record["meta"].update(meta)
    with atomic_path(path) as tmp:
        torch.save(record, tmp)
    return record["meta"]
