"""Fast checks of the teacher plumbing: config parsing, safe checkpoint reading, decoder channel lookup."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from nnunetv2_fedkd.distillation.teachers import (
    TeacherError, gate_teachers, load_checkpoint, parse_teachers, probs_to_logit,
                                     recorded_validation_dice)
from nnunetv2_fedkd.trainers.distillation import decoder_stage_channels


def test_parse_teachers_validates_entries(tmp_path):
    specs = parse_teachers([{"results_folder": str(tmp_path), "folds": 0, "organ": "liver"}], "teachers", True)
    assert specs[0].folds == ["0"] and specs[0].organ == "liver" and specs[0].checkpoint == "checkpoint_final.pth"
    with pytest.raises(TeacherError, match="needs 'organ'"):
        parse_teachers([{"results_folder": str(tmp_path)}], "teachers", need_organ=True)
    with pytest.raises(TeacherError, match="unknown teacher keys"):
        parse_teachers([{"results_folder": str(tmp_path), "fold": 0}], "teachers")
    with pytest.raises(TeacherError, match="checkpoint must be one of"):
        parse_teachers([{"results_folder": str(tmp_path), "checkpoint": "x.pth"}], "teachers")
    with pytest.raises(TeacherError, match="expected a list"):
        parse_teachers({"results_folder": str(tmp_path)}, "teachers")


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoint_is_read_without_unpickling(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"network_weights": {"w": torch.ones(2)}, "trainer_name": "nnUNetTrainer",
                "logging": {"x": [np.float32(1.0), np.float64(2.0)]}, "init_args": {"configuration": "3d_fullres"}},
               good)
    assert load_checkpoint(good)["trainer_name"] == "nnUNetTrainer"  # numpy scalars in nnU-Net's log are fine
    evil = tmp_path / "evil.pth"
    torch.save({"network_weights": {}, "trainer_name": _Boom()}, evil)
    with pytest.raises(TeacherError, match="cannot be read safely"):
        load_checkpoint(evil)
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(TeacherError, match="cannot be read safely"):
        load_checkpoint(raw)
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[:50])
    with pytest.raises(TeacherError, match=str(trunc)):
        load_checkpoint(trunc)
    with pytest.raises(TeacherError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    notnn = tmp_path / "notnn.pth"
    torch.save({"weights": {}}, notnn)
    with pytest.raises(TeacherError, match="not an nnU-Net checkpoint"):
        load_checkpoint(notnn)


def _teacher_folder(root, name, ema_per_fold):
    """A results folder whose fold checkpoints record these EMA pseudo Dice histories (None: no record)."""
    folder = root / name
    folder.mkdir()
    for f in ("plans.json", "dataset.json"):
        (folder / f).write_text("{}")
    for fold, ema in ema_per_fold.items():
        (folder / f"fold_{fold}").mkdir(parents=True)
        logging = {} if ema is None else {"ema_fg_dice": [np.float64(v) for v in ema], "mean_fg_dice": list(ema)}
        torch.save({"network_weights": {"w": torch.ones(1)}, "trainer_name": "nnUNetTrainer", "logging": logging},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def test_teachers_that_learned_nothing_are_left_out(tmp_path):
    good = _teacher_folder(tmp_path, "liver", {"0": [0.1, 0.5, 0.8], "1": [0.2, 0.6]})
    failed = _teacher_folder(tmp_path, "kidney", {"all": [0.02, 0.0, 0.01]})
    unknown = _teacher_folder(tmp_path, "spleen", {"0": None})
    specs = parse_teachers([{"results_folder": str(good), "folds": [0, 1], "organ": "liver"},
                            {"results_folder": str(failed), "folds": ["all"], "organ": "kidney"},
                            {"results_folder": str(unknown), "folds": [0], "organ": "spleen"}], "teachers", True)
    assert recorded_validation_dice(specs[0]) == pytest.approx(0.7)  # last EMA value, mean over the folds
    assert recorded_validation_dice(specs[1]) == pytest.approx(0.01)
    assert recorded_validation_dice(specs[2]) is None
    kept, lines = gate_teachers(specs, 0.05)
    assert [s.organ for s in kept] == ["liver", "spleen"]  # a teacher without a record is kept
    assert "NOT used" in lines[1] and "0.010 < min_teacher_dice 0.05" in lines[1] and str(failed) in lines[1]
    assert "no validation Dice recorded" in lines[2]
    kept, _ = gate_teachers(specs, 0.75)
    assert [s.organ for s in kept] == ["spleen"]
    with pytest.raises(TeacherError, match="teacher folder .*nope has no plans.json"):  # still errors
        gate_teachers(parse_teachers([{"results_folder": str(tmp_path / "nope"), "organ": "liver"}], "t", True), 0.1)
    with pytest.raises(TeacherError, match="checkpoint .*fold_3.* does not exist"):
        gate_teachers(parse_teachers([{"results_folder": str(good), "folds": [3], "organ": "liver"}], "t", True), 0.1)


def test_decoder_stage_channels_and_probs_to_logit():
    conf = {"architecture": {"arch_kwargs": {"features_per_stage": [8, 16, 32, 64]}}}
    # decoder stages run from low to full resolution: 32, 16, 8 channels
    assert [decoder_stage_channels(conf, s) for s in (0, 1, 2, -1)] == [32, 16, 8, 8]
    with pytest.raises(TeacherError, match="out of range"):
        decoder_stage_channels(conf, 3)
    p = torch.tensor([0.5, 0.8807970779778823, 0.0, 1.0])
    z = probs_to_logit(p)
    assert z[0].item() == pytest.approx(0.0) and z[1].item() == pytest.approx(2.0, abs=1e-5)
    assert torch.isfinite(z).all()


# ----------------------------------------------------------------------------------------------------------------------
# geometry: axis order (transpose_forward), spacing, padding, features
# ----------------------------------------------------------------------------------------------------------------------
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402
from torch import nn  # noqa: E402

from nnunetv2_fedkd.distillation.teachers import (FrozenTeacher, TeacherSpec, axis_permutation,  # noqa: E402
                                     inverse_permutation, padded_crop)


def _plans(name, transpose, spacing, strides=((1, 1, 1), (2, 2, 2))):
    """A PlansManager as nnU-Net writes it, reduced to what the teacher's input map reads (z-score intensities)."""
    return PlansManager({
        "dataset_name": name, "plans_name": f"{name}Plans", "transpose_forward": list(transpose),
        "transpose_backward": [list(transpose).index(i) for i in range(len(transpose))],
        "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0,
                                                              "percentile_99_5": 1.0}},
        "configurations": {"3d_fullres": {
            "patch_size": [16] * len(spacing), "spacing": list(spacing), "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "data_identifier": f"{name}_3d_fullres",
            "architecture": {"network_class_name": "x", "arch_kwargs": {"strides": [list(s) for s in strides],
                                                                        "features_per_stage": [4, 8]},
                             "_kw_requires_import": []}}}})


