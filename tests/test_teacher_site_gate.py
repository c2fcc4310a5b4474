"""The per-site teacher gate (nnunetv2_fedkd.distillation.teacher_site_gate): hand counts of one case, the per-site rule, the
table the trainers fold into MS-KD's ``active`` mask, and the trainer step that scores cached teacher outputs."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunetv2_fedkd.data.label_availability import LabelAvailability
from nnunetv2_fedkd.distillation.teacher_site_gate import (
    GATE_JSON,
    TeacherCounts,
    TeacherSiteGate,
    case_sites,
    decide_site_gate,
    gate_metrics,
    score_sites,
    teacher_case_counts,
    unique_teacher_names,
)
from nnunetv2_fedkd.distillation.teachers import TeacherError, TeacherSpec

CLASSES = ["liver", "kidney"]  # student classes 1, 2


# ----------------------------------------------------------------------------------------------------------------------
# one case: counts
# ----------------------------------------------------------------------------------------------------------------------
def test_counts_of_one_case_by_hand():
    # 1 x 8 label map: liver on voxels 0-2, kidney on 4-7, background on 3
    label = np.array([[1, 1, 1, 0, 2, 2, 2, 2]])
    liver_t = np.array([.9, .9, .2, .6, .5, .7, .1, .1])  # claims voxels 0, 1, 3, 4, 5 (>= 0.5)
    kidney_t = np.array([.0, .0, .0, .0, .9, .9, .9, .4])  # claims 4, 5, 6
    probs = np.stack([liver_t, kidney_t]).reshape(2, 1, 8).astype(np.float16)
    c = teacher_case_counts(probs, label, [1, 2], annotated=[1, 2], num_classes=2)
    # liver teacher on liver: tp = |{0, 1}| = 2, pred = 5, ref = 3 -> Dice 4 / 8
    assert (c.tp.tolist(), c.pred.tolist(), c.ref.tolist()) == ([2, 3], [5, 3], [3, 4])
    assert c.dice() == [pytest.approx(0.5), pytest.approx(6 / 7)]
    # liver teacher on the labelled kidney: claims 4, 5 of 4..7 -> 2/4; kidney teacher on the labelled liver: 0/3
    assert c.claimed.tolist() == [[0, 2], [0, 0]] and c.labelled.tolist() == [[0, 4], [3, 0]]
    assert c.fp_rate() == [[None, 0.5], [0.0, None]]
    assert c.own_cases.tolist() == [1, 1] and c.cases == 1


def test_a_case_counts_only_the_organs_it_annotates():
    # a kidney-site case: only kidney annotated, the liver is in the image but labelled 0
    label = np.array([0, 0, 2, 2])
    probs = np.array([[.9, .9, .9, .0], [.0, .0, .9, .9]])  # liver teacher also claims kidney voxel 2
    c = teacher_case_counts(torch.tensor(probs), label[None], [1, 2], annotated=[2], num_classes=2)
    assert c.own_cases.tolist() == [0, 1]  # liver is not annotated: no Dice for the liver teacher
    assert (c.tp[0], c.pred[0], c.ref[0]) == (0, 0, 0) and c.dice()[0] is None
    assert c.dice()[1] == pytest.approx(1.0)
    assert c.claimed.tolist() == [[0, 1], [0, 0]] and c.labelled.tolist() == [[0, 2], [0, 0]]
    assert c.fp_rate()[0] == [None, 0.5]


def test_ignore_label_and_shape_checks():
    label = np.array([1, 1, 3, 0])  # 3 = nnU-Net's ignore label
    probs = np.array([[.9, .1, .9, .9]])
    c = teacher_case_counts(probs, label, [1], annotated=[1], num_classes=2, ignore_label=3)
    assert (c.tp[0], c.pred[0], c.ref[0]) == (1, 2, 2)  # voxel 2 (ignored) is not a false positive
    with pytest.raises(ValueError, match="do not fit"):
        teacher_case_counts(probs, label[:3], [1], [1], 2)
    with pytest.raises(ValueError, match="foreground classes"):
        teacher_case_counts(probs, label, [3], [1], 2)


def test_counts_add_up_over_cases():
    a = teacher_case_counts(np.array([[.9, .9]]), np.array([1, 0]), [1], [1], 1)
    b = teacher_case_counts(np.array([[.0, .9]]), np.array([1, 1]), [1], [1], 1)
    s = a + b
    assert (s.tp[0], s.pred[0], s.ref[0], s.cases) == (2, 3, 3, 2)
    assert s.dice()[0] == pytest.approx(4 / 6)  # pooled over the cases, not a mean of per-case Dice
    assert (TeacherCounts.zeros(1, 1) + a).tp.tolist() == [1]


# ----------------------------------------------------------------------------------------------------------------------
# sites and the rule
# ----------------------------------------------------------------------------------------------------------------------
def _two_sites(liver_claims_kidney: int = 57, kidney_claims_at_b: int = 3):
    """Teachers liver (class 1) and kidney (class 2); 2 kidney sites with 100 labelled kidney voxels each: at
    site_a the liver teacher claims 57 of them, at site_b none; the kidney teacher finds 90 of 100 at both."""
    cases, labels, probs = {}, {}, {}
    for site, n_liver in (("site_a", liver_claims_kidney), ("site_b", kidney_claims_at_b)):
        label = np.zeros(200, np.int16)
        label[:100] = 2
        liver = np.zeros(200)
        liver[:n_liver] = 0.8
        kidney = np.zeros(200)
        kidney[10:100] = 0.95
        probs[f"{site}__0"] = np.stack([liver, kidney])
        labels[f"{site}__0"] = label
        cases[f"{site}__0"] = site
    return cases, labels, probs


def _decide(max_fp=0.2, min_dice=0.5, **kw):
    cases, labels, probs = _two_sites(**kw)
    counts = score_sites(list(cases), lambda i: (probs[i], labels[i]), lambda i: [2], cases, [1, 2], 2)
    return decide_site_gate(counts, ["liver", "kidney"], [1, 2], CLASSES, max_fp, min_dice)


def test_teacher_claiming_57_percent_of_another_organ_is_off_at_that_site_and_on_elsewhere():
    d = _decide()
    assert d.sites == ["site_a", "site_b"]
    assert d.ok.tolist() == [[False, True], [True, True]]  # [site, teacher]: liver teacher off at site_a only
    assert d.figures["site_a"]["liver"]["fp_rate"] == {"kidney": 0.57}
    assert d.figures["site_b"]["liver"]["fp_rate"] == {"kidney": 0.03}
    assert d.figures["site_a"]["kidney"]["dice"] == pytest.approx(2 * 90 / 190, abs=1e-4)
    line = next(x for x in d.lines if "site_a" in x and "57.0 %" in x)
    assert "teacher liver" in line and "labelled kidney voxels" in line and "max_teacher_fp_rate 0.2" in line
    assert line.endswith("left out there")
    assert any("site_b" in x and "3.0 %" in x and x.endswith("may speak there") for x in d.lines)
    assert d.table() == {"site_a": {"liver": False, "kidney": True}, "site_b": {"liver": True, "kidney": True}}


def test_low_dice_on_its_own_organ_at_one_site_is_off_everywhere():
    # kidney teacher: Dice 2*90/190 = 0.947 at both sites; a threshold above it turns it off at every site
    d = _decide(min_dice=0.95)
    assert d.ok[:, 1].tolist() == [False, False]
    assert any("its Dice on kidney is 0.947" in x and x.endswith("left out at every site") for x in d.lines)
    assert d.ok[:, 0].tolist() == [False, True]  # the liver teacher is judged by its FP rate as before


def test_disabled_thresholds_leave_every_teacher_on():
    d = _decide(max_fp=1.0, min_dice=0.0, liver_claims_kidney=100)  # claims 100 %: still not > 1.0
    assert d.ok.all()


def test_site_table_maps_batch_keys_to_allowed_teachers():
    gate = TeacherSiteGate(["site_a", "site_b"], [[False, True], [True, True]],
                           {"site_a__0": "site_a", "site_b__0": "site_b"}, default_site="site_b")
    assert gate.allowed(["site_a__0", "site_b__0", "other"]).tolist() == [[False, True], [True, True], [True, True]]
    lone = TeacherSiteGate(["site_a"], [[False, True]], {}, default_site="site_c")  # a site without figures: on
    assert lone.allowed(["x"]).tolist() == [[True, True]]
    with pytest.raises(ValueError, match="2 sites"):
        TeacherSiteGate(["a", "b"], [[True]], {}, "a")


def test_case_sites_and_names_and_metrics():
    dj = {"fedkd": {"case_site": {"a__0": "a"}}}
    assert case_sites(dj, ["a__0", "b__1"], "home") == {"a__0": "a", "b__1": "home"}
    assert case_sites({}, ["c"], "home") == {"c": "home"}
    assert unique_teacher_names(["liver", "kidney", "liver"]) == ["liver#0", "kidney", "liver#2"]
    d = _decide()
    m = gate_metrics(d)  # two sites: the site is named in the key
    assert m["teacher_gate.site_a.liver.fp_rate.kidney"] == 0.57 and m["teacher_gate.site_a.liver.speaks"] == 0
    assert m["teacher_gate.site_b.liver.speaks"] == 1
    one = decide_site_gate(score_sites(["x"], lambda i: (np.array([[.9, .9]]), np.array([1, 2])),
                                       lambda i: [1, 2], {"x": "site_a"}, [1], 2),
                           ["liver"], [1], CLASSES, 0.2, 0.5)
    m = gate_metrics(one)  # one site (a federated site's own dataset): no site in the key
    assert m == {"teacher_gate.liver.dice": pytest.approx(2 / 3, abs=1e-4), "teacher_gate.liver.fp_rate.kidney": 1.0,
                 "teacher_gate.liver.speaks": 0}
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values())  # Flower: numbers only


# ----------------------------------------------------------------------------------------------------------------------
# the trainer step: scores from the teacher cache and the cases' segmentations
# ----------------------------------------------------------------------------------------------------------------------
POOLED = {"labels": {"background": 0, "liver": 1, "kidney": 2},
          "fedkd": {"annotated": ["liver", "kidney"],
                    "case_annotated": {"liver_site__0": ["liver"], "kidney_site__0": ["kidney"],
                                       "kidney_site__1": ["kidney"]},
                    "case_site": {"liver_site__0": "liver_site", "kidney_site__0": "kidney_site",
                                  "kidney_site__1": "kidney_site"}}}


class _Dataset:
    """nnU-Net's dataset interface: load_case -> (data, seg [1, *S], seg_prev, properties)."""

    def __init__(self, segs):
        self.segs = segs
        self.identifiers = list(segs)

    def load_case(self, ident):
        seg = self.segs[ident]
        return np.zeros((1, *seg.shape), np.float32), seg[None], None, {}


