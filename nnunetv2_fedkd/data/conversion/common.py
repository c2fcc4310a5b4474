"""Shared part of the converters: label-set resolution, per-case validation and writing, dataset.json.

A format module (``msd``, ``kits``, ``lits``, ``btcv``) only finds the files of a public dataset and returns a
:class:`Source`; :func:`convert_source` does the rest, one case at a time (read, validate, map labels, write, drop), so
memory never holds more than one case.

Validation of every case, before anything of it is written (a failure raises :class:`ConversionError` naming the
case, the offending file and what is wrong):

* image and label file exist and can be read; both are 3D single-component images;
* same voxel grid size;
* same geometry within these tolerances (comparing the label's header to the image's; the label is written with the
  image's geometry afterwards):

  - spacing: relative difference <= 1e-3 per axis,
  - origin: absolute difference <= 1e-3 x the image's smallest spacing (mm) per axis,
  - direction cosines: absolute difference <= 1e-4 per matrix element;

* image and label have no NaN/Inf voxel (checked on the stored values: ITK 5 reads them as 0);
* label values are a subset of {0} U the source format's documented values (a value stored as float, e.g. 1.0, is
  fine; 1.5 or NaN is not).

Images are written exactly as SimpleITK reads them (same voxels, pixel type, spacing, origin and direction: no
resampling, no reorientation); labels are mapped through the value map and written as uint8 with the image's
geometry.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunetv2_fedkd import organs as reg
from nnunetv2_fedkd.utils import atomic_output_dir

FILE_ENDING = ".nii.gz"
# Every dataset the plugin writes is read by nnU-Net with its reorienting NIfTI reader (as nnU-Net's own KiTS23
# conversion does): files keep their exact geometry, and at read time every site's arrays are brought to the same
# anatomical axis order (RAS), so one network can train on KiTS's slice-first arrays beside MSD/LiTS/BTCV ones.
# Predictions are written back in each image's own orientation.
IMAGE_READER = "NibabelIOWithReorient"
CHANNEL_NAMES = {"0": "CT"}

# geometry tolerances between an image and its label (see the module docstring)
SPACING_RTOL = 1e-3
ORIGIN_TOL_IN_VOXELS = 1e-3
DIRECTION_ATOL = 1e-4

_DATASET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ConversionError(RuntimeError):
    """A dataset cannot be converted; the message says which case / file / folder and what is wrong."""


class SourceCase(NamedTuple):
    """One case of a source dataset. ``label_path`` is None for an unlabelled test image (written to imagesTs)."""

    case_id: str
    image_path: Path
    label_path: Optional[Path]


@dataclass
class Source:
    """What a format module found in an input folder."""

    source_format: str  # key of organs.SOURCE_FORMATS
    input_dir: Path
    default_name: str  # nnU-Net dataset name used when the caller gives none
    cases: List[SourceCase] = field(default_factory=list)  # training and test cases, sorted by case id

    @property
    def format(self) -> reg.SourceFormat:
        return reg.SOURCE_FORMATS[self.source_format]


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (liver_2 before liver_10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _fmt_set(values) -> str:
    return "{" + ",".join(str(v) for v in values) + "}"


# --------------------------------------------------------------------------------------------------------------------
# label set
# --------------------------------------------------------------------------------------------------------------------
def _annotates_whole(key: str, source_entries) -> bool:
    """Whether a source that labels ``source_entries`` delineates all of registry entry ``key``: it labels ``key``
    itself, or every sub-part of the same kind (left + right kidney make the kidney; the liver's vessels and tumours
    do not make the liver). Declaring a partly drawn structure as annotated would teach "the rest is background"."""
    if key in source_entries:
        return True
    parts = [o.key for o in reg.ORGANS.values() if o.parent == key and o.kind == reg.ORGANS[key].kind]
    return bool(parts) and all(_annotates_whole(p, source_entries) for p in parts)


def resolve_label_set(
    source_format: str, organs: Optional[Sequence[str]], keep_tumour: bool
) -> Tuple[List[str], Dict[int, int], Dict[str, List[str]]]:
    """(label_set, value_map, merged) for a source format.

    Without ``organs``: organs.default_label_set of the format's entries (``keep_tumour`` keeps tumours/cysts).
    With ``organs``: those registry keys, in registry order; every source label goes to itself or its nearest ancestor
    in the set, anything else to background. Each requested organ must be delineated as a whole by the source (else
    the dataset would declare a label that is never or only partly drawn, and a partial-label trainer would learn
    the undrawn part as background)."""
    fmt = reg.SOURCE_FORMATS[source_format]
    if organs is None:
        label_set = reg.default_label_set(fmt.labels.values(), keep_tumour=keep_tumour)
    else:
        if keep_tumour:
            raise ConversionError(
                "keep_tumour has no effect together with an explicit organ list; "
                "list the tumour entries (e.g. kidney_tumour) among the organs instead"
            )
        try:
            label_set = reg.sort_by_registry(reg.check_organs(organs, "the requested organs"))
        except reg.RegistryError as e:
            raise ConversionError(str(e)) from None
    value_map, merged = reg.label_mapping(fmt.labels, label_set)
    entries = set(fmt.labels.values())
    partial = [k for k in label_set if not _annotates_whole(k, entries)]
    if partial:
        raise ConversionError(
            f"{fmt.description} does not annotate {partial} as a whole: it labels {sorted(entries)} (a tumour, cyst "
            f"or vessel inside an organ is not the organ). Drop {partial} from the organ list."
        )
    return label_set, value_map, merged


# --------------------------------------------------------------------------------------------------------------------
# per-case reading and validation
# --------------------------------------------------------------------------------------------------------------------
def _count_non_finite(path: Path) -> int:
    """Number of NaN/Inf voxels stored in a NIfTI file. SimpleITK cannot tell: ITK 5's NIfTI reader silently turns
    them into 0 (fixed only in ITK 6), so the stored values are read with nibabel; only floating-point files can
    hold them, the check costs nothing for integer images."""
    nii = nib.load(str(path))
    if not np.issubdtype(nii.get_data_dtype(), np.floating):
        return 0
    data = np.asanyarray(nii.dataobj)
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def _read(case_id: str, kind: str, path: Path) -> sitk.Image:
    """Read a 3D single-channel image with SimpleITK after checking that it exists and holds no NaN/Inf."""
    if not path.is_file():
        raise ConversionError(f"case {case_id}: {kind} file {path} is missing")
    try:
        n_bad = _count_non_finite(path)  # before the SimpleITK read: at most one volume in memory at a time
        img = sitk.ReadImage(str(path)) if not n_bad else None
    except Exception as e:  # any reader failure (corrupt gzip, not NIfTI, truncated file, ...)
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConversionError(f"case {case_id}: cannot read {kind} {path}: {msg}") from None
    if n_bad:
        raise ConversionError(f"case {case_id}: {kind} {path} has {n_bad} NaN/Inf voxel(s)")
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(
            f"case {case_id}: {kind} {path} is not a 3D single-channel image (dimension {img.GetDimension()}, "
            f"{img.GetNumberOfComponentsPerPixel()} component(s) per voxel)"
        )
    return img


def _check_geometry(case_id: str, image_path: Path, label_path: Path, img: sitk.Image, lab: sitk.Image) -> None:
    if img.GetSize() != lab.GetSize():
        raise ConversionError(
            f"case {case_id}: label {label_path} has size {lab.GetSize()} but image {image_path} has size "
            f"{img.GetSize()}"
        )
    sp_i, sp_l = np.array(img.GetSpacing()), np.array(lab.GetSpacing())
    problems = []
    if np.any(np.abs(sp_i - sp_l) > SPACING_RTOL * sp_i):
        problems.append(f"spacing {lab.GetSpacing()} vs {img.GetSpacing()}")
    if np.any(np.abs(np.subtract(img.GetOrigin(), lab.GetOrigin())) > ORIGIN_TOL_IN_VOXELS * sp_i.min()):
        problems.append(f"origin {lab.GetOrigin()} vs {img.GetOrigin()}")
    if np.any(np.abs(np.subtract(img.GetDirection(), lab.GetDirection())) > DIRECTION_ATOL):
        problems.append(f"direction {lab.GetDirection()} vs {img.GetDirection()}")
    if problems:
        raise ConversionError(
            f"case {case_id}: label {label_path} does not match the geometry of image {image_path}: "
            + "; ".join(problems)
        )


def _map_label(case_id: str, path: Path, lab: sitk.Image, fmt: reg.SourceFormat, lut: np.ndarray) -> np.ndarray:
    """Validate the label values and return the mapped uint8 array."""
    arr = sitk.GetArrayViewFromImage(lab)
    values = np.sort(pd.unique(arr.ravel()))
    allowed = {0, *fmt.labels}
    bad = [v.item() for v in values if not (np.isfinite(v) and float(v).is_integer() and int(v) in allowed)]
    if bad:
        raise ConversionError(
            f"case {case_id}: label {path} has values {bad} outside the {fmt.description} label set "
            f"{_fmt_set(sorted(allowed))}"
        )
    # all values are now integers in [0, max(fmt.labels)] (<= 255), so a uint8 cast is exact
    return lut[arr.astype(np.uint8, copy=False)]


def _write_image(img: sitk.Image, path: Path) -> None:
    sitk.WriteImage(img, str(path), useCompression=True)


def convert_case(case: SourceCase, fmt: reg.SourceFormat, lut: np.ndarray, out_dir: Path,
                 unlabelled_as_training: bool = False) -> None:
    """Validate one case and write it into ``out_dir`` (imagesTr+labelsTr, or imagesTs for an unlabelled image;
    ``unlabelled_as_training``: an unlabelled image goes to imagesTr with an all-background label map on its grid, a
    training case that annotates no organ)."""
    img = _read(case.case_id, "image", case.image_path)
    if case.label_path is None:
        if not unlabelled_as_training:
            _write_image(img, out_dir / "imagesTs" / f"{case.case_id}_0000{FILE_ENDING}")
            return
        empty = sitk.Image(img.GetSize(), sitk.sitkUInt8)
        empty.CopyInformation(img)
        _write_image(img, out_dir / "imagesTr" / f"{case.case_id}_0000{FILE_ENDING}")
        _write_image(empty, out_dir / "labelsTr" / f"{case.case_id}{FILE_ENDING}")
        return
    lab = _read(case.case_id, "label", case.label_path)
    _check_geometry(case.case_id, case.image_path, case.label_path, img, lab)
    mapped = _map_label(case.case_id, case.label_path, lab, fmt, lut)
    del lab
    out_lab = sitk.GetImageFromArray(mapped)
    out_lab.CopyInformation(img)
    _write_image(img, out_dir / "imagesTr" / f"{case.case_id}_0000{FILE_ENDING}")
    _write_image(out_lab, out_dir / "labelsTr" / f"{case.case_id}{FILE_ENDING}")


# --------------------------------------------------------------------------------------------------------------------
# target folder
# --------------------------------------------------------------------------------------------------------------------
def _env_path(name: str) -> Optional[str]:
    """The value of nnunetv2.paths.<name> (an env-backed path object in recent nnU-Net, a str/None in older ones)."""
    from nnunetv2 import paths

    value = getattr(paths, name, None)
    value = value.get() if hasattr(value, "get") else value
    return str(value) if value else None


def resolve_nnunet_raw(nnunet_raw=None) -> Path:
    """``nnunet_raw`` if given, else the nnUNet_raw environment variable; ConversionError when neither is set."""
    if nnunet_raw is None:
        nnunet_raw = _env_path("nnUNet_raw")
        if nnunet_raw is None:
            raise ConversionError("nnUNet_raw is not set: set the environment variable or pass nnunet_raw")
    return Path(nnunet_raw)


def target_folder(dataset_id: int, dataset_name: str, nnunet_raw) -> Path:
    """``$nnUNet_raw/DatasetXXX_Name``, after checking the id, the name and that no other dataset uses the id."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ConversionError(
            f"dataset id must be an integer from 1 to 999 (nnU-Net uses 3 digits), got {dataset_id!r}"
        )
    if not _DATASET_NAME_RE.match(dataset_name or ""):
        raise ConversionError(
            f"dataset name {dataset_name!r} is not usable: use letters, digits, '_' and '-' (no spaces)"
        )
    nnunet_raw = resolve_nnunet_raw(nnunet_raw)
    folder = f"Dataset{int(dataset_id):03d}_{dataset_name}"
    # nnU-Net resolves an id by name prefix in raw, preprocessed and results; two names for one id break it
    roots = [Path(nnunet_raw)] + [Path(p) for p in map(_env_path, ("nnUNet_preprocessed", "nnUNet_results")) if p]
    clashes = sorted(
        str(d)
        for root in roots
        if root.is_dir()
        for d in root.glob(f"Dataset{int(dataset_id):03d}_*")
        if d.is_dir() and d.name != folder
    )
    if clashes:
        raise ConversionError(
            f"dataset id {dataset_id} is already used by {clashes}; nnU-Net would not know which one is meant. "
            f"Choose another id or remove it."
        )
    return Path(nnunet_raw) / folder


