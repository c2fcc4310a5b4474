"""Partial-label segmentation losses: train ONE multi-organ network from datasets that each annotate only some organs.

Pure torch, no nnU-Net state. Every loss

* takes raw network outputs (logits) ``[B, C, *spatial]`` for any number of spatial dims (2D, 3D, ...),
* takes the label map ``target`` ``[B, 1, *spatial]`` (or ``[B, *spatial]``), float or integer dtype holding integer
  values (nnU-Net passes float),
* takes ``annotated``, a ``[B, C]`` (softmax) or ``[B, K]`` (sigmoid) boolean table saying which classes each sample
  of the batch annotates, so one batch may mix cases of different datasets,
* computes in float32 whatever the input dtype (fp16/bf16 logits from nnU-Net's autocast are cast with ``.float()``),
* returns a scalar float32 tensor that is always connected to ``logits`` (also when a term is empty),
* can be called once per deep-supervision scale (targets at lower scales are nearest-downsampled label maps; the
  ``annotated`` table is the same at every scale). nnU-Net's ``DeepSupervisionWrapper`` zips *every* argument, so
  pass ``[annotated] * num_scales`` alongside the lists of outputs and targets.

Convention for labels of classes a sample does not annotate: the contract is that such voxels already carry label 0
(background). If a sample nevertheless holds a label value ``c`` with ``annotated[b, c] == False`` it is treated as
background (the class is merged into background for that sample), never as a known instance of ``c``.

Losses
------
``marginal_loss``              Shi et al. 2021 marginal CE + marginal soft Dice (softmax net).
``exclusion_loss``             Shi et al. 2021 exclusion loss on the classes a case does not annotate (softmax net).
``marginal_exclusion_loss``    marginal + weight * exclusion.
``masked_sigmoid_loss``        BCE + soft Dice on annotated (sample, channel) pairs only (multi-head sigmoid net).

Reference:
    G. Shi, L. Xiao, Y. Chen, S. K. Zhou. "Marginal loss and exclusion loss for partially supervised multi-organ
    segmentation." Medical Image Analysis 70 (2021) 101979, arXiv:2007.03868.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_fedkd.losses._common import _log_one_minus_softmax, _spatial_view

__all__ = [
    "labels_to_onehot",
    "marginal_loss",
    "exclusion_loss",
    "marginal_exclusion_loss",
    "masked_sigmoid_loss",
    "MarginalLoss",
    "ExclusionLoss",
    "MarginalExclusionLoss",
    "MaskedSigmoidLoss",
]


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def labels_to_onehot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot encode a label map (``scatter_`` as in nnU-Net's Dice; nnU-Net exposes no plain helper).

    Args:
        target: ``[B, 1, *spatial]`` label map with integer values in ``[0, num_classes)`` (any dtype; float values
            are truncated with ``.long()`` as nnU-Net does).
        num_classes: number of channels ``C`` of the result.

    Returns:
        float32 tensor ``[B, C, *spatial]`` with ``out[b, c] = (target[b, 0] == c)``.
    """
    if target.ndim < 3 or target.shape[1] != 1:
        raise ValueError(f"labels_to_onehot: target must be [B, 1, *spatial], got {tuple(target.shape)}")
    return _onehot(target[:, 0].long(), num_classes)


def _onehot(t: torch.Tensor, num_classes: int) -> torch.Tensor:
    """long ``[B, *spatial]`` -> float32 ``[B, num_classes, *spatial]`` (no host sync, unlike ``F.one_hot``)."""
    out = torch.zeros((t.shape[0], num_classes, *t.shape[1:]), dtype=torch.float32, device=t.device)
    return out.scatter_(1, t.unsqueeze(1), 1.0)


