"""Cached teacher outputs follow the student's patch through nnU-Net's own crop and training augmentation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_fedkd.distillation.teacher_cache import (
    AppendTeacherTarget,
    SplitTeacherChannels,
    TeacherCachedDataset,
    cache_folder,
    decode_teacher_target,
    load_cached,
    save_cached,
    split_target,
)
from nnunetv2_fedkd.distillation.teachers import TeacherError


def _phantom(shape=(24, 24, 24)):
    """An image whose intensity encodes the label (so the image path and the label path can be compared) and a
    2-organ label map: a ball (1) and a box (2)."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    seg = np.zeros(shape, np.int16)
    seg[(z - 12) ** 2 + (y - 10) ** 2 + (x - 12) ** 2 < 36] = 1
    seg[14:20, 4:12, 14:22] = 2
    return seg


def _stock_pipeline(patch, deep_supervision=True):
    return nnUNetTrainer.get_training_transforms(
        patch, (-math.pi / 6, math.pi / 6), [[1, 1, 1], [0.5, 0.5, 0.5]] if deep_supervision else None,
        (0, 1, 2), False, use_mask_for_norm=[False], is_cascaded=False, foreground_labels=[1, 2], regions=None,
        ignore_label=None)


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_teacher_channels_stay_aligned_through_stock_augmentation(deep_supervision):
    """Teacher 'probabilities' equal to the one-hot labels go through nnU-Net's training transforms (rotation,
    scaling, mirroring, intensity augmentation, deep-supervision downsampling) next to the labels: where valid they
    still match the augmented labels (up to linear vs nearest interpolation at organ borders), and the intensity
    augmentation never touches them."""
    seg = _phantom()
    probs = np.stack([(seg == 1), (seg == 2)]).astype(np.float32)
    image = np.random.default_rng(0).normal(size=(1, *seg.shape)).astype(np.float32)
    pipeline = ComposeTransforms([SplitTeacherChannels(1), _stock_pipeline((16, 16, 16), deep_supervision),
                                  AppendTeacherTarget()])
    dice, control, n_valid = [], [], 0
    for seed in range(12):
        torch.manual_seed(seed)
        np.random.seed(seed)
        data = torch.from_numpy(np.concatenate([image, 1.0 + probs]))[:, 2:22, 2:22, 2:22]
        out = pipeline(image=data.clone(), segmentation=torch.from_numpy(seg[None, 2:22, 2:22, 2:22].copy()))
        assert out["image"].shape == (1, 16, 16, 16)  # the teacher channels left the image
        target, stored = split_target([t[None] for t in out["segmentation"]], deep_supervision)
        assert stored.shape == (1, 2, 16, 16, 16)
        if deep_supervision:
            assert isinstance(target, list) and len(target) == 2 and target[1].shape[2:] == (8, 8, 8)
            target = target[0]
        assert target.shape == (1, 1, 16, 16, 16)
        # stored values are 1 + p, or less where padding was mixed in: never above 2 (no intensity augmentation)
        assert float(stored.max()) <= 2.0 + 1e-5
        logits, valid = decode_teacher_target(stored)
        t = torch.sigmoid(logits) > 0.5
        lab, ok = target[:, 0], valid[:, 0]
        n_valid += int(ok.sum())
        unaugmented = torch.from_numpy(probs[:, 4:20, 4:20, 4:20] > 0.5)[None]  # what a misaligned cache would give
        for k in (1, 2):
            ref = (lab == k) & ok
            dice.append(_dice(t[:, k - 1] & ok, ref))
            control.append(_dice(unaugmented[:, k - 1] & ok, ref))
    assert n_valid > 0.5 * 12 * 16 ** 3
    assert min(dice) > 0.85, dice
    assert np.mean(control) < 0.75, control  # the augmentation really moved things: alignment is not trivial


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / max(1, int(a.sum() + b.sum())))


