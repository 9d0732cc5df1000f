"""Choosing GPU configurations for a batch of jobs with an integer program, and scheduling them.

Each job j gets exactly one configuration c (GPU type, nodes, GPUs) among Sia's candidates
that THR.csv gives a throughput for: binary x[j,c], sum_c x[j,c] = 1. Its predicted duration
D_j = sum_c (samples_j / throughput_j(c)) x[j,c] is linear in x, and so are its GPU-hours.
Configurations dominated within a GPU type (no fewer GPUs and no faster) are dropped first:
they are never better for any objective or constraint.

Two plan shapes (``schedule`` in PLAN.json):

- **one-wave** (tried first, whenever the jobs' smallest configurations fit side by side):
  all jobs start at 0, so per GPU type sum_j GPUs_j <= GPUs of the type, and configurations
  over half a node (or over several nodes) take their nodes whole: the sum of those nodes
  <= nodes of the type. With 1, 2, 4, ... GPUs per node the jobs then pack onto the nodes.
  Makespan: minimise M >= D_j, over a window of configurations (see ``_one_wave_window``).
- **list** (they do not all fit at once, or not within the constraints): jobs run in
  succession on the nodes, list-scheduled in a priority order
  (:func:`aihpc.allocate.simulate.plan_policy`: earliest deadline first, then longest first,
  or Smith's rule for the weighted sum); ``wave`` numbers a job's start time and
  ``priority`` its place in that order. Over a span S (the deadline, a job's own deadline,
  or a target makespan) the program enforces what every schedule ending by S satisfies:
  per type sum_j GPUs_j D_j <= GPUs * S; jobs longer than S/2 fit side by side (they all
  run at S/2); per GPU, jobs one after the other fit in S (bin-packing cuts); two jobs that
  cannot share a type's GPUs fit one after the other. If the schedule still misses a
  deadline, the program is solved again with GPU time capped at 95 %, 90 %, ... of the
  capacity (``capacity_factor``). Makespan: a search over target makespans
  (``_plan_makespan``), which also proves a lower bound (``makespan_lower_bound_s``), and
  a local search on the best plan's list schedule (``_improve``).

Objectives: ``makespan``, ``sum`` (sum_j weight_j D_j: weighted sum of the jobs' run times)
and ``gpu-hours`` (sum_j GPUs_j D_j); ``budget`` bounds the GPU-hours, ``deadline`` the end
of every job. Infeasible inputs raise :class:`InfeasibleError`: per-job checks first (no
configuration, none meeting the deadline, budget below the cheapest plan), then, when the
program has no solution, re-solves without each constraint group name the one at fault.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pulp

from aihpc.allocate import (
    MAX_GPUS_PER_JOB,
    AllocationError,
    Cluster,
    Config,
    InfeasibleError,
    candidate_configs,
    read_csv,
)
from aihpc.allocate.simulate import Run, plan_policy, simulate
from aihpc.files import atomic_path, write_csv, write_json

OBJECTIVES = ("makespan", "sum", "gpu-hours")
SOLVERS = ("cbc", "highs")
SHAPES = ("auto", "list")
JOB_COLUMNS = ("name", "model", "samples")
PLAN_COLUMNS = (
    "name",
    "gpu_type",
    "nodes",
    "gpus",
    "start_s",
    "end_s",
    "samples_per_s",
    "wave",
    "priority",
)
#: GPU-time caps tried in list mode until the schedule meets the deadlines.
CAPACITY_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)

Throughputs = Mapping[tuple[str, str, int, int], float]


@dataclass(frozen=True)
class Job:
    name: str
    model: str
    samples: float
    min_gpus: int = 1
    max_gpus: int | None = None
    weight: float = 1.0
    deadline_s: float | None = None
    gpu_types: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Option:
    """A candidate configuration of one job with its predicted throughput and duration."""

    config: Config
    samples_per_s: float
    duration: float

    @property
    def gpu_seconds(self) -> float:
        return self.config.gpus * self.duration


@dataclass(frozen=True)
class Assignment:
    name: str
    config: Config
    samples_per_s: float
    start_s: float
    end_s: float
    #: jobs starting at the k-th distinct start time form wave k
    wave: int
    #: rank in the list-scheduling order: replaying the plan in this order reproduces it
    priority: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "gpu_type": self.config.gpu_type,
            "nodes": self.config.nodes,
            "gpus": self.config.gpus,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "samples_per_s": self.samples_per_s,
            "wave": self.wave,
            "priority": self.priority,
        }


@dataclass(frozen=True)
class Plan:
    """A solved allocation; ``to_dict`` is the PLAN.json layout."""

    status: str
    objective: str
    objective_value: float
    schedule: str
    solver: str
    gap_limit: float
    build_seconds: float
    solve_seconds: float
    capacity_factor: float
    jobs: list[Assignment]
    deadline_s: float | None = None
    budget_gpu_hours: float | None = None
    #: list mode, makespan objective, solved to optimality: no schedule can end before this
    makespan_lower_bound_s: float | None = None

    @property
    def makespan_s(self) -> float:
        return max((a.end_s for a in self.jobs), default=0.0)

    @property
    def gpu_hours(self) -> float:
        return sum(a.config.gpus * (a.end_s - a.start_s) for a in self.jobs) / 3600

    @property
    def waves(self) -> int:
        return len({a.start_s for a in self.jobs})

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "objective": self.objective,
            "objective_value": self.objective_value,
            "makespan_s": self.makespan_s,
            "gpu_hours": self.gpu_hours,
            "solve_seconds": self.solve_seconds,
            "build_seconds": self.build_seconds,
            "solver": self.solver,
            "gap_limit": self.gap_limit,
            "schedule": self.schedule,
            "waves": self.waves,
            "capacity_factor": self.capacity_factor,
            "deadline_s": self.deadline_s,
            "budget_gpu_hours": self.budget_gpu_hours,
            "makespan_lower_bound_s": self.makespan_lower_bound_s,
            "jobs": [a.to_dict() for a in self.jobs],
        }


# --- reading inputs ---------------------------------------------------------------------------


def _cell(
    path: Path, row: int, column: str, text: str | None, kind: type, minimum: float = 0.0
) -> Any:
    """Parse one optional cell (None if empty); AllocationError naming file, row and column.

    ``minimum`` 0 means strictly positive; otherwise the value must be at least ``minimum``.
    """
    if text is None or not text.strip():
        return None
    try:
        value = kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum or value <= 0:
        wanted = f">= {minimum:g}" if minimum else "> 0"
        raise AllocationError(
            f"{path}: row {row}: column {column!r}: expected {kind.__name__} {wanted}, got {text!r}"
        )
    return value


def read_jobs(path: str | os.PathLike[str]) -> list[Job]:
    """Read JOBS.csv: ``name,model,samples[,min_gpus,max_gpus,weight,deadline_s,gpu_types]``."""
    path = Path(path)
    rows = read_csv(path, "jobs CSV", JOB_COLUMNS)
    jobs, seen = [], set()
    for row_no, row in enumerate(rows, start=2):
        name = (row["name"] or "").strip()
        if not name or name in seen:
            raise AllocationError(f"{path}: row {row_no}: job name {name!r} empty or repeated")
        seen.add(name)
        samples = _cell(path, row_no, "samples", row["samples"], float)
        if samples is None:
            raise AllocationError(f"{path}: row {row_no}: column 'samples' is empty")
        min_gpus = _cell(path, row_no, "min_gpus", row.get("min_gpus"), int, 1) or 1
        max_gpus = _cell(path, row_no, "max_gpus", row.get("max_gpus"), int, 1)
        if max_gpus is not None and max_gpus < min_gpus:
            raise AllocationError(
                f"{path}: row {row_no}: job {name!r}: max_gpus {max_gpus} < min_gpus {min_gpus}"
            )
        weight = _cell(path, row_no, "weight", row.get("weight"), float)
        types = [t.strip() for t in (row.get("gpu_types") or "").split(";") if t.strip()]
        jobs.append(
            Job(
                name=name,
                model=(row["model"] or "").strip(),
                samples=samples,
                min_gpus=min_gpus,
                max_gpus=max_gpus,
                weight=1.0 if weight is None else weight,
                deadline_s=_cell(path, row_no, "deadline_s", row.get("deadline_s"), float),
                gpu_types=tuple(types) or None,
            )
        )
    if not jobs:
        raise AllocationError(f"{path}: no jobs")
    return jobs


def read_throughput(path: str | os.PathLike[str]) -> dict[tuple[str, str, int, int], float]:
    """Read THR.csv: ``model,gpu_type,nodes,gpus,samples_per_s`` keyed by the first four."""
    path = Path(path)
    rows = read_csv(path, "throughput CSV", ("model", "gpu_type", "nodes", "gpus", "samples_per_s"))
    thr = {}
    for row_no, row in enumerate(rows, start=2):
        nodes = _cell(path, row_no, "nodes", row["nodes"], int, 1)
        gpus = _cell(path, row_no, "gpus", row["gpus"], int, 1)
        rate = _cell(path, row_no, "samples_per_s", row["samples_per_s"], float)
        if nodes is None or gpus is None or not rate:
            raise AllocationError(
                f"{path}: row {row_no}: expected nodes, gpus and samples_per_s > 0"
            )
        thr[(row["model"].strip(), row["gpu_type"].strip(), nodes, gpus)] = rate
    return thr


# --- candidate configurations -----------------------------------------------------------------


def job_options(
    job: Job, thr: Throughputs, cluster: Cluster, max_gpus: int = MAX_GPUS_PER_JOB
) -> list[Option]:
    """The job's candidate configurations with a throughput, minus dominated ones."""
    types = job.gpu_types or tuple(cluster.gpu_types)
    options = []
    for name in types:
        pool = cluster.gpu_types.get(name)
        if pool is None:
            continue
        frontier: list[Option] = []
        for config in candidate_configs(pool, min(max_gpus, job.max_gpus or max_gpus)):
            rate = thr.get((job.model, name, config.nodes, config.gpus))
            if config.gpus < job.min_gpus or not rate:
                continue
            option = Option(config, rate, job.samples / rate)
            # candidates come in increasing GPU count: keep only those faster than all smaller
            if not frontier or option.duration < frontier[-1].duration:
                frontier.append(option)
        options += frontier
    return options


