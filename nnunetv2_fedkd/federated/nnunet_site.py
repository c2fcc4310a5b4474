"""One hospital's side of a federated round, with stock nnU-Net: local training and evaluation of the global model.

Used by the in-process runner and by the Flower ClientApp alike (it takes and returns plain weights and JSON).

* :meth:`NnUNetSite.fit` is exactly ``nnUNetv2_train <site view dataset> 3d_fullres <fold> -tr <trainer> -p <plans>``
  (nnU-Net's own ``get_trainer_from_args`` + ``run_training``) with ``nnUNet_fedkd_config`` naming the round's
  settings file (:mod:`nnunetv2_fedkd.trainers.fedkd`). The trainer writes the site's update file; only that file's
  weights, case count and metrics are returned.
* :meth:`NnUNetSite.evaluate` runs the global model (with the site's own FedBN layers, if any) on the site's
  validation cases of that fold (nnU-Net's split; its training cases when it has fewer than nnU-Net's 5 folds:
  :meth:`nnUNetTrainerFedKDBase.do_split`), on the preprocessed data, without test-time mirroring, and returns the
  Dice of the organs the site labels. Its cost is bounded by ``evaluate_patches`` (default
  :data:`DEFAULT_EVALUATION_PATCHES`) network passes of one patch: when nnU-Net's sliding window over the whole
  validation volumes needs no more tiles than that, it predicts the whole volumes (nnU-Net's predictor, tile step
  0.5); otherwise it predicts that many validation patches drawn by nnU-Net's own data loader at uniform positions
  (no foreground oversampling, so that the pooled Dice approximates the whole-volume Dice, centre-weighted: patch
  origins are uniform, so border voxels are seen less often; each case is drawn equally often; the same patches every
  round), so that at real image sizes validating each round's global model costs about as much as nnU-Net's own
  validation of an epoch, not a sliding window over every volume. ``evaluate_patches`` <= 0: always whole volumes.

Site folder (``site_dir``): ``round_NNNN/fedkd_trainer.json`` (settings), ``round_NNNN/train.log`` (nnU-Net's output),
``update.fedkd`` (the update of the last local training), ``local_state_after_round_NNNN.fedkd`` (FedBN layers).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from nnunetv2_fedkd.federated.site_side import SiteUpdate, encode_update, merge_local_state
from nnunetv2_fedkd.federated.weights_io import load_weights, save_weights
from nnunetv2_fedkd.data.label_availability import LabelAvailability
from nnunetv2_fedkd.utils import atomic_write_json, read_json

# instruction keys that are not trainer settings
_NOT_SETTINGS = {"strategy", "evaluate_patches", "transport_dtype"}
# per-round evaluation budget: network passes of one patch per site (nnU-Net validates 50 batches of 2 per epoch)
DEFAULT_EVALUATION_PATCHES = 100


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

    def latest_local_state(self, completed_rounds: int) -> Path:
        """The site's newest local state (FedBN layers) written after round ``completed_rounds`` or before: a site
        that was not drawn in some rounds (site sampling) continues from the state of the last round it trained. The
        path of round ``completed_rounds`` when there is none yet."""
        for r in range(int(completed_rounds), -1, -1):
            if self.local_state_after(r).is_file():
                return self.local_state_after(r)
        return self.local_state_after(completed_rounds)

    @property
    def update_file(self) -> Path:
        return self.site_dir / "update.fedkd"

    def _round_config(self, global_file: Optional[Path], instructions: Mapping[str, Any],
                      name: str = "fedkd_trainer.json") -> Path:
        r = int(instructions["round"])
        cfg = {**self.settings, **{k: v for k, v in instructions.items() if k not in _NOT_SETTINGS},
               "global_model": None if global_file is None else str(global_file),
               "local_state_file": str(self.latest_local_state(r)),
               "local_state_out": str(self.local_state_after(r + 1)),
               "update_file": str(self.update_file), "site_name": self.name, "final_validation": False}
        return atomic_write_json(self.site_dir / f"round_{r + 1:04d}" / name, cfg)

    def _trainer(self, config_file: Path):
        from nnunetv2.run.run_training import get_trainer_from_args

        with _env(nnUNet_fedkd_config=str(config_file)):
            return get_trainer_from_args(self.dataset, "3d_fullres", self.fold, self.trainer_name, self.plans,
                                         device=torch.device(self.device))

    def check_files(self) -> None:
        """The site's nnU-Net JSON files (``dataset.json``, the plans, ``splits_final.json`` if any, in
        ``$nnUNet_preprocessed/<dataset>``) must exist and parse: a ValueError (deterministic: the federation stops)
        naming the site and the file, instead of nnU-Net's bare ``JSONDecodeError`` from inside the trainer."""
        pre = Path(os.environ.get("nnUNet_preprocessed", "")) / self.dataset
        for name, required in (("dataset.json", True), (f"{self.plans}.json", True), ("splits_final.json", False)):
            f = pre / name
            if not f.is_file():
                if required:
                    raise FileNotFoundError(f"site {self.name!r}: {f} does not exist")
                continue
            read_json(f, f"site {self.name!r}")

    # -- local training -----------------------------------------------------------------------------------------------
    def fit(self, global_file: Path, instructions: Mapping[str, Any]) -> SiteUpdate:
        """Local training from the global weights in ``global_file``; returns the site's update, encoded for the
        federation's ``transport_dtype`` (:func:`~nnunetv2_fedkd.federated.site_side.encode_update`: with float16,
        the change from ``global_file``'s weights; ``update.fedkd`` then holds that, what leaves the site)."""
        self.check_files()
        r = int(instructions["round"])
        cfg = self._round_config(Path(global_file), instructions)
        log_file = cfg.parent / "train.log"
        if self.update_file.exists():
            self.update_file.unlink()
        t0 = time.time()
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
        dtype = str(instructions.get("transport_dtype", "float32"))
        if dtype != "float32":
            weights = encode_update(weights, load_weights(global_file)[0], dtype)
            save_weights(self.update_file, weights, {**meta, "transport_dtype": dtype,
                                                     "encoding": "change from the received global weights"})
        metrics = {**(meta.get("metrics") or {}), "fit_seconds": round(time.time() - t0, 2)}
        return SiteUpdate(self.name, weights, int(meta["num_examples"]), metrics,
                          organs=frozenset(meta.get("organs") or self.organs))

    # -- evaluation ---------------------------------------------------------------------------------------------------
    def evaluate(self, weights: Mapping[str, torch.Tensor], instructions: Mapping[str, Any]) -> Dict[str, Any]:
        """Dice of the site's organs on its validation cases, for ``weights`` (plus the site's local FedBN layers
        after this round, when it keeps any), within ``instructions["evaluate_patches"]`` patch passes (module
        docstring). Dice pools the voxels of all validation cases (or patches) per organ (None when the organ is
        absent in reference and prediction). Returns ``{"dice": {organ: value}, "num_cases": n, "on_training_cases":
        bool, "sampled_patches": p (0: whole volumes), "network_passes": m, "seconds": s}``."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        t0 = time.time()
        completed = int(instructions["round"]) + 1
        budget = int(instructions.get("evaluate_patches", DEFAULT_EVALUATION_PATCHES))
        cfg = self._round_config(None, instructions, "fedkd_evaluate.json")
        with quiet(), _env(nnUNet_fedkd_config=str(cfg)):
            trainer = self._trainer(cfg)
            _, val_keys = trainer.do_split()
        on_training = bool(getattr(trainer, "validates_on_training_cases", False))
        if on_training:
            self.log(f"site {self.name!r}: evaluates on its {len(val_keys)} training case(s) (fewer than nnU-Net's "
                     f"5 folds, or fold 'all'): its Dice is a training Dice")
        weights = dict(weights)
        local = self.latest_local_state(completed)
        if instructions.get("local_keys") == "norm" and local.is_file():
            weights = merge_local_state(weights, load_weights(local)[0])
        pm, cm, lm = trainer.plans_manager, trainer.configuration_manager, trainer.label_manager
        net = type(trainer).build_network_architecture(
            pm, cm, determine_num_input_channels(pm, cm, trainer.dataset_json), lm.num_segmentation_heads,
            enable_deep_supervision=False)
        folder = os.path.join(trainer.preprocessed_dataset_folder_base, cm.data_identifier)
        ds = infer_dataset_class(folder)(folder, list(val_keys))
        names = LabelAvailability(trainer.dataset_json).label_names
        mine = [o for o in ((trainer.dataset_json.get("fedkd") or {}).get("annotated") or names)]
        dice = PooledDice({o: names.index(o) + 1 for o in mine})
        windows = sum(sliding_window_tiles(ds.load_case(k)[0].shape[1:], cm.patch_size) for k in val_keys)
        sampled = 0 < budget < windows
        with quiet():
            if sampled:
                net.load_state_dict(weights)
                with contextlib.closing(validation_patches(ds, trainer, budget)) as patches:  # restores numpy's RNG
                    for data, ref in patches:
                        dice.add(predict_patches(net, data, lm, self.device), ref)
            else:
                for _, pred, ref in predict_volumes(net, weights, trainer, ds, val_keys, self.device):
                    dice.add(pred, ref)
        return {"dice": dice.values(), "num_cases": len(val_keys), "on_training_cases": on_training,
                "sampled_patches": budget if sampled else 0, "network_passes": budget if sampled else windows,
                "seconds": round(time.time() - t0, 2)}


class PooledDice:
    """Dice per organ over all the voxels added (of several cases or patches): 2 TP / (2 TP + FP + FN) with TP, FP,
    FN summed over everything added (nnU-Net's ``compute_tp_fp_fn_tn``), None when the organ is absent in every
    reference and prediction. ``organs``: organ -> label value. Voxels whose reference is negative (nnU-Net pads
    patches that cross the image border with -1) are left out."""

    def __init__(self, organs: Mapping[str, int]):
        self.organs = dict(organs)
        self.tp = {o: 0 for o in self.organs}
        self.fp_fn = {o: 0 for o in self.organs}

    def add(self, prediction: np.ndarray, reference: np.ndarray) -> None:
        from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

        if prediction.shape != reference.shape:
            raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
        outside = reference < 0
        for o, v in self.organs.items():
            tp, fp, fn, _ = compute_tp_fp_fn_tn(reference == v, prediction == v, ignore_mask=outside)
            self.tp[o] += int(tp)
            self.fp_fn[o] += int(fp + fn)

    def values(self) -> Dict[str, Optional[float]]:
        return {o: (2 * self.tp[o] / (2 * self.tp[o] + self.fp_fn[o]) if self.tp[o] + self.fp_fn[o] else None)
                for o in self.organs}


def sliding_window_tiles(shape: Sequence[int], patch_size: Sequence[int], tile_step_size: float = 0.5) -> int:
    """How many patches nnU-Net's sliding window predicts for an image of ``shape`` (it pads images smaller than the
    patch to the patch size)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    shape = [max(int(s), int(p)) for s, p in zip(shape, patch_size)]
    steps = compute_steps_for_sliding_window(tuple(shape), tuple(int(p) for p in patch_size), tile_step_size)
    return math.prod(len(s) for s in steps)


