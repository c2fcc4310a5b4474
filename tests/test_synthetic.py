"""Tests of nnunetv2_fedkd.data.synthetic: the phantom generator and the partial-label federation it writes.

One small federation (48 x 48 x 32 voxels, 2 cases per site, 2 test cases) is built per module and checked for
layout, label conventions, visibility of every organ in every site's images, scanner differences, plausibility,
determinism and the spec; a few more tiny ones check seeds, options and the all-or-nothing write.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nnunetv2_fedkd import organs as reg
from nnunetv2_fedkd.spec import load_spec
from nnunetv2_fedkd.data.synthetic import (
    LESION_HOSTS,
    STRUCTURES,
    Phantom,
    Scanner,
    make_federation,
    render_phantom,
    site_phantom,
)
from nnunetv2_fedkd.data.synthetic import federation as fed_mod

SIZE = (48, 48, 32)
TINY = (32, 32, 24)
SEED = 3
N_CASES = 2
N_TEST = 2
FED_ORGANS = ("liver", "spleen", "kidney", "pancreas")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "fed"
    spec_path = make_federation(out, seed=SEED, size=SIZE, cases_per_site=N_CASES, test_cases=N_TEST)
    meta = json.loads((out / "synth_meta.json").read_text())
    return out, spec_path, meta


def _all_sites(meta):
    return meta["sites"] + [meta["test_set"]]


def _read(out: Path, rel: str) -> nib.Nifti1Image:
    return nib.load(str(out / rel))


def _to_phantom_order(arr: np.ndarray, layout: str) -> np.ndarray:
    """File voxel order -> phantom order [x, y, z] (KiTS files are slice-first, superior slice last)."""
    if layout == "kits23":
        return arr[::-1].transpose(2, 1, 0)
    return arr


def _tree_digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _array_digest(out: Path, meta) -> str:
    h = hashlib.sha256()
    for s in _all_sites(meta):
        for c in s["cases"]:
            for key in ("image", "label"):
                if c[key]:
                    h.update(np.ascontiguousarray(np.asanyarray(_read(out, c[key]).dataobj)).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# layout and spec
# --------------------------------------------------------------------------------------------------------------------
def test_layout(fed):
    out, _, _ = fed
    src = out / "sources"
    lits = src / "liver_lits"
    assert (lits / "Training Batch 1" / "volume-0.nii").is_file()
    assert (lits / "Training Batch 1" / "segmentation-0.nii").is_file()
    assert (lits / "Training Batch 2" / "volume-1.nii").is_file()
    assert (lits / "Training Batch 2" / "segmentation-1.nii").is_file()
    for i in range(N_CASES):
        case = src / "kidney_kits23" / "dataset" / f"case_{i:05d}"
        assert (case / "imaging.nii.gz").is_file() and (case / "segmentation.nii.gz").is_file()
    for i in (1, 2):
        assert (src / "btcv" / "RawData" / "Training" / "img" / f"img{i:04d}.nii.gz").is_file()
        assert (src / "btcv" / "RawData" / "Training" / "label" / f"label{i:04d}.nii.gz").is_file()
    assert (out / "federation.toml").is_file() and (out / "synth_meta.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary folders left behind"


@pytest.mark.parametrize("task,fmt,names", [("Task09_Spleen", "msd_spleen", {"1": "spleen"}),
                                            ("Task07_Pancreas", "msd_pancreas", {"1": "pancreas", "2": "cancer"})])
def test_msd_dataset_json(fed, task, fmt, names):
    out, _, _ = fed
    root = out / "sources" / task
    dj = json.loads((root / "dataset.json").read_text())
    assert dj["modality"] == {"0": "CT"}
    assert dj["labels"] == {"0": "background", **names}
    assert {int(k) for k in dj["labels"]} == {0, *reg.SOURCE_FORMATS[fmt].labels}
    assert dj["numTraining"] == len(dj["training"]) == N_CASES
    assert dj["numTest"] == len(dj["test"]) == fed_mod.MSD_TEST_IMAGES
    for e in dj["training"]:
        assert e["image"].startswith("./imagesTr/") and e["label"].startswith("./labelsTr/")
        assert (root / e["image"]).is_file() and (root / e["label"]).is_file()
        assert Path(e["image"]).name == Path(e["label"]).name
    for t in dj["test"]:
        assert t.startswith("./imagesTs/") and (root / t).is_file()
    listed = {Path(e["image"]).name for e in dj["training"]} | {Path(t).name for t in dj["test"]}
    real = {p.name for sub in ("imagesTr", "imagesTs") for p in (root / sub).iterdir() if not p.name.startswith("._")}
    assert listed == real
    # macOS AppleDouble junk beside real files, like in the official tarballs
    junk = [p for p in root.rglob("._*")]
    assert junk and all(p.with_name(p.name[2:]).exists() for p in junk)
    assert all(p.read_bytes()[:4] == b"\x00\x05\x16\x07" for p in junk)
    assert any(p.parent.name == "imagesTr" for p in junk) and any(p.parent.name == "labelsTr" for p in junk)


def test_spec(fed):
    out, spec_path, _ = fed
    assert spec_path == out / "federation.toml"
    spec = load_spec(spec_path)  # validates
    assert spec.labels == reg.sort_by_registry(FED_ORGANS) == ["liver", "spleen", "kidney", "pancreas"]
    by_name = {s.name: s for s in spec.sites}
    expect = {
        "liver_site": ("Dataset501_SynthLiver", ["liver"], "lits", "liver_lits"),
        "kidney_site": ("Dataset502_SynthKidney", ["kidney"], "kits23", "kidney_kits23"),
        "spleen_site": ("Dataset503_SynthSpleen", ["spleen"], "msd", "Task09_Spleen"),
        "pancreas_site": ("Dataset504_SynthPancreas", ["pancreas"], "msd", "Task07_Pancreas"),
    }
    assert list(by_name) == list(expect)
    for name, (ds, organs, fmt, sub) in expect.items():
        s = by_name[name]
        assert (s.dataset, s.organs, s.source_format, s.location) == (ds, organs, fmt, "local")
        assert s.source_dir == (out / "sources" / sub).resolve() and s.source_dir.is_dir()
    assert spec.test_set.dataset == "Dataset509_SynthBTCV" and spec.test_set.source_format == "btcv"
    assert spec.test_set.source_dir == (out / "sources" / "btcv").resolve()
    # the spec's paths are relative: the folder can be moved
    assert str(out) not in spec_path.read_text()


# --------------------------------------------------------------------------------------------------------------------
# label conventions
# --------------------------------------------------------------------------------------------------------------------
def test_labels_follow_each_source_format(fed):
    out, _, meta = fed
    allowed = {"liver_site": {0, 1, 2}, "kidney_site": {0, 1, 2, 3}, "spleen_site": {0, 1},
               "pancreas_site": {0, 1, 2}, "test_set": set(range(14))}
    for s in _all_sites(meta):
        fmt = reg.SOURCE_FORMATS[s["label_format"]]
        assert allowed[s["name"]] == {0, *fmt.labels}
        for i, c in enumerate(s["cases"]):
            if c["label"] is None:
                continue
            lab = np.asarray(_read(out, c["label"]).dataobj)
            assert lab.dtype == np.uint8
            values = set(np.unique(lab).tolist())
            assert values <= allowed[s["name"]], (s["name"], values)
            # the file is exactly the full phantom label map in the site's convention
            ph = site_phantom(SEED, s["name"], i, SIZE)
            lab_ph = _to_phantom_order(lab, s["layout"])
            assert np.array_equal(lab_ph, ph.to_format(fmt.labels))
            img = np.asarray(_read(out, c["image"]).dataobj)
            assert np.array_equal(_to_phantom_order(img, s["layout"]), np.round(ph.image).astype(img.dtype))
            # annotated organs are labelled, every other structure is background
            for organ in FED_ORGANS:
                m = ph.mask(organ)
                if s["name"] == "test_set" or organ in s["annotated"]:
                    assert np.all(lab_ph[m] > 0), (s["name"], organ)
                else:
                    assert np.all(lab_ph[m] == 0), (s["name"], organ)
            for other in ("gallbladder", "stomach", "aorta", "inferior_vena_cava"):
                assert (s["name"] == "test_set") == bool(np.any(lab_ph[ph.mask(other)])), (s["name"], other)


def test_btcv_values(fed):
    out, _, meta = fed
    inv = {k: v for v, k in reg.SOURCE_FORMATS["btcv"].labels.items()}
    for i, c in enumerate(meta["test_set"]["cases"]):
        lab = np.asarray(_read(out, c["label"]).dataobj)
        ph = site_phantom(SEED, "test_set", i, SIZE)
        for key in ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta",
                    "inferior_vena_cava", "pancreas"):
            m = ph.mask(key)
            assert m.any(), key
            assert np.all(lab[m] == inv[key]), key
        # structures the phantom does not model stay absent
        for key in ("esophagus", "portal_splenic_vein", "adrenal_gland_right", "adrenal_gland_left"):
            assert not np.any(lab == inv[key])


def test_lesions_map_to_the_right_values():
    labels = np.array([[[0, 1, 10, 3, 4, 11, 12, 13, 14, 5, 15, 2, 6, 7, 8, 9]]], dtype=np.uint8)
    ph = Phantom(image=np.zeros(labels.shape, np.float32), labels=labels, spacing=(1.0, 1.0, 1.0),
                 origin=(0.0, 0.0, 0.0))
    assert ph.structures == STRUCTURES and ph.hosts == LESION_HOSTS
    conv = {f: ph.to_format(reg.SOURCE_FORMATS[f].labels)[0, 0].tolist() for f in ("lits", "kits23", "btcv")}
    #                     bg  liv ltum kR kL tR tL cR cL pan ptum spl gb st ao ivc
    assert conv["lits"] == [0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert conv["kits23"] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 0, 0, 0, 0, 0]
    assert conv["btcv"] == [0, 6, 6, 2, 3, 2, 3, 2, 3, 11, 11, 1, 4, 7, 8, 9]
    assert ph.to_format(reg.SOURCE_FORMATS["msd_pancreas"].labels)[0, 0].tolist()[9:11] == [1, 2]


# --------------------------------------------------------------------------------------------------------------------
# images: anatomy, visibility, scanners
# --------------------------------------------------------------------------------------------------------------------
def test_every_organ_is_visible_in_every_site(fed):
    """Each site's image shows all organs (not only the one it labels): the organ's median HU stands out from the
    unlabelled tissue around it."""
    out, _, meta = fed
    for s in _all_sites(meta):
        for i, c in enumerate(s["cases"]):
            if c["label"] is None:
                continue
            ph = site_phantom(SEED, s["name"], i, SIZE)
            img = _to_phantom_order(np.asarray(_read(out, c["image"]).dataobj).astype(np.float32), s["layout"])
            body = img > -500
            for organ in FED_ORGANS + ("stomach", "aorta"):
                m = ph.mask(organ)
                assert m.sum() >= 5, (s["name"], i, organ)
                shell = ndimage.binary_dilation(m) & ~m & body & (ph.labels == 0)
                contrast = np.median(img[m]) - np.median(img[shell])
                assert abs(contrast) > 8, (s["name"], i, organ, contrast)
                # soft tissue or contrast-filled (partial volume with fat at these coarse voxels), not fat or air
                if organ != "stomach":
                    assert np.median(img[m]) > -60, (s["name"], i, organ)


def test_organ_volumes_are_plausible(fed):
    _, _, meta = fed
    ranges = {"liver": (700, 2600), "spleen": (60, 600), "kidney": (100, 650), "pancreas": (25, 200),
              "gallbladder": (3, 120), "stomach": (60, 900)}
    for s in _all_sites(meta):
        for c in s["cases"]:
            vol = c["volumes_ml"]
            for organ, (lo, hi) in ranges.items():
                assert lo <= vol[organ] <= hi, (s["name"], organ, vol[organ])
            assert max(vol, key=vol.get) == "liver"


def test_anatomy_is_where_it_belongs():
    ph = render_phantom(np.random.default_rng(11), (48, 48, 40), Scanner(fov_mm=420, z_coverage_mm=260))
    X, Y, Z = np.meshgrid(*[o + s * np.arange(n) for o, s, n in zip(ph.origin, ph.spacing, ph.labels.shape)],
                          indexing="ij")

    def centre(key):
        m = ph.mask(key)
        return np.array([X[m].mean(), Y[m].mean(), Z[m].mean()])

    liv, spl, kr, kl, pan, gb, st, ao = (centre(k) for k in ("liver", "spleen", "kidney_right", "kidney_left",
                                                           "pancreas", "gallbladder", "stomach", "aorta"))
    assert liv[0] < 0 < spl[0]  # liver on the patient's right (LPS x < 0), spleen on the left
    assert kr[0] < 0 < kl[0] and kr[1] > pan[1] and kl[1] > pan[1]  # kidneys posterior, either side
    assert kr[2] < kl[2]  # right kidney lower
    assert pan[1] < kl[1] and liv[0] < pan[0] < spl[0]  # pancreas in front of the left kidney, between
    assert gb[0] < 0 and gb[2] < liv[2]  # gallbladder under the right liver
    assert st[0] > 0 and st[1] < kl[1]  # stomach left and anterior
    assert ao[0] > 0 and abs(ao[0]) < 40  # aorta just left of the midline
    img = ph.image
    assert np.median(img[ph.labels == 0][:50]) < -900  # corner: air
    assert img.max() > 300  # bone
    # organs never overlap: one label per voxel by construction, and the masks are disjoint
    assert not np.any(ph.mask("liver") & ph.mask("kidney"))


def test_sites_look_like_different_scanners(fed):
    out, _, meta = fed
    spacings, liver_hu, body_stats, minima = {}, {}, {}, {}
    for s in _all_sites(meta):
        c = s["cases"][0]
        spacings[s["name"]] = tuple(c["spacing_xyz_mm"])
        ph = site_phantom(SEED, s["name"], 0, SIZE)
        img = _to_phantom_order(np.asarray(_read(out, c["image"]).dataobj).astype(np.float32), s["layout"])
        liver_hu[s["name"]] = float(np.median(img[ph.mask("liver")]))
        minima[s["name"]] = float(img.min())
        body = img > -500
        body_stats[s["name"]] = (round(float(img[body].mean())), round(float(img[body].std())))
        # the header's spacing is the phantom spacing (permuted for KiTS)
        zooms = _read(out, c["image"]).header.get_zooms()
        expect = spacings[s["name"]][::-1] if s["layout"] == "kits23" else spacings[s["name"]]
        assert np.allclose(zooms, expect, rtol=1e-4)
    assert len(set(spacings.values())) == len(spacings)
    assert len({round(v[2] / v[0], 2) for v in spacings.values()}) >= 4  # different anisotropy
    assert max(liver_hu.values()) - min(liver_hu.values()) > 10
    assert len(set(body_stats.values())) == len(body_stats)
    assert len({s["scanner"]["noise_hu"] for s in _all_sites(meta)}) == len(body_stats)
    assert minima["pancreas_site"] == -2048  # padding outside the reconstruction circle
    # contrast phases as the public datasets have them: KiTS late-arterial (the PHASES entry "pancreatic"), the
    # pancreas site pancreatic, the test set (BTCV), liver and spleen portal-venous; the sites whose organ the test
    # set scores in another phase must bridge that shift
    phases = {s["name"]: s["scanner"]["phase"] for s in _all_sites(meta)}
    assert phases["kidney_site"] == phases["pancreas_site"] == "pancreatic"
    assert phases["liver_site"] == phases["spleen_site"] == phases["test_set"] == "portal_venous"


def test_kits_is_stored_slice_axis_first(fed):
    out, _, meta = fed
    kits = next(s for s in meta["sites"] if s["name"] == "kidney_site")
    img = _read(out, kits["cases"][0]["image"])
    lab = _read(out, kits["cases"][0]["label"])
    assert img.shape == (SIZE[2], SIZE[1], SIZE[0])
    assert nib.aff2axcodes(img.affine) == ("I", "P", "L")
    assert np.allclose(img.affine, lab.affine)
    a = img.affine[:3, :3]
    assert a[0, 0] == 0 and a[2, 2] == 0 and a[2, 0] < 0 and a[0, 2] < 0 and a[1, 1] < 0
    # same physical patient as the phantom once both are brought to RAS
    ph = site_phantom(SEED, "kidney_site", 0, SIZE)
    ref = nib.as_closest_canonical(nib.Nifti1Image(np.round(ph.image), ph.affine_ras()))
    can = nib.as_closest_canonical(img)
    assert np.allclose(can.affine, ref.affine, atol=1e-4)
    assert np.array_equal(np.asanyarray(can.dataobj).astype(np.float32), ref.get_fdata().astype(np.float32))
    other = _read(out, meta["sites"][0]["cases"][0]["image"])
    assert nib.aff2axcodes(other.affine) == ("L", "P", "S")


# --------------------------------------------------------------------------------------------------------------------
# determinism, seeds, options, atomic writes
# --------------------------------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_files(fed, tmp_path):
    out, _, meta = fed
    again = tmp_path / "again"
    make_federation(again, seed=SEED, size=SIZE, cases_per_site=N_CASES, test_cases=N_TEST)
    assert _tree_digest(out) == _tree_digest(again)
    meta2 = json.loads((again / "synth_meta.json").read_text())
    assert _array_digest(out, meta) == _array_digest(again, meta2)


def test_other_seed_differs(fed, tmp_path):
    out, _, meta = fed
    other = tmp_path / "other"
    make_federation(other, seed=SEED + 1, size=SIZE, cases_per_site=N_CASES, test_cases=N_TEST)
    meta2 = json.loads((other / "synth_meta.json").read_text())
    assert [c["image"] for s in meta["sites"][:2] for c in s["cases"]] == \
        [c["image"] for s in meta2["sites"][:2] for c in s["cases"]]
    for s1, s2 in zip(_all_sites(meta), _all_sites(meta2)):
        for c1, c2 in zip(s1["cases"], s2["cases"]):
            a = np.asarray(_read(out, c1["image"]).dataobj)
            b = np.asarray(_read(other, c2["image"]).dataobj)
            assert a.shape == b.shape and not np.array_equal(a, b)
    assert _array_digest(out, meta) != _array_digest(other, meta2)


def test_options_and_refusals(tmp_path):
    out = tmp_path / "fed"
    (out / "sources").mkdir(parents=True)  # an empty sources folder is fine
    spec_path = make_federation(out, seed=1, size=TINY, cases_per_site=1, test_cases=0, first_dataset_id=310,
                                with_tumours=False)
    spec = load_spec(spec_path)
    assert spec.test_set is None and not (out / "sources" / "btcv").exists()
    assert [s.dataset_id for s in spec.sites] == [310, 311, 312, 313]
    meta = json.loads((out / "synth_meta.json").read_text())
    for s in meta["sites"]:
        for c in s["cases"]:
            assert c["lesions"] == []
            if c["label"]:
                assert c["label_values"] == [0, 1], (s["name"], c["label_values"])
    # LiTS has only one batch folder when there is one case
    assert [p.name for p in (out / "sources" / "liver_lits").iterdir()] == ["Training Batch 1"]

    before = _tree_digest(out)
    with pytest.raises(FileExistsError):
        make_federation(out, seed=2, size=TINY, cases_per_site=1, test_cases=0)
    assert _tree_digest(out) == before
    make_federation(out, seed=2, size=TINY, cases_per_site=1, test_cases=1, overwrite=True)
    assert load_spec(out / "federation.toml").test_set is not None
    assert _tree_digest(out) != before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    for bad in (dict(seed=-1), dict(size=(4, 32, 32)), dict(cases_per_site=0), dict(first_dataset_id=995)):
        with pytest.raises(ValueError):
            make_federation(tmp_path / "bad", **{"size": TINY, **bad})
    assert not (tmp_path / "bad" / "sources").exists()


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = fed_mod._save_nifti

    def flaky(path, arr, affine):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk full")
        real(path, arr, affine)

    monkeypatch.setattr(fed_mod, "_save_nifti", flaky)
    out = tmp_path / "fed"
    with pytest.raises(OSError, match="disk full"):
        make_federation(out, seed=0, size=TINY, cases_per_site=1, test_cases=1)
    assert not (out / "sources").exists() and not (out / "federation.toml").exists()
    assert not out.exists() or not list(out.iterdir())  # not even the temporary folder


def test_phantom_api():
    rng = np.random.default_rng(0)
    ph = render_phantom(rng, TINY, Scanner(phase="arterial"))
    image, labels, spacing = ph  # tuple-like
    assert image.dtype == np.float32 and labels.dtype == np.uint8 and image.shape == labels.shape == TINY
    assert set(np.unique(labels).tolist()) <= set(STRUCTURES) | {0}
    assert all(k in reg.ORGANS for k in STRUCTURES.values())
    a = ph.affine_ras()
    assert np.allclose(np.diag(a)[:3], [-spacing[0], -spacing[1], spacing[2]])
    assert np.array_equal(render_phantom(np.random.default_rng(0), TINY, Scanner(phase="arterial")).image, image)
    with pytest.raises(ValueError):
        render_phantom(rng, TINY, Scanner(phase="delayed"))


def test_fov_scale_crops_tighter_and_gives_organs_more_voxels():
    from nnunetv2_fedkd.data.synthetic.federation import site_phantom, site_scanner

    full, tight = site_scanner(7, "test_set"), site_scanner(7, "test_set", fov_scale=0.7)
    assert tight.fov_mm == pytest.approx(full.fov_mm * 0.7, abs=0.01)
    assert tight.z_coverage_mm == pytest.approx(full.z_coverage_mm * 0.7, abs=0.01)
    a = site_phantom(7, "test_set", 0, (32, 32, 24))
    b = site_phantom(7, "test_set", 0, (32, 32, 24), fov_scale=0.7)
    assert b.spacing[0] == pytest.approx(a.spacing[0] * 0.7, rel=1e-6)
    for organ in ("liver", "kidney", "pancreas"):
        assert b.mask(organ).sum() > 1.5 * a.mask(organ).sum(), organ
    with pytest.raises(ValueError, match="fov_scale"):
        make_federation(Path("/nonexistent-never-written"), fov_scale=0.05)


def test_eight_sites_add_a_second_site_per_organ_and_leave_the_first_four_unchanged(tmp_path):
    from nnunetv2_fedkd.workflows.pipeline import convert_federation
    from nnunetv2_fedkd.spec import load_spec

    four = load_spec(make_federation(tmp_path / "four", seed=SEED, size=TINY, cases_per_site=1, test_cases=0))
    eight = load_spec(make_federation(tmp_path / "eight", seed=SEED, size=TINY, cases_per_site=1, test_cases=0,
                                      num_sites=8))
    assert [s.name for s in eight.sites[:4]] == [s.name for s in four.sites]
    assert [s.name for s in eight.sites[4:]] == [f"{s.name}_b" for s in four.sites]
    assert [s.organs for s in eight.sites[4:]] == [s.organs for s in four.sites] and eight.labels == four.labels
    assert sorted(s.dataset_id for s in eight.sites) == list(range(501, 509))
    assert len({s.view_dataset for s in eight.sites}) == 8
    m4 = json.loads((tmp_path / "four" / "synth_meta.json").read_text())
    m8 = json.loads((tmp_path / "eight" / "synth_meta.json").read_text())
    assert m8["num_sites"] == 8
    for a, b in zip(m4["sites"], m8["sites"][:4]):  # the first four are the same files
        for ca, cb in zip(a["cases"], b["cases"]):
            assert np.array_equal(np.asarray(_read(tmp_path / "four", ca["image"]).dataobj),
                                  np.asarray(_read(tmp_path / "eight", cb["image"]).dataobj))
    for a, b in zip(m8["sites"][:4], m8["sites"][4:]):  # a second site: other patients, other calibration
        assert b["scanner"] != a["scanner"]
        assert not np.array_equal(np.asarray(_read(tmp_path / "eight", a["cases"][0]["image"]).dataobj),
                                  np.asarray(_read(tmp_path / "eight", b["cases"][0]["image"]).dataobj))
    written = convert_federation(eight, tmp_path / "eight" / "nnUNet_raw")  # the converters read every layout
    assert len(written) == 8
    for bad in (0, 9, True):
        with pytest.raises(ValueError, match="num_sites"):
            make_federation(tmp_path / f"bad{bad}", seed=SEED, size=TINY, cases_per_site=1, num_sites=bad)


def test_the_fully_labelled_federation_has_the_same_images_and_every_organ_labelled_at_every_site(tmp_path):
    from nnunetv2_fedkd.workflows.pipeline import convert_federation

    part = load_spec(make_federation(tmp_path / "part", seed=SEED, size=TINY, cases_per_site=1, test_cases=1))
    full = load_spec(make_federation(tmp_path / "full", seed=SEED, size=TINY, cases_per_site=1, test_cases=1,
                                     fully_labelled=True))
    assert full.labels == part.labels == list(FED_ORGANS)
    assert [s.name for s in full.sites] == [s.name for s in part.sites]
    assert all(s.organs == list(FED_ORGANS) and s.source_format == "btcv" for s in full.sites)
    assert all(f.dataset == p.dataset + "Full" for f, p in zip(full.sites, part.sites))
    mp = json.loads((tmp_path / "part" / "synth_meta.json").read_text())
    mf = json.loads((tmp_path / "full" / "synth_meta.json").read_text())
    assert mf["fully_labelled"] is True and mp["fully_labelled"] is False
    for a, b in zip(mp["sites"], mf["sites"]):
        assert a["scanner"] == b["scanner"]
        pa, pb = _read(tmp_path / "part", a["cases"][0]["image"]), _read(tmp_path / "full", b["cases"][0]["image"])
        # the same phantom; KiTS stores it in another axis order, so compare in RAS
        ra = nib.as_closest_canonical(pa).get_fdata()
        rb = nib.as_closest_canonical(pb).get_fdata()
        assert ra.shape == rb.shape and np.array_equal(ra, rb), a["name"]
    ta, tb = (_read(tmp_path / d, m["test_set"]["cases"][0]["image"]) for d, m in (("part", mp), ("full", mf)))
    assert np.array_equal(np.asarray(ta.dataobj), np.asarray(tb.dataobj))  # the same external test set
    written = convert_federation(full, tmp_path / "full" / "nnUNet_raw")
    for site, folder in zip(full.sites, written):
        dj = json.loads((folder / "dataset.json").read_text())
        assert dj["labels"] == {"background": 0, **{o: i + 1 for i, o in enumerate(FED_ORGANS)}}, site.name
        lab = np.asarray(nib.load(str(next((folder / "labelsTr").iterdir()))).dataobj)
        # every organ is labelled at every site, not only the site's own
        assert set(np.unique(lab).tolist()) == {0, 1, 2, 3, 4}, site.name
