"""The pseudo-label baseline (``nnunetv2_fedkd pseudo-label``): the merge rules on hand-made arrays, the teachers'
resolution and errors, the array order between nnU-Net's readers, and the whole dataset build with a stand-in for
``nnUNetv2_predict`` (fast); one slow test runs the recipe with stock nnU-Net end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_fedkd.workflows.pseudo_labels import (
    PseudoLabelError, Teacher, build_pseudo_label_dataset, merge_pseudo_labels,
                                          resolve_teacher, teacher_channel, to_reader_order)
from nnunetv2_fedkd.spec import FederationSpec, Site

IGN = 4  # three organs (1 liver, 2 spleen, 3 kidney) -> ignore = 4


def _p(values):
    return np.asarray(values, dtype=np.float32)


# ---------------------------------------------------------------- the merge


def test_confident_teacher_makes_its_organ_and_unconfident_background():
    labels = np.zeros(4, np.uint8)
    out = merge_pseudo_labels(labels, [], {1: _p([0.9, 0.7, 0.1, 0.0])}, IGN)
    assert out.tolist() == [1, 1, 0, 0]
    assert out.dtype == np.uint8


def test_unsure_teacher_gives_ignore():
    out = merge_pseudo_labels(np.zeros(5, np.uint8), [], {1: _p([0.3, 0.5, 0.69, 0.29, 0.7])}, IGN)
    assert out.tolist() == [IGN, IGN, IGN, 0, 1]


def test_two_confident_teachers_conflict_gives_ignore():
    out = merge_pseudo_labels(np.zeros(3, np.uint8), [], {1: _p([0.9, 0.9, 0.1]), 3: _p([0.8, 0.1, 0.95])}, IGN)
    assert out.tolist() == [IGN, 1, 3]


def test_one_confident_teacher_and_another_unsure_gives_ignore():
    out = merge_pseudo_labels(np.zeros(2, np.uint8), [], {1: _p([0.9, 0.9]), 2: _p([0.4, 0.2])}, IGN)
    assert out.tolist() == [IGN, 1]


def test_the_cases_own_label_wins():
    # voxel 0 labelled kidney (3): kept although the liver teacher claims it and the spleen teacher is unsure
    labels = np.array([3, 0, 0], np.uint8)
    out = merge_pseudo_labels(labels, [3], {1: _p([0.99, 0.99, 0.0]), 2: _p([0.5, 0.0, 0.0])}, IGN)
    assert out.tolist() == [3, 1, 0]


def test_a_case_that_labels_organ_k_ignores_teacher_k():
    # the case labels the kidney: its 'not kidney' (0) stays even where the kidney teacher is sure or unsure,
    # and the kidney teacher cannot conflict with the liver teacher
    labels = np.array([0, 0, 0, 3], np.uint8)
    teachers = {3: _p([0.99, 0.5, 0.99, 0.0]), 1: _p([0.0, 0.0, 0.9, 0.9])}
    counts = {}
    out = merge_pseudo_labels(labels, [3], teachers, IGN, counts=counts)
    assert out.tolist() == [0, 0, 1, 3]
    assert counts == {"labelled": 1, "conflict": 0, "unsure": 0, "ignore": 0, "pseudo": {1: 1}}


def test_counts_and_3d_shapes():
    labels = np.zeros((2, 2, 2), np.uint8)
    labels[0, 0, 0] = 1
    liver = np.zeros((2, 2, 2), np.float32)
    spleen = np.zeros((2, 2, 2), np.float32)
    liver[0, 0, 1] = spleen[0, 0, 1] = 0.9  # conflict
    spleen[1, 1, 1] = 0.5  # unsure
    spleen[1, 0, 0] = 0.8  # pseudo spleen
    counts = {}
    out = merge_pseudo_labels(labels, [1], {1: liver, 2: spleen}, IGN, counts=counts)
    # the liver teacher is not consulted (the case labels the liver), so (0,0,1) is the spleen's
    assert out[0, 0, 0] == 1 and out[0, 0, 1] == 2 and out[1, 1, 1] == IGN and out[1, 0, 0] == 2
    assert counts == {"labelled": 1, "conflict": 0, "unsure": 1, "ignore": 1, "pseudo": {2: 2}}


def test_thresholds_equal_is_the_argmax_merge_and_bad_thresholds_fail():
    out = merge_pseudo_labels(np.zeros(3, np.uint8), [], {1: _p([0.5, 0.49, 0.9])}, IGN, high=0.5, low=0.5)
    assert out.tolist() == [1, 0, 1]
    for high, low in ((0.3, 0.7), (0.7, 0.0), (1.2, 0.3)):
        with pytest.raises(ValueError, match="thresholds"):
            merge_pseudo_labels(np.zeros(1, np.uint8), [], {}, IGN, high=high, low=low)


def test_merge_input_errors():
    with pytest.raises(ValueError, match="does not annotate"):
        merge_pseudo_labels(np.array([2], np.uint8), [1], {}, IGN)
    with pytest.raises(ValueError, match="shape"):
        merge_pseudo_labels(np.zeros(3, np.uint8), [], {1: _p([0.1, 0.2])}, IGN)
    with pytest.raises(ValueError, match="finite"):
        merge_pseudo_labels(np.zeros(2, np.uint8), [], {1: _p([np.nan, 0.2])}, IGN)


def test_no_teachers_keeps_the_labels():
    labels = np.array([0, 2, 0], np.uint8)
    assert merge_pseudo_labels(labels, [2], {}, IGN).tolist() == [0, 2, 0]


# ---------------------------------------------------------------- teachers


def _teacher_folder(root: Path, dataset: str, labels: dict, annotated=None, reader="NibabelIOWithReorient",
                    folds=("all",), trainer="nnUNetTrainer") -> Path:
    folder = root / dataset / f"{trainer}__nnUNetPlansSmall__3d_fullres"
    folder.mkdir(parents=True)
    dj = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    if annotated is not None:
        dj["fedkd"] = {"annotated": annotated}
    (folder / "dataset.json").write_text(json.dumps(dj))
    (folder / "plans.json").write_text(json.dumps({"image_reader_writer": reader, "configurations": {}}))
    for f in folds:
        (folder / f"fold_{f}").mkdir()
        (folder / f"fold_{f}" / "checkpoint_final.pth").write_bytes(b"")
    return folder


def test_resolve_teacher_organ_folds_and_errors(tmp_path):
    binary = _teacher_folder(tmp_path, "Dataset501_Liver", {"background": 0, "liver": 1}, folds=("0", "1"))
    t = resolve_teacher(binary)
    assert (t.organ, t.folds, t.dataset) == ("liver", ("0", "1"), "Dataset501_Liver")
    assert teacher_channel(t) == 1
    assert resolve_teacher(binary / "fold_1").folds == ("1",)
    # a view in the global label set: the organ is what it annotates, its channel the organ's label value
    view = _teacher_folder(tmp_path, "Dataset603_KidneyFed", {"background": 0, "liver": 1, "spleen": 2, "kidney": 3},
                           annotated=["kidney"])
    v = resolve_teacher(view)
    assert v.organ == "kidney" and teacher_channel(v) == 3
    assert resolve_teacher(f"spleen={view}").organ == "spleen"
    multi = _teacher_folder(tmp_path, "Dataset504_Two", {"background": 0, "liver": 1, "kidney": 2})
    with pytest.raises(PseudoLabelError, match=r"say which organ.*ORGAN="):
        resolve_teacher(multi)
    with pytest.raises(PseudoLabelError, match=r"Dataset501_Liver.*no label 'kidney'"):
        resolve_teacher(f"kidney={binary}")
    with pytest.raises(PseudoLabelError, match="no such folder"):
        resolve_teacher(tmp_path / "nothing")
    untrained = _teacher_folder(tmp_path, "Dataset505_Untrained", {"background": 0, "liver": 1}, folds=())
    with pytest.raises(PseudoLabelError, match=r"Dataset505_Untrained.*checkpoint_final"):
        resolve_teacher(untrained)
    with pytest.raises(PseudoLabelError, match=r"fold_3.*does not exist"):
        resolve_teacher(binary, folds=["3"])


def test_resolve_teacher_from_a_benchmark_model(tmp_path):
    from nnunetv2_fedkd.workflows.student_vs_teachers import Model

    _teacher_folder(tmp_path, "Dataset601_LiverFed", {"background": 0, "liver": 1, "kidney": 2},
                    annotated=["liver"], trainer="nnUNetTrainerFedKDBase")
    t = resolve_teacher(Model("Dataset601_LiverFed", "nnUNetTrainerFedKDBase", "all", organ="liver", results=tmp_path))
    assert t.folds == ("all",) and t.organ == "liver" and t.results == tmp_path.absolute()


def test_region_teacher_channel(tmp_path):
    folder = _teacher_folder(tmp_path, "Dataset506_Regions",
                             {"background": 0, "liver": [1, 2], "tumour": 2})
    dj = json.loads((folder / "dataset.json").read_text())
    dj["regions_class_order"] = [1, 2]
    (folder / "dataset.json").write_text(json.dumps(dj))
    assert teacher_channel(resolve_teacher(f"liver={folder}")) == 0
    assert teacher_channel(resolve_teacher(f"tumour={folder}")) == 1


def _write(arr, path, spacing=(0.8, 0.9, 2.5), direction=None):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def test_to_reader_order_between_simpleitk_and_nibabel(tmp_path):
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    arr = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) % 11
    f = _write(arr, tmp_path / "c_0000.nii.gz", direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))
    in_sitk = SimpleITKIO().read_images([str(f)])[0][0]
    in_nib = NibabelIOWithReorient().read_images([str(f)])[0][0]
    assert not np.array_equal(in_sitk.shape, in_nib.shape) or not np.array_equal(in_sitk, in_nib)
    p = (in_sitk / 10.0).astype(np.float32)
    got = to_reader_order(p, [f], "SimpleITKIO", "NibabelIOWithReorient", tmp_path / "scratch")
    np.testing.assert_allclose(got, in_nib / 10.0, atol=1 / 250)
    assert to_reader_order(p, [f], "SimpleITKIO", "SimpleITKIO", tmp_path) is p


# ---------------------------------------------------------------- the dataset (stand-in predictor)

# image intensities encode the truth: 100 liver, 200 kidney, 250 kidney claimed by the liver teacher too,
# 150 a voxel both teachers are unsure about
LIVER_P = {100: 0.95, 150: 0.5, 250: 0.9}
KIDNEY_P = {200: 0.95, 250: 0.95, 150: 0.5}


def _truth_image():
    img = np.zeros((4, 5, 6), np.int16)
    img[1:3, 0:2, 0:3] = 100
    img[1:3, 3:5, 3:6] = 200
    img[1, 3, 3] = 250
    img[3, 0, 0] = 150
    return img


def _site(raw: Path, name: str, organ: str, values: tuple, n_cases: int):
    root = raw / name
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        img = _truth_image()
        _write(img, root / "imagesTr" / f"c{i}_0000.nii.gz")
        lab = np.isin(img, values).astype(np.uint8)
        _write(lab, root / "labelsTr" / f"c{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, organ: 1}, "numTraining": n_cases,
        "file_ending": ".nii.gz", "fedkd": {"annotated": [organ]}}))


@pytest.fixture
def federation(tmp_path):
    raw = tmp_path / "raw"
    _site(raw, "Dataset501_Kid", "kidney", (200, 250), 2)
    _site(raw, "Dataset502_Liv", "liver", (100,), 1)
    spec = FederationSpec("demo", ["liver", "kidney"], [Site("kid", "Dataset501_Kid", ["kidney"]),
                                                        Site("liv", "Dataset502_Liv", ["liver"])])
    results = tmp_path / "results"
    liver = _teacher_folder(results, "Dataset502_Liv", {"background": 0, "liver": 1})
    # the kidney teacher predicted with SimpleITKIO, the dataset reads NibabelIOWithReorient: arrays differ in order
    kidney = _teacher_folder(results, "Dataset501_Kid", {"background": 0, "kidney": 1}, reader="SimpleITKIO")
    return raw, spec, liver, kidney


def fake_predictor(calls=None, skip=None):
    """Stands in for nnUNetv2_predict --save_probabilities: reads each case with the teacher's reader and writes
    [1 - p, p] as nnU-Net would, p looked up from the intensity."""
    from nnunetv2_fedkd.workflows.pseudo_labels import _reader

    def predict(teacher: Teacher, images: Path, out: Path) -> Path:
        out.mkdir(parents=True)
        lut = LIVER_P if teacher.organ == "liver" else KIDNEY_P
        rw = _reader(teacher.plans()["image_reader_writer"])
        cases = sorted(f.name[: -len("_0000.nii.gz")] for f in images.glob("*_0000.nii.gz"))
        if calls is not None:
            calls[teacher.organ] = cases
        for case in cases:
            if case == skip:
                continue
            img = rw.read_images([str(images / f"{case}_0000.nii.gz")])[0][0]
            p = np.vectorize(lambda v: lut.get(int(round(v)), 0.0))(img).astype(np.float32)
            np.savez_compressed(out / f"{case}.npz", probabilities=np.stack([1 - p, p]))
        return out

    return predict


def test_build_pseudo_label_dataset(federation, tmp_path):
    raw, spec, liver, kidney = federation
    calls = {}
    out = build_pseudo_label_dataset(spec, [str(liver), str(kidney)], 512, nnunet_raw=raw,
                                     predictions_dir=tmp_path / "pred", predictor=fake_predictor(calls))
    assert out == raw / "Dataset512_DemoPseudoLabels"
    # each teacher predicted only the cases that do not label its organ
    assert calls == {"liver": ["kid__c0", "kid__c1"], "kidney": ["liv__c0"]}
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "liver": 1, "kidney": 2, "ignore": 3}
    assert dj["numTraining"] == 3 and dj["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
    meta = dj["fedkd"]["pseudo_labels"]
    assert (meta["high"], meta["low"], meta["ignore_label"]) == (0.7, 0.3, 3)
    assert meta["source_case_annotated"] == {"kid__c0": ["kidney"], "kid__c1": ["kidney"], "liv__c0": ["liver"]}
    assert "case_annotated" not in dj["fedkd"]  # every organ is labelled (or ignored) in every case now
    img = _truth_image()
    expected = np.select([img == 100, np.isin(img, (200, 250)), img == 150], [1, 2, 3], 0)
    for case in ("kid__c0", "kid__c1", "liv__c0"):
        lab = sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), expected, err_msg=case)
        ref = sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        assert np.allclose(lab.GetSpacing(), ref.GetSpacing()) and np.allclose(lab.GetOrigin(), ref.GetOrigin())
    rec = json.loads((out / "pseudo_labels.json").read_text())
    kid = rec["cases"]["kid__c0"]  # kidney labelled (the 250 voxel too, over the liver teacher), liver pseudo
    assert kid["labelled"] == int(np.isin(img, (200, 250)).sum()) and kid["pseudo"] == {"liver": 12}
    assert kid["unsure"] == 1 and kid["ignore"] == 1 and kid["conflict"] == 0
    liv = rec["cases"]["liv__c0"]
    assert liv["labelled"] == 12 and liv["pseudo"] == {"kidney": int(np.isin(img, (200, 250)).sum())}
    assert (tmp_path / "pred" / "liver" / "kid__c0.npz").is_file()  # a given predictions_dir is kept
    with pytest.raises(PseudoLabelError, match="already exists"):
        build_pseudo_label_dataset(spec, [str(liver), str(kidney)], 512, nnunet_raw=raw, predictor=fake_predictor())


def test_build_from_a_pooled_dataset(federation, tmp_path):
    from nnunetv2_fedkd.data.pooled import merge_sites

    raw, spec, liver, kidney = federation
    pooled = merge_sites(spec, 510, nnunet_raw=raw)
    out = build_pseudo_label_dataset(pooled, [liver, kidney], 513, nnunet_raw=raw, predictor=fake_predictor())
    assert out.name == "Dataset513_DemoPseudoLabels"
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "liv__c0.nii.gz")))
    assert set(np.unique(a)) == {0, 1, 2, 3}
    assert not list(raw.glob(".*partial")) and not list(Path(raw).glob("fedkd_pseudo_*"))


def test_build_errors_name_the_teacher_and_write_nothing(federation, tmp_path):
    raw, spec, liver, kidney = federation
    with pytest.raises(PseudoLabelError, match=r"Dataset501_Kid.*kid__c1\.npz is missing|"
                                               r"Dataset502_Liv.*kid__c1\.npz is missing"):
        build_pseudo_label_dataset(spec, [liver, kidney], 512, nnunet_raw=raw,
                                   predictor=fake_predictor(skip="kid__c1"))
    assert not (raw / "Dataset512_DemoPseudoLabels").exists() and not list(raw.glob(".*partial"))
    with pytest.raises(PseudoLabelError, match="two teachers for organ 'liver'"):
        build_pseudo_label_dataset(spec, [liver, f"liver={kidney.parent.parent / 'Dataset502_Liv' / kidney.name}"],
                                   512, nnunet_raw=raw, predictor=fake_predictor())
    spleen = _teacher_folder(tmp_path / "r2", "Dataset509_Spleen", {"background": 0, "spleen": 1})
    with pytest.raises(PseudoLabelError, match=r"Dataset509_Spleen.*'spleen'.*not among the federation's labels"):
        build_pseudo_label_dataset(spec, [spleen], 512, nnunet_raw=raw, predictor=fake_predictor())
    with pytest.raises(PseudoLabelError, match="thresholds"):
        build_pseudo_label_dataset(spec, [liver], 512, nnunet_raw=raw, high=0.2, low=0.6)
    assert not list(raw.glob(".*partial"))


def test_cli_pseudo_label_reports_a_teacher_error(federation, tmp_path):
    raw, spec, liver, kidney = federation
    from nnunetv2_fedkd.spec import save_spec

    spec_file = save_spec(spec, tmp_path / "federation.toml")
    env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pre"), "nnUNet_results": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "nnunetv2_fedkd.workflows.cli",
                           "pseudo-label", str(spec_file), "--teachers",
                           f"kidney={liver}", "-d", "512"], env={**os.environ, **env}, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Dataset502_Liv" in proc.stderr and "no label 'kidney'" in proc.stderr


# ---------------------------------------------------------------- the recipe with stock nnU-Net


@pytest.mark.slow
def test_recipe_with_stock_nnunet(tiny_federation, tmp_path):
    """Two single-organ teachers (stock nnUNetv2_train, a few iterations: wiring, not accuracy) pseudo-label the
    tiny federation with the CLI; the dataset passes stock nnUNetv2_plan_and_preprocess --verify_dataset_integrity
    and trains a few iterations with nnU-Net's trainer (with the ignore label) and predicts."""
    from nnunetv2_fedkd.workflows.pipeline import nnunet_script, plan_and_preprocess, predict, small_plans, train

    fed = tiny_federation
    cfg = tmp_path / "short.json"
    cfg.write_text(json.dumps({"num_epochs": 1, "num_iterations_per_epoch": 4, "num_val_iterations_per_epoch": 1,
                               "final_validation": False}))
    teachers = []
    for site in fed.spec.sites[:2]:
        fold = train(site.dataset, "nnUNetTrainerFedKDBase", fed.workdir, cfg, fold="all",
                     log_dir=fed.workdir / "logs", extra_env={"nnUNet_results": str(tmp_path / "teachers")})
        teachers.append(str(fold.parent))
    proc = subprocess.run([nnunet_script("nnunetv2_fedkd"), "pseudo-label", str(fed.spec.path), "--teachers",
                           *teachers, "-d", "520", "-device", "cpu", "--low", "0.2"],
                          env=fed.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = fed.raw / "Dataset520_SyntheticAbdomenPseudoLabels"
    dj = json.loads((out / "dataset.json").read_text())
    ignore = dj["labels"]["ignore"]
    assert ignore == len(fed.spec.labels) + 1
    for lab in sorted((out / "labelsTr").glob("*.nii.gz")):
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(lab))))) <= set(range(ignore + 1))
    plan_and_preprocess([520], fed.workdir, log_dir=fed.workdir / "logs")
    small_plans([out.name], fed.workdir, patch_size=(32, 32, 32))
    train(out.name, "nnUNetTrainerFedKDBase", fed.workdir, cfg, fold="all", log_dir=fed.workdir / "logs",
          extra_env={"nnUNet_results": str(tmp_path / "student")})
    test = fed.raw / fed.spec.test_set.dataset / "imagesTr"
    pred = predict(test, tmp_path / "pred", out.name, "nnUNetTrainerFedKDBase", fed.workdir, fold="all",
                   extra_env={"nnUNet_results": str(tmp_path / "student")})
    assert sorted(pred.glob("*.nii.gz"))
