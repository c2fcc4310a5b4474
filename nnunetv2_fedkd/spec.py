"""Federation spec: one TOML file naming the federation's global label set and its sites.

Example (``federation.toml``)::

    [federation]
    name = "synthetic-abdomen"
    labels = ["liver", "spleen", "kidney", "pancreas"]   # registry keys; label value = 1 + index
    plans_dataset = "Dataset600_SyntheticAbdomenFedPlans"  # optional: the planning coordinator's dataset
                                                           # (default: see nnunetv2_fedkd.federated.planning)

    [[sites]]
    name = "liver_site"
    dataset = "Dataset501_SynthLiver"     # nnU-Net dataset (DatasetXXX_Name) the site trains on
    organs = ["liver"]                    # what the site annotates (subset of federation.labels)
    location = "local"                    # "local" = in-process; anything else names a Flower SuperNode
    source_format = "lits"                # optional: how `nnunetv2_fedkd convert` makes the dataset
    source_dir = "sources/liver_site"     # optional, relative to this file
    federated_dataset = "Dataset601_SynthLiverFed"  # optional: the site's view dataset for `nnunetv2_fedkd plan`
                                                    # (default: dataset id + 100, name + "Fed")

    [test_set]                            # optional fully labelled external test set
    dataset = "Dataset509_SynthBTCV"
    source_format = "btcv"
    source_dir = "sources/test_btcv"

Paths are resolved relative to the spec file. ``load_spec`` validates the structure and the registry;
``check_datasets`` validates the spec against the converted datasets' dataset.json files.
"""
from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import tomli_w

from nnunetv2_fedkd.organs import RegistryError, check_organs
from nnunetv2_fedkd.utils import atomic_write_text

_DATASET_RE = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_\-]+)$")
# default id of a site's federated view dataset: the site's dataset id + this (``Site.view_dataset``)
FEDERATED_DATASET_ID_OFFSET = 100
CONVERTER_FORMATS = ("msd", "kits19", "kits21", "kits23", "lits", "btcv")
# the keys each table of a spec may hold: anything else is a typo that would be ignored silently, so it is refused
FEDERATION_KEYS = ("name", "labels", "plans_dataset")
SITE_KEYS = ("name", "dataset", "organs", "location", "source_format", "source_dir", "federated_dataset",
             "unlabelled_as_training")
TEST_SET_KEYS = ("dataset", "source_format", "source_dir")


class SpecError(ValueError):
    pass


@dataclass
class Site:
    name: str
    dataset: str
    organs: List[str]
    location: str = "local"
    source_format: Optional[str] = None
    source_dir: Optional[Path] = None
    federated_dataset: Optional[str] = None  # the site's view dataset in the global label set (see view_dataset)
    # convert-federation: the source's unlabelled images become training cases that annotate no organ (dual KD)
    unlabelled_as_training: bool = False

    @property
    def dataset_id(self) -> int:
        return int(_DATASET_RE.match(self.dataset).group(1))

    @property
    def view_dataset(self) -> str:
        """The site's federated view dataset (``nnunetv2_fedkd plan``): ``federated_dataset`` when the spec sets it,
        else ``Dataset{dataset id + 100}_{name}Fed`` (``Dataset501_SynthLiver`` -> ``Dataset601_SynthLiverFed``)."""
        if self.federated_dataset:
            return self.federated_dataset
        m = _DATASET_RE.match(self.dataset)
        did = int(m.group(1)) + FEDERATED_DATASET_ID_OFFSET
        if did > 999:
            raise SpecError(f"site {self.name!r}: the default federated dataset id of {self.dataset} would be {did} "
                            f"(> 999); set federated_dataset = \"DatasetXXX_Name\" for this site")
        return f"Dataset{did:03d}_{m.group(2)}Fed"


@dataclass
class TestSet:
    dataset: str
    source_format: Optional[str] = None
    source_dir: Optional[Path] = None

    @property
    def dataset_id(self) -> int:
        return int(_DATASET_RE.match(self.dataset).group(1))


