r"""Knowledge-distillation (KD) losses: a student segmentation network learns from teacher networks' outputs.

Pure torch, no nnU-Net state. Every loss

* takes the student's raw outputs (logits or features) ``[B, C, *spatial]`` for any number of spatial dims,
* takes teacher outputs of the same batch and spatial size (the trainer resamples them; a mismatch raises
  ``ValueError``) and detaches them: teachers never receive a gradient,
* computes in float32 whatever the input dtype (fp16/bf16 outputs from nnU-Net's autocast are cast with
  ``.float()``),
* returns a scalar float32 tensor that is always connected to the student's graph (an empty region or an
  everything-annotated batch gives ``0`` with an all-zero gradient, never a constant),
* uses the temperature ``T`` as in Hinton et al. 2015: both distributions are softened with ``T`` and the KL is
  multiplied by ``T ** 2`` so that gradient magnitudes do not depend on ``T``.

Notation: :math:`\sigma` the sigmoid, :math:`\mathrm{KL}_2(p \,\|\, q) = p \log\frac{p}{q} + (1-p)\log\frac{1-p}{1-q}`
the binary KL divergence (terms with a zero teacher probability count 0), ``N`` voxels per sample.

Losses
------
``region_logit_kd_softmax``   MS-KD region-based logit KD from binary single-organ teachers into a softmax student.

    .. math::

        \mathcal{L} = \frac{T^2}{BN}\Big[\sum_{k=1}^{K}\sum_{(b,i)\in R_k}
        \mathrm{KL}_2\big(\sigma(t_k/T)\,\|\,p_{c_k}\big)
        + w_{bg}\sum_{(b,i)\in R_{bg}}\mathrm{KL}_2\big(q_{bg}^T\,\|\,p_{rest,b}\big)\Big]

    with :math:`p = \mathrm{softmax}(s/T)`, :math:`A_{bk}` = teacher ``k`` may speak on sample ``b`` (``active``;
    the trainers: the sample does not annotate :math:`c_k`), :math:`R_k = \{A_{bk},\ t_k > 0\}`,
    :math:`R_{bg} = \{t_k \le 0\ \forall k \in A_b\}` (both inside ``valid``: the trainers leave out the voxels a
    case labels as one of its organs), :math:`q_{bg} = \prod_{k \in A_b}(1-\sigma(t_k))` tempered as a binary
    distribution (:math:`\operatorname{logit} q_{bg}^T = \operatorname{logit}(q_{bg})/T`) and :math:`p_{rest,b}` the
    student's background plus every class without an active teacher in sample ``b``.

``region_logit_kd_sigmoid``   the same for a multi-head sigmoid student (channel ``k`` aligned with teacher ``k``):
    organ terms :math:`\mathrm{KL}_2(\sigma(t_k/T)\,\|\,\sigma(s_k/T))` on :math:`R_k`; background term the mean over
    the sample's active channels of the same binary KL on :math:`R_{bg}`.

``feature_kd_loss``            region-masked feature distillation, squared error or cosine distance over channels.

The region losses (logit and feature) are means over ALL ``B N`` voxels of the batch, a voxel outside the region
counting 0 (not means over the region): every region voxel weighs as one voxel of a per-voxel-mean supervised loss,
whatever the size of its region.

``soft_label_kd_loss``         :math:`T^2 \operatorname{mean}_{b,i}\mathrm{KL}(\mathrm{softmax}(\log P/T)\,\|\,
    \mathrm{softmax}(s/T))` against given teacher probabilities ``P`` (e.g. an averaged teacher ensemble).

``partial_kd_softmax``         KD from a previous (global) model on the classes a sample does not annotate: the
    annotated classes and background are merged into one bin of both distributions (Kim et al. 2024; ConDistFL).

``partial_kd_sigmoid``         the same for a multi-head sigmoid student: binary KL on the unannotated
    (sample, channel) pairs only.

References:
    G. Hinton, O. Vinyals, J. Dean. "Distilling the knowledge in a neural network." arXiv:1503.02531 (2015).
    Q. Zhao et al. "MS-KD: multi-organ segmentation with multiple binary-labeled datasets" (2022/2023): region-based
    logit KD and region-masked feature KD from single-organ binary teachers.
    He et al. 2023, dual (logit + feature) knowledge distillation for partially labelled multi-organ segmentation:
    unmasked feature KD (``region=None``).
    J. M. H. Noothout, N. Lessmann, M. C. van Eede, et al. "Knowledge distillation with ensembles of convolutional
    neural networks for medical image segmentation." J. Med. Imaging 9(5) 052407 (2022): soft-label KD from the
    averaged ensemble.
    S. Kim, H. Park, M. Kang, K. H. Jin, E. Adeli, K. M. Pohl, S. H. Park. "Federated learning with knowledge
    distillation for multi-organ segmentation with partially labeled datasets." Medical Image Analysis 95 (2024)
    103156: KD from the previous global model on unannotated organs.
    P. Wang, C. Shen, W. Wang, et al. "ConDistFL: Conditional distillation for federated learning from partially
    annotated data." MICCAI DeCaF workshop 2023, arXiv:2308.04070: merged-bin (conditional) distillation.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_fedkd.losses.partial_label import _log_one_minus_softmax, _spatial_view

__all__ = [
    "binary_teacher_logit",
    "teacher_probs_for_student_classes",
    "region_logit_kd_softmax",
    "region_logit_kd_sigmoid",
    "feature_kd_loss",
    "soft_label_kd_loss",
    "partial_kd_softmax",
    "partial_kd_sigmoid",
    "RegionLogitKDSoftmaxLoss",
    "RegionLogitKDSigmoidLoss",
    "FeatureKDLoss",
    "SoftLabelKDLoss",
    "PartialKDSoftmaxLoss",
    "PartialKDSigmoidLoss",
]


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def binary_teacher_logit(two_class_logits: torch.Tensor) -> torch.Tensor:
    r"""Foreground logit of a 2-class softmax teacher: ``[B, 2, *spatial] -> [B, 1, *spatial]``, ``z_1 - z_0``.

    Exact: :math:`\mathrm{softmax}(z)_1 = \sigma(z_1 - z_0)`, also after dividing by a temperature. Output dtype is
    float32; the result is detached (it is a teacher output).
    """
    if two_class_logits.ndim < 3 or two_class_logits.shape[1] != 2:
        raise ValueError(f"binary_teacher_logit: expected [B, 2, *spatial], got {tuple(two_class_logits.shape)}")
    z = two_class_logits.detach().float()
    return z[:, 1:2] - z[:, 0:1]


def teacher_probs_for_student_classes(teacher_probs: torch.Tensor, channels) -> torch.Tensor:
    r"""A softmax teacher's class probabilities in a student's label set: ``[B, C_t, *spatial] -> [B, 1 + K, ...]``.

    ``channels``: for each of the student's K foreground classes, the teacher's channel of the same organ. Student
    class k takes the teacher's ``p[channels[k]]``; the student's background takes everything else, i.e. the teacher's
    background **and** every organ the student does not have: :math:`p_0^s = 1 - \sum_k p_{c_k}^t`. (Keeping only
    the listed columns and renormalising instead would turn a teacher sure of an organ the student lacks into an
    arbitrary split between the student's classes, e.g. liver .97 -> student pancreas .33.) A distribution in, a
    distribution out; the sum is taken in float32 and clamped at 0 against rounding.
    """
    if teacher_probs.ndim < 3:
        raise ValueError(f"teacher_probs: expected [B, C, *spatial], got {tuple(teacher_probs.shape)}")
    idx = [int(c) for c in channels]
    if not idx or len(set(idx)) != len(idx) or min(idx) < 1 or max(idx) >= teacher_probs.shape[1]:
        raise ValueError(f"channels {idx}: distinct teacher foreground channels in 1..{teacher_probs.shape[1] - 1}")
    fg = teacher_probs[:, idx].float()
    return torch.cat([(1.0 - fg.sum(1, keepdim=True)).clamp_min(0.0), fg], dim=1)


def _check_temperature(temperature: float, name: str) -> float:
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
    return t


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, name: str, same_channels: bool = True):
    """Validate ``[B, C, *spatial]`` student/teacher; return (float32 student, detached float32 teacher)."""
    if student.ndim < 3:
        raise ValueError(f"{name}: student must be [B, C, *spatial] with at least one spatial dim, got "
                         f"{tuple(student.shape)}")
    if teacher.ndim != student.ndim or teacher.shape[0] != student.shape[0] or \
            tuple(teacher.shape[2:]) != tuple(student.shape[2:]) or \
            (same_channels and teacher.shape[1] != student.shape[1]):
        raise ValueError(f"{name}: teacher {tuple(teacher.shape)} does not match student {tuple(student.shape)}"
                         + ("" if same_channels else " (batch and spatial sizes must agree)"))
    return student.float(), teacher.detach().float()


def _check_annotated(annotated, b: int, c: int, device, name: str) -> torch.Tensor:
    a = torch.as_tensor(annotated, device=device)
    if tuple(a.shape) != (b, c):
        raise ValueError(f"{name}: annotated must be [B, C] = {(b, c)}, got {tuple(a.shape)}")
    return a.bool()


def _binary_kl(t_logp: torch.Tensor, t_log1mp: torch.Tensor, s_logp: torch.Tensor,
               s_log1mp: torch.Tensor) -> torch.Tensor:
    r"""Elementwise :math:`\mathrm{KL}_2(p_t \,\|\, p_s)` from log-probabilities of both outcomes.

    Teacher log-probabilities may be ``-inf`` (probability 0): such terms count 0 (``torch.where``, no NaN in the
    forward or backward pass). Student log-probabilities must be finite.
    """
    zero = torch.zeros((), dtype=torch.float32, device=s_logp.device)
    p, q = torch.exp(t_logp), torch.exp(t_log1mp)
    return (torch.where(p > 0, p * (t_logp - s_logp), zero)
            + torch.where(q > 0, q * (t_log1mp - s_log1mp), zero))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Stable ``log(1 - exp(x))`` for ``x <= 0`` (``-inf`` at ``x = 0``); Maechler's two-branch formula."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _batch_voxel_mean(values: torch.Tensor, mask: torch.Tensor, n_voxels: int) -> torch.Tensor:
    """Sum of ``values`` over ``mask`` (all dims) divided by ``n_voxels``, the voxel count of the whole batch
    (``B * N``): every selected voxel weighs as one voxel of a per-voxel-mean supervised loss. Empty mask: a
    graph-connected 0."""
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    return torch.where(mask, values, zero).sum() / float(max(n_voxels, 1))


def _check_active(active, b: int, k: int, device, name: str) -> torch.Tensor:
    """``[B, K]`` bool: teacher ``k`` may speak on sample ``b`` (None: every teacher on every sample)."""
    if active is None:
        return torch.ones(b, k, dtype=torch.bool, device=device)
    a = torch.as_tensor(active, device=device)
    if tuple(a.shape) != (b, k):
        raise ValueError(f"{name}: active must be [B, K] = {(b, k)}, got {tuple(a.shape)}")
    return a if a.dtype == torch.bool else a != 0


def _kd_regions(t: torch.Tensor, valid: Optional[torch.Tensor], active: torch.Tensor, name: str):
    r"""The MS-KD regions of teacher foreground logits ``t`` ``[B, K, *S]`` with the teachers ``active`` ``[B, K]``
    on each sample: (organ regions :math:`R_k = \{(b, i): A_{bk},\ t_{bki} > 0\}` ``[B, K, *S]``, background region
    :math:`R_{bg} = \{(b, i): \exists k\, A_{bk},\ t_{bki} \le 0\ \forall k \text{ with } A_{bk}\}` ``[B, *S]``),
    both restricted to ``valid`` (``[B, 1, *S]`` or ``[B, *S]``; non-bool: non-zero = valid) when it is given. A
    sample without an active teacher has no region at all."""
    b, spatial = t.shape[0], tuple(t.shape[2:])
    act = active.view(active.shape + (1,) * len(spatial))
    organ = (t > 0) & act
    bg = ~organ.any(1) & act.any(1)
    if valid is None:
        return organ, bg
    v = valid.to(device=t.device)
    if v.ndim == t.ndim - 1:
        v = v.unsqueeze(1)
    if tuple(v.shape) != (b, 1) + spatial:
        raise ValueError(f"{name}: valid mask shape {tuple(valid.shape)} does not fit teacher shape {tuple(t.shape)}")
    v = v if v.dtype == torch.bool else v != 0
    return organ & v, bg & v[:, 0]


def _teachers_background_log_probs(teacher_fg_logits: torch.Tensor, temperature: float = 1.0,
                                  active: Optional[torch.Tensor] = None):
    r"""Log-probabilities of "every (active) teacher says background", tempered: ``(log q, log (1 - q))`` ``[B, *S]``.

    With the teachers independent, at temperature 1: :math:`q_{bg} = \prod_{k \in A_b} (1 - \sigma(t_k))`; then
    tempered as a binary distribution, :math:`\operatorname{logit} q_{bg}^T = \operatorname{logit}(q_{bg}) / T`
    (tempering each teacher before the product instead, :math:`\prod_k \sigma(-t_k/T)`, is not a tempered version of
    the product: four teachers each at :math:`\sigma(t_k) = 0.001`, ``T = 2`` give 0.883 where
    :math:`q_{bg}^T = 0.940`). Computed in log space: :math:`\log q_{bg} = \sum_{k \in A_b} \log\sigma(-t_k)`,
    :math:`\log(1 - q_{bg})` by ``log1mexp``; where :math:`q_{bg}` rounds to 1 (also: a sample without an active
    teacher) the result is ``(0, -inf)``. Detached (teacher side).
    """
    with torch.no_grad():
        t = teacher_fg_logits.detach().float()
        act = _check_active(active, t.shape[0], t.shape[1], t.device, "_teachers_background_log_probs")
        act = act.view(act.shape + (1,) * (t.ndim - 2))
        zero = torch.zeros((), dtype=torch.float32, device=t.device)
        log_q = torch.where(act, F.logsigmoid(-t), zero).sum(1)  # log prod_k (1 - sigma(t_k)), T = 1
        logit = (log_q - _log1mexp(log_q)) / float(temperature)  # +inf where q_bg rounds to 1
        return F.logsigmoid(logit), F.logsigmoid(-logit)


def _class_indices(teacher_classes, k: int, c: int, device, name: str) -> torch.Tensor:
    idx = torch.as_tensor(teacher_classes, dtype=torch.long).reshape(-1)
    if idx.numel() != k:
        raise ValueError(f"{name}: {idx.numel()} teacher classes given for {k} teacher channels")
    if bool(((idx < 1) | (idx >= c)).any()):
        raise ValueError(f"{name}: teacher classes must lie in [1, {c - 1}] (0 is background), got "
                         f"{idx.tolist()}")
    return idx.to(device)


# ----------------------------------------------------------------------------------------------------------------------
# MS-KD region-based logit distillation
# ----------------------------------------------------------------------------------------------------------------------
def region_logit_kd_softmax(student_logits: torch.Tensor, teacher_fg_logits: torch.Tensor,
                            teacher_classes: Union[Sequence[int], torch.Tensor], temperature: float = 1.0,
                            weight_background: float = 1.0, valid: Optional[torch.Tensor] = None,
                            active: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Region-based logit KD from ``K`` binary single-organ teachers into a multi-class softmax student (MS-KD).

    After Zhao et al., "MS-KD: multi-organ segmentation with multiple binary-labeled datasets" (2022/2023). Teacher
    ``k`` is a binary nnU-Net for organ :math:`c_k` of the student's label space; its output is summarised by one
    foreground logit :math:`t_k` (for a 2-class softmax teacher :math:`z_1 - z_0`, see :func:`binary_teacher_logit`).
    With :math:`p = \mathrm{softmax}(s / T)` the student's tempered probabilities, :math:`A_{bk}` = ``active[b, k]``
    (teacher ``k`` may speak on sample ``b``; the trainer sets it False where the sample annotates :math:`c_k`: there
    the labels cover that organ) and :math:`V` the ``valid`` voxels (the trainer leaves out the voxels the case labels
    as one of its organs: where a case labels a voxel, the label wins):

    * organ region :math:`R_k = \{(b, i) \in V : A_{bk},\ t_{bki} > 0\}` (teacher ``k`` predicts its organ;
      independent of ``T``). There the student's binary distribution :math:`\{p_{c_k}, 1 - p_{c_k}\}` follows the
      teacher's :math:`\{\sigma(t_k/T), 1 - \sigma(t_k/T)\}`: :math:`\ell_k = \mathrm{KL}_2(\sigma(t_k/T) \,\|\,
      p_{c_k})`. Regions of different teachers may overlap; a voxel then contributes to each of them.
    * background region :math:`R_{bg} = \{(b, i) \in V : A_b \ne \emptyset,\ t_{bki} \le 0\ \forall k \in A_b\}`
      (every active teacher predicts background). The teachers' probability of that event, treating them as
      independent, is :math:`q_{bg} = \prod_{k \in A_b} (1 - \sigma(t_k))`, tempered as a binary distribution:
      :math:`\operatorname{logit} q^T_{bg} = \operatorname{logit}(q_{bg}) / T` (not the product of per-teacher
      tempered probabilities). The student's probability of the same event, none of the organs an active teacher
      covers, :math:`p_{rest,b} = p_0 + \sum_{c \notin \{c_k : k \in A_b\}} p_c` (a per-sample class set), follows
      it: :math:`\ell_{bg} = \mathrm{KL}_2(q^T_{bg} \,\|\, p_{rest,b})`. With an active teacher for every organ
      (MS-KD's setting) :math:`p_{rest} = p_0`; otherwise a voxel every active teacher calls background may be an
      organ no active teacher speaks for, and distilling into :math:`p_0` would teach the student to erase it
      (measured in ``benchmarks/accuracy.py`` before this was so: central MS-KD with only a liver teacher scored
      kidney Dice 0 where the marginal loss alone learned it).

    Reduction: a mean over ALL ``B N`` voxels of the batch (``N`` voxels per sample; voxels outside a region count
    0), the organ terms summed over the teachers:

    .. math::

        \mathcal{L} = \frac{T^2}{B N} \Big[ \sum_{k=1}^{K} \sum_{(b,i) \in R_k} \ell_{k,bi}
        \; + \; w_{bg} \sum_{(b,i) \in R_{bg}} \ell_{bg,bi} \Big]

    so a region voxel weighs the same whatever its region's size, and ``kd_weight`` times this loss compares per
    voxel with a per-voxel-mean supervised loss (CE). :math:`T^2` as in Hinton et al. 2015. A sample without an
    active teacher contributes 0 (and no gradient). Computed in log space (:math:`\log(1 - p_c)` via an exclusive
    logsumexp, :math:`\log q_{bg} = \sum_{k \in A_b} \log\sigma(-t_k)`, :math:`\log(1 - q_{bg})` by ``log1mexp``),
    finite for finite logits.

    Args:
        student_logits: ``[B, C, *spatial]`` student softmax logits (C >= 2, channel 0 = background).
        teacher_fg_logits: ``[B, K, *spatial]`` foreground logit of each teacher (detached inside).
        teacher_classes: ``K`` student class indices :math:`c_k \in [1, C-1]` (background 0 is not allowed;
            repeated classes are allowed and then simply both distil into the same class).
        temperature: ``T > 0``.
        weight_background: :math:`w_{bg}` (0 disables the background term).
        valid: optional ``[B, 1, *spatial]`` or ``[B, *spatial]`` bool mask of the voxels KD may act on (cached
            teacher outputs: not where augmentation moved the patch outside the case; the trainer also removes the
            voxels labelled as an annotated organ); voxels outside it belong to no region. None: every voxel.
        active: optional ``[B, K]`` bool, teacher ``k`` may speak on sample ``b``. None: every teacher everywhere.

    Returns:
        scalar float32 tensor (>= 0 up to rounding).
    """
    name = "region_logit_kd_softmax"
    tau = _check_temperature(temperature, name)
    s, t = _check_pair(student_logits, teacher_fg_logits, name, same_channels=False)
    b, c = s.shape[:2]
    k = t.shape[1]
    if c < 2:
        raise ValueError(f"{name}: the student needs at least 2 classes, got C = {c}")
    if k < 1:
        raise ValueError(f"{name}: at least one teacher is needed")
    idx = _class_indices(teacher_classes, k, c, s.device, name)
    act = _check_active(active, b, k, s.device, name)
    n_vox = s[:, 0].numel()  # B * N

    x = s / tau
    lse = torch.logsumexp(x, 1, keepdim=True)
    s_logp = x - lse  # log p_c for every class
    s_log1mp = _log_one_minus_softmax(x, lse, torch.exp(s_logp))  # log(1 - p_c), finite
    with torch.no_grad():
        organ, bg = _kd_regions(t, valid, act, name)  # R_k [B, K, *S], R_bg [B, *S]
        t_logp, t_log1mp = F.logsigmoid(t / tau), F.logsigmoid(-t / tau)

    kl_org = _binary_kl(t_logp, t_log1mp, s_logp.index_select(1, idx), s_log1mp.index_select(1, idx))
    loss = _batch_voxel_mean(kl_org, organ, n_vox)  # summed over the K teachers

    if weight_background != 0:
        with torch.no_grad():
            log_qbg, log_1m_qbg = _teachers_background_log_probs(t, tau, act)  # [B, *S]; (0, -inf): q_bg ~ 1
            onehot = F.one_hot(idx, c).bool()  # [K, C]
            taught = (act[:, :, None] & onehot[None]).any(1)  # [B, C]: classes with an active teacher in sample b
            # a sample without an active teacher has no background region; give it the all-teachers set so that
            # neither side of the student's split is empty (no -inf, no NaN gradient through the masked-out voxels)
            taught = torch.where(act.any(1, keepdim=True), taught, onehot.any(0, keepdim=True))
            rest = (~taught).view((b, c) + (1,) * (s.ndim - 2))  # background + classes without an active teacher
        # masked log-sum-exps: no data-dependent branch or indexing (no device sync in the training step)
        s_log_rest = torch.logsumexp(s_logp.masked_fill(~rest, float("-inf")), 1)  # log p_rest
        s_log_taught = torch.logsumexp(s_logp.masked_fill(rest, float("-inf")), 1)  # log (1 - p_rest), finite
        kl_bg = _binary_kl(log_qbg, log_1m_qbg, s_log_rest, s_log_taught)
        loss = loss + weight_background * _batch_voxel_mean(kl_bg, bg, n_vox)
    return (tau ** 2) * loss


def region_logit_kd_sigmoid(student_logits: torch.Tensor, teacher_fg_logits: torch.Tensor,
                            temperature: float = 1.0, weight_background: float = 1.0,
                            valid: Optional[torch.Tensor] = None,
                            active: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Region-based logit KD from ``K`` binary single-organ teachers into a multi-head sigmoid student (MS-KD).

    The multi-head counterpart of :func:`region_logit_kd_softmax`: student channel ``k`` (one sigmoid per organ, no
    background channel) is aligned with teacher ``k``. With the per-channel binary KL

    .. math:: \ell_{k} = \mathrm{KL}_2\big(\sigma(t_k/T) \,\|\, \sigma(s_k/T)\big)

    (= BCE of :math:`\sigma(s_k/T)` against the soft target :math:`\sigma(t_k/T)` minus the teacher's entropy, so it
    is 0 when :math:`s_k = t_k`), the (sample, channel) activity :math:`A_{bk}` (``active``), the valid voxels
    :math:`V`, the organ regions :math:`R_k = \{(b, i) \in V : A_{bk},\ t_{bki} > 0\}` and the background region
    :math:`R_{bg} = \{(b, i) \in V : A_b \ne \emptyset,\ t_{bki} \le 0\ \forall k \in A_b\}`, as a mean over all
    ``B N`` voxels of the batch:

    .. math::

        \mathcal{L} = \frac{T^2}{B N} \Big[ \sum_{k} \sum_{(b,i) \in R_k} \ell_{k,bi}
        \; + \; w_{bg} \sum_{(b,i) \in R_{bg}} \frac{1}{|A_b|} \sum_{k \in A_b} \ell_{k,bi} \Big]

    (the background term averages over the sample's active channels only; a sample without an active channel
    contributes 0). On a voxel of another organ's region only, channel ``k`` gets no gradient from this loss, nor
    does an inactive channel anywhere.

    Args:
        student_logits: ``[B, K, *spatial]`` student logits, channel ``k`` = organ of teacher ``k``.
        teacher_fg_logits: ``[B, K, *spatial]`` teacher foreground logits (detached inside).
        temperature: ``T > 0``.
        weight_background: :math:`w_{bg}`.
        valid: optional mask of the voxels KD may act on, as in :func:`region_logit_kd_softmax`.
        active: optional ``[B, K]`` bool, channel/teacher ``k`` may speak on sample ``b``. None: everywhere.

    Returns:
        scalar float32 tensor (>= 0 up to rounding).
    """
    name = "region_logit_kd_sigmoid"
    tau = _check_temperature(temperature, name)
    s, t = _check_pair(student_logits, teacher_fg_logits, name)
    b, k = s.shape[:2]
    act = _check_active(active, b, k, s.device, name)
    n_vox = s[:, 0].numel()  # B * N
    with torch.no_grad():
        organ, bg = _kd_regions(t, valid, act, name)
        t_logp, t_log1mp = F.logsigmoid(t / tau), F.logsigmoid(-t / tau)
    kl = _binary_kl(t_logp, t_log1mp, F.logsigmoid(s / tau), F.logsigmoid(-s / tau))  # [B, K, *S]
    loss = _batch_voxel_mean(kl, organ, n_vox)
    if weight_background != 0:
        act_sp = act.view((b, k) + (1,) * (s.ndim - 2))
        zero = torch.zeros((), dtype=torch.float32, device=s.device)
        per_voxel = torch.where(act_sp, kl, zero).sum(1) / act.sum(1).clamp_min(1).view((b,) + (1,) * (s.ndim - 2))
        loss = loss + weight_background * _batch_voxel_mean(per_voxel, bg, n_vox)
    return (tau ** 2) * loss


# ----------------------------------------------------------------------------------------------------------------------
# feature distillation
# ----------------------------------------------------------------------------------------------------------------------
def feature_kd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
                    region: Optional[torch.Tensor] = None, kind: str = "mse", eps: float = 1e-8) -> torch.Tensor:
    r"""Region-masked feature distillation (MS-KD feature-wise KD; unmasked as in He et al. 2023's dual KD).

    With :math:`f^s_{bi}, f^t_{bi} \in \mathbb{R}^F` the feature vectors at voxel ``i`` of sample ``b``, ``N`` voxels
    per sample and :math:`M` the selected voxels (all voxels when ``region`` is None), a mean over ALL ``B N`` voxels
    of the batch (unselected voxels count 0):

    .. math::

        \mathcal{L}_{mse} = \frac{1}{B N} \sum_{(b,i) \in M} \frac{1}{F} \lVert f^s_{bi} - f^t_{bi} \rVert^2,
        \qquad
        \mathcal{L}_{cos} = \frac{1}{B N} \sum_{(b,i) \in M} \Big(1 - \frac{\langle f^s_{bi}, f^t_{bi} \rangle}
        {\max(\lVert f^s_{bi} \rVert, \epsilon)\, \max(\lVert f^t_{bi} \rVert, \epsilon)}\Big)

    (the convention of the region logit KD losses: a selected voxel weighs the same whatever the region's size, so a
    small organ region is not up-weighted per voxel; without a region this is the plain mean over voxels).
    An empty region gives a graph-connected 0. Features must already have the same channel count (project the
    student's first) and the same spatial size (the trainer resizes the teacher's); otherwise ``ValueError``.

    Args:
        student_features: ``[B, F, *spatial]``.
        teacher_features: ``[B, F, *spatial]`` (detached inside).
        region: ``[B, 1, *spatial]`` or ``[B, *spatial]`` mask (bool; other dtypes: non-zero = selected), or None.
        kind: ``"mse"`` or ``"cosine"``.
        eps: norm floor of the cosine similarity.

    Returns:
        scalar float32 tensor (>= 0).
    """
    name = "feature_kd_loss"
    if kind not in ("mse", "cosine"):
        raise ValueError(f"{name}: kind must be 'mse' or 'cosine', got {kind!r}")
    s, t = _check_pair(student_features, teacher_features, name)
    if kind == "mse":
        per_voxel = (s - t).square().mean(1)  # [B, *S]
    else:
        dot = (s * t).sum(1)
        # clamp the squared norms (not the norms): no NaN gradient at an all-zero feature vector
        ns = s.square().sum(1).clamp_min(eps ** 2).sqrt()
        nt = t.square().sum(1).clamp_min(eps ** 2).sqrt()
        per_voxel = 1.0 - dot / (ns * nt)
    if region is None:
        return per_voxel.mean()
    m = region.detach()
    if m.ndim == s.ndim:
        if m.shape[1] != 1:
            raise ValueError(f"{name}: region must be [B, 1, *spatial], got {tuple(region.shape)}")
        m = m[:, 0]
    if tuple(m.shape) != tuple(per_voxel.shape):
        raise ValueError(f"{name}: region {tuple(region.shape)} does not match features {tuple(s.shape)}")
    m = m.to(device=s.device)
    m = m if m.dtype == torch.bool else m != 0
    return _batch_voxel_mean(per_voxel, m, per_voxel.numel())


# ----------------------------------------------------------------------------------------------------------------------
# soft-label (ensemble) distillation
# ----------------------------------------------------------------------------------------------------------------------
def soft_label_kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    r"""Hinton soft-label KD against given teacher probabilities (Noothout et al. 2022 ensemble distillation).

    The teacher probabilities ``P`` (e.g. the average of an ensemble's softmax outputs) are re-tempered as
    :math:`P^T = \mathrm{softmax}(\log \max(P, 10^{-8}) / T)` (which also renormalises them), and

    .. math::

        \mathcal{L} = T^2 \frac{1}{BN} \sum_{b,i} \sum_c P^T_{bci}
        \big(\log P^T_{bci} - \log \mathrm{softmax}(s_{bi}/T)_c\big)

    (mean over all voxels of the batch of the KL divergence over classes). 0 when
    :math:`\mathrm{softmax}(s) = P`, at every ``T``.

    Args:
        student_logits: ``[B, C, *spatial]`` student softmax logits.
        teacher_probs: ``[B, C, *spatial]`` probabilities (>= 0, summing to 1 over ``C``; detached inside).
        temperature: ``T > 0``.

    Returns:
        scalar float32 tensor (>= 0 up to rounding).
    """
    name = "soft_label_kd_loss"
    tau = _check_temperature(temperature, name)
    s, p = _check_pair(student_logits, teacher_probs, name)
    with torch.no_grad():
        t_log = torch.log_softmax(torch.log(p.clamp_min(1e-8)) / tau, 1)
    s_log = torch.log_softmax(s / tau, 1)
    kl = F.kl_div(s_log, t_log, reduction="none", log_target=True).sum(1)  # sum_c P^T (log P^T - log_softmax)
    return (tau ** 2) * kl.mean()


# ----------------------------------------------------------------------------------------------------------------------
# partial (unannotated-class) distillation
# ----------------------------------------------------------------------------------------------------------------------
def partial_kd_softmax(student_logits: torch.Tensor, teacher_logits: torch.Tensor, annotated: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    r"""KD on the classes a sample does NOT annotate, softmax student (Kim et al. 2024; ConDistFL).

    The teacher (e.g. the previous global model in federated learning) has the student's label space. Sample ``b``
    annotates the class set :math:`L_b` (background 0 is always included: it is merged too). Its supervised loss
    already covers :math:`L_b`, so the distillation only asks the student to reproduce how the teacher splits the
    probability among the *unannotated* classes: the classes of :math:`L_b` are merged into one bin in both
    distributions. With :math:`p = \mathrm{softmax}(s/T)`, :math:`q = \mathrm{softmax}(t/T)`:

    .. math::

        \bar p_{b,L} = \sum_{c \in L_b} p_c, \quad \bar p_{b,c} = p_c\ (c \notin L_b), \qquad
        \mathcal{L} = T^2 \frac{1}{BN} \sum_{b,i} \mathrm{KL}(\bar q_{bi} \,\|\, \bar p_{bi})

    (bins merged on probabilities, never by summing logits; computed in log space as
    :math:`\log \bar p_L = \mathrm{logsumexp}_{c \in L_b}(s_c/T) - \mathrm{logsumexp}_c(s_c/T)`). The mean runs over
    all voxels of the batch, so the value is the mean of the per-sample values (equal voxel counts), a sample that
    annotates every class contributing exactly 0 (one bin). When every sample annotates every class the loss is
    exactly 0 (graph-connected, zero gradient). Moving probability between annotated classes of a sample does not
    change the loss.

    Args:
        student_logits: ``[B, C, *spatial]``.
        teacher_logits: ``[B, C, *spatial]`` (detached inside).
        annotated: ``[B, C]`` bool; column 0 is forced True.
        temperature: ``T > 0``.

    Returns:
        scalar float32 tensor (>= 0 up to rounding).
    """
    name = "partial_kd_softmax"
    tau = _check_temperature(temperature, name)
    s, t = _check_pair(student_logits, teacher_logits, name)
    b, c = s.shape[:2]
    a = _check_annotated(annotated, b, c, s.device, name).clone()
    a[:, 0] = True
    merged = _spatial_view(a, s.ndim)  # [B, C, 1, ...]
    zero = torch.zeros((), dtype=torch.float32, device=s.device)

    def log_bins(z):
        """(log prob of the merged bin [B, *S], log probs of all classes [B, C, *S])."""
        lse = torch.logsumexp(z, 1)
        # same op on the same tensor when everything is annotated -> the merged bin has log prob exactly 0
        lse_m = torch.logsumexp(z.masked_fill(~merged, float("-inf")), 1)
        return lse_m - lse, z - lse.unsqueeze(1)

    x = s / tau
    s_lm, s_lc = log_bins(x)
    with torch.no_grad():
        t_lm, t_lc = log_bins(t / tau)
    kl = torch.exp(t_lm) * (t_lm - s_lm)
    kl = kl + torch.where(merged, zero, torch.exp(t_lc) * (t_lc - s_lc)).sum(1)
    return (tau ** 2) * kl.mean()


def partial_kd_sigmoid(student_logits: torch.Tensor, teacher_logits: torch.Tensor, annotated: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    r"""KD on the organ channels a sample does NOT annotate, multi-head sigmoid student (Kim et al. 2024).

    With :math:`A_{bk}` = sample ``b`` annotates channel ``k`` and ``N`` voxels per sample:

    .. math::

        \mathcal{L} = T^2 \frac{\sum_{b,k} (1 - A_{bk}) \sum_i \mathrm{KL}_2\big(\sigma(t_{bki}/T) \,\|\,
        \sigma(s_{bki}/T)\big)}{N \sum_{b,k} (1 - A_{bk})}

    (mean over the voxels of the unannotated (sample, channel) pairs). Annotated pairs get exactly zero gradient
    from this term; with everything annotated the loss is a graph-connected 0.

    Args:
        student_logits: ``[B, K, *spatial]``.
        teacher_logits: ``[B, K, *spatial]`` (detached inside).
        annotated: ``[B, K]`` bool.
        temperature: ``T > 0``.

    Returns:
        scalar float32 tensor (>= 0 up to rounding).
    """
    name = "partial_kd_sigmoid"
    tau = _check_temperature(temperature, name)
    s, t = _check_pair(student_logits, teacher_logits, name)
    b, k = s.shape[:2]
    a = _check_annotated(annotated, b, k, s.device, name)
    with torch.no_grad():
        t_logp, t_log1mp = F.logsigmoid(t / tau), F.logsigmoid(-t / tau)
    kl = _binary_kl(t_logp, t_log1mp, F.logsigmoid(s / tau), F.logsigmoid(-s / tau))
    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    n_vox = s[0, 0].numel()
    loss = torch.where(_spatial_view(~a, s.ndim), kl, zero).sum() / ((~a).sum() * n_vox).clamp_min(1)
    return (tau ** 2) * loss


# ----------------------------------------------------------------------------------------------------------------------
# nn.Module wrappers (hold the hyper-parameters; usable inside nnU-Net's DeepSupervisionWrapper)
# ----------------------------------------------------------------------------------------------------------------------
class RegionLogitKDSoftmaxLoss(nn.Module):
    """Module form of :func:`region_logit_kd_softmax`; ``forward(student_logits, teacher_fg_logits, valid=None,
    active=None)``."""

    def __init__(self, teacher_classes: Sequence[int], temperature: float = 1.0, weight_background: float = 1.0):
        super().__init__()
        self.teacher_classes = [int(c) for c in teacher_classes]
        self.temperature, self.weight_background = temperature, weight_background

    def forward(self, student_logits: torch.Tensor, teacher_fg_logits: torch.Tensor,
                valid: Optional[torch.Tensor] = None, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        return region_logit_kd_softmax(student_logits, teacher_fg_logits, self.teacher_classes, self.temperature,
                                       self.weight_background, valid, active)


class RegionLogitKDSigmoidLoss(nn.Module):
    """Module form of :func:`region_logit_kd_sigmoid`; ``forward(student_logits, teacher_fg_logits, valid=None,
    active=None)``."""

    def __init__(self, temperature: float = 1.0, weight_background: float = 1.0):
        super().__init__()
        self.temperature, self.weight_background = temperature, weight_background

    def forward(self, student_logits: torch.Tensor, teacher_fg_logits: torch.Tensor,
                valid: Optional[torch.Tensor] = None, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        return region_logit_kd_sigmoid(student_logits, teacher_fg_logits, self.temperature, self.weight_background,
                                       valid, active)


class FeatureKDLoss(nn.Module):
    """Module form of :func:`feature_kd_loss`; ``forward(student_features, teacher_features, region=None)``."""

    def __init__(self, kind: str = "mse", eps: float = 1e-8):
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"FeatureKDLoss: kind must be 'mse' or 'cosine', got {kind!r}")
        self.kind, self.eps = kind, eps

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor,
                region: Optional[torch.Tensor] = None) -> torch.Tensor:
        return feature_kd_loss(student_features, teacher_features, region, kind=self.kind, eps=self.eps)


class SoftLabelKDLoss(nn.Module):
    """Module form of :func:`soft_label_kd_loss`; ``forward(student_logits, teacher_probs)``."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        return soft_label_kd_loss(student_logits, teacher_probs, self.temperature)


class PartialKDSoftmaxLoss(nn.Module):
    """Module form of :func:`partial_kd_softmax`; ``forward(student_logits, teacher_logits, annotated)``."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                annotated: torch.Tensor) -> torch.Tensor:
        return partial_kd_softmax(student_logits, teacher_logits, annotated, self.temperature)


class PartialKDSigmoidLoss(nn.Module):
    """Module form of :func:`partial_kd_sigmoid`; ``forward(student_logits, teacher_logits, annotated)``."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                annotated: torch.Tensor) -> torch.Tensor:
        return partial_kd_sigmoid(student_logits, teacher_logits, annotated, self.temperature)
