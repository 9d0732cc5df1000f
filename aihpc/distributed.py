"""Data-parallel Lightning training with one rank per Dask worker.

The driver (the Snakemake job) opens a Dask cluster — a ``LocalCluster`` of CPU worker
processes, a dask-cuda ``LocalCUDACluster`` with one worker per GPU, or an existing
scheduler reached by address or scheduler file (workers started by ``dask worker`` /
``dask cuda worker`` on each node, e.g. through ``srun``) — and submits one task per rank,
pinned to one worker. Each task calls the single-process entry point ``aihpc.train.fit``
with a ``DaskClusterEnvironment`` that tells Lightning its rank, the world size and the
rendezvous address; Lightning's DDP strategy then does the gradient averaging.

Data loading: every rank holds the preprocessed arrays in memory and Lightning's
``DistributedSampler`` gives it its shard of each epoch's permutation; batches are slices
of that in-memory tensor with ``num_workers=0`` (DataLoader worker processes cannot start
inside daemonic Dask workers, and slicing needs none).

Failure: the cluster runs with ``distributed.scheduler.allowed-failures: 0``, so a killed
worker fails its rank's task at once instead of retrying it forever; the surviving ranks
fail on the broken process group (or at the latest after ``timeout_s``). The driver then
raises ``RankFailure`` naming the rank. A rerun resumes from the last checkpoint (``fit``).
"""

from __future__ import annotations

import gc
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

from pytorch_lightning.plugins.environments import ClusterEnvironment

from aihpc.config import DistributedConfig, ModelConfig
from aihpc.errors import InputError
from aihpc.models import update_artifact_meta
from aihpc.train import TrainPaths, fit, resolve_accelerator

# How long the driver waits, after a first rank failure, for the other ranks to settle.
SETTLE_SECONDS = 10.0


class RankFailure(RuntimeError):
    """A rank of a data-parallel run failed or its worker was lost."""


class DaskClusterEnvironment(ClusterEnvironment):
    """Rank and rendezvous for one Dask-launched rank: one device per rank, each rank its own
    "node" (``node_rank = rank``, ``local_rank = 0``), processes created by Dask.

    The setters and ``validate_settings`` are strict: a Trainer configured for a different
    world size must fail, not silently train rank 0 alone.
    """

    def __init__(self, world_size: int, global_rank: int, main_address: str, main_port: int):
        super().__init__()
        self._world_size, self._global_rank = world_size, global_rank
        self._main_address, self._main_port = main_address, main_port

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return self._main_address

    @property
    def main_port(self) -> int:
        return self._main_port

    @staticmethod
    def detect() -> bool:
        # Never picked automatically: the launcher passes it explicitly.
        return False

    def world_size(self) -> int:
        return self._world_size

    def set_world_size(self, size: int) -> None:
        if size != self._world_size:
            raise RuntimeError(f"Trainer world size {size} != Dask world size {self._world_size}")

    def global_rank(self) -> int:
        return self._global_rank

    def set_global_rank(self, rank: int) -> None:
        if rank != self._global_rank:
            raise RuntimeError(f"Trainer global rank {rank} != Dask rank {self._global_rank}")

    def local_rank(self) -> int:
        return 0

    def node_rank(self) -> int:
        return self._global_rank

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        if num_devices != 1 or num_nodes != self._world_size:
            raise ValueError(
                f"a Dask-launched rank needs Trainer(devices=1, num_nodes={self._world_size}), "
                f"got devices={num_devices}, num_nodes={num_nodes}"
            )


