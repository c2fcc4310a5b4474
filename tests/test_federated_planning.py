"""Federated planning (`nnunetv2_fedkd plan`): site view datasets, fingerprint payloads, exact/approximate pooling,
one plan for all sites, plans identity checks, clear errors that leave nothing behind."""
import json
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_fedkd.data.conversion import ConversionError
from nnunetv2_fedkd.federated.planning import (CHANNEL_KEYS, NNUNET_FOREGROUND_SAMPLES, PAYLOAD_FORMAT,
                                               PAYLOAD_KEYS, PayloadError, PlansMismatch, build_site_views,
                                               check_site_plans, federation_plans_digest, merge_fingerprints,
                                               plan_federation, resolve_layout, site_fingerprint_payload,
                                               validate_payload)
from nnunetv2_fedkd.data.label_availability import LabelAvailability
from nnunetv2_fedkd.workflows.pipeline import nnunet_script
from nnunetv2_fedkd.spec import FederationSpec, Site, SpecError, load_spec, save_spec


# --------------------------------------------------------------------------------------------------------------------
# hand-made payloads, built the way nnU-Net's DatasetFingerprintExtractor summarises its samples
# --------------------------------------------------------------------------------------------------------------------
def _payload(site, per_case_samples, samples_per_case=None, rng=None):
    """Payload of a site whose cases drew ``per_case_samples`` (one array per case; empty = no foreground)."""
    rng = rng or np.random.default_rng(0)
    n_cases = len(per_case_samples)
    spc = samples_per_case or max(len(s) for s in per_case_samples)
    allv = np.concatenate([s for s in per_case_samples if len(s)])
    p00, med, p99 = np.percentile(allv, (0.5, 50.0, 99.5))
    c = sum(1 for s in per_case_samples if len(s))
    return {
        "format": PAYLOAD_FORMAT, "version": 1, "site": site, "dataset": f"Dataset6xx_{site}", "num_cases": n_cases,
        "samples_per_case": spc,
        "spacings": [[float(x) for x in rng.uniform(0.5, 3, 3)] for _ in range(n_cases)],
        "shapes_after_crop": [[int(x) for x in rng.integers(20, 60, 3)] for _ in range(n_cases)],
        "median_relative_size_after_cropping": float(rng.uniform(0.5, 1)),
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": float(np.mean(allv)), "median": float(med), "std": float(np.std(allv)),
            "min": float(np.min(allv)), "max": float(np.max(allv)), "percentile_99_5": float(p99),
            "percentile_00_5": float(p00), "n": c * spc, "num_cases_with_foreground": c}},
    }


def _cases(rng, n_cases, loc, scale, n=400):
    return [rng.normal(loc + 5 * i, scale, n) for i in range(n_cases)]


def test_merge_pools_mean_and_std_exactly_and_bounds_percentiles():
    rng = np.random.default_rng(1)
    sites = {"a": _cases(rng, 2, 60, 20), "b": _cases(rng, 3, 120, 40), "c": _cases(rng, 1, -30, 15)}
    payloads = [_payload(k, v, rng=rng) for k, v in sites.items()]
    fp = merge_fingerprints(payloads)
    everything = np.concatenate([s for v in sites.values() for s in v])
    st = fp["foreground_intensity_properties_per_channel"]["0"]
    assert st["mean"] == pytest.approx(np.mean(everything), rel=1e-6, abs=1e-6)
    assert st["std"] == pytest.approx(np.std(everything), rel=1e-6, abs=1e-6)  # nnU-Net: population std (ddof=0)
    assert st["min"] == np.min(everything) and st["max"] == np.max(everything)
    # spacings/shapes: the sites' per-case lists concatenated in payload order
    assert fp["spacings"] == [v for p in payloads for v in p["spacings"]]
    assert fp["shapes_after_crop"] == [v for p in payloads for v in p["shapes_after_crop"]]
    # documented approximations: outer bounds for the 0.5/99.5 percentiles, case-weighted mean of the medians
    site_st = [p["foreground_intensity_properties_per_channel"]["0"] for p in payloads]
    p00, p99 = np.percentile(everything, (0.5, 99.5))
    assert st["percentile_00_5"] == min(s["percentile_00_5"] for s in site_st) <= p00
    assert st["percentile_99_5"] == max(s["percentile_99_5"] for s in site_st) >= p99
    w = np.array([2, 3, 1])
    assert st["median"] == pytest.approx(float((w * [s["median"] for s in site_st]).sum() / 6))
    assert min(s["median"] for s in site_st) <= st["median"] <= max(s["median"] for s in site_st)
    rel = [p["median_relative_size_after_cropping"] for p in payloads]
    assert fp["median_relative_size_after_cropping"] == pytest.approx(float((w * rel).sum() / 6))
    assert set(st) == {"mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5"}  # nnU-Net's keys


