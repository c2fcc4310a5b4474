"""Frozen nnU-Net teachers for distillation: ordinary nnU-Net results folders, run on the student's training patches.

A teacher is named in the student's trainer config (see :mod:`nnunetv2_fedkd.trainers.config`)::

    {"results_folder": ".../nnUNet_results/Dataset502_SynthKidney/nnUNetTrainer__nnUNetPlans__3d_fullres",
     "folds": [0],                       # or ["all"], or several folds (their probabilities are averaged)
     "checkpoint": "checkpoint_final.pth",
     "organ": "kidney"}                  # single-organ teachers (MSKD): which registry organ its foreground is

The network is rebuilt the way ``nnUNetv2_predict`` rebuilds it (the trainer class named in the checkpoint, its
``build_network_architecture`` and the folder's plans.json/dataset.json), but the checkpoint is read with
``torch.load(weights_only=True)``: a teacher may come from another site, and a checkpoint is never unpickled.

The student's patch is in the student's preprocessing (its target spacing and intensity normalisation). A teacher
planned differently (every site plans its own dataset) sees the same patch mapped into its own preprocessing:

* intensities: ``CTNormalization`` on both sides is an affine map + clip per channel (undo the student's, apply the
  teacher's: ``clip(x * std_s + mean_s, p0.5_t, p99.5_t) - mean_t) / std_t``); per-image schemes (z-score, rescale,
  none) that are the same on both sides need nothing. Any other pairing is rejected with :class:`TeacherError`.
* axis order: nnU-Net stores preprocessed data transposed by its plans' ``transpose_forward`` (array axis ``i`` is
  original axis ``transpose_forward[i]``; spacing and patch size are given in that order). When the teacher's plans
  transpose differently, the patch is permuted into the teacher's axis order before anything else, the spacings are
  compared axis by axis in that order, and the outputs and features are permuted back
  (:func:`axis_permutation`). A 2D teacher whose slices cut another original axis than the student's is rejected.
* geometry: when the target spacings differ (more than 1 %), the patch is resampled (trilinear) to the teacher's
  spacing, padded to a size the teacher's network accepts, and the teacher's outputs are resampled back to the
  student's grid. The padding is cropped off again, from the outputs and (in proportion to each stage's stride) from
  the decoder features. A 2D teacher for a 3D student (or the reverse) is rejected.

Teachers are frozen: ``eval()``, ``requires_grad_(False)``, run under ``torch.no_grad()``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")


class TeacherError(ValueError):
    """A teacher cannot be used as configured (missing files, corrupt checkpoint, incompatible preprocessing)."""


@dataclass
class TeacherSpec:
    results_folder: Path
    folds: List[str] = field(default_factory=lambda: ["0"])
    checkpoint: str = "checkpoint_final.pth"
    organ: Optional[str] = None

    @classmethod
    def parse(cls, entry: Any, where: str, need_organ: bool = False) -> "TeacherSpec":
        if not isinstance(entry, dict):
            raise TeacherError(f"{where}: a teacher is an object with results_folder, folds, checkpoint, organ; "
                               f"got {entry!r}")
        unknown = set(entry) - {"results_folder", "folds", "checkpoint", "organ"}
        if unknown:
            raise TeacherError(f"{where}: unknown teacher keys {sorted(unknown)}")
        if "results_folder" not in entry:
            raise TeacherError(f"{where}: teacher without results_folder")
        folds = entry.get("folds", [0])
        if isinstance(folds, (int, str)):
            folds = [folds]
        spec = cls(Path(entry["results_folder"]).expanduser(), [str(f) for f in folds],
                   str(entry.get("checkpoint", "checkpoint_final.pth")), entry.get("organ"))
        if spec.checkpoint not in CHECKPOINT_NAMES:
            raise TeacherError(f"{where}: checkpoint must be one of {CHECKPOINT_NAMES}, got {spec.checkpoint!r}")
        if need_organ and not spec.organ:
            raise TeacherError(f"{where}: teacher {spec.results_folder} needs 'organ' (its foreground's organ)")
        if not folds:
            raise TeacherError(f"{where}: teacher {spec.results_folder} has an empty fold list")
        return spec


def parse_teachers(entries: Any, where: str, need_organ: bool = False) -> List[TeacherSpec]:
    if not isinstance(entries, list):
        raise TeacherError(f"{where}: expected a list of teachers, got {type(entries).__name__}")
    return [TeacherSpec.parse(e, f"{where}[{i}]", need_organ) for i, e in enumerate(entries)]


def load_checkpoint(path: Path, what: str = "teacher checkpoint") -> Dict[str, Any]:
    """An nnU-Net checkpoint read without unpickling arbitrary objects (``torch.load(weights_only=True)``; numpy
    scalars in its log are allowed). ``what`` names the file in errors (:class:`TeacherError`)."""
    if not path.is_file():
        raise TeacherError(f"{what} {path} does not exist")
    safe = [np.dtype, np.ndarray, type(np.dtype(np.float32)), type(np.dtype(np.float64)), type(np.dtype(np.int64))]
    try:
        safe.append(np._core.multiarray.scalar)  # numpy >= 2
        safe.append(np._core.multiarray._reconstruct)
    except AttributeError:  # pragma: no cover - numpy 1.x
        safe.append(np.core.multiarray.scalar)
        safe.append(np.core.multiarray._reconstruct)
    try:
        with torch.serialization.safe_globals(safe):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, or objects that would need unpickling
        raise TeacherError(f"{what} {path} cannot be read safely: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict) or "trainer_name" not in ckpt:
        raise TeacherError(f"{what} {path} is not an nnU-Net checkpoint (no network_weights/trainer_name)")
    return ckpt


def check_results_folder(folder: Path) -> Path:
    """``folder`` must be an nnU-Net results folder (it holds plans.json and dataset.json)."""
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise TeacherError(f"teacher folder {folder} has no {name}; name an nnU-Net results folder "
                               f"(DatasetXXX/<trainer>__<plans>__<configuration>)")
    return folder


def recorded_validation_dice(spec: TeacherSpec) -> Optional[float]:
    """What nnU-Net recorded of the teacher's quality while training it: the last EMA pseudo Dice of its checkpoint
    (``logging["ema_fg_dice"]``, the smoothed mean foreground Dice on its validation cases), averaged over the
    spec's folds. None when a checkpoint holds no such record."""
    values = []
    check_results_folder(spec.results_folder)
    for fold in spec.folds:
        ckpt = load_checkpoint(spec.results_folder / f"fold_{fold}" / spec.checkpoint)
        ema = (ckpt.get("logging") or {}).get("ema_fg_dice") or []
        if not ema:
            return None
        values.append(float(ema[-1]))
    return float(np.mean(values))


