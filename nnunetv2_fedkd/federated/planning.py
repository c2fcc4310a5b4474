"""Federated planning (FednnU-Net style): ONE set of nnU-Net plans for every site, without pooling images.

``nnunetv2_fedkd plan SPEC [--plans-name nnUNetPlans] [--overwrite]`` (:func:`plan_federation`) runs five steps.
Everything that touches images runs at the site, on the site's own files; only fingerprint summaries travel.

1. **Site view datasets** (:func:`build_site_views`). Every site gets ``$nnUNet_raw/<view>``: its training cases in
   the federation's GLOBAL label set (background + ``[federation].labels``, label value = 1 + index), so one global
   model with the same output channels trains everywhere and stock nnU-Net tools work on every site. Labels are
   remapped with the code :func:`nnunetv2_fedkd.pooled_dataset.merge_sites` uses; images are hard-linked (copied
   where links are impossible), unchanged. dataset.json records under ``fedkd`` which organs the site annotates,
   per case (``case_annotated``, the table :class:`~nnunetv2_fedkd.label_availability.LabelAvailability` reads).
   The view's name is the site's ``federated_dataset`` in the spec, by default the site's dataset id + 100 and
   name + ``Fed`` (``Dataset501_SynthLiver`` -> ``Dataset601_SynthLiverFed``).
2. **Local fingerprints.** Stock ``nnUNetv2_extract_fingerprint -d <views> -np 2 --clean``; each site turns its
   ``dataset_fingerprint.json`` into a payload (:func:`site_fingerprint_payload`, written to
   ``$nnUNet_preprocessed/<view>/fedkd_fingerprint_payload.json``): per-case spacings and shapes after cropping, the
   median relative size after cropping, per-channel foreground intensity statistics and the sample counts exact
   pooling needs. Never voxels (:func:`validate_payload` refuses anything else).
3. **Merge** (:func:`merge_fingerprints`) into nnU-Net's ``dataset_fingerprint.json`` format, in the coordinator
   dataset (below).
4. **Plan once**: nnU-Net's ``ExperimentPlanner`` (or another stock planner, ``--planner``) on the merged fingerprint.
5. **Distribute**: stock ``move_plans_between_datasets`` copies the plans to every view (only ``dataset_name``
   changes), dataset.json is copied into each view's preprocessed folder, and every site preprocesses locally with
   stock ``nnUNetv2_preprocess -d <views> -plans_name NAME -c 3d_fullres -np 2``. Each site's plans are checked
   against the federation's digest (:func:`check_site_plans`), and the record (:func:`record_path`) is written last.

**The coordinator** is an nnU-Net dataset that holds no images: ``$nnUNet_raw/<plans dataset>/dataset.json`` (global
labels, the sites' channels, ``numTraining`` = all sites' cases, the image reader) and an empty ``imagesTr``;
``$nnUNet_preprocessed/<plans dataset>/`` holds the merged ``dataset_fingerprint.json``, the received payloads
(``site_fingerprints/<site>.json``), the plans and the federation record. The stock planner reads only dataset.json
and the fingerprint; it opens an image file for one thing only, to pick the reader/writer, and with dataset.json's
``overwrite_image_reader_writer`` set (as every dataset of this plugin has) the stock lookup returns that class
without reading the file. The planner run here is the stock class with exactly that method replaced by the lookup
without an example file (same class name, so the plans say ``"experiment_planner_used": "ExperimentPlanner"``).
The plans dataset is ``[federation].plans_dataset`` in the spec, by default
``Dataset{lowest view id - 1}_<Name>FedPlans`` (``Dataset600_SyntheticAbdomenFedPlans`` for views 601-604).

**Pooling the fingerprint** (what nnU-Net would compute on the pooled dataset, from summaries only):

- ``spacings``, ``shapes_after_crop``: the sites' per-case lists concatenated (exact).
- intensity ``mean`` and ``std``: exact. nnU-Net's extractor draws the same number of foreground voxels from every
  training case (``1e8 // num_cases``, with replacement; a case without foreground draws none) and reports
  ``np.mean`` and ``np.std`` of the union: population statistics (``ddof=0``) of the mixture that weights every case
  with foreground equally. A site's payload holds ``n`` (its sample count) and ``num_cases_with_foreground`` ``c``;
  pooling with weights ``c`` (``= n / samples_per_case``), ``mean = sum c_k m_k / C``, ``var = sum c_k (s_k^2 +
  (m_k - mean)^2) / C``, gives the population mean/std of the union of all sites' per-case samples, each case
  weighted equally: equal to ``np.mean``/``np.std`` of the concatenated samples when every case contributes the same
  number of samples, as in a central run.
- ``min``, ``max``: exact (min of the site minima, max of the site maxima).
- ``median``, ``percentile_00_5``, ``percentile_99_5``: APPROXIMATE; exact values would need the sites' samples or
  shared histograms. For a mixture, a pooled quantile always lies between the smallest and the largest site quantile.
  ``percentile_00_5`` = min over sites, ``percentile_99_5`` = max over sites: the outer bounds, so CT clipping keeps at
  least the intensity range the pooled percentiles would keep. ``median`` = the ``c``-weighted mean of the site
  medians (inside those bounds); nnU-Net's CT normalisation does not use it.
- ``median_relative_size_after_cropping``: APPROXIMATE, the case-weighted mean of the site medians (the planner
  compares it with 3/4 to decide mask-based normalisation for non-CT channels only).

Counting ``c``: a case counts when its label has a foreground voxel. nnU-Net samples inside the bounding box of the
image's nonzero voxels; a case whose whole foreground lies outside it (an image that is exactly 0 around the organ)
would be counted here but draw no samples there. CT images are not 0 around organs.

Every error about the inputs (missing site dataset or labels, organs outside the global labels, an existing target
without ``--overwrite``, id clashes, bad label files) is raised before anything appears in the nnU-Net folders. This
module writes atomically (temporary folder or file, then rename); the view datasets appear all together or not at
all; the files the stock commands write
(fingerprints, plans, preprocessed data) are nnU-Net's own. The federation record
``$nnUNet_preprocessed/<plans dataset>/federation_<plans name>.json`` is written last (and removed first by
``--overwrite``), so its presence means that planning and preprocessing finished.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from nnunetv2_fedkd import organs as reg
from nnunetv2_fedkd.env import subprocess_env
from nnunetv2_fedkd.federated.site_side import (  # noqa: F401  (re-exported)
    PlansMismatch,
    check_site_plans,
    federation_plans_digest,
    normalized_plans,
)
from nnunetv2_fedkd.pipeline import nnunet_script, run_command
from nnunetv2_fedkd.pooled_dataset import (FILE_ENDING, common_channel_names, federation_dataset_name,
                                           global_label_values, write_global_dataset_json, write_remapped_cases)
from nnunetv2_fedkd.spec import _DATASET_RE, FederationSpec, Site, SpecError, check_datasets, validate_spec
from nnunetv2_fedkd.utils import atomic_output_dir, atomic_write_json

__all__ = [
    "PAYLOAD_FORMAT", "PAYLOAD_KEYS", "CHANNEL_KEYS", "RECORD_FORMAT", "NNUNET_FOREGROUND_SAMPLES",
    "FederatedPlanningError", "PayloadError", "PlansMismatch", "FederationLayout", "resolve_layout",
    "build_site_views", "site_fingerprint_payload", "validate_payload", "merge_fingerprints",
    "write_coordinator_dataset", "normalized_plans", "federation_plans_digest", "check_site_plans", "record_path",
    "load_federation_record", "verify_site_plans", "plan_federation",
]

PAYLOAD_FORMAT = "nnunetv2_fedkd.fingerprint_payload"
PAYLOAD_VERSION = 1
RECORD_FORMAT = "nnunetv2_fedkd.federation_plans"
RECORD_VERSION = 1
# nnU-Net's DatasetFingerprintExtractor.num_foreground_voxels_for_intensitystats (nnunetv2 2.x): foreground intensity
# samples per dataset, split equally over the training cases (int(1e8 // num_cases) per case)
NNUNET_FOREGROUND_SAMPLES = 10e7
PAYLOAD_FILE = "fedkd_fingerprint_payload.json"

# the only keys a payload may have (validate_payload); per case: spacings and shapes_after_crop (one vector each)
PAYLOAD_KEYS = ("format", "version", "site", "dataset", "num_cases", "samples_per_case", "spacings",
                "shapes_after_crop", "median_relative_size_after_cropping",
                "foreground_intensity_properties_per_channel")
INTENSITY_KEYS = ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")  # nnU-Net's
CHANNEL_KEYS = INTENSITY_KEYS + ("n", "num_cases_with_foreground")


class FederatedPlanningError(RuntimeError):
    """A federated planning step cannot go on; the message names the site or file."""


class PayloadError(ValueError):
    """A site's fingerprint payload is malformed or holds more than the documented statistics."""