def test_merge_weights_every_case_equally_like_a_central_run():
    """nnU-Net draws 1e8 // num_cases samples per case, so a 1-case site draws 3x more per case than a 3-case site.
    A central run weights every case equally; so does the merge (weights = cases with foreground, not n)."""
    rng = np.random.default_rng(2)
    a = _cases(rng, 3, 0, 10, n=100)
    b = [rng.normal(200, 30, 300)]
    empty_case = np.array([])  # a case without foreground draws no samples
    fp = merge_fingerprints([_payload("a", a + [empty_case], samples_per_case=100), _payload("b", b)])
    equal_per_case = np.concatenate([np.tile(x, 3) for x in a] + b)
    st = fp["foreground_intensity_properties_per_channel"]["0"]
    assert st["mean"] == pytest.approx(np.mean(equal_per_case), rel=1e-6)
    assert st["std"] == pytest.approx(np.std(equal_per_case), rel=1e-6)
    assert len(fp["spacings"]) == 5  # every case counts for the geometry, with or without foreground


def test_merge_refuses_inconsistent_payloads():
    rng = np.random.default_rng(3)
    p = _payload("a", _cases(rng, 2, 0, 1))
    with pytest.raises(PayloadError, match="duplicate site"):
        merge_fingerprints([p, p])
    q = _payload("b", _cases(rng, 2, 0, 1))
    q["foreground_intensity_properties_per_channel"]["1"] = q["foreground_intensity_properties_per_channel"]["0"]
    with pytest.raises(PayloadError, match="site 'b'.*channels"):
        merge_fingerprints([p, q])
    with pytest.raises(PayloadError, match="no payloads"):
        merge_fingerprints([])


def _write_case(folder, case, label_arr, spacing=(0.8, 0.8, 2.5)):
    img = sitk.GetImageFromArray((np.arange(label_arr.size).reshape(label_arr.shape) % 50 + 10).astype(np.int16))
    img.SetSpacing(spacing)
    lab = sitk.GetImageFromArray(label_arr.astype(np.uint8))
    lab.CopyInformation(img)
    sitk.WriteImage(img, str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
    sitk.WriteImage(lab, str(folder / "labelsTr" / f"{case}.nii.gz"))


def test_payload_holds_only_documented_summaries(tmp_path):
    view = tmp_path / "Dataset601_AFed"
    (view / "imagesTr").mkdir(parents=True)
    (view / "labelsTr").mkdir()
    for i in range(4):
        lab = np.zeros((6, 7, 8), np.uint8)
        if i != 2:  # case 2 has no foreground: nnU-Net draws no samples from it
            lab[2:4, 2:5, 3:6] = 3
        _write_case(view, f"c{i}", lab)
    stock = {  # a stock dataset_fingerprint.json, plus something a site must never send
        "spacings": [[2.5, 0.8, 0.8]] * 4, "shapes_after_crop": [[6, 7, 8]] * 4,
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": 30.0, "median": 29.0, "std": 5.0, "min": 10.0, "max": 59.0, "percentile_99_5": 58.0,
            "percentile_00_5": 11.0}},
        "median_relative_size_after_cropping": 1.0,
        "foreground_intensities": list(range(1000)),
    }
    payload = site_fingerprint_payload("a", view, stock)
    assert tuple(payload) == PAYLOAD_KEYS
    st = payload["foreground_intensity_properties_per_channel"]["0"]
    assert tuple(st) == CHANNEL_KEYS
    assert st["num_cases_with_foreground"] == 3
    assert payload["samples_per_case"] == int(1e8 // 4) and st["n"] == 3 * int(1e8 // 4)

    def lists(x):
        if isinstance(x, list):
            yield x
            for v in x:
                yield from lists(v)
        elif isinstance(x, dict):
            for v in x.values():
                yield from lists(v)

    assert all(len(v) <= payload["num_cases"] for v in lists(payload))  # per-case vectors only, no voxel data
    assert all(len(v) == 3 for key in ("spacings", "shapes_after_crop") for v in payload[key])
    json.dumps(payload, allow_nan=False)

    for tamper, match in [
        (lambda p: p.__setitem__("samples", [1.0] * 10), r"unexpected keys \['samples'\]"),
        (lambda p: p["spacings"].append([1.0, 1.0, 1.0]), "one vector per case"),
        (lambda p: p["foreground_intensity_properties_per_channel"]["0"].__setitem__("histogram", [0] * 256),
         "exactly the keys"),
        (lambda p: p["foreground_intensity_properties_per_channel"]["0"].__setitem__("n", 5), "n must be"),
        (lambda p: p["shapes_after_crop"].__setitem__(0, list(range(64))), "vectors of 2 or 3 numbers"),
    ]:
        bad = json.loads(json.dumps(payload))
        tamper(bad)
        with pytest.raises(PayloadError, match=rf"site 'a'.*{match}"):
            validate_payload(bad)


def test_foreground_sample_budget_matches_nnunet(tmp_path, monkeypatch):
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor as fe

    ds = tmp_path / "Dataset601_AFed"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    _write_case(ds, "c0", np.ones((3, 3, 3), np.uint8))
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                 "numTraining": 1, "file_ending": ".nii.gz"}))
    monkeypatch.setattr(fe, "nnUNet_raw", str(tmp_path))
    assert fe.DatasetFingerprintExtractor(ds.name, 1).num_foreground_voxels_for_intensitystats == \
        NNUNET_FOREGROUND_SAMPLES


