"""nnUNetTrainerFedKDBase.do_split reads nnU-Net's splits_final.json again when another training of the same dataset
was writing it at that moment (two trainings side by side: the demo's federations, a benchmark's --jobs 2)."""
import json

import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_fedkd.trainers import base
from nnunetv2_fedkd.trainers.base import nnUNetTrainerFedKDBase


def bare_trainer(tmp_path):
    (tmp_path / base.SPLITS_FILE).write_text("[]")  # a split file exists: nnU-Net's own do_split reads it
    t = object.__new__(nnUNetTrainerFedKDBase)  # no plans, no network: only what do_split reads
    t.fold, t.preprocessed_dataset_folder_base = 0, str(tmp_path)
    return t


def half_written_then(calls, result, failures):
    def do_split(self):
        calls.append(1)
        if len(calls) <= failures:
            json.loads('[{"train": ["a", "b"], "val')  # what a reader sees while the writer is half way
        return result
    return do_split


def test_a_half_written_split_file_is_read_again(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(nnUNetTrainer, "do_split", half_written_then(calls, (["a", "b"], ["c"]), failures=1))
    monkeypatch.setattr(base.time, "sleep", lambda s: None)
    t = bare_trainer(tmp_path)
    assert t.do_split() == (["a", "b"], ["c"])
    assert len(calls) == 2 and t.validates_on_training_cases is False


def test_a_split_file_that_stays_broken_is_an_error(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(nnUNetTrainer, "do_split", half_written_then(calls, (["a"], ["b"]), failures=99))
    monkeypatch.setattr(base.time, "sleep", lambda s: None)
    with pytest.raises(json.JSONDecodeError):
        bare_trainer(tmp_path).do_split()
    assert len(calls) == base.SPLIT_READ_ATTEMPTS
