"""Distillation trainers: a student nnU-Net learns from frozen nnU-Net teachers (ordinary results folders).

* :class:`nnUNetTrainerMSKD` / :class:`nnUNetTrainerMSKDMultiHead` - multi-teacher single-student (MS-KD): one
  single-organ teacher per organ, region-based logit KD + region-based feature KD, plus the partial-label loss.
* :class:`nnUNetTrainerEnsembleKD` - an nnU-Net ensemble (folds / configurations of one dataset) distilled into one
  network (Noothout et al. 2022): soft labels mixed with the hard labels.
* :class:`nnUNetTrainerDualKD` - a model trained elsewhere distils its responses and features into the local model on
  what the local labels do not cover, including unlabelled cases (He et al. 2023).

The KD terms are the pure functions of :mod:`nnunetv2_fedkd.losses`; teachers are
:class:`nnunetv2_fedkd.distillation.teachers.FrozenTeacher`. Wiring: before nnU-Net's ``train_step`` runs the student, the
teachers run on the same augmented patch (``batch['data']``) and the resulting terms are attached to the loss
module, which nnU-Net then calls as usual (under its autocast; the terms compute in float32). Validation uses the
ground-truth loss only.

Weighting: KD is computed on the full-resolution output only. With deep supervision nnU-Net's
``DeepSupervisionWrapper`` weighs the ground-truth loss of output ``s`` by its normalised ``weight_factors[s]`` (the
project's small plans with 3 outputs: 0.667, 0.333, 0), so the full-resolution supervised term enters the total as
``w0 * L_gt(full res)``. :class:`_LossWithTerms` multiplies the KD terms by the same ``w0`` (1 when the wrapped loss
is not a ``DeepSupervisionWrapper``, e.g. deep supervision off)::

    loss = gt_weight * DeepSupervisionWrapper(L_gt) + w0 * terms(full-res output)

so ``kd_weight`` (and ``feature_kd_weight``, and FedKD's ``global_kd_weight``: ``nnUNetTrainerFedKD`` adds its
global-model KD through the same ``terms``, so it gets the same scaling) is the ratio of a KD term to the
full-resolution supervised loss, whether deep supervision is on or off. The region KD losses are means over all
voxels of the batch (see :mod:`nnunetv2_fedkd.losses.region_kd`), so that ratio holds per voxel, whatever the
size of a teacher's region.

MS-KD and the labels (:class:`_MSKDMixin`): where a case labels a voxel, the label wins; the teachers speak only
where the case's labels are silent. Teacher ``k`` (organ ``c_k``) gives no KD on a sample that annotates ``c_k``
(the ``active`` mask of the region losses, from ``batch['keys']`` and dataset.json via
:class:`nnunetv2_fedkd.data.label_availability.LabelAvailability`), and the voxels the full-resolution target labels as
an annotated organ (target > 0: the student's class index for the softmax trainers, any channel of nnU-Net's region
one-hot target for the multi-head trainer) belong to no KD region (organ regions, background region, feature KD
regions): :func:`teacher_kd_masks`.

Settings (trainer config file): ``teachers`` / ``ensemble`` / ``public_model`` (see :mod:`nnunetv2_fedkd.distillation.teachers`),
``kd_weight``, ``kd_temperature``, ``kd_background_weight``, ``feature_kd_weight``, ``feature_kd_stage`` (decoder
stage, python index, -1 = full resolution), ``feature_kd_kind`` (mse|cosine), ``kd_rampup_epochs``, ``gt_weight``,
``min_teacher_dice``; MS-KD also ``teacher_outputs``, ``max_teacher_fp_rate`` and ``min_teacher_site_dice`` (the
per-site teacher gate, see :class:`_MSKDMixin`).
Feature KD goes through a learned 1x1 convolution per teacher (student channels -> teacher channels); the adapters
are part of the student network (so checkpoints load at inference) and are recorded in the results folder's plans.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunetv2_fedkd.losses import (
    feature_kd_loss,
    partial_kd_softmax,
    region_logit_kd_sigmoid,
    region_logit_kd_softmax,
    soft_label_kd_loss,
    teacher_probs_for_student_classes,
)
from nnunetv2_fedkd.distillation.teachers import (
    FrozenTeacher,
    TeacherError,
    TeacherSpec,
    gate_teachers,
    parse_teachers,
    resize_features,
    teachers_foreground_logits,
)
from nnunetv2_fedkd.trainers.base import nnUNetTrainerFedKDBase
from nnunetv2_fedkd.trainers.partial_label import nnUNetTrainerMarginal, nnUNetTrainerMultiHead

ADAPTER_PLANS_KEY = "fedkd_feature_adapters"

KD_DEFAULTS: Dict[str, Any] = {
    "kd_weight": 1.0,
    "kd_temperature": 2.0,
    "kd_rampup_epochs": 0,
    "gt_weight": 1.0,
    # teachers whose own recorded validation Dice is below this are not used (teachers.gate_teachers); 0: use all
    "min_teacher_dice": 0.05,
}
# the per-site teacher gate of MS-KD's organ teachers (nnunetv2_fedkd.distillation.teacher_site_gate); 1.0 and 0: off
SITE_GATE_DEFAULTS: Dict[str, Any] = {
    # a teacher that claims more than this fraction of another organ's labelled voxels at a site is left out there
    "max_teacher_fp_rate": 0.2,
    # a teacher whose Dice on its own organ, at a site that labels it, is below this is left out at every site
    "min_teacher_site_dice": 0.5,
}
FEATURE_DEFAULTS: Dict[str, Any] = {
    "feature_kd_weight": 0.5,
    "feature_kd_stage": -1,
    "feature_kd_kind": "mse",
}


class FeatureAdapters(nn.Module):
    """One 1x1 convolution per teacher: student decoder features -> that teacher's feature channels."""

    def __init__(self, conv_op, student_channels: int, teacher_channels: List[int]):
        super().__init__()
        self.adapters = nn.ModuleList(conv_op(student_channels, c, 1, 1, 0, bias=True) for c in teacher_channels)

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.adapters[k](x)


