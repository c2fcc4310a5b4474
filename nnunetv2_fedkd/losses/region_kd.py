r"""MS-KD region-based logit distillation from binary single-organ teachers.

Conventions shared by every KD loss (student ``[B, C, *spatial]``, detached teachers, float32, graph-connected
zero, ``T ** 2``): see :mod:`nnunetv2_fedkd.losses`.

Notation: :math:`\sigma` the sigmoid, :math:`\mathrm{KL}_2(p \,\|\, q) = p \log\frac{p}{q} + (1-p)\log\frac{1-p}{1-q}`
the binary KL divergence (terms with a zero teacher probability count 0), ``N`` voxels per sample.

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

The region losses (logit and feature) are means over ALL ``B N`` voxels of the batch, a voxel outside the region
counting 0 (not means over the region): every region voxel weighs as one voxel of a per-voxel-mean supervised loss,
whatever the size of its region.

Reference:
    Q. Zhao et al. "MS-KD: multi-organ segmentation with multiple binary-labeled datasets" (2022/2023): region-based
    logit KD and region-masked feature KD from single-organ binary teachers.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_fedkd.losses._common import (_batch_voxel_mean, _binary_kl, _check_pair, _check_temperature,
                                           _log_one_minus_softmax)

__all__ = [
    "binary_teacher_logit",
    "region_logit_kd_softmax",
    "region_logit_kd_sigmoid",
    "RegionLogitKDSoftmaxLoss",
    "RegionLogitKDSigmoidLoss",
]


def binary_teacher_logit(two_class_logits: torch.Tensor) -> torch.Tensor:
    r"""Foreground logit of a 2-class softmax teacher: ``[B, 2, *spatial] -> [B, 1, *spatial]``, ``z_1 - z_0``.

    Exact: :math:`\mathrm{softmax}(z)_1 = \sigma(z_1 - z_0)`, also after dividing by a temperature. Output dtype is
    float32; the result is detached (it is a teacher output).
    """
    if two_class_logits.ndim < 3 or two_class_logits.shape[1] != 2:
        raise ValueError(f"binary_teacher_logit: expected [B, 2, *spatial], got {tuple(two_class_logits.shape)}")
    z = two_class_logits.detach().float()
    return z[:, 1:2] - z[:, 0:1]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Stable ``log(1 - exp(x))`` for ``x <= 0`` (``-inf`` at ``x = 0``); Maechler's two-branch formula."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


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

