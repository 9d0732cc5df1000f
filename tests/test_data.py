"""aihpc.data: loaders round-trip the real formats, bad input gives one clear DataError,
preprocessing is deterministic, stratified and atomic."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import warnings
from pathlib import Path

import fixtures
import numpy as np
import pytest
from fixtures import (
    CIFAR_PER_BATCH,
    cifar_arrays,
    cifar_rows,
    idx_arrays,
    raw_cifar,
    shared_data_dir,
    write_cifar_binary,
    write_cifar_python,
    write_idx,
    write_npz,
)

from aihpc import data
from aihpc.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    FORMATS,
    DataError,
    RawDataset,
    Split,
    load_dataset,
    load_split,
    preprocess,
    read_stats,
    source_files,
    sources_sha256,
)

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_sources(raw: RawDataset, root: Path, expected: list[Path]) -> None:
    assert raw.sources == {p.relative_to(root).as_posix(): sha256(p) for p in expected}


# --- loaders round-trip ---------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    root = write_idx(tmp_path, gz=gz)
    raw = load_dataset("mnist", "idx", root)
    train_x, train_y, test_x, test_y = idx_arrays()

    assert raw.train.images.shape == (len(train_x), 28, 28, 1)
    assert raw.train.images.dtype == np.uint8 and raw.train.labels.dtype == np.int64
    np.testing.assert_array_equal(raw.train.images[..., 0], train_x)
    np.testing.assert_array_equal(raw.test.images[..., 0], test_x)
    np.testing.assert_array_equal(raw.train.labels, train_y)
    np.testing.assert_array_equal(raw.test.labels, test_y)
    assert raw.train.images[3, 5, 7, 0] == train_x[3, 5, 7]  # (row 5, col 7), not transposed
    assert raw.class_names == [str(i) for i in range(10)]
    assert_sources(raw, root, source_files("idx", root))
    assert all(p.name.endswith(".gz") == gz for p in source_files("idx", root))


def test_idx_prefers_uncompressed_file(tmp_path: Path) -> None:
    write_idx(tmp_path, gz=True)
    write_idx(tmp_path, gz=False)
    raw = load_dataset("mnist", "idx", tmp_path)
    assert not any(name.endswith(".gz") for name in raw.sources)


@pytest.mark.parametrize("subdir", [True, False])
def test_cifar_python_round_trip(tmp_path: Path, subdir: bool) -> None:
    root = write_cifar_python(tmp_path, subdir=subdir)
    raw = load_dataset("cifar10", "cifar10-python", root)
    train_x, train_y, test_x, test_y = cifar_arrays()

    np.testing.assert_array_equal(raw.train.images, train_x)
    np.testing.assert_array_equal(raw.train.labels, train_y)
    np.testing.assert_array_equal(raw.test.images, test_x)
    np.testing.assert_array_equal(raw.test.labels, test_y)
    assert raw.class_names == CIFAR10_CLASSES
    assert raw.train.labels.dtype == np.int64

    # One pixel straight from the pickled row: channel-major, then row-major.
    base = root / "cifar-10-batches-py" if subdir else root
    batch = pickle.loads((base / "data_batch_2").read_bytes(), encoding="bytes")
    i, row, col, channel = 4, 7, 21, 2
    pixel = batch[b"data"][i, channel * 1024 + row * 32 + col]
    assert raw.train.images[CIFAR_PER_BATCH + i, row, col, channel] == pixel
    assert_sources(raw, root, source_files("cifar10-python", root))


@pytest.mark.parametrize("subdir", [True, False])
def test_cifar_binary_round_trip(tmp_path: Path, subdir: bool) -> None:
    root = write_cifar_binary(tmp_path, subdir=subdir)
    raw = load_dataset("cifar10", "cifar10-binary", root)
    train_x, train_y, test_x, test_y = cifar_arrays()

    np.testing.assert_array_equal(raw.train.images, train_x)
    np.testing.assert_array_equal(raw.train.labels, train_y)
    np.testing.assert_array_equal(raw.test.images, test_x)
    np.testing.assert_array_equal(raw.test.labels, test_y)
    assert raw.class_names == CIFAR10_CLASSES

    base = root / "cifar-10-batches-bin" if subdir else root
    record = (base / "test_batch.bin").read_bytes()[3 * 3073 : 4 * 3073]
    row, col, channel = 30, 1, 0
    assert raw.test.labels[3] == record[0]
    assert raw.test.images[3, row, col, channel] == record[1 + channel * 1024 + row * 32 + col]
    assert_sources(raw, root, source_files("cifar10-binary", root))


@pytest.mark.parametrize("combined", [False, True])
def test_npz_round_trip(tmp_path: Path, combined: bool) -> None:
    root = write_npz(tmp_path, combined=combined)
    train_file = "both.npz" if combined else None
    raw = load_dataset("cifar10", "npz", root, train_file=train_file)
    train_x, train_y, test_x, test_y = cifar_arrays()

    np.testing.assert_array_equal(raw.train.images, train_x)
    np.testing.assert_array_equal(raw.train.labels, train_y)
    np.testing.assert_array_equal(raw.test.images, test_x)
    np.testing.assert_array_equal(raw.test.labels, test_y)
    assert raw.train.labels.dtype == np.int64  # stored as uint8
    assert raw.class_names == CIFAR10_CLASSES
    files = source_files("npz", root, train_file)
    assert len(files) == (1 if combined else 2)
    assert_sources(raw, root, files)


def test_npz_grayscale_and_class_names(tmp_path: Path) -> None:
    images = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    labels = np.array([0, 1, 2, 1])
    np.savez(
        tmp_path / "a.npz", images=images, labels=labels, class_names=np.array(["x", "y", "z"])
    )
    np.savez(tmp_path / "b.npz", images=images[:2], labels=labels[:2])

    raw = load_dataset("toy", "npz", tmp_path, train_file="a.npz", test_file="b.npz")
    assert raw.train.images.shape == (4, 5, 6, 1)
    assert raw.train.images[2, 3, 4, 0] == images[2, 3, 4]
    assert raw.class_names == ["x", "y", "z"]  # the file's names win over the argument's

    raw = load_dataset("toy", "npz", tmp_path, train_file="b.npz", test_file="b.npz")
    assert raw.class_names == ["0", "1"]  # no names anywhere: "0".."K-1" from the labels
    raw = load_dataset(
        "toy", "npz", tmp_path, train_file="b.npz", test_file="b.npz", class_names=["p", "q"]
    )
    assert raw.class_names == ["p", "q"]


def test_class_names_argument_and_defaults(tmp_path: Path) -> None:
    root = write_idx(tmp_path)
    raw = load_dataset("fashion-mnist", "idx", root, verify_checksums=False)
    assert raw.class_names == FASHION_MNIST_CLASSES
    names = [f"c{i}" for i in range(10)]
    assert load_dataset("mnist", "idx", root, class_names=names).class_names == names


def test_shared_cifar10_exact_subset() -> None:
    shared = shared_data_dir()
    if shared is None or not (shared / "cifar10" / "cifar10-exact-subset.npz").is_file():
        pytest.skip("shared data ../shared/data/cifar10/cifar10-exact-subset.npz is absent")
    root = shared / "cifar10"
    raw = load_dataset("cifar10", "npz", root, train_file="cifar10-exact-subset.npz")
    assert raw.train.images.shape == (4000, 32, 32, 3)
    assert raw.test.images.shape == (1000, 32, 32, 3)
    assert raw.class_names == CIFAR10_CLASSES
    # Official CIFAR-10 order: the first training images are a frog, two trucks, a deer.
    assert raw.train.labels[:4].tolist() == [6, 9, 9, 4]
    assert raw.test.labels[:3].tolist() == [3, 8, 8]
    assert raw.sources == {"cifar10-exact-subset.npz": sha256(root / "cifar10-exact-subset.npz")}


def test_real_fashion_mnist_with_checksums() -> None:
    if not all(p.is_file() for p in source_files("idx", FASHION_MNIST_ROOT)):
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_ROOT} (dataset-fashion-mnist)")
    raw = load_dataset("fashion-mnist", "idx", FASHION_MNIST_ROOT, verify_checksums=True)
    assert raw.train.images.shape == (60000, 28, 28, 1)
    assert raw.test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(raw.train.labels).tolist() == [6000] * 10
    assert raw.class_names == FASHION_MNIST_CLASSES
    assert len(raw.sources) == 4


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_dataset_dir(tmp_path: Path, fmt: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere: dataset directory does not exist"):
        load_dataset("fashion-mnist", fmt, missing)


def test_missing_idx_file_names_it_and_the_package(tmp_path: Path) -> None:
    root = write_idx(tmp_path, gz=True)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        DataError, match=r"missing t10k-labels-idx1-ubyte; .*apt-get install dataset-fashion-mnist"
    ):
        load_dataset("fashion-mnist", "idx", root)


def test_missing_cifar_batch(tmp_path: Path) -> None:
    root = write_cifar_python(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_dataset("cifar10", "cifar10-python", root)


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown format 'png'.*idx, cifar10-python"):
        load_dataset("x", "png", tmp_path)


def test_truncated_idx_file(tmp_path: Path) -> None:
    root = write_idx(tmp_path)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    expected = 60 * 28 * 28
    with pytest.raises(DataError, match=f"{path}: IDX payload is {expected - 100} bytes, expected"):
        load_dataset("mnist", "idx", root)


def test_idx_file_with_trailing_bytes(tmp_path: Path) -> None:
    root = write_idx(tmp_path)
    path = root / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match=f"{path}: IDX payload is 21 bytes, expected 20"):
        load_dataset("mnist", "idx", root)


def test_truncated_gz_file(tmp_path: Path) -> None:
    root = write_idx(tmp_path, gz=True)
    path = root / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match=f"{path}: corrupt or truncated gzip"):
        load_dataset("mnist", "idx", root)


def test_gz_with_truncated_payload(tmp_path: Path) -> None:
    root = write_idx(tmp_path, gz=True)
    path = root / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:50]))
    with pytest.raises(DataError, match=f"{path}: IDX payload is 34 bytes"):
        load_dataset("mnist", "idx", root)


def test_wrong_idx_magic(tmp_path: Path) -> None:
    root = write_idx(tmp_path)
    path = root / "train-labels-idx1-ubyte"
    path.write_bytes(b"\0\0\x08\x03" + path.read_bytes()[4:])
    with pytest.raises(DataError, match=f"{path}: IDX magic number is 0x00000803, expected 0x0000"):
        load_dataset("mnist", "idx", root)


def test_idx_image_and_label_counts_differ(tmp_path: Path) -> None:
    root = write_idx(tmp_path)
    labels = root / "t10k-labels-idx1-ubyte"
    labels.write_bytes(b"\0\0\x08\x01" + (19).to_bytes(4, "big") + bytes(19))
    with pytest.raises(DataError, match=r"holds 20 images but .*holds 19 labels"):
        load_dataset("mnist", "idx", root)


def test_fashion_mnist_checksum_mismatch(tmp_path: Path) -> None:
    root = write_idx(tmp_path, gz=True)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", "idx", root, verify_checksums=True)
    message = str(info.value)
    path = root / "train-images-idx3-ubyte.gz"
    actual = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
    assert str(path) in message and actual in message
    assert data.FASHION_MNIST_SHA256["train-images-idx3-ubyte"] in message
    assert "data.verify_checksums: false" in message
    # A modified copy loads once the check is off.
    assert load_dataset("fashion-mnist", "idx", root, verify_checksums=False).train.labels.size


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    root = write_idx(tmp_path)
    path = root / "train-labels-idx1-ubyte"
    content = bytearray(path.read_bytes())
    content[8 + 13] = 10  # label 13 becomes 10 with 10 classes
    path.write_bytes(bytes(content))
    with pytest.raises(DataError, match=f"{path}: label 10 at index 13 is outside 0..9"):
        load_dataset("mnist", "idx", root)


def test_cifar_binary_label_out_of_range(tmp_path: Path) -> None:
    root = write_cifar_binary(tmp_path)
    path = root / "cifar-10-batches-bin" / "data_batch_4.bin"
    content = bytearray(path.read_bytes())
    content[2 * 3073] = 12
    path.write_bytes(bytes(content))
    with pytest.raises(DataError, match=f"{path}: label 12 at index 2 is outside 0..9"):
        load_dataset("cifar10", "cifar10-binary", root)


def test_cifar_binary_wrong_size(tmp_path: Path) -> None:
    root = write_cifar_binary(tmp_path)
    path = root / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match=f"{path}: size .* not a positive multiple of 3073"):
        load_dataset("cifar10", "cifar10-binary", root)


def _rewrite_batch(path: Path, **fields: object) -> None:
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch.update({k.encode(): v for k, v in fields.items()})
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar_python_wrong_shape(tmp_path: Path) -> None:
    root = write_cifar_python(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_1"
    _rewrite_batch(path, data=np.zeros((CIFAR_PER_BATCH, 3000), dtype=np.uint8))
    with pytest.raises(DataError, match=rf"{path}: field data must be a uint8 array of shape"):
        load_dataset("cifar10", "cifar10-python", root)


def test_cifar_python_label_count_and_range(tmp_path: Path) -> None:
    root = write_cifar_python(tmp_path)
    path = root / "cifar-10-batches-py" / "test_batch"
    _rewrite_batch(path, labels=[1, 2])
    with pytest.raises(DataError, match=f"{path}: 20 images but 2 labels"):
        load_dataset("cifar10", "cifar10-python", root)
    _rewrite_batch(path, labels=[3] * 5 + [-1] * 15)
    with pytest.raises(DataError, match=f"{path}: label -1 at index 5"):
        load_dataset("cifar10", "cifar10-python", root)


def test_cifar_python_missing_field(tmp_path: Path) -> None:
    root = write_cifar_python(tmp_path)
    path = root / "cifar-10-batches-py" / "batches.meta"
    path.write_bytes(pickle.dumps({b"num_vis": 3072}, protocol=2))
    with pytest.raises(DataError, match=f"{path}: missing field.* label_names"):
        load_dataset("cifar10", "cifar10-python", root)


class _SystemCall:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _Exec:
    """Unpickling this runs ``exec(code)``."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple:
        return (exec, (self.code,))


