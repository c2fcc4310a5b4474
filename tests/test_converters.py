"""Tests of nnunetv2_fedkd.data.conversion on tiny volumes that reproduce the public layouts and header conventions.

Fixtures: MSD Task03_Liver (SimpleITK, int16, rotated direction, macOS ``._`` junk), KiTS19/21/23 (nibabel, slice
axis first like the real files, float32 / int16 images, float / uint8 labels, KiTS19 imaging-only test case), LiTS
(uncompressed .nii in two "Training Batch" folders), BTCV (RawData/Training/img|label, 13 labels).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_fedkd import organs as reg
from nnunetv2_fedkd.data.conversion import FORMATS, ConversionError, convert_dataset

SHAPE = (12, 10, 8)  # voxel order of the file (nibabel i, j, k)
KITS_AFFINE = np.array([[0, 0, -0.78, 0], [0, -0.78, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]])  # slice axis first
ROTATED = (0.8, -0.6, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# fixture helpers
# --------------------------------------------------------------------------------------------------------------------
def _image(seed: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 1500, size=SHAPE).astype(dtype)


def _label(values, dtype, seed: int = 0) -> np.ndarray:
    """Every value in ``values`` appears (runs of 30 voxels in memory order), background elsewhere."""
    lab = np.zeros(SHAPE, dtype=dtype)
    flat = lab.reshape(-1)
    for i, v in enumerate(values):
        flat[40 * i + seed % 7 : 40 * i + seed % 7 + 30] = v
    return lab


def _nib_save(path: Path, arr: np.ndarray, affine) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.asarray(affine, dtype=float)), str(path))
    return path


def _sitk_save(path: Path, arr: np.ndarray, spacing, origin, direction) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def make_msd(root: Path, n_train: int = 3) -> Path:
    task = root / "Task03_Liver"
    geo = dict(spacing=(0.7, 0.75, 2.5), origin=(-170.5, -160.25, 30.0), direction=ROTATED)
    ids = [0, 1, 10][:n_train]
    for i in ids:
        _sitk_save(task / "imagesTr" / f"liver_{i}.nii.gz", _image(i, np.int16), **geo)
        _sitk_save(task / "labelsTr" / f"liver_{i}.nii.gz", _label([1, 2], np.uint8, i), **geo)
    _sitk_save(task / "imagesTs" / "liver_132.nii.gz", _image(132, np.int16), **geo)
    for sub, name in (("imagesTr", "liver_0"), ("labelsTr", "liver_0"), ("imagesTs", "liver_132")):
        (task / sub / f"._{name}.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X        junk")  # AppleDouble
    meta = {
        "name": "Liver",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": len(ids),
        "training": [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"} for i in ids],
        "test": ["./imagesTs/liver_132.nii.gz"],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


def make_kits(root: Path, fmt: str, n: int = 2) -> Path:
    """KiTS19: data/, float32 imaging, float labels {0,1,2}, plus an imaging-only test case (case_00210).
    KiTS21/23: dataset/, int16 imaging, uint8 labels {0,1,2,3}."""
    kits19 = fmt == "kits19"
    base = root / fmt / ("data" if kits19 else "dataset")
    for i in range(n):
        case = base / f"case_{i:05d}"
        _nib_save(case / "imaging.nii.gz", _image(i, np.float32 if kits19 else np.int16), KITS_AFFINE)
        seg = _label([1, 2], np.float32, i) if kits19 else _label([1, 2, 3], np.uint8, i)
        _nib_save(case / "segmentation.nii.gz", seg, KITS_AFFINE)
    if kits19:
        _nib_save(base / "case_00210" / "imaging.nii.gz", _image(210, np.float32), KITS_AFFINE)
    return root / fmt


LITS_AFFINE = np.array([[-0.7, 0, 0, 150.0], [0, -0.7, 0, 170.0], [0, 0, 1.5, -300.0], [0, 0, 0, 1]])


def make_lits(root: Path) -> Path:
    affine = LITS_AFFINE
    for batch, n in (("Training Batch 1", 0), ("Training Batch 2", 28)):
        _nib_save(root / "LITS" / batch / f"volume-{n}.nii", _image(n, np.float32), affine)
        _nib_save(root / "LITS" / batch / f"segmentation-{n}.nii", _label([1, 2], np.uint8, n), affine)
    return root / "LITS"


def make_btcv(root: Path) -> Path:
    affine = np.diag([0.8, 0.8, 3.0, 1.0])  # RAS-positive axes: a flipped (non-identity) direction in ITK
    for n in (1, 2):
        tr = root / "Abdomen" / "RawData" / "Training"
        _nib_save(tr / "img" / f"img{n:04d}.nii.gz", _image(n, np.int16), affine)
        _nib_save(tr / "label" / f"label{n:04d}.nii.gz", _label(range(1, 14), np.uint8, n), affine)
    return root / "Abdomen"


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    """An empty nnUNet_raw (and preprocessed/results) for the test; environment pointing at it."""
    paths = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        paths[name] = tmp_path / "nnunet" / name
        paths[name].mkdir(parents=True)
        monkeypatch.setenv(name, str(paths[name]))
    return paths["nnUNet_raw"]


@pytest.fixture
def src(tmp_path) -> Path:
    return tmp_path / "sources"


# --------------------------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------------------------
def _geometry(img: sitk.Image):
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def assert_image_preserved(source: Path, converted: Path) -> sitk.Image:
    a, b = sitk.ReadImage(str(source)), sitk.ReadImage(str(converted))
    assert b.GetPixelID() == a.GetPixelID()
    assert _geometry(b) == _geometry(a)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(b), sitk.GetArrayViewFromImage(a))
    return a


def assert_label_mapped(source: Path, converted: Path, image: sitk.Image, value_map: dict) -> None:
    lab = sitk.ReadImage(str(converted))
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert _geometry(lab) == _geometry(image)
    src_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(source))).astype(int)
    expected = np.zeros_like(src_arr)
    for v, out in value_map.items():
        expected[src_arr == v] = out
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(lab), expected)


def load_json(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


def assert_nothing_written(raw: Path) -> None:
    assert list(raw.iterdir()) == [], "a failed conversion left files (final folder or temporary folder)"


# --------------------------------------------------------------------------------------------------------------------
# successful conversions
# --------------------------------------------------------------------------------------------------------------------
def test_formats_constant():
    assert FORMATS == ("msd", "kits19", "kits21", "kits23", "lits", "btcv")


def test_msd_liver_default_and_nnunet_integrity(raw, src):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    task = make_msd(src)
    out = convert_dataset("msd", task, 3, nnunet_raw=raw)
    assert out == raw / "Dataset003_Liver"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "liver_0_0000.nii.gz", "liver_10_0000.nii.gz", "liver_1_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [
        "liver_0.nii.gz", "liver_1.nii.gz", "liver_10.nii.gz"]
    assert [p.name for p in (out / "imagesTs").iterdir()] == ["liver_132_0000.nii.gz"]  # '._' junk is ignored
    assert not list(out.rglob("._*"))

    dj = load_json(out)
    assert dj["labels"] == {"background": 0, "liver": 1}
    assert dj["channel_names"] == {"0": "CT"} and dj["file_ending"] == ".nii.gz" and dj["numTraining"] == 3
    assert dj["fedkd"] == {
        "registry_version": reg.REGISTRY_VERSION,
        "source_format": "msd_liver",
        "source_dir": str(task),
        "annotated": ["liver"],
        "merged": {"liver": ["liver", "liver_tumour"]},
        "source_labels": {"1": "liver", "2": "liver_tumour"},
        "cases": ["liver_0", "liver_1", "liver_10"],
        "test_cases": ["liver_132"],
    }
    for case in dj["fedkd"]["cases"]:
        img = assert_image_preserved(task / "imagesTr" / f"{case}.nii.gz", out / "imagesTr" / f"{case}_0000.nii.gz")
        assert img.GetDirection() == pytest.approx(ROTATED)
        assert_label_mapped(task / "labelsTr" / f"{case}.nii.gz", out / "labelsTr" / f"{case}.nii.gz", img,
                            {1: 1, 2: 1})
    assert_image_preserved(task / "imagesTs" / "liver_132.nii.gz", out / "imagesTs" / "liver_132_0000.nii.gz")

    verify_dataset_integrity(str(out), num_processes=1)  # raises on any problem


def test_msd_unlabelled_images_as_training_cases(raw, src, monkeypatch):
    """--unlabelled-as-training (dual KD, He et al. 2023): the MSD task's imagesTs image becomes a training case with
    an all-background label map on its own grid that annotates no organ; the labelled cases annotate the task's
    organs; nnU-Net accepts the dataset, and the partial-label losses read [] for the unlabelled case."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from nnunetv2_fedkd.data.label_availability import LabelAvailability

    from nnunetv2_fedkd.workflows.cli import main

    task = make_msd(src)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    assert main(["convert", "msd", str(task), "-d", "3", "--unlabelled-as-training"]) == 0
    out = raw / "Dataset003_Liver"
    assert not (out / "imagesTs").exists()
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [
        "liver_0.nii.gz", "liver_1.nii.gz", "liver_10.nii.gz", "liver_132.nii.gz"]
    img = assert_image_preserved(task / "imagesTs" / "liver_132.nii.gz", out / "imagesTr" / "liver_132_0000.nii.gz")
    lab = sitk.ReadImage(str(out / "labelsTr" / "liver_132.nii.gz"))
    assert lab.GetPixelID() == sitk.sitkUInt8 and _geometry(lab) == _geometry(img)
    assert not sitk.GetArrayViewFromImage(lab).any()
    dj = load_json(out)
    assert dj["numTraining"] == 4 and dj["fedkd"]["test_cases"] == []
    assert dj["fedkd"]["unlabelled_cases"] == ["liver_132"]
    assert dj["fedkd"]["case_annotated"] == {"liver_0": ["liver"], "liver_1": ["liver"], "liver_10": ["liver"],
                                             "liver_132": []}
    la = LabelAvailability(dj)
    assert la.annotated("liver_132") == [] and la.softmax_mask(["liver_132", "liver_0"]).tolist() == [
        [True, False], [True, True]]
    verify_dataset_integrity(str(out), num_processes=1)