def _explain_no_options(job: Job, thr: Throughputs, cluster: Cluster, max_gpus: int) -> str:
    unknown = [t for t in job.gpu_types or () if t not in cluster.gpu_types]
    if unknown:
        return f"job {job.name!r}: gpu_types {', '.join(unknown)} not in the cluster"
    types = job.gpu_types or tuple(cluster.gpu_types)
    if not any(key[0] == job.model and key[1] in types for key in thr):
        return (
            f"job {job.name!r}: THR.csv has no throughput for model {job.model!r} on "
            f"{', '.join(types)}"
        )
    largest = max(min(max_gpus, cluster.gpu_types[t].gpus) for t in types)
    return (
        f"job {job.name!r}: no configuration with a throughput in THR.csv between min_gpus "
        f"{job.min_gpus} and max_gpus {job.max_gpus or max_gpus} (largest allowed on its "
        f"GPU types: {largest} GPUs)"
    )


# --- the integer program ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Instance:
    jobs: Sequence[Job]
    options: Sequence[Sequence[Option]]
    cluster: Cluster
    objective: str
    deadline: float | None = None
    budget: float | None = None
    job_deadlines: bool = True
    capacity_factor: float = 1.0
    #: list mode, makespan: a further GPU-time cap per type (types whose schedule ran late)
    type_factors: Mapping[str, float] | None = None
    #: list mode: a target makespan T (jobs no longer than T, those over T/2 side by side)
    horizon: float | None = None

    def factor(self, gpu_type: str) -> float:
        """The share of a type's GPU time the list-mode program may fill."""
        return self.capacity_factor * (self.type_factors or {}).get(gpu_type, 1.0)

    def due(self, j: int) -> float:
        """Job j's effective deadline (inf: none)."""
        own = self.jobs[j].deadline_s if self.job_deadlines else None
        return min(d for d in (own, self.deadline, math.inf) if d is not None)

    @property
    def budget_s(self) -> float:
        """The GPU-second budget, with a relative tolerance for float sums (inf: none)."""
        return math.inf if self.budget is None else self.budget * 3600 * (1 + 1e-9)

    def allowed(self, j: int) -> list[Option]:
        limit = min(self.due(j), self.horizon or math.inf)
        return [o for o in self.options[j] if o.duration <= limit]


