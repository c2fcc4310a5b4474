"""The benchmark runner at its smallest size, so it cannot rot: one seed, one method, one round of 2 iterations on
the already planned tiny federation. Checks the files it writes, not the (meaningless) figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
def test_ensemble_kd_benchmark_smallest(tiny_federation, ci_oracle, tmp_path):
    """benchmarks/ensemble_kd.py on the tiny federation's fully labelled pool (the CI oracle's dataset), every network
    2 iterations: 5 folds, the EnsembleKD student of those folds and the labels-only network trained, the four rows
    predicted and scored. Checks the files and keys it writes, not the figures."""
    fed = tiny_federation
    out = tmp_path / "ens"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ensemble_kd.py"), "--out", str(out), "--workdir",
           str(fed.workdir), "--prepared", "--iterations", "2", "--jobs", "2"]
    p = subprocess.run(cmd, env=fed.env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.loads((out / "results.json").read_text())
    assert list(rec["rows"]) == ["ensemble (5 folds)", "fold_0", "student (EnsembleKD)", "labels_only"]
    for row in rec["rows"].values():
        assert set(row) == set(fed.spec.labels) | {"mean", "seconds"} and row["seconds"] > 0
    assert set(rec["train_seconds"]) == {f"ensemble fold {f}" for f in range(5)} | {"labels_only", "student"}
    student = (fed.workdir / "bench_results" / "ensemble_kd" / "student" / rec["dataset"]
               / "nnUNetTrainerEnsembleKD__nnUNetPlansSmall__3d_fullres" / "fold_all")
    used = json.loads((student / "fedkd_trainer_config.json").read_text())["settings"]
    assert used["ensemble"][0]["folds"] == [0, 1, 2, 3, 4]  # the student distilled all five members
    assert "Student >= ensemble - 0.01 on every organ:" in (out / "results.md").read_text()
    # a rerun reuses every finished training (nothing is trained again)
    p = subprocess.run(cmd, env=fed.env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and p.stdout.count("trained earlier with these settings") == 7, p.stdout[-3000:]


@pytest.mark.slow
def test_dual_kd_benchmark_smallest(tiny_federation, tmp_path):
    """benchmarks/dual_kd.py on the tiny federation (1 labelled + 2 unlabelled pancreas cases, 2 held out; every
    network 2 iterations): the few-shot datasets converted with --unlabelled-as-training, the public pool of the other
    sites fully labelled, the four models trained and scored on the held-out cases. Checks the files and keys it
    writes, not the figures."""
    fed = tiny_federation
    out = tmp_path / "dual"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "dual_kd.py"), "--out", str(out), "--workdir",
           str(fed.workdir), "--prepared", "--labelled", "1", "--unlabelled", "2", "--held-out", "2",
           "--public-iterations", "2", "--site-iterations", "2", "--jobs", "2"]
    p = subprocess.run(cmd, env=fed.env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.loads((out / "results.json").read_text())
    assert list(rec["pancreas_dice"]) == ["public", "labelled_only", "marginal", "dual_kd"]
    assert rec["public_sites"] == [s.name for s in fed.spec.sites if s.name != "pancreas_site"]
    fewshot = json.loads((fed.raw / "Dataset521_PancreasFewShot" / "dataset.json").read_text())["fedkd"]
    assert len(fewshot["unlabelled_cases"]) == 2 and sum(v == [] for v in fewshot["case_annotated"].values()) == 2
    dual = (fed.workdir / "bench_results" / "dual_kd" / "dual_kd" / "Dataset521_PancreasFewShot"
            / "nnUNetTrainerDualKD__nnUNetPlansSmall__3d_fullres" / "fold_all")
    used = json.loads((dual / "fedkd_trainer_config.json").read_text())["settings"]
    assert "Dataset531_PublicFullyLabelled" in used["public_model"]["results_folder"]
    assert "| DualKD on 1 labelled + 2 unlabelled, from the public model |" in (out / "results.md").read_text()


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


def test_learning_curves_outputs_per_augmentation(tmp_path):
    """benchmarks/learning_curves.py's summary keeps runs with and without augmentation apart (runs recorded before
    the setting existed count as nnU-Net's augmentation)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learning_curves

    organs = ["liver", "spleen"]
    runs = [{"kind": "oracle", "organ": "all", "budget": 480, "dice": {"liver": 0.8, "spleen": 0.1},
             "train_seconds": 80, "predict_seconds": 9},  # legacy record
            {"kind": "oracle", "organ": "all", "budget": 480, "data_augmentation": "none",
             "dice": {"liver": 0.87, "spleen": 0.16}, "train_seconds": 83, "predict_seconds": 9}]
    learning_curves.write_outputs(tmp_path, {"command": "c", "data": {}, "organs": organs, "runs": runs,
                                             "versions": {}, "machine": {}, "seconds": 1})
    md = (tmp_path / "results.md").read_text()
    assert "| oracle (all organs labelled) | nnunet | 480 | 0.800 | 0.100 | 80 | 9 |" in md
    assert "| oracle (all organs labelled) | none | 480 | 0.870 | 0.160 | 83 | 9 |" in md
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_results_of_other_data_are_moved_aside_not_deleted(tmp_path, monkeypatch):
    """A benchmark reuses finished trainings only on the data they were trained on; on other data it starts a new
    results root and keeps the old models beside it (a marker that differed by a label once cost 33 min of training)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import accuracy

    root = tmp_path / "bench_results" / "ensemble_kd"
    accuracy.results_for_data(root, {"seed": 1})
    (root / "model.pth").write_text("trained")
    accuracy.results_for_data(root, {"seed": 1})  # same data: kept in place
    assert (root / "model.pth").read_text() == "trained"
    accuracy.results_for_data(root, {"seed": 2})
    assert not (root / "model.pth").exists() and json.loads((root / "data.json").read_text()) == {"seed": 2}
    assert (tmp_path / "bench_results" / "ensemble_kd.other_data_1" / "model.pth").read_text() == "trained"
    accuracy.results_for_data(root, {"seed": 3})
    assert json.loads((tmp_path / "bench_results" / "ensemble_kd.other_data_2" / "data.json").read_text()) == {
        "seed": 2}


def test_accuracy_benchmark_resumes_per_seed_and_method(tmp_path, monkeypatch):
    """An interrupted benchmark reruns only what it had not finished: finished (seed, method) pairs come from
    runs.json, prepared seeds are not synthesised again; another budget reruns the method."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy

    prepared, ran, interrupted = [], [], []

    def fake_prepare(wd, seed, central, **kw):
        prepared.append(seed)
        (wd / "federation.toml").write_text("")

    def fake_run(method, wd, rounds, iters, teacher_iterations):
        if method == "fedkd" and wd.name == "seed_1" and not interrupted:
            interrupted.append(1)
            ran.append((method, wd.name))
            raise RuntimeError("the machine went away")  # in the middle of seed 1
        ran.append((method, wd.name))
        return {"liver": 0.5 + rounds / 100, "spleen": 0.1}

    monkeypatch.setattr(accuracy, "prepare", fake_prepare)
    monkeypatch.setattr(accuracy, "run_method", fake_run)
    monkeypatch.setattr("nnunetv2_fedkd.spec.load_spec", lambda p: type("S", (), {"labels": ["liver", "spleen"]}))
    args = ["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "wd"), "--seeds", "0", "1",
            "--methods", "oracle_central", "fedkd", "--rounds", "2"]
    with pytest.raises(RuntimeError, match="went away"):
        accuracy.main(args)
    assert prepared == [0, 1] and ran == [("oracle_central", "seed_0"), ("fedkd", "seed_0"),
                                          ("oracle_central", "seed_1"), ("fedkd", "seed_1")]
    runs = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert [(r["seed"], r["method"]) for r in runs] == [(0, "oracle_central"), (0, "fedkd"), (1, "oracle_central")]
    ran.clear()
    assert accuracy.main(args) == 0
    assert prepared == [0, 1] and ran == [("fedkd", "seed_1")]  # only what was missing
    rec = json.loads((tmp_path / "out" / "results.json").read_text())
    assert rec["summary"]["fedkd"]["liver"][2] == 2 and rec["per_seed"]["1"]["fedkd"]["liver"] == pytest.approx(0.52)
    ran.clear()
    assert accuracy.main(args[:-1] + ["3"]) == 0  # another budget: every method again, on the same prepared data
    assert prepared == [0, 1] and len(ran) == 4
    assert accuracy.main(args + ["--fresh"]) == 0
    assert prepared == [0, 1, 0, 1]
    # federated-only methods on seeds prepared with the pooled datasets: served as they are (preparing again would
    # delete the models trained there); the other way round, a federated-only preparation is prepared again
    ran.clear()
    assert accuracy.main(args[:7] + ["--methods", "fedprox_marginal", "--rounds", "2"]) == 0
    assert prepared == [0, 1, 0, 1] and ran == [("fedprox_marginal", "seed_0"), ("fedprox_marginal", "seed_1")]
    # the outputs show every method measured at this budget, not only the ones this invocation asked for
    rec = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(rec["summary"]) == ["fedkd", "fedprox_marginal", "oracle_central"]
    assert "| oracle_central | 2 |" in (tmp_path / "out" / "results.md").read_text()  # n: seeds measured
    fed_only = tmp_path / "wd_fed"
    assert accuracy.main(["--out", str(tmp_path / "out2"), "--workdir", str(fed_only), "--seeds", "0",
                          "--methods", "fedkd"]) == 0
    assert accuracy.main(["--out", str(tmp_path / "out2"), "--workdir", str(fed_only), "--seeds", "0",
                          "--methods", "oracle_central"]) == 0
    assert prepared == [0, 1, 0, 1, 0, 0]
    assert "| fedkd | 1 |" in (tmp_path / "out2" / "results.md").read_text()


