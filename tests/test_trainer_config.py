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
    with pytest.raises(TrainerConfigError, match="unknown setting 'beta'"):
        load_trainer_config("T", DEFAULTS, None)
    f.write_text(json.dumps({"trainers": {"T": {"beta": 1}}}))
    with pytest.raises(TrainerConfigError, match="unknown setting 'beta' for T"):
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
