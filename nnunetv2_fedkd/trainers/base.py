"""Base class of every plugin trainer: nnU-Net's trainer plus settings read from the plugin's config file."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA

from nnunetv2_fedkd.data.label_availability import LabelAvailability
from nnunetv2_fedkd.trainers.config import (BASE_DEFAULTS, DATA_AUGMENTATION, USED_CONFIG_NAME, TrainerConfigError,
                                            load_trainer_config)
from nnunetv2_fedkd.utils import atomic_write_json

NNUNET_FOLDS = 5  # nnU-Net's do_split creates a 5-fold cross-validation when no splits_final.json exists
SPLITS_FILE = "splits_final.json"
SPLIT_READ_ATTEMPTS = 3  # reads of a splits_final.json that another training may be writing at that moment


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's (global: nnU-Net's data loader samples cases and patches with it) and torch's random
    generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def apply_cpu_threads(device: torch.device, environ=os.environ) -> int:
    """On a CPU, give torch the number of threads in ``OMP_NUM_THREADS`` when it is set; returns torch's count.

    ``nnUNetv2_train -device cpu`` sets one thread per core (``multiprocessing.cpu_count()``) whatever the
    environment says, so two trainings sharing a machine (a cluster job's core allocation, or the accuracy benchmark's
    ``--jobs 2`` on 2 cores) would each run a thread per core and slow each other down. The variable is the usual
    OpenMP one; unset (or on a GPU, where nnU-Net uses one thread) nothing changes."""
    value = environ.get("OMP_NUM_THREADS", "").strip()
    if device.type == "cpu" and value:
        try:
            threads = int(value)
        except ValueError:
            raise TrainerConfigError(f"OMP_NUM_THREADS must be a whole number of threads, not {value!r}") from None
        if threads < 1:
            raise TrainerConfigError(f"OMP_NUM_THREADS must be at least 1, not {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class nnUNetTrainerFedKDBase(nnUNetTrainer):
    """nnU-Net's trainer with its schedule (epochs, iterations, lr, checkpoint interval) and each subclass's extra
    settings taken from the plugin config file (see :mod:`nnunetv2_fedkd.trainers.config`).

    Subclasses add their settings by extending ``config_defaults`` and read them from ``self.fedkd_config``.
    The constructor signature is nnU-Net's own, so checkpoints, ``nnUNetv2_train --c`` and ``nnUNetv2_predict``
    work unchanged.
    """

    config_defaults: Dict[str, Any] = BASE_DEFAULTS

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.fedkd_config, self.fedkd_config_file = self.read_config(plans)
        if self.fedkd_config["data_augmentation"] not in DATA_AUGMENTATION:
            raise TrainerConfigError(f"trainer config {self.fedkd_config_file}: data_augmentation must be one of "
                                     f"{list(DATA_AUGMENTATION)}, not {self.fedkd_config['data_augmentation']!r}")
        seed = self.fedkd_config["training_seed"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise TrainerConfigError(f"trainer config {self.fedkd_config_file}: training_seed must be null or an int "
                                     f">= 0, not {seed!r}")
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_cpu_threads(self.device)
        for key in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "initial_lr",
                    "save_every"):
            setattr(self, key, self.fedkd_config[key])

    def _no_augmentation(self) -> bool:
        return self.fedkd_config["data_augmentation"] == "none"

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self._no_augmentation():  # as nnUNetTrainerNoDA: the patch as planned, no mirroring (nor at inference)
            self.inference_allowed_mirroring_axes = None
            return rotation, dummy_2d, self.configuration_manager.patch_size, None
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's training transforms, or with ``data_augmentation`` "none" nnU-Net's nnUNetTrainerNoDA ones (an
        instance method here, so the setting is read; nnU-Net calls it through ``self``)."""
        if self._no_augmentation():
            return nnUNetTrainerNoDA.get_training_transforms(*args, **kwargs)
        return super().get_training_transforms(*args, **kwargs)

    def do_split(self):
        """nnU-Net's split, except where nnU-Net would fail: a dataset with fewer training cases than nnU-Net's 5 folds
        (a hospital with a handful of labelled cases) and no ``splits_final.json``. There every case trains and the
        same cases validate, as with nnU-Net's fold ``all`` (``validates_on_training_cases`` is then true, and the log
        says so). A ``splits_final.json`` next to the plans is always used as nnU-Net uses it.

        Cases that annotate no organ (``[]`` in ``fedkd.case_annotated``: ``convert --unlabelled-as-training``) train
        in every fold and never validate: the folds are nnU-Net's seeded split (``generate_crossval_split``) of the
        labelled cases, and the few-case rule counts the labelled cases."""
        self.validates_on_training_cases = self.fold == "all"
        if self.fold != "all" and not os.path.isfile(os.path.join(self.preprocessed_dataset_folder_base,
                                                                  SPLITS_FILE)):
            if self.dataset_class is None:
                self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
            keys = sorted(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
            unlabelled = self._cases_without_labels(keys)
            labelled = [k for k in keys if k not in unlabelled]
            if len(labelled) < NNUNET_FOLDS:
                self.print_to_log_file(
                    f"{len(labelled)} labelled training case(s), fewer than nnU-Net's {NNUNET_FOLDS} folds, and no "
                    f"{SPLITS_FILE} in {self.preprocessed_dataset_folder_base}: fold {self.fold} trains on every case "
                    f"and validates on the labelled ones (as fold 'all'); its validation Dice is a training Dice. "
                    f"Write a {SPLITS_FILE} to choose another split.")
                self.validates_on_training_cases = True
                return keys, labelled
            if unlabelled:
                from nnunetv2.utilities.crossval_split import generate_crossval_split

                split = generate_crossval_split(labelled, seed=12345, n_splits=NNUNET_FOLDS)[int(self.fold)]
                self.print_to_log_file(
                    f"fold {self.fold}: nnU-Net's split of the {len(labelled)} labelled cases; the {len(unlabelled)} "
                    f"case(s) that annotate no organ train in every fold and never validate")
                self.validates_on_training_cases = False
                return list(split["train"]) + unlabelled, list(split["val"])
        for attempt in range(SPLIT_READ_ATTEMPTS):
            try:
                tr_keys, val_keys = super().do_split()
                break
            except json.JSONDecodeError:
                # nnU-Net writes splits_final.json in place when it is missing; another training of the same dataset
                # started at the same moment (the demo's two federations, a benchmark's --jobs 2) can read it half
                # written. Transient: read it again once the writer is done.
                if attempt == SPLIT_READ_ATTEMPTS - 1:
                    raise
                time.sleep(0.5)
        without = self._cases_without_labels(val_keys)
        if without:  # fold 'all' or the user's split: the cases that annotate no organ train, they never validate
            val_keys = [k for k in val_keys if k not in without]
            if not val_keys:
                raise TrainerConfigError(
                    f"fold {self.fold} of {self.plans_manager.dataset_name} validates only on cases that annotate no "
                    f"organ ({', '.join(without)}); give it labelled validation cases in "
                    f"{os.path.join(self.preprocessed_dataset_folder_base, SPLITS_FILE)}")
        self.validates_on_training_cases = set(val_keys) <= set(tr_keys)
        return tr_keys, val_keys

    def _cases_without_labels(self, keys=None) -> list:
        """Those of ``keys`` (default: every case) that annotate no organ (``[]`` in dataset.json
        ``fedkd.case_annotated``)."""
        if not self.dataset_json.get("fedkd"):  # not converted by the plugin: every case is fully annotated
            return []
        return LabelAvailability(self.dataset_json).annotating_nothing(keys)

    def training_seed(self) -> Optional[int]:
        """The seed this training starts from (``training_seed``; None: not seeded)."""
        return self.fedkd_config["training_seed"]

    def on_train_start(self):
        seed = self.training_seed()
        if seed is not None:  # before nnU-Net builds the network and the data loaders
            seed_everything(seed)
            self.print_to_log_file(f"random generators seeded with {seed} (training_seed)")
        super().on_train_start()

    def on_train_end(self):
        super().on_train_end()
        self._trained_in_this_process = True

    def perform_actual_validation(self, save_probabilities: bool = False):
        # skip only right after training; `nnUNetv2_train ... --val` (no training) still validates
        if not self.fedkd_config["final_validation"] and getattr(self, "_trained_in_this_process", False):
            self.print_to_log_file("final validation skipped (setting final_validation=false); "
                                   "run nnUNetv2_train ... --val to do it")
            return
        super().perform_actual_validation(save_probabilities)

    @classmethod
    def read_config(cls, plans: dict):
        """(settings, file) for this trainer class; usable before ``super().__init__`` (subclasses that adapt the
        plans or dataset.json to their settings need it there)."""
        pre = os.environ.get("nnUNet_preprocessed")
        folder = os.path.join(pre, plans["dataset_name"]) if pre else None
        return load_trainer_config(cls.__name__, cls.config_defaults, folder,
                                   shared_keys=cls.all_plugin_config_keys())

    @staticmethod
    def all_plugin_config_keys() -> set:
        """Every setting some plugin trainer knows (a shared config file may hold settings of several)."""
        keys, todo = set(), [nnUNetTrainerFedKDBase]
        while todo:
            cls = todo.pop()
            keys |= set(cls.config_defaults)
            todo.extend(cls.__subclasses__())
        return keys

    # a training case that annotates no organ (convert --unlabelled-as-training): nnU-Net's own loss would take it as
    # all background, so the trainers with that loss refuse such a dataset; the partial-label trainers (no label loss
    # from it) and the naive baseline ("unlabelled is background" is what it stands for) accept it
    accepts_cases_without_labels = False

    def initialize(self):
        self._refuse_cases_without_labels()
        super().initialize()
        if self.local_rank == 0 and self.output_folder is not None:
            atomic_write_json(
                os.path.join(self.output_folder, USED_CONFIG_NAME),
                {"trainer": type(self).__name__,
                 "config_file": None if self.fedkd_config_file is None else str(self.fedkd_config_file),
                 "settings": self.fedkd_config},
            )
        self.print_to_log_file(f"nnunetv2_fedkd settings ({self.fedkd_config_file or 'defaults'}): "
                               f"{self.fedkd_config}")

    def _refuse_cases_without_labels(self) -> None:
        """A training case that annotates no organ (``[]`` in dataset.json ``fedkd.case_annotated``) would be an
        all-background example for nnU-Net's own loss: refused, naming the dataset, unless the trainer accepts it
        (``accepts_cases_without_labels``)."""
        if self.accepts_cases_without_labels:
            return
        empty = sorted(self._cases_without_labels())
        if empty:
            raise TrainerConfigError(
                f"{type(self).__name__} trains with nnU-Net's own loss, which would take the {len(empty)} training "
                f"case(s) of {self.plans_manager.dataset_name} that annotate no organ (fedkd.case_annotated [], e.g. "
                f"{empty[0]!r}) as all background; train nnUNetTrainerMarginal, nnUNetTrainerDualKD or another "
                f"partial-label trainer on it, or convert the source without --unlabelled-as-training")
