"""What a result was made with: config hash, package versions, CPU."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from typing import Any

PACKAGES = (
    "torch",
    "pytorch-lightning",
    "torchmetrics",
    "torchao",
    "torch-pruning",
    "numpy",
    "dask",
    "snakemake",
    "aihpc",
)


def config_hash(config: Any) -> str:
    """Short, stable digest of a JSON-serialisable config (key order does not matter)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_info() -> dict[str, Any]:
    """CPU model and the SIMD flags that decide conv/int8 kernel speed (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    return {"model": model, "flags": [f for f in wanted if f in flags]}
