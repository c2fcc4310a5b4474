"""Synthetic partial-label federation: CT-like abdominal phantoms written in the LiTS, KiTS23, MSD and BTCV layouts.

    from nnunetv2_fedkd.data.synthetic import make_federation
    spec_path = make_federation("work", seed=0)          # -> work/federation.toml, work/sources/..., work/synth_meta.json

See :mod:`.phantom` (anatomy, intensities, scanner model) and :mod:`.federation` (sites, layouts, spec).
"""
from .federation import (
    ALL_SITES,
    DEFAULT_SIZE,
    MAX_SITES,
    SECOND_SITES,
    SITES,
    TEST_SITE,
    SyntheticSite,
    make_federation,
    site_phantom,
    site_scanner,
)
from .phantom import LESION_HOSTS, PHASES, STRUCTURES, Phantom, Scanner, organ_volumes_ml, render_phantom

__all__ = [
    "ALL_SITES",
    "DEFAULT_SIZE",
    "LESION_HOSTS",
    "MAX_SITES",
    "PHASES",
    "SECOND_SITES",
    "SITES",
    "STRUCTURES",
    "TEST_SITE",
    "Phantom",
    "Scanner",
    "SyntheticSite",
    "make_federation",
    "organ_volumes_ml",
    "render_phantom",
    "site_phantom",
    "site_scanner",
]
