"""Rebuild tests/data/fashion-mnist-tiny: the first 1200 training and 300 test images of the
real Fashion-MNIST (MIT licence), as official-format gzipped IDX files.

    .venv/bin/python tests/data/make_fashion_mnist_tiny.py [/usr/share/datasets/fashion-mnist]
"""

import gzip
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fixtures import idx_bytes

from aihpc.data import load_dataset

root = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
raw = load_dataset("fashion-mnist", "idx", root)
out = Path(__file__).resolve().parent / "fashion-mnist-tiny"
out.mkdir(exist_ok=True)
arrays = {
    "train-images-idx3-ubyte": raw.train.images[:1200, :, :, 0],
    "train-labels-idx1-ubyte": raw.train.labels[:1200].astype("uint8"),
    "t10k-images-idx3-ubyte": raw.test.images[:300, :, :, 0],
    "t10k-labels-idx1-ubyte": raw.test.labels[:300].astype("uint8"),
}
for name, array in arrays.items():
    # mtime=0: the same input gives byte-identical files.
    (out / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array), mtime=0))
