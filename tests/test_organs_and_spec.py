"""Organ registry and federation spec."""
import json

import pytest

from nnunetv2_fedkd.organs import (ORGANS, SOURCE_FORMATS, check_organs, default_label_set, label_mapping,
                                   RegistryError)
from nnunetv2_fedkd.spec import FederationSpec, Site, SpecError, check_datasets, load_spec, save_spec
from nnunetv2_fedkd.spec import TestSet as HeldOutSet  # (pytest would try to collect a name starting with Test)

REQUIRED = ["liver", "spleen", "kidney", "kidney_left", "kidney_right", "pancreas", "gallbladder", "stomach",
            "esophagus", "aorta", "inferior_vena_cava", "portal_splenic_vein", "adrenal_gland", "colon", "lung",
            "hepatic_vessel", "liver_tumour", "kidney_tumour", "pancreas_tumour", "colon_tumour", "lung_tumour",
            "kidney_cyst"]


def test_registry_has_every_required_structure_and_parents_exist():
    check_organs(REQUIRED)
    for o in ORGANS.values():
        assert o.parent is None or o.parent in ORGANS
        if o.kind == "tumour":
            assert o.parent is not None


def test_btcv_labels_follow_the_btcv_convention():
    btcv = SOURCE_FORMATS["btcv"].labels
    assert [btcv[i] for i in range(1, 14)] == [
        "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
        "inferior_vena_cava", "portal_splenic_vein", "pancreas", "adrenal_gland_right", "adrenal_gland_left"]


@pytest.mark.parametrize("fmt, default, keep", [
    ("lits", ["liver"], ["liver", "liver_tumour"]),
    ("kits23", ["kidney"], ["kidney", "kidney_tumour", "kidney_cyst"]),
    ("msd_lung", ["lung_tumour"], ["lung_tumour"]),  # the lung itself is not annotated: the tumour stays
    ("msd_hepaticvessel", ["hepatic_vessel", "liver_tumour"], ["hepatic_vessel", "liver_tumour"]),
    ("msd_spleen", ["spleen"], ["spleen"]),
])
def test_default_label_sets(fmt, default, keep):
    entries = SOURCE_FORMATS[fmt].labels.values()
    assert default_label_set(entries) == default
    assert default_label_set(entries, keep_tumour=True) == keep


def test_label_mapping_merges_into_nearest_listed_ancestor():
    vmap, merged = label_mapping(SOURCE_FORMATS["btcv"].labels, ["liver", "spleen", "kidney", "pancreas"])
    assert vmap[2] == vmap[3] == 3 and vmap[6] == 1 and vmap[1] == 2 and vmap[11] == 4
    assert vmap[4] == vmap[8] == 0  # gallbladder, aorta: outside the label set -> background
    assert merged["kidney"] == ["kidney_right", "kidney_left"]
    vmap, merged = label_mapping(SOURCE_FORMATS["kits23"].labels, ["kidney"])
    assert vmap == {1: 1, 2: 1, 3: 1}


def test_unknown_and_duplicate_organs_are_rejected():
    with pytest.raises(RegistryError, match="unknown organ"):
        check_organs(["liver", "livr"])
    with pytest.raises(RegistryError, match="more than once"):
        check_organs(["liver", "liver"])


def _spec(tmp_path, **over):
    sites = [Site("a", "Dataset501_A", ["liver"], source_format="lits", source_dir=tmp_path / "src_a"),
             Site("b", "Dataset502_B", ["kidney"])]
    kw = dict(name="f", labels=["liver", "kidney"], sites=sites, test_set=HeldOutSet("Dataset509_T", "btcv"))
    kw.update(over)
    return FederationSpec(**kw)


def test_spec_roundtrip(tmp_path):
    p = save_spec(_spec(tmp_path), tmp_path / "federation.toml")
    spec = load_spec(p)
    assert spec.labels == ["liver", "kidney"] and [s.name for s in spec.sites] == ["a", "b"]
    assert spec.sites[0].source_dir == (tmp_path / "src_a").resolve()
    assert spec.sites[0].dataset_id == 501 and spec.test_set.dataset_id == 509
    assert "src_a" in p.read_text() and str(tmp_path) not in p.read_text()  # paths stored relative


