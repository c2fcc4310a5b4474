"""A site's per-round evaluation of the global model (``NnUNetSite.evaluate``): its cost is bounded by a number of
patch passes (whole volumes when nnU-Net's sliding window over them fits, else nnU-Net's validation patches), and
its Dice is pooled over the voxels it saw, with nnU-Net's padding left out."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from nnunetv2_fedkd.federated.nnunet_site import PooledDice, sliding_window_tiles


def test_pooled_dice_sums_over_everything_added_and_leaves_out_padding():
    d = PooledDice({"liver": 1, "kidney": 2})
    # case 1: liver TP 2, FP 1, FN 1; a predicted liver voxel on padding (-1) does not count
    d.add(np.array([1, 1, 1, 0, 1, 0]), np.array([1, 1, 0, 1, -1, 0]))
    # case 2: liver TP 1, kidney TP 1 FN 1
    d.add(np.array([1, 2, 0]), np.array([1, 2, 2]))
    v = d.values()
    assert v["liver"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert v["kidney"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 1))
    absent = PooledDice({"spleen": 3})
    absent.add(np.zeros(4, int), np.array([0, 0, -1, 0]))
    assert absent.values() == {"spleen": None}
    with pytest.raises(ValueError, match="differ in shape"):
        d.add(np.zeros(3), np.zeros(4))


def test_sliding_window_tiles_counts_nnunet_steps():
    # tile step 0.5 of a 32 patch: 40 voxels need 2 positions, 32 need 1, 100 need ceil(68 / 16) + 1 = 6
    assert sliding_window_tiles((40, 40, 32), (32, 32, 32)) == 2 * 2 * 1
    assert sliding_window_tiles((100, 20, 32), (32, 32, 32)) == 6 * 1 * 1  # smaller than the patch: padded to it
    assert sliding_window_tiles((256, 256, 96), (32, 32, 32)) == 15 * 15 * 5


EVALUATE_TWICE = r"""
import json, sys
import numpy as np, torch
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2_fedkd.federated import nnunet_site
from nnunetv2_fedkd.federated.nnunet_site import NnUNetSite, validation_patches

dataset, organ, site_dir = sys.argv[1:4]
site = NnUNetSite("s", dataset, [organ], site_dir, "nnUNetTrainerFedKD", "nnUNetPlansSmall", device="cpu")
t = get_trainer_from_args(dataset, "3d_fullres", 0, "nnUNetTrainerFedKD", "nnUNetPlansSmall",
                          device=torch.device("cpu"))
pm, cm, lm = t.plans_manager, t.configuration_manager, t.label_manager
torch.manual_seed(0)
w = t.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, t.dataset_json),
                                 lm.num_segmentation_heads, enable_deep_supervision=False).state_dict()
np.random.seed(7)
before = np.random.get_state()
out = {"patches": [site.evaluate(w, {"round": 0, "evaluate_patches": 3}) for _ in range(2)],
       "volumes": site.evaluate(w, {"round": 0, "evaluate_patches": 0}),
       "default": site.evaluate(w, {"round": 0}),
       "rng_kept": all(bool(np.all(a == b)) for a, b in zip(np.random.get_state(), before))}
# a model that predicts the reference itself scores 1 on the patches (the scoring, not the model, is checked)
nnunet_site.predict_patches = lambda net, data, lm, device: perfect.pop(0)
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
import os
_, val = t.do_split()
ds = infer_dataset_class(os.path.join(t.preprocessed_dataset_folder_base, cm.data_identifier))(
    os.path.join(t.preprocessed_dataset_folder_base, cm.data_identifier), list(val))
refs = [r for _, r in validation_patches(ds, t, 3)]
out["with_organ"] = sum(int((r == 1).any()) for b in refs for r in b)
perfect = [r.copy() for r in refs]
out["perfect"] = site.evaluate(w, {"round": 0, "evaluate_patches": 3})
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_site_evaluation_stays_within_its_patch_budget(tiny_federation, planned_federation, tmp_path):
    fed, layout = tiny_federation, planned_federation
    site = fed.spec.sites[0]
    organ = site.organs[0]
    view = layout.views[site.name]
    proc = subprocess.run([sys.executable, "-c", EVALUATE_TWICE, view, organ, str(tmp_path / "site")],
                          env=fed.env(training=True), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    first, second = out["patches"]
    # over budget (3 passes < the validation volumes' tiles): 3 patches, the same ones in every call
    assert first["sampled_patches"] == 3 and first["network_passes"] == 3, first
    assert first["dice"] == second["dice"] and set(first["dice"]) == {organ}
    assert out["rng_kept"]  # numpy's global random state (nnU-Net's training draws from it) is left as it was
    vol = out["volumes"]
    assert vol["sampled_patches"] == 0 and vol["network_passes"] > 3 and vol["num_cases"] == first["num_cases"]
    # CI-size volumes fit the default budget: whole volumes, as before the budget existed
    assert out["default"]["sampled_patches"] == 0 and out["default"]["dice"] == vol["dice"]
    # the patches hold the site's organ (uniform positions; at this size a patch covers most of a case)
    assert out["with_organ"] >= 1, out
    assert out["perfect"]["dice"] == {organ: 1.0}, out["perfect"]
    # the budget is an instruction to the site, not a trainer setting
    cfg = json.loads((tmp_path / "site" / "round_0001" / "fedkd_evaluate.json").read_text())
    assert "evaluate_patches" not in cfg
