"""What a site runs besides nnU-Net, and all it shares with the server: the update it sends (:class:`SiteUpdate`)
and its compact transport (:func:`encode_update`), FedBN's split of a model into shared and site-local keys, FedProx's proximal term, the federation-wide learning-rate
schedule, and the plans digest a site checks its plans against.

Site code (the trainers, :mod:`~nnunetv2_fedkd.federated.nnunet_site`, the Flower ClientApp) imports from here and
from :mod:`~nnunetv2_fedkd.federated.weights_io`, never from the server side (aggregation, the round core, the
runner, planning, the Flower ServerApp): ``tests/test_site_imports.py`` checks it. Pure torch.

References:
    T. Li et al. "Federated optimization in heterogeneous networks." MLSys 2020 (FedProx).
    X. Li et al. "FedBN: Federated learning on non-IID features via local batch normalization." ICLR 2021.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, FrozenSet, Iterable, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from nnunetv2_fedkd.federated.weights_io import plans_digest

__all__ = [
    "Weights",
    "SiteUpdate",
    "NORM_MODULE_TYPES",
    "is_norm_key",
    "norm_keys",
    "split_local_state",
    "merge_local_state",
    "proximal_term",
    "federated_poly_lr",
    "PlansMismatch",
    "normalized_plans",
    "federation_plans_digest",
    "check_site_plans",
    "TRANSPORT_DTYPES",
    "check_transport_dtype",
    "transport_weights",
    "encode_update",
    "round_seed",
]

Weights = Dict[str, torch.Tensor]


@dataclass
class SiteUpdate:
    """What one site sends back after its local training in a round.

    Attributes:
        site: the site's name (unique within a round).
        weights: its trained model weights (``state_dict``; same keys, shapes and dtypes as the global weights).
        num_examples: how many training cases it trained on (the FedAvg weight with ``weighting="cases"``);
            must be a positive integer.
        metrics: free-form numbers to log (training loss, ...); not used for aggregation.
        organs: registry keys of the organs the site labels (used by ``organ_aware_heads``).
    """

    site: str
    weights: Weights
    num_examples: int
    metrics: Dict[str, Any] = field(default_factory=dict)
    organs: FrozenSet[str] = frozenset()

    def __post_init__(self):
        if isinstance(self.organs, str):
            raise TypeError(f"SiteUpdate({self.site!r}).organs must be a collection of organ names, not the string "
                            f"{self.organs!r}")
        self.organs = frozenset(self.organs)


def _more(items: Sequence[str]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


# ----------------------------------------------------------------------------------------------------------------------
# normalisation layers (FedBN) and site-local state
# ----------------------------------------------------------------------------------------------------------------------
NORM_MODULE_TYPES: Tuple[type, ...] = tuple(
    t for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
                nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                getattr(nn, "RMSNorm", None))
    if t is not None
)

_NORM_BUFFER_LEAVES = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_NORM_MODULE_NAME = re.compile(r"^(?:.*norm.*|bn\d*|gn\d*|ln\d*)$", re.IGNORECASE)
# dynamic_network_architectures' ConvDropoutNormReLU: all_modules = Sequential(conv, [dropout], [norm], nonlin); the
# conv is always entry 0, so a parameter at entry >= 1 is the norm's (nonlin LeakyReLU has none)
_NNUNET_ALL_MODULES_ALIAS = re.compile(r"(?:^|\.)all_modules\.[1-9]\d*$")
# nnunetv2_fedkd.networks.OrganHeads with hidden channels: heads.<k> = Sequential(conv, norm, nonlin, conv)
_ORGAN_HEAD_NORM = re.compile(r"(?:^|\.)heads\.\d+\.1$")


def _model_norm_keys(model: nn.Module) -> FrozenSet[str]:
    keys: Set[str] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, NORM_MODULE_TYPES):
            for leaf, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                keys.add(f"{mod_name}.{leaf}" if mod_name else leaf)
    return frozenset(keys)


def _name_is_norm(name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    if leaf in _NORM_BUFFER_LEAVES:
        return True
    if not module:
        return False
    last = module.rpartition(".")[2]
    return bool(_NORM_MODULE_NAME.match(last) or _NNUNET_ALL_MODULES_ALIAS.search(module)
                or _ORGAN_HEAD_NORM.search(module))


def is_norm_key(name: str, model: Optional[nn.Module] = None) -> bool:
    """Whether ``state_dict`` key ``name`` is a parameter or buffer of a normalisation layer.

    With ``model``: exact, from the module types (:data:`NORM_MODULE_TYPES`: BatchNorm, InstanceNorm, GroupNorm,
    LayerNorm, ...), including every alias name a module has in the ``state_dict``. For many keys use
    :func:`norm_keys`, which walks the model once.

    Without ``model``: from the name alone. A key is a norm key when its leaf is ``running_mean``, ``running_var`` or
    ``num_batches_tracked``; or its module's name contains ``norm`` (nnU-Net's ``.norm.``, ``batchnorm``,
    ``norm1``, ...) or is ``bn``/``gn``/``ln`` optionally followed by digits; or it is nnU-Net's alias
    ``...all_modules.<i>.`` with ``i >= 1`` (the norm inside ``ConvDropoutNormReLU``; wrong for a parametric
    nonlinearity such as PReLU); or it is entry 1 of one of this package's organ heads (``heads.<k>.1.``). Names that
    merely contain "norm" are matched too, so pass the model whenever one is at hand.
    """
    if model is not None:
        return name in _model_norm_keys(model)
    return _name_is_norm(name)


def norm_keys(names: Iterable[str], model: Optional[nn.Module] = None) -> FrozenSet[str]:
    """The subset of ``names`` (e.g. a ``state_dict``'s keys) that :func:`is_norm_key` selects."""
    if model is not None:
        found = _model_norm_keys(model)
        return frozenset(k for k in names if k in found)
    return frozenset(k for k in names if _name_is_norm(k))


def split_local_state(weights: Mapping[str, torch.Tensor], local_keys: Collection[str]) -> Tuple[Weights, Weights]:
    """Split ``weights`` into ``(shared, local)`` by ``local_keys`` (e.g. ``strategy.local_keys(weights)``). A runner
    keeps each site's ``local`` part between rounds (FedBN). Tensors are shared, not copied."""
    local_keys = set(local_keys)
    unknown = sorted(local_keys - set(weights))
    if unknown:
        raise KeyError(f"split_local_state: local key {unknown[0]!r} is not among the weights{_more(unknown)}")
    shared = {k: v for k, v in weights.items() if k not in local_keys}
    local = {k: v for k, v in weights.items() if k in local_keys}
    return shared, local


def merge_local_state(global_weights: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor]) -> Weights:
    """Global weights with a site's ``local`` entries put back (what the site trains from in the next round). Returns
    a new dict in the global key order; every ``local`` key must exist in the global weights with the same shape."""
    unknown = [k for k in local if k not in global_weights]
    if unknown:
        raise KeyError(f"merge_local_state: local key {unknown[0]!r} is not among the global weights{_more(unknown)}")
    for k, v in local.items():
        if v.shape != global_weights[k].shape:
            raise ValueError(f"merge_local_state: shape of local {k!r} is {tuple(v.shape)}, global has "
                             f"{tuple(global_weights[k].shape)}")
    return {k: (local[k] if k in local else v) for k, v in global_weights.items()}