def gate_teachers(specs: Sequence[TeacherSpec], min_dice: float) -> Tuple[List[TeacherSpec], List[str]]:
    """Keep the teachers whose recorded validation Dice (:func:`recorded_validation_dice`) is at least ``min_dice``
    (a teacher without a record is kept). A teacher that learned nothing would teach the student that its organ is
    background everywhere; measured once in this project's demo, a kidney teacher with pseudo Dice 0 took FedKD's
    kidney Dice from 0.75 to 0. Returns (kept teachers, one line per teacher saying what was decided and why)."""
    kept, lines = [], []
    for spec in specs:
        dice = recorded_validation_dice(spec)
        name = f"teacher {spec.results_folder}{' (' + spec.organ + ')' if spec.organ else ''}"
        if dice is None:
            kept.append(spec)
            lines.append(f"{name}: no validation Dice recorded in its checkpoint; used")
        elif dice >= min_dice:
            kept.append(spec)
            lines.append(f"{name}: recorded validation (EMA pseudo) Dice {dice:.3f} >= min_teacher_dice {min_dice}; "
                         f"used")
        else:
            lines.append(f"{name}: recorded validation (EMA pseudo) Dice {dice:.3f} < min_teacher_dice {min_dice}; "
                         f"NOT used")
    return kept, lines


def teachers_foreground_logits(teachers: Sequence["FrozenTeacher"], channels: Sequence[int], x: torch.Tensor):
    """Run every single-organ teacher on the student patch ``x``: ``([B, K, *spatial]`` logits of each teacher's
    foreground probability for its organ (its output channel ``channels[k]``), ``[features of each teacher]``).
    What MS-KD distils from, online and when building the cache of teacher outputs."""
    fg, feats = [], []
    for t, c in zip(teachers, channels):
        p, f = t(x)
        fg.append(probs_to_logit(p[:, c:c + 1]))
        feats.append(f)
    return torch.cat(fg, 1), feats


