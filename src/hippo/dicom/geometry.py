"""The one geometry check of a stack of DICOM slices, shared by series selection and volume loading.

Series selection (:meth:`hippo.dicom.ingest.SeriesInfo.geometry_problems`, headers only) and
volume loading (:func:`hippo.dicom.volume.load_series`) ask the same questions of the same
numbers with the same tolerances, so a series that selection accepts is one that loading accepts:

- one ImageOrientationPatient and one PixelSpacing (:data:`ORIENTATION_ATOL`, :data:`PIXEL_SPACING_RTOL`);
- a proper slice normal (row and column direction cosines not parallel);
- sorted along that normal, no two slices at one position (:data:`SAME_POSITION_MM`), no gap (a step
  more than 1.5 times the median: missing slices), even steps (``rel_tol`` of the median,
  :data:`SPACING_REL_TOL` by default), every position on the line through the others.

Positions and spacings are in mm, in the patient coordinates of the headers (LPS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "ORIENTATION_ATOL", "PIXEL_SPACING_RTOL", "SAME_POSITION_MM", "SPACING_REL_TOL", "GAP_FACTOR",
    "StackProblem", "same_orientation", "same_pixel_spacing", "slice_normal", "stack_problem",
]

#: Direction cosines that differ by less than this (absolute) are "the same orientation".
ORIENTATION_ATOL = 1e-4
#: Pixel spacings that differ by less than this (relative) are "the same spacing".
PIXEL_SPACING_RTOL = 1e-4
#: Two slice positions closer than this (mm, along the normal) are "the same position".
SAME_POSITION_MM = 1e-3
#: Allowed deviation of one slice step from the median step (relative), and of a position from
#: the line through the others (relative to the median step).
SPACING_REL_TOL = 0.01
#: A step larger than this many median steps is a gap (missing slices), not uneven spacing.
GAP_FACTOR = 1.5


def same_orientation(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two ImageOrientationPatient values (6 direction cosines) are the same orientation."""
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=0.0, atol=ORIENTATION_ATOL))


def same_pixel_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two PixelSpacing values (row, column; mm) are the same spacing."""
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=PIXEL_SPACING_RTOL, atol=0.0))


def slice_normal(orientation: Sequence[float]) -> np.ndarray | None:
    """The unit slice normal (row × column direction, shape (3,)) of an ImageOrientationPatient,
    or ``None`` when the row and column cosines are zero, parallel or far from orthogonal."""
    iop = np.asarray(orientation, dtype=np.float64)
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        return None
    r, c = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if nr < 1e-6 or nc < 1e-6 or abs(float(np.dot(r, c))) / (nr * nc) > 1e-3:
        return None
    n = np.cross(r / nr, c / nc)
    return n / np.linalg.norm(n)


@dataclass(frozen=True)
class StackProblem:
    """Why a stack of slices is not one evenly spaced volume.

    Attributes:
        kind: ``"same_position"``, ``"missing_slices"``, ``"uneven_spacing"``, ``"off_line"`` or
            ``"sheared"``.
        message: one sentence naming the slices involved (their labels) and the distances in mm.
        slices: indices (into the input order) of the slice(s) the message names.
    """

    kind: str
    message: str
    slices: tuple[int, ...]


def stack_problem(positions: np.ndarray, normal: np.ndarray, labels: Sequence[str], *,
                  rel_tol: float = SPACING_REL_TOL, what: str = "instances",
                  allow_shear: bool = True) -> StackProblem | None:
    """Check the slice positions of one series; ``None`` when they form one evenly spaced stack.

    Args:
        positions: ImagePositionPatient of every slice, shape (N, 3), mm (any order, N >= 2).
        normal: the unit slice normal, shape (3,) (:func:`slice_normal`).
        labels: a name per slice for the message (a file, or a file and frame).
        rel_tol: allowed relative deviation of a step from the median step.
        what: what the slices are, for the message (``"instances"`` or ``"frames"``).
        allow_shear: accept slices that step sideways by a constant amount (gantry tilt: a
            sheared grid, kept in the affine by the volume loader); when false, every slice must
            lie on the slice normal through the first (series selection: the measurement assumes
            an orthogonal grid).
    """
    pos = np.asarray(positions, dtype=np.float64)
    proj = pos @ np.asarray(normal, dtype=np.float64)
    order = np.argsort(proj, kind="stable")
    p, x = proj[order], pos[order]
    gaps = np.diff(p)
    name = [labels[i] for i in order]
    for k, g in enumerate(gaps):
        if g < SAME_POSITION_MM:
            extra = " (several volumes, echoes or time points in one instance?)" if what == "frames" else ""
            return StackProblem("same_position",
                                f"two or more slices share one position: {name[k]} and {name[k + 1]} are at the same "
                                f"position ({p[k]:.4f} mm along the slice normal) but are different {what}{extra}",
                                (int(order[k]), int(order[k + 1])))
    median = float(np.median(gaps))
    for k, g in enumerate(gaps):
        if g > GAP_FACTOR * median:
            n_missing = max(int(round(g / median)) - 1, 1)
            return StackProblem("missing_slices",
                                f"uneven slice spacing, missing slice(s): a gap of {g:.4g} mm (median spacing "
                                f"{median:.4g} mm, about {n_missing} slice(s) missing) between {name[k]} "
                                f"({p[k]:.4f} mm) and {name[k + 1]} ({p[k + 1]:.4f} mm) along the slice normal",
                                (int(order[k]), int(order[k + 1])))
    worst = int(np.argmax(np.abs(gaps - median)))
    if abs(gaps[worst] - median) > rel_tol * median:
        return StackProblem("uneven_spacing",
                            f"non-uniform slice spacing: {gaps[worst]:.6g} mm between {name[worst]} "
                            f"({p[worst]:.4f} mm) and {name[worst + 1]} ({p[worst + 1]:.4f} mm) vs median "
                            f"{median:.6g} mm (tolerance {rel_tol:.3g} relative)",
                            (int(order[worst]), int(order[worst + 1])))
    n = len(x)
    step = (x[-1] - x[0]) / (n - 1)
    off_line = np.linalg.norm(x - (x[0] + np.arange(n)[:, None] * step), axis=1)
    k = int(np.argmax(off_line))
    if off_line[k] > max(rel_tol * median, SAME_POSITION_MM):
        return StackProblem("off_line",
                            f"slices are not stacked on one line (non-uniform in-plane shift): {name[k]} is "
                            f"{off_line[k]:.4g} mm off the line through the other slice positions",
                            (int(order[k]),))
    if not allow_shear:
        offset = x - x[0]
        in_plane = np.linalg.norm(offset - np.outer(offset @ normal, normal), axis=1)
        k = int(np.argmax(in_plane))
        if in_plane[k] > max(rel_tol * median, SAME_POSITION_MM):
            return StackProblem("sheared",
                                f"slices are not stacked along the slice normal (tilt or shear): {name[k]} is "
                                f"{in_plane[k]:.3g} mm off the normal through {name[0]}", (int(order[k]),))
    return None
