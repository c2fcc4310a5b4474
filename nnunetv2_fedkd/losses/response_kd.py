r"""Response (logit) distillation from full-label-space teachers: soft labels from an ensemble, and KD from a
previous (global) model on the classes a sample does not annotate.

Conventions shared by every KD loss (student ``[B, C, *spatial]``, detached teachers, float32, graph-connected
zero, ``T ** 2``): see :mod:`nnunetv2_fedkd.losses`.

Notation: :math:`\sigma` the sigmoid, :math:`\mathrm{KL}_2(p \,\|\, q) = p \log\frac{p}{q} + (1-p)\log\frac{1-p}{1-q}`
the binary KL divergence (terms with a zero teacher probability count 0), ``N`` voxels per sample.

``soft_label_kd_loss``         :math:`T^2 \operatorname{mean}_{b,i}\mathrm{KL}(\mathrm{softmax}(\log P/T)\,\|\,
    \mathrm{softmax}(s/T))` against given teacher probabilities ``P`` (e.g. an averaged teacher ensemble).

``partial_kd_softmax``         KD from a previous (global) model on the classes a sample does not annotate: the
    annotated classes and background are merged into one bin of both distributions (Kim et al. 2024; ConDistFL).

``partial_kd_sigmoid``         the same for a multi-head sigmoid student: binary KL on the unannotated
    (sample, channel) pairs only.

References:
    G. Hinton, O. Vinyals, J. Dean. "Distilling the knowledge in a neural network." arXiv:1503.02531 (2015).
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

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_fedkd.losses._common import (_binary_kl, _check_annotated, _check_pair, _check_temperature,
                                           _spatial_view)

__all__ = [
    "teacher_probs_for_student_classes",
    "soft_label_kd_loss",
    "partial_kd_softmax",
    "partial_kd_sigmoid",
    "SoftLabelKDLoss",
    "PartialKDSoftmaxLoss",
    "PartialKDSigmoidLoss",
]


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

