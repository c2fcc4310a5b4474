"""The organ registry: the one table of abdominal structures that converters, specs and trainers speak about.

Every converted dataset maps its source label values onto entries of this table, and every federation names its
global label set with these keys. An entry may have a ``parent``: the structure it lies inside and is merged into
when the parent is what a dataset annotates (a liver tumour is part of the liver, a left kidney is part of
"kidney"). Merging follows the parent chain, so ``kidney_left -> kidney`` and ``kidney_tumour -> kidney``.

Source formats (the public layouts the converters read) are also tables here: label value -> registry key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

REGISTRY_VERSION = 1


@dataclass(frozen=True)
class Organ:
    key: str  # canonical name used everywhere (spec files, dataset.json labels, trainer configs)
    display: str
    kind: str  # "organ", "vessel", "gland", "tumour"
    parent: Optional[str] = None  # structure this one lies inside and is merged into


_ORGAN_TABLE: Tuple[Organ, ...] = (
    # key                     display                         kind       parent
    Organ("liver", "liver", "organ"),
    Organ("spleen", "spleen", "organ"),
    Organ("kidney", "kidney (left and right)", "organ"),
    Organ("kidney_left", "left kidney", "organ", "kidney"),
    Organ("kidney_right", "right kidney", "organ", "kidney"),
    Organ("pancreas", "pancreas", "organ"),
    Organ("gallbladder", "gallbladder", "organ"),
    Organ("stomach", "stomach", "organ"),
    Organ("esophagus", "esophagus", "organ"),
    Organ("aorta", "aorta", "vessel"),
    Organ("inferior_vena_cava", "inferior vena cava", "vessel"),
    Organ("portal_splenic_vein", "portal and splenic vein", "vessel"),
    Organ("adrenal_gland", "adrenal glands (left and right)", "gland"),
    Organ("adrenal_gland_left", "left adrenal gland", "gland", "adrenal_gland"),
    Organ("adrenal_gland_right", "right adrenal gland", "gland", "adrenal_gland"),
    Organ("colon", "colon", "organ"),
    Organ("lung", "lung", "organ"),
    Organ("hepatic_vessel", "hepatic vessels", "vessel", "liver"),
    Organ("liver_tumour", "liver tumour", "tumour", "liver"),
    Organ("kidney_tumour", "kidney tumour", "tumour", "kidney"),
    Organ("kidney_cyst", "kidney cyst", "tumour", "kidney"),
    Organ("pancreas_tumour", "pancreas tumour", "tumour", "pancreas"),
    Organ("colon_tumour", "colon tumour", "tumour", "colon"),
    Organ("lung_tumour", "lung tumour", "tumour", "lung"),
)

ORGANS: Dict[str, Organ] = {o.key: o for o in _ORGAN_TABLE}
ORGAN_KEYS: Tuple[str, ...] = tuple(o.key for o in _ORGAN_TABLE)


@dataclass(frozen=True)
class SourceFormat:
    """A public dataset layout: which label value means which registry entry."""

    name: str
    description: str
    labels: Mapping[int, str]  # label value (0 = background, never listed) -> registry key


# Label conventions of the public datasets, from their own documentation / dataset.json files.
SOURCE_FORMATS: Dict[str, SourceFormat] = {
    f.name: f
    for f in (
        SourceFormat("msd_liver", "MSD Task03_Liver", {1: "liver", 2: "liver_tumour"}),
        SourceFormat("msd_lung", "MSD Task06_Lung", {1: "lung_tumour"}),
        SourceFormat("msd_pancreas", "MSD Task07_Pancreas", {1: "pancreas", 2: "pancreas_tumour"}),
        SourceFormat("msd_hepaticvessel", "MSD Task08_HepaticVessel", {1: "hepatic_vessel", 2: "liver_tumour"}),
        SourceFormat("msd_spleen", "MSD Task09_Spleen", {1: "spleen"}),
        SourceFormat("msd_colon", "MSD Task10_Colon", {1: "colon_tumour"}),
        SourceFormat("kits19", "KiTS19", {1: "kidney", 2: "kidney_tumour"}),
        SourceFormat("kits21", "KiTS21", {1: "kidney", 2: "kidney_tumour", 3: "kidney_cyst"}),
        SourceFormat("kits23", "KiTS23", {1: "kidney", 2: "kidney_tumour", 3: "kidney_cyst"}),
        SourceFormat("lits", "LiTS (Liver Tumor Segmentation challenge)", {1: "liver", 2: "liver_tumour"}),
        SourceFormat(
            "btcv",
            "BTCV (Beyond the Cranial Vault, abdomen, 13 labels)",
            {
                1: "spleen",
                2: "kidney_right",
                3: "kidney_left",
                4: "gallbladder",
                5: "esophagus",
                6: "liver",
                7: "stomach",
                8: "aorta",
                9: "inferior_vena_cava",
                10: "portal_splenic_vein",
                11: "pancreas",
                12: "adrenal_gland_right",
                13: "adrenal_gland_left",
            },
        ),
    )
}

# MSD task folder name -> source format
MSD_TASKS: Dict[str, str] = {
    "Task03_Liver": "msd_liver",
    "Task06_Lung": "msd_lung",
    "Task07_Pancreas": "msd_pancreas",
    "Task08_HepaticVessel": "msd_hepaticvessel",
    "Task09_Spleen": "msd_spleen",
    "Task10_Colon": "msd_colon",
}
# The "name" field of each official MSD task's dataset.json (compared lower case, letters and digits only) -> task
# folder name. The converter recognises a task by this first, so a folder its owner renamed still converts; the folder
# name is the fallback for a dataset.json without a known name.
MSD_DATASET_NAMES: Dict[str, str] = {
    "lits": "Task03_Liver",  # the official Task03_Liver dataset.json says "LITS"
    "liver": "Task03_Liver",
    "lung": "Task06_Lung",
    "pancreas": "Task07_Pancreas",
    "hepaticvessel": "Task08_HepaticVessel",
    "spleen": "Task09_Spleen",
    "colon": "Task10_Colon",
}
# MSD tasks that are not abdominal CT organ tasks (MRI): refused by name
MSD_UNSUPPORTED: Dict[str, str] = {
    "brats": "Task01_BrainTumour", "braintumour": "Task01_BrainTumour", "leftatrium": "Task02_Heart",
    "heart": "Task02_Heart", "hippocampus": "Task04_Hippocampus", "prostate": "Task05_Prostate",
}


class RegistryError(ValueError):
    pass


def check_organs(keys: Iterable[str], where: str = "") -> List[str]:
    """Return ``keys`` as a list, raising a clear error for any key that is not in the registry."""
    keys = list(keys)
    unknown = [k for k in keys if k not in ORGANS]
    if unknown:
        loc = f" in {where}" if where else ""
        raise RegistryError(
            f"unknown organ(s) {unknown}{loc}; known registry entries: {', '.join(ORGAN_KEYS)}"
        )
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise RegistryError(f"organ(s) {dup} listed more than once{' in ' + where if where else ''}")
    return keys


def ancestors(key: str) -> List[str]:
    """``key`` followed by its parent, grandparent, ... (e.g. kidney_tumour -> [kidney_tumour, kidney])."""
    chain = []
    cur: Optional[str] = key
    while cur is not None:
        chain.append(cur)
        cur = ORGANS[cur].parent
    return chain


def resolve_target(key: str, label_set: Sequence[str]) -> Optional[str]:
    """The entry of ``label_set`` that registry entry ``key`` is counted as: itself if listed, else its nearest
    listed ancestor, else None (the structure is not part of the label set and becomes background)."""
    for k in ancestors(key):
        if k in label_set:
            return k
    return None


def default_label_set(source_entries: Iterable[str], keep_tumour: bool = False) -> List[str]:
    """The label set a converter writes by default: one binary label per annotated organ, with tumours, cysts and
    sub-parts merged into their parent when the parent is annotated too (liver = liver U liver tumour). An entry whose
    parent is not annotated by the source (MSD Lung labels only the tumour) keeps its own label. With
    ``keep_tumour`` tumours and cysts stay separate labels."""
    entries = list(source_entries)
    out: List[str] = []
    for e in entries:
        target = e
        if not (keep_tumour and ORGANS[e].kind == "tumour"):
            # merge into the furthest annotated ancestor
            for a in ancestors(e)[1:]:
                if a in entries and not (keep_tumour and ORGANS[a].kind == "tumour"):
                    target = a
        if target not in out:
            out.append(target)
    return sort_by_registry(out)


def sort_by_registry(keys: Iterable[str]) -> List[str]:
    order = {k: i for i, k in enumerate(ORGAN_KEYS)}
    return sorted(set(keys), key=lambda k: order[k])


def label_mapping(
    source_labels: Mapping[int, str], label_set: Sequence[str]
) -> Tuple[Dict[int, int], Dict[str, List[str]]]:
    """Map source label values onto ``label_set`` (output value = 1 + index in label_set).

    Returns (value_map, merged): value_map[source_value] = output value (0 = background: the structure is outside
    the label set); merged[target] = the source registry entries that were merged into target.
    """
    check_organs(label_set, "label set")
    value_map: Dict[int, int] = {}
    merged: Dict[str, List[str]] = {k: [] for k in label_set}
    for value, key in sorted(source_labels.items()):
        target = resolve_target(key, label_set)
        value_map[int(value)] = 0 if target is None else 1 + list(label_set).index(target)
        if target is not None:
            merged[target].append(key)
    return value_map, merged


def nnunet_labels(label_set: Sequence[str]) -> Dict[str, int]:
    """The ``labels`` entry of an nnU-Net dataset.json for a label set (background = 0, then 1..n)."""
    out = {"background": 0}
    for i, k in enumerate(label_set):
        out[k] = i + 1
    return out
