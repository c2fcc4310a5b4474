"""BTCV (Beyond the Cranial Vault, multi-atlas abdomen, 13 labels) training data.

Layout: ``INPUT/RawData/Training/img/img0001.nii.gz`` and ``INPUT/RawData/Training/label/label0001.nii.gz``; INPUT may
also be the ``RawData`` or ``Training`` folder. Labels: organs.SOURCE_FORMATS["btcv"]. Case ids: ``BTCV_0001``.
The unlabelled RawData/Testing images are not converted (BTCV serves as a fully labelled external test set).
"""
from __future__ import annotations

import re
from pathlib import Path

from .common import ConversionError, Source, SourceCase

_IMG_RE = re.compile(r"^img(\d+)\.nii\.gz$")
_LABEL_RE = re.compile(r"^label(\d+)\.nii\.gz$")


def _training_root(input_dir: Path) -> Path:
    for cand in (input_dir / "RawData" / "Training", input_dir / "Training", input_dir):
        if (cand / "img").is_dir() or (cand / "label").is_dir():
            return cand
    raise ConversionError(
        f"no BTCV img/ and label/ folders found in {input_dir} (looked in RawData/Training, Training and itself)"
    )


def scan(input_dir: Path, fmt: str = "btcv") -> Source:
    root = _training_root(input_dir)
    ids = set()
    for sub, regex in (("img", _IMG_RE), ("label", _LABEL_RE)):
        if (root / sub).is_dir():
            ids |= {m.group(1) for p in (root / sub).iterdir() if (m := regex.match(p.name))}
    cases = [
        SourceCase(f"BTCV_{int(n):04d}", root / "img" / f"img{n}.nii.gz", root / "label" / f"label{n}.nii.gz")
        for n in sorted(ids, key=int)
    ]
    return Source(source_format="btcv", input_dir=input_dir, default_name="BTCV", cases=cases)