#: Bin-packing cuts per GPU type and span (see ``lanes`` in ``_solve``).
LANE_CUTS = 3


class SolverTimeout(AllocationError):
    """The solver stopped (time limit) before finding any plan."""


@dataclass
class _Solution:
    status: str
    value: float
    chosen: list[Option]
    #: list-scheduling order (job indices); None: ``_order``'s
    order: list[int] | None = None


def _solver(name: str, time_limit: float | None, gap: float) -> pulp.LpSolver:
    if name == "highs":
        return pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=gap, threads=1)
    with warnings.catch_warnings():
        # PuLP 3.3 deprecates the CBC binary it bundles for one installed separately; the
        # bundled one is the point (no system package needed)
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap, threads=1)


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1: highspy prints a banner on its first use whatever msg says."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


class _Rows:
    """Constraints collected as (variable, coefficient) lists, skipped when they cannot bind."""

    def __init__(self, prob: pulp.LpProblem) -> None:
        self.prob = prob

    def at_most(self, terms: list[tuple[pulp.LpVariable, float]], rhs: float, name: str) -> None:
        if terms and sum(c for _, c in terms) > rhs:
            self.prob += pulp.LpAffineExpression(terms) <= rhs, name


def _solve(
    inst: _Instance,
    mode: str,
    solver: str,
    time_limit: float | None,
    gap: float,
    relax: bool = False,
    clock: list[float] | None = None,
) -> _Solution | None:
    """Build and solve the program in ``mode`` ("one-wave" or "list"); None if infeasible.

    ``clock`` accumulates [model-building seconds, solver seconds], whatever the outcome.
    """
    t0 = time.perf_counter()
    allowed = [inst.allowed(j) for j in range(len(inst.jobs))]
    if not all(allowed):
        return None
    cat = pulp.LpContinuous if relax else pulp.LpBinary
    prob = pulp.LpProblem("allocate", pulp.LpMinimize)
    rows = _Rows(prob)
    xs = [
        [prob.add_variable(f"x{j}_{i}", 0, 1, cat) for i in range(len(opts))]
        for j, opts in enumerate(allowed)
    ]
    for j, vs in enumerate(xs):
        prob += pulp.LpAffineExpression([(v, 1) for v in vs]) == 1, f"one_{j}"
    pairs = [list(zip(vs, opts, strict=True)) for vs, opts in zip(xs, allowed, strict=True)]
    pools = inst.cluster.gpu_types
    by_type: dict[str, list[tuple[int, pulp.LpVariable, Option]]] = {t: [] for t in pools}
    for j, job_pairs in enumerate(pairs):
        for v, o in job_pairs:
            by_type[o.config.gpu_type].append((j, v, o))

    def of(t: str, jobs: set[int] | None) -> list[tuple[int, pulp.LpVariable, Option]]:
        """Variables of type t, of the given jobs (None: all)."""
        return by_type[t] if jobs is None else [e for e in by_type[t] if e[0] in jobs]

    def gpu_time(t: str, jobs: set[int] | None) -> list[tuple[pulp.LpVariable, float]]:
        return [(v, o.gpu_seconds) for _, v, o in of(t, jobs)]

    def side_by_side(jobs: set[int] | None, longer: float, tag: str) -> None:
        # jobs running at one instant: their GPUs fit each type, whole-node configs its nodes
        for t, pool in pools.items():
            chosen = [(v, o.config) for _, v, o in of(t, jobs) if o.duration > longer]
            rows.at_most([(v, c.gpus) for v, c in chosen], pool.gpus, f"gpus_{tag}_{t}")
            half = pool.gpus_per_node / 2
            whole = [(v, c.nodes) for v, c in chosen if c.nodes > 1 or c.gpus > half]
            rows.at_most(whole, pool.nodes, f"nodes_{tag}_{t}")

    def lanes(jobs: set[int] | None, span: float, tag: str) -> None:
        # Each GPU runs jobs one after the other within the span: a bin of size span. For
        # q = 2..4 a job longer than m/(q+1) of the span, for m of 1..q, weighs m/q per GPU
        # and a GPU holds weight <= 1 (a dual feasible function of bin packing)
        for t, pool in pools.items():
            entries = [(v, o) for _, v, o in of(t, jobs) if (LANE_CUTS + 2) * o.duration > span]
            for q in range(2, LANE_CUTS + 2):
                terms = []
                for v, o in entries:
                    m = math.ceil(o.duration * (q + 1) / span) - 1  # cuts span*m/(q+1) passed
                    if m > 0:
                        terms.append((v, o.config.gpus * min(m, q) / q))
                rows.at_most(terms, pool.gpus, f"lanes{q}_{tag}_{t}")

    def one_after_other(jobs: set[int] | None, span: float, tag: str) -> None:
        # a job over half a type's GPUs and half the span excludes every configuration of
        # another job that cannot run beside it and does not fit in the rest of the span
        n = 0
        for t, pool in pools.items():
            entries = of(t, jobs)
            for j, v, o in entries:
                if 2 * o.config.gpus <= pool.gpus or 2 * o.duration <= span:
                    continue
                clash: dict[int, list] = {}
                for k, w, p in entries:
                    if (
                        k != j
                        and p.config.gpus + o.config.gpus > pool.gpus
                        and p.duration + o.duration > span
                    ):
                        clash.setdefault(k, []).append((w, 1))
                for terms in clash.values():
                    expr = pulp.LpAffineExpression([(v, 1), *terms])
                    prob.addConstraint(expr <= 1, f"seq_{tag}_{n}")
                    n += 1

    everyone = range(len(inst.jobs))
    makespan = prob.add_variable("M", 0) if inst.objective == "makespan" else None
    if mode == "one-wave":
        side_by_side(None, -1.0, "all")
    else:
        if makespan is not None:
            for t, pool in pools.items():
                terms = gpu_time(t, None)
                if terms:
                    scale = inst.factor(t) * pool.gpus
                    prob += pulp.LpAffineExpression([*terms, (makespan, -scale)]) <= 0, f"m_{t}"
        if inst.horizon is not None:
            for t, pool in pools.items():
                cap = inst.factor(t) * pool.gpus * inst.horizon
                rows.at_most(gpu_time(t, None), cap, f"h_{t}")
            side_by_side(None, inst.horizon / 2, "horizon")
            lanes(None, inst.horizon, "horizon")
            one_after_other(None, inst.horizon, "horizon")
        # jobs due by d fit their GPU time into [0, d]; those longer than d/2 run at d/2
        dues = [inst.due(j) for j in everyone]
        for d in sorted(set(dues) - {math.inf}):
            group = {j for j in everyone if dues[j] <= d}
            for t, pool in pools.items():
                rows.at_most(gpu_time(t, group), inst.factor(t) * pool.gpus * d, f"t_{t}_{d:g}")
            side_by_side(group, d / 2, f"due{d:g}")
            lanes(group, d, f"due{d:g}")
            one_after_other(group, d, f"due{d:g}")
    if makespan is not None:
        for j in everyone:
            terms = [(v, o.duration) for v, o in pairs[j]]
            prob += pulp.LpAffineExpression([*terms, (makespan, -1.0)]) <= 0, f"end_{j}"
        prob += makespan
    elif inst.objective == "sum":
        prob += pulp.LpAffineExpression(
            [(v, inst.jobs[j].weight * o.duration) for j in everyone for v, o in pairs[j]]
        )
    area = [(v, o.gpu_seconds / 3600) for j in everyone for v, o in pairs[j]]
    if inst.objective == "gpu-hours":
        prob += pulp.LpAffineExpression(area)
    if inst.budget is not None:
        prob += pulp.LpAffineExpression(area) <= inst.budget, "budget"
    t1 = time.perf_counter()
    with _quiet_stdout():
        prob.solve(_solver(solver, time_limit, gap))
    t2 = time.perf_counter()
    if clock is not None:
        clock[0] += t1 - t0
        clock[1] += t2 - t1
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        if prob.status == pulp.LpStatusInfeasible:
            return None
        raise SolverTimeout(
            f"the {solver} solver stopped after {t2 - t1:.1f} s without a plan "
            f"(status {pulp.LpStatus[prob.status]}); raise --time-limit"
        )
    chosen = []
    for vs, opts in zip(xs, allowed, strict=True):
        values = [v.value() or 0.0 for v in vs]
        chosen.append(opts[max(range(len(vs)), key=values.__getitem__)])
    status = "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "feasible"
    return _Solution(status, float(pulp.value(prob.objective)), chosen)


