"""`nnunetv2_fedkd merge`: pooling site datasets into one partial-label dataset with per-case label availability."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_fedkd.data.conversion import ConversionError
from nnunetv2_fedkd.data.label_availability import LabelAvailability, LabelAvailabilityError
from nnunetv2_fedkd.data.pooled import merge_sites
from nnunetv2_fedkd.spec import FederationSpec, Site


def _site_dataset(raw, name, organs, n_cases, label_value_of_first=1):
    root = raw / name
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        img = sitk.GetImageFromArray(np.full((3, 4, 5), 100 + i, np.int16))
        img.SetSpacing((0.8, 0.8, 2.5))
        lab_arr = np.zeros((3, 4, 5), np.uint8)
        lab_arr[1, 1:3, 1:3] = label_value_of_first
        lab = sitk.GetImageFromArray(lab_arr)
        lab.CopyInformation(img)
        sitk.WriteImage(img, str(root / "imagesTr" / f"c{i}_0000.nii.gz"))
        sitk.WriteImage(lab, str(root / "labelsTr" / f"c{i}.nii.gz"))
    labels = {"background": 0, **{o: j + 1 for j, o in enumerate(organs)}}
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": n_cases, "file_ending": ".nii.gz",
        "fedkd": {"annotated": organs}}))


@pytest.fixture
def two_sites(tmp_path):
    raw = tmp_path / "raw"
    _site_dataset(raw, "Dataset501_A", ["kidney"], 2)
    _site_dataset(raw, "Dataset502_B", ["liver"], 1)
    spec = FederationSpec("demo", ["liver", "kidney"], [Site("a", "Dataset501_A", ["kidney"]),
                                                        Site("b", "Dataset502_B", ["liver"])])
    return raw, spec


def test_merge_keeps_the_unlabelled_training_cases_of_a_site(two_sites):
    """A site dataset converted with unlabelled training cases (fedkd.case_annotated [] for them) keeps them
    unlabelled in the pooled dataset and in the site's federated view, instead of claiming the site's organs there."""
    from nnunetv2_fedkd.federated.planning import _write_site_view
    from nnunetv2_fedkd.data.pooled import global_label_values

    raw, spec = two_sites
    dj_file = raw / "Dataset501_A" / "dataset.json"
    dj = json.loads(dj_file.read_text())
    dj["fedkd"]["case_annotated"] = {"c0": ["kidney"], "c1": []}
    dj_file.write_text(json.dumps(dj))
    # its label map still holds kidney voxels: a contradiction, refused naming the site, the file and the case
    with pytest.raises(ConversionError, match=r"site 'a': .*c1.nii.gz labels \['kidney'\], which dataset.json "
                                              r"fedkd.case_annotated says case 'c1' does not annotate"):
        merge_sites(spec, 512, nnunet_raw=raw)
    lab_file = raw / "Dataset501_A" / "labelsTr" / "c1.nii.gz"
    lab = sitk.ReadImage(str(lab_file))
    empty = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(lab)))
    empty.CopyInformation(lab)
    sitk.WriteImage(empty, str(lab_file))
    pooled = json.loads((merge_sites(spec, 510, nnunet_raw=raw) / "dataset.json").read_text())
    assert pooled["fedkd"]["case_annotated"] == {"a__c0": ["kidney"], "a__c1": [], "b__c0": ["liver"]}
    assert LabelAvailability(pooled).softmax_mask(["a__c1"]).tolist() == [[True, False, False]]
    view = raw / "view"
    view.mkdir()
    _write_site_view(spec, spec.sites[0], raw, view, "Dataset601_AFed", {"0": "CT"}, global_label_values(spec))
    assert json.loads((view / "dataset.json").read_text())["fedkd"]["case_annotated"] == {"c0": ["kidney"], "c1": []}
    # a table naming an organ the site does not annotate, or a case it does not have, is refused by site and file
    for table, message in (({"c0": ["liver"], "c1": []}, r"fedkd.case_annotated\['c0'\] is \['liver'\]"),
                           ({"c0": "kidney", "c1": []}, r"fedkd.case_annotated\['c0'\] is 'kidney'"),
                           ({"c0": ["kidney"], "c1": [], "c9": []}, r"lists 'c9', which has no label")):
        dj["fedkd"]["case_annotated"] = table
        dj_file.write_text(json.dumps(dj))
        with pytest.raises(ConversionError, match=r"site 'a': .*" + message):
            merge_sites(spec, 511, nnunet_raw=raw)


def test_merge_remaps_labels_and_records_availability(two_sites):
    raw, spec = two_sites
    out = merge_sites(spec, 510, nnunet_raw=raw)
    assert out.name == "Dataset510_DemoPooled"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "liver": 1, "kidney": 2} and dj["numTraining"] == 3
    assert dj["fedkd"]["case_annotated"] == {"a__c0": ["kidney"], "a__c1": ["kidney"], "b__c0": ["liver"]}
    assert dj["fedkd"]["case_site"]["b__c0"] == "b"
    # site a's kidney (value 1) is the global kidney (value 2); site b's liver stays 1
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "a__c0.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "b__c0.nii.gz")))
    assert set(np.unique(a)) == {0, 2} and set(np.unique(b)) == {0, 1}
    img = sitk.ReadImage(str(out / "imagesTr" / "a__c1_0000.nii.gz"))
    assert np.allclose(img.GetSpacing(), (0.8, 0.8, 2.5)) and sitk.GetArrayFromImage(img).max() == 101

    la = LabelAvailability(dj)
    assert la.label_names == ["liver", "kidney"]
    assert la.softmax_mask(["b__c0", "a__c1"]).tolist() == [[True, True, False], [True, False, True]]
    assert la.foreground_mask(["a__c0"]).tolist() == [[False, True]]
    with pytest.raises(LabelAvailabilityError, match="'zz' is not in dataset.json"):
        la.annotated("zz")


def test_merge_refuses_a_site_whose_dataset_disagrees_and_writes_nothing(two_sites):
    raw, spec = two_sites
    spec.sites[1].organs = ["kidney"]
    with pytest.raises(Exception, match="site 'b' says it annotates"):
        merge_sites(spec, 510, nnunet_raw=raw)
    assert not list(raw.glob("Dataset510_*")) and not list(raw.glob(".Dataset510*"))


def test_merge_refuses_stray_label_values(two_sites, tmp_path):
    raw, spec = two_sites
    bad = raw / "Dataset501_A" / "labelsTr" / "c1.nii.gz"
    lab = sitk.ReadImage(str(bad))
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 7
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(lab)
    sitk.WriteImage(out, str(bad))
    with pytest.raises(ConversionError, match=r"c1.nii.gz has values \[7\]"):
        merge_sites(spec, 510, nnunet_raw=raw)
    assert not list(raw.glob("Dataset510_*")) and not list(raw.glob(".Dataset510*"))


def test_single_site_dataset_has_one_annotated_set_and_plain_datasets_are_fully_annotated():
    la = LabelAvailability({"labels": {"background": 0, "liver": 1, "kidney": 2}, "fedkd": {"annotated": ["kidney"]}})
    assert la.softmax_mask(["anything"]).tolist() == [[True, False, True]]
    la = LabelAvailability({"labels": {"background": 0, "liver": [1], "kidney": [2]}})
    assert la.foreground_mask(["x", "y"]).all()
    assert la.annotating_nothing(["x", "y"]) == []


def test_cases_annotating_nothing():
    la = LabelAvailability({"labels": {"background": 0, "liver": 1},
                            "fedkd": {"annotated": ["liver"], "case_annotated": {"a": ["liver"], "u1": [], "u2": []}}})
    assert la.annotating_nothing() == ["u1", "u2"]
    assert la.annotating_nothing(["u2", "a", "not_in_table"]) == ["u2"]
    assert la.foreground_mask(["u1"]).tolist() == [[False]]


def test_fully_labelled_pool_of_a_synthetic_federation(tmp_path):
    """The oracle's training set: the pooled cases with every organ labelled, equal to the pooled labels on the
    organs each site annotated; a pooled label that does not match its phantom is an error naming the case."""
    from nnunetv2_fedkd.workflows.pipeline import convert_federation
    from nnunetv2_fedkd.data.pooled import global_label_values
    from nnunetv2_fedkd.spec import load_spec
    from nnunetv2_fedkd.data.synthetic import make_federation
    from nnunetv2_fedkd.data.synthetic.oracle import write_fully_labelled_pool

    spec = load_spec(make_federation(tmp_path, seed=5, size=(32, 32, 24), cases_per_site=2, test_cases=0,
                                     fov_scale=0.7))
    raw = tmp_path / "nnUNet_raw"
    convert_federation(spec, raw)
    pooled = merge_sites(spec, 510, nnunet_raw=raw)
    full = write_fully_labelled_pool(tmp_path, pooled.name, 511, nnunet_raw=raw)
    values = global_label_values(spec)
    dj = json.loads((full / "dataset.json").read_text())
    cases = sorted(dj["fedkd"]["case_site"])
    assert len(cases) == 8 and all(dj["fedkd"]["case_annotated"][c] == list(spec.labels) for c in cases)
    for case in cases:
        site = spec.site(dj["fedkd"]["case_site"][case])
        p_img = sitk.ReadImage(str(pooled / "labelsTr" / f"{case}.nii.gz"))
        f_img = sitk.ReadImage(str(full / "labelsTr" / f"{case}.nii.gz"))
        assert f_img.GetSize() == p_img.GetSize() and f_img.GetDirection() == p_img.GetDirection()
        p, f = sitk.GetArrayFromImage(p_img), sitk.GetArrayFromImage(f_img)
        for organ, v in values.items():
            if organ in site.organs:
                assert np.array_equal(p == v, f == v), (case, organ)
            else:  # unlabelled in the pooled case, present in the full one (every phantom has every organ)
                assert not (p == v).any() and (f == v).sum() > 10, (case, organ)
        assert (full / "imagesTr" / f"{case}_0000.nii.gz").is_file()

    # a pooled label that is not its phantom's (the KiTS case flipped): refused, and nothing written
    bad = next(c for c in cases if c.startswith("kidney_site__"))
    lab = sitk.ReadImage(str(pooled / "labelsTr" / f"{bad}.nii.gz"))
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(lab)[:, :, ::-1].copy())
    flipped.CopyInformation(lab)
    sitk.WriteImage(flipped, str(pooled / "labelsTr" / f"{bad}.nii.gz"))
    with pytest.raises(ConversionError, match=bad):
        write_fully_labelled_pool(tmp_path, pooled.name, 512, nnunet_raw=raw)
    assert not list(raw.glob("Dataset512_*"))


def test_fully_labelled_pool_with_a_sites_unlabelled_training_cases(tmp_path):
    """A site converted with unlabelled_as_training (the MSD spleen site's 2 imagesTs images) pools those cases with
    [] and all-background labels; the oracle's pool labels them fully, re-rendered as the generator's unlabelled
    images (checked: each has every organ, and the labelled cases still equal their pooled labels)."""
    from nnunetv2_fedkd.workflows.pipeline import convert_federation
    from nnunetv2_fedkd.data.pooled import global_label_values
    from nnunetv2_fedkd.spec import load_spec, save_spec
    from nnunetv2_fedkd.data.synthetic import make_federation
    from nnunetv2_fedkd.data.synthetic.oracle import write_fully_labelled_pool

    spec = load_spec(make_federation(tmp_path, seed=5, size=(32, 32, 24), cases_per_site=1, test_cases=0,
                                     fov_scale=0.7))
    spec.site("spleen_site").unlabelled_as_training = True
    spec = load_spec(save_spec(spec, spec.path))
    raw = tmp_path / "nnUNet_raw"
    convert_federation(spec, raw)
    pooled = merge_sites(spec, 510, nnunet_raw=raw)
    annotated = json.loads((pooled / "dataset.json").read_text())["fedkd"]["case_annotated"]
    unlabelled = sorted(c for c, o in annotated.items() if not o)
    assert len(unlabelled) == 2 and all(c.startswith("spleen_site__") for c in unlabelled)
    full = write_fully_labelled_pool(tmp_path, pooled.name, 511, nnunet_raw=raw)
    values = global_label_values(spec)
    for case in unlabelled:
        f = sitk.GetArrayFromImage(sitk.ReadImage(str(full / "labelsTr" / f"{case}.nii.gz")))
        assert all((f == v).sum() > 10 for v in values.values()), case
