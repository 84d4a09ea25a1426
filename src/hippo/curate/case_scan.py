"""The check of one image/label pair (run in worker processes: top-level, picklable arguments and
results): readability, shapes, affines, spacing, label values, intensity statistics, volumes in mm³."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from hippo.data.nifti import CaseError, CasePaths, labels_to_uint8, load_nifti
from hippo.preprocessing import LABEL_NAMES, label_volumes_mm3
from hippo.curate.records import CaseRecord, ERROR, Flag, PERCENTILES, WARNING, fmt_tuple


# --------------------------------------------------------------------------------------------
# Per-case scan (runs in worker processes: top-level, picklable arguments and results)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanParams:
    expected_spacing: tuple[float, float, float] | None
    spacing_tol: float
    affine_atol: float
    require_both_classes: bool


def _stored_dtype(path: Path) -> str | None:
    try:
        return str(nib.load(str(path)).get_data_dtype())
    except Exception:  # load_nifti reports the problem
        return None


def _load(rec: CaseRecord, path: Path):
    """load_nifti, turning its CaseError into a flag; returns ``None`` on failure."""
    try:
        return load_nifti(path)
    except CaseError as exc:
        code = "not_3d" if exc.problem.startswith("expected a 3D") else "unreadable"
        rec.flags.append(Flag(code, ERROR, str(path), exc.problem))
        return None


def _intensity_stats(image: np.ndarray) -> tuple[dict[str, Any], int]:
    finite = np.isfinite(image) if np.issubdtype(image.dtype, np.floating) else None
    n_bad = 0 if finite is None else int(image.size - np.count_nonzero(finite))
    values = image if finite is None or n_bad == 0 else image[finite]
    stats: dict[str, Any] = {"nonfinite": n_bad}
    if values.size == 0:
        stats.update({k: None for k in ("min", "max", "mean", "std")})
        stats.update({f"p{q}": None for q in PERCENTILES})
        return stats, n_bad
    v = values.astype(np.float64, copy=False)
    stats.update(min=float(v.min()), max=float(v.max()), mean=float(v.mean()), std=float(v.std()))
    for q, p in zip(PERCENTILES, np.percentile(v, PERCENTILES)):
        stats[f"p{q}"] = float(p)
    return stats, n_bad


def scan_case(paths: CasePaths, params: ScanParams) -> CaseRecord:
    """Read one image/label pair and check it; never raises for a bad case."""
    rec = CaseRecord(name=paths.name, image=str(paths.image),
                     label=None if paths.label is None else str(paths.label))
    try:
        _scan_into(rec, paths, params)
    except Exception as exc:  # a bug or an exotic file: record it, do not kill the whole scan
        rec.flags.append(Flag("scan_failed", ERROR, None, f"{type(exc).__name__}: {exc}"))
    return rec


def _scan_into(rec: CaseRecord, paths: CasePaths, params: ScanParams) -> None:
    img = _load(rec, paths.image)
    if img is not None:
        image, spacing, affine = img
        rec.image_shape = list(image.shape)
        rec.image_dtype = _stored_dtype(paths.image)
        rec.image_spacing = [float(s) for s in spacing]
        rec.image_affine = affine.tolist()
        rec.intensity, n_bad = _intensity_stats(image)
        if n_bad:
            rec.flags.append(Flag("nonfinite_image", ERROR, str(paths.image),
                                  f"image holds {n_bad} NaN or infinite values"))
        elif rec.intensity["max"] is not None and rec.intensity["max"] <= rec.intensity["min"]:
            rec.flags.append(Flag("constant_image", ERROR, str(paths.image),
                                  f"image is constant ({rec.intensity['min']:g})"))
        if params.expected_spacing is not None and not np.allclose(
                spacing, params.expected_spacing, rtol=0, atol=params.spacing_tol):
            rec.flags.append(Flag(
                "unexpected_spacing", ERROR, str(paths.image),
                f"voxel spacing {fmt_tuple(spacing)} mm, expected {fmt_tuple(params.expected_spacing)} "
                f"mm (± {params.spacing_tol:g})"))
    if paths.label is None:
        return
    lbl = _load(rec, paths.label)
    if lbl is None:
        return
    raw, lspacing, laffine = lbl
    rec.label_shape = list(raw.shape)
    rec.label_dtype = _stored_dtype(paths.label)
    rec.label_spacing = [float(s) for s in lspacing]
    rec.label_affine = laffine.tolist()
    values = np.unique(raw)
    rec.label_values = [float(v) if np.issubdtype(values.dtype, np.floating) else int(v)
                        for v in values[:20]]
    if img is not None:
        if raw.shape != image.shape:
            rec.flags.append(Flag("shape_mismatch", ERROR, str(paths.label),
                                  f"label shape {tuple(raw.shape)} differs from image shape {tuple(image.shape)}"))
        if not np.allclose(laffine, affine, rtol=0, atol=params.affine_atol):
            diff = float(np.max(np.abs(np.asarray(laffine) - np.asarray(affine))))
            rec.flags.append(Flag("affine_mismatch", ERROR, str(paths.label),
                                  f"label affine differs from image affine (max abs difference {diff:g}, "
                                  f"tolerance {params.affine_atol:g})"))
    try:
        label = labels_to_uint8(raw, paths.label)
    except CaseError as exc:
        rec.flags.append(Flag("invalid_label_values", ERROR, str(paths.label), exc.problem))
        return
    counts = np.bincount(label.ravel(), minlength=3)
    rec.voxel_counts = {str(k): int(counts[k]) for k in LABEL_NAMES}
    # Volumes use the image spacing (what training and deployment use); a differing label
    # spacing is already an affine mismatch.
    vol_spacing = spacing if img is not None else lspacing
    rec.volumes_mm3 = label_volumes_mm3(label, vol_spacing)
    if not (counts[1] or counts[2]):
        rec.flags.append(Flag("empty_label", ERROR, str(paths.label), "label is empty (no hippocampus voxel)"))
    elif not (counts[1] and counts[2]):
        missing = LABEL_NAMES[1] if not counts[1] else LABEL_NAMES[2]
        rec.flags.append(Flag("missing_class", ERROR if params.require_both_classes else WARNING,
                              str(paths.label), f"label has no {missing} voxel"))
