"""Executing allocations on a cluster's nodes: list scheduling of a plan, and baseline policies.

The simulator is event driven: whenever jobs finish (and at time 0) a *policy* starts waiting
jobs on free GPUs; a started job holds its GPUs until it ends (no preemption, no migration).
Placement is node-aware: a single-node job takes GPUs of one node (best fit, keeping whole
nodes free for multi-node jobs), a job on n nodes takes about k/n GPUs on each of n nodes.

Policies:

- :func:`plan_policy` — the allocator's plan: fixed configurations, started in the plan's
  order, a later job starting first whenever it fits (list scheduling with backfilling);
- :func:`rigid_policy` — each job's own GPU count (the user's hand-tuned choice);
- :func:`equal_share_policy` — the free GPUs split evenly among the waiting jobs;
- :func:`greedy_policy` — Optimus-style: one GPU each, then GPUs go one config step at a time
  to the job whose duration drops most per added GPU.

In the last three a job runs on whichever GPU type fits and is fastest when it starts.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from aihpc.allocate import MAX_GPUS_PER_JOB, AllocationError, Cluster, Config, candidate_configs

#: (job name, configuration) -> predicted seconds to finish the job's samples.
DurationFn = Callable[[str, Config], float]
Placement = list[tuple[int, int]]  # (node index, GPUs taken there)


@dataclass(frozen=True)
class Run:
    """One job's execution: configuration and the interval it held its GPUs."""

    name: str
    config: Config
    start_s: float
    end_s: float


