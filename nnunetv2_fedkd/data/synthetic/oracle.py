"""The fully labelled twin of a pooled synthetic federation: the training set of the accuracy benchmark's oracle.

Real federations cannot have one (nobody labelled every organ at every site), but the synthetic generator knows every
organ in every image it wrote: :func:`~nnunetv2_fedkd.data.synthetic.federation.site_phantom` renders case ``i`` of a site
again. :func:`write_fully_labelled_pool` copies a pooled dataset (``nnunetv2_fedkd merge``) with the same images and
every case's label map replaced by the full one (all federation organs), so a model trained on it with stock nnU-Net
is the upper bound the partial-label methods are measured against.

Which phantom a pooled case is comes from the converters' own scanners (the source file of case ``<site>__<case>``)
and the generator's ``synth_meta.json`` (the render index of every source file). The full map, in the source file's
voxel layout and geometry, is resampled (nearest neighbour, identity transform: the same physical space) onto the
pooled label's grid, and it must agree with the pooled label on every organ the site annotated - a case that does not
is an error naming it, never a silent mismatch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk

from nnunetv2_fedkd.data.conversion import _SCANNERS
from nnunetv2_fedkd.data.conversion.common import ConversionError, resolve_nnunet_raw, target_folder
from nnunetv2_fedkd.data.pooled import FILE_ENDING, _link_or_copy, global_label_values
from nnunetv2_fedkd.spec import load_spec
from nnunetv2_fedkd.data.synthetic.federation import META_NAME, SPEC_NAME, _kits_arrays, site_phantom
from nnunetv2_fedkd.utils import atomic_output_dir


def _full_label_image(meta: dict, site_meta: dict, index: int, values: Dict[str, int], source_image: Path,
                      test_image: bool = False):
    """Case ``index`` of the site (``test_image``: of its unlabelled images), every federation organ labelled
    (``values``: organ -> value), as a SimpleITK image on the source image's grid."""
    ph = site_phantom(meta["seed"], site_meta["name"], index, meta["size"], meta["with_tumours"],
                      test_image=test_image, fov_scale=meta["fov_scale"])
    full = ph.to_format({v: k for k, v in values.items()})
    if site_meta["layout"] == "kits23":
        _, full, _ = _kits_arrays(ph, ph.image, full)
    ref = sitk.ReadImage(str(source_image))
    img = sitk.GetImageFromArray(np.ascontiguousarray(full.transpose(2, 1, 0)))  # nibabel [x,y,z] -> sitk [z,y,x]
    if img.GetSize() != ref.GetSize():
        raise ConversionError(f"{source_image}: re-rendered label has size {img.GetSize()}, the file {ref.GetSize()} "
                              f"(was the federation written with the settings in {META_NAME}?)")
    img.CopyInformation(ref)
    return img


def write_fully_labelled_pool(federation_dir: os.PathLike, pooled_dataset: str, dataset_id: int,
                              dataset_name: Optional[str] = None, nnunet_raw: Optional[os.PathLike] = None,
                              overwrite: bool = False) -> Path:
    """Write ``$nnUNet_raw/DatasetXXX_<name>``: the pooled dataset ``pooled_dataset`` of the synthetic federation in
    ``federation_dir`` (the folder holding ``federation.toml`` and ``synth_meta.json``) with full label maps.
    Returns the folder. All or nothing (built in a temporary folder, then renamed)."""
    federation_dir = Path(federation_dir)
    raw = resolve_nnunet_raw(nnunet_raw)
    meta_file = federation_dir / META_NAME
    if not meta_file.is_file():
        raise ConversionError(f"{meta_file} does not exist: only a federation written by nnunetv2_fedkd.data.synthetic "
                              f"has the full label maps an oracle needs")
    meta = json.loads(meta_file.read_text())
    spec = load_spec(federation_dir / SPEC_NAME)
    pooled = raw / pooled_dataset
    dj = json.loads((pooled / "dataset.json").read_text())
    case_site: Dict[str, str] = dj.get("fedkd", {}).get("case_site", {})
    if not case_site:
        raise ConversionError(f"{pooled / 'dataset.json'} has no fedkd.case_site: not a pooled dataset "
                              f"(nnunetv2_fedkd merge)")
    values = global_label_values(spec)
    final = target_folder(dataset_id, dataset_name or f"{pooled_dataset.split('_', 1)[1]}FullyLabelled", raw)

    # pooled case -> (site meta, render index, is an unlabelled image, source image), through the converters' own
    # scanners (a site converted with unlabelled_as_training pools its unlabelled images too)
    where = {}
    for sm in meta["sites"]:
        site = spec.site(sm["name"])
        index_of = {}
        for unlabelled in (False, True):
            for i, rec in enumerate(c for c in sm["cases"] if (c["label"] is None) == unlabelled):
                index_of[(federation_dir / rec["image"]).resolve()] = (i, unlabelled)
        for case in _SCANNERS[site.source_format](Path(site.source_dir), site.source_format).cases:
            where[f"{site.name}__{case.case_id}"] = (sm, *index_of[Path(case.image_path).resolve()],
                                                     Path(case.image_path))
    annotated = dj.get("fedkd", {}).get("case_annotated", {})
    missing = sorted(set(case_site) - set(where))
    if missing:
        raise ConversionError(f"{pooled}: cases {missing[:3]} are not cases of the synthetic federation in "
                              f"{federation_dir}")

    with atomic_output_dir(final, overwrite) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case in sorted(case_site):
            sm, index, unlabelled, source_image = where[case]
            partial = sitk.ReadImage(str(pooled / "labelsTr" / f"{case}{FILE_ENDING}"))
            full = sitk.Resample(_full_label_image(meta, sm, index, values, source_image, test_image=unlabelled),
                                 partial, sitk.Transform(), sitk.sitkNearestNeighbor, 0, partial.GetPixelID())
            p, f = sitk.GetArrayViewFromImage(partial), sitk.GetArrayViewFromImage(full)
            for organ in annotated.get(case, spec.site(case_site[case]).organs):  # what this case annotates
                v = values[organ]
                if not np.array_equal(p == v, f == v):
                    raise ConversionError(f"{case}: the re-rendered {organ} differs from the pooled label in "
                                          f"{int(np.sum((p == v) != (f == v)))} voxels")
            sitk.WriteImage(full, str(tmp / "labelsTr" / f"{case}{FILE_ENDING}"), useCompression=True)
            for img in sorted((pooled / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{FILE_ENDING}")):
                _link_or_copy(img, tmp / "imagesTr" / img.name)
        fedkd = dict(dj["fedkd"])
        fedkd.update({"case_annotated": {c: list(spec.labels) for c in case_site},
                      "fully_labelled_from": pooled_dataset})
        dj.update({"name": final.name, "fedkd": fedkd,
                   "description": f"{pooled_dataset} with every organ labelled in every case (synthetic federation: "
                                  f"the oracle's training set)"})
        (tmp / "dataset.json").write_text(json.dumps(dj, indent=4) + "\n")
    return final
