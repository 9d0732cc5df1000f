"""Dataset loaders (IDX, CIFAR-10 python/binary, npz), checksums and preprocessing.

Every loader returns the same in-memory ``RawDataset`` (NHWC uint8 images, int64 labels);
``preprocess`` turns it into the ``.npy`` splits and ``stats.json`` that later stages read.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy._core.multiarray import _reconstruct

from aihpc.errors import InputError
from aihpc.files import file_sha256

if TYPE_CHECKING:
    from aihpc.config import DataConfig


class DataError(InputError):  # an InputError (a ValueError): stages report it as one line
    """One clear message naming the file or field and what was expected."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class RawDataset:
    name: str
    train: Split
    test: Split
    class_names: list[str]
    sources: dict[str, str]  # file name relative to root -> sha256 of its bytes on disk


FORMATS = ("idx", "cifar10-python", "cifar10-binary", "npz")
SPLITS = ("train", "val", "test")

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEFAULT_CLASS_NAMES = {
    "fashion-mnist": FASHION_MNIST_CLASSES,
    "mnist": [str(i) for i in range(10)],
    "cifar10": CIFAR10_CLASSES,
}

# sha256 of the DECOMPRESSED official Fashion-MNIST files: Debian's dataset-fashion-mnist
# recompresses the .gz archives, so their bytes differ from upstream while the payload does not.
# MNIST has no pinned digests (none are published for its payload), so it is never verified.
FASHION_MNIST_SHA256 = {
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
}

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte payload with 3 / 1 dimensions