def find_trainer_class(name: str, where: str):
    """nnU-Net's own trainer lookup (its package, then ``nnUNet_extTrainer``), with an error that names ``where``."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        cls = recursive_find_trainer_class_by_name(name)
    except Exception as e:
        raise TeacherError(f"{where}: trainer class {name!r} not found ({e}); is nnUNet_extTrainer set?") from e
    if cls is None:
        raise TeacherError(f"{where}: trainer class {name!r} not found; is nnUNet_extTrainer set?")
    return cls


def _label_value(v) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def _norm_params(configuration_manager, fingerprint_props: Dict[str, Any], channel: int):
    scheme = configuration_manager.normalization_schemes[channel]
    props = fingerprint_props.get(str(channel), fingerprint_props.get(channel))
    return scheme, props


def axis_permutation(student_transpose: Sequence[int], teacher_transpose: Sequence[int], ndim: int,
                     where: str = "teacher") -> Tuple[int, ...]:
    """Which student array axis each teacher array axis is, from the two plans' ``transpose_forward``.

    nnU-Net's preprocessing stores ``data.transpose([0, *[i + 1 for i in transpose_forward]])``: array axis ``i`` is
    original axis ``transpose_forward[i]``. For an ``ndim``-D patch (3D: all axes; 2D: the last two, the slice axis
    being the first) teacher axis ``j`` is original axis ``tt[j]``, which is student axis ``ts.index(tt[j])``
    (``ts``, ``tt``: the last ``ndim`` entries). ``x_teacher = x_student.permute(0, 1, *(2 + perm))``; back with
    :func:`inverse_permutation`. Raises :class:`TeacherError` when the patches do not hold the same original axes
    (2D plans slicing along different axes)."""
    ts, tt = [int(a) for a in student_transpose], [int(a) for a in teacher_transpose]
    if sorted(ts) != list(range(len(ts))) or sorted(tt) != sorted(ts):
        raise TeacherError(f"{where}: transpose_forward {tt} (teacher) and {ts} (student) are not permutations of the "
                           f"same axes")
    ts, tt = ts[len(ts) - ndim:], tt[len(tt) - ndim:]
    if set(ts) != set(tt):
        raise TeacherError(f"{where}: its {ndim}D patches hold original axes {sorted(tt)}, the student's {sorted(ts)} "
                           f"(transpose_forward {list(teacher_transpose)} vs {list(student_transpose)}): the slices "
                           f"cut different axes, no permutation maps one onto the other")
    return tuple(ts.index(a) for a in tt)


def inverse_permutation(perm: Sequence[int]) -> Tuple[int, ...]:
    """``inv`` with ``inv[perm[j]] = j``: undoes ``permute(0, 1, *(2 + perm))``."""
    inv = [0] * len(perm)
    for j, p in enumerate(perm):
        inv[int(p)] = j
    return tuple(inv)


def _transpose_forward(plans_manager, ndim: int) -> List[int]:
    """The plans' ``transpose_forward`` (identity when the plans hold none; nnU-Net always writes it)."""
    tf = plans_manager.plans.get("transpose_forward")
    return list(range(max(3, ndim))) if tf is None else [int(a) for a in tf]


def _permute_spatial(x: torch.Tensor, perm: Sequence[int]) -> torch.Tensor:
    return x.permute(0, 1, *[2 + int(p) for p in perm])