def test_unlabelled_image_with_a_labelled_cases_id_is_refused(raw, src):
    task = make_msd(src)
    shutil.copy2(task / "imagesTs" / "liver_132.nii.gz", task / "imagesTs" / "liver_1.nii.gz")
    meta = json.loads((task / "dataset.json").read_text())
    meta["test"].append("./imagesTs/liver_1.nii.gz")
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match=r"case liver_1: the unlabelled image .*imagesTs/liver_1.nii.gz and the "
                                              r"labelled case .*imagesTr/liver_1.nii.gz have the same case id"):
        convert_dataset("msd", task, 3, nnunet_raw=raw, unlabelled_as_training=True)
    assert_nothing_written(raw)
    convert_dataset("msd", task, 3, nnunet_raw=raw)  # as test images they do not collide (imagesTs vs imagesTr)


def test_unlabelled_as_training_without_unlabelled_images_is_refused(raw, src):
    lits = make_lits(src)
    with pytest.raises(ConversionError, match="no unlabelled .* images to use as training cases"):
        convert_dataset("lits", lits, 5, nnunet_raw=raw, unlabelled_as_training=True)
    assert_nothing_written(raw)


def test_msd_keep_tumour(raw, src):
    task = make_msd(src, n_train=1)
    out = convert_dataset("msd", task, 3, dataset_name="LiverTumour", keep_tumour=True, nnunet_raw=raw)
    assert out.name == "Dataset003_LiverTumour"
    assert load_json(out)["labels"] == {"background": 0, "liver": 1, "liver_tumour": 2}
    img = sitk.ReadImage(str(out / "imagesTr" / "liver_0_0000.nii.gz"))
    assert_label_mapped(task / "labelsTr" / "liver_0.nii.gz", out / "labelsTr" / "liver_0.nii.gz", img, {1: 1, 2: 2})


