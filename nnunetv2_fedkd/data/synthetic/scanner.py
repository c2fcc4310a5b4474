"""A site's scanner for the phantoms: spacing, field of view, blur, calibration, noise, contrast phase; and the
per-case jitter of those settings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence, Tuple

import numpy as np



@dataclass(frozen=True)
class Scanner:
    """How a site's scanner and protocol turn the patient into voxels.

    The grid of ``size`` voxels covers ``fov_mm`` in x (same pixel spacing in y) and ``z_coverage_mm`` in z, so the
    spacing is ``fov_mm / size[0]`` in-plane and ``z_coverage_mm / size[2]`` between slices: a site with a larger
    field of view or a longer scan sees the same body in fewer voxels. (Real scanners reconstruct 512 x 512 pixels of
    0.6-1.0 mm and 1-5 mm slices; the synthetic grids are small, so their spacings are proportionally coarser.)
    """

    name: str = "scanner"
    fov_mm: float = 400.0
    z_coverage_mm: float = 250.0
    fov_jitter: float = 0.05  # per case, relative (patients are scanned with slightly different fields of view)
    z_center_mm: float = 12.0  # patient z at the centre of the scan range (0 ~ L1/L2, the right dome is near +95)
    phase: str = "portal_venous"
    gain: float = 1.0  # HU calibration: hu' = gain * hu + offset_hu
    offset_hu: float = 0.0
    noise_hu: float = 12.0  # std of the (slightly correlated) quantum noise
    blur_vox: Tuple[float, float, float] = (0.5, 0.5, 0.6)  # Gaussian PSF / slice profile, in output voxels
    table_hu: Optional[float] = 120.0  # None: no table in the field of view
    outside_fov_hu: Optional[float] = None  # value outside the circular reconstruction FOV (e.g. -2048); None: air

    def spacing(self, size: Sequence[int], fov_mm: Optional[float] = None) -> Tuple[float, float, float]:
        s = (self.fov_mm if fov_mm is None else fov_mm) / size[0]
        return (s, s, self.z_coverage_mm / size[2])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blur_vox"] = list(self.blur_vox)
        return d


def jitter_scanner(scanner: Scanner, rng: np.random.Generator, amount: float = 1.0) -> Scanner:
    """A scanner close to ``scanner`` (the same site with a seed-dependent calibration), for per-seed variety."""
    return replace(
        scanner,
        fov_mm=round(float(scanner.fov_mm * (1 + amount * rng.uniform(-0.03, 0.03))), 2),
        z_coverage_mm=round(float(scanner.z_coverage_mm * (1 + amount * rng.uniform(-0.03, 0.03))), 2),
        gain=round(float(scanner.gain + amount * rng.uniform(-0.015, 0.015)), 4),
        offset_hu=round(float(scanner.offset_hu + amount * rng.uniform(-4, 4)), 2),
        noise_hu=round(float(scanner.noise_hu * (1 + amount * rng.uniform(-0.12, 0.12))), 2),
    )
