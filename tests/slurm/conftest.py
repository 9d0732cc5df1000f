"""The one-node Slurm test cluster (start.sh / stop.sh here) as a pytest session fixture.

Tests that use ``slurm_cluster`` run the workflow through real sbatch/squeue. Where the
cluster cannot start (not root, no apt-get, a real Slurm configuration present, ...) they
fail in CI (``CI=true``) and skip with start.sh's reason elsewhere. At the end of the
session stop.sh stops the cluster, unless another test session (or a manual start.sh)
still uses it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
START_TIMEOUT_S = 900  # a first start installs the Debian packages


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    # This session's registration with the cluster (see start.sh).
    env = os.environ | {"AIHPC_SLURM_USER": str(os.getpid())}
    try:
        proc = subprocess.run(
            [str(HERE / "start.sh")],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            env=env,
        )
        reason = None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = f"{HERE / 'start.sh'}: {exc}"
    if reason is not None:
        message = f"the Slurm test cluster did not start:\n{reason}"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        yield
    finally:
        subprocess.run([str(HERE / "stop.sh")], check=True, timeout=120, env=env)
