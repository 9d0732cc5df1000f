"""Evaluate a model artifact on the preprocessed test split: accuracy, size, sparsity, latency.

Everything runs on the CPU, because CPU inference cost is what the compression stages
are meant to improve; the result carries the artifact's provenance so the summary can
be built from evaluation JSONs alone.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from aihpc.compress import compile_aot, count_macs, weight_counts
from aihpc.data import load_split, read_stats
from aihpc.errors import InputError
from aihpc.files import write_json
from aihpc.models import load_artifact
from aihpc.provenance import cpu_info, package_versions

SCALAR_TYPES = (str, int, float, bool, type(None))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1], stored channels_last (faster CPU conv kernels)."""
    # np.array copies: load_split hands out read-only memory maps, which
    # torch.from_numpy only wraps with a warning.
    batch = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div_(255)
    return batch.contiguous(memory_format=torch.channels_last)


def evaluate_model(
    model_path: Path,
    data_dir: Path,
    *,
    threads: int = 1,
    latency_batch_sizes: Sequence[int] = (1, 256),
    warmup: int = 3,
    repeats: int = 10,
    eval_batch_size: int = 1000,
    compile: bool = False,
    cpp_wrapper: bool = False,
    aot: bool = False,
) -> dict[str, Any]:
    """Accuracy metrics, parameter counts, MACs, file size and CPU latency of one artifact.

    Latency is measured eager (``latency_eager_b<B>_ms``) and, with ``compile``, compiled
    with :func:`aihpc.compress.compile_for_cpu` (``latency_compiled_b<B>_ms``, where int8
    programs run int8 kernels); ``latency_b<B>_ms`` is the faster of the two. With
    ``compile``, accuracy is scored by the compiled model in batches of the largest latency
    batch size (the last one zero-padded), so only the timed shapes are compiled;
    ``cpp_wrapper`` compiles with Inductor's C++ wrapper. ``aot`` also times an
    AOTInductor package per batch size (:func:`aihpc.compress.compile_aot`, no Python per
    call; ``latency_aot_b<B>_ms``), built in a temporary directory."""
    model_path, data_dir = Path(model_path), Path(data_dir)
    if repeats < 1 or warmup < 0 or eval_batch_size < 1:
        raise ValueError(
            f"need repeats >= 1, warmup >= 0, eval_batch_size >= 1; got {repeats}, {warmup}, "
            f"{eval_batch_size}"
        )
    if not latency_batch_sizes or min(latency_batch_sizes) < 1:
        raise ValueError(f"latency_batch_sizes must be positive, got {list(latency_batch_sizes)}")

    model, record = load_artifact(model_path)
    stats = read_stats(data_dir)
    images, labels = load_split(data_dir, "test")
    check_compatible(model_path, record["spec"], data_dir, stats, images.shape)
    is_program = record.get("format") == "program"  # an exported graph keeps its layout
    if not is_program:
        model = model.to(memory_format=torch.channels_last)
    largest = max(latency_batch_sizes)
    scorer, compile_seconds = model, None
    if compile:
        from aihpc.compress import compile_for_cpu

        scorer, eval_batch_size = compile_for_cpu(model, cpp_wrapper=cpp_wrapper), largest
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in sorted(set(latency_batch_sizes)):
                scorer(to_input(np.zeros((batch, *images.shape[1:]), dtype=np.uint8)))
        compile_seconds = time.perf_counter() - started
    num_classes = int(stats["num_classes"])
    class_names = [str(name) for name in stats["class_names"]]

    accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
    per_class = MulticlassAccuracy(num_classes=num_classes, average=None)
    confusion = MulticlassConfusionMatrix(num_classes=num_classes)
    targets = torch.from_numpy(np.array(labels, dtype=np.int64))
    with torch.inference_mode():
        for start in range(0, len(images), eval_batch_size):
            stop = start + eval_batch_size
            chunk = images[start:stop]
            if compile and len(chunk) < eval_batch_size:  # pad: no extra compiled shape
                padding = np.zeros((eval_batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, padding])
            preds = scorer(to_input(chunk)).argmax(dim=1)[: min(stop, len(images)) - start]
            for metric in (accuracy, per_class, confusion):
                metric.update(preds, targets[start:stop])

    params, nonzeros = weight_counts(model)
    image_shape = tuple(images.shape[1:])
    eager = measure_latency(model, image_shape, latency_batch_sizes, threads, warmup, repeats)
    compiled = (
        measure_latency(scorer, image_shape, latency_batch_sizes, threads, warmup, repeats)
        if compile
        else {}
    )
    latencies = {b: min(eager[b], compiled.get(b, math.inf)) for b in eager}
    aot_latencies, aot_compile_seconds = {}, None
    if aot:
        aot_compile_seconds = 0.0
        with tempfile.TemporaryDirectory() as packages:
            for batch in latency_batch_sizes:
                example = to_input(np.zeros((batch, *image_shape), dtype=np.uint8))
                started = time.perf_counter()
                runner = compile_aot(model, example, Path(packages) / f"b{batch}.pt2")
                aot_compile_seconds += time.perf_counter() - started
                aot_latencies |= measure_latency(
                    runner, image_shape, [batch], threads, warmup, repeats
                )
    meta = record["meta"]
    height, width, channels = image_shape
    macs = meta.get("macs") if is_program else None
    macs = macs if macs is not None else count_macs(model, (channels, height, width))

    result: dict[str, Any] = {k: v for k, v in meta.items() if isinstance(v, SCALAR_TYPES)}
    # Measured values come last so that no meta key can shadow them.
    result.update(
        versions=meta.get("versions", {}),
        eval_versions=package_versions(),
        test_accuracy=float(accuracy.compute()),
        per_class_accuracy=dict(zip(class_names, per_class.compute().tolist(), strict=True)),
        confusion_matrix=confusion.compute().tolist(),
        class_names=class_names,
        num_test=len(images),
        params=params,
        nonzeros=nonzeros,
        sparsity=1.0 - nonzeros / params,
        macs=macs,
        size_bytes=os.path.getsize(model_path),
        quant=meta.get("quant", "fp32"),
        prune_method=meta.get("prune_method", "none"),
        prune_ratio=meta.get("prune_ratio", 0.0),
        artifact_format=record.get("format", "dense"),
        **{f"latency_b{b}_ms": ms for b, ms in latencies.items()},
        **{f"latency_eager_b{b}_ms": ms for b, ms in eager.items()},
        **{f"latency_compiled_b{b}_ms": ms for b, ms in compiled.items()},
        compiled=compile,
        cpp_wrapper=compile and cpp_wrapper,
        compile_seconds=compile_seconds,
        **{f"latency_aot_b{b}_ms": ms for b, ms in aot_latencies.items()},
        aot=aot,
        aot_compile_seconds=aot_compile_seconds,
        **{f"throughput_b{largest}_per_s": largest / (latencies[largest] / 1000.0)},
        latency_threads=threads,
        cpu=cpu_info(),
        device="cpu",
    )
    return result


