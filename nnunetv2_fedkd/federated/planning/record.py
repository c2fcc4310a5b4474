"""Steps 4-5: the coordinator dataset (no images: dataset.json and the merged fingerprint) and the federation
record, written last, whose presence means that planning and preprocessing finished.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from nnunetv2_fedkd.federated.site_side import PlansMismatch, check_site_plans
from nnunetv2_fedkd.data.pooled import write_global_dataset_json
from nnunetv2_fedkd.spec import FederationSpec
from nnunetv2_fedkd.utils import atomic_output_dir, atomic_write_json
from nnunetv2_fedkd.federated.planning.fingerprints import _is_int, merge_fingerprints
from nnunetv2_fedkd.federated.planning.layout import FederatedPlanningError, FederationLayout, resolve_layout


RECORD_FORMAT = "nnunetv2_fedkd.federation_plans"
RECORD_VERSION = 1


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