def _order(inst: _Instance, chosen: Sequence[Option]) -> list[int]:
    """List-scheduling priority: deadlines first, then LPT (Smith's rule for the sum)."""

    def key(j: int) -> tuple[float, float]:
        d = chosen[j].duration
        rank = d / max(inst.jobs[j].weight, 1e-12) if inst.objective == "sum" else -d
        return (inst.due(j), rank)

    return sorted(range(len(inst.jobs)), key=key)


def _schedule(
    inst: _Instance, chosen: Sequence[Option], order: Sequence[int] | None = None
) -> list[Run]:
    order = _order(inst, chosen) if order is None else order
    names = [inst.jobs[j].name for j in order]
    configs = {inst.jobs[j].name: (chosen[j].config, chosen[j].duration) for j in order}
    return simulate(inst.cluster, names, plan_policy(configs))


def _late(inst: _Instance, runs: Sequence[Run]) -> list[str]:
    due = {job.name: inst.due(j) for j, job in enumerate(inst.jobs)}
    # a relative tolerance: durations pass through float sums in the scheduler
    return [r.name for r in runs if r.end_s > due[r.name] * (1 + 1e-9)]


def _rank(inst: _Instance, runs: Sequence[Run]) -> tuple[bool, float]:
    """How a schedule compares, best first: on time before late, then by makespan."""
    return bool(_late(inst, runs)), max(r.end_s for r in runs)


def _fits_at_once(inst: _Instance) -> bool:
    """Whether the smallest allowed configurations could all run side by side (GPU count)."""
    smallest = [
        min((o.config.gpus for o in inst.allowed(j)), default=0) for j in range(len(inst.jobs))
    ]
    return 0 not in smallest and sum(smallest) <= inst.cluster.gpus


def _greedy_one_wave(inst: _Instance, limit: float) -> bool:
    """Whether a quick greedy finds a one-wave plan with every job done by ``limit``.

    Each job takes, on the type where that is fewest GPUs, the smallest configuration
    finishing by ``limit``; hardest jobs first; GPUs and whole nodes counted as in the program.
    """
    pools = inst.cluster.gpu_types
    gpus = {t: p.gpus for t, p in pools.items()}
    nodes = {t: p.nodes for t, p in pools.items()}
    needs = []
    for j in range(len(inst.jobs)):
        per_type: dict[str, Option] = {}
        for o in inst.allowed(j):  # per type in increasing GPUs
            if o.duration <= limit and o.config.gpu_type not in per_type:
                per_type[o.config.gpu_type] = o
        if not per_type:
            return False
        needs.append(sorted(per_type.values(), key=lambda o: o.config.gpus))
    for opts in sorted(needs, key=lambda opts: -opts[0].config.gpus):
        for o in opts:
            c, pool = o.config, pools[o.config.gpu_type]
            whole = c.nodes if c.nodes > 1 or 2 * c.gpus > pool.gpus_per_node else 0
            if c.gpus <= gpus[c.gpu_type] and whole <= nodes[c.gpu_type]:
                gpus[c.gpu_type] -= c.gpus
                nodes[c.gpu_type] -= whole
                break
        else:
            return False
    return True


