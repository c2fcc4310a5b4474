"""CT-like abdominal phantoms: a cartoon of an abdominal CT scan, fast enough to make whole federations on a laptop.

Anatomy (all in patient coordinates, mm, DICOM LPS: +x towards the patient's LEFT, +y POSTERIOR, +z SUPERIOR; the
abdominal cavity is centred on the x/y origin):

* body outline (ellipse, flattened where the patient lies on the table) with skin, subcutaneous fat and muscle
  wall; the abdominal cavity inside is visceral fat; a patient table below the back;
* spine (vertebral bodies with cortex, discs, spinal canal, posterior arch, spinous and transverse processes),
  paraspinal and psoas muscles, ribs descending from back to front, lower ribs floating;
* diaphragm domes with the lung bases and the heart above them;
* liver (right lobe + left lobe + random bulges) under the right dome; spleen postero-laterally under the left dome;
  right and left kidney beside the spine (renal sinus, cortex/medulla, right kidney lower); pancreas (head by the
  duodenum, neck in front of the aorta, tail towards the splenic hilum, in front of the left kidney); gallbladder
  under the liver; stomach (fundus, body, antrum; gas on top of fluid, the patient lies supine); aorta in front of
  the spine, left of the midline; inferior vena cava right of it; bowel loops with gas in the lower cavity;
* optional lesions: liver tumours (hypodense), kidney tumours (exophytic, necrotic centre) and cysts, pancreatic
  tumours.

Randomness: every case draws sizes, positions and rotations of each structure within plausible ranges, a smooth
random displacement field (a few low-frequency sine modes) warps the whole body, per-patient HU jitter and per-organ
smooth texture. Structures never overlap in the label map: they are painted onto one tissue map in a fixed order,
later ones winning (body wall, lungs/heart, bowel < liver < stomach < spleen < pancreas < gallbladder < kidneys and
their lesions < vena cava, aorta < ribs < spine); each lesion only replaces its own organ (kidney tumours and cysts may
also grow out into the surrounding fat).

Rendering: the tissue map is built on a grid ``supersample`` times finer than the output in each axis; the image is
the block mean of the fine HU map (partial-volume edges), the label map is the block mode of the fine structure map
(sharp masks, labelled structures win ties with background). Then: texture, scanner blur, calibration gain/offset,
correlated noise, optional padding outside the circular reconstruction field of view.

Output arrays are indexed ``[i, j, k]`` with i along +x (right -> left), j along +y (anterior -> posterior), k along
+z (inferior -> superior), i.e. the voxel order of a DICOM-derived NIfTI; :meth:`Phantom.affine_ras` gives the
matching NIfTI (RAS) affine.

Label ids (:data:`STRUCTURES`) are fixed across phantoms and name registry keys; lesions also name the organ they
lie in (:data:`LESION_HOSTS`), so a left-kidney tumour can become "left kidney" in formats without tumour labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnunetv2_fedkd.organs import ancestors
from nnunetv2_fedkd.data.synthetic.anatomy import (_FIXED_HU, _LABEL_PRIORITY, _STRUCT_OF_TISSUE, _TEXTURE_OF_TISSUE,
                                                   _TISSUES, LESION_HOSTS, PHASES, STRUCTURES, T)
from nnunetv2_fedkd.data.synthetic.geometry import _capsules, _Ellipsoid, _ellipsoid_paint, _rot, _Space
from nnunetv2_fedkd.data.synthetic.scanner import Scanner, jitter_scanner


@dataclass
class Phantom:
    """One rendered case. ``image`` (float32 HU) and ``labels`` (uint8 structure ids, see :data:`STRUCTURES`) are
    indexed [x, y, z] (patient right->left, anterior->posterior, inferior->superior)."""

    image: np.ndarray
    labels: np.ndarray
    spacing: Tuple[float, float, float]  # mm per voxel along the array axes
    origin: Tuple[float, float, float]  # LPS position (mm) of the centre of voxel [0, 0, 0]
    structures: Dict[int, str] = field(default_factory=lambda: dict(STRUCTURES))
    hosts: Dict[int, str] = field(default_factory=lambda: dict(LESION_HOSTS))
    info: Dict[str, object] = field(default_factory=dict)  # phase, lesions, patient parameters (for synth_meta)

    def __iter__(self):  # image, labels, spacing = phantom
        return iter((self.image, self.labels, self.spacing))

    def affine_ras(self) -> np.ndarray:
        """NIfTI (RAS+) affine of ``image``/``labels``: voxel i runs to the patient's left (RAS -x), j posterior
        (RAS -y), k superior (RAS +z)."""
        sx, sy, sz = self.spacing
        ox, oy, oz = self.origin
        return np.array([[-sx, 0, 0, -ox], [0, -sy, 0, -oy], [0, 0, sz, oz], [0, 0, 0, 1]], dtype=float)

    def ids_of(self, key: str) -> List[int]:
        """Structure ids that count as registry entry ``key`` (itself, its sub-parts and lesions inside it)."""
        return [i for i in self.structures if key in _chain(i, self.structures, self.hosts)]

    def mask(self, key: str) -> np.ndarray:
        """Boolean mask of everything that counts as ``key`` (e.g. "kidney" = both kidneys + their lesions)."""
        return np.isin(self.labels, self.ids_of(key))

    def to_format(self, source_labels: Mapping[int, str]) -> np.ndarray:
        """The label map in a source format's convention (``organs.SOURCE_FORMATS[...].labels``: value -> key). Each
        structure gets the value of the first of (itself, the organ it lies in, their parents) that the format
        labels; structures the format does not label become 0."""
        inverse: Dict[str, int] = {}
        for value, key in source_labels.items():
            if key in inverse:
                raise ValueError(f"format labels {key!r} twice")
            inverse[key] = int(value)
        lut = np.zeros(256, dtype=np.uint8)
        for sid in self.structures:
            for key in _chain(sid, self.structures, self.hosts):
                if key in inverse:
                    lut[sid] = inverse[key]
                    break
        return lut[self.labels]


def _chain(sid: int, structures: Mapping[int, str], hosts: Mapping[int, str]) -> List[str]:
    key = structures[sid]
    chain = [key]
    host = hosts.get(sid)
    for k in (ancestors(host) if host else ancestors(key)[1:]):
        if k not in chain:
            chain.append(k)
    for k in ancestors(key)[1:]:
        if k not in chain:
            chain.append(k)
    return chain


# --------------------------------------------------------------------------------------------------------------------
# the phantom
# --------------------------------------------------------------------------------------------------------------------
def render_phantom(
    rng: np.random.Generator,
    size: Sequence[int] = (64, 64, 48),
    scanner: Optional[Scanner] = None,
    with_tumours: bool = True,
    supersample: int = 2,
) -> Phantom:
    """Draw one patient from ``rng`` and image it with ``scanner``. Deterministic for a given generator state."""
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 8:
        raise ValueError(f"size must be three integers >= 8, got {size}")
    if supersample < 1:
        raise ValueError("supersample must be >= 1")
    scanner = scanner or Scanner()
    if scanner.phase not in PHASES:
        raise ValueError(f"unknown contrast phase {scanner.phase!r}; known: {', '.join(PHASES)}")
    U = rng.uniform

    # ---- acquisition geometry (per case) ---------------------------------------------------------------------
    fov = scanner.fov_mm * (1 + U(-scanner.fov_jitter, scanner.fov_jitter))
    spacing = scanner.spacing(size, fov)
    origin = tuple(-(n - 1) / 2 * s for n, s in zip(size, spacing))
    f = supersample
    fine_shape = tuple(n * f for n in size)
    fine_spacing = tuple(s / f for s in spacing)
    fine_origin = tuple(o - s / 2 + s / (2 * f) for o, s in zip(origin, spacing))
    # patient placement: lateral offset on the table, table height, scan range, small yaw
    shift = (U(-10, 10), U(-8, 8), -(scanner.z_center_mm + U(-8, 8)))

    # ---- patient ---------------------------------------------------------------------------------------------
    ai, bi = U(112, 135), U(78, 92)  # abdominal cavity semi-axes (lateral, antero-posterior)
    m_wall = U(8, 13)
    f_lat, f_ant, f_post = U(8, 38), U(10, 45), U(6, 22)
    skin = 2.5
    A = ai + m_wall + f_lat + skin
    body_cy = (f_post - f_ant) / 2
    B = bi + m_wall + skin + (f_ant + f_post) / 2
    flat = U(5, 14)
    sxp, syp, szp = ai / 125.0, bi / 85.0, U(0.92, 1.08)
    zR = 95.0 + U(-10, 10)  # right diaphragm dome
    zL = zR - U(8, 20)

    def P(x, y, z):  # nominal position (for a 125 x 85 mm cavity) -> this patient
        return np.array([x * sxp, y * syp, z])

    modes = []
    for _ in range(4):
        lam = U(110, 260)
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        amp = rng.normal(size=3)
        amp *= U(1.5, 3.5) / np.linalg.norm(amp)
        modes.append((amp, d * 2 * math.pi / lam, U(0, 2 * math.pi)))
    yaw = U(-4, 4)
    sp = _Space(fine_shape, fine_spacing, fine_origin, shift, yaw, modes)
    py = sp.P[1]
    info: Dict[str, object] = {"phase": scanner.phase, "fov_mm": round(float(fov), 3),
                               "spacing": [round(float(s), 5) for s in spacing]}

    # ---- body wall -------------------------------------------------------------------------------------------
    full = (slice(None),) * 3

    def ell2(sl, cx, cy, a, b):
        X, Y, _ = sp.p(sl)
        return ((X - np.float32(cx)) / np.float32(a)) ** 2 + ((Y - np.float32(cy)) / np.float32(b)) ** 2

    q_body = ell2(full, 0, body_cy, A, B)
    body = (q_body <= 1) & (py <= body_cy + B - flat)
    del q_body
    sp.paint("skin", full, body)
    sp.paint("subcutaneous_fat", full, ell2(full, 0, body_cy, A - skin, B - skin) <= 1, where=body)
    sp.paint("muscle", full, ell2(full, 0, 0, ai + m_wall, bi + m_wall) <= 1, where=body)
    cav_full = ell2(full, 0, 0, ai, bi) <= 1
    cav_full &= body
    sp.paint("visceral_fat", full, cav_full)

    def cavity(sl):
        return cav_full[sl]

    # table (world frame, under the patient's back)
    if scanner.table_hu is not None:
        wy = sp.axes[1][None, :, None]
        wx = sp.axes[0][:, None, None]
        ttop = shift[1] + body_cy + B - flat + 4
        tab = (wy >= ttop) & (wy <= ttop + U(10, 18)) & (np.abs(wx - shift[0] * 0.3) <= A + 40)
        tab = np.broadcast_to(tab, fine_shape)
        sp.tissue[tab & (sp.tissue == T["air"])] = T["table"]

    # ---- diaphragm, lungs, heart -----------------------------------------------------------------------------
    Rc = U(80, 100)
    xR, xL = -55 * sxp, 55 * sxp

    def dome(sl):
        X, Y, _ = sp.p(sl)
        r2 = ((X - np.float32(xR)) ** 2 + (Y - np.float32(5)) ** 2)
        l2 = ((X - np.float32(xL)) ** 2 + (Y - np.float32(5)) ** 2)
        return np.maximum(np.float32(zR) - r2 / np.float32(2 * Rc), np.float32(zL) - l2 / np.float32(2 * Rc))

    pf = U(2, 6)  # properitoneal fat between the wall and the organs
    organ_space = (ell2(full, 0, 0, ai - pf, bi - pf) <= 1) & cav_full

    def below_dome(sl):
        return (sp.P[2][sl] < dome(sl)) & organ_space[sl]

    sl = sp.box((-ai, -bi, min(zR, zL) - 130), (ai, bi, 400))  # the domes stay above this inside the cavity
    if all(s.stop > s.start for s in sl):
        Z = sp.P[2][sl]
        d = dome(sl)
        cav = cav_full[sl]
        sp.paint("muscle", sl, (Z >= d) & (Z < d + np.float32(5)) & cav)
        sp.paint("lung", sl, (Z >= d + np.float32(5)) & cav)
        heart = _Ellipsoid(P(20, -30, 0) + np.array([0, 0, zL + 55]), np.array([58, 45, 55]) * U(0.9, 1.1),
                           _rot("z", U(-25, -10)))
        lo, hi = heart.bounds()
        sl2 = sp.box(lo, hi)
        if all(s.stop > s.start for s in sl2):
            X, Y, Z2 = sp.p(sl2)
            sp.paint("heart", sl2, (heart.q(X, Y, Z2) <= 1) & (Z2 >= dome(sl2) + 5) & cav_full[sl2])

    # ---- muscles around the spine ----------------------------------------------------------------------------
    vb_y = 15 * syp + U(-4, 4)
    vb = np.array([21, 16]) * U(0.9, 1.1)
    canal_y = vb_y + vb[1] + 9
    for side in (-1, 1):
        e = _Ellipsoid(np.array([side * 32 * sxp, canal_y + 24, 0.0]), np.array([26, 21, 600.0]) * U(0.9, 1.1))
        _ellipsoid_paint(sp, e, "muscle", clip=lambda s: sp.tissue[s] != T["air"])
    # psoas: grows downwards from ~L1
    z_psoas = U(10, 30)
    for side in (-1, 1):
        zs = np.linspace(z_psoas, -260, 12)
        r = np.clip(5 + 0.17 * (z_psoas - zs), 5, 22) * U(0.85, 1.15)
        pts = np.stack([side * (vb[0] + r * 0.9), np.full_like(zs, vb_y + 4), zs], 1)
        _capsules(sp, pts, r, "muscle", clip=cavity)

    # ---- bowel (lower cavity) --------------------------------------------------------------------------------
    z_bowel = U(-40, -10)
    sl = sp.box((-ai, -bi, -400), (ai, bi, z_bowel + 40))
    if all(s.stop > s.start for s in sl):
        shp = tuple(s.stop - s.start for s in sl)
        sig = [8.0 / fs for fs in fine_spacing]
        n1 = ndimage.gaussian_filter(rng.standard_normal(shp, dtype=np.float32), sig)
        n1 /= n1.std() + 1e-6
        n2 = ndimage.gaussian_filter(rng.standard_normal(shp, dtype=np.float32), [5.0 / fs for fs in fine_spacing])
        n2 /= n2.std() + 1e-6
        _, Y, Z = sp.p(sl)
        # bowel fills the front and the lower part of the cavity; it fades out towards the upper limit
        level = (Z - np.float32(z_bowel)) / np.float32(25.0) - np.float32(0.3) * (Y < 0) \
            + np.float32(1.5) * (Y > np.float32(0.25 * bi))  # the retroperitoneum stays fat
        bowel = (n1 > level) & cavity(sl)
        sp.paint("bowel", sl, bowel, allowed=("visceral_fat",))
        sp.paint("bowel_gas", sl, bowel & (n2 > 1.6), allowed=("bowel",))
        del n1, n2

    organ_clip = below_dome

    # ---- liver -----------------------------------------------------------------------------------------------
    s_liv = U(0.9, 1.1)
    liver_main = _Ellipsoid(P(-55, 0, 0) + np.array([0, 0, zR - 60 * szp]) + rng.normal(0, 4, 3),
                            np.array([68, 78, 72]) * s_liv * U(0.94, 1.06, 3), _rot("z", U(-8, 8)) @ _rot("y", U(-8, 8)))
    liver_left = _Ellipsoid(P(12, -40, 0) + np.array([0, 0, zR - 35 * szp]) + rng.normal(0, 4, 3),
                            np.array([55, 30, 32]) * s_liv * U(0.85, 1.15, 3), _rot("z", U(5, 25)))
    liver_parts = [liver_main, liver_left]
    for _ in range(int(rng.integers(1, 3))):
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        liver_parts.append(_Ellipsoid(liver_main.point(0.75 * u), np.full(3, 1.0) * U(22, 38) * U(0.8, 1.2, 3),
                                      _rot("z", U(0, 180))))
    for e in liver_parts:
        _ellipsoid_paint(sp, e, "liver", clip=organ_clip)

    lesions: List[dict] = []
    if with_tumours:
        for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):
            u = rng.normal(size=3)
            u *= U(0.0, 0.65) / np.linalg.norm(u)
            r = U(6, 20)
            c = liver_main.point(u)
            _ellipsoid_paint(sp, _Ellipsoid(c, r * U(0.8, 1.2, 3), _rot("z", U(0, 180))), "liver_tumour",
                             allowed=("liver",))
            lesions.append({"kind": "liver_tumour", "center": c.round(1).tolist(), "radius_mm": round(r, 1)})

    # ---- stomach ---------------------------------------------------------------------------------------------
    s_st = U(0.85, 1.15)
    st_parts = [
        _Ellipsoid(P(50, 5, 0) + np.array([0, 0, zL - 30 * szp]), np.array([35, 35, 35]) * s_st * U(0.9, 1.1, 3)),
        _Ellipsoid(P(35, -40, 0) + np.array([0, 0, zL - 62 * szp]), np.array([40, 27, 42]) * s_st * U(0.9, 1.1, 3),
                   _rot("y", U(20, 40))),
        _Ellipsoid(P(2, -52, 0) + np.array([0, 0, zL - 92 * szp]), np.array([30, 18, 20]) * s_st * U(0.85, 1.15, 3),
                   _rot("z", U(-20, 20))),
    ]
    for e in st_parts:
        _ellipsoid_paint(sp, e, "stomach_wall", clip=organ_clip)
    gas_level = st_parts[1].c[1] - U(0.0, 0.9) * st_parts[1].r[1]
    for e in st_parts:
        lum = _Ellipsoid(e.c, np.maximum(e.r - 4.0, 3.0), e.R)
        _ellipsoid_paint(sp, lum, "stomach_content", allowed=("stomach_wall",))
        lo, hi = lum.bounds()
        sl = sp.box(lo, hi)
        if all(s.stop > s.start for s in sl):
            X, Y, Z = sp.p(sl)
            sp.paint("stomach_gas", sl, (lum.q(X, Y, Z) <= 1) & (Y < np.float32(gas_level)),
                     allowed=("stomach_content",))

    # ---- spleen ----------------------------------------------------------------------------------------------
    spleen = _Ellipsoid(P(78, 38, 0) + np.array([0, 0, zL - 45 * szp]) + rng.normal(0, 4, 3),
                        np.array([24, 50, 45]) * U(0.85, 1.15) * U(0.92, 1.08, 3),
                        _rot("z", U(27, 47)) @ _rot("x", U(-10, 10)))
    _ellipsoid_paint(sp, spleen, "spleen", clip=organ_clip)
    if U() < 0.5:  # a lobulation
        _ellipsoid_paint(sp, _Ellipsoid(spleen.point([0.5, U(-0.6, 0.6), U(-0.6, 0.6)]), np.full(3, U(12, 20))),
                         "spleen", clip=organ_clip)

    # ---- pancreas --------------------------------------------------------------------------------------------
    zp = zR - 95 * szp + U(-8, 8)
    nominal = np.array([[-30, -22, -25], [-30, -30, -5], [-5, -42, 0], [30, -30, 8], [62, 5, 18], [75, 20, 22]],
                       dtype=float)
    pts = np.stack([nominal[:, 0] * sxp, nominal[:, 1] * syp, nominal[:, 2] + zp], 1) + rng.normal(0, 3, (6, 3))
    radii = np.array([14, 17, 12, 12, 11, 9], dtype=float) * U(0.85, 1.15) * U(0.9, 1.1, 6)
    # peripancreatic fat (lesser sac, retroperitoneum) separates it from the stomach, spleen and liver
    _capsules(sp, pts, radii + U(2, 5), "visceral_fat", clip=organ_clip,
              allowed=("liver", "stomach_wall", "stomach_content", "stomach_gas", "spleen", "bowel", "bowel_gas"))
    _capsules(sp, pts, radii, "pancreas", clip=organ_clip)
    if with_tumours and U() < 0.8:
        k = int(rng.integers(0, 5))
        t = U()
        c = pts[k] + t * (pts[k + 1] - pts[k])
        r = U(7, 15)
        _ellipsoid_paint(sp, _Ellipsoid(c, r * U(0.85, 1.15, 3)), "pancreas_tumour",
                         allowed=("pancreas", "visceral_fat"))
        lesions.append({"kind": "pancreas_tumour", "center": c.round(1).tolist(), "radius_mm": round(r, 1)})

    # ---- gallbladder -----------------------------------------------------------------------------------------
    gb = _Ellipsoid(P(-42, -48, 0) + np.array([0, 0, zR - 105 * szp]) + rng.normal(0, 4, 3),
                    np.array([14, 16, 30]) * U(0.75, 1.2) * U(0.9, 1.1, 3), _rot("x", U(-45, -25)) @ _rot("y", U(-15, 15)))
    _ellipsoid_paint(sp, gb, "gallbladder", clip=organ_clip)

    # ---- kidneys ---------------------------------------------------------------------------------------------
    kidneys = {}
    for side, mside, zc in (("right", 1, zR - 120 * szp), ("left", -1, zR - 105 * szp)):
        # mside: +1 when the medial direction is +x (right kidney)
        c = P(-mside * 55, 45, 0) + np.array([0, 0, zc]) + rng.normal(0, 4, 3)
        R = _rot("z", -30 * mside + U(-10, 10)) @ _rot("y", mside * U(8, 18)) @ _rot("x", U(-12, 0))
        k = _Ellipsoid(c, np.array([26, 22, 52]) * U(0.88, 1.12) * U(0.93, 1.07, 3), R)
        kidneys[side] = (k, mside)
        _ellipsoid_paint(sp, k, f"kidney_{side}_cortex", clip=organ_clip)
        _ellipsoid_paint(sp, k.scaled(np.array([0.72, 0.72, 0.8])), f"kidney_{side}_medulla",
                         allowed=(f"kidney_{side}_cortex",))
        sinus = _Ellipsoid(k.point([mside * 0.6, 0, 0]), k.r * np.array([0.5, 0.45, 0.5]), R)
        _ellipsoid_paint(sp, sinus, "renal_sinus", allowed=(f"kidney_{side}_cortex", f"kidney_{side}_medulla"))
    if with_tumours:
        not_organs = ("visceral_fat", "bowel", "bowel_gas", "muscle", "renal_sinus")
        if U() < 0.8:
            side = "right" if U() < 0.5 else "left"
            k, mside = kidneys[side]
            u = np.array([-mside * U(0.2, 1), U(-1, 1), U(-1, 1)])
            u *= U(0.6, 0.95) / np.linalg.norm(u)
            c = k.point(u)
            r = U(10, 25)
            tum = _Ellipsoid(c, r * U(0.85, 1.15, 3))
            own = (f"kidney_{side}_cortex", f"kidney_{side}_medulla") + not_organs
            _ellipsoid_paint(sp, tum, f"kidney_{side}_tumour", allowed=own, clip=cavity)
            if r > 16:
                _ellipsoid_paint(sp, tum.scaled(0.5), f"kidney_{side}_tumour_necrosis",
                                 allowed=(f"kidney_{side}_tumour",))
            lesions.append({"kind": "kidney_tumour", "host": f"kidney_{side}", "center": c.round(1).tolist(),
                            "radius_mm": round(r, 1)})
        if U() < 0.4:
            side = "right" if U() < 0.5 else "left"
            k, mside = kidneys[side]
            u = np.array([-mside * U(0, 1), U(-1, 1), U(-1, 1)])
            u *= U(0.7, 1.0) / np.linalg.norm(u)
            c = k.point(u)
            r = U(5, 14)
            own = (f"kidney_{side}_cortex", f"kidney_{side}_medulla") + not_organs
            _ellipsoid_paint(sp, _Ellipsoid(c, np.full(3, r)), f"kidney_{side}_cyst", allowed=own, clip=cavity)
            lesions.append({"kind": "kidney_cyst", "host": f"kidney_{side}", "center": c.round(1).tolist(),
                            "radius_mm": round(r, 1)})

    # ---- vessels ---------------------------------------------------------------------------------------------
    ra = U(9, 13)
    ax0, ay = 14 * sxp + U(-4, 4), vb_y - vb[1] - ra - U(2, 5)
    zs = np.linspace(-300, 400, 15)
    wig = U(-4, 4, 15)
    _capsules(sp, np.stack([ax0 + wig, ay + 0.5 * wig, zs], 1), np.full(15, ra), "aorta")
    ivc_top = zR + U(0, 10)
    zs = np.linspace(-300, ivc_top, 12)
    ivc = np.stack([-22 * sxp + U(-3, 3, 12), np.full(12, ay + U(0, 6)), zs], 1)
    _capsules(sp, ivc, np.full(12, U(9, 12)), "inferior_vena_cava", clip=cavity)

    # ---- ribs ------------------------------------------------------------------------------------------------
    z12 = zR - 100 * szp + U(-10, 10)  # the 12th rib passes behind the upper kidneys
    spacing_rib = U(26, 32)
    drop = U(100, 130)
    ribs = [(z12 + (11 - k) * spacing_rib, 0.42 if k == 11 else (0.56 if k == 10 else 0.82)) for k in range(12)]
    sl = sp.box((-(ai + m_wall), -(bi + m_wall), z12 - drop - 10), (ai + m_wall, bi + m_wall, 500))
    if all(s.stop > s.start for s in sl):
        X, Y, Z = sp.p(sl)
        ar, br = ai + m_wall * 0.5, bi + m_wall * 0.5
        rho = np.sqrt((X / np.float32(ar)) ** 2 + (Y / np.float32(br)) ** 2)
        rad = (rho - 1) * np.sqrt(X * X + Y * Y) / np.maximum(rho, 1e-3)
        shell = np.abs(rad) < np.float32(3.5)
        idx = np.nonzero(shell)
        Xs, Ys, Zs = X[idx], Y[idx], Z[idx]
        phi = np.arctan2(np.abs(Xs), Ys - np.float32(vb_y)) / np.float32(math.pi)  # 0 behind the spine, 1 in front
        zc = np.float32(drop) * phi ** np.float32(1.3)
        hit = np.zeros(Xs.shape, bool)
        for z_rib, phi_end in ribs:
            hit |= (np.abs(Zs - np.float32(z_rib) + zc) < np.float32(4.5)) & (phi > 0.25) & (phi < phi_end)
        view = sp.tissue[sl]
        sub = view[idx]
        sub[hit & np.isin(sub, [T["muscle"], T["subcutaneous_fat"], T["visceral_fat"]])] = T["rib"]
        view[idx] = sub

    # ---- spine -----------------------------------------------------------------------------------------------
    sl = sp.box((-45, vb_y - vb[1] - 2, -500), (45, canal_y + 45, 500))
    if all(s.stop > s.start for s in sl):
        X, Y, Z = sp.p(sl)
        period, disc_h, z0 = U(28, 33), U(5, 8), U(0, 40)
        zm = np.mod(Z - np.float32(z0), np.float32(period))
        q = (X / np.float32(vb[0])) ** 2 + ((Y - np.float32(vb_y)) / np.float32(vb[1])) ** 2
        inner = 1 - 3.0 / vb.min()
        sp.paint("cortical_bone", sl, q <= 1)
        sp.paint("cancellous_bone", sl, q <= inner ** 2)
        sp.paint("disc", sl, (q <= 1) & (zm < np.float32(disc_h)))
        rc = np.sqrt(X ** 2 + (Y - np.float32(canal_y)) ** 2)
        arch_z = (zm > np.float32(disc_h + 2)) & (zm < np.float32(period - 3))
        sp.paint("cortical_bone", sl, (rc < 16) & (Y > np.float32(canal_y - 8)) & arch_z)
        sp.paint("cortical_bone", sl, (np.abs(X) < 4.5) & (Y > np.float32(canal_y)) & (Y < np.float32(canal_y + 36))
                 & (zm > np.float32(disc_h + 6)) & (zm < np.float32(period - 1)))
        sp.paint("cortical_bone", sl, (np.abs(X) < 33) & (np.abs(X) > 10) & (np.abs(Y - np.float32(canal_y - 3)) < 3.5)
                 & (np.abs(zm - np.float32(disc_h + 13)) < 4))
        sp.paint("csf", sl, rc < 8)

    # ---- intensities -----------------------------------------------------------------------------------------
    ph = PHASES[scanner.phase]
    hu = np.zeros(len(_TISSUES), dtype=np.float32)
    for name, i in T.items():
        if name in _FIXED_HU:
            v = _FIXED_HU[name]
        elif name in ("liver", "spleen", "pancreas", "aorta", "inferior_vena_cava", "heart"):
            v = ph[name]
        elif name.endswith("_cortex"):
            v = ph["kidney_cortex"]
        elif name.endswith("_medulla"):
            v = ph["kidney_medulla"]
        elif name in ("kidney_right_tumour", "kidney_left_tumour"):
            v = ph["kidney_tumour"]
        elif name == "liver_tumour":
            v = ph["liver"] - U(25, 45)
        elif name == "pancreas_tumour":
            v = ph["pancreas"] * U(0.4, 0.65)
        elif name == "stomach_content":
            v = U(5, 35)
        elif name == "table":
            v = scanner.table_hu if scanner.table_hu is not None else 0.0
        else:  # pragma: no cover - every tissue is listed above
            raise AssertionError(name)
        hu[i] = v
    jitter = rng.normal(0, 5, len(_TISSUES)).astype(np.float32)
    jitter[[T["air"], T["lung"], T["bowel_gas"], T["stomach_gas"], T["table"]]] = 0
    hu += jitter
    hu[T["kidney_left_cortex"]] = hu[T["kidney_right_cortex"]]
    hu[T["kidney_left_medulla"]] = hu[T["kidney_right_medulla"]]

    fine = sp.tissue
    n = size

    def block(a):
        return a.reshape(n[0], f, n[1], f, n[2], f)

    image = block(hu[fine]).mean(axis=(1, 3, 5), dtype=np.float32)
    tex_amp = block(_TEXTURE_OF_TISSUE[fine]).mean(axis=(1, 3, 5), dtype=np.float32)
    struct = block(_STRUCT_OF_TISSUE[fine]).transpose(0, 2, 4, 1, 3, 5).reshape(*n, f ** 3)
    labels = np.zeros(n, dtype=np.uint8)
    best = np.count_nonzero(struct == 0, axis=-1)
    present = set(np.unique(struct).tolist())
    for sid in _LABEL_PRIORITY:
        if sid not in present:
            continue
        cnt = np.count_nonzero(struct == sid, axis=-1)
        win = cnt >= best
        labels[win] = sid
        best = np.where(win, cnt, best)
    del struct, fine, sp

    # texture (smooth, fixed to anatomy per voxel)
    tex = ndimage.gaussian_filter(rng.standard_normal(n, dtype=np.float32), 1.0)
    tex2 = ndimage.gaussian_filter(rng.standard_normal(n, dtype=np.float32), 2.5)
    tex = tex / (tex.std() + 1e-6) * np.float32(0.8) + tex2 / (tex2.std() + 1e-6) * np.float32(0.6)
    image += tex_amp * tex
    # scanner: PSF / slice profile, calibration, correlated noise
    if any(b > 0 for b in scanner.blur_vox):
        image = ndimage.gaussian_filter(image, scanner.blur_vox)
    image = np.float32(scanner.gain) * image + np.float32(scanner.offset_hu)
    noise = ndimage.gaussian_filter(rng.standard_normal(n, dtype=np.float32), 0.5)
    noise *= np.float32(scanner.noise_hu) / (noise.std() + 1e-6)
    image += noise
    np.clip(image, -1024, 3071, out=image)
    if scanner.outside_fov_hu is not None:
        wx = (origin[0] + spacing[0] * np.arange(n[0]))[:, None]
        wy = (origin[1] + spacing[1] * np.arange(n[1]))[None, :]
        outside = (wx ** 2 + wy ** 2) > (min(n[0] * spacing[0], n[1] * spacing[1]) / 2) ** 2
        image[outside] = np.float32(scanner.outside_fov_hu)

    info["lesions"] = lesions
    info["patient"] = {"cavity_semi_axes_mm": [round(ai, 1), round(bi, 1)], "fat_mm": [round(f_lat, 1), round(f_ant, 1)],
                       "right_dome_z_mm": round(zR, 1)}
    return Phantom(image=image.astype(np.float32, copy=False), labels=labels, spacing=tuple(float(s) for s in spacing),
                   origin=tuple(float(o) for o in origin), info=info)


def organ_volumes_ml(phantom: Phantom, keys: Sequence[str] = ("liver", "spleen", "kidney", "pancreas", "gallbladder",
                                                               "stomach", "aorta", "inferior_vena_cava")) -> Dict[str, float]:
    """Volume (mL) of each registry entry in the label map (lesions count towards their organ)."""
    vox = float(np.prod(phantom.spacing)) / 1000.0
    return {k: round(float(phantom.mask(k).sum()) * vox, 2) for k in keys}


__all__ = ["LESION_HOSTS", "PHASES", "STRUCTURES", "Phantom", "Scanner", "jitter_scanner", "organ_volumes_ml",
           "render_phantom"]