@pytest.mark.parametrize("payload", ["system", "exec"])
def test_cifar_pickle_with_foreign_global_is_refused_unexecuted(
    tmp_path: Path, payload: str
) -> None:
    root = write_cifar_python(tmp_path / "ds")
    marker = tmp_path / "pwned"
    evil = (
        _SystemCall(f"touch {marker}")
        if payload == "system"
        else _Exec(f"open({str(marker)!r}, 'w').close()")
    )
    path = root / "cifar-10-batches-py" / "data_batch_2"
    _rewrite_batch(path, data=evil)
    # The pickle really references the dangerous global (never unpickled unrestricted here).
    assert b"system" in path.read_bytes() or b"exec" in path.read_bytes()

    with pytest.raises(DataError, match=rf"{path}: refusing to unpickle global \w+\.{payload}"):
        load_dataset("cifar10", "cifar10-python", root)
    assert not marker.exists()


def test_corrupt_cifar_pickle(tmp_path: Path) -> None:
    root = write_cifar_python(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_5"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match=f"{path}: not a valid pickle"):
        load_dataset("cifar10", "cifar10-python", root)


def test_npz_object_array_refused(tmp_path: Path) -> None:
    root = write_npz(tmp_path)
    labels = np.array([object()] * 20, dtype=object)
    np.savez(root / "test.npz", images=cifar_arrays()[2], labels=labels)  # pickles labels
    with pytest.raises(DataError, match=rf"{root / 'test.npz'}: array 'labels' cannot be read"):
        load_dataset("cifar10", "npz", root)


def test_npz_missing_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "train.npz", x=np.zeros(3))
    with pytest.raises(
        DataError,
        match=r"train\.npz: missing array\(s\) train_images, train_labels; expected images",
    ):
        load_dataset("cifar10", "npz", tmp_path)