def test_check_site_plans_ignores_only_the_dataset_name():
    plans = {"dataset_name": "Dataset600_FedPlans", "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": {"patch_size": [32, 32, 32], "spacing": [1.0, 1.0, 1.0]}}}
    digest = federation_plans_digest(plans)
    site = json.loads(json.dumps(plans))
    site["dataset_name"] = "Dataset601_AFed"
    check_site_plans("a", site, digest)
    site["configurations"]["3d_fullres"]["patch_size"] = [64, 32, 32]
    with pytest.raises(PlansMismatch, match="site 'a': plans 'nnUNetPlans' of 'Dataset601_AFed' differ"):
        check_site_plans("a", site, digest)


# --------------------------------------------------------------------------------------------------------------------
# spec and errors, on hand-made site datasets (no stock command runs: every error comes before them)
# --------------------------------------------------------------------------------------------------------------------
def _site_dataset(raw, name, organs, n_cases=2):
    root = raw / name
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        lab = np.zeros((3, 4, 5), np.uint8)
        lab[1, 1:3, 1:3] = 1
        _write_case(root, f"c{i}", lab)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, **{o: j + 1 for j, o in enumerate(organs)}},
        "numTraining": n_cases, "file_ending": ".nii.gz", "overwrite_image_reader_writer": "NibabelIOWithReorient",
        "fedkd": {"annotated": organs}}))


@pytest.fixture
def two_sites(tmp_path):
    raw = tmp_path / "nnUNet_raw"
    _site_dataset(raw, "Dataset501_A", ["kidney"])
    _site_dataset(raw, "Dataset502_B", ["liver"])
    spec = FederationSpec("demo", ["liver", "kidney"], [Site("a", "Dataset501_A", ["kidney"]),
                                                        Site("b", "Dataset502_B", ["liver"])])
    return tmp_path, spec


def _written(workdir):
    return sorted(p.name for root in ("nnUNet_raw", "nnUNet_preprocessed") if (workdir / root).is_dir()
                  for p in (workdir / root).iterdir() if not p.name.startswith("Dataset50"))


