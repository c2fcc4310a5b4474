"""Fast tests of the distillation trainers' wiring (nnunetv2_fedkd.trainers.distillation) without nnU-Net's
__init__: the loss wrapper's deep-supervision scaling and which voxels / samples the MS-KD teachers may speak on."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunetv2_fedkd.data.label_availability import LabelAvailability
from nnunetv2_fedkd.distillation.teachers import TeacherSpec
from nnunetv2_fedkd.trainers.distillation import (
    _LossWithTerms,
    labelled_foreground,
    nnUNetTrainerMSKD,
    nnUNetTrainerMSKDMultiHead,
    teacher_kd_masks,
)

DATASET_JSON = {
    "labels": {"background": 0, "liver": 1, "kidney": 2},
    "fedkd": {"annotated": ["liver", "kidney"],
              "case_annotated": {"kid_0": ["kidney"], "liv_0": ["liver"], "none_0": []}},
}


# ----------------------------------------------------------------------------------------------------------------------
# _LossWithTerms: KD scaled by the full-resolution deep-supervision weight
# ----------------------------------------------------------------------------------------------------------------------
class _AbsMean(nn.Module):
    def forward(self, output, target):
        return (output - target).abs().mean()


def test_terms_are_scaled_by_the_full_resolution_deep_supervision_weight():
    # nnU-Net's normalised weights for 3 outputs: 1, 1/2, 0 -> 2/3, 1/3, 0
    w = [1.0, 0.5, 0.0]
    w = [x / sum(w) for x in w]
    out = [torch.full((1, 1, 4), 1.0), torch.full((1, 1, 2), 2.0), torch.full((1, 1, 1), 5.0)]
    tgt = [torch.zeros(1, 1, 4), torch.zeros(1, 1, 2), torch.zeros(1, 1, 1)]
    gt = w[0] * 1.0 + w[1] * 2.0  # the third output has weight 0
    loss = _LossWithTerms(DeepSupervisionWrapper(_AbsMean(), w), gt_weight=1.0)
    assert loss(out, tgt).item() == pytest.approx(gt, abs=1e-6)  # no terms
    loss.terms = lambda output: output[0].sum() * 0 + 3.0  # a term of value 3 on the full-resolution output
    assert loss(out, tgt).item() == pytest.approx(gt + (2 / 3) * 3.0, abs=1e-6)  # gt + w0 * term
    assert loss.terms_scale == pytest.approx(2 / 3)
    # gt_weight multiplies the ground-truth loss only
    loss.gt_weight = 0.5
    assert loss(out, tgt).item() == pytest.approx(0.5 * gt + (2 / 3) * 3.0, abs=1e-6)
    # deep supervision off: the loss is not a DeepSupervisionWrapper, the terms are added as they are
    plain = _LossWithTerms(_AbsMean(), gt_weight=1.0)
    plain.terms = lambda output: 3.0 + 0 * output.sum()
    assert plain.terms_scale == 1.0
    assert plain(out[0], tgt[0]).item() == pytest.approx(1.0 + 3.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# which samples / voxels the teachers may speak on
# ----------------------------------------------------------------------------------------------------------------------
def test_labelled_foreground_of_label_maps_and_region_targets():
    label_map = torch.tensor([[[[0, 2], [1, 0]]]], dtype=torch.float32)  # [B, 1, 2, 2]
    assert labelled_foreground(label_map).tolist() == [[[[False, True], [True, False]]]]
    assert labelled_foreground([label_map, label_map[..., :1, :1]]).shape == (1, 1, 2, 2)  # full resolution
    regions = torch.tensor([[[[0, 1], [0, 0]], [[0, 0], [1, 0]]]], dtype=torch.bool)  # [B, K = 2, 2, 2]
    assert labelled_foreground(regions).tolist() == [[[[False, True], [True, False]]]]


def test_teacher_kd_masks():
    la = LabelAvailability(DATASET_JSON)
    target = torch.zeros(3, 1, 4)
    target[0, 0, 1] = 2  # kidney labelled on voxel 1 of the kidney case
    target[1, 0, 2] = 1  # liver labelled on voxel 2 of the liver case
    valid = torch.tensor([True, True, True, False]).view(1, 1, 4).expand(3, 1, 4)
    # teachers: liver (label index 0), kidney (label index 1)
    active, keep = teacher_kd_masks(la, ["kid_0", "liv_0", "none_0"], [0, 1], target, valid)
    assert active.tolist() == [[True, False], [False, True], [True, True]]
    assert keep[:, 0].tolist() == [[True, False, True, False], [True, True, False, False],
                                   [True, True, True, False]]
    active, keep = teacher_kd_masks(la, ["kid_0", "liv_0", "none_0"], [1], target)  # kidney teacher only
    assert active.tolist() == [[False], [True], [True]] and keep.shape == (3, 1, 4)


def _fake_trainer(cls, mode: str, sigmoid: bool, organ_index):
    """An MS-KD trainer object with just what ``_kd_terms`` reads (nnU-Net's __init__ does not run)."""
    t = object.__new__(cls)
    t.fedkd_config = {**cls.config_defaults, "teacher_outputs": mode, "feature_kd_weight": 0.0,
                      "kd_weight": 1.0, "kd_temperature": 1.0, "kd_background_weight": 1.0, "kd_rampup_epochs": 0}
    t.fedkd_config_file = Path("/cfg/fedkd.json")
    t.teacher_specs = [TeacherSpec(Path("/teachers/liver"), ["0"], organ="liver")]
    t.device = torch.device("cpu")
    t.current_epoch = 0
    t.enable_deep_supervision = True
    t.label_availability = LabelAvailability(DATASET_JSON)
    t.label_manager = SimpleNamespace(has_regions=sigmoid)
    t._teacher_organ_index = list(organ_index)
    return t


class _LiverEverywhere(nn.Module):
    """A liver teacher sure of liver (p = .9) on every voxel: (class probabilities, features)."""

    def forward(self, x):
        p = torch.full_like(x[:, :1], 0.9)
        return torch.cat([1 - p, p], 1), x


SPATIAL = (4, 5)


def _batch_and_target(region_target: bool):
    """Sample 0: kidney case (kidney labelled on the left half of the patch); sample 1: liver case (liver labelled on
    the top row)."""
    lab = torch.zeros(2, 1, *SPATIAL)
    lab[0, 0, :, :2] = 2
    lab[1, 0, 0, :] = 1
    if region_target:  # nnU-Net's region one-hot for the multi-head trainer: [B, K = 2 (liver, kidney), *S]
        target = torch.cat([lab == 1, lab == 2], 1).float()
    else:
        target = lab
    return {"data": torch.zeros(2, 1, *SPATIAL), "keys": ["kid_0", "liv_0"],
            "target": [target, target[..., ::2, ::2]]}, lab


@pytest.mark.parametrize("mode", ["online", "cached"])
@pytest.mark.parametrize("multihead", [False, True])
def test_mskd_teacher_never_overrides_a_label(mode, multihead):
    """A liver teacher predicting liver everywhere: on the kidney case's labelled kidney voxels it gives no KD
    gradient (the label wins), elsewhere on that case it does; on the liver case (which annotates liver) it gives
    none at all."""
    cls = nnUNetTrainerMSKDMultiHead if multihead else nnUNetTrainerMSKD
    t = _fake_trainer(cls, mode, multihead, [0])  # one teacher: liver (label index 0)
    batch, lab = _batch_and_target(region_target=multihead)
    target = batch["target"]
    if mode == "online":
        t.teachers, t._teacher_channel = [_LiverEverywhere()], [1]
    else:  # the cached teacher output rides along as the last target entry: stored 1 + p
        batch["target"] = target + [torch.full((2, 1, *SPATIAL), 1.9)]
    terms = t._kd_terms(batch)
    if mode == "cached":
        assert len(batch["target"]) == 2 and batch["target"][0] is target[0]  # split off before use
    c_out = 2 if multihead else 3
    out = torch.zeros(2, c_out, *SPATIAL, requires_grad=True)
    loss = terms([out, out[..., ::2, ::2]])
    loss.backward()
    g = out.grad
    kidney = lab[0, 0] == 2
    assert torch.all(g[0][:, kidney] == 0)  # labelled kidney voxels: untouched by the liver teacher
    liver_ch = 0 if multihead else 1
    assert torch.all(g[0, liver_ch][~kidney] < 0)  # unlabelled voxels of the kidney case: pushed toward liver
    assert torch.all(g[1] == 0)  # the liver case annotates liver: the liver teacher is silent
    # value: per-voxel mean over the batch, liver-region voxels only (p_liver: 1/3 softmax, 1/2 sigmoid)
    p_student = 0.5 if multihead else 1 / 3
    n_unlabelled = int((~kidney).sum())
    p_t = min(max(0.9, 1e-6), 1 - 1e-6)
    per_voxel = p_t * math.log(p_t / p_student) + (1 - p_t) * math.log((1 - p_t) / (1 - p_student))
    assert loss.item() == pytest.approx(n_unlabelled * per_voxel / (2 * SPATIAL[0] * SPATIAL[1]), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# the per-site teacher gate folded into the active mask
# ----------------------------------------------------------------------------------------------------------------------
TWO_KIDNEY_SITES = {
    "labels": {"background": 0, "liver": 1, "kidney": 2},
    "fedkd": {"annotated": ["liver", "kidney"],
              "case_annotated": {"a__0": ["kidney"], "b__0": ["kidney"]},
              "case_site": {"a__0": "site_a", "b__0": "site_b"}},
}


@pytest.mark.parametrize("mode", ["online", "cached"])
@pytest.mark.parametrize("multihead", [False, True])
def test_teacher_gated_off_at_a_site_gives_no_kd_on_that_sites_cases(mode, multihead):
    """Two kidney-site cases, one per site; the liver teacher is gated off at site_a (it claimed the kidney there):
    no KD gradient at all on site_a's case, KD toward liver on site_b's unlabelled voxels as before. A table that
    lets every teacher speak gives exactly the loss without a gate."""
    from nnunetv2_fedkd.distillation.teacher_site_gate import TeacherSiteGate

    cls = nnUNetTrainerMSKDMultiHead if multihead else nnUNetTrainerMSKD
    t = _fake_trainer(cls, mode, multihead, [0])
    t.label_availability = LabelAvailability(TWO_KIDNEY_SITES)
    case_site = TWO_KIDNEY_SITES["fedkd"]["case_site"]

    def run(gate):
        t._teacher_site_gate = gate
        lab = torch.zeros(2, 1, *SPATIAL)
        lab[:, 0, :, :2] = 2  # both cases: kidney labelled on the left half of the patch
        target = torch.cat([lab == 1, lab == 2], 1).float() if multihead else lab
        batch = {"data": torch.zeros(2, 1, *SPATIAL), "keys": ["a__0", "b__0"],
                 "target": [target, target[..., ::2, ::2]]}
        if mode == "online":
            t.teachers, t._teacher_channel = [_LiverEverywhere()], [1]
        else:
            batch["target"] = batch["target"] + [torch.full((2, 1, *SPATIAL), 1.9)]
        terms = t._kd_terms(batch)
        out = torch.zeros(2, 2 if multihead else 3, *SPATIAL, requires_grad=True)
        loss = terms([out, out[..., ::2, ::2]])
        loss.backward()
        return loss.detach(), out.grad, lab[0, 0] == 2

    loss_gated, g, kidney = run(TeacherSiteGate(["site_a", "site_b"], [[False], [True]], case_site, "site_a"))
    assert torch.all(g[0] == 0)  # site_a: the liver teacher is silent
    liver_ch = 0 if multihead else 1
    assert torch.all(g[1, liver_ch][~kidney] < 0) and torch.all(g[1][:, kidney] == 0)  # site_b: as before
    loss_open, g_open, _ = run(TeacherSiteGate(["site_a", "site_b"], [[True], [True]], case_site, "site_a"))
    loss_none, g_none, _ = run(None)
    assert torch.all(g_open[0, liver_ch][~kidney] < 0)
    assert torch.equal(loss_open, loss_none) and torch.equal(g_open, g_none)
    assert loss_gated.item() == pytest.approx(loss_none.item() / 2, rel=1e-5)  # one of the two samples left


def test_teacher_kd_masks_with_a_site_gate():
    from nnunetv2_fedkd.distillation.teacher_site_gate import TeacherSiteGate

    la = LabelAvailability(TWO_KIDNEY_SITES)
    gate = TeacherSiteGate(["site_a", "site_b"], [[False, True], [True, True]],
                           TWO_KIDNEY_SITES["fedkd"]["case_site"], "site_a")
    target = torch.zeros(2, 1, 4)
    active, _ = teacher_kd_masks(la, ["a__0", "b__0"], [0, 1], target, site_gate=gate)
    # the kidney teacher (index 1) is inactive on both: the cases annotate kidney; the liver teacher only at site_b
    assert active.tolist() == [[False, False], [True, False]]
    with pytest.raises(ValueError, match="site gate"):
        teacher_kd_masks(la, ["a__0", "b__0"], [0], target, site_gate=gate)