def test_npz_non_uint8_images(tmp_path: Path) -> None:
    root = write_npz(tmp_path)
    train_x, train_y, _, _ = cifar_arrays()
    np.savez(root / "train.npz", images=train_x.astype(np.float32), labels=train_y)
    with pytest.raises(DataError, match=r"train\.npz: images must be uint8 with 4 dims"):
        load_dataset("cifar10", "npz", root)


def test_npz_train_test_shapes_disagree(tmp_path: Path) -> None:
    root = write_npz(tmp_path)
    np.savez(root / "test.npz", images=np.zeros((2, 28, 28, 1), np.uint8), labels=[0, 1])
    with pytest.raises(DataError, match=r"test.npz: images have shape .* train and test"):
        load_dataset("cifar10", "npz", root)


def test_npz_label_out_of_range(tmp_path: Path) -> None:
    root = write_npz(tmp_path)
    train_x, train_y, _, _ = cifar_arrays()
    train_y[7] = 10
    np.savez(root / "train.npz", images=train_x, labels=train_y)
    with pytest.raises(DataError, match=r"train\.npz: label 10 at index 7 is outside 0\.\.9"):
        load_dataset("cifar10", "npz", root)


# --- preprocess -----------------------------------------------------------------------------


def _raw(labels: np.ndarray, n_test: int = 6) -> RawDataset:
    """A RawDataset with the given train labels and random 4x4 RGB images."""
    rng = np.random.default_rng(0)
    num_classes = int(labels.max()) + 1
    return RawDataset(
        name="toy",
        train=Split(rng.integers(0, 256, (len(labels), 4, 4, 3), np.uint8), labels),
        test=Split(
            rng.integers(0, 256, (n_test, 4, 4, 3), np.uint8),
            np.arange(n_test, dtype=np.int64) % num_classes,
        ),
        class_names=[str(i) for i in range(num_classes)],
        sources={"b.bin": "2" * 64, "a.bin": "1" * 64},
    )


