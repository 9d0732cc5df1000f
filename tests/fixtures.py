"""Small datasets written in the real on-disk formats (IDX, CIFAR-10 python/binary, npz).

Every ``write_*`` function takes a directory, creates it, writes the files and returns it.
The arrays written come from ``idx_arrays()`` / ``cifar_arrays()``, so tests can compare the
loaded data with exactly what was written.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np

from aihpc.data import CIFAR10_CLASSES, RawDataset, Split, preprocess

CIFAR_BATCHES = 5
CIFAR_PER_BATCH = 20  # training images per data_batch_i
CIFAR_TEST = 20
IDX_TRAIN = 60
IDX_TEST = 20


def write_fixture_plan(path: Path, jobs: dict[str, tuple[str, int, int, float]]) -> None:
    """A PLAN.json of jobs name -> (gpu_type, nodes, gpus, seconds), all starting at 0."""
    rows = [
        {"name": name, "gpu_type": t, "nodes": n, "gpus": g, "start_s": 0.0, "end_s": s}
        for name, (t, n, g, s) in jobs.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"status": "optimal", "jobs": rows}))


def shared_data_dir() -> Path | None:
    """``../shared/data`` relative to the project root, or None where it is absent."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return path if path.is_dir() else None


@functools.cache
def _cifar_source() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n_train = CIFAR_BATCHES * CIFAR_PER_BATCH
    shared = shared_data_dir()
    subset = shared / "cifar10" / "cifar10-exact-subset.npz" if shared else None
    if subset is not None and subset.is_file():
        with np.load(subset, allow_pickle=False) as npz:
            return (
                npz["train_images"][:n_train],
                npz["train_labels"][:n_train].astype(np.int64),
                npz["test_images"][:CIFAR_TEST],
                npz["test_labels"][:CIFAR_TEST].astype(np.int64),
            )
    rng = np.random.default_rng(10)
    return (
        rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        rng.permutation(np.arange(n_train) % 10).astype(np.int64),
        rng.integers(0, 256, (CIFAR_TEST, 32, 32, 3), dtype=np.uint8),
        rng.permutation(np.arange(CIFAR_TEST) % 10).astype(np.int64),
    )


def cifar_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images (100, 32, 32, 3) uint8, labels (100,) int64, test images/labels (20 each).

    Real CIFAR-10 pixels from the shared exact subset when present, else synthetic.
    """
    return tuple(a.copy() for a in _cifar_source())


def idx_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images (60, 28, 28) uint8, labels (60,) uint8, test images/labels (20 each)."""
    rng = np.random.default_rng(28)
    return (
        rng.integers(0, 256, (IDX_TRAIN, 28, 28), dtype=np.uint8),
        (np.arange(IDX_TRAIN) % 10).astype(np.uint8),
        rng.integers(0, 256, (IDX_TEST, 28, 28), dtype=np.uint8),
        (np.arange(IDX_TEST) % 10).astype(np.uint8),
    )


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: 0x0000 0x08 ndim, big-endian uint32 dims, then the payload."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(directory: Path, *, gz: bool = False) -> Path:
    """The four MNIST-layout IDX files (``.gz`` when ``gz``) holding ``idx_arrays()``."""
    directory.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = idx_arrays()
    files = {
        "train-images-idx3-ubyte": train_x,
        "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": test_x,
        "t10k-labels-idx1-ubyte": test_y,
    }
    for name, array in files.items():
        data = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return directory


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """NHWC images as CIFAR-10 rows: (N, 3072), channel-major then row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _cifar_batches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    train_x, train_y, test_x, test_y = cifar_arrays()
    batches = {}
    for i in range(CIFAR_BATCHES):
        part = slice(i * CIFAR_PER_BATCH, (i + 1) * CIFAR_PER_BATCH)
        batches[f"data_batch_{i + 1}"] = (train_x[part], train_y[part])
    batches["test_batch"] = (test_x, test_y)
    return batches


def write_cifar_python(directory: Path, *, subdir: bool = True) -> Path:
    """CIFAR-10 python batches (protocol-2 pickles of dicts with bytes keys, like the originals)
    in ``directory/cifar-10-batches-py`` (or ``directory`` itself when not ``subdir``)."""
    base = directory / "cifar-10-batches-py" if subdir else directory
    base.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in _cifar_batches().items():
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in labels],
            b"data": cifar_rows(images),
            b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(len(labels))],
        }
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {
        b"num_cases_per_batch": CIFAR_PER_BATCH,
        b"label_names": [n.encode() for n in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }
    (base / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return directory


def write_cifar_binary(directory: Path, *, subdir: bool = True) -> Path:
    """CIFAR-10 binary batches (records of 1 label byte + 3072 pixel bytes) in
    ``directory/cifar-10-batches-bin`` (or ``directory`` itself when not ``subdir``)."""
    base = directory / "cifar-10-batches-bin" if subdir else directory
    base.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in _cifar_batches().items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], cifar_rows(images)], axis=1)
        (base / f"{name}.bin").write_bytes(records.tobytes())
    # The original ends with blank lines; the loader must ignore them.
    (base / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")
    return directory


def write_npz(directory: Path, *, combined: bool = False) -> Path:
    """``cifar_arrays()`` as ``train.npz`` + ``test.npz`` (arrays images, labels), or with
    ``combined`` as one ``both.npz`` holding train_images, train_labels, test_images,
    test_labels. Labels are stored uint8 like the shared CIFAR-10 npz files."""
    directory.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = cifar_arrays()
    if combined:
        np.savez(
            directory / "both.npz",
            train_images=train_x,
            train_labels=train_y.astype(np.uint8),
            test_images=test_x,
            test_labels=test_y.astype(np.uint8),
        )
    else:
        np.savez(directory / "train.npz", images=train_x, labels=train_y.astype(np.uint8))
        np.savez(directory / "test.npz", images=test_x, labels=test_y.astype(np.uint8))
    return directory


def raw_cifar() -> RawDataset:
    """``cifar_arrays()`` as an in-memory RawDataset (no files)."""
    train_x, train_y, test_x, test_y = cifar_arrays()
    digest = hashlib.sha256(train_x.tobytes() + test_x.tobytes()).hexdigest()
    return RawDataset(
        name="cifar10",
        train=Split(train_x, train_y),
        test=Split(test_x, test_y),
        class_names=list(CIFAR10_CLASSES),
        sources={"fixture.npz": digest},
    )


def write_preprocessed(directory: Path, *, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """A preprocessed data directory (the output of ``preprocess``) built from ``raw_cifar()``."""
    preprocess(raw_cifar(), directory, val_fraction=val_fraction, seed=seed)
    return directory


def deep_update(base: dict, changes: dict) -> dict:
    """Merge ``changes`` into the nested config dict ``base`` in place; returns ``base``."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base