@pytest.mark.parametrize("fmt", ["kits19", "kits21", "kits23"])
def test_kits_default_merges_into_kidney(raw, src, fmt):
    root = make_kits(src, fmt)
    out = convert_dataset(fmt, root, 40, nnunet_raw=raw)
    assert out.name == f"Dataset040_{fmt.replace('kits', 'KiTS')}"
    dj = load_json(out)
    assert dj["labels"] == {"background": 0, "kidney": 1}
    assert dj["fedkd"]["source_format"] == fmt
    assert dj["fedkd"]["cases"] == ["case_00000", "case_00001"] and dj["numTraining"] == 2
    src_values = [1, 2] if fmt == "kits19" else [1, 2, 3]
    assert dj["fedkd"]["merged"] == {"kidney": [reg.SOURCE_FORMATS[fmt].labels[v] for v in src_values]}
    case_root = root / ("data" if fmt == "kits19" else "dataset")
    for case in dj["fedkd"]["cases"]:
        img = assert_image_preserved(case_root / case / "imaging.nii.gz", out / "imagesTr" / f"{case}_0000.nii.gz")
        # the KiTS slice-first axis order survives as a permuted direction matrix (no reorientation)
        assert img.GetDirection() == (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)
        assert img.GetSpacing() == pytest.approx((3.0, 0.78, 0.78))
        assert_label_mapped(case_root / case / "segmentation.nii.gz", out / "labelsTr" / f"{case}.nii.gz", img,
                            {v: 1 for v in src_values})
    if fmt == "kits19":  # the imaging-only official test case goes to imagesTs
        assert dj["fedkd"]["test_cases"] == ["case_00210"]
        assert_image_preserved(case_root / "case_00210" / "imaging.nii.gz", out / "imagesTs" / "case_00210_0000.nii.gz")
    else:
        assert not (out / "imagesTs").exists()