@pytest.mark.slow
def test_validation_cost_benchmark_smallest(tiny_federation, planned_federation, tmp_path):
    """benchmarks/validation_cost.py --smallest on the planned tiny federation, one site: the three runs (no
    evaluation, the default patch budget, whole volumes) and the files they write, not the figures."""
    fed = tiny_federation
    out = tmp_path / "valcost"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "validation_cost.py"), "--out", str(out),
           "--workdir", str(fed.workdir), "--prepared", "--smallest", "--sites", "1"]
    p = subprocess.run(cmd, env=fed.env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.loads((out / "results.json").read_text())
    assert [r["mode"] for r in rec["runs"]] == ["no_evaluation", "default_budget", "whole_volumes"]
    site = fed.spec.sites[0].name
    assert rec["sites"] == [site] and rec["versions"]["nnunetv2"] and "validation_cost.py" in rec["command"]
    off, default, whole = ((run["rounds"][0]) for run in rec["runs"])
    assert off["evaluation_seconds"] == {} and off["fit_seconds"][site] > 0 and off["round_over_local_sum"] > 0
    assert default["network_passes"][site] > 0 and whole["sampled_patches"] == {site: 0}
    assert "--evaluate-patches 0" in rec["runs"][2]["command"]
    assert "| whole_volumes | 1 |" in (out / "results.md").read_text()


def test_teacher_cache_size_benchmark_restores_format_1_caches(tmp_path):
    """benchmarks/teacher_cache_size.py on a format-1 cache (float16 .npy) and a cache of today's format: sizes side
    by side, the re-stored codes within half a logit step, the files it writes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import teacher_cache_size

    from nnunetv2_fedkd.distillation.teacher_cache import LOGIT_STEP, save_cached

    old, new = tmp_path / "v1", tmp_path / "v2"
    old.mkdir(), new.mkdir()
    z = np.linspace(-1, 1, 40)[:, None, None] ** 2 + np.linspace(-1, 1, 40)[None, :, None] ** 2 \
        + np.linspace(-1, 1, 24)[None, None, :] ** 2
    probs = np.stack([1 / (1 + np.exp(-30 * (0.2 - z))), 1 / (1 + np.exp(-30 * (z - 1.5)))])
    np.save(old / "case_0.npy", probs.astype(np.float16))
    save_cached(new, "case_1", probs, (32, 32, 32))
    assert teacher_cache_size.main([str(old), str(new), "--out", str(tmp_path / "out")]) == 0
    rec = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["case"] for r in rec["rows"]] == ["case_0", "case_1"]
    assert rec["rows"][0]["format1_bytes"] == (old / "case_0.npy").stat().st_size
    assert rec["rows"][0]["max_logit_error"] <= LOGIT_STEP / 2 + 1e-3
    assert rec["ratio"] > 5 and rec["estimate"]["now_gb"] < rec["estimate"]["format1_gb"]
    assert "smaller" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_site_sampling_benchmark_smallest(tiny_federation, planned_federation, tmp_path):
    """benchmarks/site_sampling.py on the planned tiny federation: 6 simulated sites sharing its data, 2 drawn for
    1 round of 1 iteration; checks the run and its record, not the figures."""
    fed = tiny_federation
    out = tmp_path / "sampling"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "site_sampling.py"), "--out", str(out), "--workdir",
           str(fed.workdir), "--prepared", "--runs", "6x2", "--rounds", "1", "--local-iterations", "1"]
    p = subprocess.run(cmd, env=fed.env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert (run["sites"], run["per_round"], len(run["round_seconds"])) == (6, 2, 1)
    (drawn,) = run["sampled"]
    assert len(drawn) == 2 and len({s.rsplit("_", 1)[0] for s in drawn}) == 2  # organ coverage: two organs' sites
    assert "--sites-per-round 2" in run["command"] and run["peak_rss_mib"] > 0
    assert "| 6 | 2 |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_multihead_step_benchmark_smallest(tmp_path):
    """benchmarks/multihead_step.py on stock nnU-Net's plans for a CT-like fingerprint (planned by
    nnUNetv2_plan_experiment, 6 stages), at a small patch: one turn of one step per variant; checks the record, not the
    figures (the fused and one-by-one networks are the same function: tests/test_organ_heads.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import multihead_step

    out = tmp_path / "mh"
    assert multihead_step.main(["--out", str(out), "--ct-like-plans", str(tmp_path / "plans"), "--patch-size", "32",
                                "32", "32", "--batch-size", "1", "--steps", "1", "--repeats", "1"]) == 0
    rec = json.loads((out / "results.json").read_text())
    names = ["stock", "multi-head, fused heads", "multi-head, heads one by one"]
    assert list(rec["median_step_seconds"]) == names and rec["ratio_to_stock"]["stock"] == 1.0
    assert rec["parameters"][names[1]] == rec["parameters"][names[2]] > rec["parameters"]["stock"]
    plans = json.loads(Path(rec["plans"]).read_text())["configurations"]["3d_fullres"]
    assert len(plans["architecture"]["arch_kwargs"]["features_per_stage"]) == 6  # nnU-Net's real-size network
    assert rec["patch_size"] == [32, 32, 32] and "| stock |" in (out / "results.md").read_text()