# --------------------------------------------------------------------------------------------------------------------
# the whole conversion
# --------------------------------------------------------------------------------------------------------------------
def convert_source(
    source: Source,
    dataset_id: int,
    dataset_name: Optional[str] = None,
    keep_tumour: bool = False,
    organs: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    nnunet_raw=None,
    unlabelled_as_training: bool = False,
) -> Path:
    """Convert every case of ``source`` into an nnU-Net raw dataset; returns the dataset folder. All or nothing: the
    dataset is assembled in a temporary sibling folder that replaces the target only when every case passed.
    ``unlabelled_as_training``: the source's unlabelled images (MSD imagesTs, KiTS19's imaging-only case) become
    training cases that annotate no organ (an all-background label map; ``fedkd.case_annotated`` lists them with
    ``[]``), for the trainers that learn from unlabelled cases (``nnUNetTrainerDualKD``); the partial-label losses
    take no label loss from them."""
    fmt = source.format
    train = [c for c in source.cases if c.label_path is not None]
    test = [c for c in source.cases if c.label_path is None]
    if not train:
        raise ConversionError(f"no {fmt.description} training cases found in {source.input_dir}")
    if unlabelled_as_training and not test:
        raise ConversionError(f"{source.input_dir} has no unlabelled {fmt.description} images to use as training "
                              f"cases (unlabelled_as_training)")
    unlabelled = test if unlabelled_as_training else []
    labelled_files = {c.case_id: c.image_path for c in train}
    clash = next((c for c in unlabelled if c.case_id in labelled_files), None)
    if clash is not None:
        raise ConversionError(f"case {clash.case_id}: the unlabelled image {clash.image_path} and the labelled case "
                              f"{labelled_files[clash.case_id]} have the same case id; as training cases one would "
                              f"overwrite the other (rename one, or convert without unlabelled_as_training)")
    label_set, value_map, merged = resolve_label_set(source.source_format, organs, keep_tumour)
    lut = np.zeros(max(value_map) + 1, dtype=np.uint8)
    for value, out in value_map.items():
        lut[value] = out

    final = target_folder(dataset_id, dataset_name or source.default_name, nnunet_raw)
    try:
        with atomic_output_dir(final, overwrite) as tmp:
            for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if test and not unlabelled else ()):
                (tmp / sub).mkdir()
            for i, case in enumerate(source.cases, 1):
                convert_case(case, fmt, lut, tmp, unlabelled_as_training)
                print(f"[{i}/{len(source.cases)}] {case.case_id}", flush=True)
            generate_dataset_json(
                str(tmp),
                channel_names=dict(CHANNEL_NAMES),
                labels=reg.nnunet_labels(label_set),
                num_training_cases=len(train) + len(unlabelled),
                file_ending=FILE_ENDING,
                dataset_name=final.name,
                description=f"{fmt.description} converted by nnunetv2_fedkd",
                license=f"see the terms of use of the source dataset ({fmt.description})",
                converted_by="nnunetv2_fedkd",
                overwrite_image_reader_writer=IMAGE_READER,
                fedkd={
                    "registry_version": reg.REGISTRY_VERSION,
                    "source_format": source.source_format,
                    "source_dir": str(source.input_dir),
                    "annotated": list(label_set),
                    "merged": merged,
                    "source_labels": {str(v): k for v, k in sorted(fmt.labels.items())},
                    "cases": [c.case_id for c in train + unlabelled],
                    "test_cases": [c.case_id for c in test if not unlabelled],
                    **({"unlabelled_cases": [c.case_id for c in unlabelled],
                        "case_annotated": {**{c.case_id: list(label_set) for c in train},
                                           **{c.case_id: [] for c in unlabelled}}} if unlabelled else {}),
                },
            )
    except FileExistsError as e:
        raise ConversionError(str(e)) from None
    what = (f"{len(train)} labelled + {len(unlabelled)} unlabelled training case(s)" if unlabelled
            else f"{len(train)} training case(s), {len(test)} test image(s)")
    print(f"wrote {final} ({what}; labels {label_set})", flush=True)
    return final


def require_dir(path, what: str) -> Path:
    """``path`` as an absolute, normalised Path (symlinks kept: an MSD folder name matters); ConversionError if it is
    not a folder."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    if not path.is_dir():
        raise ConversionError(f"{what} {path} does not exist or is not a folder")
    return path