# ----------------------------------------------------------------------------------------------------------------------
# FedProx and the learning-rate schedule
# ----------------------------------------------------------------------------------------------------------------------
def proximal_term(model_params: Iterable[Tuple[str, torch.Tensor]], global_weights: Mapping[str, torch.Tensor],
                  mu: float, *, exclude: Collection[str] = ()) -> torch.Tensor:
    """FedProx's proximal term ``mu / 2 * sum ||w - w_global||^2`` for a site's loss (Li et al. 2020).

    Args:
        model_params: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``. Parameters that do not require
            grad, are not floating point, or are in ``exclude`` (e.g. FedBN's local keys) are skipped.
        global_weights: the round's global weights by the same names. Gradient flows only to the parameters; pass
            the weights already on the parameters' device (move them once per round) to avoid a copy per call.
        mu: coefficient >= 0.

    Returns:
        float32 scalar on the parameters' device (a zero tensor when no parameter qualifies).
    """
    mu = float(mu)
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"proximal_term: mu must be a finite number >= 0, got {mu}")
    total: Optional[torch.Tensor] = None
    for name, p in model_params:
        if not p.requires_grad or not p.is_floating_point() or name in exclude:
            continue
        if name not in global_weights:
            raise KeyError(f"proximal_term: parameter {name!r} has no global weight")
        g = global_weights[name]
        if g.shape != p.shape:
            raise ValueError(f"proximal_term: shape of {name!r} is {tuple(p.shape)}, global weight has "
                             f"{tuple(g.shape)}")
        diff = p.float() - g.detach().to(device=p.device, dtype=torch.float32)
        sq = diff.pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return total * (mu / 2.0)


