"""Medical Segmentation Decathlon task folders (Task03_Liver, Task06_Lung, Task07_Pancreas, Task08_HepaticVessel,
Task09_Spleen, Task10_Colon). The task is recognised by the "name" in the folder's dataset.json (the official files
say "LITS", "Lung", "Pancreas", "HepaticVessel", "Spleen", "Colon"), else by the folder's name, so a folder its owner
renamed (``/data/msd/spleen``) converts.

Layout: ``TaskXX_Name/dataset.json`` (with "training": [{"image": "./imagesTr/liver_0.nii.gz", "label":
"./labelsTr/liver_0.nii.gz"}, ...] and "test": ["./imagesTs/liver_132.nii.gz", ...]), ``imagesTr/``, ``labelsTr/``,
``imagesTs/``. The case list comes from dataset.json, so the macOS AppleDouble files of the official tarballs
(``._liver_0.nii.gz``) and any other stray file are never read. Test images are converted to imagesTs when the
imagesTs folder is there.

nnU-Net's own ``convert_msd_dataset`` copies files as they are (no label mapping or validation); its
``split_4d_nifti`` is not needed either: the CT tasks handled here are single-channel 3D, and a 4D image is
rejected by the shared validation.
"""
from __future__ import annotations

import json
from pathlib import Path

from nnunetv2_fedkd.organs import MSD_DATASET_NAMES, MSD_TASKS, MSD_UNSUPPORTED, SOURCE_FORMATS

from .common import ConversionError, Source, SourceCase, natural_key


def _case_id(entry: str) -> str:
    name = Path(entry).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.split(".")[0]


def _normalised(name) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def identify_task(input_dir: Path, meta: dict) -> str:
    """The MSD task folder name (a key of :data:`MSD_TASKS`) of ``input_dir``: from its dataset.json's "name" first
    (so a renamed folder converts), else from the folder's name. A dataset.json naming an MSD task that is not
    supported, or naming one task in a folder named after another, is refused."""
    meta_path = input_dir / "dataset.json"
    declared = meta.get("name")
    key = _normalised(declared) if declared is not None else ""
    if key in MSD_UNSUPPORTED:
        raise ConversionError(f"{meta_path} names MSD task {MSD_UNSUPPORTED[key]} ({declared!r}), which is not "
                              f"supported; supported: {', '.join(MSD_TASKS)}")
    by_name = MSD_DATASET_NAMES.get(key)
    by_folder = input_dir.name if input_dir.name in MSD_TASKS else None
    if by_name and by_folder and by_name != by_folder:
        raise ConversionError(f"{meta_path} names {declared!r} ({by_name}) but the folder is named {by_folder}: "
                              f"rename the folder or fix dataset.json")
    task = by_name or by_folder
    if task is None:
        raise ConversionError(
            f"{input_dir} is not a supported MSD task folder: its dataset.json names {declared!r} and the folder's "
            f"name is not a task name; expected a dataset.json \"name\" of an MSD task or a folder named one of "
            f"{', '.join(MSD_TASKS)}")
    return task


def scan(input_dir: Path, fmt: str = "msd") -> Source:
    meta_path = input_dir / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{meta_path} is missing: an MSD task folder ({', '.join(MSD_TASKS)}) has "
                              f"dataset.json") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ConversionError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
    task = identify_task(input_dir, meta)
    source_format = MSD_TASKS[task]
    sf = SOURCE_FORMATS[source_format]

    # sanity check that the folder holds what its task says: same label values, one CT channel
    declared = {int(k) for k in meta.get("labels", {})}
    if declared != {0, *sf.labels}:
        raise ConversionError(
            f"{meta_path} declares label values {sorted(declared)}, expected {sorted({0, *sf.labels})} "
            f"for {sf.description}"
        )
    modality = meta.get("modality", {})
    if list(modality.values()) != ["CT"]:
        raise ConversionError(f"{meta_path} declares modality {modality}, expected a single CT channel")

    cases = [
        SourceCase(_case_id(e["label"]), input_dir / e["image"], input_dir / e["label"])
        for e in meta.get("training", [])
    ]
    if (input_dir / "imagesTs").is_dir():
        cases += [SourceCase(_case_id(e), input_dir / e, None) for e in meta.get("test", [])]
    else:
        print(f"note: {input_dir / 'imagesTs'} not found, test images are not converted", flush=True)
    return Source(
        source_format=source_format,
        input_dir=input_dir,
        default_name=task.split("_", 1)[1],
        cases=sorted(cases, key=lambda c: (c.label_path is None, natural_key(c.case_id))),
    )
