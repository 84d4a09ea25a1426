"""Curation and exploratory analysis of a Decathlon-style hippocampus dataset.

:func:`curate` scans every image/label pair under ``root/imagesTr`` and ``root/labelsTr`` (in
parallel worker processes), records per-case statistics, flags problems with reason codes, and
writes into ``out_dir``:

``curation.json``
    Everything: parameters, summary, and one record per case (shapes, stored dtypes, spacing,
    affines, intensity statistics, label values, voxel counts, volumes in mm³, robust z-scores,
    flags).
``report.md``
    Human-readable report: dataset summary, dtype/shape/spacing counts, volume statistics, the
    table of every flagged or excluded case with file and reason, and the embedded plots.
``*.png``
    ``volume_histograms.png``, ``shape_histograms.png``, ``intensity_max_histogram.png`` (log
    scale) and ``volume_scatter.png`` (anterior vs posterior, outliers highlighted).
``manifest.json``
    The cases training may use, and the excluded ones with their reasons::

        {
          "root": "/abs/path/to/dataset",
          "cases":    [{"name": "hippocampus_001",
                        "image": "/abs/.../imagesTr/hippocampus_001.nii.gz",
                        "label": "/abs/.../labelsTr/hippocampus_001.nii.gz"}, ...],
          "excluded": [{"name": "hippocampus_007",
                        "files": ["/abs/.../labelsTr/hippocampus_007.nii.gz"],
                        "reasons": ["invalid_label_values"],
                        "details": ["invalid_label_values: ...: label values [5] outside {0, 1, 2}"]},
                       ...]
        }

    Paths are absolute. :func:`read_manifest` reads it back as a list of
    :class:`~hippo.data.nifti.CasePaths` (relative paths, if someone writes them by hand, are taken
    relative to ``root``, or to the manifest's directory when ``root`` is absent).
``clean/`` (only with ``clean_copy="copy"`` or ``"symlink"``)
    The clean cases in the Decathlon layout (``imagesTr/``, ``labelsTr/``) with a regenerated
    ``dataset.json`` that lists only them.

All files are written atomically (temporary file + :func:`os.replace`). The input is only read.

Reason codes
------------
Errors (severity ``"error"``; the case is always excluded):

``unpaired_image`` / ``unpaired_label``
    an image without a label file, or a label without an image.
``unreadable``
    the file cannot be read (corrupt, truncated) — ``file`` says which one.
``not_3d``
    the file is not a 3D volume.
``shape_mismatch``
    label shape differs from image shape.
``affine_mismatch``
    label affine differs from image affine (``np.allclose`` with ``affine_atol``, ``rtol=0``).
``invalid_label_values``
    label values outside ``{0, 1, 2}``, non-integer floats, or NaN/inf in the label.
``empty_label``
    no hippocampus voxel.
``missing_class``
    only one of anterior (1) / posterior (2) is present (a warning, kept, when
    ``require_both_classes=False``).
``unexpected_spacing``
    image voxel size differs from ``expected_spacing`` by more than ``spacing_tol`` mm.
``nonfinite_image``
    NaN or infinite values in the image.
``constant_image``
    the image holds a single value (nothing to learn from).
``scan_failed``
    the scan itself crashed (should not happen; the message has the exception).

Outliers (severity ``"outlier"``; excluded when the matching ``exclude_*`` option is true):

``volume_outlier``
    total hippocampal volume with robust z-score ``|0.6745 (v - median) / MAD| > volume_outlier_z``
    over the cases without errors (default 3.5, excluded by default).
``intensity_outlier``
    off by default (``intensity_outlier_z=None``): robust z-score of ``log10`` of the image
    maximum. The Decathlon images come in three intensity scales (uint8 files with maxima ~1e2..3e2,
    float32 files with ~1e3..6e3 and ~4e5..1.7e6: different scanners/exports), so a threshold of
    3.5 would flag a whole group (31 of 234 cases) on the real data; the intensity histogram in
    the report shows the distribution instead (training normalises each volume to [0, 1]). Never excluded unless
    ``exclude_intensity_outliers=True``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import nibabel as nib
import numpy as np

from hippo.data.nifti import CaseError, CasePaths, case_name, find_pairs, is_nifti, labels_to_uint8, load_nifti
from hippo.preprocessing import LABEL_NAMES, label_volumes_mm3
from hippo.fileio import replace_dir, to_plain, write_bytes_atomic

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
ERROR, OUTLIER, WARNING = "error", "outlier", "warning"
PERCENTILES = (1, 5, 50, 95, 99)
ROBUST_Z_SCALE = 0.6745  # Iglewicz & Hoaglin: z = 0.6745 (x - median) / MAD
CleanCopy = Literal["copy", "symlink"] | None


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class Flag:
    """One problem found in a case.

    Attributes:
        code: reason code (see the module docstring).
        severity: ``"error"`` (always excluded), ``"outlier"`` (excluded when configured) or
            ``"warning"`` (kept).
        file: the offending file, or ``None`` when it concerns the case as a whole.
        message: human-readable explanation.
    """

    code: str
    severity: str
    file: str | None
    message: str


@dataclass
class CaseRecord:
    """Everything :func:`curate` learned about one case (JSON-serialisable via ``asdict``).

    Stats that could not be computed (unreadable file, unpaired case...) are ``None``.
    ``volumes_mm3`` keys are ``anterior_mm3``, ``posterior_mm3``, ``total_mm3``; ``volume_z`` has
    the robust z-scores of the same three quantities.
    """

    name: str
    image: str | None = None
    label: str | None = None
    image_shape: list[int] | None = None
    image_dtype: str | None = None
    image_spacing: list[float] | None = None
    image_affine: list[list[float]] | None = None
    intensity: dict[str, float | int | None] | None = None
    label_shape: list[int] | None = None
    label_dtype: str | None = None
    label_spacing: list[float] | None = None
    label_affine: list[list[float]] | None = None
    label_values: list[float] | None = None
    voxel_counts: dict[str, int] | None = None
    volumes_mm3: dict[str, float] | None = None
    volume_z: dict[str, float] | None = None
    intensity_z: float | None = None
    flags: list[Flag] = field(default_factory=list)
    excluded: bool = False

    @property
    def files(self) -> list[str]:
        return [p for p in (self.image, self.label) if p is not None]

    @property
    def has_error(self) -> bool:
        return any(f.severity == ERROR for f in self.flags)

    def codes(self, severity: str | None = None) -> list[str]:
        return [f.code for f in self.flags if severity is None or f.severity == severity]

    def to_json(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


@dataclass
class CurationResult:
    """What :func:`curate` returns.

    Attributes:
        root: the scanned dataset directory (absolute).
        out_dir: where the outputs were written (absolute).
        records: one :class:`CaseRecord` per case name (pairs and unpaired files), sorted by name.
        clean: the kept cases (what ``manifest.json`` lists under ``cases``).
        summary: the summary dict also stored in ``curation.json``.
        files: output name -> path (``curation``, ``report``, ``manifest``, plots, ``clean``).
    """

    root: Path
    out_dir: Path
    records: list[CaseRecord]
    clean: list[CasePaths]
    summary: dict[str, Any]
    files: dict[str, Path]

    @property
    def excluded(self) -> list[CaseRecord]:
        return [r for r in self.records if r.excluded]

    @property
    def flagged(self) -> list[CaseRecord]:
        """Every case with at least one flag (excluded or kept)."""
        return [r for r in self.records if r.flags]

    def record(self, name: str) -> CaseRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# Per-case scan (runs in worker processes: top-level, picklable arguments and results)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ScanParams:
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


def _scan_case(paths: CasePaths, params: _ScanParams) -> CaseRecord:
    """Read one image/label pair and check it; never raises for a bad case."""
    rec = CaseRecord(name=paths.name, image=str(paths.image),
                     label=None if paths.label is None else str(paths.label))
    try:
        _scan_into(rec, paths, params)
    except Exception as exc:  # a bug or an exotic file: record it, do not kill the whole scan
        rec.flags.append(Flag("scan_failed", ERROR, None, f"{type(exc).__name__}: {exc}"))
    return rec


def _scan_into(rec: CaseRecord, paths: CasePaths, params: _ScanParams) -> None:
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
                f"voxel spacing {_fmt_tuple(spacing)} mm, expected {_fmt_tuple(params.expected_spacing)} "
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


# --------------------------------------------------------------------------------------------
# The whole dataset
# --------------------------------------------------------------------------------------------


def curate(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workers: int = 2,
    clean_copy: CleanCopy | bool = None,
    images_dir: str = "imagesTr",
    labels_dir: str = "labelsTr",
    expected_spacing: Sequence[float] | None = (1.0, 1.0, 1.0),
    spacing_tol: float = 1e-3,
    affine_atol: float = 1e-3,
    require_both_classes: bool = True,
    volume_outlier_z: float | None = 3.5,
    exclude_volume_outliers: bool = True,
    intensity_outlier_z: float | None = None,
    exclude_intensity_outliers: bool = False,
    min_cases_for_outliers: int = 8,
    plots: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> CurationResult:
    """Scan, check and summarise a Decathlon-style dataset; write the report and manifest.

    Args:
        root: dataset directory with ``images_dir`` and ``labels_dir`` (read only, never modified).
        out_dir: output directory (created); must not lie inside ``root``.
        workers: worker processes for the scan; ``1`` scans serially in this process,
            ``<= 0`` uses one per CPU.
        clean_copy: ``None``/``False`` (none), ``"copy"`` or ``"symlink"``: write the clean cases
            under ``out_dir/clean`` in the Decathlon layout with a regenerated ``dataset.json``.
        expected_spacing: voxel size in mm every image must have (``None`` disables the check).
        spacing_tol: allowed absolute deviation from ``expected_spacing`` in mm.
        affine_atol: absolute tolerance for the image/label affine comparison.
        require_both_classes: a label without anterior or without posterior voxels is an error
            (else a kept warning).
        volume_outlier_z: robust z-score threshold for the total volume (``None`` disables).
        exclude_volume_outliers: exclude volume outliers from the manifest (else only flag them).
        intensity_outlier_z: robust z-score threshold on ``log10(image max)``; ``None`` (default)
            disables it (see the module docstring for why).
        exclude_intensity_outliers: exclude intensity outliers (else only flag them).
        min_cases_for_outliers: fewer error-free cases than this skips outlier detection.
        plots: write the PNG plots (and embed them in the report).
        progress: optional callback ``progress(done, total)`` after each scanned case.

    Returns:
        A :class:`CurationResult`.

    Raises:
        FileNotFoundError: ``root`` or its image directory does not exist.
        CaseError: the image directory holds no NIfTI file.
        ValueError: bad arguments (``clean_copy`` value, ``out_dir`` inside ``root``).
    """
    root = Path(root).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if clean_copy is False:
        clean_copy = None
    if clean_copy not in (None, "copy", "symlink"):
        raise ValueError(f"clean_copy must be null, 'copy' or 'symlink', got {clean_copy!r}")
    if out_dir == root or root in out_dir.parents:
        raise ValueError(f"out_dir {out_dir} lies inside the dataset {root}; the input must stay unchanged")
    if clean_copy and (root == out_dir / "clean" or (out_dir / "clean") in root.parents):
        raise ValueError(f"the dataset {root} lies inside {out_dir / 'clean'}, which a clean copy replaces")
    if expected_spacing is not None:
        expected_spacing = tuple(float(s) for s in expected_spacing)
        if len(expected_spacing) != 3:
            raise ValueError(f"expected_spacing needs 3 values, got {expected_spacing}")

    pairs, unpaired = find_pairs(root, images_dir, labels_dir)
    params = _ScanParams(expected_spacing, float(spacing_tol), float(affine_atol), bool(require_both_classes))
    if workers is None or workers <= 0:
        workers = os.cpu_count() or 1
    log.info("curating %s: %d pairs, %d unpaired files, %d workers", root, len(pairs), len(unpaired), workers)

    records = _scan_all(pairs, params, workers, progress)
    records += _unpaired_records(unpaired, root / images_dir)
    records.sort(key=lambda r: r.name)

    outlier_info = _flag_outliers(records, volume_outlier_z, intensity_outlier_z, min_cases_for_outliers)
    for r in records:
        r.excluded = r.has_error or any(
            f.severity == OUTLIER and ((f.code == "volume_outlier" and exclude_volume_outliers)
                                       or (f.code == "intensity_outlier" and exclude_intensity_outliers))
            for f in r.flags)
    clean = [CasePaths(r.name, Path(r.image), Path(r.label)) for r in records if not r.excluded]

    parameters = {
        "root": str(root), "out_dir": str(out_dir), "images_dir": images_dir, "labels_dir": labels_dir,
        "workers": workers, "clean_copy": clean_copy,
        "expected_spacing": list(expected_spacing) if expected_spacing is not None else None,
        "spacing_tol": spacing_tol, "affine_atol": affine_atol, "require_both_classes": require_both_classes,
        "volume_outlier_z": volume_outlier_z, "exclude_volume_outliers": exclude_volume_outliers,
        "intensity_outlier_z": intensity_outlier_z, "exclude_intensity_outliers": exclude_intensity_outliers,
        "min_cases_for_outliers": min_cases_for_outliers,
    }
    summary = _summarise(records, len(pairs), root, outlier_info)

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if plots:
        files.update(_write_plots(records, out_dir, outlier_info))
    files["curation"] = out_dir / "curation.json"
    _atomic_write_text(files["curation"], _dump_json({
        "version": MANIFEST_VERSION,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "parameters": parameters, "summary": summary, "cases": [r.to_json() for r in records]}))
    files["manifest"] = out_dir / "manifest.json"
    _atomic_write_text(files["manifest"], _dump_json(_manifest(root, records, clean)))
    if clean_copy:
        files["clean"] = _write_clean_copy(root, out_dir / "clean", clean, clean_copy, images_dir, labels_dir)
    files["report"] = out_dir / "report.md"
    _atomic_write_text(files["report"], _report(records, summary, parameters, files, out_dir))
    log.info("curation: %d clean, %d excluded; report %s", len(clean), summary["n_excluded"], files["report"])
    return CurationResult(root, out_dir, records, clean, summary, files)


def _scan_all(pairs: list[CasePaths], params: _ScanParams, workers: int,
              progress: Callable[[int, int], None] | None) -> list[CaseRecord]:
    total, records = len(pairs), []

    def done(rec: CaseRecord) -> None:
        records.append(rec)
        if progress is not None:
            progress(len(records), total)
        elif len(records) % 50 == 0 or len(records) == total:
            log.info("scanned %d/%d cases", len(records), total)

    if workers == 1 or total <= 1:
        for p in pairs:
            done(_scan_case(p, params))
        return records
    # spawn: safe whatever threads the caller runs (torch, Hydra logging...), same on every OS
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, total), mp_context=ctx) as pool:
        futures = {pool.submit(_scan_case, p, params): p for p in pairs}
        for fut in as_completed(futures):
            p = futures[fut]
            try:
                rec = fut.result()
            except Exception as exc:  # worker died (BrokenProcessPool...) or result not picklable
                rec = CaseRecord(p.name, str(p.image), None if p.label is None else str(p.label))
                rec.flags.append(Flag("scan_failed", ERROR, None, f"{type(exc).__name__}: {exc}"))
            done(rec)
    return records


def _unpaired_records(unpaired: Iterable[str], img_dir: Path) -> list[CaseRecord]:
    out = []
    for path in unpaired:
        p = Path(path)
        if p.parent == img_dir:
            rec = CaseRecord(case_name(p), image=str(p))
            rec.flags.append(Flag("unpaired_image", ERROR, str(p), "image has no label file"))
        else:
            rec = CaseRecord(case_name(p), label=str(p))
            rec.flags.append(Flag("unpaired_label", ERROR, str(p), "label has no image file"))
        out.append(rec)
    return out


def robust_z(values: Sequence[float]) -> tuple[np.ndarray, float, float]:
    """Robust z-scores ``0.6745 (x - median) / MAD``.

    When the MAD is 0 (over half the values equal) the mean absolute deviation times 1.2533 is
    used instead; when that is 0 too, every score is 0.

    Returns:
        ``(z, median, scale)`` where ``z = (x - median) / scale``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x, math.nan, math.nan
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    scale = mad / ROBUST_Z_SCALE if mad > 0 else 1.2533 * float(np.mean(np.abs(x - med)))
    if scale <= 0:
        return np.zeros_like(x), med, 0.0
    return (x - med) / scale, med, scale


