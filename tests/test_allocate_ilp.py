"""The allocation program against brute force, capacity, infeasibility messages, solvers, I/O."""

import itertools
import json
import math
import re

import numpy as np
import pytest

from aihpc.allocate import Cluster, GpuType, InfeasibleError, candidate_configs
from aihpc.allocate import model as tm
from aihpc.allocate.ilp import (
    Job,
    job_options,
    plan,
    read_jobs,
    read_throughput,
    relaxation_bound,
    write_plan,
)
from aihpc.allocate.simulate import (
    equal_share_policy,
    greedy_policy,
    plan_policy,
    rigid_policy,
    simulate,
    summarize,
)

TINY = Cluster({"a": GpuType("a", 2, 4), "b": GpuType("b", 1, 2)})  # 10 GPUs


def throughputs(cluster: Cluster, models: int, seed: int) -> dict:
    """THR rows from random Pollux parameters: type 'b' is faster per GPU than 'a'."""
    rng = np.random.default_rng(seed)
    thr = {}
    for m in range(models):
        params = tm.PerfParams(
            alpha_c=rng.uniform(0.01, 0.05),
            beta_c=rng.uniform(1e-4, 1e-3),
            alpha_r=rng.uniform(0.005, 0.05),
            beta_r=rng.uniform(1e-4, 5e-3),
            alpha_n=rng.uniform(0.05, 0.2),
            beta_n=rng.uniform(1e-3, 1e-2),
            gamma=rng.uniform(1, 3),
        )
        for name, pool in cluster.gpu_types.items():
            speed = 1.0 if name == "a" else 1.7
            for c in candidate_configs(pool):
                rate = tm.throughput(params, c.nodes, c.gpus, 64) * speed
                thr[(f"m{m}", name, c.nodes, c.gpus)] = float(rate)
    return thr


def random_jobs(n: int, seed: int, **extra) -> list[Job]:
    rng = np.random.default_rng(seed)
    return [
        Job(
            f"j{i}",
            f"m{rng.integers(2)}",
            float(rng.uniform(2e5, 2e6)),
            weight=float(rng.uniform(0.5, 2)),
            **extra,
        )
        for i in range(n)
    ]


def choices(job: Job, thr: dict, cluster: Cluster) -> list[tuple]:
    """Every candidate configuration of the job with its duration: no pruning."""
    return [
        (c, job.samples / thr[(job.model, t, c.nodes, c.gpus)])
        for t, pool in cluster.gpu_types.items()
        for c in candidate_configs(pool)
        if c.gpus >= job.min_gpus and (job.model, t, c.nodes, c.gpus) in thr
    ]


def value(jobs, combo, objective) -> float:
    durations = [d for _, d in combo]
    if objective == "makespan":
        return max(durations)
    if objective == "sum":
        return sum(j.weight * d for j, d in zip(jobs, durations, strict=True))
    return sum(c.gpus * d for c, d in combo) / 3600


def side_by_side(combo, cluster: Cluster) -> bool:
    """All at once: GPUs per type, and configurations over half a node take whole nodes."""
    for t, pool in cluster.gpu_types.items():
        mine = [c for c, _ in combo if c.gpu_type == t]
        whole = sum(c.nodes for c in mine if c.nodes > 1 or 2 * c.gpus > pool.gpus_per_node)
        if sum(c.gpus for c in mine) > pool.gpus or whole > pool.nodes:
            return False
    return True


def brute_force_one_wave(jobs, thr, cluster, objective, deadline=None, budget=None) -> float:
    best = math.inf
    for combo in itertools.product(*(choices(j, thr, cluster) for j in jobs)):
        if not side_by_side(combo, cluster):
            continue
        if deadline is not None and max(d for _, d in combo) > deadline:
            continue
        if budget is not None and value(jobs, combo, "gpu-hours") > budget:
            continue
        best = min(best, value(jobs, combo, objective))
    return best


def busy_within_capacity(result, cluster: Cluster) -> bool:
    """At every start, the GPUs in use per type fit the type (a plan or a list of runs)."""
    jobs = result if isinstance(result, list) else result.jobs
    for moment in {a.start_s for a in jobs}:
        for t, pool in cluster.gpu_types.items():
            running = [a for a in jobs if a.config.gpu_type == t and a.start_s <= moment < a.end_s]
            if sum(a.config.gpus for a in running) > pool.gpus:
                return False
    return True


