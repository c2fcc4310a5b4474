"""The distillation trainers run through the STOCK nnU-Net commands with teachers that are ordinary nnU-Net results
folders (trained here by stock ``nnUNetv2_train``): MSKD (softmax and multi-head students), EnsembleKD and DualKD.
These are wiring tests at a few iterations; they check what each trainer must produce, not accuracy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_fedkd.pipeline import StepError, predict, train

TEACHER_TRAINER = "nnUNetTrainerFedKDBase"  # nnU-Net's trainer with the schedule from the config file
SHORT = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "final_validation": False}


def _config(tmp_path, name, **settings):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps({**SHORT, **settings}))
    return p


@pytest.fixture(scope="module")
def teachers(tiny_federation, tmp_path_factory):
    """Single-organ teachers for the liver and kidney sites (stock nnUNetv2_train, a few iterations)."""
    fed = tiny_federation
    cfg = _config(tmp_path_factory.mktemp("teachers"), "teacher")
    out = {}
    for site in fed.spec.sites[:2]:
        fold = train(site.dataset, TEACHER_TRAINER, fed.workdir, cfg, log_dir=fed.workdir / "logs")
        out[site.organs[0]] = fold.parent
    return out


def _teacher_entries(teachers):
    return [{"results_folder": str(folder), "folds": [0], "organ": organ} for organ, folder in teachers.items()]


def _predict_and_check(fed, pooled_name, trainer, tmp_path, allowed):
    test = fed.raw / fed.spec.test_set.dataset / "imagesTr"
    pred = predict(test, tmp_path / f"pred_{trainer}", pooled_name, trainer, fed.workdir,
                   log_dir=fed.workdir / "logs")
    images = sorted(test.glob("*_0000.nii.gz"))
    assert images
    for img in images:
        seg = sitk.ReadImage(str(pred / img.name.replace("_0000.nii.gz", ".nii.gz")))
        assert seg.GetSize() == sitk.ReadImage(str(img)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= allowed


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["nnUNetTrainerMSKD", "nnUNetTrainerMSKDMultiHead"])
def test_mskd_student_trains_and_predicts_with_stock_commands(tiny_federation, pooled_federation, teachers,
                                                              tmp_path, trainer):
    fed = tiny_federation
    cfg = _config(tmp_path, "mskd", teachers=_teacher_entries(teachers), feature_kd_weight=0.5)
    fold = train(pooled_federation.name, trainer, fed.workdir, cfg, log_dir=fed.workdir / "logs")
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer
    # one feature adapter per teacher is part of the student network and recorded in the results folder's plans
    adapters = [k for k in ckpt["network_weights"] if k.startswith("fedkd_feature_adapters.adapters.")]
    assert {k.split(".")[2] for k in adapters} == {"0", "1"}
    plans = json.loads((fold.parent / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["fedkd_feature_adapters"]["teacher_channels"] == [8, 8]
    used = json.loads((fold / "fedkd_trainer_config.json").read_text())["settings"]
    assert [t["organ"] for t in used["teachers"]] == list(teachers)
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert log.count("teacher ") >= 2 and "organ liver" in log and "organ kidney" in log
    # teachers must not end up in the student's checkpoint
    assert not any("teacher" in k for k in ckpt["network_weights"])
    _predict_and_check(fed, pooled_federation.name, trainer, tmp_path, {0, 1, 2, 3, 4})


@pytest.mark.slow
def test_ensemble_kd_and_dual_kd_train_with_stock_commands(tiny_federation, pooled_federation, teachers, tmp_path):
    fed = tiny_federation
    liver_site = fed.spec.sites[0]
    # EnsembleKD: the liver site's own nnU-Net (fold 0) distilled into one network of the same dataset
    cfg = _config(tmp_path, "ens", ensemble=[{"results_folder": str(teachers["liver"]), "folds": [0]}])
    fold = train(liver_site.dataset, "nnUNetTrainerEnsembleKD", fed.workdir, cfg, log_dir=fed.workdir / "logs")
    used = json.loads((fold / "fedkd_trainer_config.json").read_text())["settings"]
    assert used["gt_weight"] == pytest.approx(1 - used["kd_weight"])
    # DualKD: a multi-organ model trained elsewhere (here a Marginal model of the pooled dataset) as public model
    public = train(pooled_federation.name, "nnUNetTrainerMarginal", fed.workdir, _config(tmp_path, "m"),
                   log_dir=fed.workdir / "logs")
    cfg = _config(tmp_path, "dual", public_model={"results_folder": str(public.parent), "folds": [0]})
    fold = train(pooled_federation.name, "nnUNetTrainerDualKD", fed.workdir, cfg, log_dir=fed.workdir / "logs")
    assert (fold / "checkpoint_final.pth").is_file()
    _predict_and_check(fed, pooled_federation.name, "nnUNetTrainerDualKD", tmp_path, {0, 1, 2, 3, 4})


@pytest.mark.slow
def test_missing_teacher_is_a_clear_error(tiny_federation, pooled_federation, tmp_path):
    cfg = _config(tmp_path, "bad", teachers=[{"results_folder": str(tmp_path / "nope"), "folds": [0],
                                                  "organ": "liver"}])
    with pytest.raises(StepError) as e:
        train(pooled_federation.name, "nnUNetTrainerMSKD", tiny_federation.workdir, cfg,
              log_dir=tiny_federation.workdir / "logs")
    assert "teacher folder" in str(e.value) and "nope" in str(e.value)


@pytest.mark.slow
def test_fedkd_round_distils_from_organ_teachers(tiny_federation, planned_federation, teachers, tmp_path):
    """A federated round of nnUNetTrainerFedKD with organ teachers (planned with the sites' own plans, so their
    patches are mapped into the teachers' preprocessing) next to the global-model KD: every site trains, logs its
    teachers, and the round aggregates."""
    import subprocess
    import sys

    fed = tiny_federation
    cfg = _config(tmp_path, "fedkd", teachers=_teacher_entries(teachers))
    env = fed.env(training=True, nnUNet_results=str(tmp_path / "results"))
    cmd = [sys.executable, "-m", "nnunetv2_fedkd.cli", "federate", str(fed.spec.path), "--rounds", "1",
           "--local-iterations", "2", "-tr", "nnUNetTrainerFedKD", "-p", "nnUNetPlansSmall", "-device", "cpu",
           "--config", str(cfg), "--no-evaluate", "--sites", "liver_site", "spleen_site"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = (tmp_path / "results" / planned_federation.coordinator / "nnUNetTrainerFedKD__nnUNetPlansSmall__3d_fullres"
           / "federation")
    rec = json.loads((run / "metrics.json").read_text())[0]
    assert rec["aggregated"] and sorted(rec["accepted"]) == ["liver_site", "spleen_site"], rec
    for site in ("liver_site", "spleen_site"):
        log = (run / "sites" / site / "round_0001" / "train.log").read_text()
        assert "organ liver" in log and "organ kidney" in log and "teachers: 2" in log