def check_compatible(
    model_path: Path,
    spec: dict[str, Any],
    data_dir: Path,
    stats: dict[str, Any],
    images_shape: Sequence[int],
) -> None:
    """Raise InputError (a ValueError) when the data cannot be fed to the model or its labels
    don't fit it."""
    if int(stats["num_classes"]) != spec["num_classes"]:
        raise InputError(
            f"{model_path} outputs {spec['num_classes']} classes but {data_dir / 'stats.json'} "
            f"has num_classes={stats['num_classes']}"
        )
    side, channels = spec["input_size"], spec["in_channels"]
    if tuple(images_shape[1:]) != (side, side, channels):
        raise InputError(
            f"{model_path} expects images of shape (H, W, C)={(side, side, channels)} but "
            f"{data_dir / 'test_images.npy'} holds {tuple(images_shape[1:])}"
        )


def median_forward_ms(model: nn.Module, x: torch.Tensor, *, warmup: int, repeats: int) -> float:
    """Median wall time in ms of ``model(x)`` over ``repeats`` calls after ``warmup`` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def measure_latency(
    model: nn.Module,
    image_shape: Sequence[int],
    batch_sizes: Sequence[int],
    threads: int,
    warmup: int,
    repeats: int,
) -> dict[int, float]:
    """Median forward time in ms per batch size, on random channels_last input."""
    height, width, channels = image_shape
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG untouched
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        latencies = {}
        for batch in batch_sizes:
            x = torch.rand(batch, channels, height, width, generator=generator)
            x = x.contiguous(memory_format=torch.channels_last)
            latencies[batch] = median_forward_ms(model, x, warmup=warmup, repeats=repeats)
        return latencies
    finally:
        torch.set_num_threads(previous_threads)


def evaluate_to_json(
    model_path: Path, data_dir: Path, out_json: Path, **kwargs: Any
) -> dict[str, Any]:
    """Run :func:`evaluate_model` and write its result atomically to ``out_json``."""
    result = evaluate_model(model_path, data_dir, **kwargs)
    write_json(out_json, result)
    return result