@dataclass
class FederationSpec:
    name: str
    labels: List[str]
    sites: List[Site]
    test_set: Optional[TestSet] = None
    path: Optional[Path] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # unknown top-level tables, kept for tools that add them
    plans_dataset: Optional[str] = None  # the federated planning coordinator's dataset (nnunetv2_fedkd plan)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise SpecError(f"{self._where()}: no site named {name!r} (sites: {[s.name for s in self.sites]})")

    def _where(self) -> str:
        return str(self.path) if self.path else "federation spec"

    def to_dict(self) -> Dict[str, Any]:
        base = self.path.parent if self.path else None

        def rel(p: Optional[Path]) -> Optional[str]:
            if p is None:
                return None
            if base is not None:
                try:
                    return os.path.relpath(p, base)
                except ValueError:
                    pass
            return str(p)

        d: Dict[str, Any] = {"federation": {"name": self.name, "labels": list(self.labels)}, "sites": []}
        if self.plans_dataset:
            d["federation"]["plans_dataset"] = self.plans_dataset
        for s in self.sites:
            e: Dict[str, Any] = {"name": s.name, "dataset": s.dataset, "organs": list(s.organs), "location": s.location}
            if s.source_format:
                e["source_format"] = s.source_format
            if s.source_dir is not None:
                e["source_dir"] = rel(s.source_dir)
            if s.federated_dataset:
                e["federated_dataset"] = s.federated_dataset
            if s.unlabelled_as_training:
                e["unlabelled_as_training"] = True
            d["sites"].append(e)
        if self.test_set is not None:
            t: Dict[str, Any] = {"dataset": self.test_set.dataset}
            if self.test_set.source_format:
                t["source_format"] = self.test_set.source_format
            if self.test_set.source_dir is not None:
                t["source_dir"] = rel(self.test_set.source_dir)
            d["test_set"] = t
        d.update(self.extra)
        return d


def save_spec(spec: FederationSpec, path: os.PathLike) -> Path:
    path = Path(path).absolute()
    spec.path = path
    validate_spec(spec)
    atomic_write_text(path, tomli_w.dumps(spec.to_dict()))
    return path


