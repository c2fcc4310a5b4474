"""Federated training that does not depend on a federated-learning engine (no Flower import here).

Site side (what a hospital runs): :mod:`~nnunetv2_fedkd.federated.site_side` (the update it sends, FedBN local
state, FedProx term, the federation-wide learning-rate schedule, the plans digest) and
:mod:`~nnunetv2_fedkd.federated.nnunet_site`. Server side: :mod:`~nnunetv2_fedkd.federated.aggregation` (update
validation and bounds, strategies), :mod:`~nnunetv2_fedkd.federated.round_core`, :mod:`~nnunetv2_fedkd.federated.
runner` (the round loop), :mod:`~nnunetv2_fedkd.federated.planning`. Both: :mod:`~nnunetv2_fedkd.federated.
weights_io` (safetensors weight files).

The names below are re-exported lazily (PEP 562), so importing a site-side module does not load the server side.
"""
import importlib
from typing import Any

_SOURCES = {
    "NORM_MODULE_TYPES": "site_side",
    "STRATEGIES": "aggregation",
    "DEFAULT_MAX_UPDATE_RATIO": "aggregation",
    "AggregationInfo": "aggregation",
    "CoordinateMedian": "aggregation",
    "FedAdam": "aggregation",
    "FedAvg": "aggregation",
    "FedAvgM": "aggregation",
    "FedBN": "aggregation",
    "FedOpt": "aggregation",
    "FedProx": "aggregation",
    "RoundResult": "aggregation",
    "SiteUpdate": "site_side",
    "Strategy": "aggregation",
    "TOO_FEW_UPDATES": "aggregation",
    "TrimmedMean": "aggregation",
    "UpdateBounds": "aggregation",
    "UpdateRejected": "aggregation",
    "Weights": "site_side",
    "aggregate_round": "aggregation",
    "federated_poly_lr": "site_side",
    "is_norm_key": "site_side",
    "make_strategy": "aggregation",
    "merge_local_state": "site_side",
    "norm_keys": "site_side",
    "organ_head_mapper": "aggregation",
    "proximal_term": "site_side",
    "split_local_state": "site_side",
    "update_ratio": "aggregation",
    "validate_update": "aggregation",
    "WEIGHTS_FORMAT": "weights_io",
    "WEIGHTS_FORMAT_VERSION": "weights_io",
    "CorruptCheckpoint": "weights_io",
    "from_numpy_arrays": "weights_io",
    "load_weights": "weights_io",
    "plans_digest": "weights_io",
    "save_weights": "weights_io",
    "to_numpy_arrays": "weights_io",
    "weights_digest": "weights_io",
}

__all__ = list(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