@contextmanager
def dask_cluster(cfg: DistributedConfig, scratch_dir: Path) -> Iterator[Any]:
    """A ``distributed.Client`` on the cluster ``cfg`` asks for; local clusters are closed on
    exit, an external scheduler is only disconnected from."""
    import dask
    from distributed import Client, LocalCluster

    settings = {
        # A lost worker must fail its rank's task, not be retried on another worker forever.
        "distributed.scheduler.allowed-failures": 0,
        # The statistical profiler samples every thread's stack every 10 ms, taking the GIL
        # from the training thread each time.
        "distributed.worker.profile.enabled": False,
        # Every Dask event loop checks its own health every 20 ms; in a rank's worker each
        # check takes the GIL from the training thread (2-rank step 171 -> 161 ms at 1 s).
        "distributed.admin.tick.interval": "1s",
        # The nanny exports MALLOC_TRIM_THRESHOLD_=65536 to its workers (and into this
        # process's os.environ, hence into any process started from it later). In a process
        # that starts with it, glibc maps and unmaps every large tensor buffer on each step:
        # a 2-rank training step took 229 ms instead of 143 ms (docs/benchmarks.md).
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    }
    with dask.config.set(settings):
        if cfg.cluster == "connect":
            if cfg.scheduler_file:
                client = Client(scheduler_file=cfg.scheduler_file, timeout="60s")
            else:
                client = Client(cfg.scheduler_address, timeout="60s")
            try:
                client.wait_for_workers(cfg.workers, timeout=cfg.timeout_s)
                yield client
            finally:
                client.close()
            return
        scratch_dir.mkdir(parents=True, exist_ok=True)
        common = {
            "host": "127.0.0.1",  # loopback only
            "dashboard_address": None,
            "local_directory": str(scratch_dir),
        }
        if cfg.cluster == "cuda":
            cluster = _cuda_cluster(cfg.workers, common)
        else:
            # Fork, not spawn: a forked worker inherits the driver's imported torch and
            # Lightning (seconds per worker otherwise). Safe on CPU: the driver has run no
            # torch op, so no OpenMP pool or CUDA context is forked.
            with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}):
                cluster = LocalCluster(
                    n_workers=cfg.workers, threads_per_worker=1, processes=True, **common
                )
        with cluster, Client(cluster) as client:
            client.wait_for_workers(cfg.workers, timeout=cfg.timeout_s)
            yield client


def _cuda_cluster(workers: int, common: dict[str, Any]) -> Any:
    import torch

    visible = torch.cuda.device_count()
    if visible < workers:
        raise InputError(
            f"distributed.cluster is 'cuda' with {workers} workers, but torch sees "
            f"{visible} CUDA device(s); use cluster 'local' on CPU-only machines"
        )
    try:  # dask-cuda only exists on GPU installs (pip install 'aihpc[gpu]')
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise InputError(
            f"distributed.cluster 'cuda' needs dask-cuda (pip install 'aihpc[gpu]'): {exc}"
        ) from exc
    # One worker per GPU; dask-cuda rotates CUDA_VISIBLE_DEVICES so each sees its GPU as 0.
    return LocalCUDACluster(n_workers=workers, threads_per_worker=1, **common)


def rank_workers(client: Any, world_size: int) -> list[str]:
    """Worker addresses for ranks 0..world_size-1, ordered by host then address."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if len(workers) < world_size:
        raise RankFailure(f"{world_size} ranks need {world_size} Dask workers, have {len(workers)}")
    return sorted(workers, key=lambda address: (workers[address]["host"], address))[:world_size]


def free_port() -> int:
    """A free TCP port on this host (runs on rank 0's worker)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _run_rank(
    rank: int,
    world_size: int,
    main_address: str,
    main_port: int,
    paths: TrainPaths,
    model_cfg: ModelConfig,
    threads: int,
    timeout_s: float,
    extra_meta: dict[str, Any] | None,
) -> dict[str, Any]:
    """One rank, inside a Dask worker: train with DDP, then tear the process group down."""
    import torch
    import torch.distributed as dist
    from pytorch_lightning.strategies import DDPStrategy

    accelerator, _ = resolve_accelerator(model_cfg.train)
    env = DaskClusterEnvironment(world_size, rank, main_address, main_port)
    # The environment goes in through Trainer(plugins=[env]) (fit's ``env``), so Lightning
    # never falls back to SLURMEnvironment from inherited SLURM_* variables.
    strategy = DDPStrategy(
        process_group_backend="nccl" if accelerator == "gpu" else "gloo",
        timeout=timedelta(seconds=timeout_s),
    )
    started = time.perf_counter()
    try:
        record = fit(
            paths,
            model_cfg,
            threads=threads,
            env=env,
            strategy=strategy,
            num_nodes=world_size,
            extra_meta=extra_meta,
        )
    finally:
        # Lightning never destroys the process group; a worker runs later ranks too.
        # Drop the references first: destroying it under live DDP buffers can deadlock.
        strategy = None
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return {
        "rank": rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": torch.cuda.get_device_name(0) if accelerator == "gpu" else "cpu",
        "threads": threads,
        "steps": record["global_step"],
        "wall_seconds": round(time.perf_counter() - started, 3),
        "train_seconds": record["train_seconds"],
        "samples_per_s": record["samples_per_s"],
        "record": record,
    }


