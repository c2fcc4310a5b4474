"""Server-side aggregation for federated nnU-Net training, independent of any federated-learning engine.

Pure torch; no Flower (or other engine) import. A runner (Flower, a simulation loop, ...) moves weights between the
sites and calls into this module once per round.

One round: each arriving update is decoded (:func:`decode_update`), checked (:mod:`.update_checks`: form,
case count, size of the change) and folded into the strategy's running sums (:mod:`.strategies`)
(:class:`RoundAggregation`; :func:`aggregate_round` for a list of updates at once). The names of both modules are
re-exported here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

import torch

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
from nnunetv2_fedkd.federated.update_checks import (  # noqa: F401  (re-exported)
    DEFAULT_MAX_UPDATE_RATIO, UpdateBounds, UpdateRejected, _check_num_examples, _norm, update_ratio, validate_update)
from nnunetv2_fedkd.federated.strategies import (  # noqa: F401  (re-exported)
    STRATEGIES, AggregationInfo, CoordinateMedian, FedAdam, FedAvg, FedAvgM, FedBN, FedOpt, FedProx, HeadOrganFn,
    RunningMean, Strategy, TrimmedMean, Weights, make_strategy, organ_head_mapper)

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


LogTarget = Union[None, logging.Logger, Callable[[str], Any]]

_LOG = logging.getLogger(__name__)


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