UNEVEN = np.repeat(np.arange(4), [10, 7, 3, 25]).astype(np.int64)


def test_preprocess_writes_stratified_split(tmp_path: Path) -> None:
    raw = _raw(np.random.default_rng(1).permutation(UNEVEN))
    stats = preprocess(raw, tmp_path / "out", val_fraction=0.3, seed=5)

    expected_val = [round(0.3 * n) for n in (10, 7, 3, 25)]  # [3, 2, 1, 8]
    assert stats["class_counts"]["val"] == expected_val
    assert stats["class_counts"]["train"] == [
        n - v for n, v in zip((10, 7, 3, 25), expected_val, strict=True)
    ]
    assert stats["counts"] == {"train": 45 - 14, "val": 14, "test": 6}
    assert stats["split"] == {"val_fraction": 0.3, "seed": 5, "stratified": True}
    assert stats["image_shape"] == [4, 4, 3] and stats["num_classes"] == 4
    assert stats["data_sha256"] == sources_sha256(raw.sources)
    assert read_stats(tmp_path / "out") == stats

    train_x, train_y = load_split(tmp_path / "out", "train")
    val_x, val_y = load_split(tmp_path / "out", "val")
    assert isinstance(train_x, np.memmap) and train_y.dtype == np.int64
    # Train keeps the original order minus the val images; together they are the input.
    rows = {x.tobytes(): y for x, y in zip(raw.train.images, raw.train.labels, strict=True)}
    val_rows = {x.tobytes() for x in val_x}
    kept = [i for i, x in enumerate(raw.train.images) if x.tobytes() not in val_rows]
    np.testing.assert_array_equal(train_x, raw.train.images[kept])
    np.testing.assert_array_equal(train_y, raw.train.labels[kept])
    assert all(rows[x.tobytes()] == y for x, y in zip(val_x, val_y, strict=True))
    test_x, _ = load_split(tmp_path / "out", "test", mmap=False)
    np.testing.assert_array_equal(test_x, raw.test.images)
    assert train_x.flags.c_contiguous and not isinstance(test_x, np.memmap)


