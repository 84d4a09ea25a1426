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

    Paths are absolute. :func:`hippo.data.manifest.read_manifest` reads it back as a list of
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

import datetime as _dt
import logging
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from hippo.data.manifest import MANIFEST_VERSION
from hippo.data.nifti import CasePaths, case_name, find_pairs, is_nifti
from hippo.curate.case_scan import ScanParams, scan_case
from hippo.curate.clean_copy import write_clean_copy
from hippo.curate.markdown_report import render_report_md
from hippo.curate.outliers import flag_outliers
from hippo.curate.plots import write_plots
from hippo.curate.records import (CaseRecord, CleanCopy, CurationResult, ERROR, Flag, OUTLIER, WARNING,
                                  dump_json, fmt_tuple, write_text_atomic)

log = logging.getLogger(__name__)

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
    params = ScanParams(expected_spacing, float(spacing_tol), float(affine_atol), bool(require_both_classes))
    if workers is None or workers <= 0:
        workers = os.cpu_count() or 1
    log.info("curating %s: %d pairs, %d unpaired files, %d workers", root, len(pairs), len(unpaired), workers)

    records = _scan_all(pairs, params, workers, progress)
    records += _unpaired_records(unpaired, root / images_dir)
    records.sort(key=lambda r: r.name)

    outlier_info = flag_outliers(records, volume_outlier_z, intensity_outlier_z, min_cases_for_outliers)
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
        files.update(write_plots(records, out_dir, outlier_info))
    files["curation"] = out_dir / "curation.json"
    write_text_atomic(files["curation"], dump_json({
        "version": MANIFEST_VERSION,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "parameters": parameters, "summary": summary, "cases": [r.to_json() for r in records]}))
    files["manifest"] = out_dir / "manifest.json"
    write_text_atomic(files["manifest"], dump_json(_manifest(root, records, clean)))
    if clean_copy:
        files["clean"] = write_clean_copy(root, out_dir / "clean", clean, clean_copy, images_dir, labels_dir)
    files["report"] = out_dir / "report.md"
    write_text_atomic(files["report"], render_report_md(records, summary, parameters, files, out_dir))
    log.info("curation: %d clean, %d excluded; report %s", len(clean), summary["n_excluded"], files["report"])
    return CurationResult(root, out_dir, records, clean, summary, files)


def _scan_all(pairs: list[CasePaths], params: ScanParams, workers: int,
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
            done(scan_case(p, params))
        return records
    # spawn: safe whatever threads the caller runs (torch, Hydra logging...), same on every OS
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, total), mp_context=ctx) as pool:
        futures = {pool.submit(scan_case, p, params): p for p in pairs}
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
        "spacings": {fmt_tuple(k): v for k, v in Counter(tuple(r.image_spacing) for r in scanned).most_common()},
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