def _gate_trainer(tmp_path, cls, **settings):
    t = object.__new__(cls)
    t.fedkd_config = {**cls.config_defaults, "teacher_outputs": "cached", "feature_kd_weight": 0.0, **settings}
    t.fedkd_config_file = Path("/cfg/fedkd.json")
    t.teacher_specs = [TeacherSpec(Path("/teachers/liver"), ["0"], organ="liver"),
                       TeacherSpec(Path("/teachers/kidney"), ["0"], organ="kidney")]
    t.dataset_json = POOLED
    t.label_availability = LabelAvailability(POOLED)
    t.label_manager = SimpleNamespace(has_regions=False, ignore_label=None)
    t._teacher_organ_index = [0, 1]
    t.plans_manager = SimpleNamespace(dataset_name="Dataset510_Pooled")
    t.local_rank = 0
    t.output_folder = str(tmp_path / "fold_0")
    t.log = []
    t.print_to_log_file = lambda *a, **k: t.log.append(" ".join(map(str, a)))
    return t


def _cache(tmp_path, own_rows: int = 2):
    """Cases 4 x 5 voxels; the liver teacher claims 11 of the 20 labelled kidney voxels of the kidney site (55 %).
    Each teacher finds ``own_rows`` of the 2 rows of its organ (2: Dice 1; 1: Dice 2/3)."""
    from nnunetv2_fedkd.distillation.teacher_cache import save_cached

    folder = tmp_path / "cache"
    folder.mkdir()
    segs = {}
    liver_case = np.zeros((4, 5), np.int16)
    liver_case[:2] = 1
    segs["liver_site__0"] = liver_case
    probs = np.zeros((2, 4, 5), np.float16)
    probs[0, :own_rows] = 0.9  # the liver teacher finds the liver at home
    save_cached(folder, "liver_site__0", probs, (4, 5))
    for n, claimed in ((0, 6), (1, 5)):
        kid = np.zeros((4, 5), np.int16)
        kid[2:] = 2  # 10 kidney voxels per case
        segs[f"kidney_site__{n}"] = kid
        p = np.zeros((2, 4, 5), np.float16)
        p[0].reshape(-1)[10:10 + claimed] = 0.8  # liver teacher claims part of the labelled kidney
        p[1, 2:2 + own_rows] = 0.9  # the kidney teacher finds the kidney
        save_cached(folder, f"kidney_site__{n}", p, (4, 5))
    return folder, _Dataset(segs)