def validation_patches(dataset, trainer, count: int, seed: int = 0, oversample_foreground: float = 0.0):
    """``count`` (data, reference) validation patches, in batches, from nnU-Net's own data loader with the plans'
    patch size and batch size, no transforms. ``oversample_foreground`` 0 (default): patch origins uniform over
    each case, so the Dice pooled over them approximates the whole-volume Dice (centre-weighted); nnU-Net's training
    value (0.33: with batch 2, one patch of each batch on foreground; its per-epoch pseudo Dice) puts the organs into
    more patches but scores them optimistically (fewer background voxels, so fewer false positives). The draw is
    seeded (and numpy's global random state restored afterwards, also when the caller stops early and closes the
    generator: nnU-Net's loader draws from it), so every round scores the same patches."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    cm = trainer.configuration_manager  # the trainer is not initialised: its batch size is the plans'
    ps = cm.patch_size
    loader = nnUNetDataLoader(dataset, cm.batch_size, ps, ps, trainer.label_manager,
                              oversample_foreground_percent=oversample_foreground)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        left = count
        while left > 0:
            batch = loader.generate_train_batch()
            take = min(left, len(batch["data"]))
            left -= take
            yield batch["data"][:take], np.asarray(batch["target"][:take, 0])
    finally:
        np.random.set_state(state)


def _autocast(device: str):
    return torch.autocast("cuda", enabled=True) if device == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def predict_patches(net: torch.nn.Module, data: torch.Tensor, label_manager, device: str) -> np.ndarray:
    """Label maps ``[B, *patch]`` of one batch of patches (logits in float32, converted as nnU-Net's predictor does)."""
    net = net.to(device).eval()
    with _autocast(device):
        logits = net(data.to(device)).float().cpu()
    return np.stack([np.asarray(label_manager.convert_logits_to_segmentation(lg)) for lg in logits])


def predict_volumes(net, weights, trainer, dataset, keys, device: str):
    """(key, label map, reference) per preprocessed case, with nnU-Net's sliding-window predictor (tile step 0.5,
    Gaussian weighting, no mirroring)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device == "cuda", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(net, trainer.plans_manager, trainer.configuration_manager, [weights],
                                    trainer.dataset_json, type(trainer).__name__, None)
    for key in keys:
        data, seg, _, _ = dataset.load_case(key)
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(data)).float())
        yield key, np.asarray(trainer.label_manager.convert_logits_to_segmentation(logits)), np.asarray(seg)[0]
