"""Cached teacher outputs: each teacher runs once per training case instead of once per training step.

Online MS-KD costs K teacher forward passes per step. With ``teacher_outputs: "cached"`` the student's trainer
instead predicts every training case once with every teacher (nnU-Net's own sliding-window predictor,
:class:`nnunetv2.inference.predict_from_raw_data.nnUNetPredictor`, on the case as the student's preprocessing left it)
and stores the teachers' foreground probabilities in a sibling folder of the preprocessed data (nnU-Net refuses extra
files inside it)::

    $nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_fedkd_teachers/<key>/<case>.npy   # float16 [K, *shape]
                                                                        .../manifest.json

``<key>`` is a digest of the student's plans configuration and of the teachers (results folder, folds, checkpoint
name, size and modification time, organ), so a changed teacher or plan gets a new cache; files are written to a
temporary name and renamed, so a case file is either complete or absent (an interrupted build resumes).

Training keeps the cached probabilities aligned with the student's patch: :class:`TeacherCachedDataset` hands
nnU-Net's data loader the case with the probabilities as extra channels (stored as ``1 + p``), so its crop and
padding apply to both; the first training transform (:class:`SplitTeacherChannels`) moves them into the
``regression_target`` that batchgeneratorsv2's spatial transforms resample (trilinear) and mirror exactly like the
image, while its intensity transforms leave it alone; the last one (:class:`AppendTeacherTarget`) appends it to the
target list the loader collates. Where augmentation reaches outside the case the stored ``1 + p`` mixes with the
zero padding and drops below 1: those voxels are marked invalid and excluded from distillation
(:func:`decode_teacher_target`).

Only responses are cached; feature KD needs the teachers online.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence, Tuple

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from torch import nn

from nnunetv2_fedkd.teachers import FrozenTeacher, TeacherError, TeacherSpec, probs_to_logit, teachers_foreground_logits
from nnunetv2_fedkd.utils import atomic_write_json

CACHE_SUFFIX = "_fedkd_teachers"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
VALID_BELOW = 1e-3  # stored value 1 + p; below 1 - VALID_BELOW the voxel was (partly) outside the case


def cache_key(student_configuration: dict, specs: Sequence[TeacherSpec]) -> str:
    """Digest of what the cached probabilities depend on: the student's plans configuration and every teacher file."""
    teachers = []
    for s in specs:
        files = []
        for f in s.folds:
            p = s.results_folder / f"fold_{f}" / s.checkpoint
            st = p.stat() if p.is_file() else None
            files.append([str(p.resolve()), st.st_size if st else None, st.st_mtime_ns if st else None])
        teachers.append({"folder": str(s.results_folder.resolve()), "folds": s.folds, "checkpoint": s.checkpoint,
                         "organ": s.organ, "files": files})
    blob = json.dumps({"version": CACHE_VERSION, "student": student_configuration, "teachers": teachers},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_folder(preprocessed_dataset_folder: str, key: str) -> Path:
    folder = Path(preprocessed_dataset_folder)
    return folder.parent / f"{folder.name}{CACHE_SUFFIX}" / key


class TeacherForegroundLogits(nn.Module):
    """The K teachers as one network for nnU-Net's sliding-window predictor: input a student patch, output
    ``[B, 1 + K, *patch]``: a constant channel 0 (so the predictor, which sizes its output from a label set, sees
    "background + K labels"), then the logit of each teacher's foreground probability for its organ."""

    def __init__(self, teachers: Sequence[FrozenTeacher], channels: Sequence[int]):
        super().__init__()
        self.teachers, self.channels = list(teachers), list(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg, _ = teachers_foreground_logits(self.teachers, self.channels, x)
        return torch.cat([torch.zeros_like(fg[:, :1]), fg], 1)


def _predictor(stack: TeacherForegroundLogits, plans_manager, configuration_manager, device: torch.device):
    """nnU-Net's predictor set up to run ``stack`` over whole preprocessed cases (its output buffer is sized from the
    label set: background + one label per teacher)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                           verbose_preprocessing=False, allow_tqdm=False)
    labels = {"background": 0, **{f"teacher_{i}": i + 1 for i in range(len(stack.channels))}}
    pred.manual_initialization(stack, plans_manager, configuration_manager, None, {"labels": labels},
                               "TeacherForegroundLogits", None)
    return pred


def build_teacher_cache(folder: Path, dataset, identifiers: Sequence[str], teachers: Sequence[FrozenTeacher],
                        channels: Sequence[int], plans_manager, configuration_manager, device: torch.device,
                        describe: dict, log: Callable[[str], None] = print) -> dict:
    """Predict every case in ``identifiers`` (loaded through ``dataset.load_case``) with every teacher and store the
    foreground probabilities (float16 ``[K, *case shape]``) as ``folder/<case>.npy``. Cases already there are kept.
    Returns timing figures (also written to the manifest)."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in identifiers if not (folder / f"{i}.npy").is_file()]
    t0 = time.perf_counter()
    if todo:
        pred = _predictor(TeacherForegroundLogits(teachers, channels), plans_manager, configuration_manager, device)
        for n, ident in enumerate(todo):
            data = dataset.load_case(ident)[0]
            logits = pred.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data[:], np.float32)))
            probs = torch.sigmoid(logits[1:].float()).cpu().numpy().astype(np.float16)
            tmp = folder / f".{ident}.npy.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                np.save(f, probs)
            os.replace(tmp, folder / f"{ident}.npy")
            if (n + 1) % 10 == 0 or n + 1 == len(todo):
                log(f"teacher cache: {n + 1}/{len(todo)} cases predicted ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"build_seconds": 0.0}
    manifest.update({"version": CACHE_VERSION, **describe, "dtype": "float16", "layout": "[K, *case shape]",
                     "cases": sorted(set(manifest.get("cases", [])) | set(identifiers)),
                     "build_seconds": round(float(manifest["build_seconds"]) + seconds, 3)})
    atomic_write_json(manifest_path, manifest)
    return {"predicted_cases": len(todo), "seconds": seconds}


def load_cached(folder: Path, identifier: str, n_teachers: int, shape: Sequence[int]) -> np.ndarray:
    """The cached ``[K, *shape]`` probabilities of one case (memory-mapped), checked against the case."""
    p = folder / f"{identifier}.npy"
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TeacherError(f"cached teacher output {p} cannot be read ({e}); delete it to recompute it") from e
    if arr.ndim != 1 + len(shape) or arr.shape[0] != n_teachers or tuple(arr.shape[1:]) != tuple(shape):
        raise TeacherError(f"cached teacher output {p} has shape {arr.shape}, the case needs "
                           f"({n_teachers}, {', '.join(map(str, shape))}); delete it to recompute it")
    return arr


class _CaseWithTeacherChannels:
    """Lazy ``[C + K, *shape]`` view of a case's data and its cached teacher probabilities (stored as ``1 + p``):
    indexing (what nnU-Net's crop does) reads only the cropped part of both."""

    def __init__(self, data, teacher: np.ndarray):
        self.data, self.teacher = data, teacher
        self.shape = (data.shape[0] + teacher.shape[0],) + tuple(data.shape[1:])
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        spatial = (slice(None),) + tuple(key[1:])
        both = np.concatenate([np.asarray(self.data[spatial], dtype=np.float32),
                               np.asarray(self.teacher[spatial], dtype=np.float32) + 1.0], 0)
        return both[key[0]] if key else both


class TeacherCachedDataset:
    """Wraps an nnU-Net dataset (``load_case`` / ``identifiers``): each case's data gains the cached teacher
    probabilities as extra channels (``1 + p``), so nnU-Net's loader crops and pads them with the image."""

    def __init__(self, inner, folder: Path, n_teachers: int):
        self.inner, self.folder, self.n_teachers = inner, Path(folder), int(n_teachers)
        self.identifiers = inner.identifiers

    def __getitem__(self, identifier):
        return self.load_case(identifier)

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self.inner.load_case(identifier)
        teacher = load_cached(self.folder, identifier, self.n_teachers, data.shape[1:])
        return _CaseWithTeacherChannels(data, teacher), seg, seg_prev, properties


class SplitTeacherChannels(BasicTransform):
    """First training transform: image channels ``>= n_image_channels`` become the ``regression_target`` (dropped
    when ``keep`` is False, as for validation)."""

    def __init__(self, n_image_channels: int, keep: bool = True):
        super().__init__()
        self.n, self.keep = int(n_image_channels), keep

    def apply(self, data_dict, **params):
        img = data_dict["image"]
        if self.keep:
            data_dict["regression_target"] = img[self.n:].clone()
        data_dict["image"] = img[:self.n]
        return data_dict


class AppendTeacherTarget(BasicTransform):
    """Last training transform: the (augmented) teacher channels are appended to the segmentation target list, which
    nnU-Net's loader collates as it is (``batch['target'][-1]``)."""

    def apply(self, data_dict, **params):
        seg = data_dict["segmentation"]
        seg = list(seg) if isinstance(seg, (list, tuple)) else [seg]
        data_dict["segmentation"] = seg + [data_dict.pop("regression_target")]
        return data_dict


def decode_teacher_target(stored: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``1 + p`` after augmentation -> (teacher foreground logits ``[B, K, *S]``, valid mask ``[B, 1, *S]``): a voxel is
    valid where every teacher channel is ``>= 1 - VALID_BELOW`` (no zero padding was mixed in)."""
    valid = (stored >= 1.0 - VALID_BELOW).all(1, keepdim=True)
    p = (stored.float() - 1.0).clamp(0.0, 1.0)
    return probs_to_logit(p), valid


def split_target(target, deep_supervision: bool) -> Tuple[object, torch.Tensor]:
    """``batch['target']`` with the appended teacher channels -> (nnU-Net's own target: the list of deep-supervision
    targets, or the one target without deep supervision; the teacher channels)."""
    if not isinstance(target, (list, tuple)) or len(target) < 2:
        raise TeacherError("the batch carries no cached teacher outputs (was AppendTeacherTarget in the pipeline?)")
    rest = list(target[:-1])
    return (rest if deep_supervision else rest[0]), target[-1]