def test_kits23_keep_tumour_and_input_is_dataset_folder(raw, src):
    root = make_kits(src, "kits23", n=1) / "dataset"
    out = convert_dataset("kits23", root, 41, keep_tumour=True, nnunet_raw=raw)
    assert load_json(out)["labels"] == {"background": 0, "kidney": 1, "kidney_tumour": 2, "kidney_cyst": 3}
    img = sitk.ReadImage(str(out / "imagesTr" / "case_00000_0000.nii.gz"))
    assert_label_mapped(root / "case_00000" / "segmentation.nii.gz", out / "labelsTr" / "case_00000.nii.gz", img,
                        {1: 1, 2: 2, 3: 3})


def test_kits21_majority_vote_label_name(raw, src):
    root = make_kits(src, "kits21", n=1)
    case = root / "dataset" / "case_00000"
    (case / "segmentation.nii.gz").rename(case / "aggregated_MAJ_seg.nii.gz")
    out = convert_dataset("kits21", root, 42, nnunet_raw=raw)
    img = sitk.ReadImage(str(out / "imagesTr" / "case_00000_0000.nii.gz"))
    assert_label_mapped(case / "aggregated_MAJ_seg.nii.gz", out / "labelsTr" / "case_00000.nii.gz", img,
                        {1: 1, 2: 1, 3: 1})


def test_lits_two_batch_folders(raw, src):
    root = make_lits(src)
    out = convert_dataset("lits", root, 29, nnunet_raw=raw)
    assert out.name == "Dataset029_LiTS"
    dj = load_json(out)
    assert dj["labels"] == {"background": 0, "liver": 1}
    assert dj["fedkd"]["source_format"] == "lits" and dj["fedkd"]["cases"] == ["LiTS_0000", "LiTS_0028"]
    for batch, n in (("Training Batch 1", 0), ("Training Batch 2", 28)):
        img = assert_image_preserved(root / batch / f"volume-{n}.nii", out / "imagesTr" / f"LiTS_{n:04d}_0000.nii.gz")
        assert img.GetPixelID() == sitk.sitkFloat32
        assert_label_mapped(root / batch / f"segmentation-{n}.nii", out / "labelsTr" / f"LiTS_{n:04d}.nii.gz", img,
                            {1: 1, 2: 1})