def _one_wave_window(inst: _Instance) -> _Instance:
    """One wave, makespan: drop configurations that cannot matter, for a smaller program.

    The optimal makespan M lies between L (the slowest job's fastest configuration) and U
    (the best greedy plan, bisected over the candidate durations). No configuration longer
    than U can be used; of those no longer than L, a job needs only the one with the fewest
    GPUs per type (it meets any M >= L on the fewest GPUs and nodes). Without a budget only:
    with one, a configuration's GPU-hours matter too.
    """
    jobs = range(len(inst.jobs))
    lower = max(min(o.duration for o in inst.allowed(j)) for j in jobs)
    durations = sorted({o.duration for j in jobs for o in inst.allowed(j) if o.duration >= lower})
    lo, hi = 0, len(durations)  # find the first duration the greedy meets
    while lo < hi:
        mid = (lo + hi) // 2
        if _greedy_one_wave(inst, durations[mid]):
            hi = mid
        else:
            lo = mid + 1
    upper = durations[lo] if lo < len(durations) else math.inf
    options = []
    for j in jobs:
        kept, cheap = [], set()
        for o in inst.allowed(j):  # per type in increasing GPUs, decreasing duration
            if o.duration > upper:
                continue
            if o.duration <= lower:
                if o.config.gpu_type in cheap:
                    continue
                cheap.add(o.config.gpu_type)
            kept.append(o)
        options.append(kept)
    return replace(inst, options=options)


def _check_jobs(inst: _Instance, thr: Throughputs, max_gpus: int) -> None:
    """Per-job checks before solving: every job needs a configuration meeting its deadline."""
    problems = []
    for j, job in enumerate(inst.jobs):
        if not inst.options[j]:
            problems.append(_explain_no_options(job, thr, inst.cluster, max_gpus))
        elif not inst.allowed(j):
            fastest = min(inst.options[j], key=lambda o: o.duration)
            c = fastest.config
            problems.append(
                f"job {job.name!r} needs at least {fastest.duration:.0f} s (fastest: {c.gpus} "
                f"{c.gpu_type} GPUs on {c.nodes} node(s)) but must end by {inst.due(j):g} s"
            )
    if problems:
        raise InfeasibleError("no feasible plan: " + "; ".join(problems))
    if inst.budget is not None:
        cheapest = [
            min(o.gpu_seconds for o in inst.allowed(j)) / 3600 for j in range(len(inst.jobs))
        ]
        if sum(cheapest) > inst.budget:
            top = sorted(range(len(cheapest)), key=cheapest.__getitem__, reverse=True)[:3]
            names = ", ".join(f"{inst.jobs[j].name!r} {cheapest[j]:.3g}" for j in top)
            within = (
                " within their deadlines"
                if any(math.isfinite(inst.due(j)) for j in range(len(inst.jobs)))
                else ""
            )
            raise InfeasibleError(
                f"no feasible plan: budget {inst.budget:g} GPU-hours is below the "
                f"{sum(cheapest):.4g} GPU-hours the jobs need at their cheapest configurations"
                f"{within} (largest: {names})"
            )


def _diagnose(inst: _Instance, solver: str, time_limit: float | None) -> str:
    """Say which constraint group makes the list-mode program infeasible."""

    def optimum(variant: _Instance) -> float | None:
        sol = _solve(variant, "list", solver, time_limit, 1e-4)
        return None if sol is None else sol.value

    base = replace(inst, capacity_factor=1.0)
    if inst.budget is not None:
        need = optimum(replace(base, objective="gpu-hours", budget=None))
        if need is not None:
            return (
                f"budget {inst.budget:g} GPU-hours too small: a plan meeting the deadlines "
                f"needs at least {need:.4g} GPU-hours"
            )
    shortest = optimum(
        replace(base, objective="makespan", deadline=None, job_deadlines=False, budget=None)
    )
    if inst.deadline is not None and shortest is not None and shortest > inst.deadline:
        return (
            f"deadline {inst.deadline:g} s cannot be met: with all {inst.cluster.gpus} GPUs "
            f"the jobs need at least {shortest:.0f} s of cluster time"
        )
    dues = sorted({inst.due(j) for j in range(len(inst.jobs))} - {math.inf})
    for d in dues:
        group = [j for j in range(len(inst.jobs)) if inst.due(j) <= d]
        sub = replace(
            base,
            jobs=[inst.jobs[j] for j in group],
            options=[inst.options[j] for j in group],
            objective="gpu-hours",
            budget=None,
        )
        if optimum(sub) is None:
            names = ", ".join(repr(inst.jobs[j].name) for j in group[:10])
            more = f" and {len(group) - 10} more" if len(group) > 10 else ""
            return (
                f"jobs {names}{more} (deadline <= {d:g} s) need more GPU time before "
                f"{d:g} s than the cluster has"
            )
    return "the capacity, deadline and budget constraints together admit no plan"