def _flag_outliers(records: list[CaseRecord], volume_z: float | None, intensity_z: float | None,
                   min_cases: int) -> dict[str, Any]:
    """Robust z-scores over the error-free cases; flag those beyond the thresholds."""
    eligible = [r for r in records if not r.has_error and r.volumes_mm3 is not None]
    info: dict[str, Any] = {"n_eligible": len(eligible), "volume": None, "intensity": None}
    if len(eligible) < max(min_cases, 3):
        info["skipped"] = f"only {len(eligible)} error-free cases (< {min_cases}); outlier detection skipped"
        return info
    for key in ("total_mm3", "anterior_mm3", "posterior_mm3"):
        z, med, scale = robust_z([r.volumes_mm3[key] for r in eligible])
        for r, zi in zip(eligible, z):
            r.volume_z = (r.volume_z or {}) | {key: round(float(zi), 3)}
        if key == "total_mm3":
            lo = med - volume_z * scale if volume_z is not None else None
            hi = med + volume_z * scale if volume_z is not None else None
            info["volume"] = {"median": med, "scale": scale, "threshold": volume_z, "low": lo, "high": hi}
            if volume_z is not None and scale > 0:
                for r, zi in zip(eligible, z):
                    if abs(zi) > volume_z:
                        r.flags.append(Flag(
                            "volume_outlier", OUTLIER, r.label,
                            f"total volume {r.volumes_mm3['total_mm3']:.0f} mm³, robust z {zi:+.2f} "
                            f"(median {med:.0f}, threshold |z| > {volume_z:g})"))
    with_max = [r for r in eligible if r.intensity and r.intensity.get("max") is not None and r.intensity["max"] > 0]
    if intensity_z is not None and len(with_max) >= max(min_cases, 3):
        z, med, scale = robust_z([math.log10(r.intensity["max"]) for r in with_max])
        info["intensity"] = {"median_log10_max": med, "scale": scale, "threshold": intensity_z}
        for r, zi in zip(with_max, z):
            r.intensity_z = round(float(zi), 3)
            if scale > 0 and abs(zi) > intensity_z:
                r.flags.append(Flag("intensity_outlier", OUTLIER, r.image,
                                    f"image maximum {r.intensity['max']:.4g}, robust z of log10 {zi:+.2f} "
                                    f"(threshold |z| > {intensity_z:g})"))
    return info


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _describe(values: Sequence[float]) -> dict[str, float | int | None]:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"n": 0, "mean": None, "sd": None, "median": None, "min": None, "max": None}
    return {"n": int(x.size), "mean": float(x.mean()), "sd": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def _summarise(records: list[CaseRecord], n_pairs: int, root: Path, outlier_info: dict) -> dict[str, Any]:
    clean = [r for r in records if not r.excluded]
    scanned = [r for r in records if r.image_shape is not None]
    reason_counts = Counter(f.code for r in records for f in r.flags)
    shapes = [tuple(r.image_shape) for r in scanned]
    test_dir = root / "imagesTs"
    n_test = sum(1 for p in test_dir.iterdir() if is_nifti(p)) if test_dir.is_dir() else 0
    vols = {k: _describe([r.volumes_mm3[k] for r in clean if r.volumes_mm3])
            for k in ("anterior_mm3", "posterior_mm3", "total_mm3")}
    vols_all = {k: _describe([r.volumes_mm3[k] for r in records if r.volumes_mm3 and not r.has_error])
                for k in ("anterior_mm3", "posterior_mm3", "total_mm3")}
    return {
        "n_cases": len(records),
        "n_pairs_scanned": n_pairs,
        "n_unpaired": reason_counts["unpaired_image"] + reason_counts["unpaired_label"],
        "n_test_images": n_test,
        "n_clean": len(clean),
        "n_excluded": len(records) - len(clean),
        "n_flagged_kept": sum(1 for r in clean if r.flags),
        "reason_counts": dict(sorted(reason_counts.items())),
        "image_dtypes": dict(Counter(r.image_dtype for r in scanned if r.image_dtype).most_common()),
        "label_dtypes": dict(Counter(r.label_dtype for r in records if r.label_dtype).most_common()),
        "spacings": {_fmt_tuple(k): v for k, v in Counter(tuple(r.image_spacing) for r in scanned).most_common()},
        "n_distinct_shapes": len(set(shapes)),
        "common_shapes": [{"shape": list(s), "count": c} for s, c in Counter(shapes).most_common(10)],
        "shape_min": np.min(shapes, axis=0).tolist() if shapes else None,
        "shape_max": np.max(shapes, axis=0).tolist() if shapes else None,
        "intensity_max": _describe([r.intensity["max"] for r in scanned if r.intensity and r.intensity["max"] is not None]),
        "intensity_min": _describe([r.intensity["min"] for r in scanned if r.intensity and r.intensity["min"] is not None]),
        "volumes_clean_mm3": vols,
        "volumes_error_free_mm3": vols_all,
        "outliers": outlier_info,
    }


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _manifest(root: Path, records: list[CaseRecord], clean: list[CasePaths]) -> dict[str, Any]:
    return {
        "version": MANIFEST_VERSION,
        "root": str(root),
        "cases": [{"name": c.name, "image": str(c.image), "label": str(c.label)} for c in clean],
        "excluded": [{"name": r.name, "files": r.files,
                      "reasons": list(dict.fromkeys(f.code for f in r.flags if f.severity != WARNING)),
                      "details": [f"{f.code}: {f.file + ': ' if f.file else ''}{f.message}" for f in r.flags]}
                     for r in records if r.excluded],
    }


def read_manifest(path: str | os.PathLike) -> list[CasePaths]:
    """Read the ``cases`` of a ``manifest.json`` written by :func:`curate`.

    Returns:
        The listed cases as :class:`CasePaths` (absolute paths), in manifest order.

    Raises:
        FileNotFoundError: the manifest does not exist.
        CaseError: (naming the manifest) malformed JSON or structure, duplicate or empty case list,
            or a listed image/label file that does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest file does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CaseError(path, f"manifest is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise CaseError(path, 'malformed manifest: expected an object with a "cases" list')
    base = Path(data["root"]) if isinstance(data.get("root"), str) else path.parent
    if not base.is_absolute():
        base = path.parent / base
    out, seen = [], set()
    for i, entry in enumerate(data["cases"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("image"), str) and isinstance(entry.get("label", None), (str, type(None)))):
            raise CaseError(path, f'malformed manifest: cases[{i}] must be {{"name": str, "image": str, '
                                  f'"label": str}}, got {entry!r:.200}')
        name = entry["name"]
        if name in seen:
            raise CaseError(path, f"malformed manifest: case {name!r} listed twice")
        seen.add(name)
        files = {}
        for key in ("image", "label"):
            if entry.get(key) is None:
                files[key] = None
                continue
            p = Path(entry[key])
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise CaseError(path, f"case {name!r}: {key} file {p} does not exist")
            files[key] = p
        out.append(CasePaths(name, files["image"], files["label"]))
    if not out:
        raise CaseError(path, "manifest lists no cases")
    return out


def _write_clean_copy(root: Path, clean_dir: Path, clean: list[CasePaths], mode: str,
                      images_dir: str, labels_dir: str) -> Path:
    """Build ``clean_dir`` next to itself, then swap it in (a rerun replaces the old copy)."""
    tmp = Path(tempfile.mkdtemp(prefix=".clean.", dir=clean_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        training = []
        for sub, key in ((images_dir, "image"), (labels_dir, "label")):
            (tmp / sub).mkdir()
        for c in clean:
            entry = {}
            for sub, key, src in ((images_dir, "image", c.image), (labels_dir, "label", c.label)):
                dst = tmp / sub / Path(src).name
                if mode == "symlink":
                    os.symlink(Path(src).resolve(), dst)
                else:
                    shutil.copy2(src, dst)
                entry[key] = f"./{sub}/{dst.name}"
            training.append(entry)
        meta: dict[str, Any] = {}
        src_json = root / "dataset.json"
        if src_json.is_file():
            try:
                meta = json.loads(src_json.read_text(encoding="utf-8"))
                if not isinstance(meta, dict):
                    meta = {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
        meta.setdefault("name", "Hippocampus")
        meta.setdefault("labels", {str(k): v for k, v in LABEL_NAMES.items()})
        meta.update(numTraining=len(training), training=training, numTest=0, test=[],
                    curation={"source": str(root), "mode": mode,
                              "note": "only the cases kept by hippo.curate.curation; see ../manifest.json"})
        (tmp / "dataset.json").write_text(_dump_json(meta), encoding="utf-8")
        replace_dir(tmp, clean_dir, trash_prefix=".clean.old.")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return clean_dir


def _atomic_write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _dump_json(obj: Any) -> str:
    return json.dumps(to_plain(obj), indent=2, allow_nan=False) + "\n"


def _fmt_tuple(values: Sequence[float]) -> str:
    return "×".join(f"{float(v):g}" for v in values)


# ---- plots ---------------------------------------------------------------------------------


def _save_fig(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())


def _write_plots(records: list[CaseRecord], out_dir: Path, outlier_info: dict) -> dict[str, Path]:
    """The report's PNGs; uses matplotlib's object API with the Agg canvas (no pyplot state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def count_axis(ax) -> None:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))

    files: dict[str, Path] = {}
    usable = [r for r in records if r.volumes_mm3 is not None and not r.has_error]
    vol_out = [r for r in usable if "volume_outlier" in r.codes()]

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, key, title, colour in zip(axes, ("total_mm3", "anterior_mm3", "posterior_mm3"),
                                      ("total", "anterior", "posterior"), ("tab:purple", "tab:blue", "tab:orange")):
        vals = [r.volumes_mm3[key] for r in usable]
        if vals:
            ax.hist(vals, bins=min(30, max(5, len(vals) // 4)), color=colour, alpha=0.8, edgecolor="white")
            ax.axvline(float(np.median(vals)), color="k", ls="--", lw=1, label=f"median {np.median(vals):.0f}")
        if key == "total_mm3" and outlier_info.get("volume") and outlier_info["volume"]["low"] is not None:
            v = outlier_info["volume"]
            for x in (v["low"], v["high"]):
                ax.axvline(x, color="tab:red", ls=":", lw=1.2)
            ax.plot([], [], color="tab:red", ls=":", label=f"|z| = {v['threshold']:g}")
        ax.set_title(f"{title} hippocampal volume (n={len(vals)})")
        ax.set_xlabel("volume [mm³]")
        ax.set_ylabel("cases")
        count_axis(ax)
        if vals:
            ax.legend(fontsize=8)
    files["volume_histograms"] = out_dir / "volume_histograms.png"
    _save_fig(fig, files["volume_histograms"])

    scanned = [r for r in records if r.image_shape is not None]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for i, ax in enumerate(axes):
        dims = [r.image_shape[i] for r in scanned]
        if dims:
            ax.hist(dims, bins=np.arange(min(dims) - 0.5, max(dims) + 1.5, 1), color="tab:green", edgecolor="white")
        ax.set_title(f"image size along voxel axis {i}")
        ax.set_xlabel("voxels")
        ax.set_ylabel("cases")
        count_axis(ax)
    files["shape_histograms"] = out_dir / "shape_histograms.png"
    _save_fig(fig, files["shape_histograms"])

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    maxima = [(r.intensity["max"], r.image_dtype or "?") for r in scanned
              if r.intensity and r.intensity.get("max") is not None and r.intensity["max"] > 0]
    if maxima:
        lo, hi = min(m for m, _ in maxima), max(m for m, _ in maxima)
        bins = np.logspace(math.log10(lo) - 0.05, math.log10(hi) + 0.05, 40)
        groups = sorted({d for _, d in maxima})
        ax.hist([[m for m, d in maxima if d == g] for g in groups], bins=bins, stacked=True,
                label=[f"stored {g} (n={sum(1 for _, d in maxima if d == g)})" for g in groups], edgecolor="white")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_title(f"image intensity maximum per case (n={len(maxima)})")
    ax.set_xlabel("maximum intensity (log scale)")
    ax.set_ylabel("cases")
    count_axis(ax)
    files["intensity_max_histogram"] = out_dir / "intensity_max_histogram.png"
    _save_fig(fig, files["intensity_max_histogram"])

    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.subplots()
    normal = [r for r in usable if r not in vol_out]
    ax.scatter([r.volumes_mm3["anterior_mm3"] for r in normal], [r.volumes_mm3["posterior_mm3"] for r in normal],
               s=14, alpha=0.7, color="tab:blue", label=f"cases (n={len(normal)})")
    if vol_out:
        ax.scatter([r.volumes_mm3["anterior_mm3"] for r in vol_out], [r.volumes_mm3["posterior_mm3"] for r in vol_out],
                   s=40, color="tab:red", marker="D", label=f"volume outliers (n={len(vol_out)})")
        for r in vol_out:
            ax.annotate(r.name, (r.volumes_mm3["anterior_mm3"], r.volumes_mm3["posterior_mm3"]),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("anterior volume [mm³]")
    ax.set_ylabel("posterior volume [mm³]")
    ax.set_title("anterior vs posterior volume (error-free cases)")
    ax.grid(alpha=0.3)
    if usable:
        ax.legend(fontsize=8)
    files["volume_scatter"] = out_dir / "volume_scatter.png"
    _save_fig(fig, files["volume_scatter"])
    return files


# ---- report --------------------------------------------------------------------------------


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(x: Any, fmt: str = ".0f") -> str:
    return "–" if x is None else format(x, fmt)


def _report(records: list[CaseRecord], summary: dict, parameters: dict, files: dict[str, Path],
            out_dir: Path) -> str:
    s = summary
    lines = [
        "# Hippocampus dataset curation report",
        "",
        f"- dataset: `{parameters['root']}`",
        f"- generated: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "- outputs: `curation.json` (all per-case statistics), `manifest.json` (clean cases for training)"
        + (", `clean/` (clean copy, " + str(parameters["clean_copy"]) + ")" if "clean" in files else ""),
        "",
        "## Summary",
        "",
        "| | count |",
        "|---|---:|",
        f"| cases (names in imagesTr ∪ labelsTr) | {s['n_cases']} |",
        f"| image/label pairs scanned | {s['n_pairs_scanned']} |",
        f"| unpaired files | {s['n_unpaired']} |",
        f"| **clean cases (in manifest)** | **{s['n_clean']}** |",
        f"| excluded cases | {s['n_excluded']} |",
        f"| flagged but kept | {s['n_flagged_kept']} |",
        f"| unlabelled test images (imagesTs, not scanned) | {s['n_test_images']} |",
        "",
    ]
    if s["reason_counts"]:
        lines += ["Flags by reason: " + ", ".join(f"`{k}` {v}" for k, v in s["reason_counts"].items()), ""]
    else:
        lines += ["No case was flagged.", ""]

    lines += ["## Files", "", "| | counts |", "|---|---|",
              "| image stored dtype | " + ", ".join(f"{k}: {v}" for k, v in s["image_dtypes"].items()) + " |",
              "| label stored dtype | " + ", ".join(f"{k}: {v}" for k, v in s["label_dtypes"].items()) + " |",
              "| voxel spacing [mm] | " + ", ".join(f"{k}: {v}" for k, v in s["spacings"].items()) + " |",
              f"| image shape | {s['n_distinct_shapes']} distinct; per axis min {s['shape_min']}, max {s['shape_max']} |",
              "| most common shapes | " + ", ".join(f"{'×'.join(map(str, c['shape']))}: {c['count']}"
                                                  for c in s["common_shapes"][:5]) + " |",
              f"| image maximum | min {_num(s['intensity_max']['min'], '.4g')}, median "
              f"{_num(s['intensity_max']['median'], '.4g')}, max {_num(s['intensity_max']['max'], '.4g')} |",
              f"| image minimum | min {_num(s['intensity_min']['min'], '.4g')}, max {_num(s['intensity_min']['max'], '.4g')} |",
              ""]
    float_labels = [r for r in records if r.label_dtype and not r.label_dtype.startswith(("uint", "int"))]
    if float_labels:
        ok = [r.name for r in float_labels if "invalid_label_values" not in r.codes()]
        bad = [r.name for r in float_labels if "invalid_label_values" in r.codes()]
        lines += [f"Labels stored as floating point: {len(float_labels)}"
                  + (f"; integer-valued and accepted: {', '.join(ok)}" if ok else "")
                  + (f"; rejected: {', '.join(bad)}" if bad else "") + ".", ""]

    v = s["volumes_clean_mm3"]
    lines += [f"## Hippocampal volume, clean cases (n={v['total_mm3']['n']})", "",
              "| structure | mean ± sd [mm³] | median | min | max |", "|---|---:|---:|---:|---:|"]
    for key, title in (("anterior_mm3", "anterior (1)"), ("posterior_mm3", "posterior (2)"), ("total_mm3", "total")):
        d = v[key]
        lines.append(f"| {title} | {_num(d['mean'])} ± {_num(d['sd'])} | {_num(d['median'])} | "
                     f"{_num(d['min'])} | {_num(d['max'])} |")
    o = s["outliers"]
    if o.get("volume"):
        ov = o["volume"]
        lines += ["", f"Volume outliers: robust z-score of the total volume over the {o['n_eligible']} error-free "
                      f"cases (median {ov['median']:.0f} mm³, robust sd {ov['scale']:.0f} mm³)"
                  + (f"; flagged when |z| > {ov['threshold']:g}, i.e. outside "
                     f"[{ov['low']:.0f}, {ov['high']:.0f}] mm³" if ov["threshold"] is not None else "; disabled")
                  + ("; excluded." if parameters["exclude_volume_outliers"] else "; kept (flag only).")]
    elif o.get("skipped"):
        lines += ["", f"Volume outliers: {o['skipped']}."]
    lines.append("")

    flagged = [r for r in records if r.flags]
    lines += ["## Excluded and flagged cases", ""]
    if not flagged:
        lines += ["None.", ""]
    else:
        lines += ["| case | status | reason | file | detail |", "|---|---|---|---|---|"]
        for r in flagged:
            status = "excluded" if r.excluded else "kept"
            for f in r.flags:
                shown = os.path.relpath(f.file, parameters["root"]) if f.file else "–"
                lines.append(f"| {_md(r.name)} | {status} | `{f.code}` ({f.severity}) | `{_md(shown)}` | {_md(f.message)} |")
        lines.append("")

    plots = [("volume_histograms", "Volume histograms"), ("volume_scatter", "Anterior vs posterior volume"),
             ("shape_histograms", "Image dimensions"), ("intensity_max_histogram", "Image intensity maxima")]
    if any(k in files for k, _ in plots):
        lines += ["## Plots", ""]
        for key, title in plots:
            if key in files:
                lines += [f"### {title}", "", f"![{title}]({os.path.relpath(files[key], out_dir)})", ""]

    lines += ["## Parameters", "", "```json", json.dumps(to_plain(parameters), indent=2), "```", ""]
    return "\n".join(lines)
