"""Whole-head scans from files: NIfTI / MGZ in, the label map out, and finding the inputs.

A scan is read into the same convention as :class:`hippo.dicom.volume.SeriesVolume`: an ``(X, Y, Z)``
``float32`` array in closest canonical RAS (axis 0 from the patient's left to right, 1 posterior
to anterior, 2 inferior to superior), its voxel -> RAS (mm) affine and voxel size. What is needed
to write a result back in the file's own voxel order (:meth:`ScanVolume.to_source`,
:func:`save_label_map`) is kept.

Inputs (:func:`find_inputs`): one file; a folder of files (searched recursively: ``*.nii``,
``*.nii.gz``, ``*.mgz``, ``*.mgh``); or a BIDS dataset (``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``,
``derivatives/`` ignored). Label maps and atlases are not scans: :func:`label_map_reason` tells
them apart by content (integer-valued data with few distinct values, or sparse values such as
FreeSurfer's aseg), and :func:`read_scan` refuses them with :class:`NotAScanError` naming the file.

numpy + nibabel only (never torch, Lightning or Hydra).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = [
    "ScanVolume", "ScanInput", "InputSet", "NotAScanError", "read_scan", "save_label_map",
    "find_inputs", "label_map_reason", "SCAN_SUFFIXES",
]

#: File name endings read as scans.
SCAN_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")
#: Integer-valued volumes with at most this many distinct values are label maps, not scans.
MAX_LABEL_VALUES = 64
#: Integer-valued volumes whose distinct values fill less than this fraction of ``[min, max]`` are
#: label maps (FreeSurfer's aparc+aseg: 189 values spread over 0..12175).
MIN_SCAN_VALUE_DENSITY = 0.25

_BIDS_T1W = re.compile(r"^(?P<entities>sub-[A-Za-z0-9]+(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_T1w\.nii(?:\.gz)?$")


class NotAScanError(ValueError):
    """The file is not a 3D anatomical scan (a label map, an atlas, 4D data, unreadable); the
    message names the file and says why."""

    def __init__(self, path: str | os.PathLike, problem: str, kind: str = "unreadable"):
        self.path = str(path)
        self.problem = problem
        #: ``"label_map"``, ``"not_3d"`` (not a single 3D volume) or ``"unreadable"`` (damaged, foreign,
        #: no signal): a folder search skips the first two, never the last
        self.kind = kind
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable across worker processes
        return type(self), (self.path, self.problem, self.kind)


@dataclass
class ScanVolume:
    """One scan in closest canonical RAS.

    Attributes:
        array: ``(X, Y, Z) float32`` intensities (the file's values, scaled by its slope/intercept).
        affine: ``(4, 4) float64`` voxel index of ``array`` -> RAS position in mm.
        spacing: ``(sx, sy, sz)`` voxel size in mm of ``array``'s axes.
        path: the file.
        source_affine: ``(4, 4)`` voxel -> RAS affine of the file's own voxel order.
        source_shape: the file's 3D shape.
        ornt: nibabel orientation ``(3, 2)`` mapping the file's voxel order onto ``array``'s.
        warnings: notes made while reading (e.g. a sheared affine).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: str = ""
    source_affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    source_shape: tuple[int, int, int] = (0, 0, 0)
    ornt: np.ndarray = field(default_factory=lambda: np.array([[0, 1], [1, 1], [2, 1]], float))
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_array(cls, array: np.ndarray, affine: np.ndarray, path: str = "") -> "ScanVolume":
        """A scan from an ``(X, Y, Z)`` array and its voxel -> RAS affine in any voxel order
        (reoriented to closest canonical RAS here)."""
        from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

        array = np.asarray(array)
        if array.ndim != 3:
            raise ValueError(f"expected a 3D array, got shape {array.shape}")
        affine = np.asarray(affine, dtype=np.float64)
        ornt = io_orientation(affine)
        data = np.ascontiguousarray(apply_orientation(array, ornt), dtype=np.float32)
        ras_affine = affine @ inv_ornt_aff(ornt, array.shape)
        spacing = tuple(float(s) for s in np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0)))
        warnings = []
        cosines = ras_affine[:3, :3] / np.asarray(spacing)
        shear = float(np.abs(cosines.T @ cosines - np.eye(3)).max())
        if shear > 1e-3:
            warnings.append(f"the affine's axes are not orthogonal (shear {shear:.3g}); resampling treats them as given")
        return cls(data, ras_affine, spacing, str(path), affine, tuple(int(s) for s in array.shape),  # type: ignore[arg-type]
                   ornt, warnings)

    def to_source(self, labels_ras: np.ndarray) -> np.ndarray:
        """Map an array on ``array``'s grid back to the file's voxel order (no resampling).

        Args:
            labels_ras: ``(X, Y, Z)`` array of ``array``'s shape.

        Returns:
            The same values in the file's own voxel order (shape :attr:`source_shape`).
        """
        from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

        labels_ras = np.asarray(labels_ras)
        if labels_ras.shape != self.array.shape:
            raise ValueError(f"to_source: shape {labels_ras.shape} differs from the scan's {self.array.shape}")
        back = ornt_transform(axcodes2ornt(("R", "A", "S")), self.ornt)
        return np.ascontiguousarray(apply_orientation(labels_ras, back))

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Field of view (mm) along the three RAS axes of ``array``."""
        return tuple(float(n * s) for n, s in zip(self.array.shape, self.spacing))  # type: ignore[return-value]


def label_map_reason(data: np.ndarray) -> str | None:
    """Why ``data`` looks like a label map or atlas rather than an image, or ``None``.

    Rule: the values are all integers and there are at most :data:`MAX_LABEL_VALUES` distinct
    ones, or they fill less than :data:`MIN_SCAN_VALUE_DENSITY` of the integers between their
    minimum and maximum. Looked at on every third voxel along each axis (fast on 256³).
    """
    sample = np.asarray(data[::3, ::3, ::3]) if data.ndim == 3 and min(data.shape) >= 9 else np.asarray(data)
    if sample.dtype.kind == "f":
        finite = sample[np.isfinite(sample)]
        if finite.size == 0 or not np.array_equal(finite, np.round(finite)):
            return None
        sample = finite
    elif sample.dtype.kind not in "iub":
        return None
    values = np.unique(sample)
    if values.size <= MAX_LABEL_VALUES:
        return (f"a label map or mask, not a scan: its values are {values.size} distinct integers "
                f"({', '.join(str(int(v)) for v in values[:6])}{', ...' if values.size > 6 else ''})")
    span = float(values[-1]) - float(values[0]) + 1.0
    if values.size / span < MIN_SCAN_VALUE_DENSITY:
        return (f"a label map, not a scan: {values.size} distinct integer values spread over "
                f"{int(values[0])}..{int(values[-1])} (segmentation labels such as FreeSurfer's aseg)")
    return None


def read_scan(path: str | os.PathLike, *, refuse_label_maps: bool = True) -> ScanVolume:
    """Read a NIfTI (``.nii``, ``.nii.gz``) or FreeSurfer MGH/MGZ scan into closest canonical RAS.

    Args:
        path: the file.
        refuse_label_maps: raise :class:`NotAScanError` for label maps (:func:`label_map_reason`).

    Raises:
        NotAScanError: unreadable, not 3D (a 4D file with more than one volume), a label map, or
            holding no finite signal. The message names the file.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for a damaged or foreign file
        raise NotAScanError(path, f"not a readable NIfTI/MGZ image ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise NotAScanError(path, f"expected one 3D volume, found shape {data.shape}", "not_3d")
    if min(data.shape) < 2:
        raise NotAScanError(path, f"a single slice ({data.shape}), not a volume", "not_3d")
    if refuse_label_maps:
        reason = label_map_reason(data)
        if reason:
            raise NotAScanError(path, reason, "label_map")
    scan = ScanVolume.from_array(data, np.asarray(img.affine, dtype=np.float64), str(path))
    finite = np.isfinite(scan.array)
    if not finite.all():
        if not finite.any():
            raise NotAScanError(path, "holds no finite values")
        scan.array[~finite] = 0.0
        scan.warnings.append(f"{int((~finite).sum())} non-finite voxel(s) set to 0")
    if float(scan.array.max()) <= float(scan.array.min()):
        raise NotAScanError(path, "constant image (no contrast)")
    return scan


def save_label_map(path: str | os.PathLike, labels_ras: np.ndarray, scan: ScanVolume) -> Path:
    """Write ``labels_ras`` (on ``scan.array``'s grid) as a NIfTI in the scan's own voxel order and
    affine (uint8; ``.nii.gz`` compresses). The qform/sform codes of a NIfTI source are kept.

    Returns:
        The written path.
    """
    import nibabel as nib

    from hippo.fileio import write_bytes_atomic

    data = scan.to_source(np.asarray(labels_ras).astype(np.uint8))
    img = nib.Nifti1Image(data, scan.source_affine)
    try:
        src = nib.load(scan.path) if scan.path else None
    except Exception:
        src = None
    if isinstance(src, (nib.Nifti1Image, nib.Nifti2Image)):
        img.set_qform(scan.source_affine, int(src.header["qform_code"]) or 1)
        img.set_sform(scan.source_affine, int(src.header["sform_code"]) or 1)
    else:
        img.set_qform(scan.source_affine, 1)
        img.set_sform(scan.source_affine, 1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"hippo whole-head hippocampus labels"
    path = Path(path)
    return write_bytes_atomic(path, img.to_bytes() if not str(path).endswith(".gz") else _gzip(img.to_bytes()))


def _gzip(raw: bytes) -> bytes:
    import gzip

    return gzip.compress(raw, compresslevel=6, mtime=0)


# ------------------------------------------------------------------------------------------------
# Finding the inputs


@dataclass(frozen=True)
class ScanInput:
    """One file to process.

    Attributes:
        path: the file.
        name: a unique, file-system-safe name for it (the BIDS entities, e.g. ``sub-01_ses-1``, or
            the relative path with ``/`` as ``_`` and the suffix removed).
        bids_dir: for a BIDS input, the folder below the dataset root (``sub-01/ses-1/anat``);
            otherwise ``None``.
        explicit: True when the file is meant to be a scan: named by the user, or a BIDS ``_T1w``
            (a refusal is then a failure); False for files met while searching a folder, where a
            label map or a 4D file is skipped instead (an unreadable file still fails).
    """

    path: Path
    name: str
    bids_dir: str | None = None
    explicit: bool = False


@dataclass(frozen=True)
class InputSet:
    """What ``input=PATH`` named: ``kind`` is ``"file"``, ``"folder"`` or ``"bids"``."""

    kind: str
    root: Path
    scans: tuple[ScanInput, ...]


def _strip_suffix(name: str) -> str:
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_scan_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(SCAN_SUFFIXES)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "scan"


def is_bids_dataset(root: str | os.PathLike) -> bool:
    """A folder with ``dataset_description.json`` or ``sub-*`` sub-folders."""
    root = Path(root)
    return (root / "dataset_description.json").is_file() or any(
        p.is_dir() and p.name.startswith("sub-") for p in root.iterdir())


def find_inputs(path: str | os.PathLike, *, exclude: Iterable[str | os.PathLike] = ()) -> InputSet:
    """The scans named by ``path``: a file, a folder (recursive), or a BIDS dataset.

    Args:
        path: a ``.nii``/``.nii.gz``/``.mgz``/``.mgh`` file, a folder, or a BIDS dataset root.
        exclude: folders this run writes to; files below them are never inputs.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a file with another suffix, or a folder holding no scan file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if not path.name.lower().endswith(SCAN_SUFFIXES):
            raise ValueError(f"{path}: not a NIfTI/MGZ file (expected {', '.join(SCAN_SUFFIXES)})")
        return InputSet("file", path.parent, (ScanInput(path, _safe(_strip_suffix(path.name)), None, True),))
    own = [Path(p).resolve() for p in exclude]

    def excluded(p: Path) -> bool:
        real = p.resolve()
        return any(real == o or real.is_relative_to(o) for o in own)

    if is_bids_dataset(path):
        scans = []
        for anat in sorted(list(path.glob("sub-*/anat")) + list(path.glob("sub-*/ses-*/anat"))):
            for f in sorted(anat.iterdir()):
                m = _BIDS_T1W.match(f.name)
                if m and f.is_file() and not excluded(f):
                    scans.append(ScanInput(f, m.group("entities"), str(anat.relative_to(path)), True))
        if not scans:
            raise ValueError(f"{path}: a BIDS dataset without any sub-*/[ses-*/]anat/*_T1w.nii[.gz]")
        return InputSet("bids", path, tuple(scans))

    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "derivatives"
                             and not excluded(Path(dirpath) / d))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _is_scan_file(Path(dirpath) / f))
    found = [f for f in found if not excluded(f)]
    if not found:
        raise ValueError(f"{path}: no NIfTI/MGZ file below it (expected {', '.join(SCAN_SUFFIXES)})")
    names: dict[str, int] = {}
    scans = []
    for f in found:
        name = _safe(_strip_suffix(str(f.relative_to(path)).replace(os.sep, "_")))
        if name in names:  # case-insensitive file systems or odd characters made two names equal
            names[name] += 1
            name = f"{name}_{names[name]}"
        else:
            names[name] = 0
        scans.append(ScanInput(f, name, None, False))
    return InputSet("folder", path, tuple(scans))


def bids_entities(name: str) -> dict[str, str]:
    """``"sub-01_ses-2_run-1"`` -> ``{"sub": "01", "ses": "2", "run": "1"}``."""
    return dict(part.split("-", 1) for part in name.split("_") if "-" in part)
