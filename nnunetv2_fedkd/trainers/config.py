"""Trainer configuration: read from a file, never from new ``__init__`` parameters.

nnU-Net records a trainer's ``__init__`` signature (``inspect.signature`` + ``locals()``) to rebuild it from a
checkpoint, so a plugin trainer cannot take extra constructor arguments. Settings come from a JSON file instead:

1. the file named by the environment variable ``nnUNet_fedkd_config`` (set it per run; the federated runner does), else
2. ``$nnUNet_preprocessed/<DatasetXXX_Name>/fedkd_trainer.json`` (per-dataset defaults), else
3. built-in defaults (nnU-Net's own values).

The file holds top-level settings plus optional per-trainer overrides::

    {"num_epochs": 2, "num_iterations_per_epoch": 10,
     "trainers": {"nnUNetTrainerMarginal": {"exclusion_weight": 0.5}}}

The settings actually used are written to ``<output_folder>/fedkd_trainer_config.json`` so every result records them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from nnunetv2_fedkd.utils import read_json

CONFIG_ENV = "nnUNet_fedkd_config"
DATASET_CONFIG_NAME = "fedkd_trainer.json"
USED_CONFIG_NAME = "fedkd_trainer_config.json"

# nnU-Net's own defaults for the schedule knobs every plugin trainer exposes.
BASE_DEFAULTS: Dict[str, Any] = {
    "num_epochs": 1000,
    "num_iterations_per_epoch": 250,
    "num_val_iterations_per_epoch": 50,
    "initial_lr": 1e-2,
    "save_every": 50,
    # nnU-Net predicts the fold's validation cases after training (sliding window + mirroring); on a CPU that can
    # cost more than a short training. false skips it (run `nnUNetv2_train ... --val` later to do it).
    "final_validation": True,
    # "nnunet": nnU-Net's training augmentation (spatial, intensity, mirroring; for its 1000 x 250 iterations);
    # "none": nnU-Net's own nnUNetTrainerNoDA transforms (no augmentation, no test-time mirroring). At a few hundred
    # CPU iterations the augmentation delays the small organs: measured on the accuracy benchmark's seed-0
    # federation (40x40x32), the fully labelled oracle after 960 iterations reached test Dice
    # liver/spleen/kidney/pancreas .889/.521/.705/0 and .889/.192/.711/0 with it (two runs), .901/.797/.811/.622 and
    # .894/.803/.817/.626 without (README, Trainer settings).
    "data_augmentation": "nnunet",
    # an int seeds Python's, numpy's and torch's random generators when training starts (nnU-Net does not seed): with
    # nnUNet_n_proc_DA=0 (augmentation and patch sampling in the training process) the same settings give the same
    # training on a CPU. Federated sites derive each round's seed from it, the round and the site's name. null: no
    # seeding (nnU-Net's behaviour)
    "training_seed": None,
}
DATA_AUGMENTATION = ("nnunet", "none")

# The settings of the short CPU runs (a few hundred iterations) of the demo, the CI tests and the benchmarks, on top of
# their own schedules: one validation batch per epoch, a higher learning rate than nnU-Net's 0.01, no augmentation.
# Users' GPU runs keep nnU-Net's values (BASE_DEFAULTS).
SHORT_CPU_RUN: Dict[str, Any] = {"num_val_iterations_per_epoch": 1, "initial_lr": 0.03, "data_augmentation": "none"}


class TrainerConfigError(ValueError):
    pass


def find_config_file(preprocessed_dataset_folder: Optional[str]) -> Optional[Path]:
    env = os.environ.get(CONFIG_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise TrainerConfigError(f"{CONFIG_ENV}={env} does not name an existing file")
        return p
    if preprocessed_dataset_folder:
        p = Path(preprocessed_dataset_folder) / DATASET_CONFIG_NAME
        if p.is_file():
            return p
    return None


def check_config_keys(raw: Dict[str, Any], trainer_name: str, defaults: Dict[str, Any], shared_keys: Iterable[str],
                      source: str) -> List[Dict[str, Any]]:
    """The settings layers of a parsed settings file ``raw`` for ``trainer_name``: ``[top level, trainers[trainer_name]]``.

    A top-level key may belong to another plugin trainer (one file can serve several); ``shared_keys`` are the keys
    any plugin trainer knows. A key nobody knows, or a key in this trainer's own section that it does not know, is a
    :class:`TrainerConfigError` naming ``source``: a typo in a weight name must not silently train with the default.
    """
    if not isinstance(raw, dict):
        raise TrainerConfigError(f"{source} must hold a JSON object")
    top = {k: v for k, v in raw.items() if k != "trainers"}
    per_trainer = raw.get("trainers") or {}
    if not isinstance(per_trainer, dict):
        raise TrainerConfigError(f"{source}: 'trainers' must map trainer names to settings")
    own = per_trainer.get(trainer_name) or {}
    if not isinstance(own, dict):
        raise TrainerConfigError(f"{source}: trainers.{trainer_name} must hold settings")
    shared = set(shared_keys) | set(defaults)
    unknown = sorted(k for k in top if k not in shared) + \
        sorted(f"trainers.{trainer_name}.{k}" for k in own if k not in defaults)
    if unknown:
        raise TrainerConfigError(f"{source}: unknown setting(s) {', '.join(unknown)} for {trainer_name}; known: "
                                 f"{', '.join(sorted(defaults))}")
    return [top, own]


def load_trainer_config(
    trainer_name: str,
    defaults: Dict[str, Any],
    preprocessed_dataset_folder: Optional[str],
    shared_keys: Iterable[str] = (),
) -> Tuple[Dict[str, Any], Optional[Path]]:
    """Merge ``defaults`` <- file top level <- file ``trainers[trainer_name]`` (keys checked by
    :func:`check_config_keys`)."""
    path = find_config_file(preprocessed_dataset_folder)
    cfg = dict(defaults)
    if path is None:
        return cfg, None
    raw = read_json(path, "trainer config", TrainerConfigError)
    for layer in check_config_keys(raw, trainer_name, defaults, shared_keys, f"trainer config {path}"):
        cfg.update({k: v for k, v in layer.items() if k in defaults})
    return cfg, path
