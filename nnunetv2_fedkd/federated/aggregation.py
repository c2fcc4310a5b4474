"""Server-side aggregation for federated nnU-Net training, independent of any federated-learning engine.

Pure torch; no Flower (or other engine) import. A runner (Flower, a simulation loop, ...) moves weights between the
sites and calls into this module once per round.

Conventions
-----------
* Weights are a plain ``Dict[str, torch.Tensor]`` (a ``state_dict``) on the CPU, in the key order of the model.
* Floating-point tensors are averaged in float64 and cast back to their dtype (fp16/bf16 safe). All other tensors
  (integer/bool buffers such as BatchNorm's ``num_batches_tracked``) are not averaged: they are **copied from the first
  contributing update** (in the order the updates are given). nnU-Net's InstanceNorm keeps no such buffers.
* nnU-Net's ``state_dict`` holds aliases: ``...convs.0.all_modules.1.weight`` is the same tensor as
  ``...convs.0.norm.weight`` and ``decoder.encoder.*`` is ``encoder.*``. Every rule here treats a key by its own name
  and values, so aliases receive identical results and reload consistently.

Strategies
----------
All share :class:`Strategy`: ``aggregate(global_weights, updates, round_idx) -> new global weights`` plus
``state_dict()`` / ``load_state_dict()`` of the server-side state (flat ``Dict[str, Tensor]``, so it can be saved with
:func:`nnunetv2_fedkd.federated.weights_io.save_weights`).

``FedAvg``   weighted mean of the site models (McMahan et al. 2017); ``weighting="cases"`` (by ``num_examples``) or
             ``"equal"``.
``FedProx``  server side identical to FedAvg; sites add :func:`proximal_term` to their loss (Li et al. 2020).
``FedBN``    FedAvg except normalisation layers, which are never averaged (Li et al. 2021): the global copy is kept
             and each site keeps its own (:func:`split_local_state` / :func:`merge_local_state`).
``FedOpt``   the mean update ``avg - global`` is a pseudo-gradient for a server optimiser (Reddi et al. 2021):
             ``FedAvgM`` (server momentum, Hsu et al. 2019), ``FedAdam``, and through ``optimizer=`` also FedAdagrad
             and FedYogi.
``median``   coordinate-wise median of the site models (Yin et al. 2018); robust to a minority of arbitrary updates.
``trimmed_mean`` coordinate-wise mean after dropping the ``k`` largest and ``k`` smallest site values of every
             coordinate, ``k = min(ceil(beta * n), (n - 1) // 2)`` (Yin et al. 2018).

Before any strategy sees an update, :func:`aggregate_round` checks its form (:func:`validate_update`) and, with
:class:`UpdateBounds`, its plausibility: the case count a site claims against what it had at planning or a cap, and
the size of its change relative to the global model (rejected or clipped).

Every strategy takes ``organ_aware_heads``: the weights of organ ``k``'s segmentation head are averaged only over the
sites that label organ ``k`` (after Fed-MENU, Xu et al. 2023); see :class:`Strategy`.

References:
    H. B. McMahan et al. "Communication-efficient learning of deep networks from decentralized data." AISTATS 2017.
    T. Li et al. "Federated optimization in heterogeneous networks." MLSys 2020 (FedProx).
    X. Li et al. "FedBN: Federated learning on non-IID features via local batch normalization." ICLR 2021.
    S. J. Reddi et al. "Adaptive federated optimization." ICLR 2021 (FedOpt, FedAdam, FedYogi, FedAdagrad).
    T.-M. H. Hsu, H. Qi, M. Brown. "Measuring the effects of non-identical data distribution for federated visual
    classification." arXiv:1909.06335, 2019 (FedAvgM).
    X. Xu et al. "Federated multi-organ segmentation with inconsistent labels." IEEE TMI 42(10), 2023 (Fed-MENU).
    D. Yin et al. "Byzantine-robust distributed learning: towards optimal statistical rates." ICML 2018 (median,
    trimmed mean).
"""
from __future__ import annotations

import inspect
import logging
import math
import re
from dataclasses import dataclass, field, replace
from typing import (Any, Callable, Collection, Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple,
                    Union)

import torch
from torch import nn

from nnunetv2_fedkd.federated.site_side import (  # noqa: F401  (re-exported: the server side uses them too)
    NORM_MODULE_TYPES,
    SiteUpdate,
    _model_norm_keys,
    _more,
    federated_poly_lr,
    is_norm_key,
    merge_local_state,
    norm_keys,
    proximal_term,
    split_local_state,
)

__all__ = [
    "Weights",
    "TOO_FEW_UPDATES",
    "UpdateRejected",
    "SiteUpdate",
    "AggregationInfo",
    "RoundResult",
    "validate_update",
    "Strategy",
    "FedAvg",
    "FedProx",
    "FedBN",
    "FedOpt",
    "FedAvgM",
    "FedAdam",
    "TrimmedMean",
    "CoordinateMedian",
    "UpdateBounds",
    "DEFAULT_MAX_UPDATE_RATIO",
    "update_ratio",
    "STRATEGIES",
    "make_strategy",
    "aggregate_round",
    "proximal_term",
    "is_norm_key",
    "norm_keys",
    "NORM_MODULE_TYPES",
    "split_local_state",
    "merge_local_state",
    "organ_head_mapper",
    "federated_poly_lr",
]

