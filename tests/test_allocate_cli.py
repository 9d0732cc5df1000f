"""``aihpc fit`` and ``aihpc allocate`` end to end: files in, files and exit status out."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aihpc.allocate import model as tm
from aihpc.cli import EXIT_INFEASIBLE, main

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {
    "fast": tm.PerfParams(0.01, 0.0004, 0.02, 0.002, 0.06, 0.006, 2.0),
    "slow": tm.PerfParams(0.03, 0.0012, 0.02, 0.002, 0.06, 0.006, 2.0),
}


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Profiles of two models on two GPU types, a cluster, and a batch of jobs."""
    profiles = tmp_path / "profiles.csv"
    with profiles.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "gpu_type", "nodes", "replicas", "local_batch", "step_time"])
        for model, scale in (("resnet", 1.0), ("bert", 3.0)):
            for gpu, params in PARAMS.items():
                for nodes, replicas in ((1, 1), (1, 2), (1, 4), (2, 4), (2, 8)):
                    for batch in (16, 32, 64):
                        step = scale * tm.step_time(params, nodes, replicas, batch)
                        writer.writerow([model, gpu, nodes, replicas, batch, f"{step:.6g}"])
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "gpu_types:\n  fast: {nodes: 2, gpus_per_node: 4}\n  slow: {nodes: 2, gpus_per_node: 8}\n"
    )
    jobs = tmp_path / "jobs.csv"
    rng = np.random.default_rng(0)
    rows = [f"j{i},{'resnet' if i % 3 else 'bert'},{rng.uniform(1e5, 1e6):.0f}\n" for i in range(8)]
    jobs.write_text("name,model,samples\n" + "".join(rows))
    return {"profiles": profiles, "cluster": cluster, "jobs": jobs, "dir": tmp_path}


def fit(inputs) -> Path:
    thr = inputs["dir"] / "thr.csv"
    params = inputs["dir"] / "params.json"
    args = ["fit", "--profiles", str(inputs["profiles"]), "--cluster", str(inputs["cluster"])]
    assert main([*args, "--local-batch", "32", "--out", str(thr), "--params-out", str(params)]) == 0
    fits = json.loads(params.read_text())["fits"]
    assert len(fits) == 4 and all(f["median_rel_error"] < 1e-3 for f in fits)
    return thr


def allocate(inputs, thr: Path, *extra: str) -> list[str]:
    return [
        "allocate",
        "--jobs",
        str(inputs["jobs"]),
        "--throughput",
        str(thr),
        "--cluster",
        str(inputs["cluster"]),
        "--out",
        str(inputs["dir"] / "plan.json"),
        *extra,
    ]


def test_fit_then_allocate_round_trip(inputs, capsys):
    thr = fit(inputs)
    rows = list(csv.DictReader(thr.open()))
    assert {r["gpu_type"] for r in rows} == {"fast", "slow"}
    assert {(r["nodes"], r["gpus"]) for r in rows if r["gpu_type"] == "fast"} == {
        ("1", "1"),
        ("1", "2"),
        ("1", "4"),
        ("2", "8"),
    }
    gantt = inputs["dir"] / "gantt.png"
    for objective in ("makespan", "sum", "gpu-hours"):
        args = allocate(inputs, thr, "--objective", objective, "--gantt", str(gantt))
        assert main([*args, "--deadline", "1e6"]) == 0
        plan = json.loads((inputs["dir"] / "plan.json").read_text())
        assert plan["status"] == "optimal" and plan["objective"] == objective
        assert plan["makespan_s"] <= 1e6
        assert len(plan["jobs"]) == 8
        for job in plan["jobs"]:
            assert job["end_s"] - job["start_s"] > 0 and job["gpu_type"] in ("fast", "slow")
    assert (inputs["dir"] / "plan.csv").exists() and gantt.exists()
    assert "optimal gpu-hours plan" in capsys.readouterr().out
    assert main([*allocate(inputs, thr), "--shape", "list", "--solver", "highs"]) == 0
    plan = json.loads((inputs["dir"] / "plan.json").read_text())
    assert plan["schedule"] == "list" and plan["makespan_lower_bound_s"] <= plan["makespan_s"]


def test_infeasible_and_bad_input_exit_codes(inputs, capsys):
    thr = fit(inputs)
    capsys.readouterr()
    assert main([*allocate(inputs, thr), "--deadline", "1"]) == EXIT_INFEASIBLE
    err = capsys.readouterr().err
    assert err.startswith("error: no feasible plan") and "'j0'" in err and "1 s" in err
    assert main([*allocate(inputs, thr), "--budget", "1e-9"]) == EXIT_INFEASIBLE
    assert "budget" in capsys.readouterr().err
    inputs["jobs"].write_text("name,model,samples\nx,resnet,-5\n")
    assert main(allocate(inputs, thr)) == 1
    assert "column 'samples'" in capsys.readouterr().err
    inputs["jobs"].write_text("name,model,samples\nx,resnet,5\n")
    inputs["cluster"].write_text("gpu_types: {fast: {nodes: 0, gpus_per_node: 4}}\n")
    assert main(allocate(inputs, thr)) == 1
    assert "gpu_types.fast.nodes" in capsys.readouterr().err
    assert not (inputs["dir"] / "plan.json").exists()


def test_entry_point_runs_as_a_module(inputs):
    thr = fit(inputs)
    done = subprocess.run(
        [sys.executable, "-m", "aihpc.cli", *allocate(inputs, thr), "--solver", "highs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((inputs["dir"] / "plan.json").read_text())["solver"] == "highs"
