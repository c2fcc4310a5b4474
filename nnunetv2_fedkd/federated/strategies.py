"""Aggregation strategies of the coordinator, independent of any federated-learning engine (pure torch).

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
import math
import re
from dataclasses import dataclass
from typing import (Any, Callable, Collection, Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple,
                    Union)

import torch
from torch import nn

from nnunetv2_fedkd.federated.site_side import SiteUpdate, Weights, _model_norm_keys, norm_keys
from nnunetv2_fedkd.federated.update_checks import _check_num_examples, validate_update

HeadOrganFn = Callable[[str], Optional[str]]


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
