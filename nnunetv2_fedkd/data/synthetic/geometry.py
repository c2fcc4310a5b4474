"""Geometry of the phantom renderer: rotations, the fine grid in patient coordinates, ellipsoids and capsule chains
painted onto the tissue map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from nnunetv2_fedkd.data.synthetic.anatomy import T


def _rot(axis: str, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


class _Space:
    """The fine sampling grid, the world -> patient map (table position, yaw, smooth warp) and the tissue map."""

    def __init__(self, shape, spacing, origin, shift, yaw_deg, modes):
        self.shape = tuple(shape)
        self.axes = [np.float32(origin[a]) + np.float32(spacing[a]) * np.arange(shape[a], dtype=np.float32)
                     for a in range(3)]
        self.shift = np.asarray(shift, dtype=float)
        self.R = _rot("z", yaw_deg)  # patient -> world rotation
        c, s = self.R[0, 0], self.R[1, 0]
        X, Y, Z = np.meshgrid(*self.axes, indexing="ij", sparse=True)
        dx, dy = X - np.float32(shift[0]), Y - np.float32(shift[1])
        px = np.float32(c) * dx + np.float32(s) * dy
        py = np.float32(-s) * dx + np.float32(c) * dy
        pz = Z - np.float32(shift[2])
        px, py, pz = (np.broadcast_to(a, self.shape).astype(np.float32) for a in (px, py, pz))
        disp = [np.zeros(self.shape, np.float32) for _ in range(3)]
        for amp, k, ph in modes:
            arg = np.float32(k[0]) * px
            arg += np.float32(k[1]) * py
            arg += np.float32(k[2]) * pz
            arg += np.float32(ph)
            np.sin(arg, out=arg)
            for a in range(3):
                disp[a] += np.float32(amp[a]) * arg
        for a, p in enumerate((px, py, pz)):
            p += disp[a]
        self.P = (px, py, pz)
        self.margin = np.abs(np.array([m[0] for m in modes])).sum(axis=0) + 2 * np.asarray(spacing) if modes else \
            2 * np.asarray(spacing)
        self.tissue = np.zeros(self.shape, dtype=np.uint8)

    def box(self, lo, hi):
        """Index slices of the fine grid that can hold patient points in the box [lo, hi]."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        w = corners @ self.R.T + self.shift
        wlo, whi = w.min(0) - self.margin, w.max(0) + self.margin
        out = []
        for a in range(3):
            i0 = int(np.searchsorted(self.axes[a], wlo[a]))
            i1 = int(np.searchsorted(self.axes[a], whi[a], side="right"))
            out.append(slice(i0, max(i0, i1)))
        return tuple(out)

    def p(self, sl):
        return self.P[0][sl], self.P[1][sl], self.P[2][sl]

    def paint(self, tissue: str, sl, mask, allowed: Optional[Sequence[str]] = None, where=None):
        view = self.tissue[sl]
        if where is not None:
            mask = mask & where
        if allowed is not None:
            mask = mask & np.isin(view, [T[a] for a in allowed])
        view[mask] = T[tissue]


@dataclass
class _Ellipsoid:
    c: np.ndarray
    r: np.ndarray
    R: np.ndarray = field(default_factory=lambda: np.eye(3))  # local -> patient

    def bounds(self):
        ext = np.sqrt(((self.R * self.r[None, :]) ** 2).sum(axis=1))
        return self.c - ext, self.c + ext

    def q(self, X, Y, Z):
        dx, dy, dz = X - np.float32(self.c[0]), Y - np.float32(self.c[1]), Z - np.float32(self.c[2])
        out = None
        for i in range(3):
            u = (np.float32(self.R[0, i]) * dx + np.float32(self.R[1, i]) * dy + np.float32(self.R[2, i]) * dz)
            u *= np.float32(1.0 / self.r[i])
            u *= u
            out = u if out is None else out + u
        return out

    def local(self, X, Y, Z, i):
        dx, dy, dz = X - np.float32(self.c[0]), Y - np.float32(self.c[1]), Z - np.float32(self.c[2])
        return (np.float32(self.R[0, i]) * dx + np.float32(self.R[1, i]) * dy + np.float32(self.R[2, i]) * dz)

    def scaled(self, f) -> "_Ellipsoid":
        return _Ellipsoid(self.c, self.r * f, self.R)

    def point(self, u) -> np.ndarray:
        """Patient position of local normalised coordinates u (|u| = 1 on the surface)."""
        return self.c + self.R @ (np.asarray(u) * self.r)


def _ellipsoid_paint(sp: _Space, e: _Ellipsoid, tissue: str, allowed=None, clip=None, shrink: float = 1.0):
    lo, hi = e.bounds()
    sl = sp.box(lo, hi)
    if any(s.stop <= s.start for s in sl):
        return
    X, Y, Z = sp.p(sl)
    m = e.q(X, Y, Z) <= shrink
    sp.paint(tissue, sl, m, allowed=allowed, where=None if clip is None else clip(sl))


def _capsules(sp: _Space, pts: np.ndarray, radii: np.ndarray, tissue: str, clip=None, allowed=None):
    """Paint a tube through ``pts`` whose radius varies linearly between the points."""
    for a, b, ra, rb in zip(pts[:-1], pts[1:], radii[:-1], radii[1:]):
        rmax = max(ra, rb)
        sl = sp.box(np.minimum(a, b) - rmax, np.maximum(a, b) + rmax)
        if any(s.stop <= s.start for s in sl):
            continue
        X, Y, Z = sp.p(sl)
        v = b - a
        vv = float(v @ v)
        t = ((X - np.float32(a[0])) * np.float32(v[0]) + (Y - np.float32(a[1])) * np.float32(v[1])
             + (Z - np.float32(a[2])) * np.float32(v[2])) * np.float32(1.0 / vv)
        np.clip(t, 0, 1, out=t)
        d2 = (X - np.float32(a[0]) - t * np.float32(v[0])) ** 2
        d2 += (Y - np.float32(a[1]) - t * np.float32(v[1])) ** 2
        d2 += (Z - np.float32(a[2]) - t * np.float32(v[2])) ** 2
        r = np.float32(ra) + t * np.float32(rb - ra)
        sp.paint(tissue, sl, d2 <= r * r, allowed=allowed, where=None if clip is None else clip(sl))