@pytest.mark.parametrize("objective", ["makespan", "sum", "gpu-hours"])
@pytest.mark.parametrize("seed", range(6))
def test_one_wave_optimum_equals_brute_force(objective, seed):
    jobs = random_jobs(2 + seed % 3, seed)
    thr = throughputs(TINY, 2, seed)
    budget = None
    if seed % 2:  # half the cases: a budget between the cheapest and the dearest plans
        cheap = brute_force_one_wave(jobs, thr, TINY, "gpu-hours")
        budget = cheap * 1.3
    best = brute_force_one_wave(jobs, thr, TINY, objective, budget=budget)
    result = plan(jobs, thr, TINY, objective, budget=budget)
    assert result.schedule == "one-wave"
    assert result.status == "optimal"
    assert result.objective_value == pytest.approx(best, rel=2e-4)
    assert all(a.start_s == 0 for a in result.jobs)
    assert busy_within_capacity(result, TINY)
    if budget is not None:
        assert result.gpu_hours <= budget * (1 + 1e-9)


@pytest.mark.parametrize("objective", ["sum", "gpu-hours"])
@pytest.mark.parametrize("seed", range(4))
def test_list_mode_optimum_equals_brute_force(objective, seed):
    """Four jobs of at least 4 GPUs on 10 GPUs run in succession; a budget binds the sum."""
    jobs = [
        Job(j.name, j.model, j.samples, min_gpus=4, weight=j.weight) for j in random_jobs(4, seed)
    ]
    thr = throughputs(TINY, 2, seed)
    every = list(itertools.product(*(choices(j, thr, TINY) for j in jobs)))
    cheapest = min(value(jobs, c, "gpu-hours") for c in every)
    budget = cheapest * 1.2
    best = min(value(jobs, c, objective) for c in every if value(jobs, c, "gpu-hours") <= budget)
    result = plan(jobs, thr, TINY, objective, budget=budget)
    assert result.schedule == "list"
    assert result.objective_value == pytest.approx(best, rel=2e-4)
    assert busy_within_capacity(result, TINY)


def brute_force_list_makespan(jobs, thr, cluster) -> float:
    """The shortest list schedule over every configuration and every order."""
    best = math.inf
    for combo in itertools.product(*(choices(j, thr, cluster) for j in jobs)):
        configs = {j.name: c for j, c in zip(jobs, combo, strict=True)}
        for order in itertools.permutations(configs):
            best = min(best, max(r.end_s for r in simulate(cluster, order, plan_policy(configs))))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_list_mode_makespan_matches_brute_force_schedules(seed):
    """Four jobs of at least 4 GPUs on 10 GPUs: every configuration and every list order."""
    jobs = random_jobs(4, seed, min_gpus=4)
    thr = throughputs(TINY, 2, seed)
    best = brute_force_list_makespan(jobs, thr, TINY)
    result = plan(jobs, thr, TINY, "makespan")
    assert result.schedule == "list" and busy_within_capacity(result, TINY)
    assert result.makespan_lower_bound_s <= best
    assert result.makespan_s == pytest.approx(best, rel=1e-9)
    plain = relaxation_bound(jobs, thr, TINY)
    assert plain <= relaxation_bound(jobs, thr, TINY, cuts=True) <= best * (1 + 1e-9)


def test_bounds_with_cuts_stay_below_every_schedule_and_tighten():
    """Four jobs of any width on 10 GPUs: the bounds never pass the best list schedule,
    and the cuts' LP bound is above the plain LP bound where that one is loose."""
    tighter = 0
    for seed in range(8):
        jobs = random_jobs(4, seed)
        thr = throughputs(TINY, 2, seed)
        best = brute_force_list_makespan(jobs, thr, TINY)
        plain = relaxation_bound(jobs, thr, TINY)
        cuts = relaxation_bound(jobs, thr, TINY, cuts=True)
        result = plan(jobs, thr, TINY, "makespan", shape="list")
        assert plain <= cuts <= best * (1 + 1e-9), seed
        assert result.makespan_lower_bound_s <= best * (1 + 1e-9), seed
        assert result.makespan_s >= best * (1 - 1e-9)
        tighter += cuts > plain * 1.01
    assert tighter >= 2


def test_list_plan_replays_in_its_priority_order():
    """The local search reorders each type's queue: the plan's priorities say how."""
    cluster = Cluster({"a": GpuType("a", 2, 8), "b": GpuType("b", 2, 4)})
    thr = throughputs(cluster, 2, 16)
    jobs = random_jobs(40, 16)
    result = plan(jobs, thr, cluster, "makespan", solver="highs")
    assert result.schedule == "list" and busy_within_capacity(result, cluster)
    configs = {a.name: (a.config, a.end_s - a.start_s) for a in result.jobs}
    order = [a.name for a in sorted(result.jobs, key=lambda a: a.priority)]
    runs = {r.name: r for r in simulate(cluster, order, plan_policy(configs))}
    for a in result.jobs:
        assert (runs[a.name].start_s, runs[a.name].end_s) == (a.start_s, a.end_s), a.name
    # here the order matters: longest first, the same configurations end later
    longest = sorted(configs, key=lambda name: -configs[name][1])
    lpt = simulate(cluster, longest, plan_policy(configs))
    assert max(r.end_s for r in lpt) > result.makespan_s * 1.02


