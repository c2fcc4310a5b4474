"""One hospital's side of a federated round, with stock nnU-Net: local training and evaluation of the global model.

Used by the in-process runner and by the Flower ClientApp alike (it takes and returns plain weights and JSON).

* :meth:`NnUNetSite.fit` is exactly ``nnUNetv2_train <site view dataset> 3d_fullres <fold> -tr <trainer> -p <plans>``
  (nnU-Net's own ``get_trainer_from_args`` + ``run_training``) with ``nnUNet_fedkd_config`` naming the round's
  settings file (:mod:`nnunetv2_fedkd.trainers.fedkd`). The trainer writes the site's update file; only that file's
  weights, case count and metrics are returned.
* :meth:`NnUNetSite.evaluate` runs the global model (with the site's own FedBN layers, if any) on the site's
  validation cases of that fold (nnU-Net's split), on the preprocessed data with nnU-Net's sliding-window predictor,
  and returns the Dice of the organs the site labels (on its training cases when it has fewer than nnU-Net's
  5 folds: :meth:`nnUNetTrainerFedKDBase.do_split`).

Site folder (``site_dir``): ``round_NNNN/fedkd_trainer.json`` (settings), ``round_NNNN/train.log`` (nnU-Net's output),
``update.fedkd`` (the update of the last local training), ``local_state_after_round_NNNN.fedkd`` (FedBN layers).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from nnunetv2_fedkd.federated.aggregation import SiteUpdate, merge_local_state
from nnunetv2_fedkd.federated.weights_io import load_weights
from nnunetv2_fedkd.label_availability import LabelAvailability
from nnunetv2_fedkd.utils import atomic_write_json

# instruction keys that are not trainer settings
_NOT_SETTINGS = {"strategy"}


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def quiet():
    """Send stdout (nnU-Net's chatter) to /dev/null, closing it afterwards."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


class SiteError(RuntimeError):
    pass


class NnUNetSite:
    """A site: its nnU-Net view dataset (``DatasetXXX_Name``), the organs it labels, the trainer and plans."""

    def __init__(self, name: str, dataset: str, organs: Sequence[str], site_dir: Path,
                 trainer: str = "nnUNetTrainerFedKD", plans: str = "nnUNetPlansSmall", fold: int = 0,
                 device: str = "cpu", settings: Optional[Mapping[str, Any]] = None,
                 log: Callable[[str], Any] = print):
        self.name, self.dataset, self.organs = name, dataset, list(organs)
        self.site_dir = Path(site_dir)
        self.trainer_name, self.plans, self.fold, self.device = trainer, plans, fold, device
        self.settings = dict(settings or {})
        self.log = log

    # -- files --------------------------------------------------------------------------------------------------------
    def local_state_after(self, completed_rounds: int) -> Path:
        return self.site_dir / f"local_state_after_round_{completed_rounds:04d}.fedkd"

    @property
    def update_file(self) -> Path:
        return self.site_dir / "update.fedkd"

    def _round_config(self, global_file: Optional[Path], instructions: Mapping[str, Any],
                      name: str = "fedkd_trainer.json") -> Path:
        r = int(instructions["round"])
        cfg = {**self.settings, **{k: v for k, v in instructions.items() if k not in _NOT_SETTINGS},
               "global_model": None if global_file is None else str(global_file),
               "local_state_file": str(self.local_state_after(r)),
               "local_state_out": str(self.local_state_after(r + 1)),
               "update_file": str(self.update_file), "site_name": self.name, "final_validation": False}
        return atomic_write_json(self.site_dir / f"round_{r + 1:04d}" / name, cfg)

    def _trainer(self, config_file: Path):
        from nnunetv2.run.run_training import get_trainer_from_args

        with _env(nnUNet_fedkd_config=str(config_file)):
            return get_trainer_from_args(self.dataset, "3d_fullres", self.fold, self.trainer_name, self.plans,
                                         device=torch.device(self.device))

    # -- local training -----------------------------------------------------------------------------------------------
    def fit(self, global_file: Path, instructions: Mapping[str, Any]) -> SiteUpdate:
        """Local training from the global weights in ``global_file``; returns the site's update."""
        r = int(instructions["round"])
        cfg = self._round_config(Path(global_file), instructions)
        log_file = cfg.parent / "train.log"
        if self.update_file.exists():
            self.update_file.unlink()
        with open(log_file, "w") as lf, contextlib.redirect_stdout(lf), _env(nnUNet_fedkd_config=str(cfg)):
            trainer = self._trainer(cfg)
            trainer.run_training()
        if not self.update_file.is_file():
            raise SiteError(f"site {self.name!r}: local training wrote no update file {self.update_file} "
                            f"(log: {log_file})")
        weights, meta = load_weights(self.update_file)
        if meta.get("round") != r or meta.get("site") != self.name:
            raise SiteError(f"site {self.name!r}: {self.update_file} is for site {meta.get('site')!r} round "
                            f"{meta.get('round')}, expected round {r}")
        return SiteUpdate(self.name, weights, int(meta["num_examples"]), dict(meta.get("metrics") or {}),
                          organs=frozenset(meta.get("organs") or self.organs))

    # -- evaluation ---------------------------------------------------------------------------------------------------
    def evaluate(self, weights: Mapping[str, torch.Tensor], instructions: Mapping[str, Any]) -> Dict[str, Any]:
        """Dice of the site's organs on its validation cases, for ``weights`` (plus the site's local FedBN layers
        after this round, when it keeps any). Dice pools the voxels of all validation cases per organ (None when the
        organ is absent in reference and prediction). Returns ``{"dice": {organ: value}, "num_cases": n,
        "on_training_cases": bool}``."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        completed = int(instructions["round"]) + 1
        cfg = self._round_config(None, instructions, "fedkd_evaluate.json")
        with quiet(), _env(nnUNet_fedkd_config=str(cfg)):
            trainer = self._trainer(cfg)
            _, val_keys = trainer.do_split()
        on_training = bool(getattr(trainer, "validates_on_training_cases", False))
        if on_training:
            self.log(f"site {self.name!r}: evaluates on its {len(val_keys)} training case(s) (fewer than nnU-Net's "
                     f"5 folds, or fold 'all'): its Dice is a training Dice")
        weights = dict(weights)
        local = self.local_state_after(completed)
        if instructions.get("local_keys") == "norm" and local.is_file():
            weights = merge_local_state(weights, load_weights(local)[0])
        pm, cm, lm = trainer.plans_manager, trainer.configuration_manager, trainer.label_manager
        net = type(trainer).build_network_architecture(
            pm, cm, determine_num_input_channels(pm, cm, trainer.dataset_json), lm.num_segmentation_heads,
            enable_deep_supervision=False)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=self.device == "cuda", device=torch.device(self.device),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(net, pm, cm, [weights], trainer.dataset_json, type(trainer).__name__, None)
        folder = os.path.join(trainer.preprocessed_dataset_folder_base, cm.data_identifier)
        ds = infer_dataset_class(folder)(folder, list(val_keys))
        names = LabelAvailability(trainer.dataset_json).label_names
        mine = [o for o in ((trainer.dataset_json.get("fedkd") or {}).get("annotated") or names)]
        inter = {o: 0 for o in mine}
        total = {o: 0 for o in mine}
        with quiet():
            for key in val_keys:
                data, seg, _, _ = ds.load_case(key)
                logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(data)).float())
                pred = np.asarray(lm.convert_logits_to_segmentation(logits))
                ref = np.asarray(seg)[0]
                for o in mine:
                    v = names.index(o) + 1
                    p, g = pred == v, ref == v
                    inter[o] += int(np.logical_and(p, g).sum())
                    total[o] += int(p.sum() + g.sum())
        dice = {o: (2 * inter[o] / total[o] if total[o] else None) for o in mine}
        return {"dice": dice, "num_cases": len(val_keys), "on_training_cases": on_training}
