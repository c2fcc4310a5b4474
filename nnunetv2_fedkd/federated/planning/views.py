"""Step 1: the site view datasets, every site's training cases in the federation's global label set (see
:mod:`nnunetv2_fedkd.federated.planning`).
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List

from nnunetv2_fedkd.data.pooled import (common_channel_names, global_label_values, write_global_dataset_json,
                                        write_remapped_cases)
from nnunetv2_fedkd.spec import FederationSpec, Site, check_datasets
from nnunetv2_fedkd.utils import atomic_output_dir
from nnunetv2_fedkd.federated.planning.layout import FederationLayout


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