class ClusterState:
    """Free GPUs of every node, by pool."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.free = {name: [t.gpus_per_node] * t.nodes for name, t in cluster.gpu_types.items()}
        self.free_total = {name: t.gpus for name, t in cluster.gpu_types.items()}

    def find(self, config: Config) -> Placement | None:
        """Where ``config`` fits now (best fit per node), or None."""
        free = self.free.get(config.gpu_type)
        if free is None or config.gpus > self.free_total[config.gpu_type]:
            return None
        base, extra = divmod(config.gpus, config.nodes)
        needs = [base + 1] * extra + [base] * (config.nodes - extra)
        used: set[int] = set()
        placement = []
        for need in needs:  # largest need first; each on the fullest node that still fits
            best = -1
            for i, f in enumerate(free):
                if f >= need and i not in used and (best < 0 or f < free[best]):
                    best = i
            if best < 0:
                return None
            used.add(best)
            placement.append((best, need))
        return placement

    def take(self, config: Config, placement: Placement) -> None:
        for node, gpus in placement:
            self.free[config.gpu_type][node] -= gpus
        self.free_total[config.gpu_type] -= config.gpus

    def give(self, config: Config, placement: Placement) -> None:
        for node, gpus in placement:
            self.free[config.gpu_type][node] += gpus
        self.free_total[config.gpu_type] += config.gpus

    def try_start(self, config: Config) -> Placement | None:
        placement = self.find(config)
        if placement is not None:
            self.take(config, placement)
        return placement


#: Starts waiting jobs now: (now, waiting names in queue order, state) -> started
#: (name, config, placement, duration); it must take the GPUs from ``state`` itself.
Policy = Callable[[float, Sequence[str], ClusterState], list[tuple[str, Config, Placement, float]]]


def simulate(cluster: Cluster, names: Sequence[str], policy: Policy) -> list[Run]:
    """Run every job of ``names`` (queue order) under ``policy``; runs in start order."""
    state = ClusterState(cluster)
    waiting = list(names)
    running: list[tuple[float, int, Config, Placement]] = []
    runs = []
    now = 0.0
    while waiting or running:
        started = policy(now, waiting, state) if waiting else []
        done = {name for name, *_ in started}
        waiting = [name for name in waiting if name not in done]
        for name, config, placement, duration in started:
            heapq.heappush(running, (now + duration, len(runs), config, placement))
            runs.append(Run(name, config, now, now + duration))
        if not running:
            raise AllocationError(
                f"job(s) {', '.join(waiting[:5])} never fit on the cluster's free GPUs"
            )
        now = running[0][0]
        while running and running[0][0] <= now:
            _, _, config, placement = heapq.heappop(running)
            state.give(config, placement)
    return runs


def plan_policy(configs: Mapping[str, tuple[Config, float]]) -> Policy:
    """List scheduling of fixed (config, duration) per job: any waiting job that fits starts.

    Keeps a queue per GPU type (types do not compete), so one policy serves one simulation.
    """
    queues: dict[str, list[str]] = {}

    def start(now: float, waiting: Sequence[str], state: ClusterState) -> list:
        if not queues:  # the first call sees every job, in queue order
            for name in waiting:
                queues.setdefault(configs[name][0].gpu_type, []).append(name)
        started = []
        for gpu_type, queue in queues.items():
            left = []
            for i, name in enumerate(queue):
                if not state.free_total[gpu_type]:
                    left += queue[i:]
                    break
                config, duration = configs[name]
                placement = state.try_start(config)
                if placement is None:
                    left.append(name)
                else:
                    started.append((name, config, placement, duration))
            queues[gpu_type] = left
        return started

    return start


def _pool_config(pool_nodes: int, gpus_per_node: int, gpu_type: str, gpus: int) -> Config | None:
    """``gpus`` GPUs of a pool on as few nodes as possible, or None where the pool is too small."""
    nodes = math.ceil(gpus / gpus_per_node)
    return Config(gpu_type, nodes, gpus) if nodes <= pool_nodes else None


def rigid_policy(cluster: Cluster, requested: Mapping[str, int], duration: DurationFn) -> Policy:
    """Each job on exactly its requested GPU count, FIFO with backfilling, fastest type first."""
    options = {}
    for name, gpus in requested.items():
        configs = [
            c
            for t in cluster.gpu_types.values()
            if (c := _pool_config(t.nodes, t.gpus_per_node, t.name, gpus)) is not None
        ]
        if not configs:
            raise AllocationError(f"job {name!r}: {gpus} GPUs exceed every GPU type's pool")
        options[name] = sorted(((duration(name, c), c) for c in configs), key=lambda p: p[0])

    def start(now: float, waiting: Sequence[str], state: ClusterState) -> list:
        started = []
        for name in waiting:
            if not any(state.free_total.values()):
                break
            for seconds, config in options[name]:
                placement = state.try_start(config)
                if placement is not None:
                    started.append((name, config, placement, seconds))
                    break
        return started

    return start


def _sia_configs(cluster: Cluster, max_gpus: int) -> list[Config]:
    return [c for t in cluster.gpu_types.values() for c in candidate_configs(t, max_gpus)]


def equal_share_policy(
    cluster: Cluster, duration: DurationFn, max_gpus: int = MAX_GPUS_PER_JOB
) -> Policy:
    """Free GPUs divided evenly among the waiting jobs (FIFO), each on its fastest fitting type."""
    configs = _sia_configs(cluster, max_gpus)

    def start(now: float, waiting: Sequence[str], state: ClusterState) -> list:
        started = []
        free = sum(state.free_total.values())
        share = max(1, free // max(len(waiting), 1))
        for name in waiting:
            if not any(state.free_total.values()):
                break
            fitting = [
                c
                for c in configs
                if c.gpus <= min(share, state.free_total[c.gpu_type]) and state.find(c) is not None
            ]
            if not fitting:
                continue
            most = max(c.gpus for c in fitting)
            seconds, config = min(
                ((duration(name, c), c) for c in fitting if c.gpus == most), key=lambda p: p[0]
            )
            started.append((name, config, state.try_start(config), seconds))
        return started

    return start


def greedy_policy(
    cluster: Cluster, duration: DurationFn, max_gpus: int = MAX_GPUS_PER_JOB
) -> Policy:
    """Optimus-style marginal gain among the jobs waiting now (no preemption of running ones).

    One GPU each (FIFO, fastest type with a free GPU) while GPUs last; then, repeatedly, the
    job whose duration falls most per extra GPU moves to a larger configuration (the next
    size up on any type with the GPUs free). Jobs are then placed largest first; one that
    the nodes cannot hold (fragmentation) falls back to smaller configurations of its type.
    """
    configs = _sia_configs(cluster, max_gpus)

    def start(now: float, waiting: Sequence[str], state: ClusterState) -> list:
        free = dict(state.free_total)
        chosen: dict[str, Config] = {}
        for name in waiting:
            single = [c for c in configs if c.gpus == 1 and free[c.gpu_type] > 0]
            if not single:
                break
            chosen[name] = min(single, key=lambda c: duration(name, c))
            free[chosen[name].gpu_type] -= 1

        def upgrade(name: str) -> tuple[float, Config] | None:
            now_c = chosen[name]
            best = None
            for t in cluster.gpu_types:
                room = free[t] + (now_c.gpus if t == now_c.gpu_type else 0)
                larger = [c for c in configs if c.gpu_type == t and now_c.gpus < c.gpus <= room]
                if larger:
                    c = min(larger, key=lambda c: c.gpus)
                    gain = (duration(name, now_c) - duration(name, c)) / (c.gpus - now_c.gpus)
                    if gain > 0 and (best is None or gain > best[0]):
                        best = (gain, c)
            return best

        heap = [(-u[0], name) for name in chosen if (u := upgrade(name)) is not None]
        heapq.heapify(heap)
        while heap:
            gain, name = heapq.heappop(heap)
            u = upgrade(name)  # free GPUs changed since it was pushed
            if u is None:
                continue
            if -u[0] > gain + 1e-12:
                heapq.heappush(heap, (-u[0], name))
                continue
            free[chosen[name].gpu_type] += chosen[name].gpus
            chosen[name] = u[1]
            free[u[1].gpu_type] -= u[1].gpus
            if (u := upgrade(name)) is not None:
                heapq.heappush(heap, (-u[0], name))
        started = []
        for name in sorted(chosen, key=lambda n: -chosen[n].gpus):
            target = chosen[name]
            fallback = [
                c for c in configs if c.gpu_type == target.gpu_type and c.gpus <= target.gpus
            ]
            for config in sorted(fallback, key=lambda c: -c.gpus):
                placement = state.try_start(config)
                if placement is not None:
                    started.append((name, config, placement, duration(name, config)))
                    break
        return started

    return start


@dataclass(frozen=True)
class Outcome:
    """Summary of a simulated execution (all jobs submitted at time 0)."""

    makespan_s: float
    mean_duration_s: float
    mean_completion_s: float
    gpu_hours: float


def summarize(runs: Sequence[Run]) -> Outcome:
    return Outcome(
        makespan_s=max(r.end_s for r in runs),
        mean_duration_s=sum(r.end_s - r.start_s for r in runs) / len(runs),
        mean_completion_s=sum(r.end_s for r in runs) / len(runs),
        gpu_hours=sum((r.end_s - r.start_s) * r.config.gpus for r in runs) / 3600,
    )
