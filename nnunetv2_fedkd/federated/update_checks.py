"""Checks of a site's update before any strategy sees it, independent of any federated-learning engine (pure torch).

Before any strategy sees an update, :func:`aggregate_round` checks its form (:func:`validate_update`) and, with
:class:`UpdateBounds`, its plausibility: the case count a site claims against what it had at planning or a cap, and
the size of its change relative to the global model (rejected or clipped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, Mapping, Optional, Tuple

import torch

from nnunetv2_fedkd.federated.site_side import SiteUpdate, Weights, _more



class UpdateRejected(Exception):
    """A site's update cannot be aggregated. ``site``: the site; ``reason``: why (names the first offending key);
    ``key``: that key, or None when the problem is not about one key."""

    def __init__(self, site: str, reason: str, key: Optional[str] = None):
        self.site = site
        self.reason = reason
        self.key = key
        super().__init__(f"update from site {site!r} rejected: {reason}")


def validate_update(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], site: str, *,
                    check_finite: bool = True) -> None:
    """Check that ``update`` can be aggregated with ``reference`` (the current global weights).

    Rejects, raising :class:`UpdateRejected` that names ``site`` and the first offending key: missing keys, extra
    keys, non-tensor or non-dense values, a different shape or dtype, and (``check_finite``) NaN/Inf in a
    floating-point tensor. Integer and bool buffers (e.g. ``num_batches_tracked``) are allowed.
    """
    if not isinstance(update, Mapping):
        raise UpdateRejected(site, f"weights are a {type(update).__name__}, not a mapping of names to tensors")
    missing = [k for k in reference if k not in update]
    if missing:
        raise UpdateRejected(site, f"missing key {missing[0]!r}{_more(missing)}", missing[0])
    extra = [k for k in update if k not in reference]
    if extra:
        raise UpdateRejected(site, f"unexpected key {extra[0]!r}{_more(extra)}", extra[0])
    for key, ref in reference.items():
        value = update[key]
        if not isinstance(value, torch.Tensor):
            raise UpdateRejected(site, f"value of {key!r} is a {type(value).__name__}, not a tensor", key)
        if value.layout != torch.strided:
            raise UpdateRejected(site, f"value of {key!r} is a {value.layout} tensor, not a dense one", key)
        if value.shape != ref.shape:
            raise UpdateRejected(site, f"shape of {key!r} is {tuple(value.shape)}, expected {tuple(ref.shape)}", key)
        if value.dtype != ref.dtype:
            raise UpdateRejected(site, f"dtype of {key!r} is {value.dtype}, expected {ref.dtype}", key)
        if check_finite and value.is_floating_point():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int(finite.numel() - int(finite.sum()))
                raise UpdateRejected(site, f"{key!r} holds {bad} non-finite value(s) (NaN/Inf)", key)


def _check_num_examples(update: SiteUpdate) -> None:
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UpdateRejected(update.site, f"num_examples must be a positive integer, got {n!r}")


#: default of :attr:`UpdateBounds.max_update_ratio`: a site's model ten times farther from the global model than the
#: global model is from zero. Honest local training moves a model by a fraction of its norm per round (every round's
#: record lists the accepted sites' ratios, ``update_ratios``), so 10 only catches broken or hostile updates
DEFAULT_MAX_UPDATE_RATIO = 10.0


def update_ratio(weights: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor],
                 skip: Collection[str] = (), global_norm: Optional[float] = None) -> float:
    """``||w - g||_2 / ||g||_2`` over the floating-point keys not in ``skip`` (computed in float64); ``inf`` when
    ``g`` is zero and ``w`` is not, 0 when both are. nnU-Net's aliased keys count once per name in both norms."""
    num = 0.0
    den = 0.0 if global_norm is None else None
    for key, g in global_weights.items():
        if key in skip or not g.is_floating_point():
            continue
        g64 = g.detach().to("cpu", torch.float64)
        num += float((weights[key].detach().to("cpu", torch.float64) - g64).pow(2).sum())
        if den is not None:
            den += float(g64.pow(2).sum())
    gn = math.sqrt(den) if den is not None else float(global_norm)
    if gn == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num) / gn