def test_default_ids_and_spec_round_trip(two_sites, tmp_path):
    workdir, spec = two_sites
    layout = resolve_layout(spec, workdir)
    assert layout.views == {"a": "Dataset601_AFed", "b": "Dataset602_BFed"}
    assert layout.coordinator == "Dataset600_DemoFedPlans"
    spec.sites[1].federated_dataset = "Dataset777_Bee"
    spec.plans_dataset = "Dataset776_Plans"
    loaded = load_spec(save_spec(spec, tmp_path / "fed.toml"))
    assert loaded.sites[1].federated_dataset == "Dataset777_Bee" and loaded.sites[0].federated_dataset is None
    layout = resolve_layout(loaded, workdir)
    assert layout.views["b"] == "Dataset777_Bee" and layout.coordinator == "Dataset776_Plans"
    loaded.sites[1].federated_dataset = "Dataset501_Clash"
    with pytest.raises(SpecError, match="duplicate dataset id 501"):
        save_spec(loaded, tmp_path / "fed.toml")
    loaded.sites[1].federated_dataset = "Dataset601_Clash"  # the default of site a
    with pytest.raises(SpecError, match="site 'b': federated dataset Dataset601_Clash has the id of site 'a'"):
        resolve_layout(loaded, workdir)
    big = FederationSpec("demo", ["liver"], [Site("z", "Dataset950_Z", ["liver"])])
    with pytest.raises(SpecError, match="site 'z'.*would be 1050"):
        resolve_layout(big, workdir)


def test_views_have_global_labels_and_case_level_availability(two_sites):
    workdir, spec = two_sites
    layout = resolve_layout(spec, workdir)
    views = build_site_views(spec, layout)
    dj = json.loads((views["a"] / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "liver": 1, "kidney": 2}
    assert dj["fedkd"]["annotated"] == ["kidney"] and dj["fedkd"]["site"] == "a"
    la = LabelAvailability(dj)
    assert la.annotated("c1") == ["kidney"] and la.softmax_mask(["c0"]).tolist() == [[True, False, True]]
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(views["a"] / "labelsTr" / "c0.nii.gz")))
    assert set(np.unique(arr)) == {0, 2}  # site a's kidney (1) is the global kidney (2)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(views["b"] / "labelsTr" / "c0.nii.gz")))
    assert set(np.unique(arr)) == {0, 1}
    src = workdir / "nnUNet_raw" / "Dataset501_A" / "imagesTr" / "c0_0000.nii.gz"
    assert (views["a"] / "imagesTr" / "c0_0000.nii.gz").stat().st_ino == src.stat().st_ino  # linked, not copied
    with pytest.raises(FileExistsError, match="site 'a'.*already exists"):
        build_site_views(spec, layout)


def test_plan_refuses_missing_dataset_and_writes_nothing(two_sites):
    workdir, spec = two_sites
    spec.sites.append(Site("c", "Dataset503_C", ["liver"]))
    with pytest.raises(SpecError, match=r"site 'c': .*Dataset503_C/dataset.json does not exist"):
        plan_federation(spec, workdir)
    assert _written(workdir) == []


def test_plan_refuses_site_labels_outside_the_federation_and_writes_nothing(two_sites):
    workdir, spec = two_sites
    spec.sites[0].organs = ["spleen"]  # not in [federation].labels
    with pytest.raises(SpecError, match="site 'a' annotates \\['spleen'\\], which are not in"):
        plan_federation(spec, workdir)
    spec.sites[0].organs = ["kidney"]
    dj_file = workdir / "nnUNet_raw" / "Dataset502_B" / "dataset.json"
    dj = json.loads(dj_file.read_text())
    dj["labels"]["liver_tumour"] = 2  # a label the federation does not have
    dj_file.write_text(json.dumps(dj))
    with pytest.raises(ConversionError, match="site 'b': .*label 'liver_tumour', which is not in the federation"):
        plan_federation(spec, workdir)
    assert _written(workdir) == []  # site a's view was built first and removed again


def test_plan_refuses_missing_labels_and_existing_targets(two_sites):
    workdir, spec = two_sites
    lab = workdir / "nnUNet_raw" / "Dataset502_B" / "labelsTr" / "c1.nii.gz"
    lab.rename(lab.with_suffix(".bak"))
    with pytest.raises(ConversionError, match=r"site 'b': case c1 has images .* but no label"):
        plan_federation(spec, workdir)
    assert _written(workdir) == []
    lab.with_suffix(".bak").rename(lab)
    (workdir / "nnUNet_raw" / "Dataset602_BFed").mkdir()
    with pytest.raises(FileExistsError, match="site 'b': .*Dataset602_BFed already exists; use --overwrite"):
        plan_federation(spec, workdir)
    assert _written(workdir) == ["Dataset602_BFed"]