def test_preprocess_mean_std(tmp_path: Path) -> None:
    raw = raw_cifar()
    stats = preprocess(raw, tmp_path / "out", val_fraction=0.2, seed=0)
    train_x, _ = load_split(tmp_path / "out", "train", mmap=False)
    pixels = train_x.astype(np.float64) / 255.0
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=(0, 1, 2)), rtol=1e-12)
    assert stats["class_names"] == CIFAR10_CLASSES


def test_preprocess_is_deterministic(tmp_path: Path) -> None:
    raw = _raw(UNEVEN)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        preprocess(raw, tmp_path / name, val_fraction=0.25, seed=seed)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted([*data._NPY_FILES, "stats.json"])
    for file in files:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "val_images.npy").read_bytes() != (
        tmp_path / "c" / "val_images.npy"
    ).read_bytes()


def test_preprocess_without_validation(tmp_path: Path) -> None:
    raw = _raw(UNEVEN)
    stats = preprocess(raw, tmp_path / "out", val_fraction=0, seed=0)
    val_x, val_y = load_split(tmp_path / "out", "val")
    assert val_x.shape == (0, 4, 4, 3) and val_x.dtype == np.uint8
    assert val_y.shape == (0,) and val_y.dtype == np.int64
    assert stats["counts"]["val"] == 0 and stats["class_counts"]["val"] == [0, 0, 0, 0]
    np.testing.assert_array_equal(load_split(tmp_path / "out", "train")[1], UNEVEN)


