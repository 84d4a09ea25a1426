"""Reading NIfTI image/label pairs into cases (image normalised, label checked, slicing axis first).

Plain functions over numpy arrays (no torch, no Lightning), so curation, training and evaluation
share one definition of "a case"; the array operations of preprocessing they apply live in
:mod:`hippo.preprocessing`.

Conventions
-----------
* A volume is an array of shape ``(D, H, W)``: axis 0 is the slicing axis (the NIfTI's first voxel
  axis unless ``slice_axis`` says otherwise), ``(H, W)`` the in-plane axes of each 2D slice.
* Images are normalised per volume to ``float32`` in ``[0, 1]``; labels are ``uint8`` in
  ``{0 background, 1 anterior, 2 posterior}``.
* Voxel spacing is in millimetres, in the order of the array's axes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from hippo.preprocessing import LABEL_NAMES, normalize

VALID_LABELS = frozenset(LABEL_NAMES)
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class CaseError(ValueError):
    """A case that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # Rebuilt from (path, problem): the default (cls, args) pickling would call
        # CaseError(message) and fail, and load_cases sends CaseErrors back from worker processes.
        return type(self), (self.path, self.problem)


@dataclass(frozen=True)
class CasePaths:
    """Where one case lives on disk. ``label`` is ``None`` for unlabelled images."""

    name: str
    image: Path
    label: Path | None = None


@dataclass
class Case:
    """One loaded, validated case.

    Attributes:
        name: case identifier (file name without the NIfTI suffix).
        image: ``(D, H, W) float32`` in ``[0, 1]`` (normalised per volume).
        label: ``(D, H, W) uint8`` in ``{0, 1, 2}``, or ``None`` for unlabelled images.
        spacing: voxel size in mm for the three array axes.
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]


def case_name(path: str | os.PathLike) -> str:
    """``.../hippocampus_001.nii.gz`` -> ``hippocampus_001``."""
    base = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def is_nifti(path: Path) -> bool:
    """True for visible ``*.nii`` / ``*.nii.gz`` files (skips macOS ``._*`` resource forks)."""
    name = path.name
    return path.is_file() and not name.startswith(".") and name.endswith(NIFTI_SUFFIXES)


def find_pairs(
    root: str | os.PathLike, images_dir: str = "imagesTr", labels_dir: str = "labelsTr"
) -> tuple[list[CasePaths], list[str]]:
    """Pair images and labels of a Decathlon-style directory by file name.

    Args:
        root: dataset directory holding ``images_dir`` and ``labels_dir``.

    Returns:
        ``(pairs, unpaired)``: the pairs sorted by name, and the paths of files without a partner.

    Raises:
        FileNotFoundError: ``root`` or its image directory does not exist.
        CaseError: the image directory holds no NIfTI file.
    """
    root = Path(root)
    img_dir, lbl_dir = root / images_dir, root / labels_dir
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data directory does not exist")
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir}: image directory does not exist (expected the Decathlon "
                                f"layout {images_dir}/ and {labels_dir}/ under {root})")
    images = {case_name(p): p for p in sorted(img_dir.iterdir()) if is_nifti(p)}
    labels = {case_name(p): p for p in sorted(lbl_dir.iterdir()) if is_nifti(p)} if lbl_dir.is_dir() else {}
    if not images:
        raise CaseError(img_dir, "no NIfTI images (*.nii, *.nii.gz) found")
    pairs = [CasePaths(n, images[n], labels[n]) for n in sorted(images) if n in labels]
    unpaired = [str(images[n]) for n in sorted(images) if n not in labels]
    unpaired += [str(labels[n]) for n in sorted(labels) if n not in images]
    return pairs, unpaired


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a 3D NIfTI file.

    Returns:
        ``(array, spacing_mm, affine)``: the data in its stored voxel order (scaling applied,
        dtype float32 unless stored as an integer type), the voxel size per axis in mm, and the
        4x4 voxel-to-RAS affine.

    Raises:
        CaseError: unreadable, truncated, or not a 3D volume.
    """
    try:
        img = nib.load(str(path))
        dtype = img.get_data_dtype()
        arr = np.asanyarray(img.dataobj)
        if not (np.issubdtype(dtype, np.integer) and arr.dtype == dtype):
            arr = arr.astype(np.float32, copy=False)
    except Exception as exc:  # nibabel raises many types for broken files
        raise CaseError(path, f"unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise CaseError(path, f"expected a 3D volume, got shape {arr.shape}")
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return np.ascontiguousarray(arr), spacing, img.affine


def labels_to_uint8(label: np.ndarray, path: str | os.PathLike = "<label>") -> np.ndarray:
    """Check that a label volume holds only ``{0, 1, 2}`` and return it as uint8.

    Labels stored as float (two Decathlon files are) are accepted when integer-valued.

    Raises:
        CaseError: non-finite, non-integer or out-of-range values (the bad values are named).
    """
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            raise CaseError(path, "label holds NaN or infinite values")
        if not np.array_equal(label, np.round(label)):
            raise CaseError(path, "label holds non-integer values")
    values = np.unique(label)
    bad = sorted(set(values.tolist()) - VALID_LABELS)
    if bad:
        raise CaseError(path, f"label values {bad[:10]} outside {{0, 1, 2}}")
    return label.astype(np.uint8)


def load_case(paths: CasePaths, slice_axis: int = 0, require_foreground: bool = True,
              normalization: str = "minmax_per_volume") -> Case:
    """Load and validate one case.

    Args:
        paths: the image and (optional) label files.
        slice_axis: voxel axis that becomes axis 0 (the slicing axis) of the returned arrays.
        require_foreground: reject a label with no hippocampus voxel.
        normalization: the image's per-volume normalisation (:data:`NORMALIZATIONS`).

    Returns:
        A :class:`Case` with ``image (D, H, W) float32 in [0, 1]`` and ``label (D, H, W) uint8``.

    Raises:
        CaseError: naming the offending file (unreadable, NaN image, shape mismatch, bad labels,
        empty label).
    """
    image, spacing, _ = load_nifti(paths.image)
    if not np.isfinite(image).all():
        raise CaseError(paths.image, "image holds NaN or infinite values")
    label = None
    if paths.label is not None:
        raw, _, _ = load_nifti(paths.label)
        if raw.shape != image.shape:
            raise CaseError(paths.label, f"label shape {raw.shape} differs from image shape {image.shape}")
        label = labels_to_uint8(raw, paths.label)
        if require_foreground and not label.any():
            raise CaseError(paths.label, "label is empty (no hippocampus voxel)")
        label = np.ascontiguousarray(np.moveaxis(label, slice_axis, 0))
    image = np.ascontiguousarray(np.moveaxis(normalize(image, normalization), slice_axis, 0))
    spacing = (spacing[slice_axis],) + tuple(s for i, s in enumerate(spacing) if i != slice_axis)
    return Case(paths.name, image, label, spacing)