def test_cached_dataset_crops_with_the_case_and_marks_padding_invalid(tmp_path):
    seg = _phantom((10, 12, 14))
    data = np.random.default_rng(1).normal(size=(1, *seg.shape)).astype(np.float32)
    probs = np.stack([(seg == 1), (seg == 2)]).astype(np.float32)
    save_cached(tmp_path, "case_000", probs, (4, 4, 4))

    class Inner:
        identifiers = ["case_000"]

        def load_case(self, ident):
            return data, seg[None], None, {"class_locations": {}}

    ds = TeacherCachedDataset(Inner(), tmp_path, 2)
    case, s, _, _ = ds.load_case("case_000")
    assert case.shape == (3, 10, 12, 14)
    bbox = [[-3, 7], [2, 12], [5, 19]]  # reaches outside the case along the first and last axis
    crop = crop_and_pad_nd(case, bbox, 0)
    assert crop.shape == (3, 10, 10, 14)
    np.testing.assert_array_equal(crop[0], crop_and_pad_nd(data, bbox, 0)[0])
    np.testing.assert_allclose(np.where(crop[1:] >= 1, crop[1:] - 1, 0), crop_and_pad_nd(probs, bbox, 0), atol=1e-6)
    _, valid = decode_teacher_target(torch.from_numpy(crop[1:][None]))
    assert not valid[0, 0, :3].any() and not valid[0, 0, :, :, 9:].any()  # padded parts
    assert valid[0, 0, 3:, :, :9].all()  # inside the case


def test_cached_output_errors_name_the_file(tmp_path):
    save_cached(tmp_path, "a", np.zeros((2, 4, 4, 4), np.float32), (4, 4, 4))
    with pytest.raises(TeacherError, match=r"a\.b2nd has shape"):
        load_cached(tmp_path, "a", 2, (4, 4, 5))
    with pytest.raises(TeacherError, match=r"a\.b2nd has shape"):
        load_cached(tmp_path, "a", 3, (4, 4, 4))
    (tmp_path / "b.b2nd").write_bytes(b"b2frame garbage")
    with pytest.raises(TeacherError, match=r"b\.b2nd cannot be read"):
        load_cached(tmp_path, "b", 2, (4, 4, 4))
    with pytest.raises(TeacherError, match=r"c\.b2nd cannot be read \(no such file"):
        load_cached(tmp_path, "c", 2, (4, 4, 4))
    import blosc2  # a cache of another dtype (not this format's codes) is refused too

    blosc2.asarray(np.zeros((2, 4, 4, 4), np.float16), urlpath=str(tmp_path / "d.b2nd"), mode="w")
    with pytest.raises(TeacherError, match=r"d\.b2nd has shape .*float16"):
        load_cached(tmp_path, "d", 2, (4, 4, 4))
    with pytest.raises(TeacherError, match="no cached teacher outputs"):
        split_target(torch.zeros(1, 1, 4, 4, 4), False)


def test_probability_codes_keep_the_logit_within_half_a_step():
    """uint8 codes of the logit: every probability in KD's range comes back within LOGIT_STEP / 2 in logit (so a
    target at temperature T within LOGIT_STEP / (2 T)); 0 and 1 map to the ends of that range."""
    from nnunetv2_fedkd.distillation.teacher_cache import (LOGIT_RANGE, LOGIT_STEP, decode_probabilities,
                                              encode_probabilities)

    assert LOGIT_RANGE == pytest.approx(13.8155, abs=1e-4) and LOGIT_STEP == pytest.approx(0.10836, abs=1e-5)
    p = np.array([1e-6, 1e-5, 1e-3, 0.002, 0.01, 0.3, 0.5, 0.7, 0.99, 0.999, 1 - 1e-6])
    codes = encode_probabilities(p)
    assert codes.dtype == np.uint8
    back = decode_probabilities(codes).astype(np.float64)
    logit = lambda x: np.log(x) - np.log1p(-x)  # noqa: E731
    assert np.all(np.abs(logit(back) - logit(p)) <= LOGIT_STEP / 2 + 1e-4)
    assert encode_probabilities(np.array([0.0, 1.0, 0.5])).tolist() == [0, 255, 128]  # 0.5 -> logit 0, mid-code
    # a small probability keeps its order of magnitude (uint8 probabilities would round all of these to 0)
    assert back[2] == pytest.approx(1e-3, rel=0.06) and back[3] == pytest.approx(0.002, rel=0.06)


def test_a_cached_case_is_compressed_and_reads_one_patch_at_a_time(tmp_path):
    """A 2-teacher case of 64^3 voxels: far smaller than the float16 array format 1 stored (2 bytes a voxel), and a
    patch read through the lazy view equals the same patch of the decoded whole."""
    from nnunetv2_fedkd.distillation.teacher_cache import CachedProbabilities, decode_probabilities, encode_probabilities

    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 64)] * 3, indexing="ij")
    organ = np.stack([1 / (1 + np.exp(-40 * (0.3 - np.sqrt((z - c) ** 2 + y ** 2 + x ** 2)))) for c in (-0.4, 0.4)])
    probs = np.clip(organ + rng.normal(0, 1e-3, organ.shape) * organ * (1 - organ), 0, 1).astype(np.float32)
    path = save_cached(tmp_path, "case", probs, (32, 32, 32))
    assert path.name == "case.b2nd" and not list(tmp_path.glob(".*"))  # no temporary file left
    float16_bytes = probs.size * 2
    assert path.stat().st_size < float16_bytes / 10
    view = load_cached(tmp_path, "case", 2, (64, 64, 64))
    assert isinstance(view, CachedProbabilities) and view.shape == (2, 64, 64, 64)
    key = (slice(None), slice(5, 37), slice(10, 42), slice(30, 62))
    np.testing.assert_array_equal(view[key], decode_probabilities(encode_probabilities(probs))[key])
    np.testing.assert_allclose(view[key], probs[key], atol=0.014)  # at most half a logit step: 0.0135 at p = 0.5