def test_trainer_scores_the_cached_teacher_outputs_per_site_logs_and_writes_the_table(tmp_path):
    from nnunetv2_fedkd.trainers.distillation import nnUNetTrainerMSKD

    t = _gate_trainer(tmp_path, nnUNetTrainerMSKD)
    t._check_settings()
    assert t._site_gate_enabled()
    folder, dataset = _cache(tmp_path)
    gate = t._gate_teachers_per_site(dataset, folder)
    assert gate.sites == ["liver_site", "kidney_site"]
    assert gate.ok.tolist() == [[True, True], [False, True]]
    assert gate.allowed(["kidney_site__1", "liver_site__0"]).tolist() == [[False, True], [True, True]]
    line = next(x for x in t.log if "55.0 %" in x)
    assert line.startswith("teacher gate: teacher liver (/teachers/liver): at site kidney_site it claims 55.0 % of "
                           "the labelled kidney voxels") and line.endswith("left out there")
    table = json.loads((tmp_path / "fold_0" / GATE_JSON).read_text())
    assert table["may_speak"] == {"liver_site": {"liver": True, "kidney": True},
                                  "kidney_site": {"liver": False, "kidney": True}}
    assert table["figures"]["kidney_site"]["liver"]["fp_rate"] == {"kidney": 0.55}
    assert table["figures"]["liver_site"]["liver"]["dice"] == 1.0
    assert table["rule"]["max_teacher_fp_rate"] == 0.2 and table["rule"]["min_teacher_site_dice"] == 0.5
    assert t._teacher_gate_metrics()["teacher_gate.kidney_site.liver.speaks"] == 0