def decoder_stage_channels(configuration: dict, stage: int) -> int:
    """Output channels of decoder stage ``stage`` of an nnU-Net U-Net described by a plans configuration."""
    feats = configuration["architecture"]["arch_kwargs"]["features_per_stage"]
    n_dec = len(feats) - 1
    if not -n_dec <= stage < n_dec:
        raise TeacherError(f"feature_kd_stage {stage} is out of range for a decoder with {n_dec} stages")
    return int(feats[n_dec - 1 - (stage % n_dec)])


def attach_feature_adapters(network: nn.Module, configuration_manager) -> nn.Module:
    spec = configuration_manager.configuration.get(ADAPTER_PLANS_KEY)
    if spec:
        network.fedkd_feature_adapters = FeatureAdapters(network.encoder.conv_op, spec["student_channels"],
                                                         spec["teacher_channels"])
    return network


class _LossWithTerms(nn.Module):
    """``gt_weight * gt_loss(output, target) + w0 * terms(output)``; ``terms`` is set per training step.

    ``w0`` (:attr:`terms_scale`) is the full-resolution weight factor of ``gt_loss`` when it is nnU-Net's
    ``DeepSupervisionWrapper`` (``weight_factors[0]``), else 1: the terms act on the full-resolution output only and
    are weighed like its supervised loss, so a term's weight is its ratio to the full-resolution supervised loss."""

    def __init__(self, gt_loss: nn.Module, gt_weight: float):
        super().__init__()
        self.gt_loss = gt_loss
        self.gt_weight = float(gt_weight)
        self.terms: Optional[Callable[[Any], torch.Tensor]] = None

    @property
    def terms_scale(self) -> float:
        """Full-resolution weight factor of the wrapped deep-supervision loss (1 without deep supervision)."""
        loss = self.gt_loss
        if isinstance(loss, DeepSupervisionWrapper) and getattr(loss, "weight_factors", None) is not None:
            return float(loss.weight_factors[0])
        return 1.0

    def forward(self, output, target):
        loss = self.gt_weight * self.gt_loss(output, target)
        if self.terms is not None:
            loss = loss + self.terms_scale * self.terms(output)
        return loss


def _full_res(output):
    return output[0] if isinstance(output, (list, tuple)) else output


def labelled_foreground(target) -> torch.Tensor:
    """``[B, 1, *S]`` bool: the voxels the full-resolution target labels as an organ (``target > 0``). ``target``:
    nnU-Net's target (the list of deep-supervision targets or one tensor), a label map ``[B, 1, *S]`` (softmax
    trainers: the student's class indices, 0 = background or not annotated) or a region one-hot ``[B, K, *S]``
    (multi-head trainer: any channel set)."""
    t = _full_res(target)
    if t.ndim < 3:
        raise ValueError(f"labelled_foreground: target must be [B, C, *spatial], got {tuple(t.shape)}")
    return (t > 0).any(1, keepdim=True)


