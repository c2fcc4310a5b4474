"""``nnunetv2_fedkd federate`` end to end on the tiny planned federation (each site labels ONE organ).

* FedKD with FedAvg: rounds through the stock trainer, a SIGKILL mid-round and a resume that neither loses nor repeats
  a round, what a site sends, the final model through stock ``nnUNetv2_predict`` / ``nnUNetv2_evaluate_folder``;
* the evidence of issue 5: naive FedAvg (unlabelled organs = background) with the same rounds and budget forgets the
  organs; FedKD (marginal loss + KD from the global model) keeps them;
* FedBN with the multi-head trainer keeps each site's normalisation layers;
* clear errors for a corrupt global checkpoint and for a site with other plans.

Measured when written (4 sites x 5 cases, 40x40x32, fov 0.7, patch 32^3, FedAvg, lr 0.03; Dice on the 2 fully
labelled test cases, liver/spleen/kidney/pancreas): 5 rounds x 80 local iterations: FedKD .81/.01/.80/0, naive FedAvg
0/0/0/0 (its sites' validation Dice was 0 for every organ in every round, their own organ included); 4 rounds x 60
(this test's budget): FedKD .78/0/.74/0. The upper bound at the same budget is the federated oracle (the same sites
and images, every organ labelled at every site, FedAvg, 4 x 60): it learned the liver only (.872/0/0/0, 2026-12-03),
so FedKD is held to every organ that oracle learns and to the mean over all organs; what the central oracle (960
sequential iterations) learns beyond it is printed, not asserted."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_fedkd.federated import load_weights
from nnunetv2_fedkd.workflows.pipeline import federate_command
from nnunetv2_fedkd.trainers.config import SHORT_CPU_RUN

ROUNDS, ITERATIONS = 4, 60
SETTINGS = dict(SHORT_CPU_RUN)


def federate_cmd(spec: Path, config: Path, trainer: str = "nnUNetTrainerFedKD", strategy: str = "fedavg",
                 rounds: int = ROUNDS, iterations: int = ITERATIONS, *extra: str):
    return federate_command(spec, trainer, rounds, iterations, config, *extra, strategy=strategy)


def predict_and_evaluate(fed, layout, trainer: str, out: Path):
    from nnunetv2_fedkd.workflows.pipeline import evaluate, predict

    test = fed.raw / fed.spec.test_set.dataset
    pred = predict(test / "imagesTr", out, layout.coordinator, trainer, fed.workdir, fold="all")
    return pred, evaluate(test / "labelsTr", pred, test / "dataset.json", fed.workdir)


@pytest.fixture(scope="module")
def settings_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("fed_settings") / "settings.json"
    p.write_text(json.dumps(SETTINGS))
    return p


@pytest.fixture(scope="module")
def federated_oracle(tmp_path_factory) -> dict:
    """The upper bound of federated training at this test's budget (``benchmarks/federated_oracle.py``): the tiny
    federation's sites, scanners and images with EVERY organ labelled at every site (``make_federation(
    fully_labelled=True)``, same seed, size and cases), planned with ``nnunetv2_fedkd plan``, trained with naive
    FedAvg (every organ labelled: the stock loss) for the same rounds x local iterations as FedKD, scored with stock
    predict/evaluate on its test set (the same images as the tiny federation's). Returns Dice per organ."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import federated_oracle as bench
    from conftest import TINY_CASES_PER_SITE, TINY_FOV_SCALE, TINY_SEED, TINY_SIZE, TINY_TEST_CASES

    wd = tmp_path_factory.mktemp("federated_oracle")
    spec, layout = bench.prepare(wd, seed=TINY_SEED, size=TINY_SIZE, fov_scale=TINY_FOV_SCALE,
                                 cases_per_site=TINY_CASES_PER_SITE, test_cases=TINY_TEST_CASES)
    run = bench.run_budget(wd, spec, layout, "nnUNetTrainerFedNaive", ROUNDS, ITERATIONS)
    print(f"federated oracle (fully labelled sites, FedAvg, {ROUNDS} x {ITERATIONS}):", json.dumps(run))
    return run["dice"]


@pytest.mark.slow
def test_fedkd_resume_privacy_stock_predict_and_beats_naive_fedavg(tiny_federation, planned_federation,
                                                                    settings_file, ci_oracle, federated_oracle,
                                                                    tmp_path):
    fed, layout = tiny_federation, planned_federation
    env = fed.env(training=True)
    model = fed.results / layout.coordinator / "nnUNetTrainerFedKD__nnUNetPlansSmall__3d_fullres"
    run = model / "federation"
    # per-round evaluation is checked in the FedBN test below; here it would only cost CI time
    cmd = federate_cmd(fed.spec.path, settings_file, "nnUNetTrainerFedKD", "fedavg", ROUNDS, ITERATIONS,
                       "--no-evaluate")

    # 1. start FedKD, and SIGKILL the runner while round 2 is in progress (after round 1 was committed)
    log1 = tmp_path / "first.log"
    with open(log1, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    killed = False
    try:
        while time.time() < deadline and proc.poll() is None:
            state = run / "state.json"
            if state.is_file() and json.loads(state.read_text())["completed_rounds"] == 1 and \
                    any(run.glob("sites/*/round_0002/fedkd_trainer.json")):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait(timeout=60)
    assert killed, log1.read_text()[-3000:]
    assert json.loads((run / "state.json").read_text())["completed_rounds"] == 1

    # 2. a resume with other settings is refused before any training, naming the difference; the same command
    #    resumes with round 2; no round is lost or repeated
    state_before = (run / "state.json").read_text()
    other = federate_cmd(fed.spec.path, settings_file, "nnUNetTrainerFedKD", "fedavg", ROUNDS, ITERATIONS // 2,
                         "--no-evaluate")
    out = subprocess.run(other, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"settings.num_iterations_per_epoch: {ITERATIONS} -> {ITERATIONS // 2}" in out.stderr, out.stderr[-3000:]
    assert "--resume-with-new-settings" in out.stderr and "Traceback" not in out.stderr
    assert (run / "state.json").read_text() == state_before
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"after round 1/{ROUNDS}" in out.stdout
    assert f"round 1/{ROUNDS} site" not in out.stdout  # round 1 is not trained again
    history = json.loads((run / "metrics.json").read_text())
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))
    sites = [s.name for s in fed.spec.sites]
    for h in history:
        assert h["aggregated"] and sorted(h["accepted"]) == sorted(sites), h
        # every honest update passes the default update bound, and its size relative to the global model is recorded
        assert sorted(h["update_ratios"]) == sorted(sites) and all(0 < r < 10 for r in h["update_ratios"].values())
    print("update ratios ||w_site - w_global|| / ||w_global|| per round:",
          json.dumps([h["update_ratios"] for h in history]))
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + ROUNDS
    assert (run / "progress.png").stat().st_size > 1000

    # 3. what a site sends: the model's parameters, a case count, metrics - nothing else, nothing image-shaped
    glob_w, glob_meta = load_weights(run / f"global_round_{ROUNDS:04d}.fedkd")
    assert glob_meta["completed_rounds"] == ROUNDS
    for s in fed.spec.sites:
        upd, meta = load_weights(run / "sites" / s.name / "update.fedkd")
        assert set(meta) == {"site", "round", "num_examples", "organs", "plans_digest", "metrics"}
        assert meta["site"] == s.name and meta["organs"] == s.organs and meta["num_examples"] == 4
        assert set(meta["metrics"]) == {"train_loss", "ema_pseudo_dice", "iterations"}
        assert set(upd) == set(glob_w) and all(upd[k].shape == glob_w[k].shape for k in upd)

    # 4. the final global model is an nnU-Net results folder: stock predict + evaluate on the labelled test set
    assert (model / "fold_all" / "checkpoint_final.pth").is_file()
    out = subprocess.run([sys.executable, "-m", "nnunetv2_fedkd.workflows.cli",
                           "verify-checkpoint", str(model)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and f"after round {ROUNDS}/{ROUNDS}" in out.stdout, out.stdout + out.stderr
    pred, kd = predict_and_evaluate(fed, layout, "nnUNetTrainerFedKD", tmp_path / "pred_fedkd")
    values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(sorted(pred.glob("*.nii.gz"))[0])))).tolist())
    assert values <= set(range(len(fed.spec.labels) + 1)) and len(values) > 1

    # 5. naive FedAvg, same rounds and budget (no per-round evaluation needed)
    naive_cmd = federate_cmd(fed.spec.path, settings_file, "nnUNetTrainerFedNaive", "fedavg", ROUNDS, ITERATIONS,
                             "--no-evaluate")
    out = subprocess.run(naive_cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, naive = predict_and_evaluate(fed, layout, "nnUNetTrainerFedNaive", tmp_path / "pred_naive")
    report = {"FedKD": {o: round(v, 3) for o, v in kd.items()}, "naive FedAvg": {o: round(v, 3)
                                                                                 for o, v in naive.items()}}
    print("per-organ Dice on the fully labelled test set:", json.dumps(report))
    (fed.workdir / "federated_comparison.json").write_text(json.dumps(report, indent=1))
    # every organ is unlabelled at 3 of the 4 sites: naive FedAvg averages three "it is background" votes per organ
    organs = fed.spec.labels
    mean_kd = float(np.mean([np.nan_to_num(kd[o]) for o in organs]))
    mean_naive = float(np.mean([np.nan_to_num(naive[o]) for o in organs]))
    report["oracle (central, fully labelled)"] = {o: round(v, 3) for o, v in ci_oracle.items()}
    report[f"oracle (federated, fully labelled sites, FedAvg {ROUNDS} x {ITERATIONS})"] = {
        o: round(v, 3) for o, v in federated_oracle.items()}
    learned_central = [o for o, d in ci_oracle.items() if d == d and d > 0.5]  # Dice > 0.5 (NaN: absent)
    learned = [o for o, d in federated_oracle.items() if d == d and d > 0.5]
    print("organs the CI-size oracles learn: central", learned_central, "federated at this budget", learned)
    # the upper bounds themselves must work at this size, or nothing below means much
    assert "liver" in learned_central and "liver" in learned, report
    assert max(np.nan_to_num(naive[o]) for o in organs) < 0.2, report
    # every organ the federated upper bound learns with the same rounds and local iterations, FedKD learns too
    # (from one labelling site per organ), unlike naive FedAvg
    missed = [o for o in learned if not (kd[o] > 0.5 and kd[o] > np.nan_to_num(naive[o]) + 0.3)]
    assert not missed, f"FedKD misses organs the federated oracle learns at this budget: {missed}; {report}"
    assert mean_kd > mean_naive + 0.15, report
    # Not asserted, reported: the central oracle's 960 sequential steps learn more organs than 4 rounds of averaged
    # 60-step updates can, even with every organ labelled at every site (measured 2026-12-03 on these data: the
    # federated oracle .872/0/0/0 after 4 x 60, .905/0/.635/0 after 8 x 60, .904/0/.410/0 after 4 x 120; the central
    # oracle in three CI runs .887/.769/.805/.207, .900/.802/.828/.099, .905/.863/.887/.664).
    print("organs the central oracle learns and FedKD not at this federated budget:",
          [o for o in learned_central if not kd[o] > 0.5])


@pytest.mark.slow
def test_fedbn_multihead_keeps_site_norm_layers_and_bad_inputs_are_refused(tiny_federation, planned_federation,
                                                                          settings_file):
    fed, layout = tiny_federation, planned_federation
    env = fed.env(training=True)
    two = ["liver_site", "kidney_site"]
    # with the float16 transport (issue 17, item 3): FedBN's site-local layers and the organ heads travel as changes
    cmd = federate_cmd(fed.spec.path, settings_file, "nnUNetTrainerFedKDMultiHead", "fedbn", 1, 3, "--sites", *two,
                       "--transport-dtype", "float16")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = fed.results / layout.coordinator / "nnUNetTrainerFedKDMultiHead__nnUNetPlansSmall__3d_fullres" / "federation"
    glob_w, _ = load_weights(run / "global_round_0001.fedkd")
    assert any(".heads." in k for k in glob_w)  # the multi-head network
    # float16 on the wire (what the sites received and what each sent: 2 bytes a parameter), float32 checkpoints
    sent, sent_meta = load_weights(run / "sent_global.fedkd")
    assert sent_meta["completed_rounds"] == 0 and sent_meta["transport_dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in sent.values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for v in glob_w.values() if v.is_floating_point())
    start, _ = load_weights(run / "global_round_0000.fedkd")
    for name in two:
        upd, umeta = load_weights(run / "sites" / name / "update.fedkd")
        assert umeta["transport_dtype"] == "float16" and umeta["site"] == name
        assert all(v.dtype == torch.float16 for v in upd.values() if v.is_floating_point())
        assert any(bool(v.abs().max() > 0) for v in upd.values() if v.is_floating_point())  # it trained
    # FedBN: the shared conv weights of the new global model are the case-weighted mean of the decoded updates
    key = next(k for k in glob_w if k.endswith(".weight") and glob_w[k].ndim == 5 and ".norm" not in k)
    cases = {n: json.loads((run / "metrics.json").read_text())[0]["sites"][n]["num_examples"] for n in two}
    decoded = {n: sent[key].float() + load_weights(run / "sites" / n / "update.fedkd")[0][key].float() for n in two}
    mean = sum(cases[n] * decoded[n] for n in two) / sum(cases.values())
    assert torch.allclose(glob_w[key], mean, atol=1e-6) and not torch.equal(glob_w[key], start[key])
    assert json.loads((run / "state.json").read_text())["contract"]["transport_dtype"] == "float16"
    # each site evaluated the new global model on its own validation cases, for the organ it labels
    rec = json.loads((run / "metrics.json").read_text())[0]
    assert set(rec["evaluation"]) == set(two) and set(rec["organ_dice"]) == {"liver", "kidney"}
    # each organ's figure is the Dice its own site measured on its validation cases (liver only at the liver site)
    for name, organ in zip(two, ["liver", "kidney"]):
        ev = rec["evaluation"][name]
        assert set(ev["dice"]) == {organ} and ev["num_cases"] >= 1, ev
        assert rec["organ_dice"][organ] == pytest.approx(ev["dice"][organ], abs=1e-4), rec
    for name in two:
        local, meta = load_weights(run / "sites" / name / "local_state_after_round_0001.fedkd")
        # FedBN: the site keeps its normalisation layers; only they are in its local state, and they are its own
        assert local and set(local) < set(glob_w) and meta["site"] == name
        assert any(".norm." in k for k in local) and all(v.ndim == 1 for v in local.values())  # no conv weights
        assert not all(bool((local[k] == glob_w[k]).all()) for k in local)

    # truncated global checkpoints with no intact one left to go back to (the newest two are kept: rounds 0 and 1)
    # are a clear error naming the newest (a damaged newest with an intact older one: tests/test_round_core.py)
    kept = {g: g.read_bytes() for g in (run / "global_round_0000.fedkd", run / "global_round_0001.fedkd")}
    for g, good in kept.items():
        g.write_bytes(good[: len(good) // 3])
    more = federate_cmd(fed.spec.path, settings_file, "nnUNetTrainerFedKDMultiHead", "fedbn", 1, 3, "--sites", *two,
                        "--transport-dtype", "float16")
    try:
        bad = subprocess.run(more, env=env, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
        assert "global_round_0001.fedkd" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        for g, good in kept.items():
            g.write_bytes(good)

    # a site whose plans differ from the federation's is refused, naming the site
    site_plans = fed.preprocessed / layout.views["kidney_site"] / "nnUNetPlansSmall.json"
    original = site_plans.read_text()
    plans = json.loads(original)
    plans["configurations"]["3d_fullres"]["batch_size"] = 3
    site_plans.write_text(json.dumps(plans))
    try:
        mism = subprocess.run(more, env=env, capture_output=True, text=True, timeout=300)
        assert mism.returncode == 2 and "site 'kidney_site'" in mism.stderr, mism.stderr[-2000:]
    finally:
        site_plans.write_text(original)