# --------------------------------------------------------------------------------------------------------------------
# layout: which datasets the federation's planning writes
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FederationLayout:
    raw: Path
    preprocessed: Path
    results: Optional[Path]
    views: Dict[str, str]  # site name -> view dataset (DatasetXXX_Name)
    coordinator: str  # the plans dataset

    def view_raw(self, site: str) -> Path:
        return self.raw / self.views[site]

    def view_preprocessed(self, site: str) -> Path:
        return self.preprocessed / self.views[site]

    @property
    def coordinator_raw(self) -> Path:
        return self.raw / self.coordinator

    @property
    def coordinator_preprocessed(self) -> Path:
        return self.preprocessed / self.coordinator


def _did(name: str) -> int:
    return int(_DATASET_RE.match(name).group(1))


def _nnunet_paths(workdir: Optional[Path]) -> Dict[str, Optional[Path]]:
    env = subprocess_env(workdir)
    out = {}
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        v = env.get(key)
        out[key] = Path(v) if v else None
    for key in ("nnUNet_raw", "nnUNet_preprocessed"):
        if out[key] is None:
            raise FederatedPlanningError(f"{key} is not set: set the nnU-Net variables "
                                         f"(eval \"$(nnunetv2_fedkd env --workdir DIR)\") or pass workdir")
    return out