def padded_crop(unpadded: Sequence[int], padded: Sequence[int], actual: Sequence[int], where: str = "teacher"):
    """Spatial slices that keep the unpadded region of a map of size ``actual`` computed from an input padded from
    ``unpadded`` to ``padded`` (bottom/right padding): the map's stride per axis is ``padded / actual`` (an integer:
    the input was padded to the network's divisor), and the unpadded region is its first ``ceil(unpadded / stride)``
    entries (a full-resolution output: ``unpadded`` itself)."""
    out = []
    for n, p, a in zip(unpadded, padded, actual):
        if a <= 0 or p % a:
            raise TeacherError(f"{where}: a map of size {tuple(actual)} from an input of size {tuple(padded)} has no "
                               f"integer stride")
        out.append(slice(0, -(-int(n) // (p // a))))
    return tuple(out)


class FrozenTeacher:
    """One teacher (one or several folds of one nnU-Net results folder) applied to student patches."""

    def __init__(self, spec: TeacherSpec, device: torch.device, student_plans_manager, student_configuration_manager,
                 feature_stage: Optional[int] = None):
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.spec = spec
        self.device = device
        folder = check_results_folder(spec.results_folder)
        self.dataset_json = json.loads((folder / "dataset.json").read_text())
        self.plans_manager = PlansManager(json.loads((folder / "plans.json").read_text()))
        ckpts = [load_checkpoint(folder / f"fold_{f}" / spec.checkpoint) for f in spec.folds]
        configuration = ckpts[0]["init_args"]["configuration"]
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        trainer_class = find_trainer_class(ckpts[0]["trainer_name"], f"teacher {folder}")
        n_in = determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)
        n_out = self.label_manager.num_segmentation_heads
        self.networks: List[nn.Module] = []
        for f, ck in zip(spec.folds, ckpts):
            net = trainer_class.build_network_architecture(self.plans_manager, self.configuration_manager, n_in, n_out,
                                                           enable_deep_supervision=False)
            try:
                net.load_state_dict(ck["network_weights"])
            except RuntimeError as e:
                raise TeacherError(f"teacher {folder} fold {f}: weights do not fit its own plans: {e}") from e
            net.eval().requires_grad_(False).to(device)
            self.networks.append(net)

        self._finish_init(student_plans_manager, student_configuration_manager, feature_stage)

    def _finish_init(self, student_plans_manager, student_configuration_manager, feature_stage: Optional[int]):
        """Everything after the networks are built (also the entry point of the tests' hand-made teachers)."""
        self._check_and_build_input_map(student_plans_manager, student_configuration_manager)
        self.feature_stage = feature_stage
        self._features: Optional[torch.Tensor] = None
        if feature_stage is not None:
            stages = self.networks[0].decoder.stages
            stages[feature_stage].register_forward_hook(self._keep_features)

    # ---------------------------------------------------------------------------------------------------------------
    def _keep_features(self, module, inputs, output):
        self._features = output

    def decoder_channels(self, stage: int) -> int:
        """Channels of this teacher's decoder output at ``stage`` (for the student's feature adapter)."""
        feats = self.configuration_manager.network_arch_init_kwargs["features_per_stage"]
        n_dec = len(feats) - 1
        s = stage % n_dec
        return int(feats[n_dec - 1 - s])

    def _check_and_build_input_map(self, s_pm, s_cm) -> None:
        where = f"teacher {self.spec.results_folder}"
        t_cm = self.configuration_manager
        if len(t_cm.patch_size) != len(s_cm.patch_size):
            raise TeacherError(f"{where} is {len(t_cm.patch_size)}D but the student is {len(s_cm.patch_size)}D")
        s_props = s_pm.plans["foreground_intensity_properties_per_channel"]
        t_props = self.plans_manager.plans["foreground_intensity_properties_per_channel"]
        if len(t_cm.normalization_schemes) != len(s_cm.normalization_schemes):
            raise TeacherError(f"{where} takes {len(t_cm.normalization_schemes)} input channels, the student "
                               f"{len(s_cm.normalization_schemes)}")
        scale, shift, lo, hi = [], [], [], []
        for c in range(len(s_cm.normalization_schemes)):
            s_scheme, sp = _norm_params(s_cm, s_props, c)
            t_scheme, tp = _norm_params(t_cm, t_props, c)
            if s_scheme == "CTNormalization" and t_scheme == "CTNormalization":
                # x_t = (clip(x_s * std_s + mean_s, p0.5_t, p99.5_t) - mean_t) / std_t, written as an affine map
                # followed by a clip in the teacher's normalised units (stds floored as nnU-Net floors them)
                s_std, t_std = max(float(sp["std"]), 1e-8), max(float(tp["std"]), 1e-8)
                t_mean = float(tp["mean"])
                scale.append(s_std / t_std)
                shift.append((float(sp["mean"]) - t_mean) / t_std)
                lo.append((float(tp["percentile_00_5"]) - t_mean) / t_std)
                hi.append((float(tp["percentile_99_5"]) - t_mean) / t_std)
            elif s_scheme == t_scheme and s_scheme in ("ZScoreNormalization", "NoNormalization",
                                                       "RescaleTo01Normalization", "RGBTo01Normalization") and \
                    s_cm.use_mask_for_norm[c] == t_cm.use_mask_for_norm[c]:
                scale.append(1.0), shift.append(0.0), lo.append(-float("inf")), hi.append(float("inf"))
            else:
                raise TeacherError(f"{where}: channel {c} is normalised with {t_scheme}, the student with "
                                   f"{s_scheme}; this pairing cannot be mapped (plan both with the same scheme)")
        view = (1, -1) + (1,) * len(s_cm.patch_size)
        self._scale = torch.tensor(scale).view(view)
        self._shift = torch.tensor(shift).view(view)
        self._lo = torch.tensor(lo).view(view)
        self._hi = torch.tensor(hi).view(view)
        # axis order: teacher axis j is student axis perm[j]; everything below is in the teacher's order
        ndim = len(s_cm.patch_size)
        s_tf, t_tf = _transpose_forward(s_pm, ndim), _transpose_forward(self.plans_manager, ndim)
        t_plans, s_plans = self.plans_manager.plans, s_pm.plans
        describe = (f"{where} (plans {t_plans.get('plans_name')!r} of {t_plans.get('dataset_name')!r}, "
                    f"{self.spec.results_folder / 'plans.json'}) and the student (plans {s_plans.get('plans_name')!r} "
                    f"of {s_plans.get('dataset_name')!r})")
        self._perm = axis_permutation(s_tf, t_tf, ndim, describe)
        self._inv_perm = inverse_permutation(self._perm)
        self.permute = self._perm != tuple(range(ndim))
        s_sp = np.asarray(s_cm.spacing, float)[list(self._perm)]  # the student's spacing in the teacher's axis order
        t_sp = np.asarray(t_cm.spacing, float)
        self.zoom = s_sp / t_sp  # >1: the teacher's voxels are smaller, the patch gets more voxels (teacher order)
        self.resample = bool(np.any(np.abs(self.zoom - 1) > 0.01))
        strides = t_cm.network_arch_init_kwargs.get("strides")
        self._divisor = np.prod(np.asarray(strides, int), axis=0) if strides is not None else np.ones(len(s_sp), int)

    def map_input(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[slice, ...]]:
        """Student patch -> teacher input (intensities, then axis order, then geometry), in the teacher's axis
        order. Returns the input and the crop that undoes the padding in the teacher's grid (full resolution)."""
        dev = x.device
        x = x.float() * self._scale.to(dev) + self._shift.to(dev)
        x = torch.maximum(torch.minimum(x, self._hi.to(dev)), self._lo.to(dev))
        if self.permute:
            x = _permute_spatial(x, self._perm)
        spatial = x.shape[2:]
        if self.resample:
            size = [max(1, int(round(n * z))) for n, z in zip(spatial, self.zoom)]
            x = F.interpolate(x, size=size, mode="trilinear" if x.ndim == 5 else "bilinear", align_corners=False)
        size = x.shape[2:]
        target = [int(np.ceil(n / d) * d) for n, d in zip(size, self._divisor)]
        pad = []
        for n, t in reversed(list(zip(size, target))):
            pad += [0, t - n]
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in size)
        return x, crop

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Teacher probabilities on the student's grid ``[B, C_teacher, *spatial]`` (float32; folds averaged; softmax
        or, for region-based teachers, sigmoid) and the first fold's decoder features at ``feature_stage`` (None
        when no stage was asked), both in the student's axis order and without the padding the teacher's network
        needed (features: cropped to ``ceil(unpadded size / stage stride)``, :func:`padded_crop`); the caller
        resamples the features to the student's matching feature size."""
        spatial = x.shape[2:]
        xt, crop = self.map_input(x)
        unpadded = [c.stop for c in crop[2:]]
        probs, feats = None, None
        for i, net in enumerate(self.networks):
            out = net(xt).float()[crop]
            p = torch.sigmoid(out) if self.label_manager.has_regions else torch.softmax(out, 1)
            probs = p if probs is None else probs + p
            if i == 0 and self.feature_stage is not None:
                f = self._features.float()
                f = f[(slice(None), slice(None)) + padded_crop(unpadded, xt.shape[2:], f.shape[2:],
                                                               f"teacher {self.spec.results_folder}")]
                feats = _permute_spatial(f, self._inv_perm) if self.permute else f
        probs = probs / len(self.networks)
        if self.permute:
            probs = _permute_spatial(probs, self._inv_perm)
        if tuple(probs.shape[2:]) != tuple(spatial):
            probs = F.interpolate(probs, size=spatial, mode="trilinear" if probs.ndim == 5 else "bilinear",
                                  align_corners=False)
        return probs, feats

    # ---------------------------------------------------------------------------------------------------------------
    def label_names(self) -> List[str]:
        """Foreground label names of the teacher in output-channel order (softmax: channel 0 is background)."""
        fg = sorted(((_label_value(v), k) for k, v in self.dataset_json["labels"].items() if _label_value(v) != 0))
        return [k for _, k in fg]

    def channel_of(self, organ: str) -> int:
        """Output channel of ``organ`` (softmax teachers: 1 + index; region teachers: index)."""
        names = self.label_names()
        if organ not in names:
            raise TeacherError(f"teacher {self.spec.results_folder} has no label {organ!r} (labels: {names})")
        i = names.index(organ)
        return i if self.label_manager.has_regions else i + 1


def probs_to_logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Logit of a probability, clamped to ``[eps, 1 - eps]`` (a fold-averaged teacher probability -> one logit)."""
    return torch.logit(p, eps=eps)


def resize_features(feats: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(feats.shape[2:]) == tuple(size):
        return feats
    return F.interpolate(feats, size=list(size), mode="trilinear" if feats.ndim == 5 else "bilinear",
                         align_corners=False)