class _Pool2(nn.Module):
    def forward(self, x):
        return (torch.nn.functional.avg_pool3d if x.ndim == 5 else torch.nn.functional.avg_pool2d)(x, 2)


class _GeometryNet(nn.Module):
    """A stand-in teacher network that remembers its input. Logits: channel 1 = input, channel 0 = 0 (a voxel-wise
    function, so a correctly mapped teacher returns softmax([0, x]) at every student voxel). Decoder stages: stage 0
    = 2x average pooling (stride 2), stage 1 = the input (stride 1)."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.stages = nn.ModuleList([_Pool2(), nn.Identity()])
        self.seen = None

    def forward(self, x):
        self.seen = x.clone()
        for stage in self.decoder.stages:
            stage(x)
        return torch.cat([torch.zeros_like(x), x], 1)


def _teacher(t_pm, s_pm, feature_stage=None, tmp=Path("/teachers/T")):
    """A FrozenTeacher assembled by hand (no checkpoint): the same _finish_init as the real constructor."""
    t = object.__new__(FrozenTeacher)
    t.spec = TeacherSpec(tmp, ["0"], organ="kidney")
    t.device = torch.device("cpu")
    t.plans_manager = t_pm
    t.configuration_manager = t_pm.get_configuration("3d_fullres")
    t.label_manager = SimpleNamespace(has_regions=False)
    t.networks = [_GeometryNet()]
    t._finish_init(s_pm, s_pm.get_configuration("3d_fullres"), feature_stage)
    return t


def test_axis_permutation():
    # student axis i is original axis ts[i]; teacher axis j is original axis tt[j]
    assert axis_permutation([0, 1, 2], [2, 0, 1], 3) == (2, 0, 1)
    assert axis_permutation([2, 0, 1], [0, 1, 2], 3) == (1, 2, 0)
    assert inverse_permutation((2, 0, 1)) == (1, 2, 0)
    assert axis_permutation([1, 0, 2], [1, 2, 0], 2) == (1, 0)  # 2D: same slice axis, in-plane axes swapped
    with pytest.raises(TeacherError, match="slices cut different axes"):
        axis_permutation([0, 1, 2], [2, 0, 1], 2)
    with pytest.raises(TeacherError, match="not permutations"):
        axis_permutation([0, 1, 2], [0, 1, 1], 3)


def test_teacher_planned_with_another_axis_order_sees_its_own_orientation():
    # original volume with the coarse axis last: spacing (1, 1, 3) in original order. The student's plans keep the
    # order; the teacher's (planned on anisotropic data) put the coarse axis first, as nnU-Net does.
    s_pm = _plans("Student", [0, 1, 2], [1.0, 1.0, 3.0])
    t_pm = _plans("Teacher", [2, 0, 1], [3.0, 1.0, 1.0])
    t = _teacher(t_pm, s_pm, feature_stage=1)
    # same physical spacing once compared axis by axis: nothing is resampled (the old code compared (1, 1, 3) with
    # (3, 1, 1) and resampled two axes by 3 and 1/3)
    assert not t.resample and np.allclose(t.zoom, 1.0)
    vol = torch.randn(1, 1, 4, 6, 8, generator=torch.Generator().manual_seed(0))  # original order = student order
    probs, feats = t(vol)
    # the teacher network saw what nnU-Net's preprocessing would have given it: data.transpose([0, *(1 + tf)])
    torch.testing.assert_close(t.networks[0].seen, vol.permute(0, 1, 4, 2, 3))
    # outputs and features come back on the student's grid, in its axis order
    assert probs.shape == (1, 2, 4, 6, 8)
    torch.testing.assert_close(probs, torch.softmax(torch.cat([torch.zeros_like(vol), vol], 1), 1))
    torch.testing.assert_close(feats, vol)


def test_teacher_spacing_is_compared_in_the_teachers_axis_order():
    s_pm = _plans("Student", [0, 1, 2], [1.0, 1.0, 3.0])
    t_pm = _plans("Teacher", [2, 0, 1], [1.5, 1.0, 1.0])  # the coarse axis at 1.5 instead of 3
    t = _teacher(t_pm, s_pm)
    np.testing.assert_allclose(t.zoom, [2.0, 1.0, 1.0])  # teacher order: its axis 0 (original axis 2) gets 2x
    vol = torch.randn(1, 1, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    probs, _ = t(vol)
    assert tuple(t.networks[0].seen.shape[2:]) == (16, 4, 6)  # original axis 2 (8 voxels) doubled, first
    assert probs.shape == (1, 2, 4, 6, 8)
    # a constant along the resampled axis survives the round trip exactly
    ramp = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 1, 4, 6, 8).contiguous()
    probs, _ = t(ramp)
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(ramp[:, 0]))


def test_2d_teacher_slicing_another_axis_is_refused_naming_both_plans():
    def plans2d(name, transpose):
        pm = _plans(name, transpose, [1.0, 1.0])
        pm.plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"] = [[1, 1], [2, 2]]
        return pm

    with pytest.raises(TeacherError, match=r"(?s)teacher /teachers/T \(plans 'TeacherPlans' of 'Teacher'.*"
                                           r"plans\.json\) and the student \(plans 'StudentPlans' of 'Student'\).*"
                                           r"\[2, 0, 1\] vs \[0, 1, 2\]"):
        _teacher(plans2d("Teacher", [2, 0, 1]), plans2d("Student", [0, 1, 2]))
    t = _teacher(plans2d("Teacher", [0, 2, 1]), plans2d("Student", [0, 1, 2]))  # same slices, in-plane swap
    x = torch.randn(1, 1, 4, 6)
    probs, _ = t(x)
    torch.testing.assert_close(t.networks[0].seen, x.transpose(2, 3))
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(x[:, 0]))


def test_padded_crop():
    # unpadded 5 -> padded 8 (divisor 4): full res keeps 5, stride 2 keeps ceil(5/2) = 3, stride 4 keeps 2
    assert padded_crop([5, 6], [8, 8], [8, 8]) == (slice(0, 5), slice(0, 6))
    assert padded_crop([5, 6], [8, 8], [4, 4]) == (slice(0, 3), slice(0, 3))
    assert padded_crop([5, 6], [8, 8], [2, 2]) == (slice(0, 2), slice(0, 2))
    with pytest.raises(TeacherError, match="no integer stride"):
        padded_crop([5], [8], [3])


@pytest.mark.parametrize("stage,stride", [(0, 2), (1, 1)])
def test_teacher_features_are_cropped_like_the_outputs(stage, stride):
    # divisor 4: a (5, 6, 7) patch is padded to (8, 8, 8); the features must cover the unpadded region only
    strides = ((1, 1, 1), (2, 2, 2), (2, 2, 2))
    s_pm = _plans("Student", [0, 1, 2], [1.0, 1.0, 1.0], strides)
    t = _teacher(_plans("Teacher", [0, 1, 2], [1.0, 1.0, 1.0], strides), s_pm, feature_stage=stage)
    x = torch.randn(1, 1, 5, 6, 7, generator=torch.Generator().manual_seed(2))
    probs, feats = t(x)
    assert tuple(t.networks[0].seen.shape[2:]) == (8, 8, 8)
    assert probs.shape == (1, 2, 5, 6, 7)
    assert tuple(feats.shape[2:]) == tuple(-(-n // stride) for n in (5, 6, 7))  # (3, 3, 4) / (5, 6, 7)
    if stride == 1:
        torch.testing.assert_close(feats, x)  # exactly the unpadded input, no replicate-padded border
    else:
        seen = t.networks[0].seen
        torch.testing.assert_close(feats, torch.nn.functional.avg_pool3d(seen, 2)[..., :3, :3, :4])
