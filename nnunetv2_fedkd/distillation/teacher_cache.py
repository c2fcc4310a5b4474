"""Cached teacher outputs: each teacher runs once per training case instead of once per training step.

Online MS-KD costs K teacher forward passes per step. With ``teacher_outputs: "cached"`` the student's trainer
instead predicts every training case once with every teacher (nnU-Net's own sliding-window predictor,
:class:`nnunetv2.inference.predict_from_raw_data.nnUNetPredictor`, on the case as the student's preprocessing left it)
and stores the teachers' foreground probabilities in a sibling folder of the preprocessed data (nnU-Net refuses extra
files inside it)::

    $nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_fedkd_teachers/<key>/<case>.b2nd   # uint8 [K, *shape]
                                                                        .../manifest.json

Each case file is a blosc2 array as nnU-Net stores its own preprocessed data (chunks and blocks from nnU-Net's
``comp_blosc2_params`` for the student's patch, so a crop decompresses only the chunks it touches), holding each
teacher's foreground LOGIT clipped to ``[-LOGIT_RANGE, LOGIT_RANGE]`` (the range KD uses, ``probs_to_logit``'s eps
1e-6) in 255 uniform steps of 0.108: a distillation target at temperature T is off by at most 0.054 / T in logit,
also for the small probabilities that the temperature exposes (uint8 probabilities would put every p < 0.002 at 0),
and the far background, saturated at the clip, compresses to almost nothing. Measured sizes: README, "Teacher cache
size". Caches of format 1 (float16 ``.npy``) are not read: their key changes, so they are rebuilt.

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

from nnunetv2_fedkd.distillation.teachers import (
    FrozenTeacher, TeacherError, TeacherSpec, probs_to_logit, teachers_foreground_logits)
from nnunetv2_fedkd.utils import atomic_write_json

CACHE_SUFFIX = "_fedkd_teachers"
CACHE_VERSION = 2  # 1: float16 probabilities in .npy files; 2: uint8 logit codes in blosc2 .b2nd files
CASE_SUFFIX = ".b2nd"
MANIFEST = "manifest.json"
VALID_BELOW = 1e-3  # stored value 1 + p; below 1 - VALID_BELOW the voxel was (partly) outside the case
LOGIT_RANGE = float(np.log((1 - 1e-6) / 1e-6))  # 13.8: the logit of probs_to_logit's clamp, eps 1e-6
LOGIT_STEP = 2 * LOGIT_RANGE / 255


def encode_probabilities(probs: np.ndarray) -> np.ndarray:
    """Foreground probabilities -> uint8 codes of their logits, clipped to ``[-LOGIT_RANGE, LOGIT_RANGE]`` in 255
    uniform steps (round to nearest: the decoded logit is within ``LOGIT_STEP / 2`` of the clipped one)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        logit = np.log(p) - np.log1p(-p)
    logit = np.clip(np.nan_to_num(logit, nan=0.0), -LOGIT_RANGE, LOGIT_RANGE)
    return np.rint((logit + LOGIT_RANGE) / LOGIT_STEP).astype(np.uint8)


def decode_probabilities(codes: np.ndarray) -> np.ndarray:
    """uint8 codes -> float32 foreground probabilities (inverse of :func:`encode_probabilities` up to its rounding)."""
    logit = np.asarray(codes, dtype=np.float32) * np.float32(LOGIT_STEP) - np.float32(LOGIT_RANGE)
    return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)


def _blosc2_chunks(shape: Sequence[int], patch_size: Sequence[int]):
    """(blocks, chunks) for a uint8 ``[K, x, y, z]`` array read one student patch at a time: nnU-Net's own choice for
    its preprocessed data (module function from nnU-Net 2.8 on, a static method of its blosc2 dataset before)."""
    if len(shape) != 4:  # nnU-Net's preprocessed cases are [C, x, y, z] (2d configurations too); else blosc2's own
        return None, None
    try:
        from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
    except ImportError:  # nnU-Net < 2.8
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

        comp_blosc2_params = nnUNetDatasetBlosc2.comp_blosc2_params
    return comp_blosc2_params(tuple(shape), tuple(patch_size), 1)


