"""nnU-Net's own ensembling path with the plugin's models: ``nnUNetv2_predict --save_probabilities`` of two models of
the same label set, then ``nnUNetv2_ensemble`` (issue 14, item 6). Two FedKD global models (softmax) federated from
two seeds, and two multi-head FedKD models (one sigmoid per organ, nnU-Net regions). The models are barely trained
(1 round x 2 iterations): the test is about the path (files, shapes, that the ensemble is the mean of the members'
probabilities and that its label map follows from it), not about Dice."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_fedkd.workflows.pipeline import federate_command, nnunet_script, predict


def _federate(fed, trainer: str, seed: int, results: Path, config: Path) -> None:
    cmd = federate_command(fed.spec.path, trainer, 1, 2, config, "--seed", str(seed), "--sites", "liver_site",
                           "kidney_site", evaluate=False)
    out = subprocess.run(cmd, env=fed.env(training=True, nnUNet_results=str(results)), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["nnUNetTrainerFedKD", "nnUNetTrainerFedKDMultiHead"])
def test_two_plugin_models_ensemble_with_nnunet_tools(tiny_federation, planned_federation, trainer, tmp_path,
                                                      short_training_config):
    fed, layout = tiny_federation, planned_federation
    images = fed.raw / fed.spec.test_set.dataset / "imagesTr"
    members = []
    for seed in (0, 1):
        results = tmp_path / f"results_seed{seed}"
        _federate(fed, trainer, seed, results, short_training_config)
        members.append(predict(images, tmp_path / f"pred_seed{seed}", layout.coordinator, trainer, fed.workdir,
                               fold="all", save_probabilities=True, extra_env={"nnUNet_results": str(results)}))
    ens = tmp_path / "ensemble"
    cmd = [nnunet_script("nnUNetv2_ensemble"), "-i", *map(str, members), "-o", str(ens), "-np", "1", "--save_npz"]
    out = subprocess.run(cmd, env=fed.env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    plans = json.loads((members[0] / "plans.json").read_text())
    reader = recursive_find_reader_writer_by_name(plans["image_reader_writer"])()
    label_manager = PlansManager(plans).get_label_manager(json.loads((members[0] / "dataset.json").read_text()))
    cases = sorted(p.name for p in members[0].glob("*.nii.gz"))
    assert cases and sorted(p.name for p in ens.glob("*.nii.gz")) == cases
    labels = set(range(len(fed.spec.labels) + 1))
    for case in cases:
        stem = case[:-len(".nii.gz")]
        probs = [np.load(m / f"{stem}.npz")["probabilities"] for m in members]
        mean = np.load(ens / f"{stem}.npz")["probabilities"]
        assert probs[0].shape == probs[1].shape == mean.shape
        assert not np.allclose(probs[0], probs[1])  # two different models
        np.testing.assert_allclose(mean, (probs[0] + probs[1]) / 2, atol=1e-3)  # nnU-Net stores float16
        # the .npz arrays are in the array order of the plans' image reader (here NibabelIOWithReorient, not
        # SimpleITK's z, y, x): read the label map with that reader to compare them
        seg = reader.read_seg(str(ens / case))[0][0]
        assert set(np.unique(seg).tolist()) <= labels
        ref = sitk.ReadImage(str(images / f"{stem}_0000.nii.gz"))
        assert sitk.ReadImage(str(ens / case)).GetSize() == ref.GetSize()
        # the label map follows from the mean with the models' label manager: argmax for the softmax model,
        # nnU-Net's regions (one sigmoid per organ, regions_class_order) for the multi-head one
        expected = np.asarray(label_manager.convert_probabilities_to_segmentation(mean.astype(np.float32)))
        assert mean.shape[0] == (len(labels) if trainer == "nnUNetTrainerFedKD" else len(labels) - 1)
        assert (expected > 0).any()  # not an all-background case, where any label map would agree
        agree = float((seg == expected).mean())  # the stored mean is float16: near-ties may flip
        assert agree > 0.99, agree
