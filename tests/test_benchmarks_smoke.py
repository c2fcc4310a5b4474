"""The benchmark runner at its smallest size, so it cannot rot: one seed, one method, one round of 2 iterations on
the already planned tiny federation. Checks the files it writes, not the (meaningless) figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_accuracy_benchmark_smallest(tiny_federation, planned_federation, tmp_path):
    fed = tiny_federation
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--out", str(out), "--workdir", str(fed.workdir),
           "--prepared", "--seeds", "0", "--rounds", "1", "--local-iterations", "2",
           "--methods", "fedbn_marginal"]
    p = subprocess.run(cmd, env=fed.env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.loads((out / "results.json").read_text())
    assert set(rec["per_seed"]["0"]) == {"fedbn_marginal"}
    assert set(rec["summary"]["fedbn_marginal"]) == set(fed.spec.labels) | {"mean"}
    assert rec["versions"]["nnunetv2"] and rec["machine"]["cpus"] and "accuracy.py" in rec["command"]
    md = (out / "results.md").read_text()
    assert "| fedbn_marginal |" in md
    assert (out / "dice.png").stat().st_size > 1000
    # each method trained into its own results folder
    assert (fed.workdir / "bench_results" / "fedbn_marginal").is_dir()


@pytest.mark.slow
def test_federation_performance_benchmark_smallest(tiny_federation, planned_federation, tmp_path):
    """benchmarks/federation_performance.py --smallest on the planned tiny federation: one in-process run (2 sites,
    1 round of 2 iterations, no Flower). Checks the files and keys it writes, not the figures."""
    fed = tiny_federation
    out = tmp_path / "fedperf"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "federation_performance.py"), "--out", str(out),
           "--workdir", str(fed.workdir), "--prepared", "--smallest"]
    # one thread: on a busy 2-core machine torch's default two threads make this run several times slower
    p = subprocess.run(cmd, env=fed.env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.loads((out / "results.json").read_text())
    assert (rec["rounds"], rec["local_iterations"], rec["flower"], rec["flower_vs_in_process"]) == (1, 2, False, None)
    assert rec["versions"]["nnunetv2"] and rec["versions"]["torch"] and "flwr" in rec["versions"]
    assert rec["machine"]["cpus"] and rec["machine"]["platform"] and rec["machine"]["torch_device"] == "cpu"
    assert "federation_performance.py" in rec["command"] and "--smallest" in rec["command"]
    (run,) = rec["runs"]
    assert run["engine"] == "in-process" and run["sites"] == [s.name for s in fed.spec.sites[:2]]
    assert run["threads_per_process"] == 1
    assert "federate" in run["command"] and "--no-evaluate" in run["command"]
    assert {"wall_seconds", "peak_rss_mib", "sampled_peak_sum_rss_mib", "cpu_seconds", "other_work_cpu_seconds",
            "summary", "bytes", "image_size", "patch_size"} <= set(run)
    (rnd,) = run["rounds"]
    assert rnd["round"] == 1 and set(rnd["site_training_seconds"]) == set(run["sites"])
    assert {"seconds", "local_training_sum", "local_training_max", "round_over_local_sum"} <= set(rnd)
    assert set(run["bytes"]["update_file_bytes"]) == set(run["sites"]) and run["bytes"]["elements"] > 0
    assert run["bytes"]["dtypes"] == ["float32"] and run["bytes"]["global_file_bytes"] > 0
    md = (out / "results.md").read_text()
    assert f"| {run['name']} | in-process |" in md
    assert (out / "performance.png").stat().st_size > 1000
    # the run trained into its own results folder, not the session's
    assert (fed.workdir / "bench_fedperf" / run["name"] / "nnUNet_results").is_dir()
