"""``nnunetv2_fedkd verify-checkpoint``: a federation's results folder is checked against its own safetensors
checkpoint (weights and plans digests) without unpickling anything, before ``nnUNetv2_predict`` unpickles it
(issue 15, item 7). The real folder written by a federation is verified in tests/test_federated_training.py."""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import torch

from nnunetv2_fedkd.workflows.cli import main
from nnunetv2_fedkd.federated import save_weights
from nnunetv2_fedkd.federated.planning import federation_plans_digest

PLANS = {"dataset_name": "Dataset600_Fed", "plans_name": "nnUNetPlansSmall",
         "configurations": {"3d_fullres": {"patch_size": [32, 32, 32]}}}


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def results_folder(tmp_path):
    """What the federation writes: plans.json, fold_all/checkpoint_final.pth (nnU-Net's checkpoint dict, numpy
    scalars in its log, a torch.device in init_args) and federation/ with state.json and the global checkpoint."""
    model = tmp_path / "Dataset600_Fed" / "nnUNetTrainerFedKD__nnUNetPlansSmall__3d_fullres"
    run = model / "federation"
    run.mkdir(parents=True)
    weights = OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.ones(2))
    save_weights(run / "global_round_0003.fedkd", weights, {"completed_rounds": 3})
    (run / "state.json").write_text(json.dumps({"completed_rounds": 3, "total_rounds": 3,
                                                "global_weights": "global_round_0003.fedkd",
                                                "plans_digest": federation_plans_digest(PLANS)}))
    (model / "plans.json").write_text(json.dumps(PLANS))
    (model / "fold_all").mkdir()
    torch.save({"network_weights": OrderedDict((k, v.clone()) for k, v in weights.items()),
                "trainer_name": "nnUNetTrainerFedKD", "current_epoch": 3,
                "init_args": {"fold": "all", "device": torch.device("cpu")},
                "logging": {"mean_fg_dice": [np.float64(0.5)]}}, model / "fold_all" / "checkpoint_final.pth")
    return model


def test_the_federations_results_folder_is_verified(tmp_path, capsys):
    model = results_folder(tmp_path)
    assert main(["verify-checkpoint", str(model)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("verified: ") and "after round 3/3" in out


def test_a_tampered_folder_is_not_verified(tmp_path, capsys):
    model = results_folder(tmp_path)
    ckpt = model / "fold_all" / "checkpoint_final.pth"
    good = ckpt.read_bytes()
    c = torch.load(ckpt, weights_only=False)
    c["network_weights"]["w"][0, 0] = 99.0
    torch.save(c, ckpt)
    assert main(["verify-checkpoint", str(model)]) == 1
    assert "does not hold the federation's global model after round 3" in capsys.readouterr().err
    ckpt.write_bytes(good)
    (model / "plans.json").write_text(json.dumps({**PLANS, "configurations": {"3d_fullres": {"patch_size": [9]}}}))
    assert main(["verify-checkpoint", str(model)]) == 1
    assert "plans.json is not the federation's plans" in capsys.readouterr().err


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    model = results_folder(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"network_weights": {"w": torch.zeros(1)}, "trainer_name": _Boom(str(marker))},
               model / "fold_all" / "checkpoint_final.pth")
    assert main(["verify-checkpoint", str(model)]) == 1
    err = capsys.readouterr().err
    assert "cannot be read safely" in err and "do not predict with it" in err
    assert not marker.exists()


def test_missing_files_are_named(tmp_path, capsys):
    model = results_folder(tmp_path)
    assert main(["verify-checkpoint", str(model), "-f", "0"]) == 2
    assert "fold_0/checkpoint_final.pth does not exist" in capsys.readouterr().err
    assert main(["verify-checkpoint", str(model), "--run-dir", str(tmp_path / "elsewhere")]) == 2
    assert "elsewhere/state.json does not exist" in capsys.readouterr().err