def plan(
    jobs: Sequence[Job],
    thr: Throughputs,
    cluster: Cluster,
    objective: str = "makespan",
    *,
    deadline: float | None = None,
    budget: float | None = None,
    solver: str = "cbc",
    time_limit: float | None = None,
    gap: float = 1e-4,
    max_gpus: int = MAX_GPUS_PER_JOB,
    shape: str = "auto",
) -> Plan:
    """Choose and schedule one configuration per job; InfeasibleError names what is at fault.

    ``deadline`` (seconds from the start) applies to every job, ``budget`` (GPU-hours) to
    the total; per-job ``deadline_s`` come from the jobs. ``gap`` is the relative optimality
    gap at which the solver stops; ``time_limit`` (seconds) bounds each solver call.
    ``shape`` "auto" plans one wave when the jobs fit side by side, "list" always plans a
    list schedule (which may start every job at 0 too).
    """
    if objective not in OBJECTIVES:
        raise AllocationError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if solver not in SOLVERS:
        raise AllocationError(f"solver {solver!r}: expected one of {', '.join(SOLVERS)}")
    if shape not in SHAPES:
        raise AllocationError(f"shape {shape!r}: expected one of {', '.join(SHAPES)}")
    for label, value in (("deadline", deadline), ("budget", budget)):
        if value is not None and not value > 0:
            raise AllocationError(f"{label} {value!r}: expected a positive number")
    options = [job_options(job, thr, cluster, max_gpus) for job in jobs]
    inst = _Instance(jobs, options, cluster, objective, deadline, budget)
    _check_jobs(inst, thr, max_gpus)
    clock = [0.0, 0.0]  # model building, solving: over every program solved

    def solve(
        variant: _Instance,
        mode: str,
        relax: bool = False,
        gap: float = gap,
        seconds: float | None = None,
    ) -> _Solution | None:
        limit = min(s for s in (time_limit, seconds, math.inf) if s is not None)
        seconds = None if limit == math.inf else limit
        return _solve(variant, mode, solver, seconds, gap, relax, clock)

    if shape == "auto" and _fits_at_once(inst):
        small = inst
        if objective == "makespan" and budget is None:
            start = time.perf_counter()
            small = _one_wave_window(inst)
            clock[0] += time.perf_counter() - start
        sol = solve(small, "one-wave")
        if sol is not None:
            runs = _schedule(small, sol.chosen)
            if not _late(small, runs):
                return _make_plan(small, sol, runs, "one-wave", solver, gap, clock)
    late: list[str] = []
    for factor in CAPACITY_FACTORS:
        attempt = replace(inst, capacity_factor=factor)
        if objective == "makespan":
            found = _plan_makespan(attempt, solve)
        else:
            sol = solve(attempt, "list")
            found = None if sol is None else (sol, _schedule(attempt, sol.chosen), None)
        if found is None:
            if factor == 1.0:
                raise InfeasibleError("no feasible plan: " + _diagnose(inst, solver, time_limit))
            break
        sol, runs, bound = found
        late = _late(attempt, runs)
        if not late:
            return _make_plan(attempt, sol, runs, "list", solver, gap, clock, bound)
    raise InfeasibleError(
        f"no feasible plan found: the jobs' GPU time fits before their deadlines, but list "
        f"scheduling could not order them so that {', '.join(map(repr, late[:10]))} end in "
        f"time, even with GPU time capped at {factor:.0%} of capacity; relax the deadlines"
    )


#: Bisection steps towards the smallest feasible target makespan (the lower bound).
BOUND_ROUNDS = 6
#: Targets tried above that threshold, as factors of it, and re-plans per target.
TARGET_STEPS = (1.0, 1.03, 1.08)
REPLANS = 2
#: Relative optimality gap of the search programs (they only rank plans that meet a
#: target), the bisection's precision, and the most seconds one of them may take.
SEARCH_GAP = 0.01
SEARCH_PRECISION = 0.02
SEARCH_SECONDS = 5.0
#: The LP bisection before it stops at this precision or after this many LPs (each a
#: fraction of an integer program's time).
LP_PRECISION = 0.002
LP_ROUNDS = 12
#: Seconds the local search on the best plans' list schedules may take, and how many it
#: starts from.
IMPROVE_SECONDS = 2.0
IMPROVE_STARTS = 4


def _relaxed_threshold(
    inst: _Instance, lp: Callable[[_Instance], _Solution | None], lower: float, upper: float
) -> float:
    """The largest target T found in [lower, upper] whose target program (see
    :func:`_plan_makespan`) has an infeasible LP relaxation; ``lower`` if none.

    Every schedule ending by T gives an integral, hence LP-feasible, point of that program:
    an infeasible LP proves that none does, so T is a lower bound. Configurations longer
    than T are gone from it, which is what makes it much tighter than the plain relaxation
    (there a long job mixes a fast wide configuration with a slow narrow one).
    """
    for _ in range(LP_ROUNDS):
        if upper <= lower * (1 + LP_PRECISION):
            break
        target = (lower + upper) / 2
        try:
            feasible = lp(replace(inst, objective="gpu-hours", horizon=target)) is not None
        except SolverTimeout:
            break
        if feasible:
            upper = target
        else:
            lower = target
    return lower


#: List orders the local search tries per GPU type: longest, largest GPU time, widest first.
_ORDER_KEYS: tuple[Callable[[Option], tuple[float, ...]], ...] = (
    lambda o: (-o.duration,),
    lambda o: (-o.gpu_seconds,),
    lambda o: (-o.config.gpus, -o.duration),
)


#: A type's list schedule: its end (inf: a job ends late), how many jobs end then, the order.
_Finish = tuple[float, int, tuple[int, ...]]


def _ahead(a: Sequence[_Finish], b: Sequence[_Finish]) -> bool:
    """Whether types' schedules ``a`` beat ``b`` (both latest end first): lexicographically
    on (end, beyond rounding; then jobs ending then)."""
    for (x, m, _), (y, n, _) in zip(a, b, strict=True):
        if x < y * (1 - 1e-9):
            return True
        if x > y * (1 + 1e-9):
            return False
        if m != n:
            return m < n
    return False