def federated_poly_lr(initial_lr: float, round_idx: int, local_epoch: int, rounds: int, local_epochs: int,
                      exponent: float = 0.9) -> float:
    """nnU-Net's PolyLR over the whole federation: ``initial_lr * (1 - e / E) ** exponent`` with the global epoch
    ``e = round_idx * local_epochs + local_epoch`` out of ``E = rounds * local_epochs``, so the schedule continues
    across rounds instead of restarting in each (nnU-Net: ``lr = initial_lr * (1 - epoch / max_epochs) ** 0.9``).
    ``round_idx`` and ``local_epoch`` count from 0."""
    for label, value in (("round_idx", round_idx), ("local_epoch", local_epoch), ("rounds", rounds),
                         ("local_epochs", local_epochs)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"federated_poly_lr: {label} must be an int, got {value!r}")
    if rounds < 1 or local_epochs < 1:
        raise ValueError(f"federated_poly_lr: rounds and local_epochs must be >= 1, got {rounds}, {local_epochs}")
    if not 0 <= round_idx < rounds:
        raise ValueError(f"federated_poly_lr: round_idx must be in [0, {rounds}), got {round_idx}")
    if not 0 <= local_epoch < local_epochs:
        raise ValueError(f"federated_poly_lr: local_epoch must be in [0, {local_epochs}), got {local_epoch}")
    epoch = round_idx * local_epochs + local_epoch
    return float(initial_lr) * (1.0 - epoch / (rounds * local_epochs)) ** float(exponent)


# ----------------------------------------------------------------------------------------------------------------------
# the federation's plans
# ----------------------------------------------------------------------------------------------------------------------
class PlansMismatch(ValueError):
    """A site's plans differ from the federation's plans."""


def normalized_plans(plans: Mapping[str, Any]) -> Dict[str, Any]:
    """The plans without ``dataset_name`` (the only entry stock ``move_plans_between_datasets`` adapts per site when
    every dataset uses the same image reader, as every dataset of this plugin does)."""
    out = copy.deepcopy(dict(plans))
    out.pop("dataset_name", None)
    return out


def federation_plans_digest(plans: Mapping[str, Any]) -> str:
    """:func:`~nnunetv2_fedkd.federated.weights_io.plans_digest` of :func:`normalized_plans`: equal for every
    site's copy of the federation's plans."""
    return plans_digest(normalized_plans(plans))


def check_site_plans(site_name: str, plans: Mapping[str, Any], expected_digest: str) -> None:
    """Raise :class:`PlansMismatch` naming the site when its plans are not the federation's plans."""
    got = federation_plans_digest(plans)
    if got != expected_digest:
        raise PlansMismatch(
            f"site {site_name!r}: plans {plans.get('plans_name')!r} of {plans.get('dataset_name')!r} differ from the "
            f"federation's plans (digest {got[:12]}..., expected {expected_digest[:12]}...); every site must train "
            f"with the coordinator's plans: run `nnunetv2_fedkd plan SPEC --overwrite` again or restore the "
            f"site's plans file")


# -- compact transport ------------------------------------------------------------------------------------------------
# The federation's transport precision: what the global weights and the sites' updates travel in. Aggregation is in
# float32 either way (the server decodes every update first: aggregation.decode_update).
TRANSPORT_DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


def check_transport_dtype(name: str) -> torch.dtype:
    if name not in TRANSPORT_DTYPES:
        raise ValueError(f"transport dtype must be one of {', '.join(TRANSPORT_DTYPES)}, not {name!r}")
    return TRANSPORT_DTYPES[name]


def transport_weights(weights: Mapping[str, torch.Tensor], dtype: str) -> Weights:
    """The global weights as the server sends them: every floating tensor in ``dtype`` (float32: the weights as they
    are), integer tensors (e.g. BatchNorm's ``num_batches_tracked``) unchanged. The sites train from these values."""
    target = check_transport_dtype(dtype)
    if target == torch.float32:
        return dict(weights)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in weights.items()}


def encode_update(weights: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], dtype: str) -> Weights:
    """What a site sends for its trained ``weights``: float32, the weights themselves; float16, every floating tensor
    as its change from the global weights it ``received`` (as they arrived), in float16 (2 bytes a parameter),
    integer tensors unchanged. One round changes a weight by a small fraction of its value, so float16's 11-bit
    significand keeps that change to about 3 significant digits (the weights themselves in float16 would lose their
    last digits every round); a change beyond float16's range (65504) becomes inf and the server drops the update as
    not finite. Inverse: :func:`nnunetv2_fedkd.federated.aggregation.decode_update`."""
    target = check_transport_dtype(dtype)
    if target == torch.float32:
        return dict(weights)
    missing = [k for k in weights if k not in received]
    if missing:
        raise ValueError(f"encode_update: {missing[0]!r} is not in the received global weights")
    return {k: (v.detach().float() - received[k].detach().float()).to(target) if v.is_floating_point()
            else v for k, v in weights.items()}


def round_seed(seed: int, round_idx: int, site: str) -> int:
    """A site's training seed in one round, from the federation's ``training_seed``: different for every round and
    site (each round samples other patches), the same on every rerun."""
    import zlib

    return zlib.crc32(f"{int(seed)}:{int(round_idx)}:{site}".encode("utf-8"))