def resolve_layout(spec: FederationSpec, workdir: Optional[Path] = None) -> FederationLayout:
    """The view dataset of every site and the coordinator's plans dataset, after checking that no id collides with
    a site's dataset, the test set, another view, or an existing dataset of another name (nnU-Net resolves ids by
    prefix, so two names for one id break it)."""
    validate_spec(spec)
    where = spec._where()
    paths = _nnunet_paths(workdir)
    owners: Dict[int, str] = {s.dataset_id: f"site {s.name!r}'s dataset {s.dataset}" for s in spec.sites}
    if spec.test_set is not None:
        owners[spec.test_set.dataset_id] = f"the test set {spec.test_set.dataset}"
    views: Dict[str, str] = {}
    for s in spec.sites:
        view = s.view_dataset
        if not _DATASET_RE.match(view):
            raise SpecError(f"{where}: site {s.name!r}: federated dataset {view!r} is not an nnU-Net dataset name")
        if _did(view) in owners:
            raise SpecError(f"{where}: site {s.name!r}: federated dataset {view} has the id of "
                            f"{owners[_did(view)]}; set federated_dataset = \"DatasetXXX_Name\" for the site")
        owners[_did(view)] = f"site {s.name!r}'s federated dataset {view}"
        views[s.name] = view
    if spec.plans_dataset:
        coordinator = spec.plans_dataset
    else:
        cid = min(_did(v) for v in views.values()) - 1
        coordinator = f"Dataset{cid:03d}_{federation_dataset_name(spec, 'FedPlans')}"
        why = "is below 1" if cid < 1 else f"is taken by {owners[cid]}" if cid in owners else \
            None if _DATASET_RE.match(coordinator) else f"gives the unusable name {coordinator!r}"
        if why:
            raise SpecError(f"{where}: the default plans dataset (id {cid}: lowest view id - 1) {why}; set "
                            f"[federation].plans_dataset = \"DatasetXXX_Name\"")
    if _did(coordinator) in owners:
        raise SpecError(f"{where}: [federation].plans_dataset {coordinator} has the id of "
                        f"{owners[_did(coordinator)]}")
    layout = FederationLayout(paths["nnUNet_raw"], paths["nnUNet_preprocessed"], paths["nnUNet_results"], views,
                              coordinator)
    targets = [(f"site {s}", v) for s, v in views.items()] + [("the plans dataset", coordinator)]
    for owner, name in targets:
        for root in (layout.raw, layout.preprocessed, layout.results):
            if root is None or not root.is_dir():
                continue
            clash = sorted(str(d) for d in root.glob(f"Dataset{_did(name):03d}_*") if d.is_dir() and d.name != name)
            if clash:
                raise SpecError(f"{where}: {owner}: dataset id {_did(name)} of {name} is already used by {clash}; "
                                f"nnU-Net would not know which one is meant (set another id in the spec)")
    return layout


def _check_targets(spec: FederationSpec, layout: FederationLayout, plans_name: str, overwrite: bool) -> None:
    if overwrite:
        return
    hint = "use --overwrite (overwrite=True) to rebuild the federation's datasets and plans"
    for s in spec.sites:
        for folder in (layout.view_raw(s.name), layout.view_preprocessed(s.name)):
            if folder.exists():
                raise FileExistsError(f"site {s.name!r}: {folder} already exists; {hint}")
    for folder in (layout.coordinator_raw, layout.coordinator_preprocessed):
        if folder.exists():
            raise FileExistsError(f"plans dataset: {folder} already exists; {hint}")


