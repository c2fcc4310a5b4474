"""KiTS19 / KiTS21 / KiTS23 (Kidney Tumor Segmentation challenges).

Layout: ``INPUT/data/case_00000/`` (KiTS19, KiTS21) or ``INPUT/dataset/case_00000/`` (KiTS23) with
``imaging.nii.gz`` and ``segmentation.nii.gz`` (KiTS21's repository names its majority-vote label
``aggregated_MAJ_seg.nii.gz``; it is used when there is no segmentation.nii.gz). INPUT may also be the
``data``/``dataset`` folder itself. Labels: 1 kidney, 2 tumour (+ 3 cyst from KiTS21 on).

KiTS volumes are stored slice-axis first (affine like [[0,0,-0.78,0],[0,-0.78,0,0],[-3,0,0,0],[0,0,0,1]]);
SimpleITK reads that as a permuted direction matrix, which the converter keeps exactly (no reorientation).

The KiTS19 repository also ships the imaging of its 90 test cases (case_00210 ... case_00299) without
segmentation: those go to imagesTs. Any other case folder without a label file is an error.
"""
from __future__ import annotations

from pathlib import Path

from .common import ConversionError, Source, SourceCase, natural_key

IMAGE = "imaging.nii.gz"
LABEL = "segmentation.nii.gz"
LABEL_KITS21_MAJ = "aggregated_MAJ_seg.nii.gz"
KITS19_FIRST_TEST_CASE = 210  # KiTS19: 210 training cases, test cases 210..299 were released without labels


def _case_root(input_dir: Path) -> Path:
    for cand in (input_dir / "dataset", input_dir / "data", input_dir):
        if _case_dirs(cand):
            return cand
    raise ConversionError(f"no case_XXXXX folders found in {input_dir} (nor in its data/ or dataset/ subfolder)")


def _case_dirs(folder: Path) -> list:
    return sorted((p for p in folder.glob("case_*") if p.is_dir()), key=lambda p: natural_key(p.name))


def _label_path(case_dir: Path, fmt: str) -> Path:
    label = case_dir / LABEL
    if fmt == "kits21" and not label.exists() and (case_dir / LABEL_KITS21_MAJ).exists():
        return case_dir / LABEL_KITS21_MAJ
    return label


def scan(input_dir: Path, fmt: str) -> Source:
    root = _case_root(input_dir)
    cases = []
    for case_dir in _case_dirs(root):
        label = _label_path(case_dir, fmt)
        is_kits19_test = (
            fmt == "kits19"
            and not label.exists()
            and case_dir.name[5:].isdigit()
            and int(case_dir.name[5:]) >= KITS19_FIRST_TEST_CASE
        )
        cases.append(SourceCase(case_dir.name, case_dir / IMAGE, None if is_kits19_test else label))
    return Source(source_format=fmt, input_dir=input_dir, default_name=fmt.replace("kits", "KiTS"), cases=cases)
