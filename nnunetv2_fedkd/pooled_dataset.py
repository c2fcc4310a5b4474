"""``nnunetv2_fedkd merge SPEC -d ID``: pool the sites' converted datasets into ONE partial-label nnU-Net dataset.

This is the central setting (allowed where data may be shared) and the base of every central trainer. Each site's
labels are remapped to the federation's global label set (background + ``[federation].labels``); organs a site does
not annotate stay 0 in its label maps, and dataset.json records per case which organs are annotated
(``fedkd.case_annotated``) and which site it came from (``fedkd.case_site``; case ids are ``<site>__<case>``).
The partial-label trainers read that table (:mod:`nnunetv2_fedkd.label_availability`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunetv2_fedkd import organs as reg
from nnunetv2_fedkd.dataset_conversion.common import (IMAGE_READER, ConversionError, resolve_nnunet_raw,
                                                   target_folder)
from nnunetv2_fedkd.spec import FederationSpec, check_datasets
from nnunetv2_fedkd.utils import atomic_output_dir

FILE_ENDING = ".nii.gz"


def _link_or_copy(src: Path, dst: Path) -> None:
    """Images are not changed: hard-link them when the file system allows, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def merge_sites(spec: FederationSpec, dataset_id: int, dataset_name: Optional[str] = None,
                nnunet_raw: Optional[os.PathLike] = None, overwrite: bool = False) -> Path:
    """Write ``$nnUNet_raw/DatasetXXX_<name>`` pooling every site of ``spec``; returns the folder."""
    raw = resolve_nnunet_raw(nnunet_raw)
    check_datasets(spec, raw)
    name = dataset_name or f"{''.join(p.capitalize() for p in spec.name.replace('-', '_').split('_'))}Pooled"
    final = target_folder(dataset_id, name, raw)
    global_value = {organ: i + 1 for i, organ in enumerate(spec.labels)}
    case_annotated: Dict[str, list] = {}
    case_site: Dict[str, str] = {}
    channel_names = None
    try:
        with atomic_output_dir(final, overwrite) as tmp:
            (tmp / "imagesTr").mkdir()
            (tmp / "labelsTr").mkdir()
            for site in spec.sites:
                src = raw / site.dataset
                dj = json.loads((src / "dataset.json").read_text())
                if channel_names is None:
                    channel_names = dj["channel_names"]
                elif dj["channel_names"] != channel_names:
                    raise ConversionError(f"site {site.name!r}: {src / 'dataset.json'} has channels "
                                          f"{dj['channel_names']}, other sites have {channel_names}")
                if dj.get("file_ending", FILE_ENDING) != FILE_ENDING:
                    raise ConversionError(f"site {site.name!r}: {src} uses {dj.get('file_ending')}; "
                                          f"convert it with nnunetv2_fedkd convert ({FILE_ENDING})")
                lut = np.zeros(256, dtype=np.uint8)
                for organ, value in dj["labels"].items():
                    if organ != "background":
                        lut[int(value)] = global_value[organ]
                allowed = {0, *(int(v) for k, v in dj["labels"].items())}
                labels = sorted((src / "labelsTr").glob(f"*{FILE_ENDING}"))
                if not labels:
                    raise ConversionError(f"site {site.name!r}: no labels in {src / 'labelsTr'}")
                for lab_file in labels:
                    case = lab_file.name[: -len(FILE_ENDING)]
                    new_case = f"{site.name}__{case}"
                    lab = sitk.ReadImage(str(lab_file))
                    arr = sitk.GetArrayFromImage(lab)
                    stray = sorted(set(np.unique(arr).tolist()) - allowed)
                    if stray:
                        raise ConversionError(f"site {site.name!r}: {lab_file} has values {stray} outside its "
                                              f"dataset.json labels {sorted(allowed)}")
                    out = sitk.GetImageFromArray(lut[arr.astype(np.uint8)])
                    out.CopyInformation(lab)
                    sitk.WriteImage(out, str(tmp / "labelsTr" / f"{new_case}{FILE_ENDING}"), useCompression=True)
                    for ch in range(len(channel_names)):
                        img = src / "imagesTr" / f"{case}_{ch:04d}{FILE_ENDING}"
                        if not img.is_file():
                            raise ConversionError(f"site {site.name!r}: case {case}: {img} is missing")
                        _link_or_copy(img, tmp / "imagesTr" / f"{new_case}_{ch:04d}{FILE_ENDING}")
                    case_annotated[new_case] = list(site.organs)
                    case_site[new_case] = site.name
                print(f"  {site.name}: {len(labels)} cases from {site.dataset} ({site.organs})", flush=True)
            generate_dataset_json(
                str(tmp), channel_names=channel_names, labels=reg.nnunet_labels(spec.labels),
                num_training_cases=len(case_annotated), file_ending=FILE_ENDING, dataset_name=final.name,
                description=f"sites of federation {spec.name!r} pooled by nnunetv2_fedkd merge; each case annotates "
                            f"only its site's organs (fedkd.case_annotated)",
                converted_by="nnunetv2_fedkd",
                overwrite_image_reader_writer=IMAGE_READER,
                fedkd={
                    "registry_version": reg.REGISTRY_VERSION,
                    "pooled_from": {s.name: {"dataset": s.dataset, "organs": s.organs} for s in spec.sites},
                    "annotated": list(spec.labels),
                    "case_annotated": case_annotated,
                    "case_site": case_site,
                },
            )
    except FileExistsError as e:
        raise ConversionError(str(e)) from None
    return final
