"""nnUNetTrainerFedKDBase.do_split reads nnU-Net's splits_final.json again when another training of the same dataset
was writing it at that moment (two trainings side by side: the demo's federations, a benchmark's --jobs 2); cases that
annotate no organ (convert --unlabelled-as-training) train in every fold and never validate."""
import json

import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_fedkd.trainers import base
from nnunetv2_fedkd.trainers.base import nnUNetTrainerFedKDBase


def bare_trainer(tmp_path):
    (tmp_path / base.SPLITS_FILE).write_text("[]")  # a split file exists: nnU-Net's own do_split reads it
    t = object.__new__(nnUNetTrainerFedKDBase)  # no plans, no network: only what do_split reads
    t.fold, t.preprocessed_dataset_folder_base, t.dataset_json = 0, str(tmp_path), {}
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


def unlabelled_trainer(tmp_path, fold, labelled, unlabelled, split_file=False):
    if split_file:
        (tmp_path / base.SPLITS_FILE).write_text("[]")
    t = object.__new__(nnUNetTrainerFedKDBase)
    keys = sorted(labelled + unlabelled)
    t.fold, t.preprocessed_dataset_folder_base, t.preprocessed_dataset_folder = fold, str(tmp_path), str(tmp_path)
    t.dataset_class = type("Ids", (), {"get_identifiers": staticmethod(lambda folder: keys)})
    t.dataset_json = {"labels": {"background": 0, "pancreas": 1}, "fedkd": {"case_annotated": {**{k: ["pancreas"] for k in labelled},
                                                   **{k: [] for k in unlabelled}}}}
    t.plans_manager = type("PM", (), {"dataset_name": "Dataset521_PancreasFewShot"})()
    t.print_to_log_file = lambda *a, **k: None
    return t


def test_cases_that_annotate_no_organ_train_in_every_fold_and_never_validate(tmp_path, monkeypatch):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from nnunetv2_fedkd.trainers.config import TrainerConfigError

    lab, unl = [f"l{i}" for i in range(2)], [f"u{i}" for i in range(6)]
    # 2 labelled + 6 unlabelled (8 >= 5 cases, but 2 labelled): every case trains, the labelled ones validate
    t = unlabelled_trainer(tmp_path, 0, lab, unl)
    tr, val = t.do_split()
    assert sorted(tr) == sorted(lab + unl) and val == lab and t.validates_on_training_cases
    # 6 labelled + 3 unlabelled: nnU-Net's seeded split of the labelled cases, the unlabelled ones in every train fold
    lab6, unl3 = [f"l{i}" for i in range(6)], [f"u{i}" for i in range(3)]
    for fold in range(5):
        tr, val = unlabelled_trainer(tmp_path, fold, lab6, unl3).do_split()
        want = generate_crossval_split(lab6, seed=12345, n_splits=5)[fold]
        assert val == want["val"] and sorted(tr) == sorted(want["train"] + unl3)
    # fold 'all' (nnU-Net: every case trains and validates): the unlabelled cases do not validate
    monkeypatch.setattr(nnUNetTrainer, "do_split", lambda self: (lab + unl, lab + unl))
    t = unlabelled_trainer(tmp_path, "all", lab, unl)
    assert t.do_split() == (lab + unl, lab) and t.validates_on_training_cases
    # a user's split that validates only on unlabelled cases is refused, naming the dataset and the file
    monkeypatch.setattr(nnUNetTrainer, "do_split", lambda self: (lab, unl))
    with pytest.raises(TrainerConfigError, match=r"fold 0 of Dataset521_PancreasFewShot validates only on .*"
                                                 r"splits_final.json"):
        unlabelled_trainer(tmp_path, 0, lab, unl, split_file=True).do_split()