def test_trainer_gate_off_when_disabled_and_refuses_bad_settings(tmp_path):
    from nnunetv2_fedkd.trainers.distillation import nnUNetTrainerMSKD

    t = _gate_trainer(tmp_path, nnUNetTrainerMSKD, max_teacher_fp_rate=1.0, min_teacher_site_dice=0)
    assert not t._site_gate_enabled()  # nothing is predicted or scored: today's behaviour
    assert t._teacher_gate_metrics() == {}
    t.teacher_specs = []
    t.fedkd_config.update(max_teacher_fp_rate=0.2)
    assert not t._site_gate_enabled()  # no teachers, nothing to gate
    for bad in (1.5, -0.1, "0.2", True):
        t.fedkd_config["max_teacher_fp_rate"] = bad
        with pytest.raises(TeacherError, match="max_teacher_fp_rate must be a number in"):
            t._check_settings()


def test_mskd_stops_when_no_teacher_may_speak_anywhere_fedkd_goes_on(tmp_path):
    from nnunetv2_fedkd.trainers.distillation import nnUNetTrainerMSKD
    from nnunetv2_fedkd.trainers.fedkd import nnUNetTrainerFedKD

    folder, dataset = _cache(tmp_path, own_rows=1)  # both teachers: Dice 2/3 on their own organ
    with pytest.raises(TeacherError, match="no teacher may speak at any site"):
        _gate_trainer(tmp_path, nnUNetTrainerMSKD, min_teacher_site_dice=0.7)._gate_teachers_per_site(dataset,
                                                                                                       folder)
    t = _gate_trainer(tmp_path, nnUNetTrainerFedKD, min_teacher_site_dice=0.7)
    assert not t._gate_teachers_per_site(dataset, folder).ok.any()
    t = _gate_trainer(tmp_path, nnUNetTrainerMSKD, min_teacher_site_dice=0.6)  # 2/3 passes
    assert t._gate_teachers_per_site(dataset, folder).ok.tolist() == [[True, True], [False, True]]