# --------------------------------------------------------------------------------------------------------------------
# 1. site view datasets
# --------------------------------------------------------------------------------------------------------------------
def _write_site_view(spec: FederationSpec, site: Site, raw: Path, tmp: Path, name: str,
                     channel_names: Dict[str, str], global_value: Dict[str, int]) -> Dict[str, List[str]]:
    (tmp / "imagesTr").mkdir()
    (tmp / "labelsTr").mkdir()
    cases = write_remapped_cases(site, raw, tmp, global_value)
    write_global_dataset_json(
        tmp, spec, channel_names, name, len(cases),
        description=f"site {site.name!r} of federation {spec.name!r} ({site.dataset}) in the federation's global "
                    f"label set, by nnunetv2_fedkd plan; the site annotates only {site.organs}",
        fedkd={
            "federation": spec.name,
            "site": site.name,
            "source_dataset": site.dataset,
            "annotated": list(site.organs),
            "case_annotated": cases,
            "case_site": {c: site.name for c in cases},
        },
    )
    return cases


def build_site_views(spec: FederationSpec, layout: FederationLayout, overwrite: bool = False) -> Dict[str, Path]:
    """Write every site's view dataset (step 1): all of them or, on any error, none (each is built in a temporary
    folder; all are renamed into place at the end). Returns site name -> folder."""
    raw = layout.raw
    check_datasets(spec, raw)
    channel_names = common_channel_names(spec, raw)
    global_value = global_label_values(spec)
    out: Dict[str, Path] = {}
    with ExitStack() as stack:
        for site in spec.sites:
            final = layout.view_raw(site.name)
            try:
                tmp = stack.enter_context(atomic_output_dir(final, overwrite))
            except FileExistsError as e:
                raise FileExistsError(f"site {site.name!r}: {e}") from None
            cases = _write_site_view(spec, site, raw, tmp, final.name, channel_names, global_value)
            print(f"  {site.name}: {len(cases)} cases from {site.dataset} -> {final.name} ({site.organs})",
                  flush=True)
            out[site.name] = final
    return out


# --------------------------------------------------------------------------------------------------------------------
# 2. site payloads
# --------------------------------------------------------------------------------------------------------------------
def _label_files(dataset_folder: Path) -> List[Path]:
    return sorted((dataset_folder / "labelsTr").glob(f"*{FILE_ENDING}"))


def site_fingerprint_payload(site_name: str, dataset_folder: Path, fingerprint: Mapping[str, Any]) -> Dict[str, Any]:
    """The payload a site sends to the coordinator, from its dataset's stock ``dataset_fingerprint.json``
    (``fingerprint``) and its labels (``dataset_folder`` = the view in nnUNet_raw; only read to count the cases with
    foreground). Keys: :data:`PAYLOAD_KEYS`; per channel :data:`CHANNEL_KEYS`."""
    dataset_folder = Path(dataset_folder)
    labels = _label_files(dataset_folder)
    n_cases = len(fingerprint["spacings"])
    if n_cases != len(labels) or n_cases != len(fingerprint["shapes_after_crop"]):
        raise FederatedPlanningError(
            f"site {site_name!r}: the fingerprint lists {n_cases} cases but {dataset_folder / 'labelsTr'} has "
            f"{len(labels)}; re-extract the fingerprint (nnUNetv2_extract_fingerprint --clean)")
    n_fg = sum(1 for f in labels if np.any(sitk.GetArrayFromImage(sitk.ReadImage(str(f))) > 0))
    samples_per_case = int(NNUNET_FOREGROUND_SAMPLES // n_cases)
    channels = {}
    for ch, stats in fingerprint["foreground_intensity_properties_per_channel"].items():
        channels[str(ch)] = {**{k: float(stats[k]) for k in INTENSITY_KEYS},
                             "n": samples_per_case * n_fg, "num_cases_with_foreground": n_fg}
    payload = {
        "format": PAYLOAD_FORMAT,
        "version": PAYLOAD_VERSION,
        "site": site_name,
        "dataset": dataset_folder.name,
        "num_cases": n_cases,
        "samples_per_case": samples_per_case,
        "spacings": [[float(x) for x in s] for s in fingerprint["spacings"]],
        "shapes_after_crop": [[int(x) for x in s] for s in fingerprint["shapes_after_crop"]],
        "median_relative_size_after_cropping": float(fingerprint["median_relative_size_after_cropping"]),
        "foreground_intensity_properties_per_channel": channels,
    }
    validate_payload(payload)
    return payload


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool))


