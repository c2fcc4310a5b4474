"""A synthetic partial-label federation: four "hospitals" that each annotate one organ, in the public layouts their
real counterparts ship in, plus a fully labelled external test set, and the federation spec that ties them together.

::

    OUT_DIR/
      federation.toml                      spec (labels liver, spleen, kidney, pancreas; 4 sites; BTCV test set)
      synth_meta.json                      seed, size, scanners, and per case: files, spacing, lesions, volumes
      sources/
        liver_lits/Training Batch 1/volume-0.nii, segmentation-0.nii, ...   (and Training Batch 2/)
        kidney_kits23/dataset/case_00000/imaging.nii.gz, segmentation.nii.gz, ...
        Task09_Spleen/dataset.json, imagesTr/, labelsTr/, imagesTs/  (+ macOS ._* junk files)
        Task07_Pancreas/dataset.json, imagesTr/, labelsTr/, imagesTs/ (+ ._* junk files)
        btcv/RawData/Training/img/img0001.nii.gz, label/label0001.nii.gz, ...

Every image shows the whole abdomen (all organs, lesions included); each site's label file only carries the values of
its own source format (LiTS: liver 1, tumour 2; KiTS23: kidney 1, tumour 2, cyst 3; MSD spleen: 1; MSD pancreas:
pancreas 1, cancer 2; BTCV: its 13 organ values). Values come from ``organs.SOURCE_FORMATS``; a structure a format
does not label is background there.

Sites differ like scanners do (:data:`SITES`): field of view and scan length (so spacing and anisotropy), contrast
phase, HU calibration gain/offset, noise, blur, table, padding outside the reconstruction circle, stored dtype, and
(KiTS) the voxel axis order: KiTS volumes are stored slice axis first with a permuted affine, like the real files.

Deterministic: the same arguments give byte-identical files (every case has its own generator seeded by
(seed, site, case); gzip headers carry no time stamp).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np

from nnunetv2_fedkd import organs as reg
from nnunetv2_fedkd.spec import FederationSpec, Site, TestSet, save_spec
from nnunetv2_fedkd.utils import atomic_output_dir, atomic_write_json

from .phantom import Phantom, Scanner, jitter_scanner, organ_volumes_ml, render_phantom

DEFAULT_SIZE: Tuple[int, int, int] = (64, 64, 48)
MSD_TEST_IMAGES = 2  # unlabelled imagesTs/ cases per MSD task (besides cases_per_site)
TEST_SET_ID_OFFSET = 8  # the test set is Dataset<first_dataset_id + 8> (room for 4 more sites)
SPEC_NAME = "federation.toml"
META_NAME = "synth_meta.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SyntheticSite:
    name: str  # spec site name ("test_set" for the external test set)
    dataset_name: str  # nnU-Net dataset name without the DatasetXXX_ prefix
    id_offset: int  # dataset id = first_dataset_id + id_offset
    layout: str  # how the files are laid out: "lits", "kits23", "msd", "btcv"
    label_format: str  # key of organs.SOURCE_FORMATS: the label values written
    source_subdir: str  # folder under OUT_DIR/sources (an MSD task folder must be named like the task)
    stream: int  # random stream id (stable: adding sites never changes the others)
    scanner: Scanner
    image_dtype: str  # stored image dtype

    @property
    def spec_format(self) -> str:
        return "msd" if self.layout == "msd" else self.layout

    @property
    def annotated(self) -> List[str]:
        """Registry keys the site annotates (lesions merged into their organ), as the converters will label it."""
        return reg.default_label_set(reg.SOURCE_FORMATS[self.label_format].labels.values())


SITES: Tuple[SyntheticSite, ...] = (
    SyntheticSite("liver_site", "SynthLiver", 0, "lits", "lits", "liver_lits", 1,
                  Scanner("liver_site", fov_mm=400, z_coverage_mm=260, phase="portal_venous", gain=1.0, offset_hu=0.0,
                          noise_hu=12.0, blur_vox=(0.5, 0.5, 0.6), table_hu=120.0), "int16"),
    # KiTS's scans are late-arterial (~40 s: cortex brighter than medulla, the medulla already enhanced), the PHASES
    # entry "pancreatic". With the early "arterial" phase (medulla 95 HU, below the portal-venous liver) a kidney
    # teacher trained on 12 cases of this site scored .804 / .782 / .773 on the portal-venous test set after 960 /
    # 1920 / 3840 iterations (flat: the phase, not the budget); late-arterial, .847 after 1920 (seed 0, 48x48x40).
    SyntheticSite("kidney_site", "SynthKidney", 1, "kits23", "kits23", "kidney_kits23", 2,
                  Scanner("kidney_site", fov_mm=440, z_coverage_mm=300, phase="pancreatic", gain=1.03, offset_hu=10.0,
                          noise_hu=16.0, blur_vox=(0.4, 0.4, 0.9), table_hu=60.0), "float32"),
    SyntheticSite("spleen_site", "SynthSpleen", 2, "msd", "msd_spleen", "Task09_Spleen", 3,
                  Scanner("spleen_site", fov_mm=370, z_coverage_mm=225, phase="portal_venous", gain=0.97,
                          offset_hu=-15.0, noise_hu=8.0, blur_vox=(0.8, 0.8, 0.6), table_hu=None), "int16"),
    SyntheticSite("pancreas_site", "SynthPancreas", 3, "msd", "msd_pancreas", "Task07_Pancreas", 4,
                  Scanner("pancreas_site", fov_mm=460, z_coverage_mm=280, phase="pancreatic", gain=1.0, offset_hu=5.0,
                          noise_hu=22.0, blur_vox=(0.3, 0.3, 0.5), table_hu=180.0, outside_fov_hu=-2048.0), "int16"),
)
TEST_SITE = SyntheticSite("test_set", "SynthBTCV", TEST_SET_ID_OFFSET, "btcv", "btcv", "btcv", 9,
                          Scanner("test_set", fov_mm=420, z_coverage_mm=245, phase="portal_venous", gain=1.01,
                                  offset_hu=-5.0, noise_hu=14.0, blur_vox=(0.6, 0.6, 0.8), table_hu=100.0,
                                  outside_fov_hu=-1024.0), "int16")
# A second hospital per organ (``make_federation(num_sites=5..8)``): same layout, label format and scanner model,
# its own random stream (so its own cases and calibration jitter); the first four sites are unchanged by it.
SECOND_SITES: Tuple[SyntheticSite, ...] = tuple(
    replace(s, name=f"{s.name}_b", dataset_name=f"{s.dataset_name}B", id_offset=s.id_offset + len(SITES),
            source_subdir=f"{s.name}_b/{s.source_subdir}", stream=s.stream + 10,
            scanner=replace(s.scanner, name=f"{s.name}_b"))
    for s in SITES)
MAX_SITES = len(SITES) + len(SECOND_SITES)
ALL_SITES: Dict[str, SyntheticSite] = {s.name: s for s in SITES + SECOND_SITES + (TEST_SITE,)}

_MSD_META = {
    "Task09_Spleen": {"name": "Spleen", "description": "Spleen Segmentation (synthetic phantoms, nnunetv2_fedkd)",
                      "prefix": "spleen", "pad": 0},
    "Task07_Pancreas": {"name": "Pancreas",
                        "description": "Pancreas and cancer segmentation (synthetic phantoms, nnunetv2_fedkd)",
                        "prefix": "pancreas", "pad": 3},
}
_MSD_LABEL_NAMES = {"pancreas_tumour": "cancer"}  # MSD's own names where they differ from the registry key
_BTCV_FIRST_IDS = list(range(1, 11)) + list(range(21, 41))  # the real BTCV training ids skip 11..20


# --------------------------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------------------------
def site_scanner(seed: int, site: Union[str, SyntheticSite], fov_scale: float = 1.0) -> Scanner:
    """The site's scanner for this seed (its preset with a small seed-dependent calibration jitter). ``fov_scale``
    scales its field of view and scan length (< 1: a tighter crop around the upper abdomen, so organs get more
    voxels on a small grid)."""
    site = ALL_SITES[site] if isinstance(site, str) else site
    sc = jitter_scanner(site.scanner, np.random.default_rng([seed, site.stream, 0]))
    if fov_scale != 1.0:
        sc = replace(sc, fov_mm=round(sc.fov_mm * fov_scale, 2), z_coverage_mm=round(sc.z_coverage_mm * fov_scale, 2))
    return sc


def site_phantom(seed: int, site: Union[str, SyntheticSite], index: int, size: Sequence[int] = DEFAULT_SIZE,
                 with_tumours: bool = True, test_image: bool = False, fov_scale: float = 1.0) -> Phantom:
    """Case ``index`` of ``site`` exactly as :func:`make_federation` renders it (``test_image``: the MSD imagesTs
    cases). Useful to get the full label map of any written image."""
    site = ALL_SITES[site] if isinstance(site, str) else site
    rng = np.random.default_rng([seed, site.stream, 2 if test_image else 1, index])
    return render_phantom(rng, size, site_scanner(seed, site, fov_scale), with_tumours=with_tumours)


# --------------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------------
def _save_nifti(path: Path, arr: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _stored_image(ph: Phantom, dtype: str) -> np.ndarray:
    img = np.round(ph.image)
    if dtype == "int16":
        return np.clip(img, -32768, 32767).astype(np.int16)
    return img.astype(np.dtype(dtype))


def _kits_arrays(ph: Phantom, image: np.ndarray, label: np.ndarray):
    """KiTS order: first voxel axis = slices (superior -> inferior), then posterior, then the patient's left; the
    affine maps them back to the same RAS positions as :meth:`Phantom.affine_ras`."""
    sx, sy, sz = ph.spacing
    a = ph.affine_ras()
    nz = image.shape[2]
    aff = np.array([[0, 0, -sx, a[0, 3]], [0, -sy, 0, a[1, 3]], [-sz, 0, 0, a[2, 3] + sz * (nz - 1)], [0, 0, 0, 1]])

    def perm(x):
        return np.ascontiguousarray(x.transpose(2, 1, 0)[::-1])

    return perm(image), perm(label), aff


def _apple_double(rng: np.random.Generator) -> bytes:
    """A macOS AppleDouble ``._name`` file like the ones in the MSD tarballs (header + a few junk bytes)."""
    header = b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x02"
    return header + rng.integers(0, 256, int(rng.integers(16, 96)), dtype=np.uint8).tobytes()


def _case_record(ph: Phantom, out_dir: Path, image: Path, label: Optional[Path], label_values) -> dict:
    rec = {
        "image": image.relative_to(out_dir).as_posix(),
        "label": None if label is None else label.relative_to(out_dir).as_posix(),
        "spacing_xyz_mm": [round(s, 5) for s in ph.spacing],
        "phase": ph.info["phase"],
        "fov_mm": ph.info["fov_mm"],
        "lesions": ph.info["lesions"],
        "volumes_ml": organ_volumes_ml(ph),
    }
    if label is not None:
        rec["label_values"] = sorted(int(v) for v in label_values)
    return rec


def _render_site(site: SyntheticSite, seed: int, size, n_cases: int, n_test: int, with_tumours: bool,
                 tmp: Path, out_dir: Path, final_sources: Path, fov_scale: float = 1.0) -> dict:
    """Write one site's files under ``tmp/site.source_subdir``; returns its synth_meta entry (paths as they will be
    after the rename to ``final_sources``)."""
    fmt = reg.SOURCE_FORMATS[site.label_format]
    root = tmp / site.source_subdir
    final_root = final_sources / site.source_subdir
    scanner = site_scanner(seed, site, fov_scale)
    junk_rng = np.random.default_rng([seed, site.stream, 3])
    cases: List[dict] = []

    def record(ph, image, label, values):
        rel = lambda p: None if p is None else final_root / p.relative_to(root)  # noqa: E731
        cases.append(_case_record(ph, out_dir, rel(image), rel(label), values))

    def render(i, test=False):
        return site_phantom(seed, site, i, size, with_tumours, test_image=test, fov_scale=fov_scale)

    if site.layout == "lits":
        n_first = max(1, min(n_cases - 1, round(n_cases * 28 / 131))) if n_cases > 1 else 1
        for i in range(n_cases):
            ph = render(i)
            batch = root / ("Training Batch 1" if i < n_first else "Training Batch 2")
            lab = ph.to_format(fmt.labels)
            img_p, lab_p = batch / f"volume-{i}.nii", batch / f"segmentation-{i}.nii"
            _save_nifti(img_p, _stored_image(ph, site.image_dtype), ph.affine_ras())
            _save_nifti(lab_p, lab, ph.affine_ras())
            record(ph, img_p, lab_p, np.unique(lab))

    elif site.layout == "kits23":
        for i in range(n_cases):
            ph = render(i)
            lab = ph.to_format(fmt.labels)
            img, lab_k, aff = _kits_arrays(ph, _stored_image(ph, site.image_dtype), lab)
            case = root / "dataset" / f"case_{i:05d}"
            _save_nifti(case / "imaging.nii.gz", img, aff)
            _save_nifti(case / "segmentation.nii.gz", lab_k, aff)
            record(ph, case / "imaging.nii.gz", case / "segmentation.nii.gz", np.unique(lab))

    elif site.layout == "msd":
        meta = _MSD_META[Path(site.source_subdir).name]
        id_rng = np.random.default_rng([seed, site.stream, 4])
        ids = np.cumsum(1 + id_rng.integers(0, 3, n_cases + n_test)).tolist()  # non-contiguous, like the real ones
        test_pos = set(id_rng.choice(len(ids), n_test, replace=False).tolist()) if n_test else set()
        train_ids = [c for k, c in enumerate(ids) if k not in test_pos]
        test_ids = [c for k, c in enumerate(ids) if k in test_pos]
        name = lambda c: f"{meta['prefix']}_{c:0{meta['pad']}d}.nii.gz" if meta["pad"] else \
            f"{meta['prefix']}_{c}.nii.gz"  # noqa: E731
        junk: List[Path] = []
        for i, c in enumerate(train_ids):
            ph = render(i)
            lab = ph.to_format(fmt.labels)
            img_p, lab_p = root / "imagesTr" / name(c), root / "labelsTr" / name(c)
            _save_nifti(img_p, _stored_image(ph, site.image_dtype), ph.affine_ras())
            _save_nifti(lab_p, lab, ph.affine_ras())
            record(ph, img_p, lab_p, np.unique(lab))
            if i == 0 or junk_rng.uniform() < 0.4:
                junk += [img_p, lab_p]
        for i, c in enumerate(test_ids):
            ph = render(i, test=True)
            img_p = root / "imagesTs" / name(c)
            _save_nifti(img_p, _stored_image(ph, site.image_dtype), ph.affine_ras())
            record(ph, img_p, None, ())
            if i == 0:
                junk.append(img_p)
        (root / "imagesTs").mkdir(parents=True, exist_ok=True)
        labels = {"0": "background"}
        labels.update({str(v): _MSD_LABEL_NAMES.get(k, k) for v, k in sorted(fmt.labels.items())})
        dataset_json = {
            "name": meta["name"],
            "description": meta["description"],
            "reference": "synthetic (nnunetv2_fedkd.data.synthetic); layout of the Medical Segmentation Decathlon",
            "licence": "CC-BY-SA 4.0",
            "release": "1.0 synthetic",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": labels,
            "numTraining": len(train_ids),
            "numTest": len(test_ids),
            "training": [{"image": f"./imagesTr/{name(c)}", "label": f"./labelsTr/{name(c)}"} for c in train_ids],
            "test": [f"./imagesTs/{name(c)}" for c in test_ids],
        }
        (root / "dataset.json").write_text(json.dumps(dataset_json, indent=4) + "\n", encoding="utf-8")
        junk.append(root / "dataset.json")
        for p in junk:
            p.with_name("._" + p.name).write_bytes(_apple_double(junk_rng))

    elif site.layout == "btcv":
        for i in range(n_cases):
            ph = render(i)
            lab = ph.to_format(fmt.labels)
            n = _BTCV_FIRST_IDS[i] if i < len(_BTCV_FIRST_IDS) else _BTCV_FIRST_IDS[-1] + 1 + i - len(_BTCV_FIRST_IDS)
            base = root / "RawData" / "Training"
            img_p, lab_p = base / "img" / f"img{n:04d}.nii.gz", base / "label" / f"label{n:04d}.nii.gz"
            _save_nifti(img_p, _stored_image(ph, site.image_dtype), ph.affine_ras())
            _save_nifti(lab_p, lab, ph.affine_ras())
            record(ph, img_p, lab_p, np.unique(lab))
    else:  # pragma: no cover
        raise AssertionError(site.layout)

    return {
        "name": site.name,
        "layout": site.layout,
        "source_format": site.spec_format,
        "label_format": site.label_format,
        "label_values": {str(v): k for v, k in sorted(fmt.labels.items())},
        "annotated": site.annotated,
        "source_dir": final_root.relative_to(out_dir).as_posix(),
        "image_dtype": site.image_dtype,
        "file_axes": "slice (superior->inferior), posterior, patient's left (KiTS order)" if site.layout == "kits23"
        else "patient's left, posterior, superior (RAS affine diag(-sx, -sy, sz))",
        "scanner": scanner.to_dict(),
        "cases": cases,
    }


def _check_args(seed, size, cases_per_site, test_cases, first_dataset_id, num_sites) -> Tuple[int, int, int]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 8:
        raise ValueError(f"size must be three integers >= 8 (X Y Z voxels), got {size}")
    if int(cases_per_site) < 1:
        raise ValueError(f"cases_per_site must be >= 1, got {cases_per_site}")
    if isinstance(num_sites, bool) or not isinstance(num_sites, (int, np.integer)) or not 1 <= num_sites <= MAX_SITES:
        raise ValueError(f"num_sites must be an integer from 1 to {MAX_SITES}, got {num_sites!r}")
    if int(test_cases) < 0:
        raise ValueError(f"test_cases must be >= 0, got {test_cases}")
    if not 1 <= int(first_dataset_id) <= 999 - TEST_SET_ID_OFFSET:
        raise ValueError(f"first_dataset_id must be between 1 and {999 - TEST_SET_ID_OFFSET} (the test set uses "
                         f"first_dataset_id + {TEST_SET_ID_OFFSET}), got {first_dataset_id}")
    return size  # type: ignore[return-value]


def make_federation(
    out_dir: Union[str, os.PathLike],
    seed: int = 0,
    size: Sequence[int] = DEFAULT_SIZE,
    cases_per_site: int = 8,
    test_cases: int = 6,
    first_dataset_id: int = 501,
    with_tumours: bool = True,
    overwrite: bool = False,
    fov_scale: float = 1.0,
    num_sites: int = len(SITES),
    fully_labelled: bool = False,
) -> Path:
    """Write the synthetic federation under ``out_dir`` and return the path of its spec (``out_dir/federation.toml``).

    size: voxels (X, Y, Z) of every image; each site's scanner decides the spacing (its field of view and scan
        length divided by size), so the same body looks different in voxels at every site.
    cases_per_site: labelled training cases per site (the MSD tasks also get 2 unlabelled imagesTs cases).
    test_cases: cases of the fully labelled BTCV-layout test set (0: no test set).
    first_dataset_id: sites get DatasetXXX ids first_dataset_id .. +3, the test set first_dataset_id + 8.
    with_tumours: add liver/kidney/pancreas lesions (labelled where the source format has tumour/cyst labels).
    overwrite: replace an existing ``out_dir/sources`` and spec; otherwise they must not exist (an empty sources
        folder is fine). ``sources`` is built in a temporary sibling folder and renamed at the end: it is either
        complete or absent.
    fov_scale: scales every scanner's field of view and scan length (1: realistic 370-460 mm fields; 0.6: a
        tighter upper-abdominal crop, so small grids still give the small organs enough voxels to learn in a short
        CPU training).
    num_sites: how many of the sites (1-8): the four of :data:`SITES` (liver, kidney, spleen, pancreas), then a
        second site per organ from :data:`SECOND_SITES` (dataset ids first_dataset_id + 4 .. + 7), e.g. 8 to measure
        how a federation scales with its number of sites.
    fully_labelled: the federated oracle's data: the same sites, scanners and cases (the same images as without it,
        for the same seed and size), each site written in the BTCV layout with EVERY federation organ labelled
        (dataset names end in ``Full``). No real federation has it; it is the upper bound of federated training at a
        given budget, as the pooled fully labelled dataset (:mod:`nnunetv2_fedkd.data.synthetic.oracle`) is that of
        central training.
    """
    if not 0.2 <= float(fov_scale) <= 2.0:
        raise ValueError(f"fov_scale must be in [0.2, 2], got {fov_scale}")
    size = _check_args(seed, size, cases_per_site, test_cases, first_dataset_id, num_sites)
    sites = (SITES + SECOND_SITES)[:int(num_sites)]
    labels = reg.sort_by_registry(k for s in sites for k in s.annotated)
    if fully_labelled:  # same name, stream and scanner: the same phantoms; every organ labelled
        sites = tuple(replace(s, dataset_name=f"{s.dataset_name}Full", layout="btcv", label_format="btcv",
                              source_subdir=f"{s.name}/btcv") for s in sites)
    seed, cases_per_site, test_cases, first_dataset_id = int(seed), int(cases_per_site), int(test_cases), \
        int(first_dataset_id)
    out_dir = Path(out_dir).absolute()
    sources = out_dir / "sources"
    spec_path = out_dir / SPEC_NAME
    if sources.is_dir() and not any(sources.iterdir()):
        sources.rmdir()
    if not overwrite:
        for p in (sources, spec_path):
            if p.exists():
                raise FileExistsError(f"{p} already exists (pass overwrite=True / --overwrite to replace it)")
    out_dir.mkdir(parents=True, exist_ok=True)

    site_meta: List[dict] = []
    test_meta: Optional[dict] = None
    with atomic_output_dir(sources, overwrite=overwrite) as tmp:
        for site in sites:
            m = _render_site(site, seed, size, cases_per_site, MSD_TEST_IMAGES, with_tumours, tmp, out_dir, sources,
                             fov_scale)
            m["dataset"] = f"Dataset{first_dataset_id + site.id_offset:03d}_{site.dataset_name}"
            site_meta.append(m)
        if test_cases:
            test_meta = _render_site(TEST_SITE, seed, size, test_cases, 0, with_tumours, tmp, out_dir, sources,
                                     fov_scale)
            test_meta["dataset"] = f"Dataset{first_dataset_id + TEST_SITE.id_offset:03d}_{TEST_SITE.dataset_name}"

    if fully_labelled:
        for m in site_meta:
            m["annotated"] = list(labels)
    spec = FederationSpec(
        name="synthetic-abdomen",
        labels=labels,
        sites=[
            Site(name=m["name"], dataset=m["dataset"], organs=list(m["annotated"]), location="local",
                 source_format=m["source_format"], source_dir=out_dir / m["source_dir"])
            for m in site_meta
        ],
        test_set=None if test_meta is None else TestSet(dataset=test_meta["dataset"],
                                                        source_format=test_meta["source_format"],
                                                        source_dir=out_dir / test_meta["source_dir"]),
    )
    meta = {
        "generator": "nnunetv2_fedkd.data.synthetic",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "size": list(size),
        "cases_per_site": cases_per_site,
        "num_sites": len(sites),
        "test_cases": test_cases,
        "msd_test_images": MSD_TEST_IMAGES,
        "with_tumours": bool(with_tumours),
        "fov_scale": float(fov_scale),
        "fully_labelled": bool(fully_labelled),
        "first_dataset_id": first_dataset_id,
        "labels": labels,
        "phantom_axes": "x: patient's right->left, y: anterior->posterior, z: inferior->superior (LPS voxel order)",
        "sites": site_meta,
        "test_set": test_meta,
    }
    atomic_write_json(out_dir / META_NAME, meta)
    return save_spec(spec, spec_path)


__all__ = ["ALL_SITES", "DEFAULT_SIZE", "MAX_SITES", "SECOND_SITES", "SITES", "TEST_SITE", "SyntheticSite",
           "make_federation", "site_phantom", "site_scanner"]
