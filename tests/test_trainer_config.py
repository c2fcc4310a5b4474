"""The plugin trainers' settings file: lookup order, per-trainer sections, and loud errors for typos."""
import json

import pytest

from nnunetv2_fedkd.trainers.config import CONFIG_ENV, DATASET_CONFIG_NAME, TrainerConfigError, load_trainer_config

DEFAULTS = {"num_epochs": 1000, "alpha": 0.5}


def test_defaults_without_any_file(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    cfg, path = load_trainer_config("T", DEFAULTS, str(tmp_path))
    assert cfg == DEFAULTS and path is None


def test_dataset_file_then_env_file_wins(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    (tmp_path / DATASET_CONFIG_NAME).write_text(json.dumps({"num_epochs": 3}))
    cfg, path = load_trainer_config("T", DEFAULTS, str(tmp_path))
    assert cfg["num_epochs"] == 3 and path == tmp_path / DATASET_CONFIG_NAME
    env_file = tmp_path / "run.json"
    env_file.write_text(json.dumps({"num_epochs": 7, "trainers": {"T": {"alpha": 0.1}, "Other": {"beta": 1}}}))
    monkeypatch.setenv(CONFIG_ENV, str(env_file))
    cfg, path = load_trainer_config("T", DEFAULTS, str(tmp_path))
    assert cfg == {"num_epochs": 7, "alpha": 0.1} and path == env_file


def test_unknown_keys_are_errors(tmp_path, monkeypatch):
    f = tmp_path / "c.json"
    monkeypatch.setenv(CONFIG_ENV, str(f))
    f.write_text(json.dumps({"num_epochs": 2, "beta": 1.0}))
    # a key another plugin trainer knows may sit at top level ...
    assert load_trainer_config("T", DEFAULTS, None, shared_keys={"beta"})[0]["num_epochs"] == 2
    # ... but a key nobody knows is a typo
    with pytest.raises(TrainerConfigError, match=r"unknown setting\(s\) beta"):
        load_trainer_config("T", DEFAULTS, None)
    f.write_text(json.dumps({"trainers": {"T": {"beta": 1}}}))
    with pytest.raises(TrainerConfigError, match=r"unknown setting\(s\) trainers.T.beta for T"):
        load_trainer_config("T", DEFAULTS, None, shared_keys={"beta"})


def test_missing_or_broken_file(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(TrainerConfigError, match="nope.json does not name an existing file"):
        load_trainer_config("T", DEFAULTS, None)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv(CONFIG_ENV, str(bad))
    with pytest.raises(TrainerConfigError, match="bad.json is not valid JSON"):
        load_trainer_config("T", DEFAULTS, None)


def _bare_trainer(data_augmentation):
    """The base trainer's augmentation hooks without a dataset: only what they read is set."""
    from types import SimpleNamespace

    from nnunetv2_fedkd.trainers.base import nnUNetTrainerFedKDBase
    from nnunetv2_fedkd.trainers.config import BASE_DEFAULTS

    t = object.__new__(nnUNetTrainerFedKDBase)
    t.fedkd_config = {**BASE_DEFAULTS, "data_augmentation": data_augmentation}
    t.configuration_manager = SimpleNamespace(patch_size=[32, 32, 32])
    t.print_to_log_file = lambda *a, **k: None
    return t


def _transform_names(transform):
    names, todo = [], [transform]
    while todo:
        t = todo.pop()
        names.append(type(t).__name__)
        todo.extend(getattr(t, "transforms", []) or [])
        if hasattr(t, "transform"):
            todo.append(t.transform)
    return names


@pytest.mark.parametrize("mode", ["nnunet", "none"])
def test_data_augmentation_setting(mode):
    """"nnunet" keeps nnU-Net's training augmentation and test-time mirroring; "none" gives nnU-Net's
    nnUNetTrainerNoDA pipeline: the planned patch, no spatial/intensity transform, no mirroring (nor at inference)."""
    t = _bare_trainer(mode)
    rotation, dummy_2d, initial_patch, mirror_axes = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    names = _transform_names(t.get_training_transforms([32, 32, 32], rotation, [[1, 1, 1], [0.5, 0.5, 0.5]],
                                                       mirror_axes, dummy_2d, foreground_labels=[1, 2]))
    augmenting = {"SpatialTransform", "MirrorTransform", "GaussianNoiseTransform", "GammaTransform"}
    if mode == "nnunet":
        assert augmenting <= set(names)
        assert mirror_axes == (0, 1, 2) and t.inference_allowed_mirroring_axes == (0, 1, 2)
        assert list(initial_patch) != [32, 32, 32]  # enlarged for rotation/scaling, as nnU-Net does
    else:
        assert not augmenting & set(names) and "DownsampleSegForDSTransform" in names
        assert mirror_axes is None and t.inference_allowed_mirroring_axes is None
        assert list(initial_patch) == [32, 32, 32]


def test_unknown_data_augmentation_is_refused_naming_the_file(tmp_path, monkeypatch):
    import torch

    from nnunetv2_fedkd.trainers.base import nnUNetTrainerFedKDBase

    f = tmp_path / "settings.json"
    f.write_text(json.dumps({"data_augmentation": "heavy"}))
    monkeypatch.setenv(CONFIG_ENV, str(f))
    with pytest.raises(TrainerConfigError, match=r"settings.json: data_augmentation must be one of \['nnunet', 'none'\]"):
        nnUNetTrainerFedKDBase({"dataset_name": "Dataset999_X"}, "3d_fullres", 0, {}, torch.device("cpu"))


def test_cpu_trainers_take_their_thread_count_from_omp_num_threads():
    """nnUNetv2_train -device cpu sets one thread per core; the plugin trainers honour OMP_NUM_THREADS instead."""
    import torch

    from nnunetv2_fedkd.trainers.base import apply_cpu_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert apply_cpu_threads(torch.device("cpu"), {"OMP_NUM_THREADS": "1"}) == 1
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert apply_cpu_threads(torch.device("cpu"), {}) == 2  # unset: nnU-Net's choice stays
        assert apply_cpu_threads(torch.device("cuda"), {"OMP_NUM_THREADS": "1"}) == 2  # GPU: untouched
        for bad in ("two", "0"):
            with pytest.raises(TrainerConfigError, match="OMP_NUM_THREADS"):
                apply_cpu_threads(torch.device("cpu"), {"OMP_NUM_THREADS": bad})
    finally:
        torch.set_num_threads(before)


def test_training_seed_seeds_every_generator_and_federated_rounds_get_their_own(tmp_path, monkeypatch):
    import random

    import numpy as np
    import torch

    from nnunetv2_fedkd.federated.site_side import round_seed
    from nnunetv2_fedkd.trainers.base import nnUNetTrainerFedKDBase, seed_everything

    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    assert round_seed(7, 0, "liver_site") == round_seed(7, 0, "liver_site")
    assert len({round_seed(7, r, s) for r in range(3) for s in ("liver_site", "kidney_site")}) == 6
    assert round_seed(8, 0, "liver_site") != round_seed(7, 0, "liver_site")
    f = tmp_path / "settings.json"
    for bad in ("7", -1, 1.5, True):
        f.write_text(json.dumps({"training_seed": bad}))
        monkeypatch.setenv(CONFIG_ENV, str(f))
        with pytest.raises(TrainerConfigError, match="training_seed must be null or an int >= 0"):
            nnUNetTrainerFedKDBase({"dataset_name": "Dataset999_X"}, "3d_fullres", 0, {}, torch.device("cpu"))


def test_trainers_with_nnunets_own_loss_refuse_cases_that_annotate_no_organ():
    """A dataset converted with --unlabelled-as-training has cases that annotate no organ: nnU-Net's own loss (the
    stock-loss base trainer, EnsembleKD's hard-label term) would learn them as all background, so those trainers refuse
    it by name; the partial-label trainers (no label loss from such a case) and the naive baseline accept it."""
    from types import SimpleNamespace

    from nnunetv2_fedkd.trainers import (nnUNetTrainerDualKD, nnUNetTrainerEnsembleKD, nnUNetTrainerFedKD,
                                         nnUNetTrainerFedKDBase, nnUNetTrainerMarginal, nnUNetTrainerMSKD,
                                         nnUNetTrainerMultiHead, nnUNetTrainerNaivePartial)
    from nnunetv2_fedkd.trainers.config import TrainerConfigError

    def check(cls, table):
        t = object.__new__(cls)
        t.dataset_json = {"labels": {"background": 0, "pancreas": 1}, "fedkd": {"case_annotated": table}}
        t.plans_manager = SimpleNamespace(dataset_name="Dataset521_PancreasFewShot")
        t._refuse_cases_without_labels()

    with_unlabelled = {"p_1": ["pancreas"], "p_7": []}
    for cls in (nnUNetTrainerFedKDBase, nnUNetTrainerEnsembleKD):
        with pytest.raises(TrainerConfigError, match=r"1 training case\(s\) of Dataset521_PancreasFewShot .*'p_7'"):
            check(cls, with_unlabelled)
        check(cls, {"p_1": ["pancreas"]})  # every case labelled: accepted
    for cls in (nnUNetTrainerMarginal, nnUNetTrainerMultiHead, nnUNetTrainerDualKD, nnUNetTrainerMSKD,
                nnUNetTrainerFedKD, nnUNetTrainerNaivePartial):
        check(cls, with_unlabelled)