def fit_distributed(
    paths: TrainPaths,
    model_cfg: ModelConfig,
    cfg: DistributedConfig,
    *,
    threads: int,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model_cfg`` with ``cfg.workers`` DDP ranks on a Dask cluster.

    ``threads`` is the job's CPU budget, split evenly among the ranks (the Dask nanny
    would otherwise leave each rank one thread). Rank 0 writes the artifact and curves;
    the driver then adds the per-rank results (``ranks``) to the artifact's record and
    returns that record.
    """
    world_size = cfg.workers
    threads_per_rank = max(1, threads // world_size)
    started = time.perf_counter()
    with dask_cluster(cfg, Path(paths.work_dir) / "dask") as client:
        cluster_seconds = time.perf_counter() - started
        addresses = rank_workers(client, world_size)
        main_address = client.scheduler_info(n_workers=-1)["workers"][addresses[0]]["host"]
        main_port = client.submit(free_port, workers=[addresses[0]], pure=False).result()
        run_id = uuid.uuid4().hex[:8]
        futures = [
            client.submit(
                _run_rank,
                rank,
                world_size,
                main_address,
                main_port,
                paths,
                model_cfg,
                threads_per_rank,
                cfg.timeout_s,
                extra_meta,
                key=f"aihpc-rank-{rank}-{run_id}",
                workers=[address],
                allow_other_workers=False,
                pure=False,
            )
            for rank, address in enumerate(addresses)
        ]
        ranks = _gather_ranks(futures, addresses)
    for rank in ranks:
        rank.pop("record")
    return update_artifact_meta(
        paths.model_out,
        launcher=f"dask-{cfg.cluster}",
        cluster_start_seconds=round(cluster_seconds, 3),
        ranks=ranks,
    )


def train_model(
    paths: TrainPaths,
    model_cfg: ModelConfig,
    cfg: DistributedConfig,
    *,
    threads: int,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The train rule's entry point: one process for one worker, Dask DDP for several."""
    if cfg.workers == 1 and cfg.cluster == "local":
        return fit(paths, model_cfg, threads=threads, extra_meta=extra_meta)
    return fit_distributed(paths, model_cfg, cfg, threads=threads, extra_meta=extra_meta)


def _gather_ranks(futures: list[Any], addresses: list[str]) -> list[dict[str, Any]]:
    """Results of all ranks, or ``RankFailure`` naming the ranks that failed.

    When one rank fails the others follow within moments (broken process group), often
    before the scheduler has noticed a dead worker: wait briefly for all to settle, so the
    message names the rank that was lost, not only the survivor that noticed it first.
    """
    from distributed import as_completed, wait

    for future in as_completed(futures):
        if future.status == "error":
            with suppress(TimeoutError):
                wait(futures, timeout=SETTLE_SECONDS)
            failures = [
                f"rank {rank} (Dask worker {addresses[rank]}): "
                f"{type(f.exception()).__name__}: {f.exception()}"
                for rank, f in enumerate(futures)
                if f.status == "error"
            ]
            for other in futures:
                other.cancel()
            raise RankFailure("data-parallel training failed; " + "; ".join(failures))
    return [future.result() for future in futures]
