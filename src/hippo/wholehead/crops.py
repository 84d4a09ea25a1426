"""Cut a hippocampus crop out of a whole-head scan in the model's training convention, and map the
crop's result back onto the scan's grid.

Training convention (Decathlon Task04, measured on its 234 labels): crops of median 35 x 50 x 36
voxels at 1 mm; array axes in RAS order (axis 0 from the patient's left to right, 1 posterior to
anterior, 2 inferior to superior); every crop holds a LEFT hippocampus whose labelled centroid sits
at index ``(0.427, 0.528, 0.434) x (shape - 1)`` (sd 0.02-0.03).

A crop here is a grid of 1 mm voxels in the scan's own millimetres (no scaling to MNI), whose axes
follow the template's axes as the registration found them in the scan (its rotation only), so a
tilted head still gives an upright crop. The RIGHT hippocampus is cut mirrored: the crop's axis 0
runs from the patient's right (lateral) towards the midline, so the crop looks like a left one.
:class:`CropGeometry` holds the crop voxel -> scan mm affine; sampling (:func:`sample_crop`) and
mapping back (:func:`probabilities_to_scan`) both use it, so mirroring is undone by construction.

numpy + scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CROP_SHAPE", "CENTRE_FRACTION", "CropGeometry", "crop_geometry", "sample_crop", "probabilities_to_scan",
    "crop_edge_faces", "SIDES",
]

#: Median shape of the training crops (voxels at 1 mm, RAS order).
CROP_SHAPE: tuple[int, int, int] = (35, 50, 36)
#: Where the labelled centroid sits in a training crop, as a fraction of ``shape - 1`` per axis.
CENTRE_FRACTION: tuple[float, float, float] = (0.427, 0.528, 0.434)
SIDES = ("left", "right")

#: Long axis of the hippocampus in the training crops (first principal axis of each of the 234
#: Task04 labels, pointing anterior): mean pitch ``atan2(z, y)`` and yaw ``atan2(x, y)`` in degrees
#: (sd 7.1 and 4.9).
TRAINING_AXIS_PITCH_YAW_DEG: tuple[float, float] = (-23.8, 3.6)
#: The same axis in MNI space, left hemisphere: from the posterior to the anterior hippocampus
#: centre of gravity of the Tian 2020 atlas, scale II (pHIP-lh (-26, -32, -8) -> aHIP-lh
#: (-24, -14, -20) mm; the right side mirrors it).
ATLAS_AXIS_MNI: tuple[float, float, float] = (2.0, 18.0, -12.0)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _rotation_between(a, b) -> np.ndarray:
    """The smallest rotation taking unit vector ``a`` onto unit vector ``b``."""
    a, b = _unit(a), _unit(b)
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k / (1.0 + c)


def training_pose() -> np.ndarray:
    """``(3, 3)`` rotation (in the template's left-hemisphere frame) from crop axes to template
    axes that makes the atlas' hippocampal long axis appear in the crop at the training crops' mean
    orientation (about 10° less pitched than in MNI's AC-PC pose)."""
    pitch, yaw = np.radians(TRAINING_AXIS_PITCH_YAW_DEG)
    train = _unit([np.tan(yaw), 1.0, np.tan(pitch)])
    return _rotation_between(train, ATLAS_AXIS_MNI)


@dataclass(frozen=True)
class CropGeometry:
    """Where a crop lies in the scan.

    Attributes:
        side: ``"left"`` or ``"right"`` (the patient's).
        shape: crop array shape ``(X, Y, Z)``.
        index_to_scan: ``(4, 4)``: crop voxel index -> scan RAS mm. Its linear part is a rotation
            (times ``spacing_mm``), with axis 0 negated for the right side (mirrored).
        spacing_mm: crop voxel size (mm).
    """

    side: str
    shape: tuple[int, int, int]
    index_to_scan: np.ndarray
    spacing_mm: float = 1.0

    @property
    def mirrored(self) -> bool:
        """True for the right side: the crop is the left-right mirror image of the scan."""
        return bool(np.linalg.det(self.index_to_scan[:3, :3]) < 0)

    @property
    def centre_scan_mm(self) -> np.ndarray:
        """Scan RAS mm of the point the crop was centred on (index ``CENTRE_FRACTION x (shape-1)``)."""
        return self.to_scan(np.asarray(CENTRE_FRACTION) * (np.asarray(self.shape) - 1))

    def to_scan(self, index: np.ndarray) -> np.ndarray:
        """Crop voxel index/indices ``(..., 3)`` -> scan RAS mm."""
        i = np.asarray(index, dtype=np.float64)
        return i @ self.index_to_scan[:3, :3].T + self.index_to_scan[:3, 3]

    def corners_scan_mm(self) -> np.ndarray:
        """``(8, 3)`` scan RAS mm of the crop's corner voxel centres."""
        n = np.asarray(self.shape) - 1
        corners = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], float)
        return self.to_scan(corners)

    def as_dict(self) -> dict:
        return {"side": self.side, "shape": list(self.shape), "spacing_mm": self.spacing_mm,
                "mirrored": self.mirrored, "index_to_scan": np.round(self.index_to_scan, 5).tolist(),
                "centre_scan_mm": np.round(self.centre_scan_mm, 2).tolist()}