def validate_payload(payload: Mapping[str, Any]) -> None:
    """Refuse (PayloadError naming the site) a payload that is not exactly the documented summary: unknown or
    missing keys, per-case lists of the wrong length, non-numbers, inconsistent sample counts. So nothing else (no
    voxel data) can reach the coordinator through it."""
    if not isinstance(payload, Mapping):
        raise PayloadError(f"fingerprint payload: expected a JSON object, got {type(payload).__name__}")
    who = f"fingerprint payload of site {payload.get('site')!r}"

    def bad(msg: str):
        raise PayloadError(f"{who}: {msg}")

    keys = set(payload)
    if keys != set(PAYLOAD_KEYS):
        extra, missing = sorted(keys - set(PAYLOAD_KEYS)), sorted(set(PAYLOAD_KEYS) - keys)
        bad(f"unexpected keys {extra}" if extra else f"missing keys {missing}")
    if payload["format"] != PAYLOAD_FORMAT or payload["version"] != PAYLOAD_VERSION:
        bad(f"format {payload['format']!r} version {payload['version']!r}, expected {PAYLOAD_FORMAT!r} "
            f"version {PAYLOAD_VERSION}")
    if not isinstance(payload["site"], str) or not isinstance(payload["dataset"], str):
        bad("'site' and 'dataset' must be strings")
    n = payload["num_cases"]
    if not _is_int(n) or n < 1:
        bad(f"num_cases must be a positive integer, got {n!r}")
    if not _is_int(payload["samples_per_case"]) or payload["samples_per_case"] < 1:
        bad(f"samples_per_case must be a positive integer, got {payload['samples_per_case']!r}")
    ndim = None
    for key in ("spacings", "shapes_after_crop"):
        per_case = payload[key]
        if not isinstance(per_case, list) or len(per_case) != n:
            bad(f"{key} must list one vector per case ({n})")
        for v in per_case:
            if not isinstance(v, list) or not all(_is_num(x) for x in v) or not 2 <= len(v) <= 3:
                bad(f"{key} entries must be vectors of 2 or 3 numbers, got {str(v)[:60]}")
            if ndim is None:
                ndim = len(v)
            elif len(v) != ndim:
                bad(f"{key}: vectors of different lengths")
    if not _is_num(payload["median_relative_size_after_cropping"]):
        bad("median_relative_size_after_cropping must be a number")
    channels = payload["foreground_intensity_properties_per_channel"]
    if not isinstance(channels, Mapping) or sorted(channels) != [str(i) for i in range(len(channels))] or \
            not channels:
        bad("foreground_intensity_properties_per_channel must map '0', '1', ... to statistics")
    for ch, st in channels.items():
        if not isinstance(st, Mapping) or set(st) != set(CHANNEL_KEYS):
            bad(f"channel {ch}: expected exactly the keys {list(CHANNEL_KEYS)}")
        if not all(_is_num(st[k]) for k in INTENSITY_KEYS):
            bad(f"channel {ch}: statistics must be numbers")
        c = st["num_cases_with_foreground"]
        if not _is_int(c) or not 0 <= c <= n:
            bad(f"channel {ch}: num_cases_with_foreground must be an integer in 0..{n}, got {c!r}")
        if not _is_int(st["n"]) or st["n"] != c * payload["samples_per_case"]:
            bad(f"channel {ch}: n must be num_cases_with_foreground x samples_per_case")
        if c > 0 and not all(math.isfinite(st[k]) for k in INTENSITY_KEYS):
            bad(f"channel {ch}: non-finite statistics")