def teacher_kd_masks(label_availability, keys, teacher_organ_index: Sequence[int], target,
                     valid: Optional[torch.Tensor] = None, device=None, site_gate=None):
    """Where the organ teachers may speak: ``(active [B, K], valid [B, 1, *S])`` for the region KD losses.

    ``active[b, k]``: sample ``keys[b]`` does not annotate teacher ``k``'s organ (label index
    ``teacher_organ_index[k]``, 0-based foreground) and, with a ``site_gate``
    (:class:`nnunetv2_fedkd.distillation.teacher_site_gate.TeacherSiteGate`), teacher ``k`` may speak at the sample's site
    (``active[b, k] &= ok[site(b), k]``); ``valid``: the given mask (cached teacher outputs; None: every voxel)
    without the voxels the full-resolution ``target`` labels as an organ (:func:`labelled_foreground`)."""
    fg = label_availability.foreground_mask(list(keys))  # [B, K_all]
    active = ~fg[:, list(teacher_organ_index)]
    if site_gate is not None:
        allowed = site_gate.allowed(list(keys))
        if tuple(allowed.shape) != tuple(active.shape):
            raise ValueError(f"teacher_kd_masks: site gate of {tuple(allowed.shape)} for {tuple(active.shape)} "
                             f"(samples, teachers)")
        active = active & allowed
    labelled = labelled_foreground(target)
    if device is not None:
        active, labelled = active.to(device), labelled.to(device, non_blocking=True)
    if tuple(labelled.shape[:1]) != (active.shape[0],):
        raise ValueError(f"teacher_kd_masks: {active.shape[0]} keys for a target of batch {labelled.shape[0]}")
    keep = ~labelled
    if valid is not None:
        keep = keep & valid.to(keep.device).bool()
    return active, keep


