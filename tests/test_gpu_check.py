"""bench/gpu_check.sh, as far as a machine without a GPU can check it: the wheels it carries
agree with the lock, the script parses, and its dry mode (the same Python on the CPU, the
cluster 'local' instead of 'cuda') passes."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(lines: list[str]) -> dict[str, str]:
    """{normalised name: version} of the ``name==version`` lines."""
    found = {}
    for line in lines:
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if match:
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


def test_gpu_wheels_are_the_locked_versions():
    wheels = pins((ROOT / "bench" / "gpu_wheels.txt").read_text().splitlines())
    locked = pins((ROOT / "requirements.lock").read_text().splitlines())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked |= pins(project["optional-dependencies"]["gpu"])
    assert {"dask", "distributed", "dask-cuda"} <= wheels.keys()
    assert "torch" not in wheels  # the GPU image's CUDA build must stay
    mismatched = {name: (v, locked[name]) for name, v in wheels.items() if locked.get(name, v) != v}
    assert not mismatched, f"bench/gpu_wheels.txt vs requirements.lock/pyproject: {mismatched}"


def test_gpu_check_dry_run_passes_on_cpu(tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "WHEELS": str(tmp_path / "no-wheels"),  # everything is installed here
        "SITE": str(tmp_path / "site"),
    }
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry", "--rounds", "1", "--out", str(tmp_path / "f.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "throughput 1 GPU dask-local / plain Lightning" in result.stdout
    assert "gpu check passed (dry run on CPU)" in result.stdout
    assert (tmp_path / "f.json").exists()