def test_settings_are_known_to_the_mskd_and_fedkd_trainers_only():
    from nnunetv2_fedkd.trainers.distillation import (nnUNetTrainerDualKD, nnUNetTrainerEnsembleKD,
                                                      nnUNetTrainerMSKD, nnUNetTrainerMSKDMultiHead)
    from nnunetv2_fedkd.trainers.fedkd import nnUNetTrainerFedKD, nnUNetTrainerFedKDMultiHead

    for cls in (nnUNetTrainerMSKD, nnUNetTrainerMSKDMultiHead, nnUNetTrainerFedKD, nnUNetTrainerFedKDMultiHead):
        assert cls.config_defaults["max_teacher_fp_rate"] == 0.2
        assert cls.config_defaults["min_teacher_site_dice"] == 0.5
    for cls in (nnUNetTrainerEnsembleKD, nnUNetTrainerDualKD):  # no single-organ teachers: no site gate
        assert "max_teacher_fp_rate" not in cls.config_defaults


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_the_gate_is_computed_once_when_the_datasets_are_made(tmp_path, monkeypatch, mode):
    """Control flow of ``get_tr_and_val_datasets``: with the gate on, the teacher cache is built (online teachers
    too) and scored; cached KD wraps the dataset, online KD keeps nnU-Net's; with the gate off and online teachers
    nothing is built."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_fedkd.distillation.teacher_cache import TeacherCachedDataset
    from nnunetv2_fedkd.trainers.distillation import nnUNetTrainerMSKD

    folder, dataset = _cache(tmp_path)
    monkeypatch.setattr(nnUNetTrainer, "get_tr_and_val_datasets", lambda self: (dataset, "val"))
    built = []
    t = _gate_trainer(tmp_path, nnUNetTrainerMSKD, teacher_outputs=mode)
    t.teachers = ["net"]
    t._build_teacher_cache = lambda ds: built.append(ds) or folder
    tr, val = t.get_tr_and_val_datasets()
    assert built == [dataset] and val == "val"
    assert t._teacher_site_gate.ok.tolist() == [[True, True], [False, True]]
    if mode == "cached":
        assert isinstance(tr, TeacherCachedDataset) and t.teachers == []
    else:
        assert tr is dataset and t.teachers == ["net"]  # online KD still needs the networks
    off = _gate_trainer(tmp_path, nnUNetTrainerMSKD, teacher_outputs=mode, max_teacher_fp_rate=1.0,
                        min_teacher_site_dice=0.0)
    off._build_teacher_cache = lambda ds: built.append(ds) or folder
    tr, _ = off.get_tr_and_val_datasets()
    assert off._teacher_site_gate is None
    assert len(built) == (2 if mode == "cached" else 1)  # online and gate off: nothing predicted (today's cost)


def test_gate_figures_fit_a_site_updates_metrics_through_flower_and_the_round_core():
    """The figures travel in the update's free-form metrics: Flower's MetricRecord (numbers only) and the round
    core's per-site record keep them as they are; the coordinator's checks look at weights and case counts only."""
    from nnunetv2_fedkd.federated.aggregation import SiteUpdate
    from nnunetv2_fedkd.federated.round_core import _jsonable
    from nnunetv2_fedkd.flower import task

    d = decide_site_gate(score_sites(["x"], lambda i: (np.array([[.9, .9, .1]]), np.array([1, 2, 0])),
                                     lambda i: [1, 2], {"x": "kidney_site"}, [1], 2),
                         ["liver"], [1], CLASSES, 0.2, 0.5)
    metrics = {"train_loss": 0.5, "iterations": 10, **gate_metrics(d)}
    u = SiteUpdate("kidney_site", {"w": torch.ones(2)}, 3, metrics, organs={"kidney"})
    back = task.read_update(task.update_content(u))
    assert back.metrics == metrics
    assert _jsonable(back.metrics) == metrics
