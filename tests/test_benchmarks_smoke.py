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
