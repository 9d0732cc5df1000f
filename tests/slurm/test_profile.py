"""profiles/slurm on a machine without Slurm: a dry run works and shows the resources the
environment variables select. No cluster needed (Slurm's commands are hidden from PATH)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ROOT / "tests" / "data" / "fashion-mnist-tiny"


def without_slurm(tmp_path: Path, **variables: str) -> dict[str, str]:
    """An environment whose PATH has the venv and a few basics, but no Slurm command."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("which", "bash", "sh"):  # the plugin probes for sacct/sinfo with `which`
        if found := shutil.which(tool):
            (tools / tool).symlink_to(found)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIHPC_SLURM_", "SLURM_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{tools}"
    assert shutil.which("sbatch", path=env["PATH"]) is None
    return env | variables


def dry_run(workdir: Path, env: dict[str, str]) -> dict[str, list[str]]:
    """`snakemake --profile profiles/slurm -n` in ``workdir``; each rule's resources lines."""
    config = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    config |= {"results": "results", "data": {**config["data"], "root": str(TINY)}}
    config["models"]["resnet_s"]["gpus"] = 2
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile")]
    cmd += ["--profile", str(ROOT / "profiles/slurm"), "-n", "--configfile", "config.yaml"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resources: dict[str, list[str]] = {}
    for rule, line in re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$",
                                 proc.stdout, re.MULTILINE):  # fmt: skip
        resources.setdefault(rule, []).append(line)
    return resources


def test_dry_run_without_slurm_uses_the_environment(tmp_path: Path) -> None:
    env = without_slurm(
        tmp_path,
        AIHPC_SLURM_PARTITION="cpu",
        AIHPC_SLURM_GPU_PARTITION="gpu",
        AIHPC_SLURM_ACCOUNT="proj42",
        AIHPC_SLURM_GPU_MODEL="a100",
    )
    resources = dry_run(tmp_path, env)
    (preprocess,) = resources["preprocess"]
    for expected in ("slurm_partition=cpu", "slurm_account=proj42", "runtime=30"):
        assert expected in preprocess.split(", "), preprocess
    assert "gpu_model" not in preprocess
    gpus = []
    for train in resources["train"]:
        fields = train.split(", ")
        assert {"slurm_partition=gpu", "gpu_model=a100", "runtime=240", "mem_mb=8000"} <= set(
            fields
        ), train
        gpus += [f for f in fields if f.startswith("gpu=")]
    assert sorted(gpus) == ["gpu=0", "gpu=2"]  # seed_cnn, resnet_s (models.<name>.gpus)


def test_dry_run_without_slurm_or_settings(tmp_path: Path) -> None:
    resources = dry_run(tmp_path, without_slurm(tmp_path))
    for lines in resources.values():
        for line in lines:
            for unset in ("slurm_partition", "slurm_account", "gpu_model"):
                assert unset not in line, line
