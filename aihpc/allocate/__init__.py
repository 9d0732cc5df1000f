"""GPU allocation for batches of training jobs: throughput model, integer program, simulator.

The pieces, in the order a workflow uses them:

- :mod:`aihpc.allocate.model` fits Pollux's data-parallel step-time model per (model, GPU
  type) to measured step times and writes predicted throughputs (THR.csv);
- :mod:`aihpc.allocate.ilp` chooses one configuration (GPU type, nodes, GPUs) per job with an
  integer program (PuLP: CBC or HiGHS) and schedules it (PLAN.json);
- :mod:`aihpc.allocate.simulate` executes a plan on the cluster's nodes (list scheduling) and
  runs the baseline policies the benchmarks compare against.

This module holds what they share: the cluster description and the candidate configurations.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from aihpc.errors import InputError

#: Largest number of GPUs one job may use (Sia caps configurations the same way).
MAX_GPUS_PER_JOB = 64
#: The GPU type of CPU workers (profiles taken without a GPU): its "GPUs" are Dask workers.
CPU_TYPE = "cpu"


class AllocationError(InputError):
    """Bad allocator input: names the file, field or job and what was expected."""


def read_csv(
    path: str | os.PathLike[str], what: str, required: Sequence[str]
) -> list[dict[str, str]]:
    """Rows of a CSV input (``what`` names it in errors) that has the ``required`` columns."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            rows = list(reader)
    except OSError as exc:
        raise AllocationError(f"{path}: cannot read the {what}: {exc}") from exc
    missing = [c for c in required if c not in fields]
    if missing:
        raise AllocationError(
            f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(required)}"
        )
    return rows


class InfeasibleError(AllocationError):
    """No plan satisfies the constraints; the message names the jobs and constraints at fault."""


@dataclass(frozen=True)
class GpuType:
    """One homogeneous pool of the cluster: ``nodes`` nodes with ``gpus_per_node`` GPUs each."""

    name: str
    nodes: int
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Config:
    """A job's resources: ``gpus`` GPUs of one type on ``nodes`` nodes."""

    gpu_type: str
    nodes: int
    gpus: int


@dataclass(frozen=True)
class Cluster:
    gpu_types: dict[str, GpuType]

    @property
    def gpus(self) -> int:
        return sum(t.gpus for t in self.gpu_types.values())


def read_cluster(path: str | os.PathLike[str]) -> Cluster:
    """Read ``gpu_types: {NAME: {nodes: N, gpus_per_node: G}, ...}`` from a YAML file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise AllocationError(f"{path}: cannot read the cluster YAML: {exc}") from exc
    types = data.get("gpu_types") if isinstance(data, dict) else None
    if not isinstance(types, dict) or not types:
        raise AllocationError(
            f"{path}: expected a mapping 'gpu_types: {{NAME: {{nodes: N, gpus_per_node: G}}}}'"
        )
    pools = {}
    for name, spec in types.items():
        if not isinstance(spec, dict):
            raise AllocationError(f"{path}: gpu_types.{name}: expected {{nodes, gpus_per_node}}")
        values = {}
        for field in ("nodes", "gpus_per_node"):
            value = spec.get(field)
            # bool is an int subclass: 'nodes: yes' is a typo, not one node
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AllocationError(
                    f"{path}: gpu_types.{name}.{field}: expected a positive integer, got {value!r}"
                )
            values[field] = value
        pools[str(name)] = GpuType(str(name), values["nodes"], values["gpus_per_node"])
    return Cluster(pools)


def candidate_configs(pool: GpuType, max_gpus: int = MAX_GPUS_PER_JOB) -> list[Config]:
    """Sia's configurations on one pool: 1, 2, 4, ... GPUs within a node, whole nodes beyond.

    The node's full GPU count is a candidate even when it is not a power of two; multi-node
    configurations take whole nodes so that jobs never share a node's network link.
    """
    g = pool.gpus_per_node
    counts = []
    k = 1
    while k < g:
        counts.append(k)
        k *= 2
    counts.append(g)
    configs = [Config(pool.name, 1, k) for k in counts if k <= max_gpus]
    configs += [Config(pool.name, n, n * g) for n in range(2, pool.nodes + 1) if n * g <= max_gpus]
    return configs
