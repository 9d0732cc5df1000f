"""The per-rule conda envs pin the same versions as pyproject.toml."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^;\s]+)$")


def pins(requirements: list[str]) -> dict[str, str]:
    found = {}
    for line in requirements:
        match = PIN.match(line.strip())
        assert match, f"not an exact pin: {line!r}"
        found[match[1].lower().replace("_", "-")] = match[2]
    return found


PROJECT = pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
ENVS = sorted((ROOT / "envs").glob("*.yaml"))


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_pins_agree_with_pyproject(env):
    spec = yaml.safe_load(env.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    for name, version in pins(pip).items():
        assert PROJECT.get(name) == version, (
            f"{env.name}: {name}=={version}, pyproject: {PROJECT.get(name)}"
        )
    assert "python=3.11" in spec["dependencies"]


def test_every_rule_env_exists():
    used = set()
    for rules in (ROOT / "workflow" / "rules").glob("*.smk"):
        used |= set(re.findall(r'"\.\./\.\./envs/([\w.-]+\.yaml)"', rules.read_text()))
    assert used == {p.name for p in ENVS}


def test_lock_agrees_with_pyproject():
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[name.lower().replace("_", "-")] = version
    for name, version in PROJECT.items():
        assert lock.get(name) == version, (
            f"requirements.lock: {name}=={lock.get(name)}, pyproject: {version}"
        )