def _check(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
           name: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes; return (float32 logits, long label map [B, *spatial], bool annotated [B, C] on logits.device)."""
    if logits.ndim < 3:
        raise ValueError(f"{name}: logits must be [B, C, *spatial] with at least one spatial dim, got "
                         f"{tuple(logits.shape)}")
    x = logits.float()
    b, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    if target.ndim == x.ndim:
        if target.shape[1] != 1:
            raise ValueError(f"{name}: target must be a label map [B, 1, *spatial], got {tuple(target.shape)} "
                             f"(one-hot targets are not supported)")
        t = target[:, 0]
    elif target.ndim == x.ndim - 1:
        t = target
    else:
        raise ValueError(f"{name}: target {tuple(target.shape)} does not match logits {tuple(x.shape)}")
    if t.shape[0] != b or tuple(t.shape[1:]) != spatial:
        raise ValueError(f"{name}: target {tuple(target.shape)} does not match logits {tuple(x.shape)}")
    t = t.long()
    a = torch.as_tensor(annotated, device=x.device)
    if a.shape != (b, c):
        raise ValueError(f"{name}: annotated must be [B, C] = {(b, c)}, got {tuple(a.shape)}")
    return x, t, a.bool()


def _zero(x: torch.Tensor) -> torch.Tensor:
    """A float32 zero that still belongs to the autograd graph of ``x`` (gradient exactly 0 for finite ``x``)."""
    return (x * 0.0).sum()


def _masked_soft_dice(intersect: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor, mask: torch.Tensor,
                      batch_dice: bool, smooth: float) -> torch.Tensor:
    """Mean soft Dice over the selected (sample, class) pairs, nnU-Net's MemoryEfficientSoftDiceLoss convention.

    ``intersect``, ``sum_pred``, ``sum_gt`` and ``mask`` are ``[B, C']``. Per (sample, class) (``batch_dice=False``)
    or per class with the sums taken over the samples whose ``mask`` is set (``batch_dice=True``):
    ``dc = (2 I + smooth) / clip(S_gt + S_pred + smooth, 1e-8)``; the mean is over selected pairs (resp. over classes
    selected in at least one sample). Unselected entries get exactly zero gradient (``torch.where``). Nothing
    selected gives a graph-connected 0 (no host sync).
    """
    zero = torch.zeros((), dtype=torch.float32, device=intersect.device)
    if batch_dice:
        intersect = torch.where(mask, intersect, zero).sum(0)
        sum_pred = torch.where(mask, sum_pred, zero).sum(0)
        sum_gt = torch.where(mask, sum_gt, zero).sum(0)
        mask = mask.any(0)
    dc = (2 * intersect + smooth) / (sum_gt + sum_pred + float(smooth)).clamp_min(1e-8)
    return torch.where(mask, dc, zero).sum() / mask.sum().clamp_min(1)


def _prepare_softmax(logits, target, annotated, name):
    """Shared checks for the softmax losses: background always annotated, unannotated labels mapped to 0."""
    x, t, a = _check(logits, target, annotated, name)
    a = a.clone()
    a[:, 0] = True  # background is always "annotated" (it absorbs the unannotated classes)
    c = x.shape[1]
    if t.device.type == "cpu" and bool(((t < 0) | (t >= c)).any()):  # on GPU: device-side assert, no sync
        raise ValueError(f"{name}: target values must lie in [0, {c - 1}]")
    # labels of classes this sample does not annotate are background for this sample
    lab_ok = torch.gather(a, 1, t.reshape(t.shape[0], -1)).view_as(t)
    t = torch.where(lab_ok, t, torch.zeros_like(t))
    return x, t, a


# ----------------------------------------------------------------------------------------------------------------------
# marginal loss
# ----------------------------------------------------------------------------------------------------------------------
def marginal_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor, batch_dice: bool = False,
                  smooth: float = 1e-5, weight_ce: float = 1.0, weight_dice: float = 1.0) -> torch.Tensor:
    r"""Marginal cross-entropy + marginal soft Dice for a softmax network trained on partially labelled data.

    After Shi et al. 2021, "Marginal loss and exclusion loss for partially supervised multi-organ segmentation"
    (Medical Image Analysis 70, 101979). A sample ``b`` annotates the class set :math:`L_b` (always containing
    background 0). Every class it does not annotate may hide behind its background label, so its probability is
    merged into background:

    .. math::

        p = \mathrm{softmax}(x), \qquad
        q_{b,0} = p_0 + \sum_{c \notin L_b} p_c, \qquad q_{b,c} = p_c \;\; (c \in L_b,\ c \neq 0)

    (classes not in :math:`L_b` are removed). The loss mirrors nnU-Net's ``DC_and_CE_loss`` (with
    ``MemoryEfficientSoftDiceLoss``, ``do_bg=False``) applied to ``q``:

    .. math::

        \mathcal{L} = w_{ce}\,\underbrace{\frac{1}{BN}\sum_{b,i} -\log q_{b, y_{bi}, i}}_{\text{CE, mean over all voxels}}
        \; + \; w_{dice}\,\Big(-\operatorname{mean}_{(b,c):\, c \in L_b,\, c \neq 0}
        \frac{2 \sum_i q_{bci} g_{bci} + s}{\max(\sum_i g_{bci} + \sum_i q_{bci} + s,\ 10^{-8})}\Big)

    with :math:`g` the one-hot target. With ``batch_dice=True`` the sums run over the voxels of all samples that
    annotate ``c`` and the mean is over the classes annotated by at least one sample. As in nnU-Net the Dice term is
    the *negative* mean Dice (not ``1 - Dice``), so the value may be negative; the gradient is the same.

    ``log q`` is computed stably on the logits:
    :math:`\log q_{b,0} = \mathrm{logsumexp}_{c \in \{0\} \cup \overline{L_b}}\, x_c - \mathrm{logsumexp}_c\, x_c`,
    :math:`\log q_{b,c} = x_c - \mathrm{logsumexp}\, x` (never by summing logits).

    When every class is annotated in every sample, ``q == p`` and the value equals nnU-Net's
    ``DC_and_CE_loss({'batch_dice': batch_dice, 'smooth': smooth, 'do_bg': False, 'ddp': False}, {}, weight_ce,
    weight_dice, dice_class=MemoryEfficientSoftDiceLoss)``.

    Args:
        logits: ``[B, C, *spatial]`` raw network output, any float dtype (computed in float32).
        target: ``[B, 1, *spatial]`` or ``[B, *spatial]`` label map, values in ``0..C-1`` (float or integer dtype).
        annotated: ``[B, C]`` bool, ``annotated[b, c]`` = sample ``b`` annotates class ``c``. Column 0 is forced
            to True. Labels of unannotated classes are treated as background.
        batch_dice: nnU-Net's batch Dice (sums over the batch, per class).
        smooth: Dice smoothing (nnU-Net uses 1e-5).
        weight_ce: weight of the CE term.
        weight_dice: weight of the Dice term.

    Returns:
        scalar float32 tensor.
    """
    x, t, a = _prepare_softmax(logits, target, annotated, "marginal_loss")
    c = x.shape[1]
    axes = tuple(range(2, x.ndim))
    a_sp = _spatial_view(a, x.ndim)

    zero_t = torch.zeros((), dtype=torch.float32, device=x.device)
    result = zero_t
    if weight_ce != 0:
        lse_all = torch.logsumexp(x, 1)  # [B, *S]
        merge = ~a_sp
        merge[:, 0] = True  # {0} U (not L_b)
        lse_bg = torch.logsumexp(x.masked_fill(~merge, float("-inf")), 1)  # background always present -> finite
        x_lab = torch.gather(x, 1, t.unsqueeze(1))[:, 0]
        log_q = torch.where(t == 0, lse_bg, x_lab) - lse_all
        result = result + weight_ce * (-log_q.mean())

    if weight_dice != 0:
        p = torch.softmax(x, 1)[:, 1:]
        with torch.no_grad():
            g = _onehot(t, c)[:, 1:]
            sum_gt = g.sum(axes)
        intersect = (p * g).sum(axes)
        sum_pred = p.sum(axes)
        result = result + weight_dice * (-_masked_soft_dice(intersect, sum_pred, sum_gt, a[:, 1:], batch_dice,
                                                              smooth))

    return result if result.requires_grad or not x.requires_grad else result + _zero(x)


# ----------------------------------------------------------------------------------------------------------------------
# exclusion loss
# ----------------------------------------------------------------------------------------------------------------------


def exclusion_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor, smooth: float = 1e-5,
                   log_weight: float = 1.0) -> torch.Tensor:
    r"""Exclusion loss for a softmax network trained on partially labelled data.

    After Shi et al. 2021 (Medical Image Analysis 70, 101979, Sec. 2.3 "exclusion loss"; arXiv:2007.03868): organs
    are mutually exclusive, so a voxel that sample ``b`` labels as one of its annotated organs is known *not* to
    belong to any class the sample does not annotate. The exclusion loss penalises the segmentation of the
    **unannotated** classes on the labelled organs ("the dissimilarity between labeled organs and the estimated
    segmentation of unlabelled organs"); the annotated classes are already supervised by the marginal loss, so they
    get no exclusion term. For sample ``b`` with annotated class set :math:`L_b` (background 0 included) and a
    foreground class :math:`k \notin L_b` the exclusion region is

    .. math::  E_{b,k} = \{ i : y_{bi} \in L_b \setminus \{0\} \}

    and, with :math:`p = \mathrm{softmax}(x)`,

    .. math::

        \ell_{b,k} = \frac{2 \sum_i p_{bki} E_{bki} + s}{\sum_i p_{bki} + \sum_i E_{bki} + s}
        \; + \; \lambda_{\log} \frac{1}{|E_{b,k}|} \sum_{i \in E_{b,k}} -\log(1 - p_{bki}),
        \qquad
        \mathcal{L} = \operatorname{mean}_{(b,k):\, k \notin L_b,\ |E_{b,k}| > 0}\ \ell_{b,k}

    (the Dice *overlap* of the prediction with the region it must avoid, plus a CE-like term; the denominator's
    :math:`\sum_i p_{bki}` runs over all voxels). The paper writes the CE-like term as
    :math:`\sum_i E_{bki} \log(p_{bki} + \epsilon)`; we use :math:`-\log(1 - p)` instead, which has the same
    minimiser (:math:`p_k \to 0` on :math:`E`), is bounded below by 0 and needs no epsilon:
    :math:`\log(1 - p_k) = \mathrm{logsumexp}_{j \neq k} x_j - \mathrm{logsumexp}_j x_j`, computed stably.
    Returns a graph-connected zero when no (b, k) qualifies: no foreground label in the batch, every sample
    annotating every class (fully labelled data: the term vanishes), or fewer than two foreground classes.

    Args:
        logits: ``[B, C, *spatial]`` raw network output, any float dtype (computed in float32).
        target: ``[B, 1, *spatial]`` or ``[B, *spatial]`` label map, values in ``0..C-1``.
        annotated: ``[B, C]`` bool (column 0 forced True). Only the classes a sample does NOT annotate get an
            exclusion term; labels of unannotated classes count as background and therefore belong to no exclusion
            region.
        smooth: smoothing of the exclusion Dice.
        log_weight: weight :math:`\lambda_{\log}` of the CE-like term.

    Returns:
        scalar float32 tensor (>= 0).
    """
    x, t, a = _prepare_softmax(logits, target, annotated, "exclusion_loss")
    c = x.shape[1]
    if c < 3:  # fewer than two foreground classes: no exclusion region can exist
        return _zero(x)
    axes = tuple(range(2, x.ndim))
    with torch.no_grad():
        # labels of unannotated classes are already 0 (_prepare_softmax), so every foreground voxel carries an
        # annotated organ: E_{b,k} is the sample's whole labelled foreground, for each unannotated class k
        e = (t > 0).unsqueeze(1).to(torch.float32).expand(-1, c - 1, *t.shape[1:])  # [B, C-1, *S]
        sum_e = e.sum(axes)  # [B, C-1]
        valid = (sum_e > 0) & ~a[:, 1:]  # only (b, k) with k not annotated by sample b

    lse = torch.logsumexp(x, 1, keepdim=True)
    p_all = torch.exp(x - lse)
    p = p_all[:, 1:]
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    ell = (2 * (p * e).sum(axes) + smooth) / (p.sum(axes) + sum_e + smooth)
    if log_weight != 0:
        log1m = _log_one_minus_softmax(x, lse, p_all)[:, 1:]  # finite everywhere, so the 0/1 mask can multiply
        ce = -(log1m * e).sum(axes) / sum_e.clamp_min(1.0)
        ell = ell + log_weight * ce
    return torch.where(valid, ell, zero).sum() / valid.sum().clamp_min(1)


def marginal_exclusion_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                            batch_dice: bool = False, smooth: float = 1e-5, weight_ce: float = 1.0,
                            weight_dice: float = 1.0, exclusion_weight: float = 1.0,
                            log_weight: float = 1.0) -> torch.Tensor:
    r"""``marginal_loss(...) + exclusion_weight * exclusion_loss(...)`` (Shi et al. 2021).

    See :func:`marginal_loss` and :func:`exclusion_loss` for formulas and shape contracts; ``smooth`` is used by
    both terms. ``exclusion_weight=0`` skips the exclusion term.
    """
    loss = marginal_loss(logits, target, annotated, batch_dice=batch_dice, smooth=smooth, weight_ce=weight_ce,
                         weight_dice=weight_dice)
    if exclusion_weight != 0:
        loss = loss + exclusion_weight * exclusion_loss(logits, target, annotated, smooth=smooth,
                                                        log_weight=log_weight)
    return loss


# ----------------------------------------------------------------------------------------------------------------------
# masked sigmoid (multi-head) loss
# ----------------------------------------------------------------------------------------------------------------------
def masked_sigmoid_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor, batch_dice: bool = False,
                        smooth: float = 1e-5, weight_bce: float = 1.0, weight_dice: float = 1.0) -> torch.Tensor:
    r"""BCE + soft Dice restricted to the annotated (sample, channel) pairs of a multi-head sigmoid network.

    For networks with one independent sigmoid output per organ (no background channel), as in the multi-head U-Net
    of Kim et al. 2024 (Medical Image Analysis, federated knowledge distillation from partially labelled sites),
    DoDNet (Zhang et al., CVPR 2021) and MultiTalent (Ulrich et al., MICCAI 2023): channel ``k`` predicts the region
    :math:`g_{bk} = [y_b = k + 1]` and is supervised only in samples that annotate organ ``k``
    (:math:`A_{bk} = 1`). With :math:`\sigma` the sigmoid and ``N`` voxels per sample:

    .. math::

        \mathcal{L} = w_{bce} \frac{\sum_{b,k} A_{bk} \sum_i \mathrm{BCE}(x_{bki}, g_{bki})}{N \sum_{b,k} A_{bk}}
        \; + \; w_{dice}\Big(-\operatorname{mean}_{(b,k):\,A_{bk}}
        \frac{2 \sum_i \sigma(x_{bki}) g_{bki} + s}{\max(\sum_i g_{bki} + \sum_i \sigma(x_{bki}) + s,\ 10^{-8})}\Big)

    (nnU-Net's ``MemoryEfficientSoftDiceLoss`` with ``do_bg=True``; with ``batch_dice=True`` the sums run over the
    annotating samples and the mean over channels annotated by at least one sample). Unannotated pairs receive
    exactly zero gradient. As in nnU-Net the Dice term is the negative mean Dice, so the value may be negative.
    With everything annotated the value equals nnU-Net's ``DC_and_BCE_loss({}, {'batch_dice': batch_dice,
    'do_bg': True, 'smooth': smooth, 'ddp': False}, dice_class=MemoryEfficientSoftDiceLoss)`` on the region one-hot
    target. Returns a graph-connected zero when nothing is annotated.

    Args:
        logits: ``[B, K, *spatial]`` one channel per organ, any float dtype (computed in float32).
        target: ``[B, 1, *spatial]`` or ``[B, *spatial]`` label map with organ ``k`` (0-based channel) as value
            ``k + 1`` and 0 for background / unannotated organs; or nnU-Net's region one-hot ``[B, K, *spatial]``
            (for K > 1; with K = 1 both forms coincide).
        annotated: ``[B, K]`` bool, ``annotated[b, k]`` = sample ``b`` annotates organ channel ``k``.
        batch_dice: nnU-Net's batch Dice.
        smooth: Dice smoothing (nnU-Net uses 1e-5).
        weight_bce: weight of the BCE term.
        weight_dice: weight of the Dice term.

    Returns:
        scalar float32 tensor.
    """
    if target.ndim == logits.ndim and target.shape[1] == logits.shape[1] > 1:
        # nnU-Net's region one-hot target [B, K, *spatial] (what its transforms make for region training)
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(f"masked_sigmoid_loss: region target {tuple(target.shape)} does not match logits "
                             f"{tuple(logits.shape)}")
        x, _, a = _check(logits, target[:, :1], annotated, "masked_sigmoid_loss")
        k = x.shape[1]
        g = target.detach().float()
    else:
        x, t, a = _check(logits, target, annotated, "masked_sigmoid_loss")
        k = x.shape[1]
        if t.device.type == "cpu" and bool(((t < 0) | (t > k)).any()):  # on GPU: device-side assert, no sync
            raise ValueError(f"masked_sigmoid_loss: target values must lie in [0, {k}]")
        with torch.no_grad():
            g = _onehot(t, k + 1)[:, 1:]  # region k = (target == k + 1)
    axes = tuple(range(2, x.ndim))
    a_sp = _spatial_view(a, x.ndim)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)

    result = zero
    if weight_bce != 0:
        bce = F.binary_cross_entropy_with_logits(x, g, reduction="none")
        n_vox = x[0, 0].numel()
        bce = torch.where(a_sp, bce, zero).sum() / (a.sum() * n_vox).clamp_min(1)
        result = result + weight_bce * bce
    if weight_dice != 0:
        s = torch.sigmoid(x)
        with torch.no_grad():
            sum_gt = g.sum(axes)
        intersect = (s * g).sum(axes)
        sum_pred = s.sum(axes)
        result = result + weight_dice * (-_masked_soft_dice(intersect, sum_pred, sum_gt, a, batch_dice, smooth))
    return result if result.requires_grad or not x.requires_grad else result + _zero(x)


# ----------------------------------------------------------------------------------------------------------------------
# nn.Module wrappers
# ----------------------------------------------------------------------------------------------------------------------
class MarginalLoss(nn.Module):
    """Module form of :func:`marginal_loss`; ``forward(logits, target, annotated)``."""

    def __init__(self, batch_dice: bool = False, smooth: float = 1e-5, weight_ce: float = 1.0,
                 weight_dice: float = 1.0):
        super().__init__()
        self.batch_dice, self.smooth = batch_dice, smooth
        self.weight_ce, self.weight_dice = weight_ce, weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        return marginal_loss(logits, target, annotated, batch_dice=self.batch_dice, smooth=self.smooth,
                             weight_ce=self.weight_ce, weight_dice=self.weight_dice)


class ExclusionLoss(nn.Module):
    """Module form of :func:`exclusion_loss`; ``forward(logits, target, annotated)``."""

    def __init__(self, smooth: float = 1e-5, log_weight: float = 1.0):
        super().__init__()
        self.smooth, self.log_weight = smooth, log_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        return exclusion_loss(logits, target, annotated, smooth=self.smooth, log_weight=self.log_weight)


class MarginalExclusionLoss(nn.Module):
    """Module form of :func:`marginal_exclusion_loss`; ``forward(logits, target, annotated)``.

    ``exclusion=False`` (or ``exclusion_weight=0``) gives the plain marginal loss.
    """

    def __init__(self, batch_dice: bool = False, smooth: float = 1e-5, weight_ce: float = 1.0,
                 weight_dice: float = 1.0, exclusion_weight: float = 1.0, exclusion: bool = True,
                 log_weight: float = 1.0):
        super().__init__()
        self.batch_dice, self.smooth = batch_dice, smooth
        self.weight_ce, self.weight_dice = weight_ce, weight_dice
        self.exclusion_weight = exclusion_weight if exclusion else 0.0
        self.log_weight = log_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        return marginal_exclusion_loss(logits, target, annotated, batch_dice=self.batch_dice, smooth=self.smooth,
                                       weight_ce=self.weight_ce, weight_dice=self.weight_dice,
                                       exclusion_weight=self.exclusion_weight, log_weight=self.log_weight)


class MaskedSigmoidLoss(nn.Module):
    """Module form of :func:`masked_sigmoid_loss`; ``forward(logits, target, annotated)``."""

    def __init__(self, batch_dice: bool = False, smooth: float = 1e-5, weight_bce: float = 1.0,
                 weight_dice: float = 1.0):
        super().__init__()
        self.batch_dice, self.smooth = batch_dice, smooth
        self.weight_bce, self.weight_dice = weight_bce, weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        return masked_sigmoid_loss(logits, target, annotated, batch_dice=self.batch_dice, smooth=self.smooth,
                                   weight_bce=self.weight_bce, weight_dice=self.weight_dice)
