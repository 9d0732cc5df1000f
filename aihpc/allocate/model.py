"""Pollux's data-parallel throughput model: fit to measured step times, predict throughputs.

Per (model, GPU type), with K replicas of local batch size b on one or several nodes:

- computation  T_acc(b) = alpha_c + beta_c * b
- network      T_net = alpha_r + beta_r * (K - 2) within a node, alpha_n + beta_n * (K - 2)
  across nodes, 0 for K = 1
- one step     T_iter = (T_acc^gamma + T_net^gamma)^(1/gamma), gamma in [1, 10] (gamma = 1:
  no overlap of computation and communication; large gamma: full overlap)
- throughput   K * b / T_iter samples per second.

A local batch too large for a GPU's memory runs as s accumulation steps of b/s samples; only
the last one synchronises: step = (s - 1) * T_acc(b/s) + T_iter(b/s).

The fit is a bounded least-squares on log step times (relative errors, so fast and slow
configurations weigh alike). Where the profile also gives ``sync_time``, step - sync is the
measured computation time and pins alpha_c/beta_c directly.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from aihpc.allocate import MAX_GPUS_PER_JOB, AllocationError, Cluster, candidate_configs
from aihpc.files import write_csv

PARAM_NAMES = ("alpha_c", "beta_c", "alpha_r", "beta_r", "alpha_n", "beta_n", "gamma")
#: Lower bound of the time parameters (seconds); a parameter the data cannot see is fixed here.
TINY = 1e-8
#: Inter-node terms are at least this factor above intra-node ones when no data says otherwise.
INTER_NODE_PRIOR = 1.1
PROFILE_COLUMNS = ("model", "gpu_type", "nodes", "replicas", "local_batch", "step_time")
THR_COLUMNS = ("model", "gpu_type", "nodes", "gpus", "samples_per_s")


@dataclass(frozen=True)
class PerfParams:
    alpha_c: float
    beta_c: float
    alpha_r: float
    beta_r: float
    alpha_n: float
    beta_n: float
    gamma: float


@dataclass(frozen=True)
class Profile:
    """Measured steps of one (model, GPU type); ``sync_time`` is NaN where not measured."""

    nodes: np.ndarray
    replicas: np.ndarray
    local_bsz: np.ndarray
    step_time: np.ndarray
    sync_time: np.ndarray

    def __len__(self) -> int:
        return len(self.step_time)

    def subset(self, mask: np.ndarray) -> Profile:
        return Profile(*(getattr(self, f)[mask] for f in Profile.__dataclass_fields__))

    @staticmethod
    def concat(profiles: Sequence[Profile]) -> Profile:
        return Profile(
            *(
                np.concatenate([getattr(p, f) for p in profiles])
                for f in Profile.__dataclass_fields__
            )
        )


@dataclass(frozen=True)
class FitResult:
    """Fitted parameters of one (model, GPU type) and how well they match the training points."""

    model: str
    gpu_type: str
    params: PerfParams
    points: int
    median_rel_error: float
    max_rel_error: float
    max_local_bsz: float
    priors: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["priors"] = list(self.priors)
        return data


def step_time(
    params: PerfParams,
    nodes: np.ndarray | float,
    replicas: np.ndarray | float,
    local_bsz: np.ndarray | float,
    accum_steps: np.ndarray | float = 1,
) -> np.ndarray:
    """Predicted seconds per optimizer step (all arguments broadcast)."""
    nodes, replicas = np.asarray(nodes, float), np.asarray(replicas, float)
    micro = np.asarray(local_bsz, float) / accum_steps
    t_acc = params.alpha_c + params.beta_c * micro
    alpha = np.where(nodes > 1, params.alpha_n, params.alpha_r)
    beta = np.where(nodes > 1, params.beta_n, params.beta_r)
    t_net = np.where(replicas > 1, alpha + beta * np.maximum(replicas - 2, 0), 0.0)
    g = params.gamma
    t_iter = (t_acc**g + t_net**g) ** (1 / g)
    return (np.asarray(accum_steps, float) - 1) * t_acc + t_iter


def throughput(
    params: PerfParams,
    nodes: np.ndarray | float,
    replicas: np.ndarray | float,
    local_bsz: np.ndarray | float,
    max_local_bsz: float | None = None,
) -> np.ndarray:
    """Predicted samples per second; local batches above ``max_local_bsz`` accumulate."""
    local_bsz = np.asarray(local_bsz, float)
    accum = 1 if max_local_bsz is None else np.maximum(np.ceil(local_bsz / max_local_bsz), 1)
    return replicas * local_bsz / step_time(params, nodes, replicas, local_bsz, accum)


def relative_errors(params: PerfParams, profile: Profile) -> np.ndarray:
    """|predicted - measured| / measured throughput for each point of ``profile``."""
    pred = step_time(params, profile.nodes, profile.replicas, profile.local_bsz)
    return np.abs(profile.step_time / pred - 1)


def _free_spec(profile: Profile) -> tuple[dict[str, Any], list[str]]:
    """Which parameters the data can pin; the others get a fixed value or a tie (the priors).

    Returns name -> "free" | float (fixed) | (other, factor) (tied), and the priors applied.
    """
    nodes, replicas = profile.nodes, profile.replicas
    intra = (nodes == 1) & (replicas > 1)
    inter = nodes > 1
    has_compute = bool(np.any(np.isfinite(profile.sync_time)))
    spec: dict[str, Any] = dict.fromkeys(PARAM_NAMES, "free")
    priors = []
    if not intra.any() and not inter.any():
        spec.update(alpha_r=TINY, beta_r=TINY, gamma=1.0)
        priors.append("single-GPU data only: network time taken as zero")
    elif not intra.any():
        spec.update(
            alpha_r=("alpha_n", 1 / INTER_NODE_PRIOR), beta_r=("beta_n", 1 / INTER_NODE_PRIOR)
        )
        priors.append("no single-node multi-GPU data: intra-node terms = inter-node / 1.1")
    elif not np.any(intra & (replicas > 2)):
        spec["beta_r"] = TINY
        priors.append("no more than 2 GPUs in one node: beta_r taken as zero")
    if not inter.any():
        spec.update(alpha_n=("alpha_r", INTER_NODE_PRIOR), beta_n=("beta_r", INTER_NODE_PRIOR))
        priors.append("no multi-node data: alpha_n = 1.1 alpha_r, beta_n = 1.1 beta_r")
    elif not np.any(inter & (replicas > 2)):
        spec["beta_n"] = TINY
        priors.append("no multi-node data beyond 2 GPUs: beta_n taken as zero")
    if len(np.unique(profile.local_bsz)) == 1 and not has_compute:
        spec["alpha_c"] = TINY
        priors.append("one local batch size only: alpha_c taken as zero")
    return spec, priors


def _initial_guess(profile: Profile) -> dict[str, float]:
    """Rough starting values: a line through the computation times, a tenth of it for sync."""
    compute = profile.step_time - np.nan_to_num(profile.sync_time, nan=0.0)
    use = compute > 0
    if not use.any():  # sync_time not part of step_time: take step times as computation
        compute, use = profile.step_time, np.ones(len(profile), bool)
    b, t = profile.local_bsz[use], compute[use]
    slope, intercept = np.polyfit(b, t, 1) if len(np.unique(b)) > 1 else (t.mean() / b.mean(), 0)
    scale = float(np.median(profile.step_time))
    guess = {
        "alpha_c": max(intercept, 0.05 * scale),
        "beta_c": max(slope, 1e-3 * scale / b.mean()),
        "alpha_r": 0.1 * scale,
        "beta_r": 0.01 * scale,
        "alpha_n": 0.2 * scale,
        "beta_n": 0.02 * scale,
    }
    return {name: float(np.clip(value, 2 * TINY, 500.0)) for name, value in guess.items()}


def fit_params(profile: Profile) -> tuple[PerfParams, tuple[str, ...]]:
    """Bounded least squares on log step times (plus log computation times where measured).

    Returns the parameters and the priors applied (see ``_free_spec``). Time parameters are
    optimised as logarithms (they span 1e-6 s to seconds) within [1e-8, 1e3] s, gamma within
    [1, 10]; from a few starting values of gamma, the best fit wins.
    """
    spec, priors = _free_spec(profile)
    free = [name for name in PARAM_NAMES if spec[name] == "free"]
    log_obs = np.log(profile.step_time)
    compute = profile.step_time - profile.sync_time
    has_compute = np.isfinite(compute) & (compute > 0)
    log_compute = np.log(compute[has_compute])
    b_compute = profile.local_bsz[has_compute]

    def unpack(theta: np.ndarray) -> PerfParams:
        values: dict[str, float] = {}
        for name, value in zip(free, theta, strict=True):
            values[name] = float(value) if name == "gamma" else math.exp(value)
        for name in PARAM_NAMES:
            rule = spec[name]
            if isinstance(rule, float):
                values[name] = rule
        for name in PARAM_NAMES:
            rule = spec[name]
            if isinstance(rule, tuple):
                values[name] = values[rule[0]] * rule[1]
        return PerfParams(**values)

    def residuals(theta: np.ndarray) -> np.ndarray:
        p = unpack(theta)
        pred = step_time(p, profile.nodes, profile.replicas, profile.local_bsz)
        res = np.log(pred) - log_obs
        if len(log_compute):
            res = np.concatenate([res, np.log(p.alpha_c + p.beta_c * b_compute) - log_compute])
        return res

    guess = _initial_guess(profile)
    lower = [1.0 if n == "gamma" else math.log(TINY) for n in free]
    upper = [10.0 if n == "gamma" else math.log(1e3) for n in free]
    best = None
    for gamma0 in (1.5, 3.0, 6.0) if "gamma" in free else (1.0,):
        x0 = [gamma0 if n == "gamma" else math.log(guess[n]) for n in free]
        # soft-L1 beyond 10 % log error: a few anomalous measurements (the shared Azure
        # data has 3-5-node runs 3x slower than 2-node ones) must not drag the whole fit
        result = least_squares(
            residuals,
            x0,
            bounds=(lower, upper),
            loss="soft_l1",
            f_scale=0.1,
            ftol=1e-12,
            xtol=1e-12,
            gtol=1e-12,
            max_nfev=3000,
        )
        if best is None or result.cost < best.cost:
            best = result
    return unpack(best.x), tuple(priors)


def fit(model: str, gpu_type: str, profile: Profile) -> FitResult:
    """Fit one (model, GPU type) and report the relative throughput error on its own points."""
    if len(profile) < 3:
        raise AllocationError(
            f"model {model!r} on {gpu_type!r}: {len(profile)} profiled step(s); the throughput "
            "model needs at least 3 (several GPU counts and local batch sizes)"
        )
    params, priors = fit_params(profile)
    err = relative_errors(params, profile)
    return FitResult(
        model=model,
        gpu_type=gpu_type,
        params=params,
        points=len(profile),
        median_rel_error=float(np.median(err)),
        max_rel_error=float(np.max(err)),
        max_local_bsz=float(np.max(profile.local_bsz)),
        priors=priors,
    )


def fit_cluster(
    profiles: Mapping[tuple[str, str], Profile], cluster: Cluster, source: str
) -> tuple[list[FitResult], list[str]]:
    """Fit every profiled (model, GPU type) whose type is in ``cluster``.

    Returns the fits (sorted by model, type) and the profiled types left out because the
    cluster lacks them; none fitted is an AllocationError naming ``source`` (the cluster's).
    """
    keys = sorted(k for k in profiles if k[1] in cluster.gpu_types)
    skipped = sorted({k[1] for k in profiles} - set(cluster.gpu_types))
    if not keys:
        raise AllocationError(
            f"{source}: none of the profiled GPU types ({', '.join(skipped)}) is in "
            f"the cluster ({', '.join(cluster.gpu_types)})"
        )
    return [fit(model, gpu, profiles[(model, gpu)]) for model, gpu in keys], skipped


def holdout_errors(profile: Profile, scheme: str = "every", every: int = 4) -> np.ndarray:
    """Relative throughput errors on configurations left out of the fit.

    A configuration is a (nodes, replicas) pair; ``scheme="every"`` holds out every
    ``every``-th one in order of replicas (interpolation), ``"largest"`` the ones with the
    largest replica count (extrapolation to the largest scale profiled).
    """
    keys = [(int(r), int(n)) for n, r in zip(profile.nodes, profile.replicas, strict=True)]
    configs = sorted(set(keys))
    if scheme == "every":
        test = {c for i, c in enumerate(configs) if i % every == every - 1}
    elif scheme == "largest":
        test = {c for c in configs if c[0] == configs[-1][0]}
    else:
        raise ValueError(f"unknown hold-out scheme {scheme!r}")
    is_test = np.array([key in test for key in keys])
    if is_test.all() or not is_test.any():
        return np.array([])
    params, _ = fit_params(profile.subset(~is_test))
    return relative_errors(params, profile.subset(is_test))


def _numeric(
    path: Path, row: int, name: str, text: str | None, integer: bool = False, zero: bool = False
) -> float:
    """The cell's value; an AllocationError naming file, row and column unless it is valid."""
    try:
        value = float(text) if text not in (None, "") else math.nan
    except ValueError:
        value = math.nan
    valid = value >= 0 if zero else value > 0
    if not valid or not math.isfinite(value) or (integer and value != int(value)):
        kind = "non-negative" if zero else "positive"
        kind += " integer" if integer else " number"
        raise AllocationError(
            f"{path}: row {row}: column {name!r}: expected a {kind}, got {text!r}"
        )
    return value


def read_profiles(paths: Iterable[str | os.PathLike[str]]) -> dict[tuple[str, str], Profile]:
    """Read profile CSVs (``model,gpu_type,nodes,replicas,local_batch,step_time[,sync_time]``).

    Rows of the same (model, GPU type) from several files are pooled.
    """
    columns: dict[tuple[str, str], dict[str, list[float]]] = {}
    for path in map(Path, paths):
        try:
            handle = path.open(newline="")
        except OSError as exc:
            raise AllocationError(f"{path}: cannot read the profile CSV: {exc}") from exc
        with handle:
            reader = csv.DictReader(handle)
            missing = [c for c in PROFILE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise AllocationError(
                    f"{path}: missing column(s) {', '.join(missing)}; expected "
                    f"{','.join(PROFILE_COLUMNS)}[,sync_time]"
                )
            for row_no, row in enumerate(reader, start=2):
                nodes = _numeric(path, row_no, "nodes", row["nodes"], integer=True)
                replicas = _numeric(path, row_no, "replicas", row["replicas"], integer=True)
                if replicas < nodes:
                    raise AllocationError(
                        f"{path}: row {row_no}: replicas ({replicas:g}) below nodes ({nodes:g}); "
                        "expected at least one replica per node"
                    )
                step = _numeric(path, row_no, "step_time", row["step_time"])
                sync_text = row.get("sync_time")
                sync = math.nan
                if sync_text not in (None, ""):
                    sync = _numeric(path, row_no, "sync_time", sync_text, zero=True)
                key = (row["model"].strip(), row["gpu_type"].strip())
                if not all(key):
                    raise AllocationError(f"{path}: row {row_no}: empty model or gpu_type")
                cols = columns.setdefault(key, {f: [] for f in Profile.__dataclass_fields__})
                cols["nodes"].append(nodes)
                cols["replicas"].append(replicas)
                cols["local_bsz"].append(_numeric(path, row_no, "local_batch", row["local_batch"]))
                cols["step_time"].append(step)
                cols["sync_time"].append(sync)
    return {
        key: Profile(**{f: np.array(v) for f, v in cols.items()}) for key, cols in columns.items()
    }


def read_scaling_data(model_dir: str | os.PathLike[str]) -> dict[tuple[str, str], Profile]:
    """Read a Pollux/Sia artifact directory: ``placements-<gpu>.csv`` and ``scalability-<gpu>.csv``.

    A placement string lists GPUs per node ("44": two nodes of four); the model is named after
    the directory.
    """
    model_dir = Path(model_dir)
    parts: dict[str, list[Profile]] = {}
    for path in sorted(model_dir.glob("*.csv")):
        match = re.fullmatch(r"(placements|scalability)-(.+)\.csv", path.name)
        if not match:
            continue
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if match[1] == "placements":
            nodes = [len(r["placement"]) for r in rows]
            replicas = [sum(int(d) for d in r["placement"]) for r in rows]
        else:
            nodes = [int(float(r["num_nodes"])) for r in rows]
            replicas = [int(float(r["num_replicas"])) for r in rows]
        parts.setdefault(match[2], []).append(
            Profile(
                nodes=np.array(nodes, float),
                replicas=np.array(replicas, float),
                local_bsz=np.array([float(r["local_bsz"]) for r in rows]),
                step_time=np.array([float(r["step_time"]) for r in rows]),
                sync_time=np.array([float(r["sync_time"] or "nan") for r in rows]),
            )
        )
    return {(model_dir.name, gpu): Profile.concat(p) for gpu, p in parts.items()}


def throughput_rows(
    fits: Iterable[FitResult],
    cluster: Cluster,
    *,
    local_batch: float | None = None,
    global_batch: float | None = None,
    accumulate: bool = False,
    max_gpus: int = MAX_GPUS_PER_JOB,
) -> list[dict[str, Any]]:
    """THR.csv rows for every fitted (model, GPU type) present in the cluster.

    Exactly one of ``local_batch`` (per GPU: the global batch grows with the GPUs) and
    ``global_batch`` (fixed: each of K GPUs gets global/K) must be given. With
    ``accumulate``, a local batch above the largest one profiled runs as gradient accumulation.
    """
    if (local_batch is None) == (global_batch is None):
        raise ValueError("give exactly one of local_batch and global_batch")
    rows = []
    for f in fits:
        pool = cluster.gpu_types.get(f.gpu_type)
        if pool is None:
            continue
        for config in candidate_configs(pool, max_gpus):
            local = local_batch if local_batch is not None else global_batch / config.gpus
            rate = throughput(
                f.params, config.nodes, config.gpus, local, f.max_local_bsz if accumulate else None
            )
            rows.append(
                {
                    "model": f.model,
                    "gpu_type": f.gpu_type,
                    "nodes": config.nodes,
                    "gpus": config.gpus,
                    "samples_per_s": float(rate),
                }
            )
    return rows


def write_throughput(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write THR.csv (``model,gpu_type,nodes,gpus,samples_per_s``) atomically."""
    formatted = ({**row, "samples_per_s": f"{row['samples_per_s']:.6g}"} for row in rows)
    write_csv(path, formatted, THR_COLUMNS)
