"""One multi-organ student vs its K single-organ teachers run one by one and merged: Dice, parameters, inference time.

Both sides go through the stock commands a user runs: every teacher, then the student, predicts the same test images
with ``nnUNetv2_predict`` (same settings: no test-time mirroring, one process each); the teachers' label maps are
merged into one label map of the federation's label set (:func:`merge_teacher_label_maps`), and both are scored with
``nnUNetv2_evaluate_folder`` against the same references. Inference time is the wall time of those commands, taken
side by side in one run; parameters are counted from the checkpoints (``weights_only=True``).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunetv2_fedkd.utils import atomic_output_dir


@dataclass
class Model:
    """A trained nnU-Net: ``nnUNet_results/<dataset>/<trainer>__<plans>__3d_fullres/fold_<fold>``."""

    dataset: str
    trainer: str
    fold: str = "0"
    plans: str = "nnUNetPlansSmall"
    organ: Optional[str] = None  # single-organ teachers: the registry organ of their foreground
    results: Optional[Path] = None  # its nnUNet_results (None: the workdir's)

    def folder(self, default_results: Path) -> Path:
        root = Path(self.results) if self.results is not None else Path(default_results)
        return root / self.dataset / f"{self.trainer}__{self.plans}__3d_fullres" / f"fold_{self.fold}"

    def env(self, extra_env: Optional[Dict[str, str]]) -> Dict[str, str]:
        env = dict(extra_env or {})
        if self.results is not None:
            env["nnUNet_results"] = str(self.results)
        return env


def parameter_count(fold_folder: Path, exclude_prefix: str = "fedkd_feature_adapters.") -> Dict[str, int]:
    """Parameters in a checkpoint's network weights (read with ``weights_only=True``); the distillation-only feature
    adapters (never used at inference) are counted apart."""
    from nnunetv2_fedkd.distillation.teachers import load_checkpoint

    weights = load_checkpoint(Path(fold_folder) / "checkpoint_final.pth")["network_weights"]
    net = sum(int(v.numel()) for k, v in weights.items() if v.is_floating_point() and not k.startswith(exclude_prefix))
    extra = sum(int(v.numel()) for k, v in weights.items() if v.is_floating_point() and k.startswith(exclude_prefix))
    return {"network": net, "distillation_adapters": extra}


def merge_teacher_label_maps(predictions: Dict[str, Path], labels: Dict[str, int], out: Path) -> Dict[str, int]:
    """Merge single-organ label maps (``{organ: folder}``; any non-zero voxel is that organ) into one label map per
    case with the federation's values (``labels``: organ -> value). A voxel claimed by several teachers goes to the
    organ listed first in ``labels``. Every folder must hold the same case files on the same grid. Returns the number
    of voxels claimed by more than one teacher, per case. Written to a temporary folder, then renamed to ``out``."""
    organs = [o for o in labels if o in predictions and labels[o] != 0]
    if not organs:
        raise ValueError("no teacher predictions to merge")
    cases = sorted(p.name for p in Path(predictions[organs[0]]).glob("*.nii.gz"))
    if not cases:
        raise FileNotFoundError(f"no label maps in {predictions[organs[0]]}")
    conflicts: Dict[str, int] = {}
    with atomic_output_dir(out, overwrite=True) as tmp:
        for case in cases:
            merged, claimed, ref = None, None, None
            for organ in organs:
                f = Path(predictions[organ]) / case
                if not f.is_file():
                    raise FileNotFoundError(f"teacher prediction {f} is missing (the {organ} teacher)")
                img = sitk.ReadImage(str(f))
                arr = sitk.GetArrayFromImage(img) != 0
                if ref is None:
                    ref, merged, claimed = img, np.zeros(arr.shape, np.uint8), np.zeros(arr.shape, np.uint8)
                elif arr.shape != claimed.shape:
                    raise ValueError(f"teacher prediction {f} has shape {arr.shape}, the others {claimed.shape}")
                merged[arr & (merged == 0)] = labels[organ]
                claimed += arr
            conflicts[case] = int((claimed > 1).sum())
            out_img = sitk.GetImageFromArray(merged)
            out_img.CopyInformation(ref)
            sitk.WriteImage(out_img, str(tmp / case))
    return conflicts


def predict_merged_teachers(
        workdir: Path, teachers: Sequence[Model], test_images: Path, labels: Dict[str, int], out: Path,
        log_dir: Optional[Path] = None, extra_env: Optional[Dict[str, str]] = None,
) -> Tuple[Path, Dict[str, int], Dict[str, float]]:
    """Predict ``test_images`` with every single-organ teacher (stock ``nnUNetv2_predict``, timed) into
    ``out/pred_teacher_<organ>`` and merge their label maps into ``out/pred_merged_teachers`` (with the first
    teacher's plans.json, which the evaluator reads). Returns (merged folder, conflicts per case, seconds per
    teacher)."""
    from nnunetv2_fedkd.workflows.pipeline import predict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: Dict[str, float] = {}
    preds: Dict[str, Path] = {}
    for t in teachers:
        t0 = time.perf_counter()
        preds[t.organ] = predict(test_images, out / f"pred_teacher_{t.organ}", t.dataset, t.trainer, workdir,
                                 fold=t.fold, plans=t.plans, log_dir=log_dir, extra_env=t.env(extra_env))
        seconds[f"teacher_{t.organ}"] = time.perf_counter() - t0
    merged = out / "pred_merged_teachers"
    conflicts = merge_teacher_label_maps(preds, labels, merged)
    shutil.copy(preds[teachers[0].organ] / "plans.json", merged / "plans.json")
    return merged, conflicts, seconds


def compare_student_with_teachers(workdir: Path, student: Model, teachers: Sequence[Model], test_images: Path,
                                  test_labels: Path, test_dataset_json: Path, out: Path,
                                  log_dir: Optional[Path] = None, extra_env: Optional[Dict[str, str]] = None) -> dict:
    """Predict ``test_images`` with each teacher and with the student (stock ``nnUNetv2_predict``, timed), merge the
    teachers, evaluate both (stock ``nnUNetv2_evaluate_folder``) and return every figure (also written to
    ``out/student_vs_teachers.json``)."""
    from nnunetv2_fedkd.env import subprocess_env
    from nnunetv2_fedkd.workflows.pipeline import evaluate, predict

    results = Path(subprocess_env(workdir, extra=extra_env)["nnUNet_results"])
    labels = json.loads(Path(test_dataset_json).read_text())["labels"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged, conflicts, seconds = predict_merged_teachers(workdir, teachers, test_images, labels, out, log_dir,
                                                         extra_env)
    t0 = time.perf_counter()
    student_pred = predict(test_images, out / "pred_student", student.dataset, student.trainer, workdir,
                           fold=student.fold, plans=student.plans, log_dir=log_dir, extra_env=student.env(extra_env))
    seconds["student"] = time.perf_counter() - t0
    dice = {"student": evaluate(test_labels, student_pred, test_dataset_json, workdir, log_dir=log_dir),
            "merged_teachers": evaluate(test_labels, merged, test_dataset_json, workdir, log_dir=log_dir)}
    params = {"student": parameter_count(student.folder(results)),
              **{f"teacher_{t.organ}": parameter_count(t.folder(results)) for t in teachers}}
    teacher_s = sum(v for k, v in seconds.items() if k.startswith("teacher_"))
    teacher_p = sum(v["network"] for k, v in params.items() if k.startswith("teacher_"))
    record = {
        "student": _describe(student), "teachers": [_describe(t) for t in teachers], "test_cases": len(conflicts),
        "dice": dice, "inference_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "inference_seconds_teachers_total": round(teacher_s, 2),
        "inference_time_ratio_student_over_teachers": round(seconds["student"] / teacher_s, 3),
        "parameters": params, "parameters_teachers_total": teacher_p,
        "parameter_ratio_student_over_teachers": round(params["student"]["network"] / teacher_p, 3),
        "voxels_claimed_by_several_teachers": conflicts,
        "how": "stock nnUNetv2_predict (-device cpu --disable_tta -npp 0 -nps 0) per model, wall time; "
               "nnUNetv2_evaluate_folder on the merged teacher label maps and on the student's",
    }
    (out / "student_vs_teachers.json").write_text(json.dumps(record, indent=2))
    return record


def _describe(m: Model) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(m).items()}
