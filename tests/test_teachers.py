"""Fast checks of the teacher plumbing: config parsing, safe checkpoint reading, decoder channel lookup."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from nnunetv2_fedkd.teachers import TeacherError, load_checkpoint, parse_teachers, probs_to_logit
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
