"""The STOCK nnU-Net console scripts find and run the plugin's trainers once the README's environment is set."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_fedkd.env import EXT_TRAINER_DIR
from nnunetv2_fedkd.pipeline import nnunet_script

TRAINER = "nnUNetTrainerNaivePartial"
# one plugin trainer on a single-organ site dataset here; Marginal and MultiHead (and NaivePartial again) run through
# stock nnUNetv2_train / nnUNetv2_predict / nnUNetv2_evaluate_folder in tests/test_partial_label_training.py
PLUGIN_TRAINERS = ("nnUNetTrainerNaivePartial",)


def test_env_command_prints_shim_folder_exports(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nnunetv2_fedkd.cli", "env", "--workdir", str(tmp_path), "--cpu"],
                         capture_output=True, text=True, check=True).stdout
    assert f"export nnUNet_extTrainer={EXT_TRAINER_DIR}" in out
    assert f"export nnUNet_raw={tmp_path / 'nnUNet_raw'}" in out
    assert "nnUNet_n_proc_DA" not in out  # nnU-Net's planner fails with 0; only training processes get it


def test_shim_folder_only_reexports():
    """nnUNet_extTrainer must point at thin shims, never at the package root (second class copies)."""
    mods = sorted(p.name for p in EXT_TRAINER_DIR.iterdir() if p.suffix == ".py")
    assert mods == ["nnunetv2_fedkd_trainers.py"]
    code = [l for l in (EXT_TRAINER_DIR / mods[0]).read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert all(l.startswith("from nnunetv2_fedkd.trainers import") for l in code), code


def test_lookup_returns_the_package_class(monkeypatch):
    """nnU-Net's own lookup returns the very class object of our package (one identity: picklable, isinstance)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import nnunetv2_fedkd.trainers as trainers

    monkeypatch.setenv("nnUNet_extTrainer", str(EXT_TRAINER_DIR))
    for name in trainers.__all__:
        assert recursive_find_trainer_class_by_name(name) is getattr(trainers, name)


@pytest.mark.slow
@pytest.mark.parametrize("TRAINER", PLUGIN_TRAINERS)
def test_stock_train_and_predict_with_plugin_trainer(tiny_federation, short_training_config, tmp_path, TRAINER):
    fed = tiny_federation
    site = fed.spec.sites[0]
    env = fed.env(training=True, nnUNet_fedkd_config=str(short_training_config))
    train = [nnunet_script("nnUNetv2_train"), str(site.dataset_id), "3d_fullres", "0", "-tr", TRAINER,
             "-p", "nnUNetPlansSmall", "-device", "cpu"]
    proc = subprocess.run(train, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = fed.results / site.dataset / f"{TRAINER}__nnUNetPlansSmall__3d_fullres" / "fold_0"
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER
    assert ckpt["current_epoch"] == 1  # the config's num_epochs=1 was applied
    used = json.loads((out / "fedkd_trainer_config.json").read_text())
    assert used["settings"]["num_iterations_per_epoch"] == 2
    assert used["config_file"] == str(short_training_config)

    # stock prediction of the test set with the plugin trainer's model
    test_images = fed.raw / fed.spec.test_set.dataset / "imagesTr"
    pred = tmp_path / "pred"
    predict = [nnunet_script("nnUNetv2_predict"), "-i", str(test_images), "-o", str(pred), "-d",
               str(site.dataset_id), "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-p", "nnUNetPlansSmall",
               "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
    proc = subprocess.run(predict, env=fed.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    images = sorted(test_images.glob("*_0000.nii.gz"))
    assert images
    for img in images:
        seg_file = pred / img.name.replace("_0000.nii.gz", ".nii.gz")
        ref, seg = sitk.ReadImage(str(img)), sitk.ReadImage(str(seg_file))
        assert seg.GetSize() == ref.GetSize() and np.allclose(seg.GetSpacing(), ref.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1}  # the site's binary label set


@pytest.mark.slow
def test_stock_train_fails_clearly_without_the_environment(tiny_federation, short_training_config):
    site = tiny_federation.spec.sites[0]
    env = tiny_federation.env(training=True, nnUNet_fedkd_config=str(short_training_config))
    env.pop("nnUNet_extTrainer")
    proc = subprocess.run([nnunet_script("nnUNetv2_train"), str(site.dataset_id), "3d_fullres", "0", "-tr", TRAINER,
                           "-p", "nnUNetPlansSmall", "-device", "cpu"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Could not find requested nnunet trainer nnUNetTrainerNaivePartial" in proc.stdout + proc.stderr