def test_btcv_default_keeps_all_13_organs(raw, src):
    root = make_btcv(src)
    out = convert_dataset("btcv", root, 60, nnunet_raw=raw)
    dj = load_json(out)
    fmt = reg.SOURCE_FORMATS["btcv"]
    label_set = reg.default_label_set(fmt.labels.values())
    assert len(label_set) == 13 and dj["labels"] == reg.nnunet_labels(label_set)
    assert dj["fedkd"]["cases"] == ["BTCV_0001", "BTCV_0002"]
    tr = root / "RawData" / "Training"
    img = assert_image_preserved(tr / "img" / "img0001.nii.gz", out / "imagesTr" / "BTCV_0001_0000.nii.gz")
    assert img.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert_label_mapped(tr / "label" / "label0001.nii.gz", out / "labelsTr" / "BTCV_0001.nii.gz", img,
                        {v: 1 + label_set.index(k) for v, k in fmt.labels.items()})


def test_btcv_organ_subset_merges_kidneys(raw, src):
    root = make_btcv(src) / "RawData" / "Training"  # INPUT may point at the Training folder
    out = convert_dataset("btcv", root, 61, organs=["spleen", "liver", "kidney", "pancreas"], nnunet_raw=raw)
    dj = load_json(out)
    assert dj["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "pancreas": 4}  # registry order
    assert dj["fedkd"]["annotated"] == ["liver", "spleen", "kidney", "pancreas"]
    assert dj["fedkd"]["merged"] == {"liver": ["liver"], "spleen": ["spleen"],
                                     "kidney": ["kidney_right", "kidney_left"], "pancreas": ["pancreas"]}
    img = sitk.ReadImage(str(out / "imagesTr" / "BTCV_0002_0000.nii.gz"))
    assert_label_mapped(root / "label" / "label0002.nii.gz", out / "labelsTr" / "BTCV_0002.nii.gz", img,
                        {6: 1, 1: 2, 2: 3, 3: 3, 11: 4})  # every other organ -> background


def test_overwrite_replaces_existing_dataset(raw, src):
    task = make_msd(src, n_train=1)
    out = convert_dataset("msd", task, 3, nnunet_raw=raw)
    (out / "stale.txt").write_text("old")
    out2 = convert_dataset("msd", task, 3, keep_tumour=True, overwrite=True, nnunet_raw=raw)
    assert out2 == out and not (out / "stale.txt").exists()
    assert load_json(out)["labels"]["liver_tumour"] == 2
    assert [p.name for p in raw.iterdir()] == ["Dataset003_Liver"]


def test_nnunet_raw_from_environment(raw, src, monkeypatch):
    out = convert_dataset("kits23", make_kits(src, "kits23", n=1), 43)
    assert out == raw / "Dataset043_KiTS23"
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(ConversionError, match="nnUNet_raw is not set"):
        convert_dataset("kits23", src / "kits23", 44)


# --------------------------------------------------------------------------------------------------------------------
# malformed inputs: the error names the case and the file, and nothing is left in nnUNet_raw
# --------------------------------------------------------------------------------------------------------------------
def _fails(raw: Path, fmt: str, root: Path, *needles, **kwargs) -> str:
    with pytest.raises(ConversionError) as e:
        convert_dataset(fmt, root, 50, nnunet_raw=raw, **kwargs)
    msg = str(e.value)
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in error message: {msg}"
    assert_nothing_written(raw)
    return msg


def test_shape_mismatch(raw, src):
    root = make_kits(src, "kits23")
    seg = root / "dataset" / "case_00001" / "segmentation.nii.gz"  # second case: the first one was already written
    _nib_save(seg, np.zeros((12, 10, 7), np.uint8), KITS_AFFINE)
    _fails(raw, "kits23", root, "case_00001", seg, "size")


def test_geometry_mismatch(raw, src):
    root = make_kits(src, "kits23")
    seg = root / "dataset" / "case_00001" / "segmentation.nii.gz"
    shifted = KITS_AFFINE.copy()
    shifted[2, 0] = -3.5  # slice thickness 3.5 instead of 3.0
    _nib_save(seg, _label([1], np.uint8), shifted)
    _fails(raw, "kits23", root, "case_00001", seg, "spacing")


def test_origin_within_tolerance_is_accepted(raw, src):
    root = make_kits(src, "kits23", n=1)
    seg = root / "dataset" / "case_00000" / "segmentation.nii.gz"
    nudged = KITS_AFFINE.copy()
    nudged[0, 3] = 1e-4  # far below 1e-3 voxel
    _nib_save(seg, _label([1], np.uint8), nudged)
    out = convert_dataset("kits23", root, 45, nnunet_raw=raw)
    img = sitk.ReadImage(str(out / "imagesTr" / "case_00000_0000.nii.gz"))
    assert _geometry(sitk.ReadImage(str(out / "labelsTr" / "case_00000.nii.gz"))) == _geometry(img)


def test_stray_label_value(raw, src):
    root = make_kits(src, "kits23")
    seg = root / "dataset" / "case_00001" / "segmentation.nii.gz"
    _nib_save(seg, _label([1, 7], np.uint8), KITS_AFFINE)
    msg = _fails(raw, "kits23", root, "case_00001", seg, "[7]", "KiTS23", "{0,1,2,3}")
    assert "outside" in msg


def test_non_integer_label_value(raw, src):
    root = make_lits(src)
    seg = root / "Training Batch 2" / "segmentation-28.nii"
    _nib_save(seg, _label([1.0, 1.5], np.float32), LITS_AFFINE)
    _fails(raw, "lits", root, "LiTS_0028", seg, "[1.5]")


def _put_non_finite(path: Path, value: float) -> None:
    """Store one non-finite voxel (with SimpleITK: nibabel would turn NaN into 0 on saving)."""
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr[3, 4, 5] = value
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(path))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_image(raw, src, value):
    root = make_kits(src, "kits19")
    img_path = root / "data" / "case_00001" / "imaging.nii.gz"
    _put_non_finite(img_path, value)
    _fails(raw, "kits19", root, "case_00001", img_path, "NaN/Inf")