Weights = Dict[str, torch.Tensor]
HeadOrganFn = Callable[[str], Optional[str]]
LogTarget = Union[None, logging.Logger, Callable[[str], Any]]

_LOG = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# updates and their validation
# ----------------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------------
# organ heads
# ----------------------------------------------------------------------------------------------------------------------
_HEAD_KEY = re.compile(r"(?:^|\.)heads\.(\d+)\.")


def organ_head_mapper(organ_names: Sequence[str]) -> HeadOrganFn:
    """``key -> organ name or None`` for :class:`nnunetv2_fedkd.networks.OrganHeads` naming: a key containing
    ``heads.<k>.`` (``decoder.seg_layers.<s>.heads.<k>.<...>``) belongs to ``organ_names[k]``. With
    ``nnUNetTrainerMultiHead`` head ``k`` is the ``k``-th foreground label in order of label value."""
    if isinstance(organ_names, str):
        raise TypeError("organ_head_mapper: organ_names must be a sequence of names, not a string")
    names = [str(n) for n in organ_names]
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"organ_head_mapper: organ names must be non-empty and unique, got {names}")

    def head_organ(key: str) -> Optional[str]:
        m = _HEAD_KEY.search(key)
        if m is None:
            return None
        k = int(m.group(1))
        if k >= len(names):
            raise ValueError(f"weight {key!r} belongs to organ head {k}, but only {len(names)} organ names are "
                             f"configured ({names})")
        return names[k]

    return head_organ


# ----------------------------------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class AggregationInfo:
    """What a strategy did beyond averaging: ``kept_keys``: keys left at their global value (FedBN norm keys,
    heads of organs no site labels); ``heads_kept``: organs whose head no site of the round labels."""

    kept_keys: FrozenSet[str] = frozenset()
    heads_kept: Tuple[str, ...] = ()


