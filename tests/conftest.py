# --- data fixtures (aihpc.data; builders in tests/fixtures.py) ------------------------------
from pathlib import Path

import pytest
from fixtures import write_preprocessed


@pytest.fixture
def preprocessed_dir(tmp_path: Path) -> Path:
    """A small preprocessed CIFAR-10-like data directory (stats.json + train/val/test .npy)."""
    return write_preprocessed(tmp_path / "data")


# --- end data fixtures ----------------------------------------------------------------------
