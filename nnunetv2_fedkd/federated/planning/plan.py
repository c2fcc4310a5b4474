"""``nnunetv2_fedkd plan SPEC``: the five steps of :mod:`nnunetv2_fedkd.federated.planning` for every site.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from nnunetv2_fedkd import organs as reg
from nnunetv2_fedkd.env import subprocess_env
from nnunetv2_fedkd.federated.site_side import check_site_plans, federation_plans_digest
from nnunetv2_fedkd.nnunet_commands import nnunet_script, run_command
from nnunetv2_fedkd.data.pooled import FILE_ENDING, common_channel_names
from nnunetv2_fedkd.spec import FederationSpec, check_datasets
from nnunetv2_fedkd.utils import atomic_write_json
from nnunetv2_fedkd.federated.planning.layout import FederatedPlanningError, _check_targets, _did, resolve_layout
from nnunetv2_fedkd.federated.planning.views import build_site_views
from nnunetv2_fedkd.federated.planning.fingerprints import PAYLOAD_FILE, _label_files, site_fingerprint_payload
from nnunetv2_fedkd.federated.planning.record import (RECORD_FORMAT, RECORD_VERSION, record_path,
                                                      write_coordinator_dataset)


def _worker(args: Sequence[str], env: Dict[str, str], log_file: Optional[Path]) -> float:
    """Run a step that uses nnU-Net's Python API in a fresh interpreter with the federation's nnU-Net environment
    (nnU-Net reads its path variables when first imported)."""
    return run_command([sys.executable, "-m", "nnunetv2_fedkd.federated.planning.stock_steps", *args], env, log_file)


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