CIFAR_PYTHON_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
CIFAR_BINARY_FILES = (
    *(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test_batch.bin",
    "batches.meta.txt",
)
_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR_RECORD = 1 + _CIFAR_PIXELS

# The only globals a CIFAR-10 pickle needs: numpy array/dtype reconstruction (module path of
# numpy 1.x and 2.x writers) and _codecs.encode, which protocol-2 pickles use to rebuild bytes.
# Both numpy paths map to the same function so numpy 2 never warns about numpy.core.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}

_STATS_FILE = "stats.json"
_NPY_FILES = tuple(f"{split}_{kind}.npy" for split in SPLITS for kind in ("images", "labels"))


@dataclass
class _Chunk:
    """Images and labels read from one source file, checked before splits are concatenated."""

    split: str
    source: Path
    images: np.ndarray
    labels: np.ndarray


def load_dataset(
    name: str,
    fmt: str,
    root: Path,
    *,
    verify_checksums: bool = True,
    train_file: str | None = None,
    test_file: str | None = None,
    class_names: list[str] | None = None,
) -> RawDataset:
    """Read a dataset stored in one of FORMATS under ``root``.

    Class names come from the files themselves when they carry them (CIFAR meta, npz
    ``class_names``), else from ``class_names``, else from the defaults for ``name``, else
    "0".."K-1". ``train_file``/``test_file`` only apply to npz.
    """
    root = Path(root)
    sources: dict[str, str] = {}
    if fmt == "idx":
        chunks, file_names = _load_idx(name, root, verify_checksums, sources), None
    elif fmt == "cifar10-python":
        chunks, file_names = _load_cifar_python(root, sources)
    elif fmt == "cifar10-binary":
        chunks, file_names = _load_cifar_binary(root, sources)
    elif fmt == "npz":
        chunks, file_names = _load_npz(root, train_file, test_file, sources)
    else:
        raise _unknown_format(fmt)

    if file_names is not None:
        names = file_names
    elif class_names is not None:
        names = list(class_names)
    elif name in DEFAULT_CLASS_NAMES:
        names = list(DEFAULT_CLASS_NAMES[name])
    else:
        integer = [c.labels for c in chunks if c.labels.size and c.labels.dtype.kind in "iu"]
        top = max((int(labels.max()) for labels in integer), default=-1)
        names = [str(i) for i in range(top + 1)]

    for chunk in chunks:
        _check_chunk(chunk, len(names))
    first = chunks[0]
    for chunk in chunks[1:]:
        if chunk.images.shape[1:] != first.images.shape[1:]:
            raise DataError(
                f"{chunk.source}: images have shape (H, W, C) = {chunk.images.shape[1:]} but "
                f"{first.source} has {first.images.shape[1:]}; train and test images must agree"
            )

    def split(which: str) -> Split:
        parts = [c for c in chunks if c.split == which]
        images = np.concatenate([c.images for c in parts])
        labels = np.concatenate([c.labels for c in parts]).astype(np.int64)
        return Split(images=images, labels=labels)

    return RawDataset(
        name=name, train=split("train"), test=split("test"), class_names=names, sources=sources
    )


def source_files(
    fmt: str, root: Path | str, train_file: str | None = None, test_file: str | None = None
) -> list[Path]:
    """The raw files ``load_dataset`` reads for ``fmt`` (existing or not), without reading them."""
    root = Path(root)
    if fmt == "idx":
        return [_idx_path(root, stem) for stems in IDX_FILES.values() for stem in stems]
    if fmt == "cifar10-python":
        base = _cifar_base(root, "cifar-10-batches-py", CIFAR_PYTHON_FILES)
        return [base / f for f in CIFAR_PYTHON_FILES]
    if fmt == "cifar10-binary":
        base = _cifar_base(root, "cifar-10-batches-bin", CIFAR_BINARY_FILES)
        return [base / f for f in CIFAR_BINARY_FILES]
    if fmt == "npz":
        train_path = root / (train_file or "train.npz")
        test_path = _npz_test_path(root, train_path, test_file, _npz_keys(train_path))
        return list(dict.fromkeys((train_path, test_path)))
    raise _unknown_format(fmt)


def _unknown_format(fmt: str) -> DataError:
    return DataError(f"data.format: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def prepare(cfg: DataConfig, out_dir: Path) -> dict:
    """Load the dataset ``cfg`` describes and preprocess it into ``out_dir``; returns the stats."""
    raw = load_dataset(
        cfg.name,
        cfg.format,
        Path(cfg.root),
        verify_checksums=cfg.verify_checksums,
        train_file=cfg.train_file,
        test_file=cfg.test_file,
        class_names=cfg.class_names,
    )
    return preprocess(raw, Path(out_dir), val_fraction=cfg.val_fraction, seed=cfg.seed)


def _check_chunk(chunk: _Chunk, num_classes: int) -> None:
    images, labels = chunk.images, chunk.labels
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(
            f"{chunk.source}: images must be uint8 with 4 dims (N, H, W, C), "
            f"got {images.dtype} with shape {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{chunk.source}: labels must be a 1-D integer array, "
            f"got {labels.dtype} with shape {labels.shape}"
        )
    if len(labels) != len(images):
        raise DataError(
            f"{chunk.source}: {len(images)} images but {len(labels)} labels; counts must match"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"{chunk.source}: label {labels[bad[0]]} at index {bad[0]} is outside "
            f"0..{num_classes - 1} (the dataset has {num_classes} classes)"
        )


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # an absolute npz path outside root
        return str(path)


def _read(path: Path, root: Path, sources: dict[str, str]) -> bytes:
    """Read a whole file and record the sha256 of its on-disk bytes in ``sources``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    sources[_rel(path, root)] = hashlib.sha256(raw).hexdigest()
    return raw


def _require_root(root: Path, expected: tuple[str, ...], hint: str = "") -> None:
    if not root.is_dir():
        raise DataError(
            f"{root}: dataset directory does not exist; expected {', '.join(expected)} there{hint}"
        )


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------


def _load_idx(name: str, root: Path, verify: bool, sources: dict[str, str]) -> list[_Chunk]:
    expected = tuple(stem for stems in IDX_FILES.values() for stem in stems)
    hint = " (each optionally .gz)"
    if name == "fashion-mnist":
        hint += (
            "; install them with `apt-get install dataset-fashion-mnist` "
            "(/usr/share/datasets/fashion-mnist) or set data.root to a directory holding them"
        )
    else:
        hint += "; set data.root to the directory holding them"
    _require_root(root, expected, hint)
    # Report every missing file at once, before reading (and hashing) the others.
    missing = [stem for stem in expected if not _idx_path(root, stem).is_file()]
    if missing:
        raise DataError(
            f"{root}: missing {', '.join(missing)}; expected {', '.join(expected)} there{hint}"
        )

    chunks = []
    for split, (image_stem, label_stem) in IDX_FILES.items():
        arrays = []
        paths = []
        for stem, ndim in ((image_stem, 3), (label_stem, 1)):
            path = _idx_path(root, stem)
            raw = _read(path, root, sources)
            payload = _gunzip(path, raw) if path.suffix == ".gz" else raw
            if verify and name == "fashion-mnist":
                _verify_sha256(path, payload, FASHION_MNIST_SHA256[stem])
            arrays.append(_parse_idx(path, payload, ndim))
            paths.append(path)
        images, labels = arrays
        if len(images) != len(labels):
            raise DataError(
                f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels;"
                " counts must match"
            )
        chunks.append(_Chunk(split, paths[1], images[..., np.newaxis], labels))
    return chunks


def _idx_path(root: Path, stem: str) -> Path:
    """``stem`` if it exists (same payload as the .gz, no inflate cost), else ``stem.gz``."""
    return root / stem if (root / stem).is_file() else root / f"{stem}.gz"


def _gunzip(path: Path, raw: bytes) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt or truncated gzip file ({exc})") from exc


def _verify_sha256(path: Path, payload: bytes, expected: str) -> None:
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise DataError(
            f"{path}: sha256 of the decompressed content is {actual}, expected {expected} "
            "(official Fashion-MNIST); set data.verify_checksums: false to use a modified copy"
        )


def _parse_idx(path: Path, data: bytes, ndim: int) -> np.ndarray:
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: truncated IDX header: expected at least {header} bytes, got {len(data)}"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(
            f"{path}: IDX magic number is 0x{magic:08x}, expected 0x{_IDX_MAGIC[ndim]:08x} "
            f"(unsigned bytes, {ndim} dims)"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    actual = len(data) - header
    if actual != expected:
        raise DataError(
            f"{path}: IDX payload is {actual} bytes, expected {expected} for dims {dims} "
            "(truncated or trailing data)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


# --- CIFAR-10 -------------------------------------------------------------------------------


def _cifar_base(root: Path, subdir: str, expected: tuple[str, ...]) -> Path:
    """``root/subdir`` as in the official archive, or ``root`` when it holds the files."""
    if not (root / subdir).is_dir() and any((root / f).is_file() for f in expected):
        return root
    return root / subdir


def _cifar_dir(root: Path, subdir: str, expected: tuple[str, ...]) -> Path:
    hint = f" (or in {root / subdir})"
    _require_root(root, expected, hint)
    base = _cifar_base(root, subdir, expected)
    missing = [f for f in expected if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"{base}: missing {', '.join(missing)}; expected the CIFAR-10 files "
            f"{', '.join(expected)} in {root}{hint}"
        )
    return base


def _cifar_images(data: np.ndarray) -> np.ndarray:
    # Rows are channel-major (1024 R, 1024 G, 1024 B, each row-major): CHW -> NHWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild plain containers and numpy arrays."""

    def __init__(self, file: io.BytesIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # Python-2 era pickles hold byte strings
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in _PICKLE_GLOBALS)
            raise DataError(
                f"{self.path}: refusing to unpickle global {module}.{name}; "
                f"CIFAR-10 pickles only need {allowed}"
            ) from None


def _unpickle(path: Path, raw: bytes, required: tuple[str, ...]) -> dict[str, Any]:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), path).load()
    except DataError:
        raise
    except Exception as exc:  # a corrupt pickle can fail in many ways; all mean "bad file"
        raise DataError(f"{path}: not a valid pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    fields = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in required if k not in fields]
    if missing:
        raise DataError(
            f"{path}: missing field(s) {', '.join(missing)}; found {sorted(map(str, fields))}"
        )
    return fields


def _load_cifar_python(root: Path, sources: dict[str, str]) -> tuple[list[_Chunk], list[str]]:
    base = _cifar_dir(root, "cifar-10-batches-py", CIFAR_PYTHON_FILES)
    meta_path = base / "batches.meta"
    meta = _unpickle(meta_path, _read(meta_path, root, sources), ("label_names",))
    names = meta["label_names"]
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise DataError(f"{meta_path}: field label_names must be a list of strings")
    class_names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]

    chunks = []
    for file in CIFAR_PYTHON_FILES[:-1]:
        path = base / file
        batch = _unpickle(path, _read(path, root, sources), ("data", "labels"))
        data = batch["data"]
        if not (
            isinstance(data, np.ndarray)
            and data.dtype == np.uint8
            and data.ndim == 2
            and data.shape[1] == _CIFAR_PIXELS
        ):
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
            raise DataError(
                f"{path}: field data must be a uint8 array of shape (N, {_CIFAR_PIXELS}), got {got}"
            )
        labels = batch["labels"]
        if isinstance(labels, list) and all(type(v) is int for v in labels):
            labels = np.array(labels, dtype=np.int64)
        if not isinstance(labels, np.ndarray):
            raise DataError(f"{path}: field labels must be a list of ints, got {type(labels)}")
        split = "test" if file == "test_batch" else "train"
        chunks.append(_Chunk(split, path, _cifar_images(data), labels))
    return chunks, class_names


