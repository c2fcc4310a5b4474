"""Derive small nnU-Net plans from nnU-Net's own plans, for CPU machines, tests, the demo and benchmarks.

Stock plans are sized for a GPU (one default epoch takes about 30 min on 2 CPU cores). This keeps everything
nnU-Net planned (spacing, normalisation, ``data_identifier`` so the preprocessed data is reused) and shrinks only
the network and the patch: fewer stages, fewer features, a smaller patch and batch. The result is an ordinary plans
file next to the source one, used with the stock ``-p`` option::

    nnunetv2_fedkd small-plans -d 501                       # writes nnUNetPlansSmall.json
    nnUNetv2_train 501 3d_fullres 0 -p nnUNetPlansSmall -tr nnUNetTrainerNaivePartial
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Sequence

from nnunetv2_fedkd.utils import atomic_write_json

SMALL_PLANS = "nnUNetPlansSmall"


class PlansError(ValueError):
    pass


def shrink_plans(plans: dict, target_name: str = SMALL_PLANS, configuration: str = "3d_fullres",
                 patch_size: Sequence[int] = (32, 32, 32), base_features: int = 8, max_features: int = 64,
                 n_stages: int = 4, batch_size: int = 2) -> dict:
    """Return a copy of ``plans`` (an nnU-Net plans dict) with ``configuration`` shrunk; other configurations are
    dropped so nobody trains a stock-sized one under the small name by mistake."""
    if configuration not in plans.get("configurations", {}):
        raise PlansError(f"plans {plans.get('plans_name')} have no configuration {configuration!r}; "
                         f"available: {sorted(plans.get('configurations', {}))}")
    cfg = copy.deepcopy(plans["configurations"][configuration])
    if "inherits_from" in cfg:
        raise PlansError(f"configuration {configuration!r} inherits from {cfg['inherits_from']!r}; "
                         f"shrink a configuration that is defined in full")
    arch = cfg["architecture"]["arch_kwargs"]
    n = min(n_stages, arch["n_stages"])
    strides = [list(s) if isinstance(s, (list, tuple)) else [s] * len(cfg["patch_size"]) for s in arch["strides"][:n]]
    # the patch must be divisible by the product of the strides of the kept stages
    div = [math.prod(s[d] for s in strides) for d in range(len(cfg["patch_size"]))]
    new_patch = []
    for d, (want, planned) in enumerate(zip(patch_size, cfg["patch_size"])):
        size = min(int(want), int(planned))
        size = max(div[d], size // div[d] * div[d])
        new_patch.append(size)
    arch["n_stages"] = n
    arch["features_per_stage"] = [min(base_features * 2 ** i, max_features) for i in range(n)]
    for key in ("kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
        if key in arch:
            arch[key] = arch[key][:n]
    if "n_conv_per_stage_decoder" in arch:
        arch["n_conv_per_stage_decoder"] = arch["n_conv_per_stage_decoder"][: n - 1]
    cfg["patch_size"] = new_patch
    cfg["batch_size"] = int(batch_size)
    out = copy.deepcopy(plans)
    out["plans_name"] = target_name
    out["configurations"] = {configuration: cfg}
    return out


def write_small_plans(preprocessed_dataset_dir: Path, source: str = "nnUNetPlans", target: str = SMALL_PLANS,
                      configuration: str = "3d_fullres", **kwargs) -> Path:
    """Read ``<dir>/<source>.json``, shrink it and write ``<dir>/<target>.json`` atomically."""
    src = Path(preprocessed_dataset_dir) / f"{source}.json"
    if not src.is_file():
        raise PlansError(f"{src} does not exist: run nnUNetv2_plan_and_preprocess (or nnunetv2_fedkd plan) first")
    plans = json.loads(src.read_text())
    out = shrink_plans(plans, target, configuration, **kwargs)
    dst = Path(preprocessed_dataset_dir) / f"{target}.json"
    atomic_write_json(dst, out)
    return dst