class Strategy:
    """Base of all strategies: (organ-aware) weighted averaging followed by a server step.

    Args:
        weighting: ``"cases"``: site ``i`` gets weight ``num_examples_i / sum(num_examples)``; ``"equal"``: ``1/n``.
        organ_aware_heads: None (off), a sequence of organ names (head ``k`` is ``organ_names[k]``, see
            :func:`organ_head_mapper`) or a callable ``key -> organ name or None``. When on, a key of organ ``o``'s
            head is averaged over the sites whose ``organs`` contain ``o`` only (weighted among them by
            ``weighting``); if no site of the round labels ``o``, the key keeps its global value. Other keys are
            averaged over all sites. Keys a strategy keeps local (FedBN) stay local, also inside heads.

    Subclasses override :meth:`local_keys` (keys never averaged) and :meth:`_server_step` (what to do with the
    average), and keep hyperparameters keyword-only in ``__init__`` (``make_strategy`` checks options against it).
    """

    name = "base"
    proximal_mu = 0.0  # FedProx: the mu a site's trainer passes to proximal_term (0 = no proximal term)
    # the weighted mean folds one update at a time (RunningMean: memory O(model), whatever the number of sites);
    # False for the order statistics (median, trimmed mean), which need every site's value of a coordinate at once
    streaming = True

    def __init__(self, *, weighting: str = "cases",
                 organ_aware_heads: Union[None, Sequence[str], HeadOrganFn] = None):
        if weighting not in ("cases", "equal"):
            raise ValueError(f"{self.name}: weighting must be 'cases' or 'equal', got {weighting!r}")
        self.weighting = weighting
        if organ_aware_heads is None:
            self.head_organ_of: Optional[HeadOrganFn] = None
            heads_desc: Any = None
        elif callable(organ_aware_heads):
            self.head_organ_of = organ_aware_heads
            heads_desc = getattr(organ_aware_heads, "__name__", "custom")
        else:
            self.head_organ_of = organ_head_mapper(organ_aware_heads)
            heads_desc = list(organ_aware_heads)
        self._hparams: Dict[str, Any] = {"weighting": weighting, "organ_aware_heads": heads_desc}

    # --- interface ---------------------------------------------------------------------------------------------------
    def local_keys(self, weights: Mapping[str, torch.Tensor]) -> FrozenSet[str]:
        """Keys of ``weights`` that are never averaged: the server keeps their global value, each site its own."""
        return frozenset()

    def aggregate(self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[SiteUpdate],
                  round_idx: int) -> Weights:
        """New global weights from the (already validated, see :func:`aggregate_round`) ``updates``."""
        return self.aggregate_detailed(global_weights, updates, round_idx)[0]

    def aggregate_detailed(self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[SiteUpdate],
                           round_idx: int) -> Tuple[Weights, AggregationInfo]:
        """:meth:`aggregate` plus an :class:`AggregationInfo`. Checks structure (keys/shapes/dtypes, raising
        :class:`UpdateRejected`) but not finiteness; :func:`aggregate_round` validates fully and drops bad updates."""
        if not updates:
            raise ValueError(f"{self.name}: no updates to aggregate in round {round_idx}")
        for u in updates:
            _check_num_examples(u)
            validate_update(u.weights, global_weights, u.site, check_finite=False)
        if not self.streaming:
            averaged, kept, heads_kept = self._average(global_weights, updates)
            new = self._server_step(global_weights, averaged, kept, round_idx)
            return new, AggregationInfo(frozenset(kept), tuple(sorted(heads_kept)))
        acc = self.begin(global_weights)
        for u in updates:
            acc.fold(u)
        return self.finish(global_weights, acc, round_idx)

    def begin(self, global_weights: Mapping[str, torch.Tensor]) -> "RunningMean":
        """An empty running weighted mean of this round's site models (streaming strategies)."""
        if not self.streaming:
            raise TypeError(f"{self.name} aggregates order statistics of all the updates; it cannot fold them one by "
                            f"one (call aggregate_detailed with every update)")
        return RunningMean(self, global_weights)

    def finish(self, global_weights: Mapping[str, torch.Tensor], acc: "RunningMean", round_idx: int
               ) -> Tuple[Weights, AggregationInfo]:
        """The new global weights from the running mean of the round's (validated) updates, then the server step."""
        averaged, kept, heads_kept = acc.result(global_weights)
        new = self._server_step(global_weights, averaged, kept, round_idx)
        return new, AggregationInfo(frozenset(kept), tuple(sorted(heads_kept)))

    def site_settings(self) -> Dict[str, Any]:
        """What a site's local training must know of the strategy (sent with every round's instructions):
        ``fedprox_mu`` (FedProx proximal coefficient, 0 = none) and ``local_keys`` (``"norm"``: FedBN)."""
        return {"fedprox_mu": self.proximal_mu, "local_keys": "none"}

    def state_dict(self) -> Weights:
        """Server-side state to checkpoint (flat dict of tensors; empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no server state, but the given state has keys "
                             f"{sorted(state)[:5]}")

    def hyperparameters(self) -> Dict[str, Any]:
        """Name and settings, for logs and run records."""
        return {"strategy": self.name, **self._hparams}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._hparams.items())
        return f"{type(self).__name__}({opts})"

    # --- helpers -----------------------------------------------------------------------------------------------------
    def _server_step(self, global_weights: Mapping[str, torch.Tensor], averaged: Weights, kept: Set[str],
                     round_idx: int) -> Weights:
        return averaged


def _check_heads(strategy: Strategy, organs) -> None:
    """organ_aware_heads set, but no weight key (of ``organs``: each key's organ or None) belongs to an organ head."""
    if strategy.head_organ_of is not None and not any(o is not None for o in organs):
        raise ValueError(f"{strategy.name}: organ_aware_heads is set, but no weight key belongs to an organ head "
                         f"(expected names like 'decoder.seg_layers.0.heads.0.weight')")


class RunningMean:
    """The weighted mean of a round's site models, folded in one update at a time: per weight, ``sum_i r_i w_i / sum_i r_i`` with ``r_i`` the site's case count
    (``weighting="cases"``) or 1, in float64; an organ head's weights over the sites that label the organ only (and
    kept global when none of the round does); the strategy's local keys kept global; integer tensors from the first
    contributing update. The server holds one float64 sum per weight, whatever the number of sites: an update can be
    released as soon as it is folded in."""

    def __init__(self, strategy: Strategy, global_weights: Mapping[str, torch.Tensor]):
        self.weighting = strategy.weighting
        self.local = strategy.local_keys(global_weights)
        self.group: Dict[str, Optional[str]] = {}
        for key in global_weights:
            if key not in self.local:
                self.group[key] = strategy.head_organ_of(key) if strategy.head_organ_of is not None else None
        _check_heads(strategy, self.group.values())
        self.sums: Dict[str, torch.Tensor] = {}
        self.first: Dict[str, torch.Tensor] = {}
        self.weight: Dict[Optional[str], float] = {None: 0.0}
        self.count = 0

    def fold(self, update: SiteUpdate) -> None:
        """Add one (validated) update."""
        r = 1.0 if self.weighting == "equal" else float(update.num_examples)
        self.weight[None] += r
        for organ in update.organs:
            self.weight[organ] = self.weight.get(organ, 0.0) + r
        for key, organ in self.group.items():
            if organ is not None and organ not in update.organs:
                continue
            v = update.weights[key].detach().to("cpu")
            if v.is_floating_point():
                acc = self.sums.get(key)
                if acc is None:
                    acc = self.sums[key] = torch.zeros(v.shape, dtype=torch.float64)
                acc.add_(v.to(torch.float64), alpha=r)
            elif key not in self.first:
                self.first[key] = v.clone()
        self.count += 1

    def result(self, global_weights: Mapping[str, torch.Tensor]) -> Tuple[Weights, Set[str], Set[str]]:
        """(averaged weights, keys kept global, organs whose head kept its global value)."""
        if not self.count:
            raise ValueError("no update was folded into the running mean")
        out: Weights = {}
        kept: Set[str] = set()
        heads_kept: Set[str] = set()
        for key, g in global_weights.items():
            organ = self.group.get(key)
            if key in self.local or not self.weight.get(organ, 0.0) > 0:
                out[key] = g.detach().to("cpu").clone()
                kept.add(key)
                if key not in self.local:
                    heads_kept.add(organ)
                continue
            if g.is_floating_point():
                out[key] = (self.sums[key] / self.weight[organ]).to(g.dtype)
            else:
                out[key] = self.first[key]
        return out, kept, heads_kept


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017): the new global model is the weighted mean of the site models."""

    name = "fedavg"

    def __init__(self, *, weighting: str = "cases",
                 organ_aware_heads: Union[None, Sequence[str], HeadOrganFn] = None):
        super().__init__(weighting=weighting, organ_aware_heads=organ_aware_heads)


class FedProx(FedAvg):
    """FedProx (Li et al. 2020). The server aggregates exactly as FedAvg; each site adds
    ``proximal_term(model.named_parameters(), global_weights, strategy.proximal_mu)`` to its training loss.

    Args:
        mu: proximal coefficient (>= 0; Li et al. tune it in {0.001, 0.01, 0.1, 1}).
    """

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01, weighting: str = "cases",
                 organ_aware_heads: Union[None, Sequence[str], HeadOrganFn] = None):
        super().__init__(weighting=weighting, organ_aware_heads=organ_aware_heads)
        mu = float(mu)
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"fedprox: mu must be a finite number >= 0, got {mu}")
        self.proximal_mu = mu
        self._hparams["mu"] = mu


class FedBN(FedAvg):
    """FedBN (Li et al. 2021): FedAvg on every key except those of normalisation layers, which keep their global
    value on the server; each site keeps its own between rounds (``split_local_state(site_weights,
    strategy.local_keys(site_weights))`` after training, :func:`merge_local_state` before the next one).

    Args:
        model: a model of the federated architecture; its normalisation modules define the local keys (exact).
        norm_keys: an explicit collection of local keys instead.
        Neither: keys are recognised by name (:func:`is_norm_key`).
    """

    name = "fedbn"

    def __init__(self, *, model: Optional[nn.Module] = None, norm_keys: Optional[Collection[str]] = None,
                 weighting: str = "cases", organ_aware_heads: Union[None, Sequence[str], HeadOrganFn] = None):
        super().__init__(weighting=weighting, organ_aware_heads=organ_aware_heads)
        if model is not None and norm_keys is not None:
            raise ValueError("fedbn: give model or norm_keys, not both")
        if isinstance(norm_keys, str):
            raise TypeError("fedbn: norm_keys must be a collection of key names, not a string")
        if model is not None:
            self._norm_keys: Optional[FrozenSet[str]] = _model_norm_keys(model)
            source = f"model {type(model).__name__}"
        elif norm_keys is not None:
            self._norm_keys = frozenset(norm_keys)
            source = "explicit"
        else:
            self._norm_keys = None
            source = "names"
        self._hparams["norm_keys_from"] = source

    def site_settings(self) -> Dict[str, Any]:
        return {**super().site_settings(), "local_keys": "norm"}

    def local_keys(self, weights: Mapping[str, torch.Tensor]) -> FrozenSet[str]:
        if self._norm_keys is not None:
            keys = frozenset(k for k in weights if k in self._norm_keys)
        else:
            keys = norm_keys(weights)
        if not keys:
            raise ValueError("fedbn: no normalisation keys among the weights, so FedBN would be plain FedAvg; pass "
                             "model= or norm_keys=, or use fedavg")
        return keys


_FEDOPT_OPTIMIZERS = ("momentum", "adam", "adagrad", "yogi")
_FEDOPT_DEFAULT_LR = {"momentum": 0.1, "adam": 1e-2, "adagrad": 1e-2, "yogi": 1e-2}


class FedOpt(Strategy):
    """Adaptive federated optimisation (Reddi et al. 2021, Algorithm 2). With ``delta = avg - global`` (the averaged
    site update, a pseudo-gradient pointing the way the sites moved), per floating-point key:

    * ``momentum`` (FedAvgM, Hsu et al. 2019): ``m = momentum * m + delta``; ``x += server_lr * m``.
    * ``adam``:    ``m = b1 m + (1-b1) delta``; ``v = b2 v + (1-b2) delta^2``;        ``x += lr * m / (sqrt(v) + tau)``.
    * ``adagrad``: ``m`` as adam;            ``v = v + delta^2``;                      same step.
    * ``yogi``:    ``m`` as adam;            ``v = v - (1-b2) delta^2 sign(v - delta^2)``; same step.

    ``m`` starts at 0 and ``v`` at ``tau^2`` (the paper's initialisation); no bias correction (as in the paper).
    Keys left at their global value by the averaging (FedBN norm keys, heads of organs no site labels) are not
    stepped and their moments are left untouched. Non-float keys take the averaged (copied) value.

    Args:
        optimizer: one of ``momentum``, ``adam``, ``adagrad``, ``yogi``.
        server_lr: server learning rate; default 0.1 for momentum (with momentum 0.9 the long-run step equals
            FedAvg's, ``server_lr / (1 - momentum) = 1``), 1e-2 for the adaptive ones (Reddi et al.'s range).
        momentum: FedAvgM's momentum, in [0, 1).
        beta1, beta2: moment decay rates in [0, 1) (adaptive optimisers).
        tau: adaptivity / numerical-stability constant > 0 (Reddi et al. use 1e-3).
    """

    name = "fedopt"

    def __init__(self, *, optimizer: str = "adam", server_lr: Optional[float] = None, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, weighting: str = "cases",
                 organ_aware_heads: Union[None, Sequence[str], HeadOrganFn] = None):
        super().__init__(weighting=weighting, organ_aware_heads=organ_aware_heads)
        if optimizer not in _FEDOPT_OPTIMIZERS:
            raise ValueError(f"{self.name}: optimizer must be one of {list(_FEDOPT_OPTIMIZERS)}, got {optimizer!r}")
        server_lr = _FEDOPT_DEFAULT_LR[optimizer] if server_lr is None else float(server_lr)
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"{self.name}: server_lr must be a finite number > 0, got {server_lr}")
        for label, value in (("momentum", momentum), ("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{self.name}: {label} must be in [0, 1), got {value}")
        if not (math.isfinite(float(tau)) and float(tau) > 0):
            raise ValueError(f"{self.name}: tau must be a finite number > 0, got {tau}")
        self.optimizer = optimizer
        self.server_lr = server_lr
        self.momentum = float(momentum)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)
        self._step = 0
        self._m: Weights = {}
        self._v: Weights = {}
        if optimizer == "momentum":
            self._hparams.update(optimizer=optimizer, server_lr=server_lr, momentum=self.momentum)
        else:
            self._hparams.update(optimizer=optimizer, server_lr=server_lr, beta1=self.beta1, beta2=self.beta2,
                                 tau=self.tau)

    @property
    def _adaptive(self) -> bool:
        return self.optimizer != "momentum"

    def _server_step(self, global_weights: Mapping[str, torch.Tensor], averaged: Weights, kept: Set[str],
                     round_idx: int) -> Weights:
        self._step += 1
        new: Weights = {}
        for key, g in global_weights.items():
            avg = averaged[key]
            if key in kept or not g.is_floating_point():
                new[key] = avg
                continue
            state_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
            x = g.detach().to("cpu", torch.float64)
            delta = (avg.to(torch.float64) - x).to(state_dtype)
            m = self._moment(self._m, key, g, state_dtype, 0.0)
            if not self._adaptive:
                m.mul_(self.momentum).add_(delta)
                step = m
            else:
                m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
                v = self._moment(self._v, key, g, state_dtype, self.tau ** 2)
                d2 = delta * delta
                if self.optimizer == "adam":
                    v.mul_(self.beta2).add_(d2, alpha=1.0 - self.beta2)
                elif self.optimizer == "adagrad":
                    v.add_(d2)
                else:  # yogi
                    v.sub_(d2 * torch.sign(v - d2), alpha=1.0 - self.beta2)
                step = m / (v.sqrt() + self.tau)
            new[key] = (x + self.server_lr * step.to(torch.float64)).to(g.dtype)
        return new

    def _moment(self, store: Weights, key: str, g: torch.Tensor, dtype: torch.dtype, init: float) -> torch.Tensor:
        t = store.get(key)
        if t is None:
            t = store[key] = torch.full(g.shape, init, dtype=dtype)
        elif t.shape != g.shape:
            raise ValueError(f"{self.name}: server state for {key!r} has shape {tuple(t.shape)}, the weights "
                             f"{tuple(g.shape)} (state from another model?)")
        return t

    def state_dict(self) -> Weights:
        state: Weights = {"step": torch.tensor(self._step, dtype=torch.int64)}
        state.update({f"m/{k}": t.clone() for k, t in self._m.items()})
        state.update({f"v/{k}": t.clone() for k, t in self._v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if "step" not in state:
            raise ValueError(f"{self.name}: server state has no 'step' entry")
        m: Weights = {}
        v: Weights = {}
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{self.name}: server state entry {name!r} is not a tensor")
            if name == "step":
                continue
            prefix, sep, key = name.partition("/")
            if not sep or prefix not in ("m", "v") or (prefix == "v" and not self._adaptive):
                raise ValueError(f"{self.name}: unexpected server state entry {name!r} for optimizer "
                                 f"{self.optimizer!r}")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{self.name}: server state entry {name!r} is not a finite floating-point tensor")
            (m if prefix == "m" else v)[key] = t.detach().to("cpu").clone()
        if self._adaptive and set(m) != set(v):
            odd = sorted(set(m) ^ set(v))
            raise ValueError(f"{self.name}: first and second moments cover different keys (e.g. {odd[0]!r})")
        self._step = int(state["step"])
        self._m, self._v = m, v


class FedAvgM(FedOpt):
    """FedAvg with server momentum (Hsu et al. 2019): ``FedOpt(optimizer="momentum")``."""

    name = "fedavgm"

    def __init__(self, *, server_lr: float = 0.1, momentum: float = 0.9, weighting: str = "cases",
                 organ_aware_heads: Union[None, Sequence[str], HeadOrganFn] = None):
        super().__init__(optimizer="momentum", server_lr=server_lr, momentum=momentum, weighting=weighting,
                         organ_aware_heads=organ_aware_heads)


class FedAdam(FedOpt):
    """FedAdam (Reddi et al. 2021): ``FedOpt(optimizer="adam")``."""

    name = "fedadam"

    def __init__(self, *, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 weighting: str = "cases", organ_aware_heads: Union[None, Sequence[str], HeadOrganFn] = None):
        super().__init__(optimizer="adam", server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau,
                         weighting=weighting, organ_aware_heads=organ_aware_heads)


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018): for every coordinate, the ``k`` largest and the ``k`` smallest
    of the ``n`` site values are dropped and the rest averaged with equal weights, ``k = min(ceil(beta * n),
    (n - 1) // 2)``. Up to ``k`` arbitrary (broken or hostile) site models cannot move a coordinate outside the range
    of the honest ones. Case counts are not used (a site could inflate them). Organ-aware heads trim over the sites
    that label the organ.

    Args:
        beta: the fraction trimmed at each end, in [0, 0.5).
    """

    name = "trimmed_mean"
    streaming = False

    def __init__(self, *, beta: float = 0.1, organ_aware_heads: Union[None, Sequence[str], HeadOrganFn] = None):
        super().__init__(weighting="equal", organ_aware_heads=organ_aware_heads)
        beta = float(beta)
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"{self.name}: beta must be in [0, 0.5), got {beta}")
        self.beta = beta
        self._hparams["beta"] = beta

    def trimmed(self, n: int) -> int:
        """How many site values are dropped at each end of a coordinate with ``n`` sites."""
        return min(math.ceil(self.beta * n), (n - 1) // 2)

    def _average(self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[SiteUpdate]
                 ) -> Tuple[Weights, Set[str], Set[str]]:
        """Per coordinate, the trimmed mean of the sites' values (an organ head's over the sites that label the
        organ; kept global when none does), the local keys kept global, integer tensors from the first site."""
        local = self.local_keys(global_weights)
        out: Weights = {}
        kept: Set[str] = set()
        heads_kept: Set[str] = set()
        organs: Dict[str, Optional[str]] = {}
        for key, g in global_weights.items():
            organ = organs[key] = (self.head_organ_of(key) if self.head_organ_of is not None and key not in local
                                   else None)
            members = [u for u in updates if organ is None or organ in u.organs]
            if key in local or not members:
                out[key] = g.detach().to("cpu").clone()
                kept.add(key)
                if key not in local:
                    heads_kept.add(organ)
            elif g.is_floating_point():
                out[key] = self._combine([u.weights[key] for u in members]).to(g.dtype)
            else:
                out[key] = members[0].weights[key].detach().to("cpu").clone()
        _check_heads(self, organs.values())
        return out, kept, heads_kept

    def _combine(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        n = len(values)
        k = self.trimmed(n)
        stacked = torch.stack([v.detach().to("cpu", torch.float64) for v in values])
        if k == 0:
            return stacked.mean(dim=0)
        return stacked.sort(dim=0).values[k:n - k].mean(dim=0)


class CoordinateMedian(TrimmedMean):
    """Coordinate-wise median (Yin et al. 2018): the middle site value of every coordinate (the mean of the two
    middle ones for an even number of sites), i.e. :class:`TrimmedMean` with ``k = (n - 1) // 2``."""

    name = "median"

    def __init__(self, *, organ_aware_heads: Union[None, Sequence[str], HeadOrganFn] = None):
        super().__init__(beta=0.0, organ_aware_heads=organ_aware_heads)
        del self._hparams["beta"]

    def trimmed(self, n: int) -> int:
        return (n - 1) // 2


STRATEGIES: Dict[str, type] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedbn": FedBN,
    "fedopt": FedOpt,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
}


def _option_names(cls: type) -> List[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]


def make_strategy(name: str, **options: Any) -> Strategy:
    """The strategy called ``name`` (a key of :data:`STRATEGIES`: ``fedavg``, ``fedprox``, ``fedbn``, ``fedopt``,
    ``fedavgm``, ``fedadam``, ``median``, ``trimmed_mean``; case insensitive) with ``options`` (its keyword arguments). Unknown names or options raise ValueError listing the
    accepted ones."""
    key = name.strip().lower() if isinstance(name, str) else name
    cls = STRATEGIES.get(key)
    if cls is None:
        raise ValueError(f"unknown aggregation strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    accepted = _option_names(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{key}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    return cls(**options)


# ----------------------------------------------------------------------------------------------------------------------
# one round
# ----------------------------------------------------------------------------------------------------------------------
#: the reason :func:`aggregate_round` gives for a valid update it did not aggregate (fewer than ``min_updates``)
TOO_FEW_UPDATES = "fewer valid updates than min_sites"


@dataclass
class RoundResult:
    """Outcome of :func:`aggregate_round`. ``weights``: the new global weights; ``accepted``: sites aggregated;
    ``dropped``: ``(site, reason)`` of rejected updates; ``aggregated``: False when no update survived and the
    global weights were kept; ``heads_kept``: organs whose head kept its global value (no labelling site);
    ``update_ratios``: each accepted site's :func:`update_ratio` (when :class:`UpdateBounds` checked it)."""

    weights: Weights
    round_idx: int
    strategy: str
    accepted: List[str]
    dropped: List[Tuple[str, str]]
    aggregated: bool
    heads_kept: Tuple[str, ...] = ()
    update_ratios: Dict[str, float] = field(default_factory=dict)

    def record(self) -> Dict[str, Any]:
        """JSON-serialisable summary (no weights) for run logs."""
        return {"round": self.round_idx, "strategy": self.strategy, "aggregated": self.aggregated,
                "accepted": list(self.accepted), "dropped": [{"site": s, "reason": r} for s, r in self.dropped],
                "heads_kept": list(self.heads_kept), "update_ratios": dict(self.update_ratios)}


def _emit(log: LogTarget, level: str, message: str) -> None:
    if log is None:
        getattr(_LOG, level)(message)
    elif isinstance(log, logging.Logger) or (hasattr(log, level) and callable(getattr(log, level))):
        getattr(log, level)(message)
    elif callable(log):
        log(message)
    else:
        raise TypeError(f"log must be a logging.Logger, a callable taking a string, or None; got {type(log).__name__}")


def decode_update(update: SiteUpdate, sent: Mapping[str, torch.Tensor], dtype: str) -> SiteUpdate:
    """The site's trained weights from what it sent (:func:`~nnunetv2_fedkd.federated.site_side.encode_update`) and
    the global weights the server ``sent`` it that round (:func:`~nnunetv2_fedkd.federated.site_side.
    transport_weights`): float16, ``sent + change`` in float32 (the global weights' dtype), integer tensors as
    sent; float32, the update as it is. :class:`UpdateRejected` when its keys are not the global weights' or a
    floating tensor is not in ``dtype`` (a site sending another precision than the federation's)."""
    from nnunetv2_fedkd.federated.site_side import check_transport_dtype

    target = check_transport_dtype(dtype)
    if target == torch.float32:
        return update
    keys, expected = set(update.weights), set(sent)
    if keys != expected:
        k = sorted(keys ^ expected)[0]
        raise UpdateRejected(update.site, f"{'unexpected' if k in keys else 'missing'} weight {k!r}")
    out: Dict[str, torch.Tensor] = {}
    for k, ref in sent.items():
        v = update.weights[k]
        if not isinstance(v, torch.Tensor):
            raise UpdateRejected(update.site, f"weight {k!r} is a {type(v).__name__}, not a tensor")
        if ref.is_floating_point():
            if v.dtype != target:
                raise UpdateRejected(update.site, f"weight {k!r} travels as {v.dtype}, the federation's transport is "
                                                  f"{dtype} (a site of another version or settings?)")
            if tuple(v.shape) != tuple(ref.shape):
                raise UpdateRejected(update.site, f"shape of {k!r} is {tuple(v.shape)}, expected {tuple(ref.shape)}")
            out[k] = ref.float() + v.float()
        else:
            out[k] = v
    return replace(update, weights=out)


class RoundAggregation:
    """One round's aggregation, fed one update at a time as the sites' replies arrive (both engines do so).

    :meth:`add` turns an update into weights (``decode``, e.g. :func:`decode_update` for a float16 transport),
    validates it against ``global_weights`` (:func:`validate_update`, a positive ``num_examples``, one update per
    site, and ``bounds``: :class:`UpdateBounds`), drops and logs a bad one (naming site and reason; it leaves no trace
    in the sums), and folds a good one into the strategy's running mean (:class:`RunningMean`), so the caller can
    release it: the server holds O(model) memory whatever the number of sites. The order statistics (median, trimmed
    mean) keep the valid updates until :meth:`finish`. :meth:`finish` aggregates when at least ``min_updates`` were
    valid; with fewer the strategy's server state is untouched, the global weights are kept (copied), the valid
    updates are listed as dropped with the reason :data:`TOO_FEW_UPDATES`, and the result says ``aggregated=False``.

    ``log`` is a ``logging.Logger`` (warnings for drops, info otherwise), any callable taking one string (e.g.
    nnU-Net's ``print_to_log_file``), or None (this module's logger)."""

    def __init__(self, strategy: Strategy, global_weights: Mapping[str, torch.Tensor], round_idx: int,
                 log: LogTarget = None, bounds: Optional[UpdateBounds] = None,
                 decode: Optional[Callable[[SiteUpdate], SiteUpdate]] = None):
        self.strategy, self.global_weights, self.round_idx = strategy, global_weights, round_idx
        self.log, self.bounds, self.decode = log, bounds, decode
        self.accepted: List[str] = []
        self.dropped: List[Tuple[str, str]] = []
        self.ratios: Dict[str, float] = {}
        self._skip: FrozenSet[str] = frozenset()
        self._global_norm: Optional[float] = None
        if bounds is not None and bounds.max_update_ratio is not None:
            self._skip = strategy.local_keys(global_weights)
            self._global_norm = _norm(global_weights, self._skip)
        self._acc = strategy.begin(global_weights) if strategy.streaming else None
        self._held: List[SiteUpdate] = []
        self._finished = False

    def add(self, update: SiteUpdate) -> bool:
        """Validate ``update`` and fold it in (True), or drop and log it (False)."""
        if self._finished:
            raise RuntimeError(f"round {self.round_idx}: the aggregation is finished; no more updates")
        u = update
        try:
            if u.site in self.accepted:
                raise UpdateRejected(u.site, "duplicate update: this site already sent one in this round")
            _check_num_examples(u)
            if self.decode is not None:
                u = self.decode(u)
            validate_update(u.weights, self.global_weights, u.site)
            if self.bounds is not None:
                u, note, ratio = self.bounds.apply(u, self.global_weights, self._skip, self._global_norm)
                if note:
                    _emit(self.log, "warning", f"round {self.round_idx}: {note}")
                if ratio is not None:
                    self.ratios[u.site] = round(ratio, 6)
        except UpdateRejected as e:
            self.dropped.append((e.site, e.reason))
            _emit(self.log, "warning", f"round {self.round_idx}: dropped the update of site {e.site!r}: {e.reason}")
            return False
        if self._acc is not None:
            self._acc.fold(u)
        else:
            self._held.append(u)
        self.accepted.append(u.site)
        return True

    def finish(self, min_updates: int = 1) -> RoundResult:
        if isinstance(min_updates, bool) or not isinstance(min_updates, int) or min_updates < 1:
            raise ValueError(f"min_updates must be an int >= 1, got {min_updates!r}")
        self._finished = True
        r, name = self.round_idx, self.strategy.name
        if len(self.accepted) < min_updates:
            if self.accepted:
                _emit(self.log, "warning", f"round {r}: {len(self.accepted)} valid update(s), fewer than "
                                           f"{min_updates}; the global weights are kept unchanged")
            else:
                _emit(self.log, "warning", f"round {r}: no valid update ({len(self.dropped)} dropped); the global "
                                           f"weights are kept unchanged")
            weights = {k: v.detach().to("cpu").clone() for k, v in self.global_weights.items()}
            return RoundResult(weights, r, name, [], self.dropped + [(s, TOO_FEW_UPDATES) for s in self.accepted],
                               aggregated=False)
        if self._acc is not None:
            weights, info = self.strategy.finish(self.global_weights, self._acc, r)
        else:
            weights, info = self.strategy.aggregate_detailed(self.global_weights, self._held, r)
        for organ in info.heads_kept:
            _emit(self.log, "info", f"round {r}: no site of this round labels {organ!r}; its head keeps the global "
                                    f"weights")
        sites = list(self.accepted)
        _emit(self.log, "info", f"round {r}: {name} aggregated {len(sites)} site(s): {', '.join(sites)}"
                                + (f"; dropped: {', '.join(s for s, _ in self.dropped)}" if self.dropped else ""))
        return RoundResult(weights, r, name, sites, list(self.dropped), aggregated=True, heads_kept=info.heads_kept,
                           update_ratios={s: self.ratios[s] for s in sites if s in self.ratios})


def aggregate_round(strategy: Strategy, global_weights: Mapping[str, torch.Tensor], updates: Sequence[SiteUpdate],
                    round_idx: int, log: LogTarget = None, bounds: Optional[UpdateBounds] = None,
                    min_updates: int = 1, decode: Optional[Callable[[SiteUpdate], SiteUpdate]] = None
                    ) -> RoundResult:
    """:class:`RoundAggregation` over ``updates`` given all at once: each is decoded, validated, dropped or folded
    in, then the round is aggregated when at least ``min_updates`` were valid."""
    if isinstance(min_updates, bool) or not isinstance(min_updates, int) or min_updates < 1:
        raise ValueError(f"min_updates must be an int >= 1, got {min_updates!r}")
    agg = RoundAggregation(strategy, global_weights, round_idx, log=log, bounds=bounds, decode=decode)
    for u in updates:
        agg.add(u)
    return agg.finish(min_updates)


