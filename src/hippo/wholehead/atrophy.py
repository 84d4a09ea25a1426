"""Simulated hippocampal atrophy with an analytic truth, and simulated re-acquisitions.

**Atrophy** (:func:`simulate_atrophy`): inside an ellipsoidal zone that holds the whole structure
(:func:`atrophy_zone`, from a label mask), the image is contracted uniformly by the linear factor
``s`` about the zone's centre; outside a fade band it is unchanged, and across the band the scaling
fades smoothly (C2, quintic) to the identity. Every volume inside the zone changes by exactly
``s³ - 1`` whatever its label protocol, so the truth needs no label at all. The image intensities are
warped with that displacement (cubic B-spline interpolation, only inside the zone and its fade band;
voxels outside are copied exactly); no label is resampled or thresholded (sub-voxel displacements
flip no voxel of a label, so a thresholded label would read a 2 % change as about 0 %).

With ``p`` a point of the atrophied image, ``c`` the centre, ``rho(p)`` the ellipsoidal radius
(``<= 1`` inside the zone) and ``w(rho)`` the fade (1 inside, 0 outside the band), the intensity at
``p`` is the original's at ``c + (1 + w k)(p - c)`` with ``k = 1/s - 1``. Inside the zone that is an
exact scaling by ``s``; the map stays one-to-one while ``1 + k (w + rho w') > 0`` (checked).

**Re-acquisition** (:func:`simulate_reacquisition`): the head moved rigidly (a few degrees and mm,
about the image centre) resampled onto the same grid, a smooth multiplicative bias field and Rician
noise: a stand-in for scanning an unchanged head again.

numpy + scipy only. Used by ``benchmarks/bench_atrophy.py`` and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AtrophyZone", "atrophy_zone", "simulate_atrophy", "linear_scale", "simulate_reacquisition",
           "rigid_matrix"]


@dataclass(frozen=True)
class AtrophyZone:
    """Where a structure is contracted.

    Attributes:
        centre_mm: ``(3,)`` RAS mm: the contraction's fixed point (the structure's centroid).
        axes: ``(3, 3)`` unit principal axes (columns) of the structure.
        semi_axes_mm: ``(3,)`` semi-axes of the inner ellipsoid (exact scaling inside).
        fade_mm: width of the fade band along the longest semi-axis (mm; narrower along the others);
            in ellipsoidal radius the band runs from 1 to ``1 + fade_mm / max(semi_axes_mm)``.
    """

    centre_mm: np.ndarray
    axes: np.ndarray
    semi_axes_mm: np.ndarray
    fade_mm: float = 12.0

    @property
    def outer_rho(self) -> float:
        return 1.0 + float(self.fade_mm) / float(np.max(self.semi_axes_mm))

    def rho(self, points_mm: np.ndarray) -> np.ndarray:
        """Ellipsoidal radius of ``(..., 3)`` RAS points (1 on the inner ellipsoid's surface)."""
        d = (np.asarray(points_mm, np.float64) - self.centre_mm) @ self.axes
        return np.sqrt(((d / self.semi_axes_mm) ** 2).sum(-1))

    def as_dict(self) -> dict:
        return {"centre_mm": np.round(self.centre_mm, 3).tolist(), "axes": np.round(self.axes, 5).tolist(),
                "semi_axes_mm": np.round(self.semi_axes_mm, 3).tolist(), "fade_mm": self.fade_mm}


def linear_scale(volume_change: float) -> float:
    """Linear factor ``s`` giving the relative volume change ``volume_change`` (``-0.05`` for -5 %):
    ``s = (1 + volume_change) ** (1/3)``."""
    if volume_change <= -1:
        raise ValueError("a volume change must be above -100 %")
    return float((1.0 + volume_change) ** (1.0 / 3.0))


def atrophy_zone(mask: np.ndarray, affine: np.ndarray, *, margin_mm: float = 5.0, fade_mm: float = 12.0) -> AtrophyZone:
    """The zone holding a structure: an ellipsoid along the mask's principal axes that contains every
    mask voxel (its whole cube, not just its centre) with ``margin_mm`` to spare.

    Args:
        mask: ``(X, Y, Z)`` bool (or labels > 0) on the grid of ``affine``.
        affine: ``(4, 4)`` voxel -> RAS mm.
        margin_mm: room between the structure and the inner ellipsoid (a segmentation by another
            protocol, somewhat larger, must fit too).
        fade_mm: width of the fade band.
    """
    affine = np.asarray(affine, np.float64)
    idx = np.argwhere(np.asarray(mask) > 0)
    if idx.size == 0:
        raise ValueError("atrophy_zone: the mask is empty")
    pts = idx @ affine[:3, :3].T + affine[:3, 3]
    centre = pts.mean(0)
    _, vecs = np.linalg.eigh(np.cov((pts - centre).T))
    axes = vecs[:, ::-1]
    half_diag = 0.5 * float(np.linalg.norm(np.sqrt((affine[:3, :3] ** 2).sum(0))))
    proj = np.abs((pts - centre) @ axes)
    semi = proj.max(0) + half_diag + float(margin_mm)
    # an ellipsoid through the extents does not hold a box's corners: grow it until it holds every voxel
    rho = np.sqrt((((pts - centre) @ axes / semi) ** 2).sum(1))
    grow = max(1.0, float(rho.max()) * (1.0 + half_diag / float(semi.min())))
    return AtrophyZone(centre, axes, semi * grow, float(fade_mm))


def _fade(t: np.ndarray) -> np.ndarray:
    """1 at t <= 0, 0 at t >= 1, quintic smootherstep between (C2)."""
    t = np.clip(t, 0.0, 1.0)
    return 1.0 - t * t * t * (t * (6.0 * t - 15.0) + 10.0)


def simulate_atrophy(array: np.ndarray, affine: np.ndarray, zones: list[AtrophyZone] | AtrophyZone,
                     volume_change: float, *, order: int = 3) -> np.ndarray:
    """The image with every zone's content contracted to ``1 + volume_change`` of its volume.

    Args:
        array: ``(X, Y, Z)`` intensities.
        affine: ``(4, 4)`` voxel -> RAS mm.
        zones: one zone per structure; their fade bands must not overlap (checked: ``ValueError``).
        volume_change: relative volume change, e.g. ``-0.02``.
        order: spline order of the intensity interpolation (3: cubic B-spline).

    Returns:
        ``float32`` array like ``array``; voxels outside every fade band are the original values.
    """
    from scipy import ndimage

    zones = [zones] if isinstance(zones, AtrophyZone) else list(zones)
    affine = np.asarray(affine, np.float64)
    src = np.asarray(array, np.float32)
    out = src.copy()
    k = 1.0 / linear_scale(volume_change) - 1.0
    inv = np.linalg.inv(affine)
    coeffs = ndimage.spline_filter(src, order=order, output=np.float32) if order > 1 else src
    done = np.zeros(src.shape, bool)
    for zone in zones:
        r2 = zone.outer_rho
        # one-to-one check: 1 + k (w + rho w') > 0 over the band (w' of the smootherstep peaks at 1.875)
        if 1.0 + k * min(0.0, 1.0 - r2 * 1.875 / (r2 - 1.0)) <= 0:
            raise ValueError("the fade band is too narrow for this change: the warp would fold")
        # bounding box of the outer ellipsoid in voxel indices
        reach = np.abs(zone.axes) @ (zone.semi_axes_mm * r2)
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * reach + zone.centre_mm
        vox = corners @ inv[:3, :3].T + inv[:3, 3]
        lo = np.maximum(np.floor(vox.min(0)).astype(int) - 1, 0)
        hi = np.minimum(np.ceil(vox.max(0)).astype(int) + 2, np.asarray(src.shape))
        if np.any(hi <= lo):
            continue
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        idx = np.indices(tuple(int(b - a) for a, b in zip(lo, hi)), dtype=np.float64).reshape(3, -1) + lo[:, None]
        pts = (affine[:3, :3] @ idx + affine[:3, 3:4]).T
        rho = zone.rho(pts)
        w = _fade((rho - 1.0) / (r2 - 1.0))
        if np.any((w > 0) & done[box].reshape(-1)):
            raise ValueError("atrophy zones overlap: the truth would not hold (narrow the fade band or the margin)")
        sel = w > 0
        q = zone.centre_mm + (1.0 + w[sel, None] * k) * (pts[sel] - zone.centre_mm)
        qi = q @ inv[:3, :3].T + inv[:3, 3]
        vals = ndimage.map_coordinates(coeffs, qi.T, order=order, mode="nearest", prefilter=False)
        sub = out[box].reshape(-1)
        sub[sel] = vals
        out[box] = sub.reshape(out[box].shape)
        d = done[box].reshape(-1)
        d[sel] = True
        done[box] = d.reshape(done[box].shape)
    return out


def rigid_matrix(angles_deg, translation_mm, centre_mm) -> np.ndarray:
    """``(4, 4)`` rotation by ``angles_deg`` about x, y, z (applied in that order) about
    ``centre_mm``, then a translation ``translation_mm`` (RAS mm)."""
    ax, ay, az = np.radians(np.asarray(angles_deg, np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    r = rz @ ry @ rx
    c = np.asarray(centre_mm, np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(translation_mm, np.float64)
    return m


def simulate_reacquisition(array: np.ndarray, affine: np.ndarray, rng: np.random.Generator, *,
                           max_angle_deg: float = 4.0, max_shift_mm: float = 3.0, noise_fraction: float = 0.02,
                           bias_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The same head scanned again on the same grid: moved rigidly (uniform random angles up to
    ``max_angle_deg`` about each axis and shifts up to ``max_shift_mm``, about the image centre),
    a smooth multiplicative bias field (a random linear-plus-quadratic field of amplitude up to
    ``bias_fraction``) and Rician noise (``sigma = noise_fraction`` x the mean of the brightest half
    of the head's voxels).

    Returns:
        ``(image float32, motion (4, 4))``: ``motion`` maps an original RAS point to where the head
        put it in the new image.
    """
    from scipy import ndimage

    affine = np.asarray(affine, np.float64)
    src = np.asarray(array, np.float32)
    shape = np.asarray(src.shape)
    centre = affine[:3, :3] @ ((shape - 1) / 2.0) + affine[:3, 3]
    motion = rigid_matrix(rng.uniform(-max_angle_deg, max_angle_deg, 3),
                          rng.uniform(-max_shift_mm, max_shift_mm, 3), centre)
    # new image at voxel y shows the original at motion^-1(A y)
    to_src = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine
    moved = ndimage.affine_transform(src, to_src[:3, :3], to_src[:3, 3], order=3, mode="constant", cval=0.0,
                                     output=np.float32)
    moved = np.maximum(moved, 0.0)
    grid = [np.linspace(-1, 1, n, dtype=np.float32) for n in src.shape]
    gx, gy, gz = np.meshgrid(*grid, indexing="ij", sparse=True)
    c = rng.uniform(-1, 1, 9).astype(np.float32)
    field = c[0] * gx + c[1] * gy + c[2] * gz + c[3] * gx * gy + c[4] * gy * gz + c[5] * gx * gz + \
        c[6] * gx * gx + c[7] * gy * gy + c[8] * gz * gz
    field = field / max(float(np.abs(field).max()), 1e-6)
    moved = moved * (1.0 + bias_fraction * field)
    fg = src[src > np.percentile(src, 50)]
    sigma = noise_fraction * float(np.mean(fg[fg >= np.median(fg)])) if fg.size else 0.0
    n1 = rng.normal(0.0, sigma, src.shape).astype(np.float32)
    n2 = rng.normal(0.0, sigma, src.shape).astype(np.float32)
    noisy = np.sqrt((moved + n1) ** 2 + n2 ** 2).astype(np.float32)
    return noisy, motion
