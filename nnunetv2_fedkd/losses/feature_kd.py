r"""Feature distillation, region-masked (MS-KD) or unmasked (dual KD).

Conventions shared by every KD loss (student ``[B, C, *spatial]``, detached teachers, float32, graph-connected
zero, ``T ** 2``): see :mod:`nnunetv2_fedkd.losses`.

``feature_kd_loss``            region-masked feature distillation, squared error or cosine distance over channels.

The region losses (logit and feature) are means over ALL ``B N`` voxels of the batch, a voxel outside the region
counting 0 (not means over the region): every region voxel weighs as one voxel of a per-voxel-mean supervised loss,
whatever the size of its region.

References:
    Q. Zhao et al. "MS-KD: multi-organ segmentation with multiple binary-labeled datasets" (2022/2023).
    He et al. 2023, dual (logit + feature) knowledge distillation for partially labelled multi-organ segmentation:
    unmasked feature KD (``region=None``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nnunetv2_fedkd.losses._common import _batch_voxel_mean, _check_pair

__all__ = [
    "feature_kd_loss",
    "FeatureKDLoss",
]


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