class _DistillationMixin:
    """Shared wiring: teachers, the loss wrapper, the student feature hook and the KD ramp-up."""

    teacher_config_key = "teachers"
    needs_organ = False
    uses_features = False
    single_teacher = False
    teachers_optional = False  # True: the trainer also distils from elsewhere (FedKD: the global model)
    _gate_report: Sequence[str] = ()  # what the teacher gate decided, written to the log by _load_teachers

    # -- setup --------------------------------------------------------------------------------------------------------
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # the settings are needed before nnU-Net's __init__: the adapters' shape goes into the plans it keeps
        self.fedkd_config, self.fedkd_config_file = self.read_config(plans)
        self.teacher_specs = self._gate(self._parse_teacher_specs())
        self._check_settings()
        self._store_adapter_plans(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True) -> nn.Module:
        """The student trainer's own network plus the feature adapters recorded in the plans (also at inference)."""
        net = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                 num_output_channels, enable_deep_supervision)
        return attach_feature_adapters(net, configuration_manager)

    def _check_settings(self) -> None:
        """Refuse inconsistent settings before nnU-Net starts (subclasses add their checks)."""

    def _parse_teacher_specs(self) -> List[TeacherSpec]:
        entries = self.fedkd_config[self.teacher_config_key]
        if isinstance(entries, dict):
            entries = [entries]
        specs = parse_teachers(entries, f"trainer setting {self.teacher_config_key!r}", self.needs_organ)
        if not specs:
            raise TeacherError(f"{type(self).__name__} needs at least one teacher in the trainer setting "
                               f"{self.teacher_config_key!r} (file: {self.fedkd_config_file})")
        if self.single_teacher and len(specs) != 1:
            raise TeacherError(f"{type(self).__name__} takes exactly one {self.teacher_config_key}")
        return specs

    def _gate(self, specs: List[TeacherSpec]) -> List[TeacherSpec]:
        """Leave out teachers that learned too little (``min_teacher_dice``); an error if none is left and the
        trainer has nothing else to learn from (FedKD keeps distilling from the global model)."""
        min_dice = float(self.fedkd_config.get("min_teacher_dice", 0.0))
        if not specs or min_dice <= 0:
            return specs
        kept, self._gate_report = gate_teachers(specs, min_dice)
        if not kept and not self.teachers_optional:
            raise TeacherError(f"no teacher is good enough for {type(self).__name__}: " + "; ".join(self._gate_report)
                               + f" (lower min_teacher_dice in {self.fedkd_config_file} to use them anyway)")
        return kept

    def _store_adapter_plans(self, plans: dict, configuration: str) -> None:
        """Record the feature adapters' shape in the plans (read back by build_network_architecture at inference)."""
        conf = plans["configurations"][configuration]
        conf.pop(ADAPTER_PLANS_KEY, None)
        if not self.uses_features or float(self.fedkd_config["feature_kd_weight"]) == 0:
            return
        stage = int(self.fedkd_config["feature_kd_stage"])
        t_channels = []
        for spec in self.teacher_specs:
            p = spec.results_folder / "plans.json"
            if not p.is_file():
                raise TeacherError(f"teacher folder {spec.results_folder} has no plans.json")
            t_plans = json.loads(p.read_text())
            cfg_name = spec.results_folder.name.split("__")[-1]
            if cfg_name not in t_plans["configurations"]:
                raise TeacherError(f"teacher {spec.results_folder}: configuration {cfg_name!r} not in its plans")
            t_channels.append(decoder_stage_channels(t_plans["configurations"][cfg_name], stage))
        conf[ADAPTER_PLANS_KEY] = {"stage": stage, "student_channels": decoder_stage_channels(conf, stage),
                                   "teacher_channels": t_channels}

    def _build_loss(self):
        self._kd_loss = _LossWithTerms(super()._build_loss(), self.fedkd_config["gt_weight"])
        return self._kd_loss

    def _load_teachers(self) -> None:
        for line in self._gate_report:
            self.print_to_log_file(line)
        stage = int(self.fedkd_config["feature_kd_stage"]) if self._feature_weight() > 0 else None
        self.teachers = [FrozenTeacher(s, self.device, self.plans_manager, self.configuration_manager, stage)
                         for s in self.teacher_specs]
        for s, t in zip(self.teacher_specs, self.teachers):
            self.print_to_log_file(f"teacher {s.results_folder} folds {s.folds} ({s.checkpoint})"
                                   f"{' organ ' + s.organ if s.organ else ''}; resampled: {t.resample}")
        self._student_features = None
        if stage is not None:
            self._student_module().decoder.stages[stage].register_forward_hook(self._keep_student_features)

    def _student_module(self) -> nn.Module:
        net = self.network.module if self.is_ddp else self.network
        return getattr(net, "_orig_mod", net)

    def _keep_student_features(self, module, inputs, output):
        self._student_features = output

    def _feature_weight(self) -> float:
        return float(self.fedkd_config.get("feature_kd_weight", 0.0)) if self.uses_features else 0.0

    def _ramp(self) -> float:
        r = int(self.fedkd_config["kd_rampup_epochs"])
        return 1.0 if r <= 0 else min(1.0, (self.current_epoch + 1) / r)

    # -- steps --------------------------------------------------------------------------------------------------------
    def _kd_terms(self, batch: dict) -> Callable[[Any], torch.Tensor]:
        raise NotImplementedError

    def _autocast(self):
        from contextlib import nullcontext

        return torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else nullcontext()

    def train_step(self, batch: dict) -> dict:
        self._kd_loss.terms = self._kd_terms(batch)
        try:
            return super().train_step(batch)
        finally:
            self._kd_loss.terms = None
            self._student_features = None

    def validation_step(self, batch: dict) -> dict:
        self._kd_loss.terms = None
        return super().validation_step(batch)

    def _feature_term(self, teacher_feats: List[torch.Tensor], regions: List[Optional[torch.Tensor]]):
        """Sum over teachers of feature KD through the adapters, each inside its region (None: everywhere). Each is
        a mean over all voxels of the batch (:func:`feature_kd_loss`), so the sum weighs every region voxel once, as
        the organ terms of the region logit KD do."""
        sf = self._student_features
        if sf is None:
            raise RuntimeError("student features were not captured (is the decoder stage hook in place?)")
        adapters = self._student_module().fedkd_feature_adapters
        total = 0.0
        for k, (tf, region) in enumerate(zip(teacher_feats, regions)):
            tf = resize_features(tf, sf.shape[2:])
            if region is not None and tuple(region.shape[2:]) != tuple(sf.shape[2:]):
                region = F.interpolate(region.float(), size=list(sf.shape[2:]), mode="nearest") > 0.5
            total = total + feature_kd_loss(adapters(sf, k), tf, region, self.fedkd_config["feature_kd_kind"])
        return total


