"""Hospitals with a handful of labelled cases (issue 14): a site with fewer training cases than nnU-Net's 5 folds.

Stock nnU-Net's ``do_split`` fails there ("Cannot have number of splits n_splits=5 greater than the number of
samples"), every round, at every such site. The plugin's trainers train on every case and validate on the same cases
(as fold ``all``), say so in the log, and use a user's ``splits_final.json`` as it is. End to end: a federation of a
2-case site, a 1-case site and a site with 2 labelled and 2 unlabelled cases (MSD imagesTs converted with
``unlabelled_as_training``) is planned, federates with per-round evaluation on, and trains a teacher on fold 0.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from nnunetv2_fedkd.env import subprocess_env
from nnunetv2_fedkd.workflows.pipeline import federate_command
from nnunetv2_fedkd.trainers.config import SHORT_CPU_RUN


@pytest.fixture(scope="module")
def few_case_federation(tmp_path_factory):
    """liver_site (LiTS layout) with 2 labelled cases, kidney_site (KiTS23) with 1, spleen_site (MSD Task09) with 2
    labelled cases and its 2 imagesTs images as training cases that annotate no organ (the spec's
    ``unlabelled_as_training``), planned with ``nnunetv2_fedkd plan`` and small plans."""
    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.workflows.pipeline import convert_federation, nnunet_script, small_plans
    from nnunetv2_fedkd.spec import load_spec, save_spec
    from nnunetv2_fedkd.data.synthetic import make_federation

    wd = tmp_path_factory.mktemp("few_cases")
    spec_path = make_federation(wd, seed=3, size=(32, 32, 24), cases_per_site=2, test_cases=0, num_sites=3,
                                fov_scale=0.7)
    shutil.rmtree(wd / "sources" / "kidney_kits23" / "dataset" / "case_00001")  # the kidney site keeps one case
    spec = load_spec(spec_path)
    spec.site("spleen_site").unlabelled_as_training = True
    save_spec(spec, spec_path)
    spec = load_spec(spec_path)
    convert_federation(spec, wd / "nnUNet_raw")
    proc = subprocess.run([nnunet_script("nnunetv2_fedkd"), "plan", str(spec.path)], env=subprocess_env(wd, cpu=True),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    layout = resolve_layout(spec, wd)
    small_plans([layout.coordinator] + [layout.views[s.name] for s in spec.sites], wd, patch_size=(16, 16, 16))
    settings = wd / "settings.json"
    settings.write_text(json.dumps({**SHORT_CPU_RUN, "num_epochs": 1, "num_iterations_per_epoch": 2,
                                    "final_validation": False}))
    return wd, spec, layout, settings


@pytest.mark.slow
def test_federation_of_a_two_case_and_a_one_case_site(few_case_federation):
    wd, spec, layout, settings = few_case_federation
    cmd = federate_command(spec.path, "nnUNetTrainerFedKD", 2, 2, settings)  # per-round evaluation on (the default)
    out = subprocess.run(cmd, env=subprocess_env(wd, cpu=True, training=True), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "failed" not in out.stdout, out.stdout[-3000:]
    run = Path(subprocess_env(wd)["nnUNet_results"]) / layout.coordinator / \
        "nnUNetTrainerFedKD__nnUNetPlansSmall__3d_fullres" / "federation"
    history = json.loads((run / "metrics.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    for h in history:
        assert h["aggregated"] and sorted(h["accepted"]) == ["kidney_site", "liver_site", "spleen_site"], h
    # the sites say that their validation is on their training cases
    assert "evaluates on its 1 training case(s)" in out.stdout and "evaluates on its 2 training case(s)" in out.stdout
    train_log = (run / "sites" / "kidney_site" / "round_0001" / "train.log").read_text()
    assert "fewer than nnU-Net's 5 folds" in train_log and "Cannot have number of splits" not in train_log
    # the spleen site's unlabelled cases reach its view dataset as cases that annotate no organ, train, never validate
    view = json.loads((Path(subprocess_env(wd)["nnUNet_raw"]) / layout.views["spleen_site"] / "dataset.json")
                      .read_text())
    annotated = view["fedkd"]["case_annotated"]
    assert sorted(map(len, annotated.values())) == [0, 0, 1, 1], annotated
    spleen_log = (run / "sites" / "spleen_site" / "round_0001" / "train.log").read_text()
    assert "2 labelled training case(s), fewer than nnU-Net's 5 folds" in spleen_log, spleen_log[-3000:]
    assert "validates on the labelled ones" in spleen_log
    # FedAvg weighs the site by the cases that carry labels (2), not by all 4 it trained on
    assert [h["sites"]["spleen_site"]["num_examples"] for h in history] == [2, 2], history


@pytest.mark.slow
def test_teacher_on_one_case_and_a_users_split_file(few_case_federation):
    from nnunetv2_fedkd.workflows.pipeline import train

    wd, spec, layout, settings = few_case_federation
    # a teacher at the 1-case site on nnU-Net's default fold 0: trains on its case, validates on it, says so
    fold = train(layout.views["kidney_site"], "nnUNetTrainerFedKDBase", wd, settings, fold="0")
    assert (fold / "checkpoint_final.pth").is_file()
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "1 labelled training case(s), fewer than nnU-Net's 5 folds" in log, log[-2000:]

    # a user's splits_final.json at the 2-case site is used as nnU-Net uses it (1 training, 1 validation case)
    pre = Path(subprocess_env(wd)["nnUNet_preprocessed"]) / layout.views["liver_site"]
    ids = sorted(p.name[: -len(".pkl")] for p in pre.glob("nnUNetPlans_3d_fullres/*.pkl"))
    assert len(ids) == 2
    (pre / "splits_final.json").write_text(json.dumps([{"train": ids[:1], "val": ids[1:]}]))
    fold = train(layout.views["liver_site"], "nnUNetTrainerFedKDBase", wd, settings, fold="0")
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "This split has 1 training and 1 validation cases" in log and "fewer than nnU-Net's" not in log, log[-2000:]


@pytest.mark.slow
def test_a_deterministic_site_error_stops_the_federation_in_round_1(few_case_federation, tmp_path):
    """A site whose preprocessed data is gone fails the same way in every round: the run stops in round 1 naming the
    site and the cause (before: the site was left out of every round until the run ended with nothing aggregated)."""
    wd, spec, layout, settings = few_case_federation
    data = Path(subprocess_env(wd)["nnUNet_preprocessed"]) / layout.views["kidney_site"] / "nnUNetPlans_3d_fullres"
    moved = data.with_name(data.name + "_moved")
    data.rename(moved)
    try:
        cmd = federate_command(spec.path, "nnUNetTrainerFedKD", 3, 2, settings, evaluate=False)
        env = subprocess_env(wd, cpu=True, training=True, extra={"nnUNet_results": str(tmp_path / "results")})
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    finally:
        moved.rename(data)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "round 1: site 'kidney_site' failed with an error that would recur" in out.stderr, out.stderr[-3000:]
    assert "round 2/" not in out.stdout
    state = next((tmp_path / "results").rglob("state.json"))
    assert json.loads(state.read_text())["completed_rounds"] == 0