@dataclass(frozen=True)
class UpdateBounds:
    """Plausibility bounds on a site's update, checked by :func:`aggregate_round` after the form checks and before
    the strategy aggregates: one site must not dominate (a case count it cannot have) or destroy (an absurdly large
    change) the global model.

    Attributes:
        site_cases: the most training cases each site can claim, by site name (the cases it contributed to the
            federation's fingerprint when the federation was planned); a site not listed is not bounded by it.
        max_num_examples: a cap on every site's ``num_examples`` (None: no cap).
        max_update_ratio: the most ``||w_site - w_global|| / ||w_global||`` (:func:`update_ratio`, over the keys the
            strategy aggregates: FedBN's local keys are skipped) an update may have; None: unbounded. Not checked
            while the global model is all zeros.
        large_updates: what to do with an update beyond ``max_update_ratio``: ``"reject"`` (drop it, logged) or
            ``"clip"`` (scale its change ``w_site - w_global`` down to ``max_update_ratio * ||w_global||``).
    """

    site_cases: Mapping[str, int] = field(default_factory=dict)
    max_num_examples: Optional[int] = None
    max_update_ratio: Optional[float] = DEFAULT_MAX_UPDATE_RATIO
    large_updates: str = "reject"

    def __post_init__(self):
        if self.large_updates not in ("reject", "clip"):
            raise ValueError(f"large_updates must be 'reject' or 'clip', got {self.large_updates!r}")
        r = self.max_update_ratio
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)
                              or r <= 0):
            raise ValueError(f"max_update_ratio must be a finite number > 0 or None, got {r!r}")
        for label, n in [("max_num_examples", self.max_num_examples), *self.site_cases.items()]:
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"case bound {label!r} must be a positive integer, got {n!r}")

    def record(self) -> Dict[str, Any]:
        """JSON-serialisable settings (for run records)."""
        return {"site_cases": dict(self.site_cases), "max_num_examples": self.max_num_examples,
                "max_update_ratio": self.max_update_ratio, "large_updates": self.large_updates}

    def apply(self, update: SiteUpdate, global_weights: Mapping[str, torch.Tensor], skip: Collection[str] = (),
              global_norm: Optional[float] = None) -> Tuple[SiteUpdate, Optional[str], Optional[float]]:
        """``(update, note, ratio)``: the update as it may be aggregated (clipped, with a note saying so) and its
        :func:`update_ratio` (None when not checked), or :class:`UpdateRejected` naming the site, what it sent and the
        bound. ``global_norm``: ``||w_global||`` over
        the same keys, when the caller computed it once for the round."""
        n = update.num_examples
        planned = self.site_cases.get(update.site)
        if planned is not None and n > planned:
            raise UpdateRejected(update.site, f"claims {n} training cases, more than the {planned} it had when the "
                                              f"federation was planned")
        if self.max_num_examples is not None and n > self.max_num_examples:
            raise UpdateRejected(update.site, f"claims {n} training cases, more than the cap max_num_examples="
                                              f"{self.max_num_examples}")
        if self.max_update_ratio is None:
            return update, None, None
        if global_norm is None:
            global_norm = _norm(global_weights, skip)
        if global_norm == 0.0:
            return update, None, None
        ratio = update_ratio(update.weights, global_weights, skip, global_norm)
        if ratio <= self.max_update_ratio:
            return update, None, ratio
        if self.large_updates == "reject":
            raise UpdateRejected(update.site, f"its change is {ratio:.3g} times the norm of the global model, more "
                                              f"than max_update_ratio={self.max_update_ratio:g}")
        scale = self.max_update_ratio / ratio
        clipped: Weights = {}
        for key, g in global_weights.items():
            w = update.weights[key]
            if key in skip or not g.is_floating_point():
                clipped[key] = w
                continue
            g64 = g.detach().to("cpu", torch.float64)
            clipped[key] = (g64 + (w.detach().to("cpu", torch.float64) - g64) * scale).to(g.dtype)
        note = (f"the update of site {update.site!r} changes the global model by {ratio:.3g} times its norm; clipped "
                f"to max_update_ratio={self.max_update_ratio:g}")
        return SiteUpdate(update.site, clipped, update.num_examples, update.metrics, update.organs), note, ratio


def _norm(weights: Mapping[str, torch.Tensor], skip: Collection[str] = ()) -> float:
    return math.sqrt(sum(float(t.detach().to("cpu", torch.float64).pow(2).sum()) for k, t in weights.items()
                         if k not in skip and t.is_floating_point()))