# --------------------------------------------------------------------------------------------------------------------
# 3. merge
# --------------------------------------------------------------------------------------------------------------------
def merge_fingerprints(payloads: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Pool the sites' payloads into one fingerprint in nnU-Net's ``dataset_fingerprint.json`` format (what the
    planner reads). Exact: ``spacings``/``shapes_after_crop`` (concatenated in payload order), ``mean``/``std``
    (population statistics of all cases' foreground samples, every case with foreground weighted equally, as
    nnU-Net's extractor weights them), ``min``/``max``. Approximate (documented in the module docstring):
    ``median`` = case-weighted mean of the site medians, ``percentile_00_5`` = min and ``percentile_99_5`` = max of
    the site percentiles (outer bounds of the pooled percentiles), ``median_relative_size_after_cropping`` =
    case-weighted mean of the site medians."""
    if not payloads:
        raise PayloadError("merge_fingerprints: no payloads")
    for p in payloads:
        validate_payload(p)
    sites = [p["site"] for p in payloads]
    if len(set(sites)) != len(sites):
        raise PayloadError(f"merge_fingerprints: duplicate site payloads {sorted(sites)}")
    channels = sorted(payloads[0]["foreground_intensity_properties_per_channel"], key=int)
    ndim = len(payloads[0]["spacings"][0])
    for p in payloads[1:]:
        if sorted(p["foreground_intensity_properties_per_channel"], key=int) != channels:
            raise PayloadError(f"fingerprint payload of site {p['site']!r}: channels "
                               f"{sorted(p['foreground_intensity_properties_per_channel'])} differ from site "
                               f"{payloads[0]['site']!r}'s {channels}")
        if len(p["spacings"][0]) != ndim:
            raise PayloadError(f"fingerprint payload of site {p['site']!r}: {len(p['spacings'][0])}D cases, site "
                               f"{payloads[0]['site']!r} has {ndim}D")
    intensity = {}
    for ch in channels:
        stats = [(p["foreground_intensity_properties_per_channel"][ch]) for p in payloads]
        used = [st for st in stats if st["num_cases_with_foreground"] > 0]
        if not used:
            raise PayloadError(f"merge_fingerprints: channel {ch}: no site has a case with foreground")
        w = np.array([st["num_cases_with_foreground"] for st in used], dtype=np.float64)
        m = np.array([st["mean"] for st in used], dtype=np.float64)
        s = np.array([st["std"] for st in used], dtype=np.float64)
        total = w.sum()
        mean = float((w * m).sum() / total)
        var = float((w * (s ** 2 + (m - mean) ** 2)).sum() / total)
        intensity[ch] = {
            "mean": mean,
            "median": float((w * np.array([st["median"] for st in used])).sum() / total),
            "std": math.sqrt(max(var, 0.0)),
            "min": float(min(st["min"] for st in used)),
            "max": float(max(st["max"] for st in used)),
            "percentile_99_5": float(max(st["percentile_99_5"] for st in used)),
            "percentile_00_5": float(min(st["percentile_00_5"] for st in used)),
        }
    n_cases = np.array([p["num_cases"] for p in payloads], dtype=np.float64)
    rel = np.array([p["median_relative_size_after_cropping"] for p in payloads], dtype=np.float64)
    return {
        "spacings": [list(v) for p in payloads for v in p["spacings"]],
        "shapes_after_crop": [list(v) for p in payloads for v in p["shapes_after_crop"]],
        "foreground_intensity_properties_per_channel": intensity,
        "median_relative_size_after_cropping": float((n_cases * rel).sum() / n_cases.sum()),
    }


# --------------------------------------------------------------------------------------------------------------------
# 4. coordinator
# --------------------------------------------------------------------------------------------------------------------
def write_coordinator_dataset(spec: FederationSpec, layout: FederationLayout, payloads: Mapping[str, Mapping],
                              channel_names: Dict[str, str], overwrite: bool = False) -> Dict[str, Any]:
    """Write the coordinator's image-less raw dataset (dataset.json, empty imagesTr) and, in its preprocessed
    folder, the merged ``dataset_fingerprint.json`` and the received payloads. Returns the merged fingerprint."""
    ordered = [payloads[s.name] for s in spec.sites]
    fingerprint = merge_fingerprints(ordered)
    total = sum(p["num_cases"] for p in ordered)
    with atomic_output_dir(layout.coordinator_raw, overwrite) as tmp:
        (tmp / "imagesTr").mkdir()
        write_global_dataset_json(
            tmp, spec, channel_names, layout.coordinator, total,
            description=f"planning coordinator of federation {spec.name!r} (nnunetv2_fedkd plan): holds no images; "
                        f"numTraining counts the sites' cases; its dataset_fingerprint.json is merged from the "
                        f"sites' fingerprint payloads",
            fedkd={"federation": spec.name, "role": "plans coordinator", "sites": dict(layout.views),
                   "annotated": list(spec.labels)},
        )
    pre = layout.coordinator_preprocessed
    for s in spec.sites:
        atomic_write_json(pre / "site_fingerprints" / f"{s.name}.json", payloads[s.name])
    atomic_write_json(pre / "dataset_fingerprint.json", fingerprint)
    return fingerprint


# --------------------------------------------------------------------------------------------------------------------
# 5. plans identity
# --------------------------------------------------------------------------------------------------------------------
def record_path(layout: FederationLayout, plans_name: str = "nnUNetPlans") -> Path:
    """``$nnUNet_preprocessed/<plans dataset>/federation_<plans name>.json``, next to the plans it describes."""
    return layout.coordinator_preprocessed / f"federation_{plans_name}.json"


def load_federation_record(spec: FederationSpec, plans_name: str = "nnUNetPlans",
                           workdir: Optional[Path] = None) -> Dict[str, Any]:
    path = record_path(resolve_layout(spec, workdir), plans_name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `nnunetv2_fedkd plan {spec.path or 'SPEC'}` first")
    record = json.loads(path.read_text())
    if record.get("format") != RECORD_FORMAT:
        raise FederatedPlanningError(f"{path} is not a federation plans record")
    return record


def planned_case_counts(coordinator_preprocessed: Path, plans_name: Optional[str] = None) -> Dict[str, int]:
    """``{site: number of cases}`` the sites contributed when the federation was planned (the record
    ``federation_<plans_name>.json`` in the plans dataset's preprocessed folder, else the newest
    ``federation_*.json`` there: plans derived later, e.g. small plans, have none; empty if there is none). A site
    cannot train on more cases than were preprocessed for it, so this bounds the case count it may claim."""
    records = sorted(Path(coordinator_preprocessed).glob("federation_*.json"), key=lambda f: f.stat().st_mtime)
    exact = Path(coordinator_preprocessed) / f"federation_{plans_name}.json"
    if plans_name is not None and exact in records:
        records = [exact]
    for f in reversed(records):
        try:
            record = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            continue
        sites = record.get("sites") or {}
        return {name: int(entry["num_cases"]) for name, entry in sites.items()
                if isinstance(entry, dict) and _is_int(entry.get("num_cases")) and entry["num_cases"] > 0}
    return {}


def verify_site_plans(record: Mapping[str, Any]) -> None:
    """Check every site's plans file named in a federation record against the record's digest."""
    for site, entry in record["sites"].items():
        plans_file = Path(entry["plans_file"])
        if not plans_file.is_file():
            raise PlansMismatch(f"site {site!r}: plans file {plans_file} is missing")
        check_site_plans(site, json.loads(plans_file.read_text()), record["plans_digest"])


# --------------------------------------------------------------------------------------------------------------------
# the whole thing
# --------------------------------------------------------------------------------------------------------------------
def _worker(args: Sequence[str], env: Dict[str, str], log_file: Optional[Path]) -> float:
    """Run a step that uses nnU-Net's Python API in a fresh interpreter with the federation's nnU-Net environment
    (nnU-Net reads its path variables when first imported)."""
    return run_command([sys.executable, "-m", "nnunetv2_fedkd.federated.planning", *args], env, log_file)


def plan_federation(spec: FederationSpec, workdir: Optional[Path] = None, plans_name: str = "nnUNetPlans",
                    overwrite: bool = False, planner: str = "ExperimentPlanner",
                    configurations: Sequence[str] = ("3d_fullres",), num_processes: int = 2,
                    log_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Steps 1-5 of the module docstring for every site of ``spec``; returns the federation record (also written
    to :func:`record_path`). ``workdir``: as in :func:`nnunetv2_fedkd.env.subprocess_env` (None: the nnUNet_*
    variables of this process). Logs of the stock commands go to ``log_dir`` (default:
    ``$nnUNet_preprocessed/<plans dataset>/logs``)."""
    layout = resolve_layout(spec, workdir)
    check_datasets(spec, layout.raw)  # missing site datasets, spec/dataset.json disagreement
    channel_names = common_channel_names(spec, layout.raw)
    _check_targets(spec, layout, plans_name, overwrite)
    env = subprocess_env(workdir, cpu=True)
    log_dir = Path(log_dir) if log_dir else layout.coordinator_preprocessed / "logs"
    rec_file = record_path(layout, plans_name)
    if overwrite:  # stale results must not survive a failed re-run; the planner would also merge old configurations
        for stale in (rec_file, layout.coordinator_preprocessed / f"{plans_name}.json"):
            stale.unlink(missing_ok=True)
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    print(f"[1/5] site view datasets in the global label set {reg.nnunet_labels(spec.labels)}", flush=True)
    build_site_views(spec, layout, overwrite)
    timings["site_views"] = time.perf_counter() - t0
    view_ids = [str(_did(layout.views[s.name])) for s in spec.sites]

    print("[2/5] local fingerprints (stock nnUNetv2_extract_fingerprint) and site payloads", flush=True)
    timings["extract_fingerprint"] = run_command(
        [nnunet_script("nnUNetv2_extract_fingerprint"), "-d", *view_ids, "-np", str(num_processes), "--clean"], env,
        log_dir / "extract_fingerprint.log")
    payloads = {}
    for s in spec.sites:
        fp_file = layout.view_preprocessed(s.name) / "dataset_fingerprint.json"
        payload = site_fingerprint_payload(s.name, layout.view_raw(s.name), json.loads(fp_file.read_text()))
        atomic_write_json(layout.view_preprocessed(s.name) / PAYLOAD_FILE, payload)  # what the site sends
        payloads[s.name] = payload

    print(f"[3/5] merged fingerprint in {layout.coordinator}", flush=True)
    fingerprint = write_coordinator_dataset(spec, layout, payloads, channel_names, overwrite)

    print(f"[4/5] plan once: {planner} on the merged fingerprint", flush=True)
    timings["plan_experiment"] = _worker(["plan", layout.coordinator, plans_name, planner], env,
                                         log_dir / "plan_experiment.log")
    plans_file = layout.coordinator_preprocessed / f"{plans_name}.json"
    plans = json.loads(plans_file.read_text())
    digest = federation_plans_digest(plans)
    missing = [c for c in configurations if c not in plans["configurations"]]
    if missing:
        raise FederatedPlanningError(f"{plans_file} has no configuration {missing} (it has "
                                     f"{sorted(plans['configurations'])})")

    print(f"[5/5] distribute the plans (digest {digest[:12]}...) and preprocess at every site", flush=True)
    timings["move_plans"] = _worker(["receive", layout.coordinator, plans_name,
                                     *[layout.views[s.name] for s in spec.sites]], env, log_dir / "move_plans.log")
    for s in spec.sites:
        pre = layout.view_preprocessed(s.name)
        shutil.copyfile(layout.view_raw(s.name) / "dataset.json", pre / ".dataset.json.tmp")
        (pre / ".dataset.json.tmp").replace(pre / "dataset.json")
        check_site_plans(s.name, json.loads((pre / f"{plans_name}.json").read_text()), digest)
    timings["preprocess"] = run_command(
        [nnunet_script("nnUNetv2_preprocess"), "-d", *view_ids, "-plans_name", plans_name, "-c", *configurations,
         "-np", str(num_processes)], env, log_dir / "preprocess.log")
    sites = {}
    for s in spec.sites:
        pre = layout.view_preprocessed(s.name)
        cases = [f.name[: -len(FILE_ENDING)] for f in _label_files(layout.view_raw(s.name))]
        for c in configurations:
            ident = plans["configurations"][c].get("data_identifier")
            if ident is None:  # an inheriting configuration (3d_cascade_fullres) uses its parent's data
                continue
            absent = [k for k in cases if not (pre / ident / f"{k}.pkl").is_file()]
            if absent:
                raise FederatedPlanningError(f"site {s.name!r}: nnUNetv2_preprocess wrote no {ident} data for "
                                             f"{absent[:3]} in {pre} (log: {log_dir / 'preprocess.log'})")
        sites[s.name] = {"dataset": layout.views[s.name], "source_dataset": s.dataset, "organs": list(s.organs),
                         "num_cases": payloads[s.name]["num_cases"],
                         "plans_file": str(pre / f"{plans_name}.json")}
    record = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "federation": spec.name,
        "spec": str(spec.path) if spec.path else None,
        "plans_name": plans_name,
        "planner": planner,
        "plans_dataset": layout.coordinator,
        "plans_file": str(plans_file),
        "plans_digest": digest,
        "digest_of": "plans_digest(plans without 'dataset_name')",
        "configurations_preprocessed": list(configurations),
        "labels": reg.nnunet_labels(spec.labels),
        "sites": sites,
        "fingerprint": {
            "file": str(layout.coordinator_preprocessed / "dataset_fingerprint.json"),
            "num_cases": len(fingerprint["spacings"]),
            "case_weights": {s.name: payloads[s.name]["foreground_intensity_properties_per_channel"]["0"]
                             ["num_cases_with_foreground"] for s in spec.sites},
            "exact": ["spacings", "shapes_after_crop", "mean", "std", "min", "max"],
            "approximate": {"median": "case-weighted mean of the site medians",
                            "percentile_00_5": "min of the site values",
                            "percentile_99_5": "max of the site values",
                            "median_relative_size_after_cropping": "case-weighted mean of the site medians"},
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(rec_file, record)
    print(f"federation record: {rec_file} (seconds: {record['timings_s']})", flush=True)
    return record


# --------------------------------------------------------------------------------------------------------------------
# steps that use nnU-Net's Python API, run in a subprocess by plan_federation
# --------------------------------------------------------------------------------------------------------------------
def _stock_planner_without_example_image(planner_name: str):
    """The stock planner class ``planner_name`` with ``determine_reader_writer`` taking the reader/writer from
    dataset.json alone (the coordinator has no image to try); same class name, nothing else changed."""
    import nnunetv2
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    base = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "experiment_planning"), planner_name,
                                       current_module="nnunetv2.experiment_planning")
    if base is None:
        raise FederatedPlanningError(f"no nnU-Net experiment planner named {planner_name!r}")

    def determine_reader_writer(self):
        if self.dataset_json.get("overwrite_image_reader_writer") in (None, "None"):
            raise FederatedPlanningError("the plans dataset's dataset.json must name overwrite_image_reader_writer")
        return determine_reader_writer_from_dataset_json(self.dataset_json, None, verbose=False)

    return type(base.__name__, (base,), {"determine_reader_writer": determine_reader_writer,
                                         "__module__": __name__})


def _worker_main(argv: Sequence[str]) -> None:
    step, *rest = argv
    if step == "plan":
        dataset, plans_name, planner_name = rest
        planner = _stock_planner_without_example_image(planner_name)(dataset, plans_name=plans_name)
        planner.plan_experiment()
    elif step == "receive":
        from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
            move_plans_between_datasets

        source, plans_name, *targets = rest
        for target in targets:
            move_plans_between_datasets(source, target, plans_name, plans_name)
    else:
        raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