def crop_geometry(
    rotation: np.ndarray,
    centre_scan_mm: np.ndarray,
    side: str,
    *,
    shape: tuple[int, int, int] = CROP_SHAPE,
    centre_fraction: tuple[float, float, float] = CENTRE_FRACTION,
    spacing_mm: float = 1.0,
    pose: np.ndarray | None = None,
) -> CropGeometry:
    """The crop whose hippocampus centre lands where the training crops have theirs.

    Args:
        rotation: ``(3, 3)`` the template's axes in scan RAS (columns): the rotation of the
            registration (:attr:`hippo.wholehead.register.Registration.rotation`); identity for a
            scan already in the template's pose.
        centre_scan_mm: ``(3,)`` scan RAS mm of the hippocampus centre.
        side: ``"left"`` or ``"right"``; ``"right"`` gives the mirrored crop.
        shape: crop shape (voxels).
        centre_fraction: where ``centre_scan_mm`` lands, as a fraction of ``shape - 1``.
        spacing_mm: crop voxel size in scan mm.
        pose: ``(3, 3)`` crop axes in the template's (left-hemisphere) frame; default
            :func:`training_pose` (the hippocampus tilted as in the training crops); identity gives
            crops in the template's own AC-PC pose.
    """
    if side not in SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    mirror = np.diag([-1.0 if side == "right" else 1.0, 1.0, 1.0])
    pose = training_pose() if pose is None else np.asarray(pose, np.float64)
    axes = np.asarray(rotation, dtype=np.float64) @ mirror @ pose
    m = np.eye(4)
    m[:3, :3] = axes * float(spacing_mm)
    m[:3, 3] = np.asarray(centre_scan_mm, np.float64) - m[:3, :3] @ (np.asarray(centre_fraction) * (np.asarray(shape) - 1))
    return CropGeometry(side, tuple(int(s) for s in shape), m, float(spacing_mm))  # type: ignore[arg-type]


def sample_crop(array: np.ndarray, affine: np.ndarray, geometry: CropGeometry, *, order: int = 1
                ) -> tuple[np.ndarray, float]:
    """Resample the scan onto the crop's grid.

    Args:
        array: ``(X, Y, Z)`` scan intensities.
        affine: ``(4, 4)`` voxel -> RAS mm of ``array``.
        geometry: the crop.
        order: spline order (1 = trilinear).

    Returns:
        ``(crop, outside)``: the ``geometry.shape`` ``float32`` crop (0 outside the scan) and the
        fraction of crop voxels that fell outside the scan's field of view.
    """
    from scipy import ndimage

    idx = np.indices(geometry.shape, dtype=np.float64).reshape(3, -1)
    to_voxel = np.linalg.inv(np.asarray(affine, np.float64)) @ geometry.index_to_scan
    coords = to_voxel[:3, :3] @ idx + to_voxel[:3, 3:4]
    n = np.asarray(array.shape, np.float64)[:, None]
    inside = np.all((coords >= -0.5) & (coords <= n - 0.5), axis=0)
    values = ndimage.map_coordinates(np.asarray(array, np.float32), coords, order=order, mode="nearest")
    values[~inside] = 0.0
    return values.reshape(geometry.shape).astype(np.float32), float(1.0 - inside.mean())