def test_capacity_and_deadlines_hold_on_a_larger_batch():
    cluster = Cluster({"a": GpuType("a", 2, 8), "b": GpuType("b", 2, 4)})
    thr = throughputs(cluster, 2, 7)
    jobs = random_jobs(30, 7)
    due = {j.name: 2e4 for j in jobs[:5]}
    jobs = [Job(j.name, j.model, j.samples, deadline_s=due.get(j.name)) for j in jobs]
    for objective in ("makespan", "sum", "gpu-hours"):
        result = plan(jobs, thr, cluster, objective, deadline=6e4, solver="highs")
        assert result.schedule == "list"
        assert busy_within_capacity(result, cluster)
        assert all(a.end_s <= due.get(a.name, 6e4) * (1 + 1e-9) for a in result.jobs)


def test_highs_and_cbc_agree():
    cluster = Cluster({"a": GpuType("a", 2, 8), "b": GpuType("b", 1, 4)})
    thr = throughputs(cluster, 2, 3)
    jobs = random_jobs(6, 3)
    for objective in ("makespan", "sum", "gpu-hours"):
        cbc = plan(jobs, thr, cluster, objective, solver="cbc")
        highs = plan(jobs, thr, cluster, objective, solver="highs")
        assert cbc.objective_value == pytest.approx(highs.objective_value, rel=2e-4)


def test_pruning_keeps_only_faster_larger_configurations():
    thr = throughputs(TINY, 1, 0)
    thr[("m0", "a", 2, 8)] = thr[("m0", "a", 1, 4)] * 0.9  # 8 GPUs slower than 4
    (job,) = random_jobs(1, 0)
    job = Job(job.name, "m0", job.samples)
    configs = [(o.config.gpu_type, o.config.gpus) for o in job_options(job, thr, TINY)]
    assert ("a", 8) not in configs and ("a", 4) in configs and ("b", 2) in configs


def infeasible(jobs, thr, cluster=TINY, **kwargs) -> str:
    with pytest.raises(InfeasibleError) as err:
        plan(jobs, thr, cluster, kwargs.pop("objective", "makespan"), **kwargs)
    return str(err.value)


def test_infeasible_inputs_name_jobs_and_constraints():
    thr = throughputs(TINY, 2, 1)
    jobs = random_jobs(3, 1)
    big = [*jobs[:2], Job("huge", "m0", 1e6, min_gpus=100)]
    assert "'huge'" in (m := infeasible(big, thr)) and "min_gpus 100" in m
    assert "'ghost'" in infeasible([Job("ghost", "nope", 1e6)], thr)
    assert "gpu_types x" in infeasible([Job("typo", "m0", 1e6, gpu_types=("x",))], thr)
    message = infeasible(jobs, thr, deadline=1.0)
    assert "must end by 1 s" in message and all(f"'{j.name}'" in message for j in jobs)
    message = infeasible(jobs, thr, budget=1e-6)
    assert "budget 1e-06 GPU-hours" in message and "cheapest" in message


def test_infeasible_combinations_are_diagnosed_after_solving():
    thr = throughputs(TINY, 2, 2)
    jobs = [Job(f"j{i}", "m0", 2e6) for i in range(8)]
    alone = min(d for _, d in choices(jobs[0], thr, TINY))
    # each job meets the deadline alone, all eight cannot
    message = infeasible(jobs, thr, deadline=alone * 1.5)
    assert "deadline" in message and "cannot be met" in message
    # meeting a deadline needs wide (dear) configurations: a budget above the cheapest plan
    # but below the cheapest plan that meets the deadline
    slow = max(d for c, d in choices(jobs[0], thr, TINY) if c.gpus == 1)
    deadline = slow * 1.1
    need = plan(jobs, thr, TINY, "gpu-hours", deadline=deadline).objective_value
    cheap = sum(min(c.gpus * d for c, d in choices(j, thr, TINY)) for j in jobs) / 3600
    assert need > cheap * 1.01
    message = infeasible(jobs, thr, deadline=deadline, budget=(cheap + need) / 2)
    found = re.search(r"a plan meeting the deadlines needs at least ([0-9.]+) GPU-hours", message)
    assert found and (cheap + need) / 2 < float(found[1]) <= need * (1 + 1e-3)
    # jobs with their own deadline that cannot all fit before it
    due = [Job(j.name, j.model, j.samples, deadline_s=alone * 1.5) for j in jobs]
    message = infeasible(due, thr)
    assert "deadline <= " in message and "'j0'" in message