# --------------------------------------------------------------------------------------------------------------------
# end to end on the synthetic federation
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_plan_end_to_end(tiny_federation, planned_federation):
    # the planned_federation fixture ran `nnunetv2_fedkd plan SPEC` (the CLI) on the tiny federation
    fed = tiny_federation
    spec_file = fed.spec.path

    spec = load_spec(spec_file)
    layout = resolve_layout(spec, fed.workdir)
    assert [layout.views[s.name] for s in spec.sites] == [
        "Dataset601_SynthLiverFed", "Dataset602_SynthKidneyFed", "Dataset603_SynthSpleenFed",
        "Dataset604_SynthPancreasFed"]
    coord = fed.preprocessed / layout.coordinator
    record = json.loads((coord / "federation_nnUNetPlans.json").read_text())
    digest = record["plans_digest"]
    assert digest == federation_plans_digest(json.loads((coord / "nnUNetPlans.json").read_text()))
    global_labels = {"background": 0, **{o: i + 1 for i, o in enumerate(spec.labels)}}

    site_fps = []
    for s in spec.sites:
        view = layout.views[s.name]
        assert record["sites"][s.name]["dataset"] == view
        pre = fed.preprocessed / view
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        assert plans["dataset_name"] == view
        check_site_plans(s.name, plans, digest)
        assert federation_plans_digest(plans) == digest
        dj = json.loads((pre / "dataset.json").read_text())
        assert dj == json.loads((fed.raw / view / "dataset.json").read_text())
        assert dj["labels"] == global_labels
        cases = sorted(f.name[:-len(".nii.gz")] for f in (fed.raw / view / "labelsTr").glob("*.nii.gz"))
        assert len(cases) == 5
        assert LabelAvailability(dj).annotated(cases[0]) == s.organs
        ident = plans["configurations"]["3d_fullres"]["data_identifier"]
        for c in cases:  # preprocessed data for every case
            for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
                assert (pre / ident / f"{c}{suffix}").is_file(), (view, c, suffix)
        # labels carry the global value of the site's organ where the site's own dataset has 1
        organ = s.organs[0]
        own = sitk.GetArrayFromImage(sitk.ReadImage(str(fed.raw / s.dataset / "labelsTr" / f"{cases[0]}.nii.gz")))
        new = sitk.GetArrayFromImage(sitk.ReadImage(str(fed.raw / view / "labelsTr" / f"{cases[0]}.nii.gz")))
        assert own.max() == 1 and np.array_equal(new, np.where(own == 1, global_labels[organ], 0))
        payload = json.loads((pre / "fedkd_fingerprint_payload.json").read_text())
        validate_payload(payload)
        assert payload == json.loads((coord / "site_fingerprints" / f"{s.name}.json").read_text())
        site_fps.append((payload["foreground_intensity_properties_per_channel"]["0"]["num_cases_with_foreground"],
                         json.loads((pre / "dataset_fingerprint.json").read_text())))

    merged = json.loads((coord / "dataset_fingerprint.json").read_text())
    w = np.array([c for c, _ in site_fps], dtype=float)
    means = np.array([fp["foreground_intensity_properties_per_channel"]["0"]["mean"] for _, fp in site_fps])
    assert w.tolist() == [5, 5, 5, 5]
    assert merged["foreground_intensity_properties_per_channel"]["0"]["mean"] == pytest.approx(
        float((w * means).sum() / w.sum()), rel=1e-9)
    assert merged["spacings"] == [v for _, fp in site_fps for v in fp["spacings"]]
    coord_dj = json.loads((fed.raw / layout.coordinator / "dataset.json").read_text())
    assert coord_dj["numTraining"] == 20 and coord_dj["labels"] == global_labels
    assert not list((fed.raw / layout.coordinator / "imagesTr").iterdir())  # the coordinator holds no images

    # a second run without --overwrite refuses, naming the site, and changes nothing
    proc = subprocess.run([nnunet_script("nnunetv2_fedkd"), "plan", str(spec_file)], env=fed.env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "site 'liver_site'" in proc.stderr and "--overwrite" in proc.stderr
    assert json.loads((coord / "federation_nnUNetPlans.json").read_text()) == record
