"""Throughput model: fitting, priors, prediction, readers, THR rows, and the shared-data check."""

from pathlib import Path

import numpy as np
import pytest

from aihpc.allocate import AllocationError, Cluster, GpuType, candidate_configs
from aihpc.allocate import model as tm

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scaling"
TRUE = tm.PerfParams(
    alpha_c=0.02, beta_c=0.0015, alpha_r=0.03, beta_r=0.004, alpha_n=0.08, beta_n=0.01, gamma=2.5
)
CONFIGS = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (2, 8), (2, 16), (4, 16), (4, 32)]


def synthetic(params: tm.PerfParams, configs=CONFIGS, with_sync: bool = False) -> tm.Profile:
    grid = np.array([(n, k, b) for n, k in configs for b in (16, 32, 64, 128, 256)], float)
    step = tm.step_time(params, grid[:, 0], grid[:, 1], grid[:, 2])
    compute = params.alpha_c + params.beta_c * grid[:, 2]
    sync = step - compute if with_sync else np.full(len(grid), np.nan)
    return tm.Profile(grid[:, 0], grid[:, 1], grid[:, 2], step, sync)


@pytest.mark.parametrize("with_sync", [False, True])
def test_fit_recovers_known_parameters(with_sync):
    params, priors = tm.fit_params(synthetic(TRUE, with_sync=with_sync))
    assert priors == ()
    for name in tm.PARAM_NAMES:
        assert getattr(params, name) == pytest.approx(getattr(TRUE, name), rel=0.01), name


def test_single_node_data_gets_the_inter_node_prior():
    single = [(n, k) for n, k in CONFIGS if n == 1]
    params, priors = tm.fit_params(synthetic(TRUE, single))
    assert any("multi-node" in p for p in priors)
    assert params.alpha_r == pytest.approx(TRUE.alpha_r, rel=0.01)
    assert params.alpha_n == pytest.approx(1.1 * params.alpha_r)
    assert params.beta_n == pytest.approx(1.1 * params.beta_r)


def test_fit_reports_errors_on_its_points():
    result = tm.fit("m", "gpu", synthetic(TRUE))
    assert result.median_rel_error < 1e-6 and result.max_rel_error < 1e-4
    assert result.max_local_bsz == 256
    with pytest.raises(AllocationError, match="'m' on 'gpu'"):
        tm.fit("m", "gpu", synthetic(TRUE).subset(np.arange(50) < 2))


def test_step_time_single_gpu_has_no_network_and_accumulation_adds_compute():
    assert tm.step_time(TRUE, 1, 1, 64) == pytest.approx(TRUE.alpha_c + TRUE.beta_c * 64)
    one = tm.step_time(TRUE, 2, 8, 32)
    two = tm.step_time(TRUE, 2, 8, 64, accum_steps=2)
    assert two == pytest.approx(one + TRUE.alpha_c + TRUE.beta_c * 32)
    # a local batch over the memory limit accumulates: same samples, more steps
    assert tm.throughput(TRUE, 2, 8, 64, max_local_bsz=32) == pytest.approx(8 * 64 / two)


def write_profile(path: Path, rows: list[str]) -> Path:
    path.write_text(
        "model,gpu_type,nodes,replicas,local_batch,step_time,sync_time\n"
        + "".join(r + "\n" for r in rows)
    )
    return path


def test_read_profiles_pools_files_and_validates(tmp_path):
    a = write_profile(tmp_path / "a.csv", ["m,t4,1,1,32,0.1,", "m,t4,1,2,32,0.12,0.02"])
    b = write_profile(tmp_path / "b.csv", ["m,t4,2,4,32,0.2,0.1", "n,t4,1,1,8,0.05,0"])
    profiles = tm.read_profiles([a, b])
    assert sorted(profiles) == [("m", "t4"), ("n", "t4")]
    m = profiles[("m", "t4")]
    assert list(m.replicas) == [1, 2, 4] and np.isnan(m.sync_time[0])
    bad = write_profile(tmp_path / "bad.csv", ["m,t4,1,1,32,-0.1,"])
    with pytest.raises(AllocationError, match=r"bad.csv: row 2: column 'step_time'"):
        tm.read_profiles([bad])
    bad.write_text("model,gpu_type,nodes\nm,t4,1\n")
    with pytest.raises(AllocationError, match=r"missing column.*replicas"):
        tm.read_profiles([bad])
    few = write_profile(tmp_path / "few.csv", ["m,t4,2,1,32,0.1,"])
    with pytest.raises(AllocationError, match=r"replicas .* below nodes"):
        tm.read_profiles([few])


def test_read_scaling_data_parses_placements(tmp_path):
    d = tmp_path / "cifar10"
    d.mkdir()
    (d / "placements-aws.csv").write_text(
        "placement,local_bsz,step_time,sync_time\n1,32,0.04,0.0005\n44,32,0.1,0.05\n"
    )
    (d / "scalability-aws.csv").write_text(
        "num_nodes,num_replicas,local_bsz,step_time,sync_time\n6,6,32,0.14,0.09\n"
    )
    (d / "validation-128.csv").write_text("progress,iteration,metric\n1,1,0.5\n")
    (profile,) = tm.read_scaling_data(d).values()
    assert list(profile.nodes) == [1, 2, 6] and list(profile.replicas) == [1, 8, 6]


def test_throughput_rows_cover_the_candidate_configurations():
    fit = tm.fit("m", "a", synthetic(TRUE))
    cluster = Cluster({"a": GpuType("a", 4, 8), "b": GpuType("b", 2, 4)})
    rows = tm.throughput_rows([fit], cluster, local_batch=64)
    assert [(r["nodes"], r["gpus"]) for r in rows] == [
        (c.nodes, c.gpus) for c in candidate_configs(cluster.gpu_types["a"])
    ]
    assert rows[0]["samples_per_s"] == pytest.approx(64 / tm.step_time(TRUE, 1, 1, 64))
    fixed = tm.throughput_rows([fit], cluster, global_batch=512)
    big = next(r for r in fixed if r["gpus"] == 16)
    assert big["samples_per_s"] == pytest.approx(512 / tm.step_time(TRUE, 2, 16, 32))
    with pytest.raises(ValueError):
        tm.throughput_rows([fit], cluster)


#: Measurements the linear-compute model cannot follow (see docs/benchmarks.md): NCF's step
#: time grows with the log of the batch, YOLOv3's is not monotone in it, and the Azure runs
#: on 3-5 nodes are up to 3x slower than on 2. Held to a looser 25 %.
NOISY = {("imagenet", "azure"), ("ncf", "azure"), ("yolov3", "azure"), ("yolov3", "dgx-ext")}


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared scaling data not found at {SHARED}")
def test_held_out_configurations_on_shared_scaling_data():
    """Every 4th (nodes, GPUs) configuration held out: median error <= 15 % per model/GPU."""
    pooled = []
    for model_dir in sorted(SHARED.iterdir()):
        if model_dir.name == "gpt_pmp":  # pipeline-parallel: not the data-parallel model
            continue
        for key, profile in tm.read_scaling_data(model_dir).items():
            errors = tm.holdout_errors(profile, "every", 4)
            pooled.append(errors)
            limit = 0.25 if key in NOISY else 0.15
            assert np.median(errors) <= limit, (key, np.median(errors))
    assert np.median(np.concatenate(pooled)) <= 0.15