def save_cached(folder: Path, identifier: str, probs: np.ndarray, patch_size: Sequence[int]) -> Path:
    """Write one case's ``[K, *shape]`` probabilities as ``folder/<identifier>.b2nd`` (a temporary name, then renamed:
    the file is complete or absent)."""
    import blosc2

    codes = np.ascontiguousarray(encode_probabilities(probs))
    blocks, chunks = _blosc2_chunks(codes.shape, patch_size)
    final = Path(folder) / f"{identifier}{CASE_SUFFIX}"
    tmp = Path(folder) / f".{identifier}.tmp{os.getpid()}{CASE_SUFFIX}"
    blosc2.asarray(codes, urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks,
                   cparams={"codec": blosc2.Codec.ZSTD, "clevel": 5, "filters": [blosc2.Filter.SHUFFLE],
                            "nthreads": 1})
    os.replace(tmp, final)
    return final


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
    foreground probabilities (``[K, *case shape]``, :func:`save_cached`) as ``folder/<case>.b2nd``. Cases already
    there are kept. Returns timing and size figures (also written to the manifest)."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in identifiers if not (folder / f"{i}{CASE_SUFFIX}").is_file()]
    t0 = time.perf_counter()
    if todo:
        pred = _predictor(TeacherForegroundLogits(teachers, channels), plans_manager, configuration_manager, device)
        for n, ident in enumerate(todo):
            data = dataset.load_case(ident)[0]
            logits = pred.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data[:], np.float32)))
            probs = torch.sigmoid(logits[1:].float()).cpu().numpy()
            save_cached(folder, ident, probs, configuration_manager.patch_size)
            if (n + 1) % 10 == 0 or n + 1 == len(todo):
                log(f"teacher cache: {n + 1}/{len(todo)} cases predicted ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"build_seconds": 0.0}
    cases = sorted(set(manifest.get("cases", [])) | set(identifiers))
    stored = sum((folder / f"{c}{CASE_SUFFIX}").stat().st_size for c in cases if (folder / f"{c}{CASE_SUFFIX}").is_file())
    manifest.update({"version": CACHE_VERSION, **describe,
                     "encoding": f"uint8 codes of the foreground logit clipped to +-{LOGIT_RANGE:.4f}, step "
                                 f"{LOGIT_STEP:.6f}; blosc2 (zstd, shuffle), nnU-Net's chunks for the student patch",
                     "layout": "[K, *case shape]", "cases": cases, "stored_bytes": stored,
                     "build_seconds": round(float(manifest["build_seconds"]) + seconds, 3)})
    atomic_write_json(manifest_path, manifest)
    return {"predicted_cases": len(todo), "seconds": seconds, "stored_bytes": stored}


class CachedProbabilities:
    """One case's cached ``[K, *shape]`` teacher probabilities, opened lazily (memory-mapped, as nnU-Net opens its
    blosc2 data): indexing decompresses only the chunks it touches and returns float32 probabilities."""

    def __init__(self, codes, path: Path):
        self.codes, self.path = codes, path
        self.shape = tuple(codes.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key) -> np.ndarray:
        try:
            return decode_probabilities(self.codes[key])
        except (RuntimeError, ValueError, OSError) as e:  # a damaged chunk surfaces only when it is read
            raise TeacherError(f"cached teacher output {self.path} cannot be read ({e}); delete it to recompute "
                               f"it") from e

    def __array__(self, dtype=None, copy=None):
        arr = self[...]
        return arr if dtype is None else arr.astype(dtype)


def load_cached(folder: Path, identifier: str, n_teachers: int, shape: Sequence[int]) -> CachedProbabilities:
    """The cached ``[K, *shape]`` probabilities of one case (opened lazily), checked against the case."""
    import blosc2

    p = Path(folder) / f"{identifier}{CASE_SUFFIX}"
    if not p.is_file():
        raise TeacherError(f"cached teacher output {p} cannot be read (no such file; the next training start "
                           f"predicts the missing cases again)")
    try:
        codes = blosc2.open(urlpath=str(p), mode="r", dparams={"nthreads": 1},
                            **({} if os.name == "nt" else {"mmap_mode": "r"}))
    except Exception as e:  # noqa: BLE001 - blosc2 raises several kinds for a damaged file
        raise TeacherError(f"cached teacher output {p} cannot be read ({type(e).__name__}: {e}); delete it to "
                           f"recompute it") from e
    if getattr(codes, "dtype", None) != np.uint8 or len(codes.shape) != 1 + len(shape) \
            or codes.shape[0] != n_teachers or tuple(codes.shape[1:]) != tuple(shape):
        raise TeacherError(f"cached teacher output {p} has shape {tuple(codes.shape)} ({getattr(codes, 'dtype', '?')}),"
                           f" the case needs uint8 ({n_teachers}, {', '.join(map(str, shape))}); delete it to "
                           f"recompute it")
    return CachedProbabilities(codes, p)


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