def _improve(
    inst: _Instance, chosen: Sequence[Option], seconds: float
) -> tuple[list[Option], list[int]]:
    """Local search on a makespan plan's list schedule: configurations and orders.

    GPU types keep separate queues, so each type's schedule is simulated alone. Per type
    the best of three list orders (:data:`_ORDER_KEYS`, earliest deadline first) is kept;
    then, while ``seconds`` last, a job of the type that ends last moves to another
    configuration (any type; within the budget and deadlines) whenever that makes the
    types' ends, sorted from the latest, lexicographically earlier, or keeps them and ends
    fewer jobs at the last one (so a wave of jobs ending together can leave one by one).
    The start (the longest-first order of every type) is the plan as scheduled before, so
    it never gets worse.
    Returns the configurations and a list order that reproduces the schedule.
    """
    stop = time.perf_counter() + seconds
    pools = inst.cluster.gpu_types
    alone = {t: Cluster({t: pool}) for t, pool in pools.items()}
    due = [inst.due(j) for j in range(len(inst.jobs))]
    Member = tuple[int, Option]
    cache: dict[tuple[str, frozenset[Member]], _Finish] = {}

    def finish(t: str, members: frozenset[Member]) -> _Finish:
        """Type t's schedule of ``members`` in the best of the orders."""
        if (t, members) not in cache:
            best: _Finish = (math.inf, 0, ())
            for key in _ORDER_KEYS:
                order = sorted(members, key=lambda m: (due[m[0]], *key(m[1]), m[0]))
                configs = {inst.jobs[j].name: (o.config, o.duration) for j, o in order}
                runs = simulate(
                    alone[t], [inst.jobs[j].name for j, _ in order], plan_policy(configs)
                )
                end = max((r.end_s for r in runs), default=0.0)
                if _late(inst, runs):
                    end = math.inf
                crowd = sum(r.end_s >= end * (1 - 1e-9) for r in runs)
                if (end, crowd) < best[:2] or not best[2]:
                    best = (end, crowd, tuple(j for j, _ in order))
            cache[(t, members)] = best
        return cache[(t, members)]

    members = {t: {(j, o) for j, o in enumerate(chosen) if o.config.gpu_type == t} for t in pools}
    state = {t: finish(t, frozenset(m)) for t, m in members.items()}
    area = {t: sum(o.gpu_seconds for _, o in m) for t, m in members.items()}
    budget = inst.budget_s
    improved = True
    while improved and time.perf_counter() < stop:
        improved = False
        ends = {t: state[t][0] for t in pools}
        last = max(ends, key=ends.__getitem__)
        rank = sorted(state.values(), reverse=True)
        for j, o in sorted(members[last], key=lambda m: (-m[1].duration, m[0])):
            rest = frozenset(members[last] - {(j, o)})
            for p in inst.allowed(j):
                t = p.config.gpu_type
                if (
                    p == o
                    or p.duration >= ends[last]
                    or sum(area.values()) - o.gpu_seconds + p.gpu_seconds > budget
                    or (t != last and (area[t] + p.gpu_seconds) / pools[t].gpus >= ends[last])
                ):
                    continue  # cannot end the last type earlier
                new = dict(state)
                if t == last:
                    new[t] = finish(t, rest | {(j, p)})
                else:
                    new[last] = finish(last, rest)
                    new[t] = finish(t, frozenset(members[t] | {(j, p)}))
                if _ahead(sorted(new.values(), reverse=True), rank):
                    members[last].discard((j, o))
                    members[t].add((j, p))
                    area[last] -= o.gpu_seconds
                    area[t] += p.gpu_seconds
                    state = new
                    improved = True
                    break
            if improved or time.perf_counter() >= stop:
                break
    final = list(chosen)
    for m in members.values():
        for j, o in m:
            final[j] = o
    return final, [j for t in pools for j in state[t][2]]


def _plan_makespan(
    inst: _Instance, solve: Callable[..., _Solution | None]
) -> tuple[_Solution, list[Run], float | None] | None:
    """List mode, makespan: search target makespans T near the lower bound.

    For a target T the program keeps GPU time per type within T, drops configurations
    longer than T, makes those over T/2 fit side by side (they all run at T/2), two jobs
    that cannot share a type's GPUs fit one after the other, and bin-packing cuts hold per
    GPU; it minimises GPU-hours (narrow, efficient configurations pack best). All are
    necessary for a schedule ending by T, so an infeasible T (at full capacity) is a lower
    bound, as is the LP relaxation of the GPU-time program the search starts from.

    First bisections find the smallest feasible T (raising the bound): over the program's
    LP relaxation (:func:`_relaxed_threshold`: cheap), then from there over the integer
    program. Then targets just above it are planned. The program cannot see how jobs pack
    onto nodes: a type whose list schedule ends after T gets its GPU-time cap lowered by
    T / its end and T is planned again. Every plan is list-scheduled; the shortest
    schedule, improved by :func:`_improve`, wins. None: no plan exists.
    """
    relaxed = solve(replace(inst, objective="makespan"), "list", relax=True)
    if relaxed is None:
        return None
    exact = inst.capacity_factor == 1.0
    # every plan within the budget: (ends late, makespan) -> the plan
    plans: dict[tuple[Option, ...], tuple[bool, float, _Solution]] = {}

    def consider(sol: _Solution) -> dict[str, float]:
        """Schedule a plan and keep it; per type, its last job's end."""
        runs = _schedule(inst, sol.chosen)
        # only the rounded LP solution can be over the budget
        if sum(o.gpu_seconds for o in sol.chosen) <= inst.budget_s:
            plans[tuple(sol.chosen)] = (*_rank(inst, runs), sol)
        ends: dict[str, float] = {}
        for r in runs:
            ends[r.config.gpu_type] = max(ends.get(r.config.gpu_type, 0.0), r.end_s)
        return ends

    tried: dict[tuple, _Solution | None] = {}

    def attempt(target: float, factors: dict[str, float]) -> _Solution | None:
        key = (target, *sorted(factors.items()))
        if key not in tried:
            variant = replace(inst, objective="gpu-hours", horizon=target, type_factors=factors)
            tried[key] = solve(variant, "list", gap=SEARCH_GAP, seconds=SEARCH_SECONDS)
        return tried[key]

    lower, upper = relaxed.value, max(consider(relaxed).values())  # the rounded LP plan
    lower = _relaxed_threshold(inst, lambda v: solve(v, "list", relax=True), lower, upper)
    # The integer threshold is usually just above the LP's: probe upwards from it in
    # growing steps (half the precision, then doubling), bisecting once a probe is feasible.
    # A probe the solver cannot decide in time moves the search up, not the bound.
    step, probe = SEARCH_PRECISION / 2, lower
    for _ in range(BOUND_ROUNDS):
        if upper <= probe * (1 + SEARCH_PRECISION):
            break
        target = min(probe * (1 + step), (probe + upper) / 2)
        try:
            sol = attempt(target, {})
        except SolverTimeout:
            probe, step = target, 2 * step
            continue
        if sol is None:
            lower = probe = target  # no schedule ends by target
            step *= 2
        else:
            upper = target
            consider(sol)
    for step in TARGET_STEPS:
        target = upper * step
        if plans and target >= min(p[:2] for p in plans.values())[1]:
            break
        factors: dict[str, float] = {}
        for _ in range(REPLANS):
            try:
                sol = attempt(target, factors)
            except SolverTimeout:
                sol = None
            if sol is None:
                break
            ends = consider(sol)
            for gpu_type, end in ends.items():  # types that ran late get less GPU time
                if end > target:
                    factors[gpu_type] = factors.get(gpu_type, 1.0) * target / end
            if not factors or max(ends.values()) <= target:
                break
    if not plans:  # no target met the budget: the plain GPU-time program
        sol = solve(replace(inst, objective="makespan"), "list")
        if sol is None:
            return None
        consider(sol)
    # The local search ends in different local optima from different plans: improve the
    # best few, sharing the time, and keep the best result.
    starts = sorted(plans.values(), key=lambda p: p[:2])[:IMPROVE_STARTS]
    stop = time.perf_counter() + IMPROVE_SECONDS
    best: tuple[bool, float, _Solution, list[Run]] | None = None
    for i, (_, _, sol) in enumerate(starts):
        share = (stop - time.perf_counter()) / (len(starts) - i)
        chosen, order = _improve(inst, sol.chosen, max(share, 0.0))
        runs = _schedule(inst, chosen, order)
        rank = _rank(inst, runs)
        if best is None or rank < best[:2]:
            best = (*rank, replace(sol, chosen=chosen, order=order), runs)
    assert best is not None
    _, end, sol, runs = best
    status = "optimal" if exact and end <= lower * (1 + 1e-4) else "feasible"
    return replace(sol, status=status, value=end), runs, lower if exact else None


