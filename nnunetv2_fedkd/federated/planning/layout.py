"""Which datasets the federation's planning writes: the site views, the coordinator (plans dataset), the nnU-Net
folders; and the refusal of existing targets without ``--overwrite``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from nnunetv2_fedkd.env import subprocess_env
from nnunetv2_fedkd.data.pooled import federation_dataset_name
from nnunetv2_fedkd.spec import _DATASET_RE, FederationSpec, SpecError, validate_spec


class FederatedPlanningError(RuntimeError):
    """A federated planning step cannot go on; the message names the site or file."""


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
