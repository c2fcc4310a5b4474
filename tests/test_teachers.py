"""Fast checks of the teacher plumbing: config parsing, safe checkpoint reading, decoder channel lookup."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from nnunetv2_fedkd.teachers import (TeacherError, gate_teachers, load_checkpoint, parse_teachers, probs_to_logit,
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
