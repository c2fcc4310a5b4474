"""Private helpers shared by the loss modules: shape and temperature checks, the binary KL from
log-probabilities, the batch-voxel mean of the region losses, log(1 - softmax) without cancellation. Not part of
the API."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _spatial_view(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B, C] -> [B, C, 1, ..., 1] with ``ndim`` dims in total."""
    return a.reshape(*a.shape, *([1] * (ndim - 2)))


def _log_one_minus_softmax(x: torch.Tensor, lse: torch.Tensor = None, p: torch.Tensor = None) -> torch.Tensor:
    r"""Stable :math:`\log(1 - \mathrm{softmax}(x)_k) = \mathrm{logsumexp}_{j \neq k} x_j - \mathrm{logsumexp}_j x_j`
    for every channel ``k`` of ``x`` ``[B, C, *spatial]`` (C >= 2), without ``C`` masked copies of the logits.

    For the arg-max channel the exclusive logsumexp is computed directly (one masked copy); for every other channel
    ``p_k <= 1/2`` so ``log1p(-p_k)`` is accurate. The unused branch is clamped so that ``torch.where`` never
    back-propagates inf/NaN. ``lse`` (``logsumexp(x, 1, keepdim=True)``) and ``p`` (``softmax(x, 1)``) may be passed
    in when already computed. The result is finite for finite ``x``.
    """
    if lse is None:
        lse = torch.logsumexp(x, 1, keepdim=True)
    if p is None:
        p = torch.exp(x - lse)
    is_top = torch.zeros_like(x, dtype=torch.bool).scatter_(1, x.argmax(1, keepdim=True), True)
    lse_wo_top = torch.logsumexp(x.masked_fill(is_top, float("-inf")), 1, keepdim=True)
    other = torch.log1p(-p.clamp(max=0.5))
    return torch.where(is_top, lse_wo_top - lse, other)



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


#: a log-probability whose exp is exactly 0 in float32 (exp(-104) already underflows to 0)
_LOG_ZERO = -200.0


def _binary_kl(t_logp: torch.Tensor, t_log1mp: torch.Tensor, s_logp: torch.Tensor,
               s_log1mp: torch.Tensor) -> torch.Tensor:
    r"""Elementwise :math:`\mathrm{KL}_2(p_t \,\|\, p_s)` from log-probabilities of both outcomes: torch's
    ``kl_div(log_target=True)`` on each outcome.

    Teacher log-probabilities may be ``-inf`` (probability 0): such terms count 0. They are clamped at
    :data:`_LOG_ZERO`, whose ``exp`` is exactly 0 in float32, so ``kl_div``'s ``exp(t) * (t - s)`` gives 0 with a zero
    gradient instead of ``0 * -inf`` (NaN). Student log-probabilities must be finite.
    """
    return (F.kl_div(s_logp, t_logp.clamp_min(_LOG_ZERO), reduction="none", log_target=True)
            + F.kl_div(s_log1mp, t_log1mp.clamp_min(_LOG_ZERO), reduction="none", log_target=True))


def _batch_voxel_mean(values: torch.Tensor, mask: torch.Tensor, n_voxels: int) -> torch.Tensor:
    """Sum of ``values`` over ``mask`` (all dims) divided by ``n_voxels``, the voxel count of the whole batch
    (``B * N``): every selected voxel weighs as one voxel of a per-voxel-mean supervised loss. Empty mask: a
    graph-connected 0."""
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    return torch.where(mask, values, zero).sum() / float(max(n_voxels, 1))