def test_cache_is_a_sibling_of_the_preprocessed_data(tmp_path):
    pre = tmp_path / "Dataset001_X" / "nnUNetPlans_3d_fullres"
    assert cache_folder(str(pre), "abc") == tmp_path / "Dataset001_X" / "nnUNetPlans_3d_fullres_fedkd_teachers" / "abc"


def test_cached_outputs_refuse_feature_kd_and_unknown_modes(tmp_path):
    from pathlib import Path

    from nnunetv2_fedkd.distillation.teachers import TeacherSpec
    from nnunetv2_fedkd.trainers.distillation import nnUNetTrainerMSKD

    t = object.__new__(nnUNetTrainerMSKD)  # the settings check runs before nnU-Net's __init__
    t.fedkd_config_file = Path("/cfg/fedkd.json")
    t.teacher_specs = [TeacherSpec(tmp_path, ["0"], organ="liver")]
    t.fedkd_config = {**nnUNetTrainerMSKD.config_defaults, "teacher_outputs": "cached"}
    with pytest.raises(TeacherError, match="feature_kd_weight to 0.*fedkd.json"):
        t._check_settings()
    t.fedkd_config["feature_kd_weight"] = 0.0
    t._check_settings()
    assert t._cached()
    t.fedkd_config["teacher_outputs"] = "disk"
    with pytest.raises(TeacherError, match="'online' or 'cached'"):
        t._check_settings()
    t.fedkd_config["teacher_outputs"] = "online"
    assert not t._cached()


def test_cache_key_follows_the_teacher_files_and_the_student_plans(tmp_path):
    import os

    from nnunetv2_fedkd.distillation.teacher_cache import cache_key
    from nnunetv2_fedkd.distillation.teachers import TeacherSpec

    ckpt = tmp_path / "T" / "fold_0" / "checkpoint_final.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights v1")
    specs = [TeacherSpec(tmp_path / "T", ["0"], organ="liver")]
    student = {"configuration": {"patch_size": [32, 32, 32]}, "intensity": {"0": {"mean": 1.0}}}
    key = cache_key(student, specs)
    assert key == cache_key(dict(student), [TeacherSpec(tmp_path / "T", ["0"], organ="liver")])  # a later run
    assert key != cache_key({**student, "configuration": {"patch_size": [48, 48, 48]}}, specs)
    assert key != cache_key(student, [TeacherSpec(tmp_path / "T", ["0"], organ="kidney")])
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # retrained teacher
    assert key != cache_key(student, specs)


def test_teacher_stack_gives_each_teachers_organ_logit_after_a_constant_channel():
    """What the sliding-window predictor stores for the cache: channel 0 constant, then per teacher the logit of its
    organ's probability (the same function the online path distils from)."""
    from torch import nn

    from nnunetv2_fedkd.distillation.teacher_cache import TeacherForegroundLogits

    class Fake(nn.Module):  # a teacher: (class probabilities, features)
        def __init__(self, p_fg):
            super().__init__()
            self.p_fg = p_fg

        def forward(self, x):
            p = torch.full_like(x, self.p_fg)
            return torch.cat([1 - p, p], 1), x

    x = torch.zeros(2, 1, 3, 4, 5)
    out = TeacherForegroundLogits([Fake(0.5), Fake(0.8)], [1, 1])(x)
    assert out.shape == (2, 3, 3, 4, 5)
    assert torch.all(out[:, 0] == 0)
    assert torch.allclose(out[:, 1], torch.zeros(())) and torch.allclose(out[:, 2], torch.log(torch.tensor(4.0)))
    out0 = TeacherForegroundLogits([Fake(0.8)], [0])(x)  # channel 0 of that teacher: p = 0.2
    assert torch.allclose(out0[:, 1], torch.log(torch.tensor(0.25)))