def probabilities_to_scan(
    probabilities: np.ndarray,
    geometry: CropGeometry,
    scan_shape: tuple[int, int, int],
    scan_affine: np.ndarray,
    *,
    keep: np.ndarray | None = None,
    method: str = "nearest",
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Map a crop's class probabilities onto the scan's grid and take the most probable class.

    Each scan voxel inside the crop takes the trilinear interpolation of the crop's probabilities
    at its centre; voxels outside the crop are background. This preserves volumes across voxel
    sizes better than nearest-neighbour label copying.

    Args:
        probabilities: ``(C, X, Y, Z)`` (C = 3: background, anterior, posterior) on the crop grid.
        geometry: the crop.
        scan_shape: the scan's ``(X, Y, Z)``.
        scan_affine: ``(4, 4)`` voxel -> RAS mm of the scan.
        keep: optional ``(X, Y, Z)`` bool on the crop grid: foreground allowed only there (the
            largest component of the crop's labels); elsewhere the crop counts as background.

    Returns:
        ``(labels, box)``: ``uint8`` labels in ``{0, 1, 2}`` for the scan voxels in ``box`` (a tuple
        of slices into the scan array: the crop's bounding box, clipped to the scan).
    """
    from scipy import ndimage

    probs = np.asarray(probabilities, np.float32)
    if keep is not None:
        probs = probs.copy()
        probs[1:, ~keep] = 0.0
        probs[0, ~keep] = 1.0
    inv_affine = np.linalg.inv(np.asarray(scan_affine, np.float64))
    corners = geometry.corners_scan_mm() @ inv_affine[:3, :3].T + inv_affine[:3, 3]
    lo = np.maximum(np.floor(corners.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(corners.max(0)).astype(int) + 2, np.asarray(scan_shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    if np.any(hi <= lo):
        return np.zeros([0, 0, 0], np.uint8), box  # type: ignore[return-value]
    sub_shape = tuple(int(b - a) for a, b in zip(lo, hi))
    idx = np.indices(sub_shape, dtype=np.float64).reshape(3, -1) + lo[:, None]
    to_crop = np.linalg.inv(geometry.index_to_scan) @ np.asarray(scan_affine, np.float64)
    coords = to_crop[:3, :3] @ idx + to_crop[:3, 3:4]
    n = np.asarray(geometry.shape, np.float64)[:, None]
    inside = np.all((coords >= -0.5) & (coords <= n - 0.5), axis=0)
    c = coords[:, inside]
    out = np.zeros(idx.shape[1], np.uint8)
    if c.shape[1] and method == "nearest":
        labels = probs.argmax(0).astype(np.uint8)
        out[inside] = ndimage.map_coordinates(labels, c, order=0, mode="nearest")
    elif c.shape[1]:
        interp = np.stack([ndimage.map_coordinates(p, c, order=1, mode="nearest") for p in probs])
        out[inside] = interp.argmax(0).astype(np.uint8)
    return out.reshape(sub_shape), box


def crop_edge_faces(labels: np.ndarray, side: str) -> list[str]:
    """Faces of a crop (``(X, Y, Z)`` labels in the crop's left-hippocampus convention) that the
    foreground touches, in anatomical words: lateral/medial, posterior/anterior, inferior/superior."""
    names = (("lateral", "medial"), ("posterior", "anterior"), ("inferior", "superior"))
    fg = np.asarray(labels) > 0
    faces = []
    for axis in range(3):
        for end, name in zip((0, -1), names[axis]):
            if np.take(fg, end, axis=axis).any():
                faces.append(name)
    return faces