def test_nan_in_label(raw, src):
    root = make_kits(src, "kits19")
    seg = root / "data" / "case_00001" / "segmentation.nii.gz"
    _put_non_finite(seg, np.nan)
    _fails(raw, "kits19", root, "case_00001", seg, "NaN/Inf")


def test_unreadable_image(raw, src):
    root = make_kits(src, "kits23")
    img_path = root / "dataset" / "case_00001" / "imaging.nii.gz"
    img_path.write_bytes(b"not a nifti file")
    _fails(raw, "kits23", root, "case_00001", img_path, "cannot read")


def test_4d_image(raw, src):
    task = make_msd(src, n_train=2)
    img_path = task / "imagesTr" / "liver_1.nii.gz"
    _nib_save(img_path, np.zeros(SHAPE + (2,), np.int16), np.eye(4))
    _fails(raw, "msd", task, "liver_1", img_path, "3D")


def test_missing_label_file(raw, src):
    root = make_kits(src, "kits23")
    seg = root / "dataset" / "case_00001" / "segmentation.nii.gz"
    seg.unlink()
    _fails(raw, "kits23", root, "case_00001", seg, "missing")


def test_missing_lits_segmentation(raw, src):
    root = make_lits(src)
    seg = root / "Training Batch 2" / "segmentation-28.nii"
    seg.unlink()
    _fails(raw, "lits", root, "LiTS_0028", seg, "missing")


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_input_folder(raw, src, fmt):
    empty = src / ("Task09_Spleen" if fmt == "msd" else "empty")
    empty.mkdir(parents=True)
    _fails(raw, fmt, empty, empty)