@pytest.mark.parametrize("fraction", [1.0, -0.1, float("nan")])
def test_preprocess_rejects_val_fraction(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(DataError, match=r"data.val_fraction must be in \[0, 1\)"):
        preprocess(_raw(UNEVEN), tmp_path / "out", val_fraction=fraction, seed=0)
    assert not (tmp_path / "out").exists()


def test_preprocess_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = np.save
    calls = []

    def failing_save(path: Path, array: np.ndarray, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save(path, array, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        preprocess(_raw(UNEVEN), tmp_path / "out", val_fraction=0.2, seed=0)
    assert len(calls) == 3
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left either


def test_preprocess_replaces_previous_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    preprocess(_raw(UNEVEN), out, val_fraction=0.5, seed=0)
    preprocess(_raw(UNEVEN), out, val_fraction=0.1, seed=0)
    assert read_stats(out)["split"]["val_fraction"] == 0.1
    assert len(load_split(out, "val")[1]) == sum(round(0.1 * n) for n in (10, 7, 3, 25))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_stats_and_load_split_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'stats.json'}: not found"):
        read_stats(tmp_path)
    with pytest.raises(DataError, match=f"{tmp_path / 'train_images.npy'}: not found"):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match="split must be one of train, val, test"):
        load_split(tmp_path, "dev")


def test_prepare_from_config(tmp_path: Path) -> None:
    from aihpc.config import DataConfig

    root = write_cifar_binary(tmp_path / "raw")
    cfg = DataConfig(name="cifar10", format="cifar10-binary", root=str(root), val_fraction=0.1)
    stats = data.prepare(cfg, tmp_path / "data")
    assert stats["counts"] == {"train": 90, "val": 10, "test": 20}
    assert stats["sources"] == {
        p.relative_to(root).as_posix(): sha256(p) for p in source_files(cfg.format, root)
    }


def test_preprocessed_dir_fixture(preprocessed_dir: Path) -> None:
    stats = read_stats(preprocessed_dir)
    assert stats["counts"]["train"] + stats["counts"]["val"] == len(cifar_rows(cifar_arrays()[0]))


def _binstring(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_batch_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch dict as the official files hold it: pickled by Python 2 with numpy 1.x, so
    byte strings are BINSTRINGs and the array refers to numpy.core.multiarray."""
    dims = b"".join(
        b"K" + bytes([d]) if d < 256 else b"M" + struct.pack("<H", d) for d in data.shape
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + _binstring(b"b")
        + b"\x87R(K\x01"
        + dims
        + b"\x86cnumpy\ndtype\n"
        + _binstring(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + _binstring(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        + _binstring(data.tobytes())
        + b"tb"
    )
    items = b"".join(b"K" + bytes([v]) for v in labels)
    return (
        b"\x80\x02}(" + _binstring(b"data") + array + _binstring(b"labels") + b"](" + items + b"eu."
    )


def test_python2_numpy1_pickle(tmp_path: Path) -> None:
    root = write_cifar_python(tmp_path)
    path = root / "cifar-10-batches-py" / "test_batch"
    _, _, test_x, test_y = cifar_arrays()
    path.write_bytes(_py2_batch_pickle(cifar_rows(test_x), test_y.tolist()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy.core is deprecated: it must never be imported
        raw = load_dataset("cifar10", "cifar10-python", root)
    np.testing.assert_array_equal(raw.test.images, test_x)
    np.testing.assert_array_equal(raw.test.labels, test_y)


def test_fixtures_work_without_shared_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fixtures, "shared_data_dir", lambda: None)
    train_x, train_y, test_x, test_y = fixtures._cifar_source.__wrapped__()
    assert train_x.shape == (100, 32, 32, 3) and test_x.shape == (20, 32, 32, 3)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert set(train_y.tolist()) == set(range(10)) and test_y.max() < 10
