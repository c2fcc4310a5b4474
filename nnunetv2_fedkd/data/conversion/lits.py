"""LiTS (Liver Tumor Segmentation challenge) training data.

Layout: ``volume-N.nii`` and ``segmentation-N.nii`` (uncompressed NIfTI; ``.nii.gz`` accepted too), either flat in
INPUT or in sub-folders up to two levels deep (the official release splits them over "Training Batch 1" and
"Training Batch 2"). Labels: 1 liver, 2 tumour. Case ids: ``LiTS_0000`` from N. A volume without its segmentation
(or the reverse) is an error; the test set's ``test-volume-N.nii`` files are not picked up.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict

from .common import ConversionError, Source, SourceCase

_FILE_RE = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")
_SEARCH = ("*", "*/*", "*/*/*")  # INPUT itself, one and two folder levels below


def _find(input_dir: Path) -> Dict[str, Dict[int, Path]]:
    found: Dict[str, Dict[int, Path]] = {"volume": {}, "segmentation": {}}
    for pattern in _SEARCH:
        for path in input_dir.glob(pattern):
            m = _FILE_RE.match(path.name)
            if not m or not path.is_file():
                continue
            kind, number = m.group(1), int(m.group(2))
            if number in found[kind]:
                raise ConversionError(f"LiTS {kind} {number} found twice: {found[kind][number]} and {path}")
            found[kind][number] = path
    return found


def scan(input_dir: Path, fmt: str = "lits") -> Source:
    found = _find(input_dir)
    cases = []
    for n in sorted(set(found["volume"]) | set(found["segmentation"])):
        # a missing partner is expected next to the file that is there; the shared validation reports it
        vol = found["volume"].get(n) or found["segmentation"][n].with_name(f"volume-{n}.nii")
        seg = found["segmentation"].get(n) or found["volume"][n].with_name(f"segmentation-{n}.nii")
        cases.append(SourceCase(f"LiTS_{n:04d}", vol, seg))
    return Source(source_format="lits", input_dir=input_dir, default_name="LiTS", cases=cases)