def test_missing_input_folder(raw, src):
    _fails(raw, "lits", src / "nope", src / "nope", "does not exist")


def test_unknown_format(raw, src):
    _fails(raw, "kits99", src, "kits99", *FORMATS)


def test_unsupported_msd_task(raw, src):
    task = src / "Task01_BrainTumour"
    task.mkdir(parents=True)
    _fails(raw, "msd", task, task, "Task03_Liver")


@pytest.mark.parametrize("declared", ["LITS", "Liver"])  # the official Task03_Liver dataset.json says "LITS"
def test_msd_renamed_folder_is_recognised_by_its_dataset_json(raw, src, declared):
    task = make_msd(src, n_train=1)
    meta = json.loads((task / "dataset.json").read_text())
    (task / "dataset.json").write_text(json.dumps({**meta, "name": declared}))
    renamed = task.rename(src / "liver")  # /data/msd/liver: the owner's own folder name
    out = convert_dataset("msd", renamed, 3, nnunet_raw=raw)
    assert out.name == "Dataset003_Liver"
    assert load_json(out)["labels"] == {"background": 0, "liver": 1}


def test_msd_dataset_json_naming_an_unsupported_task_is_refused(raw, src):
    task = make_msd(src, n_train=1)
    meta = json.loads((task / "dataset.json").read_text())
    (task / "dataset.json").write_text(json.dumps({**meta, "name": "BRATS"}))
    renamed = task.rename(src / "brain")
    _fails(raw, "msd", renamed, renamed / "dataset.json", "Task01_BrainTumour", "not supported")


def test_msd_dataset_json_and_folder_name_disagree(raw, src):
    task = make_msd(src, n_train=1)  # folder Task03_Liver
    meta = json.loads((task / "dataset.json").read_text())
    (task / "dataset.json").write_text(json.dumps({**meta, "name": "Spleen"}))
    _fails(raw, "msd", task, task / "dataset.json", "Task09_Spleen", "Task03_Liver")


def test_msd_unknown_name_in_unknown_folder(raw, src):
    task = make_msd(src, n_train=1)
    meta = json.loads((task / "dataset.json").read_text())
    (task / "dataset.json").write_text(json.dumps({**meta, "name": "MyLiverStudy"}))
    renamed = task.rename(src / "study")
    _fails(raw, "msd", renamed, renamed, "MyLiverStudy", "Task03_Liver")


def test_existing_target_without_overwrite(raw, src):
    task = make_msd(src, n_train=1)
    out = convert_dataset("msd", task, 3, nnunet_raw=raw)
    before = load_json(out)
    with pytest.raises(ConversionError, match="already exists"):
        convert_dataset("msd", task, 3, keep_tumour=True, nnunet_raw=raw)
    assert load_json(out) == before and [p.name for p in raw.iterdir()] == ["Dataset003_Liver"]


def test_same_id_other_name(raw, src):
    (raw / "Dataset003_Other").mkdir()
    with pytest.raises(ConversionError, match="Dataset003_Other"):
        convert_dataset("msd", make_msd(src, n_train=1), 3, nnunet_raw=raw)
    assert [p.name for p in raw.iterdir()] == ["Dataset003_Other"]


def test_bad_organ_requests(raw, src):
    root = make_kits(src, "kits23", n=1)
    _fails(raw, "kits23", root, "['liver']", "does not annotate", organs=["kidney", "liver"])
    _fails(raw, "kits23", root, "['kidney_left']", "does not annotate", organs=["kidney_tumour", "kidney_left"])
    _fails(raw, "kits23", root, "unknown organ", organs=["kidnee"])
    _fails(raw, "kits23", root, "keep_tumour", organs=["kidney"], keep_tumour=True)


