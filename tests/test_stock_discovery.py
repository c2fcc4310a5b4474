"""The STOCK nnU-Net console scripts find and run the plugin's trainers once the README's environment is set."""
from __future__ import annotations

import subprocess
import sys

import pytest

from nnunetv2_fedkd.env import EXT_TRAINER_DIR
from nnunetv2_fedkd.workflows.pipeline import nnunet_script

TRAINER = "nnUNetTrainerNaivePartial"
# The plugin trainers run through stock nnUNetv2_train / nnUNetv2_predict / nnUNetv2_evaluate_folder in
# tests/test_partial_label_training.py (NaivePartial, Marginal, MultiHead), test_distillation_trainers.py and
# test_federated_training.py; here: the environment and nnU-Net's lookup.


def test_env_command_prints_shim_folder_exports(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nnunetv2_fedkd.workflows.cli",
                           "env", "--workdir", str(tmp_path), "--cpu"],
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
def test_stock_train_fails_clearly_without_the_environment(tiny_federation, short_training_config):
    site = tiny_federation.spec.sites[0]
    env = tiny_federation.env(training=True, nnUNet_fedkd_config=str(short_training_config))
    env.pop("nnUNet_extTrainer")
    proc = subprocess.run([nnunet_script("nnUNetv2_train"), str(site.dataset_id), "3d_fullres", "0", "-tr", TRAINER,
                           "-p", "nnUNetPlansSmall", "-device", "cpu"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Could not find requested nnunet trainer nnUNetTrainerNaivePartial" in proc.stdout + proc.stderr
