"""Steps 2-3: a site's fingerprint payload (summaries only, never voxels), its validation, and the merge of the
sites' payloads into nnU-Net's ``dataset_fingerprint.json`` format.

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
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from nnunetv2_fedkd.data.pooled import FILE_ENDING
from nnunetv2_fedkd.federated.planning.layout import FederatedPlanningError

PAYLOAD_FORMAT = "nnunetv2_fedkd.fingerprint_payload"
PAYLOAD_VERSION = 1
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


class PayloadError(ValueError):
    """A site's fingerprint payload is malformed or holds more than the documented statistics."""


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