def _load_cifar_binary(root: Path, sources: dict[str, str]) -> tuple[list[_Chunk], list[str]]:
    base = _cifar_dir(root, "cifar-10-batches-bin", CIFAR_BINARY_FILES)
    meta_path = base / "batches.meta.txt"
    try:
        text = _read(meta_path, root, sources).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{meta_path}: expected UTF-8 text, one class name per line") from exc
    class_names = [line.strip() for line in text.splitlines() if line.strip()]

    chunks = []
    for file in CIFAR_BINARY_FILES[:-1]:
        path = base / file
        raw = _read(path, root, sources)
        if not raw or len(raw) % _CIFAR_RECORD:
            raise DataError(
                f"{path}: size {len(raw)} bytes is not a positive multiple of {_CIFAR_RECORD} "
                f"(1 label byte + {_CIFAR_PIXELS} pixel bytes per record)"
            )
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
        split = "test" if file == "test_batch.bin" else "train"
        chunks.append(_Chunk(split, path, _cifar_images(records[:, 1:]), records[:, 0]))
    return chunks, class_names


# --- npz ------------------------------------------------------------------------------------


def _read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str] | None, set[str]]:
    """Images and labels (``images``/``labels``, else ``{split}_images``/``{split}_labels``),
    the optional ``class_names`` and the archive's keys."""
    if not path.is_file():
        raise DataError(
            f"{path}: file not found; expected an .npz with images + labels "
            f"(or {split}_images + {split}_labels); set data.train_file / data.test_file"
        )
    try:
        # allow_pickle=False always: an npz is data, never code.
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read as an .npz archive ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array; expected an .npz archive")
    with npz:
        keys = set(npz.files)
        prefix = "" if {"images", "labels"} <= keys else f"{split}_"
        wanted = [f"{prefix}images", f"{prefix}labels"]
        missing = [k for k in wanted if k not in keys]
        if missing:
            raise DataError(
                f"{path}: missing array(s) {', '.join(missing)}; expected images + labels "
                f"or {split}_images + {split}_labels, found {sorted(keys)}"
            )
        arrays = {}
        for key in [*wanted, "class_names"]:
            if key not in keys:
                continue
            try:
                arrays[key] = npz[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise DataError(
                    f"{path}: array {key!r} cannot be read without pickle ({exc}); "
                    "object arrays are refused, store plain numeric or string arrays"
                ) from exc

    images, labels = arrays[wanted[0]], arrays[wanted[1]]
    if images.ndim == 3:  # grayscale (N, H, W): add the channel axis
        images = images[..., np.newaxis]
    names = arrays.get("class_names")
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(
                f"{path}: class_names must be a 1-D string array, got {names.dtype} {names.shape}"
            )
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return images, labels, names, keys


def _load_npz(
    root: Path, train_file: str | None, test_file: str | None, sources: dict[str, str]
) -> tuple[list[_Chunk], list[str] | None]:
    _require_root(root, (train_file or "train.npz", test_file or "test.npz"))
    train_path = root / (train_file or "train.npz")
    train_images, train_labels, train_names, keys = _read_npz(train_path, "train")
    test_path = _npz_test_path(root, train_path, test_file, keys)
    test_images, test_labels, test_names, _ = _read_npz(test_path, "test")
    for path in dict.fromkeys((train_path, test_path)):  # hash a shared archive once
        sources[_rel(path, root)] = file_sha256(path)
    chunks = [
        _Chunk("train", train_path, train_images, train_labels),
        _Chunk("test", test_path, test_images, test_labels),
    ]
    return chunks, train_names or test_names


def _npz_test_path(root: Path, train_path: Path, test_file: str | None, keys: set[str]) -> Path:
    if test_file is not None:
        return root / test_file
    if "test_images" in keys:
        return train_path  # one archive holding both splits
    return root / "test.npz"


def _npz_keys(path: Path) -> set[str]:
    """Array names in an npz archive; empty when it is missing or unreadable."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return set()
    if not isinstance(npz, np.lib.npyio.NpzFile):
        return set()
    with npz:
        return set(npz.files)


# --- preprocessing --------------------------------------------------------------------------


def preprocess(raw: RawDataset, out_dir: Path, *, val_fraction: float, seed: int) -> dict:
    """Split off a stratified validation set, write the splits and stats.json atomically.

    Returns the stats written to ``out_dir / "stats.json"``.
    """
    if not isinstance(val_fraction, int | float) or not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    out_dir = Path(out_dir)
    num_classes = len(raw.class_names)
    train_idx, val_idx = _stratified_split(raw.train.labels, num_classes, val_fraction, seed)
    if train_idx.size == 0:
        raise DataError(
            f"data.val_fraction={val_fraction} leaves no training images "
            f"({len(raw.train.labels)} in total)"
        )
    splits = {
        "train": (raw.train.images[train_idx], raw.train.labels[train_idx]),
        "val": (raw.train.images[val_idx], raw.train.labels[val_idx]),
        "test": (np.ascontiguousarray(raw.test.images), raw.test.labels),
    }
    mean, std = _channel_mean_std(splits["train"][0])
    stats = {
        "dataset": raw.name,
        "class_names": list(raw.class_names),
        "num_classes": num_classes,
        "image_shape": list(raw.train.images.shape[1:]),
        "mean": mean,
        "std": std,
        "counts": {s: len(labels) for s, (_, labels) in splits.items()},
        "class_counts": {
            s: np.bincount(labels, minlength=num_classes).tolist()
            for s, (_, labels) in splits.items()
        },
        "split": {"val_fraction": float(val_fraction), "seed": int(seed), "stratified": True},
        "sources": dict(sorted(raw.sources.items())),
        "data_sha256": sources_sha256(raw.sources),
    }

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of an earlier crashed run with this pid
    try:
        tmp.mkdir(parents=True)
        for split, (images, labels) in splits.items():
            np.save(tmp / f"{split}_images.npy", images, allow_pickle=False)
            labels = np.asarray(labels, dtype=np.int64)
            np.save(tmp / f"{split}_labels.npy", labels, allow_pickle=False)
        (tmp / _STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        # stats.json moves last and any old one goes first, so its presence means "complete".
        (out_dir / _STATS_FILE).unlink(missing_ok=True)
        for file in (*_NPY_FILES, _STATS_FILE):
            os.replace(tmp / file, out_dir / file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def sources_sha256(sources: dict[str, str]) -> str:
    """sha256 of a sha256sum-style manifest ("<digest>  <file>\\n", sorted by file name)."""
    manifest = "".join(f"{digest}  {file}\n" for file, digest in sorted(sources.items()))
    return hashlib.sha256(manifest.encode()).hexdigest()


def _stratified_split(
    labels: np.ndarray, num_classes: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and val indices, both in original order; each class gives round(f * n) to val."""
    rng = np.random.default_rng(seed)
    picked = [np.empty(0, dtype=np.int64)]
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        picked.append(rng.choice(members, size=round(val_fraction * len(members)), replace=False))
    val_idx = np.sort(np.concatenate(picked))
    in_train = np.ones(len(labels), dtype=bool)
    in_train[val_idx] = False
    return np.flatnonzero(in_train), val_idx


def _channel_mean_std(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale, exact, in bounded memory.

    A 256-bin histogram per channel, accumulated over chunks of images, holds all the
    information needed; float64 moments are then computed from the histogram.
    """
    channels = images.shape[-1]
    hist = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk]
        for c in range(channels):
            hist[c] += np.bincount(block[..., c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    count = hist.sum(axis=1)
    mean = hist @ values / count
    var = (hist * (values[np.newaxis, :] - mean[:, np.newaxis]) ** 2).sum(axis=1) / count
    return mean.tolist(), np.sqrt(var).tolist()


def read_stats(data_dir: Path) -> dict:
    """The stats.json written by ``preprocess``."""
    path = Path(data_dir) / _STATS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path}: not found; run the preprocess step first") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as JSON ({exc})") from exc


def load_split(data_dir: Path, split: str, *, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, C) uint8 and labels (N,) int64 of a preprocessed split."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    arrays = []
    for kind in ("images", "labels"):
        path = Path(data_dir) / f"{split}_{kind}.npy"
        try:
            arrays.append(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False))
        except FileNotFoundError as exc:
            raise DataError(f"{path}: not found; run the preprocess step first") from exc
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read as .npy ({exc})") from exc
    images, labels = arrays
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(
            f"{Path(data_dir) / f'{split}_images.npy'}: expected uint8 (N, H, W, C), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.int64 or labels.shape != (len(images),):
        raise DataError(
            f"{Path(data_dir) / f'{split}_labels.npy'}: expected int64 ({len(images)},), "
            f"got {labels.dtype} {labels.shape}"
        )
    return images, labels
