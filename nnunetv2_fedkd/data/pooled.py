"""``nnunetv2_fedkd merge SPEC -d ID``: pool the sites' converted datasets into ONE partial-label nnU-Net dataset.

This is the central setting (allowed where data may be shared) and the base of every central trainer. Each site's
labels are remapped to the federation's global label set (background + ``[federation].labels``); organs a site does
not annotate stay 0 in its label maps, and dataset.json records per case which organs are annotated
(``fedkd.case_annotated``) and which site it came from (``fedkd.case_site``; case ids are ``<site>__<case>``).
The partial-label trainers read that table (:mod:`nnunetv2_fedkd.data.label_availability`).

The remapping helpers below (:func:`site_dataset_json`, :func:`common_channel_names`, :func:`write_remapped_cases`,
:func:`write_global_dataset_json`) are shared with the federated per-site view datasets
(:mod:`nnunetv2_fedkd.federated.planning`): a pooled dataset and a site's view carry identical label values.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunetv2_fedkd import organs as reg
from nnunetv2_fedkd.data.conversion.common import (IMAGE_READER, ConversionError, resolve_nnunet_raw,
                                                   target_folder)
from nnunetv2_fedkd.spec import FederationSpec, Site, check_datasets
from nnunetv2_fedkd.utils import atomic_output_dir

FILE_ENDING = ".nii.gz"


def _link_or_copy(src: Path, dst: Path) -> None:
    """Images are not changed: hard-link them when the file system allows, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def federation_dataset_name(spec: FederationSpec, suffix: str) -> str:
    """``synthetic-abdomen`` + ``Pooled`` -> ``SyntheticAbdomenPooled`` (a usable nnU-Net dataset name)."""
    return f"{''.join(p.capitalize() for p in spec.name.replace('-', '_').split('_'))}{suffix}"


def global_label_values(spec: FederationSpec) -> Dict[str, int]:
    """Organ -> label value in the federation's global label set (background 0, then 1..n in spec order)."""
    return {organ: i + 1 for i, organ in enumerate(spec.labels)}


def site_dataset_json(site: Site, raw: Path) -> Dict[str, Any]:
    """The site's converted dataset.json, after checking that it can be remapped (file ending, labels)."""
    src = Path(raw) / site.dataset
    dj_file = src / "dataset.json"
    if not dj_file.is_file():
        raise ConversionError(f"site {site.name!r}: {dj_file} does not exist (convert the site's data first)")
    dj = json.loads(dj_file.read_text())
    if dj.get("file_ending", FILE_ENDING) != FILE_ENDING:
        raise ConversionError(f"site {site.name!r}: {src} uses {dj.get('file_ending')}; "
                              f"convert it with nnunetv2_fedkd convert ({FILE_ENDING})")
    if "labels" not in dj or "channel_names" not in dj:
        raise ConversionError(f"site {site.name!r}: {dj_file} has no 'labels' or 'channel_names'")
    return dj


def common_channel_names(spec: FederationSpec, raw: Path) -> Dict[str, str]:
    """The sites' common ``channel_names`` (one model needs the same input channels everywhere)."""
    channel_names = None
    for site in spec.sites:
        dj = site_dataset_json(site, raw)
        if channel_names is None:
            channel_names = dj["channel_names"]
        elif dj["channel_names"] != channel_names:
            raise ConversionError(f"site {site.name!r}: {Path(raw) / site.dataset / 'dataset.json'} has channels "
                                  f"{dj['channel_names']}, other sites have {channel_names}")
    return channel_names


def _label_lut(site: Site, dj: Dict[str, Any], dj_file: Path,
               global_value: Dict[str, int]) -> Tuple[np.ndarray, set]:
    """Lookup table site label value -> global label value, and the site's allowed label values."""
    lut = np.zeros(256, dtype=np.uint8)
    for organ, value in dj["labels"].items():
        if organ == "background":
            continue
        if organ not in global_value:
            raise ConversionError(f"site {site.name!r}: {dj_file} has label {organ!r}, which is not in the "
                                  f"federation's labels {list(global_value)}")
        if not 0 < int(value) < 256:
            raise ConversionError(f"site {site.name!r}: {dj_file}: label {organ!r} has value {value} (1..255 "
                                  f"expected)")
        lut[int(value)] = global_value[organ]
    allowed = {0, *(int(v) for v in dj["labels"].values())}
    return lut, allowed