@pytest.mark.parametrize(
    "source_format, organs, ok",
    [
        ("btcv", ["kidney", "adrenal_gland"], True),  # left + right make the whole
        ("kits23", ["kidney", "kidney_tumour"], True),
        ("msd_hepaticvessel", ["liver"], False),  # vessels + tumour are not the liver
        ("msd_lung", ["lung"], False),  # the tumour is not the lung
        ("msd_lung", ["lung_tumour"], True),
    ],
)
def test_organ_request_must_be_annotated_as_a_whole(source_format, organs, ok):
    from nnunetv2_fedkd.data.conversion.common import resolve_label_set

    if ok:
        assert resolve_label_set(source_format, organs, keep_tumour=False)[0] == reg.sort_by_registry(organs)
    else:
        with pytest.raises(ConversionError, match="does not annotate"):
            resolve_label_set(source_format, organs, keep_tumour=False)


def test_bad_dataset_id_and_name(raw, src):
    root = make_kits(src, "kits23", n=1)
    with pytest.raises(ConversionError, match="1 to 999"):
        convert_dataset("kits23", root, 1000, nnunet_raw=raw)
    with pytest.raises(ConversionError, match="not usable"):
        convert_dataset("kits23", root, 5, dataset_name="Kits 23", nnunet_raw=raw)
    assert_nothing_written(raw)


def test_convert_federation_from_the_spec(tmp_path, monkeypatch):
    """``nnunetv2_fedkd convert-federation SPEC`` converts every site and the test set (restricted to the federation's
    labels) from the spec's source_format / source_dir; ``--sites`` converts only a hospital's own; a wrong site name
    is refused by name with nothing written."""
    import subprocess
    import sys

    from nnunetv2_fedkd.env import subprocess_env
    from nnunetv2_fedkd.data.synthetic import make_federation

    spec = make_federation(tmp_path / "fed", seed=1, size=(16, 16, 12), cases_per_site=1, test_cases=1)
    raw = tmp_path / "fed" / "nnUNet_raw"
    env = subprocess_env(tmp_path / "fed")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "nnunetv2_fedkd.workflows.cli",
                               "convert-federation", str(spec), *args],
                              env=env, capture_output=True, text=True)

    bad = cli("--sites", "liver_site", "no_such_site")
    assert bad.returncode == 2 and "'no_such_site'" in bad.stderr and "liver_site" in bad.stderr, bad.stderr
    assert not raw.exists() or not any(raw.iterdir())
    one = cli("--sites", "kidney_site")
    assert one.returncode == 0, one.stderr
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset502_SynthKidney"]
    every = cli("--overwrite")
    assert every.returncode == 0, every.stderr
    names = sorted(p.name for p in raw.iterdir())
    assert len(names) == 5 and "Dataset509_SynthBTCV" in names, names
    test_labels = load_json(raw / "Dataset509_SynthBTCV")["labels"]
    assert set(test_labels) == {"background", "liver", "kidney", "spleen", "pancreas"}, test_labels
    assert "case_annotated" not in load_json(raw / "Dataset503_SynthSpleen")["fedkd"]
    # a site whose unlabelled images train too (dual KD): `unlabelled_as_training = true` in its [[sites]] table
    from nnunetv2_fedkd.spec import SpecError, load_spec, save_spec

    loaded = load_spec(spec)
    loaded.sites[2].unlabelled_as_training = True  # the MSD spleen site (2 unlabelled imagesTs images)
    assert load_spec(save_spec(loaded, spec)).sites[2].unlabelled_as_training
    spleen = cli("--sites", "spleen_site", "--overwrite")
    assert spleen.returncode == 0, spleen.stderr
    meta = load_json(raw / "Dataset503_SynthSpleen")["fedkd"]
    assert len(meta["unlabelled_cases"]) == 2 and all(meta["case_annotated"][c] == [] for c in meta["unlabelled_cases"])
    assert sum(v == ["spleen"] for v in meta["case_annotated"].values()) == 1  # the one labelled case
    spec.write_text(spec.read_text().replace("unlabelled_as_training = true", 'unlabelled_as_training = "yes"'))
    with pytest.raises(SpecError, match=r"sites\[2\].unlabelled_as_training must be true or false"):
        load_spec(spec)