def load_spec(path: os.PathLike) -> FederationSpec:
    path = Path(path).absolute()
    if not path.is_file():
        raise SpecError(f"federation spec {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from e
    return spec_from_dict(raw, path)


def spec_from_dict(raw: Dict[str, Any], path: Optional[Path] = None) -> FederationSpec:
    where = str(path) if path else "federation spec"
    base = path.parent if path else Path.cwd()

    def need(table: Dict[str, Any], key: str, ctx: str, typ):
        if key not in table:
            raise SpecError(f"{where}: {ctx} is missing required key {key!r}")
        val = table[key]
        if not isinstance(val, typ):
            raise SpecError(f"{where}: {ctx}.{key} must be {typ.__name__}, got {type(val).__name__}")
        return val

    def opt_path(table: Dict[str, Any], key: str) -> Optional[Path]:
        v = table.get(key)
        return None if v is None else (base / v).resolve()

    def opt_str(table: Dict[str, Any], key: str, ctx: str) -> Optional[str]:
        v = table.get(key)
        if v is not None and not isinstance(v, str):
            raise SpecError(f"{where}: {ctx}.{key} must be str, got {type(v).__name__}")
        return v

    def opt_bool(table: Dict[str, Any], key: str, ctx: str) -> bool:
        v = table.get(key, False)
        if not isinstance(v, bool):
            raise SpecError(f"{where}: {ctx}.{key} must be true or false, got {v!r}")
        return v

    def known_keys(table: Dict[str, Any], ctx: str, known) -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpecError(f"{where}: {ctx} has an unknown key {key!r}{hint}; its keys are {', '.join(known)}")

    fed = need(raw, "federation", "the file", dict)
    known_keys(fed, "[federation]", FEDERATION_KEYS)
    sites_raw = need(raw, "sites", "the file", list)
    sites = []
    for i, s in enumerate(sites_raw):
        ctx = f"sites[{i}]"
        if not isinstance(s, dict):
            raise SpecError(f"{where}: {ctx} must be a table")
        known_keys(s, f"{ctx} ({s['name']!r})" if isinstance(s.get("name"), str) else ctx, SITE_KEYS)
        organs = need(s, "organs", ctx, list)
        sites.append(
            Site(
                name=need(s, "name", ctx, str),
                dataset=need(s, "dataset", ctx, str),
                organs=[str(o) for o in organs],
                location=str(s.get("location", "local")),
                source_format=s.get("source_format"),
                source_dir=opt_path(s, "source_dir"),
                federated_dataset=opt_str(s, "federated_dataset", ctx),
                unlabelled_as_training=opt_bool(s, "unlabelled_as_training", ctx),
            )
        )
    test = None
    if "test_set" in raw:
        t = raw["test_set"]
        if not isinstance(t, dict):
            raise SpecError(f"{where}: test_set must be a table")
        known_keys(t, "test_set", TEST_SET_KEYS)
        test = TestSet(
            dataset=need(t, "dataset", "test_set", str),
            source_format=t.get("source_format"),
            source_dir=opt_path(t, "source_dir"),
        )
    extra = {k: v for k, v in raw.items() if k not in ("federation", "sites", "test_set")}
    spec = FederationSpec(
        name=str(fed.get("name", "federation")),
        labels=[str(x) for x in need(fed, "labels", "[federation]", list)],
        sites=sites,
        test_set=test,
        path=path,
        extra=extra,
        plans_dataset=opt_str(fed, "plans_dataset", "[federation]"),
    )
    validate_spec(spec)
    return spec


def validate_spec(spec: FederationSpec) -> None:
    """Structural checks: registry keys, subsets, unique names and dataset ids, known source formats."""
    where = spec._where()
    try:
        check_organs(spec.labels, f"{where} [federation].labels")
    except RegistryError as e:
        raise SpecError(str(e)) from e
    if not spec.labels:
        raise SpecError(f"{where}: [federation].labels is empty")
    if not spec.sites:
        raise SpecError(f"{where}: no [[sites]] given")
    names, ids = {}, {}
    datasets = [(s.name, s.dataset) for s in spec.sites]
    if spec.test_set is not None:
        datasets.append(("test_set", spec.test_set.dataset))
    # explicitly named federated datasets must not collide either (the default ids are checked when planning)
    datasets += [(f"{s.name} federated_dataset", s.federated_dataset) for s in spec.sites if s.federated_dataset]
    if spec.plans_dataset:
        datasets.append(("[federation].plans_dataset", spec.plans_dataset))
    for owner, ds in datasets:
        m = _DATASET_RE.match(ds)
        if not m:
            raise SpecError(f"{where}: {owner}: dataset {ds!r} is not an nnU-Net dataset name like Dataset501_Liver")
        did = int(m.group(1))
        if did in ids:
            raise SpecError(f"{where}: duplicate dataset id {did:03d} ({ids[did]} and {owner})")
        ids[did] = owner
    for s in spec.sites:
        if s.name in names:
            raise SpecError(f"{where}: duplicate site name {s.name!r}")
        names[s.name] = s
        if not s.organs:
            raise SpecError(f"{where}: site {s.name!r} annotates no organ")
        try:
            check_organs(s.organs, f"{where} site {s.name!r}")
        except RegistryError as e:
            raise SpecError(str(e)) from e
        outside = [o for o in s.organs if o not in spec.labels]
        if outside:
            raise SpecError(
                f"{where}: site {s.name!r} annotates {outside}, which are not in [federation].labels {spec.labels}"
            )
    for owner, fmt in [(s.name, s.source_format) for s in spec.sites] + (
        [("test_set", spec.test_set.source_format)] if spec.test_set else []
    ):
        if fmt is not None and fmt not in CONVERTER_FORMATS:
            raise SpecError(f"{where}: {owner}: unknown source_format {fmt!r} (known: {', '.join(CONVERTER_FORMATS)})")


def check_datasets(spec: FederationSpec, nnunet_raw: os.PathLike, sites: Optional[Sequence[str]] = None) -> None:
    """Check each site's converted dataset against the spec: it exists, and the organs its dataset.json records
    as annotated (key ``fedkd.annotated``) are the organs the spec says the site annotates. ``sites``: only these
    (names; default every site)."""
    import json

    where = spec._where()
    for s in spec.sites:
        if sites is not None and s.name not in sites:
            continue
        dj = Path(nnunet_raw) / s.dataset / "dataset.json"
        if not dj.is_file():
            raise SpecError(f"{where}: site {s.name!r}: {dj} does not exist (convert the site's data first)")
        meta = json.loads(dj.read_text()).get("fedkd")
        if meta is None:
            raise SpecError(f"{where}: site {s.name!r}: {dj} has no 'fedkd' entry; was it made by nnunetv2_fedkd convert?")
        annotated = list(meta.get("annotated", []))
        if sorted(annotated) != sorted(s.organs):
            raise SpecError(
                f"{where}: site {s.name!r} says it annotates {s.organs}, but {dj} records {annotated}"
            )