def _make_plan(
    inst: _Instance,
    sol: _Solution,
    runs: Sequence[Run],
    schedule: str,
    solver: str,
    gap: float,
    clock: Sequence[float],
    bound: float | None = None,
) -> Plan:
    rate = {job.name: opt.samples_per_s for job, opt in zip(inst.jobs, sol.chosen, strict=True)}
    by_name = {r.name: r for r in runs}
    starts = sorted({r.start_s for r in runs})
    wave = {s: i + 1 for i, s in enumerate(starts)}
    order = _order(inst, sol.chosen) if sol.order is None else sol.order
    rank = {inst.jobs[j].name: i for i, j in enumerate(order)}
    assignments = [
        Assignment(
            name=job.name,
            config=by_name[job.name].config,
            samples_per_s=rate[job.name],
            start_s=by_name[job.name].start_s,
            end_s=by_name[job.name].end_s,
            wave=wave[by_name[job.name].start_s],
            priority=rank[job.name],
        )
        for job in inst.jobs
    ]
    return Plan(
        status=sol.status,
        objective=inst.objective,
        objective_value=sol.value,
        schedule=schedule,
        solver=solver,
        gap_limit=gap,
        build_seconds=clock[0],
        solve_seconds=clock[1],
        capacity_factor=inst.capacity_factor,
        jobs=assignments,
        deadline_s=inst.deadline,
        budget_gpu_hours=inst.budget,
        makespan_lower_bound_s=bound,
    )


def relaxation_bound(
    jobs: Sequence[Job],
    thr: Throughputs,
    cluster: Cluster,
    objective: str = "makespan",
    max_gpus: int = MAX_GPUS_PER_JOB,
    *,
    cuts: bool = False,
) -> float:
    """LP-relaxation bound of the list-mode program (no deadline, no budget).

    For ``makespan`` it bounds every non-preemptive schedule of the jobs on the cluster that
    uses candidate configurations, whatever the plan shape. With ``cuts`` (makespan only)
    the bound is the largest target makespan whose target program, with its valid
    inequalities, has an infeasible LP relaxation (:func:`_relaxed_threshold`), bisected
    between the plain bound and the rounded relaxation's list schedule.
    """
    if cuts and objective != "makespan":
        raise AllocationError(f"relaxation_bound: cuts bound the makespan, not {objective!r}")
    options = [job_options(job, thr, cluster, max_gpus) for job in jobs]
    inst = _Instance(jobs, options, cluster, objective)
    _check_jobs(inst, thr, max_gpus)

    def lp(variant: _Instance) -> _Solution | None:
        return _solve(variant, "list", "highs", None, 0.0, relax=True)

    sol = lp(inst)
    assert sol is not None  # list mode without deadline or budget is always feasible
    if not cuts:
        return sol.value
    upper = max(r.end_s for r in _schedule(inst, sol.chosen))
    return _relaxed_threshold(inst, lp, sol.value, upper)


# --- writing the plan -------------------------------------------------------------------------


def write_plan(
    result: Plan,
    out: str | os.PathLike[str],
    gantt: str | os.PathLike[str] | None = None,
) -> Path:
    """Write PLAN.json, the same rows as CSV next to it (returned), and optionally a Gantt PNG."""
    out = Path(out)
    write_json(out, result.to_dict())
    csv_path = out.with_suffix(".csv")
    write_csv(csv_path, (a.to_dict() for a in result.jobs), PLAN_COLUMNS)
    if gantt is not None:
        write_gantt(result, gantt)
    return csv_path


def write_gantt(result: Plan, path: str | os.PathLike[str]) -> None:
    """One bar per job over its run time, coloured by GPU type, labelled with its GPUs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    jobs = sorted(result.jobs, key=lambda a: (a.start_s, a.name))
    types = sorted({a.config.gpu_type for a in jobs})
    colours = {t: f"C{i % 10}" for i, t in enumerate(types)}
    fig = Figure(figsize=(10, min(2 + 0.25 * len(jobs), 40)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    hours = [(a.start_s / 3600, (a.end_s - a.start_s) / 3600) for a in jobs]
    ax.barh(
        range(len(jobs)),
        [w for _, w in hours],
        left=[s for s, _ in hours],
        color=[colours[a.config.gpu_type] for a in jobs],
    )
    if len(jobs) <= 60:
        for i, (a, (s, w)) in enumerate(zip(jobs, hours, strict=True)):
            ax.text(s + w, i, f" {a.config.gpus}", va="center", fontsize=7)
        ax.set_yticks(range(len(jobs)), [a.name for a in jobs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("hours from start")
    ax.set_title(
        f"{result.objective} plan ({result.schedule}): makespan "
        f"{result.makespan_s / 3600:.2f} h, {result.gpu_hours:.1f} GPU-h"
    )
    ax.legend(handles=[Patch(color=colours[t], label=t) for t in types], loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