def test_read_jobs_and_throughput(tmp_path):
    path = tmp_path / "jobs.csv"
    path.write_text(
        "name,model,samples,min_gpus,max_gpus,weight,deadline_s,gpu_types\n"
        "a,m0,1e6,,,,,\n"
        "b,m1,2000,2,8,3,3600,a;b\n"
    )
    a, b = read_jobs(path)
    assert a == Job("a", "m0", 1e6)
    assert b == Job("b", "m1", 2000, 2, 8, 3.0, 3600.0, ("a", "b"))
    path.write_text("name,model,samples,min_gpus\nc,m0,10,0\n")
    with pytest.raises(ValueError, match="row 2: column 'min_gpus'"):
        read_jobs(path)
    path.write_text("name,model\nc,m0\n")
    with pytest.raises(ValueError, match=r"missing column.*samples"):
        read_jobs(path)
    thr_path = tmp_path / "thr.csv"
    thr_path.write_text("model,gpu_type,nodes,gpus,samples_per_s\nm0,a,1,2,10.5\n")
    assert read_throughput(thr_path) == {("m0", "a", 1, 2): 10.5}
    thr_path.write_text("model,gpu_type,nodes,gpus,samples_per_s\nm0,a,1,2,-1\n")
    with pytest.raises(ValueError, match="samples_per_s"):
        read_throughput(thr_path)


def test_write_plan_outputs(tmp_path):
    thr = throughputs(TINY, 2, 4)
    result = plan(random_jobs(3, 4), thr, TINY, "sum")
    csv_path = write_plan(result, tmp_path / "plan.json", tmp_path / "gantt.png")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["objective"] == "sum" and data["status"] == "optimal"
    assert {"makespan_s", "gpu_hours", "solve_seconds", "jobs", "waves"} <= set(data)
    assert data["jobs"][0].keys() >= {"name", "gpu_type", "nodes", "gpus", "start_s", "end_s"}
    assert len(csv_path.read_text().splitlines()) == 4
    assert (tmp_path / "gantt.png").read_bytes()[:4] == b"\x89PNG"


def test_list_mode_makespan_respects_a_budget():
    cluster = Cluster({"a": GpuType("a", 2, 8), "b": GpuType("b", 2, 4)})
    thr = throughputs(cluster, 2, 5)
    jobs = random_jobs(40, 5)
    free = plan(jobs, thr, cluster, "makespan", solver="highs")
    cheap = plan(jobs, thr, cluster, "gpu-hours", solver="highs").objective_value
    assert free.schedule == "list" and free.gpu_hours > cheap * 1.02
    budget = (cheap + free.gpu_hours) / 2
    tight = plan(jobs, thr, cluster, "makespan", budget=budget, solver="highs")
    assert tight.gpu_hours <= budget * (1 + 1e-9)
    assert tight.makespan_s >= free.makespan_lower_bound_s


def test_baselines_run_every_job_once_within_capacity():
    cluster = Cluster({"a": GpuType("a", 2, 8), "b": GpuType("b", 2, 4)})
    thr = throughputs(cluster, 2, 6)
    jobs = {j.name: j for j in random_jobs(12, 6)}

    def duration(name, config):
        job = jobs[name]
        key = (job.model, config.gpu_type, config.nodes, config.gpus)
        if key not in thr:  # a rigid count outside the candidates: scale the nearest below
            below = max(
                (k for k in thr if k[:2] == key[:2] and k[3] <= config.gpus), key=lambda k: k[3]
            )
            return job.samples / (thr[below] * config.gpus / below[3])
        return job.samples / thr[key]

    requested = {name: 3 + i % 6 for i, name in enumerate(jobs)}
    for policy in (
        rigid_policy(cluster, requested, duration),
        equal_share_policy(cluster, duration),
        greedy_policy(cluster, duration),
    ):
        runs = simulate(cluster, list(jobs), policy)
        assert sorted(r.name for r in runs) == sorted(jobs)
        assert busy_within_capacity(runs, cluster)
        assert summarize(runs).makespan_s == max(r.end_s for r in runs)
    rigid = simulate(cluster, list(jobs), rigid_policy(cluster, requested, duration))
    assert all(r.config.gpus == requested[r.name] for r in rigid)