@pytest.mark.parametrize("change, message", [
    (dict(labels=["liver", "kidny"]), "unknown organ"),
    (dict(sites=[Site("a", "Dataset501_A", ["liver"]), Site("b", "Dataset501_B", ["kidney"])]),
     "duplicate dataset id 501"),
    (dict(sites=[Site("a", "Dataset501_A", ["liver"]), Site("a", "Dataset502_B", ["kidney"])]),
     "duplicate site name 'a'"),
    (dict(sites=[Site("a", "Dataset501_A", ["spleen"])]), "not in \\[federation\\].labels"),
    (dict(sites=[Site("a", "Liver", ["liver"])]), "not an nnU-Net dataset name"),
    (dict(sites=[Site("a", "Dataset501_A", ["liver"], source_format="dicom")]), "unknown source_format"),
    (dict(test_set=HeldOutSet("Dataset501_T")), "duplicate dataset id 501"),
])
def test_bad_specs_are_rejected(tmp_path, change, message):
    with pytest.raises(SpecError, match=message):
        save_spec(_spec(tmp_path, **change), tmp_path / "federation.toml")
    assert not (tmp_path / "federation.toml").exists()


def test_bad_spec_files(tmp_path):
    p = tmp_path / "f.toml"
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(p)
    p.write_text("[federation\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(p)
    p.write_text('[federation]\nlabels = ["liver"]\n[[sites]]\nname = "a"\norgans = ["liver"]\n')
    with pytest.raises(SpecError, match=r"sites\[0\] is missing required key 'dataset'"):
        load_spec(p)


@pytest.mark.parametrize("table, line, message", [
    ("[[sites]]", 'unlabeled_as_training = true',
     r"sites\[0\] \('a'\) has an unknown key 'unlabeled_as_training' \(did you mean 'unlabelled_as_training'\?\)"),
    ("[federation]", 'plan_dataset = "Dataset590_P"',
     r"\[federation\] has an unknown key 'plan_dataset' \(did you mean 'plans_dataset'\?\)"),
    ("[test_set]", 'colour = "red"', r"test_set has an unknown key 'colour'; its keys are dataset, "),
])
def test_a_misspelt_key_is_refused_not_ignored(tmp_path, table, line, message):
    """A typo in a spec key would silently fall back to the default (e.g. unlabelled images left out): refused,
    naming the table and the key it probably meant."""
    tables = {"[federation]": ['labels = ["liver"]'], "[[sites]]": ['name = "a"', 'dataset = "Dataset501_A"',
                                                                     'organs = ["liver"]'],
              "[test_set]": ['dataset = "Dataset509_T"']}
    tables[table].append(line)
    p = tmp_path / "f.toml"
    p.write_text("".join(f"{t}\n" + "\n".join(lines) + "\n" for t, lines in tables.items()))
    with pytest.raises(SpecError, match=message):
        load_spec(p)
    tables[table].pop()
    p.write_text("".join(f"{t}\n" + "\n".join(lines) + "\n" for t, lines in tables.items()))
    assert load_spec(p).sites[0].name == "a"


def test_check_datasets_against_dataset_json(tmp_path):
    spec = _spec(tmp_path)
    raw = tmp_path / "raw"
    with pytest.raises(SpecError, match="Dataset501_A/dataset.json does not exist"):
        check_datasets(spec, raw)
    for s, annotated in zip(spec.sites, (["liver"], ["liver"])):
        (raw / s.dataset).mkdir(parents=True)
        (raw / s.dataset / "dataset.json").write_text(json.dumps({"fedkd": {"annotated": annotated}}))
    with pytest.raises(SpecError, match="site 'b' says it annotates \\['kidney'\\], but .* records \\['liver'\\]"):
        check_datasets(spec, raw)
