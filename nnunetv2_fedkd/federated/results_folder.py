"""Verify a federation's nnU-Net results folder before predicting with it.

``nnUNetv2_predict`` (stock nnU-Net) loads ``fold_all/checkpoint_final.pth`` with ``torch.load`` and unpickles it: a
tampered results folder can run code on the machine that predicts. The federation's own checkpoints
(``federation/global_round_NNNN.fedkd``) are safetensors files with a digest, so :func:`verify_results_folder` can
tell whether a results folder holds exactly the federation's global model without running anything:

* the checkpoint is read with ``torch.load(weights_only=True)`` (PyTorch's restricted unpickler: tensors, containers,
  numbers, strings; any other object is refused, never constructed);
* its ``network_weights`` must have the weights digest of the global weights ``state.json`` names (the last round);
* its ``plans.json`` must have the federation's plans digest, and the checkpoint's trainer the folder's trainer.

``nnunetv2_fedkd verify-checkpoint MODEL_FOLDER`` runs it; predict only with a folder that passes (or one you wrote).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from nnunetv2_fedkd.federated.weights_io import CorruptCheckpoint, load_weights, weights_digest


class VerificationFailed(RuntimeError):
    """The results folder does not hold the federation's global model (or cannot be read safely)."""


def verify_results_folder(model_folder: Path, run_dir: Optional[Path] = None, fold: str = "all",
                          checkpoint: str = "checkpoint_final.pth") -> Dict[str, Any]:
    """Check ``model_folder/fold_<fold>/<checkpoint>`` against the federation run folder ``run_dir`` (default:
    ``model_folder/federation``). Returns what was verified; raises :class:`VerificationFailed` naming the file and
    the difference, and FileNotFoundError for a missing file."""
    from nnunetv2_fedkd.federated.planning import federation_plans_digest
    from nnunetv2_fedkd.distillation.teachers import TeacherError, load_checkpoint

    model_folder = Path(model_folder)
    run_dir = Path(run_dir) if run_dir is not None else model_folder / "federation"
    state_file = run_dir / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} does not exist: name the federation's run folder (--run-dir)")
    try:
        state = json.loads(state_file.read_text())
        global_file = run_dir / str(state["global_weights"])
        completed, plans_expected = int(state["completed_rounds"]), str(state["plans_digest"])
    except (ValueError, KeyError, TypeError) as e:
        raise VerificationFailed(f"{state_file} is not a readable federation state file ({e})") from e
    try:
        global_weights, _ = load_weights(global_file)
    except CorruptCheckpoint as e:
        raise VerificationFailed(f"the federation's own checkpoint is damaged: {e}") from e
    ckpt_file = model_folder / f"fold_{fold}" / checkpoint
    try:
        ckpt = load_checkpoint(ckpt_file, what="checkpoint")
    except TeacherError as e:
        if not ckpt_file.is_file():
            raise FileNotFoundError(str(e)) from e
        raise VerificationFailed(f"{e}: do not predict with it") from e
    expected, found = weights_digest(global_weights), weights_digest(ckpt["network_weights"])
    if found != expected:
        raise VerificationFailed(f"{ckpt_file} does not hold the federation's global model after round {completed} "
                                 f"({global_file.name}): weights digest {found[:12]}..., expected {expected[:12]}...")
    plans_file = model_folder / "plans.json"
    try:
        plans_found = federation_plans_digest(json.loads(plans_file.read_text()))
    except (OSError, ValueError) as e:
        raise VerificationFailed(f"{plans_file} cannot be read: {e}") from e
    if plans_found != plans_expected:
        raise VerificationFailed(f"{plans_file} is not the federation's plans (digest {plans_found[:12]}..., expected "
                                 f"{plans_expected[:12]}...)")
    trainer = model_folder.name.split("__")[0]
    if ckpt.get("trainer_name") != trainer:
        raise VerificationFailed(f"{ckpt_file} names trainer {ckpt.get('trainer_name')!r}, the folder {trainer!r}")
    return {"checkpoint": str(ckpt_file), "round": completed, "total_rounds": state.get("total_rounds"),
            "weights_digest": expected, "plans_digest": plans_expected, "run_dir": str(run_dir)}