# ----------------------------------------------------------------------------------------------------------------------
# MS-KD: multi-teacher single-student
# ----------------------------------------------------------------------------------------------------------------------
class _MSKDMixin(_DistillationMixin):
    """MS-KD wiring. ``teacher_outputs``: ``"online"`` (the teachers run on every augmented training patch) or
    ``"cached"`` (each teacher predicts every training case once; the stored probabilities follow the patch through
    nnU-Net's crop and augmentation, see :mod:`nnunetv2_fedkd.distillation.teacher_cache`; responses only, so
    ``feature_kd_weight`` must be 0).

    Per-site teacher gate (:mod:`nnunetv2_fedkd.distillation.teacher_site_gate`; ``max_teacher_fp_rate`` default 0.2,
    ``min_teacher_site_dice`` default 0.5): before training, every teacher's predictions on the training cases (the
    cache above; with ``"online"`` teachers the cache is built for this alone, once, and reused by later runs) are
    scored against the labels of each site (dataset.json ``fedkd.case_site``; a site's own dataset is one site). A
    teacher that claims more than ``max_teacher_fp_rate`` of another organ's labelled voxels at a site gives no KD on
    that site's cases; one whose Dice on its own organ at a site that labels it is below ``min_teacher_site_dice``
    gives none anywhere. Each figure and decision goes to the training log and ``teacher_gate.json`` in the fold
    folder. ``max_teacher_fp_rate`` 1 and ``min_teacher_site_dice`` 0 turn it off (nothing is predicted or read)."""

    teacher_config_key = "teachers"
    needs_organ = True
    uses_features = True
    config_extra = {"teachers": [], "kd_background_weight": 1.0, "teacher_outputs": "online", **KD_DEFAULTS,
                    **SITE_GATE_DEFAULTS, **FEATURE_DEFAULTS}

    def _check_settings(self) -> None:
        c = self.fedkd_config
        if c["teacher_outputs"] not in ("online", "cached"):
            raise TeacherError(f"teacher_outputs must be 'online' or 'cached', got {c['teacher_outputs']!r} "
                               f"(file: {self.fedkd_config_file})")
        if self._cached() and float(c["feature_kd_weight"]) != 0:
            raise TeacherError(f"teacher_outputs 'cached' stores the teachers' responses only; feature KD needs them "
                               f"online: set feature_kd_weight to 0 or teacher_outputs to 'online' "
                               f"(file: {self.fedkd_config_file})")
        for key in SITE_GATE_DEFAULTS:
            v = c[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise TeacherError(f"{key} must be a number in [0, 1], got {v!r} (file: {self.fedkd_config_file})")

    def _site_gate_enabled(self) -> bool:
        """Whether the per-site teacher gate scores the teachers (off: max_teacher_fp_rate 1 and
        min_teacher_site_dice 0, or no teachers; then nothing is predicted or read for it)."""
        c = self.fedkd_config
        return bool(self.teacher_specs) and (float(c["max_teacher_fp_rate"]) < 1.0
                                             or float(c["min_teacher_site_dice"]) > 0.0)

    def _cached(self) -> bool:
        return self.fedkd_config["teacher_outputs"] == "cached" and bool(self.teacher_specs)

    # -- cached teacher outputs ---------------------------------------------------------------------------------------
    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        self._teacher_site_gate = None
        if not (self._cached() or self._site_gate_enabled()):
            return dataset_tr, dataset_val
        # the teachers' predictions on the training cases: what cached KD reads, and what the site gate scores
        folder = self._build_teacher_cache(dataset_tr)
        if self._site_gate_enabled():
            self._teacher_site_gate = self._gate_teachers_per_site(dataset_tr, folder)
        if not self._cached():
            return dataset_tr, dataset_val
        from nnunetv2_fedkd.distillation import teacher_cache as tc

        self.teacher_cache_folder = folder
        self.teachers = []  # the networks are not needed any more: training reads the cache
        return tc.TeacherCachedDataset(dataset_tr, folder, len(self.teacher_specs)), dataset_val

    def _build_teacher_cache(self, dataset_tr):
        """Every teacher predicts every training case once (:func:`nnunetv2_fedkd.distillation.teacher_cache.build_teacher_cache`;
        cases already in the cache are reused). Returns the cache folder."""
        from nnunetv2_fedkd.distillation import teacher_cache as tc

        key = tc.cache_key({"configuration": self.configuration_manager.configuration,
                            "intensity": self.plans_manager.plans.get("foreground_intensity_properties_per_channel")},
                           self.teacher_specs)
        folder = tc.cache_folder(self.preprocessed_dataset_folder, key)
        describe = {"student": {"plans": self.plans_manager.plans_name, "configuration": self.configuration_name,
                                "data_identifier": self.configuration_manager.data_identifier},
                    "teachers": [{"results_folder": str(s.results_folder), "folds": s.folds,
                                  "checkpoint": s.checkpoint, "organ": s.organ} for s in self.teacher_specs]}
        ids = list(dataset_tr.identifiers)
        build = lambda share: tc.build_teacher_cache(  # noqa: E731
            folder, dataset_tr, share, self.teachers, self._teacher_channel, self.plans_manager,
            self.configuration_manager, self.device, describe, self.print_to_log_file)
        if self.is_ddp:  # every rank predicts its share, rank 0 writes the manifest
            import torch.distributed as dist

            build(ids[dist.get_rank()::dist.get_world_size()])
            dist.barrier()
            info = build(ids) if self.local_rank == 0 else {"predicted_cases": 0, "seconds": 0.0}
            dist.barrier()
        else:
            info = build(ids)
        why = "cached KD" if self._cached() else "the per-site teacher gate (online KD)"
        self.print_to_log_file(f"teacher outputs cached in {folder} for {why}: {info['predicted_cases']} cases "
                               f"predicted now in {info['seconds']:.1f} s, {len(ids) - info['predicted_cases']} reused")
        return folder

    def _gate_default_site(self) -> str:
        """The site of a case dataset.json gives none: the dataset's own site (a federated view dataset names it,
        FedKD's ``site_name`` setting, else the dataset's name)."""
        meta = self.dataset_json.get("fedkd") or {}
        return str(meta.get("site") or self.fedkd_config.get("site_name") or self.plans_manager.dataset_name)

    def _gate_teachers_per_site(self, dataset_tr, folder):
        """Score every teacher at every site from its cached predictions on the training cases and their labels
        (:mod:`nnunetv2_fedkd.distillation.teacher_site_gate`); log each figure and decision, write ``teacher_gate.json`` into the
        fold folder; returns the :class:`~nnunetv2_fedkd.distillation.teacher_site_gate.TeacherSiteGate`."""
        import os

        import numpy as np

        from nnunetv2_fedkd.distillation import teacher_site_gate as tsg
        from nnunetv2_fedkd.distillation.teacher_cache import load_cached
        from nnunetv2_fedkd.utils import atomic_write_json

        c = self.fedkd_config
        max_fp, min_dice = float(c["max_teacher_fp_rate"]), float(c["min_teacher_site_dice"])
        ids = [str(i) for i in dataset_tr.identifiers]
        names = self.label_availability.label_names
        classes = [i + 1 for i in self._teacher_organ_index]
        K = len(self.teacher_specs)
        default = self._gate_default_site()
        case_site = tsg.case_sites(self.dataset_json, ids, default)

        def load(ident):
            seg = np.asarray(dataset_tr.load_case(ident)[1][:])
            return load_cached(folder, ident, K, seg.shape[1:]), seg

        annotated = lambda ident: [names.index(o) + 1 for o in self.label_availability.annotated(ident)]  # noqa
        ignore = getattr(self.label_manager, "ignore_label", None)
        counts = tsg.score_sites(ids, load, annotated, case_site, classes, len(names), tsg.PROB_THRESHOLD, ignore)
        short = tsg.unique_teacher_names([s.organ for s in self.teacher_specs])
        describe = [f"{n} ({s.results_folder})" for n, s in zip(short, self.teacher_specs)]
        decision = tsg.decide_site_gate(counts, short, classes, names, max_fp, min_dice, describe)
        for line in decision.lines:
            self.print_to_log_file(f"teacher gate: {line}")
        self._teacher_gate_decision = decision
        if self.local_rank == 0 and self.output_folder is not None:
            atomic_write_json(os.path.join(self.output_folder, tsg.GATE_JSON), {
                "rule": {"max_teacher_fp_rate": max_fp, "min_teacher_site_dice": min_dice,
                         "probability_threshold": tsg.PROB_THRESHOLD,
                         "fp_rate": "claimed / labelled voxels of another organ the site labels: > "
                                    "max_teacher_fp_rate -> left out at that site",
                         "dice": "Dice on its own organ at a site that labels it: < min_teacher_site_dice -> left "
                                 "out at every site"},
                "cases": len(ids), "teacher_cache": str(folder),
                "teachers": [{"name": n, "organ": s.organ, "results_folder": str(s.results_folder),
                              "folds": s.folds, "checkpoint": s.checkpoint}
                             for n, s in zip(short, self.teacher_specs)],
                "sites": decision.sites, "may_speak": decision.table(), "figures": decision.figures,
                "decisions": decision.lines})
        if not decision.ok.any() and not self.teachers_optional:
            raise TeacherError(f"no teacher may speak at any site for {type(self).__name__}: "
                               + "; ".join(decision.lines) + f" (raise max_teacher_fp_rate or lower "
                               f"min_teacher_site_dice in {self.fedkd_config_file} to use them anyway)")
        return tsg.TeacherSiteGate(decision.sites, decision.ok, case_site, default)

    def _teacher_gate_metrics(self) -> dict:
        """The site gate's figures as flat numbers (for a federated site's update metrics); {} without a gate."""
        decision = getattr(self, "_teacher_gate_decision", None)
        if decision is None:
            return {}
        from nnunetv2_fedkd.distillation.teacher_site_gate import gate_metrics

        return gate_metrics(decision)

    def get_training_transforms(self, *args, **kwargs):
        stock = super().get_training_transforms(*args, **kwargs)
        if not self._cached():
            return stock
        from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

        from nnunetv2_fedkd.distillation.teacher_cache import AppendTeacherTarget, SplitTeacherChannels

        return ComposeTransforms([SplitTeacherChannels(self.num_input_channels), stock, AppendTeacherTarget()])

    def initialize(self):
        super().initialize()
        self._load_teachers()
        names = self.label_availability.label_names
        organs = [s.organ for s in self.teacher_specs]
        missing = [o for o in organs if o not in names]
        if missing:
            raise TeacherError(f"teacher organs {missing} are not labels of the student's dataset ({names})")
        self._teacher_organ_index = [names.index(o) for o in organs]
        self._teacher_channel = [t.channel_of(o) for t, o in zip(self.teachers, organs)]

    def _kd_terms(self, batch: dict):
        valid = None
        if self._cached():
            from nnunetv2_fedkd.distillation.teacher_cache import decode_teacher_target, split_target

            batch["target"], stored = split_target(batch["target"], self.enable_deep_supervision)
            t_fg, valid = decode_teacher_target(stored.to(self.device, non_blocking=True))
            feats = []
        else:
            x = batch["data"].to(self.device, non_blocking=True)
            with self._autocast():
                t_fg, feats = teachers_foreground_logits(self.teachers, self._teacher_channel, x)
        # the labels win: no KD from a teacher whose organ the sample annotates, none on labelled organ voxels
        # (batch['target'] is nnU-Net's own target here: the cached path split the teacher channels off above)
        # ... and none from a teacher at a site where its predictions contradict the site's labels (site gate)
        active, valid = teacher_kd_masks(self.label_availability, batch["keys"], self._teacher_organ_index,
                                         batch["target"], valid, self.device,
                                         getattr(self, "_teacher_site_gate", None))
        c = self.fedkd_config
        ramp, T, w_feat = self._ramp(), float(c["kd_temperature"]), self._feature_weight()
        sigmoid = self.label_manager.has_regions

        def terms(output):
            out = _full_res(output)
            if sigmoid:
                student = out[:, self._teacher_organ_index]
                kd = region_logit_kd_sigmoid(student, t_fg, T, c["kd_background_weight"], valid, active)
            else:
                kd = region_logit_kd_softmax(out, t_fg, [i + 1 for i in self._teacher_organ_index], T,
                                             c["kd_background_weight"], valid, active)
            loss = ramp * float(c["kd_weight"]) * kd
            if w_feat > 0:
                regions = [(t_fg[:, k:k + 1] > 0) & active[:, k].view(-1, *([1] * (t_fg.ndim - 1))) & valid
                           for k in range(t_fg.shape[1])]
                loss = loss + ramp * w_feat * self._feature_term(feats, regions)
            return loss

        return terms


class nnUNetTrainerMSKD(_MSKDMixin, nnUNetTrainerMarginal):
    """Multi-teacher single-student (MS-KD) with a softmax student: marginal(+exclusion) loss on the labels that exist,
    region-based logit KD (KL on {organ k, rest} inside teacher k's region, background where all teachers agree) and
    region-based feature KD from one single-organ nnU-Net teacher per organ."""

    config_defaults = {**nnUNetTrainerMarginal.config_defaults, **_MSKDMixin.config_extra}


class nnUNetTrainerMSKDMultiHead(_MSKDMixin, nnUNetTrainerMultiHead):
    """MS-KD with the multi-head sigmoid student: masked BCE+Dice on the labels that exist, binary KL per organ head
    inside its teacher's region and on the common background, region-based feature KD."""

    config_defaults = {**nnUNetTrainerMultiHead.config_defaults, **_MSKDMixin.config_extra}


# ----------------------------------------------------------------------------------------------------------------------
# Ensemble -> one network
# ----------------------------------------------------------------------------------------------------------------------
class nnUNetTrainerEnsembleKD(_DistillationMixin, nnUNetTrainerFedKDBase):
    """One network from an nnU-Net ensemble of the same dataset (several folds and/or configurations), after
    Noothout et al. 2022: ``(1 - kd_weight) * DC+CE(hard labels) + kd_weight * T^2 KL(ensemble_T || student_T)``,
    the ensemble being the mean class probabilities of all its members (each fold counts once)."""

    teacher_config_key = "ensemble"
    config_defaults = {**nnUNetTrainerFedKDBase.config_defaults, "ensemble": [], **KD_DEFAULTS,
                       "kd_weight": 0.5, "kd_temperature": 1.0}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # the hard-label share is 1 - kd_weight unless gt_weight is set explicitly
        if "gt_weight" not in self._explicit_settings():
            self.fedkd_config["gt_weight"] = 1.0 - float(self.fedkd_config["kd_weight"])

    def _explicit_settings(self) -> set:
        if self.fedkd_config_file is None:
            return set()
        raw = json.loads(self.fedkd_config_file.read_text())
        return set(raw) | set((raw.get("trainers") or {}).get(type(self).__name__, {}))

    def initialize(self):
        super().initialize()
        if self.label_manager.has_regions:
            raise TeacherError("nnUNetTrainerEnsembleKD distils softmax class probabilities; this dataset uses "
                               "regions (sigmoid outputs)")
        self._load_teachers()
        mine = [k for k, v in sorted(self.dataset_json["labels"].items(), key=lambda kv: kv[1]) if v != 0]
        for t in self.teachers:
            if t.label_manager.has_regions or t.label_names() != mine:
                raise TeacherError(f"ensemble member {t.spec.results_folder} has labels {t.label_names()}"
                                   f"{' (regions)' if t.label_manager.has_regions else ''}; the student has {mine}: "
                                   f"an ensemble must be trained on the student's dataset")
        self._weights = [len(t.networks) for t in self.teachers]

    def _kd_terms(self, batch: dict):
        x = batch["data"].to(self.device, non_blocking=True)
        with self._autocast():
            probs = sum(w * t(x)[0] for w, t in zip(self._weights, self.teachers)) / sum(self._weights)
        c = self.fedkd_config
        w = self._ramp() * float(c["kd_weight"])
        T = float(c["kd_temperature"])
        return lambda output: w * soft_label_kd_loss(_full_res(output), probs, T)


# ----------------------------------------------------------------------------------------------------------------------
# Dual KD on what the local labels do not cover
# ----------------------------------------------------------------------------------------------------------------------
class nnUNetTrainerDualKD(_DistillationMixin, nnUNetTrainerMarginal):
    """Dual (response + feature) KD from a model trained elsewhere (He et al. 2023). The local loss is the
    marginal(+exclusion) loss on the organs each case annotates (a case annotating none - an unlabelled case, listed
    with ``[]`` in dataset.json ``fedkd.case_annotated`` - adds no label loss); the public model's responses are
    distilled on every class a case does not annotate (:func:`partial_kd_softmax`), and its decoder features on the
    unlabelled cases. The public model's labels are matched to the student's by name; the organs the student does not
    have count as its background (:func:`teacher_probs_for_student_classes`)."""

    teacher_config_key = "public_model"
    uses_features = True
    single_teacher = True
    config_defaults = {**nnUNetTrainerMarginal.config_defaults, "public_model": {}, **KD_DEFAULTS,
                       **FEATURE_DEFAULTS}

    def initialize(self):
        super().initialize()
        self._load_teachers()
        t = self.teachers[0]
        if t.label_manager.has_regions:
            raise TeacherError(f"public model {t.spec.results_folder} has sigmoid region outputs; DualKD needs a "
                               f"softmax model")
        mine = self.label_availability.label_names
        missing = [n for n in mine if n not in t.label_names()]
        if missing:
            raise TeacherError(f"public model {t.spec.results_folder} does not predict {missing} (its labels: "
                               f"{t.label_names()})")
        # the public model's channel of each student organ; its other organs count as the student's background
        self._channels = [t.channel_of(n) for n in mine]

    def _kd_terms(self, batch: dict):
        x = batch["data"].to(self.device, non_blocking=True)
        with self._autocast():
            probs, feats = self.teachers[0](x)
        mapped = teacher_probs_for_student_classes(probs, self._channels)
        annotated = self.label_availability.softmax_mask(batch["keys"]).to(self.device)
        unlabelled = ~annotated[:, 1:].any(1)
        c = self.fedkd_config
        ramp, T, w_feat = self._ramp(), float(c["kd_temperature"]), self._feature_weight()

        def terms(output):
            out = _full_res(output)
            loss = ramp * float(c["kd_weight"]) * partial_kd_softmax(out, torch.log(mapped.clamp_min(1e-8)),
                                                                      annotated, T)
            if w_feat > 0 and bool(unlabelled.any()):
                region = unlabelled.view(-1, *([1] * (out.ndim - 1))).expand(-1, 1, *out.shape[2:])
                loss = loss + ramp * w_feat * self._feature_term([feats], [region])
            return loss

        return terms