def write_remapped_cases(site: Site, raw: Path, dst: Path, global_value: Dict[str, int],
                         case_prefix: str = "") -> Dict[str, List[str]]:
    """Write every labelled training case of ``site``'s dataset into ``dst/imagesTr`` and ``dst/labelsTr`` (which
    must exist), as case ``<case_prefix><case>``: labels remapped to ``global_value`` (uint8, the label's geometry),
    images hard-linked (or copied) unchanged. Raises ConversionError naming the site and file for missing labels or
    images, label values outside the site's dataset.json, and site labels outside the global label set.
    Returns, per new case identifier (in the site's case order), the organs that case annotates: the site's organs,
    or what the site's dataset.json lists for it in ``fedkd.case_annotated`` (``[]`` for the unlabelled training
    cases of ``nnunetv2_fedkd convert --unlabelled-as-training``)."""
    src = Path(raw) / site.dataset
    dj = site_dataset_json(site, raw)
    per_case = (dj.get("fedkd") or {}).get("case_annotated") or {}
    for case, organs in per_case.items():
        if not isinstance(organs, list) or not set(organs) <= set(site.organs):
            raise ConversionError(f"site {site.name!r}: {src / 'dataset.json'} fedkd.case_annotated[{case!r}] is "
                                  f"{organs!r}: a list of organs the site annotates ({site.organs}) expected")
    site_value = {o: int(v) for o, v in dj["labels"].items() if o != "background"}
    n_channels = len(dj["channel_names"])
    lut, allowed = _label_lut(site, dj, src / "dataset.json", global_value)
    labels = sorted((src / "labelsTr").glob(f"*{FILE_ENDING}"))
    if not labels:
        raise ConversionError(f"site {site.name!r}: no labels in {src / 'labelsTr'}")
    labelled = {f.name[: -len(FILE_ENDING)] for f in labels}
    strays = sorted(set(per_case) - labelled)
    if strays:
        raise ConversionError(f"site {site.name!r}: {src / 'dataset.json'} fedkd.case_annotated lists {strays[0]!r}, "
                              f"which has no label in {src / 'labelsTr'}")
    unlabelled = sorted({f.name[: -len(FILE_ENDING) - 5] for f in (src / "imagesTr").glob(f"*{FILE_ENDING}")}
                        - labelled)
    if unlabelled:
        raise ConversionError(f"site {site.name!r}: case {unlabelled[0]} has images in {src / 'imagesTr'} but no "
                              f"label {src / 'labelsTr' / (unlabelled[0] + FILE_ENDING)}")
    new_cases: Dict[str, List[str]] = {}
    for lab_file in labels:
        case = lab_file.name[: -len(FILE_ENDING)]
        new_case = f"{case_prefix}{case}"
        images = [src / "imagesTr" / f"{case}_{ch:04d}{FILE_ENDING}" for ch in range(n_channels)]
        for img in images:
            if not img.is_file():
                raise ConversionError(f"site {site.name!r}: case {case}: {img} is missing")
        lab = sitk.ReadImage(str(lab_file))
        arr = sitk.GetArrayFromImage(lab)
        present = set(np.unique(arr).tolist())
        stray = sorted(present - allowed)
        if stray:
            raise ConversionError(f"site {site.name!r}: {lab_file} has values {stray} outside its "
                                  f"dataset.json labels {sorted(allowed)}")
        organs = list(per_case.get(case, site.organs))
        unannotated = sorted(o for o, v in site_value.items() if v in present and o not in organs)
        if unannotated:
            raise ConversionError(f"site {site.name!r}: {lab_file} labels {unannotated}, which dataset.json "
                                  f"fedkd.case_annotated says case {case!r} does not annotate ({organs})")
        out = sitk.GetImageFromArray(lut[arr.astype(np.uint8)])
        out.CopyInformation(lab)
        sitk.WriteImage(out, str(dst / "labelsTr" / f"{new_case}{FILE_ENDING}"), useCompression=True)
        for ch, img in enumerate(images):
            _link_or_copy(img, dst / "imagesTr" / f"{new_case}_{ch:04d}{FILE_ENDING}")
        new_cases[new_case] = organs
    return new_cases


def write_global_dataset_json(folder: Path, spec: FederationSpec, channel_names: Dict[str, str], dataset_name: str,
                              num_training_cases: int, description: str, fedkd: Dict[str, Any]) -> None:
    """dataset.json of a dataset in the federation's global label set (pooled dataset, site view, coordinator)."""
    generate_dataset_json(
        str(folder), channel_names=channel_names, labels=reg.nnunet_labels(spec.labels),
        num_training_cases=num_training_cases, file_ending=FILE_ENDING, dataset_name=dataset_name,
        description=description, converted_by="nnunetv2_fedkd", overwrite_image_reader_writer=IMAGE_READER,
        fedkd={"registry_version": reg.REGISTRY_VERSION, **fedkd},
    )


def merge_sites(spec: FederationSpec, dataset_id: int, dataset_name: Optional[str] = None,
                nnunet_raw: Optional[os.PathLike] = None, overwrite: bool = False) -> Path:
    """Write ``$nnUNet_raw/DatasetXXX_<name>`` pooling every site of ``spec``; returns the folder."""
    raw = resolve_nnunet_raw(nnunet_raw)
    check_datasets(spec, raw)
    name = dataset_name or federation_dataset_name(spec, "Pooled")
    final = target_folder(dataset_id, name, raw)
    global_value = global_label_values(spec)
    case_annotated: Dict[str, list] = {}
    case_site: Dict[str, str] = {}
    channel_names = common_channel_names(spec, raw)
    try:
        with atomic_output_dir(final, overwrite) as tmp:
            (tmp / "imagesTr").mkdir()
            (tmp / "labelsTr").mkdir()
            for site in spec.sites:
                cases = write_remapped_cases(site, raw, tmp, global_value, case_prefix=f"{site.name}__")
                for new_case, organs in cases.items():
                    case_annotated[new_case] = organs
                    case_site[new_case] = site.name
                print(f"  {site.name}: {len(cases)} cases from {site.dataset} ({site.organs})", flush=True)
            write_global_dataset_json(
                tmp, spec, channel_names, final.name, len(case_annotated),
                description=f"sites of federation {spec.name!r} pooled by nnunetv2_fedkd merge; each case annotates "
                            f"only its site's organs (fedkd.case_annotated)",
                fedkd={
                    "pooled_from": {s.name: {"dataset": s.dataset, "organs": s.organs} for s in spec.sites},
                    "annotated": list(spec.labels),
                    "case_annotated": case_annotated,
                    "case_site": case_site,
                },
            )
    except FileExistsError as e:
        raise ConversionError(str(e)) from None
    return final
