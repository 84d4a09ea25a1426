"""One DICOM series -> an oriented volume with its voxel->RAS affine, after geometry checks.

The model works on volumes in the NIfTI/Decathlon convention: array axes ``(X, Y, Z)`` with a
voxel->RAS affine that is (close to) diagonal positive ("closest canonical RAS"). A DICOM series is
a stack of single-frame images placed in LPS patient coordinates, or enhanced images (Enhanced /
Legacy Converted Enhanced MR: one multi-frame instance, several, or one frame per instance) whose
frames are placed by functional groups (PlanePosition, PlaneOrientation, PixelMeasures and
PixelValueTransformation, each shared or per frame) and stacked across instances by position.
:func:`load_series` turns the stack into that convention and keeps what is needed to map a result
(a mask) back onto the source frames, pixel-aligned, for a DICOM SEG.

Geometry, in DICOM terms (PS3.3 C.7.6.2):

* ``ImageOrientationPatient`` = ``(r, c)``: ``r`` is the LPS direction of increasing *column*
  index (along a row), ``c`` the direction of increasing *row* index.
* ``PixelSpacing`` = ``[row spacing, column spacing]`` in mm: the distance between rows (along
  ``c``) first, then between columns (along ``r``).
* The position of pixel ``(row i, column j)`` of a frame is
  ``ImagePositionPatient + j * PixelSpacing[1] * r + i * PixelSpacing[0] * c``.
* The slice normal is ``n = r x c``; slices are ordered by ``ImagePositionPatient . n``.

Only pydicom and numpy (plus nibabel's orientation helpers and :mod:`hippo.dicom.ingest`'s
functional-group reader); never torch, Lightning or Hydra.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.dataset import Dataset

from hippo.dicom.geometry import (SAME_POSITION_MM, SPACING_REL_TOL, same_orientation, same_pixel_spacing,
                                 slice_normal, stack_problem)
from hippo.dicom.ingest import ParsedHeader, frame_attributes, has_functional_groups, mosaic_evidence
from hippo.dicom.prefetch import read_ahead

__all__ = [
    "SeriesError",
    "SeriesGeometryError",
    "PixelDecodeError",
    "SeriesVolume",
    "load_series",
    "LPS_TO_RAS",
]

#: ``RAS = LPS_TO_RAS @ LPS`` (and its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])



class SeriesError(ValueError):
    """A series that cannot be turned into a volume; the message names the series and the file."""


class SeriesGeometryError(SeriesError):
    """Inconsistent or incomplete geometry: mixed sizes/spacings/orientations, duplicate or missing
    slices, non-uniform spacing, a single slice, more than one series."""


class PixelDecodeError(SeriesError):
    """Pixel data that cannot be decoded (typically a compressed transfer syntax without a decoder);
    the message names the file and the transfer syntax."""


@dataclass
class SeriesVolume:
    """A series as a volume in closest canonical RAS.

    Two kinds of source: a classic series (one single-frame dataset per slice) and an enhanced
    source (:attr:`is_multiframe`): enhanced instances -- one multi-frame instance, several
    multi-frame instances, or one single-frame enhanced instance per slice -- whose frames are the
    slices. For an enhanced source ``datasets`` are those instances (by InstanceNumber) and
    :meth:`to_source` / :meth:`from_source` / :attr:`source_shape` use ``(total frames, Rows,
    Columns)``: the frames of ``datasets[0]`` in the file's frame order, then those of
    ``datasets[1]``, ... (whatever the spatial order of the frames is);
    :attr:`frame_references` says which instance and frame each is.

    Attributes:
        array: ``(X, Y, Z) float32``, stored values with RescaleSlope/RescaleIntercept applied
            (real-world units, e.g. arbitrary MR units or HU), reoriented to closest canonical RAS.
        affine: ``(4, 4) float64`` voxel index -> RAS position in mm of ``array``.
        spacing: ``(sx, sy, sz)`` voxel size in mm of ``array``'s axes.
        datasets: the source pydicom datasets (headers and pixels), sorted by ascending projection
            of ``ImagePositionPatient`` on the slice normal (InstanceNumber order in the fallback);
            for an enhanced source, its instances in InstanceNumber order.
        warnings: human-readable notes (dropped duplicates, InstanceNumber fallback, tilt, ...).
        series_uid: the SeriesInstanceUID.
        source_affine_lps: ``(4, 4)`` voxel -> LPS (mm) affine of the source stack indexed
            ``(column, row, slice)`` (slice in ``datasets`` order; for a multi-frame source in
            sorted order, i.e. slice ``s`` is frame ``frame_order[s]`` of the file).
        ornt: nibabel orientation ``(3, 2)`` that maps the source stack onto ``array``.
        files: the file name (or a description) of each dataset, in ``datasets`` order.
        frame_order: enhanced source only (else ``None``): ``frame_order[s]`` is the 0-based
            index, in the concatenated frames of ``datasets``, of slice ``s`` of the sorted stack
            (ascending along the normal).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    datasets: list[Dataset]
    warnings: list[str] = field(default_factory=list)
    series_uid: str = ""
    source_affine_lps: np.ndarray = field(default_factory=lambda: np.eye(4))
    ornt: np.ndarray = field(default_factory=lambda: axcodes2ornt(("R", "A", "S")))
    files: list[str] = field(default_factory=list)
    frame_order: np.ndarray | None = None

    @property
    def is_multiframe(self) -> bool:
        """True when the source is enhanced (functional-group) instances, one or several."""
        return self.frame_order is not None

    @property
    def frame_references(self) -> list[tuple[int, int | None]]:
        """Per source frame (the first axis of :meth:`to_source`): ``(index into datasets, 1-based
        frame number)``; the frame number is ``None`` for a classic single-frame source."""
        if self.frame_order is None:
            return [(i, None) for i in range(len(self.datasets))]
        return [(i, k + 1) for i, ds in enumerate(self.datasets) for k in range(_n_frames(ds))]

    @property
    def source_shape(self) -> tuple[int, int, int]:
        """``(n_slices, Rows, Columns)`` of the source frames (``(NumberOfFrames, Rows, Columns)``
        for a multi-frame source)."""
        ds = self.datasets[0]
        n = len(self.frame_order) if self.frame_order is not None else len(self.datasets)
        return (n, int(ds.Rows), int(ds.Columns))

    def to_source(self, mask_ras: np.ndarray) -> np.ndarray:
        """Map an array on this volume's grid back onto the source frames.

        Args:
            mask_ras: ``(X, Y, Z)`` array of ``array``'s shape (any dtype, e.g. a uint8 label mask).

        Returns:
            ``(n_slices, Rows, Columns)`` array of the same dtype; frame ``k`` is pixel-aligned with
            ``datasets[k]`` (the exact inverse of the reorientation, no resampling). For an
            enhanced source ``(total frames, Rows, Columns)``: the frames of ``datasets`` one
            instance after the other, each in the file's frame order (:attr:`frame_references`).

        Raises:
            ValueError: ``mask_ras`` does not have ``array``'s shape.
        """
        mask_ras = np.asarray(mask_ras)
        if mask_ras.shape != self.array.shape:
            raise ValueError(f"to_source: mask shape {mask_ras.shape} differs from the volume's {self.array.shape}")
        back = ornt_transform(axcodes2ornt(("R", "A", "S")), self.ornt)
        stack = apply_orientation(mask_ras, back).transpose(2, 1, 0)  # (n_slices, Rows, Columns)
        if self.frame_order is not None:
            out = np.empty_like(stack)
            out[self.frame_order] = stack  # sorted slice s -> file frame frame_order[s]
            return out
        return np.ascontiguousarray(stack)

    def from_source(self, frames: np.ndarray) -> np.ndarray:
        """The forward mapping of :meth:`to_source`: ``(n_slices, Rows, Columns)`` (file frame order
        for a multi-frame source) -> ``(X, Y, Z)``."""
        frames = np.asarray(frames)
        if frames.shape != self.source_shape:
            raise ValueError(f"from_source: frames shape {frames.shape} differs from the source's {self.source_shape}")
        if self.frame_order is not None:
            frames = frames[self.frame_order]
        return np.ascontiguousarray(apply_orientation(frames.transpose(2, 1, 0), self.ornt))


# ----------------------------------------------------------------------------------------------
# Loading


@dataclass
class _Item:
    """One candidate slice while the series is assembled."""

    name: str
    header: Dataset
    path: Path | None
    full: Dataset | None  # dataset with pixel data, when given or once read
    frame: int | None = None  # 0-based frame over the enhanced sources (header: that frame's values)
    source: int = 0  # index of the enhanced instance the frame belongs to
    parsed: ParsedHeader | None = None  # the scan's parsed header: only the rest of the file is read


def load_series(
    paths_or_datasets: Iterable[str | os.PathLike | Dataset | ParsedHeader],
    *,
    spacing_tolerance: float = SPACING_REL_TOL,
    workers: int = 4,
    series_uid: str | None = None,
) -> SeriesVolume:
    """Read one DICOM series into a volume in closest canonical RAS: single-frame instances (one
    per slice), or enhanced instances -- one or several multi-frame instances, or single-frame
    enhanced ones -- whose frames are stacked by position (shared or per-frame functional groups
    give each frame's geometry and rescale; the same checks apply to the frames as to a classic
    series' files).

    Args:
        paths_or_datasets: files (``str``/``PathLike``) and/or pydicom datasets of one series, in any
            order (or the one multi-frame instance), or the headers :func:`hippo.dicom.ingest.scan_study`
            parsed (:class:`hippo.dicom.ingest.ParsedHeader`, :meth:`StudyScan.series_inputs`: only
            the rest of each file, its pixel data, is read then, and added to that header). Each file
            is read once; pixel data is decoded only for the slices that are kept.
        spacing_tolerance: allowed relative deviation of each slice step from the median step
            (``0.01`` = 1 %).
        workers: how far the files are read ahead of the parsing and decoding (``4 * workers``
            files, :func:`hippo.dicom.prefetch.read_ahead`), which run in the calling thread
            (pydicom's parsing is Python work: threads would only take turns at it); 1: none.
        series_uid: when given, keep only the inputs of that SeriesInstanceUID (the others' pixels
            are never decoded); when ``None`` all inputs must belong to one series.

    Returns:
        :class:`SeriesVolume` with ``array (X, Y, Z) float32`` (rescaled), its voxel->RAS ``affine``
        (mm), ``spacing`` (mm), the sorted ``datasets`` and ``to_source``.

    Raises:
        SeriesGeometryError: no input, several series, a single slice, mixed Rows/Columns/
            PixelSpacing/ImageOrientationPatient (names the file), duplicate positions (names both
            files), a missing slice (names the gap position in mm), non-uniform spacing; a
            multi-frame instance without functional groups, or a series mixing enhanced and
            classic instances. For an enhanced source the messages name the file and the frame
            (``FILE frame 3``, 1-based).
        PixelDecodeError: pixel data that cannot be decoded (names the file and transfer syntax).
        FileNotFoundError / pydicom.errors.InvalidDicomError: an unreadable input file.
    """
    workers = max(1, int(workers))
    warnings: list[str] = []
    items = _read_headers(list(paths_or_datasets), workers)
    if not items:
        raise SeriesGeometryError("load_series: no DICOM input given")

    # --- one series --------------------------------------------------------------------------
    uids = Counter(str(it.header.get("SeriesInstanceUID", "")) for it in items)
    if series_uid is not None:
        items = [it for it in items if str(it.header.get("SeriesInstanceUID", "")) == series_uid]
        if not items:
            raise SeriesGeometryError(f"series {series_uid}: none of the {sum(uids.values())} inputs belongs to it")
    elif len(uids) > 1:
        listing = ", ".join(f"{u or '<none>'} ({n} files)" for u, n in uids.most_common())
        raise SeriesGeometryError(f"load_series: inputs belong to {len(uids)} series: {listing}; pass series_uid=")
    uid = str(items[0].header.get("SeriesInstanceUID", "")) or "<no SeriesInstanceUID>"

    # --- exact duplicate instances (same SOPInstanceUID) ---------------------------------------
    seen: dict[str, _Item] = {}
    kept: list[_Item] = []
    for it in items:
        sop = str(it.header.get("SOPInstanceUID", ""))
        if sop and sop in seen:
            warnings.append(f"series {uid}: dropped duplicate instance {sop} ({it.name}; kept {seen[sop].name})")
            continue
        if sop:
            seen[sop] = it
        kept.append(it)
    items = kept

    for it in items:
        mosaic = mosaic_evidence(it.header)
        if mosaic:
            raise SeriesGeometryError(f"series {uid}: {it.name} is a Siemens mosaic ({mosaic}): slices tiled in "
                                      f"one image, not a volume")

    # --- enhanced sources: their frames become the slices ------------------------------------------
    sources_mf: list[_Item] = []
    multi = [it for it in items if _n_frames(it.header) > 1 or has_functional_groups(it.header)]
    if multi:
        if len(multi) != len(items):
            plain = [it for it in items if it not in multi]
            names = ", ".join(f"{it.name} ({_n_frames(it.header)} frames)" for it in multi[:3])
            raise SeriesGeometryError(
                f"series {uid}: {len(items)} instances, {len(multi)} of them multi-frame or enhanced ({names}"
                f"{', ...' if len(multi) > 3 else ''}) and {len(plain)} classic (e.g. {plain[0].name}); a series "
                f"is one volume as classic single-frame instances or as enhanced instances, not both")
        classic_mf = [it for it in multi if not has_functional_groups(it.header)]
        if classic_mf:
            it = classic_mf[0]
            raise SeriesGeometryError(
                f"series {uid}: {it.name} is a multi-frame image ({_n_frames(it.header)} frames) without per-frame "
                f"functional groups (PerFrameFunctionalGroupsSequence): its frames cannot be placed in space; "
                f"only enhanced multi-frame images (e.g. Enhanced MR Image Storage) are supported")
        sources_mf = sorted(items, key=_instance_key)
        items = []
        offset = 0
        for index, src in enumerate(sources_mf):
            _check_greyscale(src, uid)
            frames_of = _frame_items(src, uid, offset=offset, source_index=index)
            items.extend(frames_of)
            offset += len(frames_of)
    source = sources_mf[0] if sources_mf else None

    # --- per-file checks and consistency -------------------------------------------------------
    if source is None:
        for it in items:
            _check_single_frame(it, uid)
    rows, cols = _consistent_int(items, uid, "Rows"), _consistent_int(items, uid, "Columns")
    pixel_spacing = _consistent_pixel_spacing(items, uid)
    iop = _consistent_orientation(items, uid)
    if len(items) < 2:
        raise SeriesGeometryError(f"series {uid}: a single slice ({items[0].name}) is not a volume")

    r, c = iop[:3], iop[3:]
    normal = np.cross(r, c)
    normal /= np.linalg.norm(normal)

    # --- slice order ----------------------------------------------------------------------------
    positions = [_position(it) for it in items]
    have_positions = all(p is not None for p in positions)
    degenerate = False
    if have_positions:
        proj = np.array([float(np.dot(p, normal)) for p in positions])
        degenerate = float(proj.max() - proj.min()) < SAME_POSITION_MM
    if have_positions and not degenerate:
        order = np.argsort(proj, kind="stable")
        items = [items[i] for i in order]
        pos = np.array([positions[i] for i in order], dtype=np.float64)
        problem = stack_problem(pos, normal, [it.name for it in items], rel_tol=spacing_tolerance,
                                what="frames" if source is not None else "instances")
        if problem is not None:
            raise SeriesGeometryError(f"series {uid}: {problem.message}")
        step = (pos[-1] - pos[0]) / (len(items) - 1)
        origin = pos[0]
        tilt = np.degrees(np.arccos(np.clip(abs(np.dot(step, normal)) / np.linalg.norm(step), 0.0, 1.0)))
        if tilt > 0.5:
            warnings.append(f"series {uid}: slices are sheared {tilt:.1f} deg off the normal (gantry tilt); "
                            f"the affine keeps the shear")
    else:
        why = "missing from some files" if not have_positions else "identical in all files"
        items, step, origin = _instance_number_fallback(items, positions, normal, uid, why, warnings)

    # --- affines (from the headers: known before any pixel is decoded) ---------------------------
    aff_lps = np.eye(4)
    aff_lps[:3, 0] = r * pixel_spacing[1]  # column index j moves along r by the column spacing
    aff_lps[:3, 1] = c * pixel_spacing[0]  # row index i moves along c by the row spacing
    aff_lps[:3, 2] = step
    aff_lps[:3, 3] = origin
    aff_ras_src = LPS_TO_RAS @ aff_lps
    stack_shape = (cols, rows, len(items))  # (Columns, Rows, n): the frames' voxel axes
    ornt = io_orientation(aff_ras_src)
    affine = aff_ras_src @ inv_ornt_aff(ornt, stack_shape)

    # --- pixels -----------------------------------------------------------------------------------
    frame_order = None
    if sources_mf:
        frame_order = np.array([it.frame for it in items], dtype=np.intp)
        frames = _read_enhanced_pixels(sources_mf, items, uid, workers)[frame_order]  # sorted (n, Rows, Columns)
        if frames.shape[1:] != (rows, cols):
            raise SeriesGeometryError(f"series {uid}: decoded frames are {frames.shape[1:]}, headers say {(rows, cols)}")
        array = np.ascontiguousarray(apply_orientation(frames.transpose(2, 1, 0), ornt), dtype=np.float32)
    else:
        # each decoded frame goes straight to its place in the closest-canonical array (no stack of
        # the frames, no reordered copy of it: for a 0.7 mm head two fewer passes over ~160 MB)
        array = np.empty(_oriented_shape(stack_shape, ornt), dtype=np.float32)
        _read_pixels(items, uid, workers, into=_frames_view(array, ornt, stack_shape), rows_columns=(rows, cols))
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    sources = sources_mf if sources_mf else items
    return SeriesVolume(
        array=array,
        affine=affine,
        spacing=spacing,  # type: ignore[arg-type]
        datasets=[it.full for it in sources],  # type: ignore[misc]
        warnings=warnings,
        series_uid=uid,
        source_affine_lps=aff_lps,
        ornt=ornt,
        files=[it.name for it in sources],
        frame_order=frame_order,
    )


def _read_headers(inputs: list, workers: int) -> list[_Item]:
    """Headers of every input, parsed in this thread, the files read ahead
    (:func:`hippo.dicom.prefetch.read_ahead`): a file is read once, with its pixel data (not yet
    decoded), which :func:`_decode` then uses; one whose pixel data cannot be read is read without it."""

    def one(idx_obj):
        idx, obj = idx_obj
        if isinstance(obj, ParsedHeader):  # parsed by the scan: its pixel data is read when decoded
            return _Item(str(obj.path), obj.dataset, obj.path, None, parsed=obj)
        if isinstance(obj, Dataset):
            fname = getattr(obj, "filename", None)
            name = str(fname) if isinstance(fname, (str, os.PathLike)) and fname else \
                f"<dataset {idx}: {obj.get('SOPInstanceUID', '?')}>"
            path = Path(fname) if isinstance(fname, (str, os.PathLike)) and fname else None
            if "PixelData" in obj or path is None:
                return _Item(name, obj, path, obj)
            return _Item(name, obj, path, None)  # header-only dataset: pixels read from its file
        path = Path(obj)
        try:  # the whole file at once: its pixels are decoded next (only for the slices kept)
            full = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - e.g. truncated pixel data: header now, the error when decoded
            return _Item(str(path), pydicom.dcmread(path, stop_before_pixels=True), path, None)
        return _Item(str(path), full, path, full)

    paths = [None if isinstance(obj, (ParsedHeader, Dataset)) else obj for obj in inputs]
    return [one((i, inputs[i])) for i in read_ahead(paths, workers, nbytes=None)]


def _n_frames(header: Dataset) -> int:
    frames = header.get("NumberOfFrames", 1)
    try:
        return int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


#: Attributes of a multi-frame instance copied into each frame's pseudo header.
_FRAME_COPIED = ("SOPInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "SamplesPerPixel")


def _instance_key(it: _Item) -> tuple:
    """Order of the enhanced instances of one series: InstanceNumber, then file name."""
    num = it.header.get("InstanceNumber", None)
    try:
        num = int(num)
    except (TypeError, ValueError):
        num = None
    return (num is None, num or 0, it.name)


def _frame_items(source: _Item, uid: str, *, offset: int = 0, source_index: int = 0) -> list[_Item]:
    """One :class:`_Item` per frame of an enhanced instance, in file frame order: its header a
    small dataset with that frame's PixelSpacing, ImageOrientationPatient, ImagePositionPatient,
    SliceThickness, SpacingBetweenSlices, RescaleSlope/Intercept (functional groups: per-frame,
    else shared; rescale falls back to the top level) and InstanceNumber, so that the classic
    checks and ordering apply unchanged. ``frame`` is the frame's index in the concatenation of
    the series' enhanced instances (``offset`` + frame index); the InstanceNumber fallback orders
    by (instance, frame)."""
    hdr = source.header
    if not has_functional_groups(hdr):
        raise SeriesGeometryError(
            f"series {uid}: {source.name} is a multi-frame image ({_n_frames(hdr)} frames) without per-frame "
            f"functional groups (PerFrameFunctionalGroupsSequence): its frames cannot be placed in space; "
            f"only enhanced multi-frame images (e.g. Enhanced MR Image Storage) are supported")
    per_frame = frame_attributes(hdr)
    n = _n_frames(hdr)
    if len(per_frame) != n:
        raise SeriesGeometryError(f"series {uid}: {source.name} has NumberOfFrames {n} but "
                                  f"{len(per_frame)} PerFrameFunctionalGroupsSequence items")
    items = []
    for k, values in enumerate(per_frame):
        ds = Dataset()
        ds.InstanceNumber = offset + k + 1
        for kw in _FRAME_COPIED:
            if kw in hdr:
                setattr(ds, kw, hdr[kw].value)
        for kw in ("RescaleSlope", "RescaleIntercept", "SpacingBetweenSlices", "SliceThickness"):
            if kw in hdr and kw not in values:
                values = {**values, kw: hdr[kw].value}
        for kw in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
                   "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept"):
            if kw in values:
                setattr(ds, kw, values[kw])
        items.append(_Item(f"{source.name} frame {k + 1}", ds, source.path, None, frame=offset + k,
                           source=source_index))
    return items


def _check_single_frame(it: _Item, uid: str) -> None:
    n = _n_frames(it.header)
    if n > 1:  # pragma: no cover - multi-frame inputs take the multi-frame path
        raise SeriesGeometryError(f"series {uid}: {it.name} is a multi-frame image ({n} frames); "
                                  f"only single-frame series are supported")
    _check_greyscale(it, uid)


def _check_greyscale(it: _Item, uid: str) -> None:
    spp = it.header.get("SamplesPerPixel", 1)
    if spp not in (None, "") and int(spp) != 1:
        raise SeriesGeometryError(f"series {uid}: {it.name} has SamplesPerPixel {spp}; a greyscale image is needed")


def _require(it: _Item, uid: str, keyword: str):
    value = it.header.get(keyword, None)
    if value is None or value == "":
        raise SeriesGeometryError(f"series {uid}: {it.name} has no {keyword}")
    return value


def _odd_one_out(values: list, items: list[_Item], uid: str, keyword: str, same) -> object:
    """The majority value of ``values``; raise naming the first file that disagrees with it."""
    keys = [v.tobytes() if isinstance(v, np.ndarray) else v for v in values]  # hashable, no formatting
    majority_key, _ = Counter(keys).most_common(1)[0]
    reference = values[keys.index(majority_key)]
    for it, v in zip(items, values):
        if not same(v, reference):
            n_ref = sum(1 for w in values if same(w, reference))
            raise SeriesGeometryError(
                f"series {uid}: {it.name} has {keyword} {_fmt(v)}, the other {n_ref} file(s) have {_fmt(reference)}")
    return reference


def _fmt(v) -> str:
    if isinstance(v, np.ndarray):
        return "[" + ", ".join(f"{x:.6g}" for x in v.tolist()) + "]"
    return str(v)


def _consistent_int(items: list[_Item], uid: str, keyword: str) -> int:
    values = [int(_require(it, uid, keyword)) for it in items]
    return int(_odd_one_out(values, items, uid, keyword, lambda a, b: a == b))  # type: ignore[arg-type]


def _consistent_pixel_spacing(items: list[_Item], uid: str) -> np.ndarray:
    values = []
    for it in items:
        ps = _require(it, uid, "PixelSpacing")
        arr = np.array([float(x) for x in ps], dtype=np.float64)
        if arr.shape != (2,) or not np.all(arr > 0):
            raise SeriesGeometryError(f"series {uid}: {it.name} has an invalid PixelSpacing {list(ps)}")
        values.append(arr)
    return _odd_one_out(values, items, uid, "PixelSpacing",  # type: ignore[return-value]
                        same_pixel_spacing)


def _consistent_orientation(items: list[_Item], uid: str) -> np.ndarray:
    values = []
    for it in items:
        iop = _require(it, uid, "ImageOrientationPatient")
        arr = np.array([float(x) for x in iop], dtype=np.float64)
        if arr.shape != (6,):
            raise SeriesGeometryError(f"series {uid}: {it.name} has an invalid ImageOrientationPatient {list(iop)}")
        if slice_normal(arr) is None:
            raise SeriesGeometryError(f"series {uid}: {it.name} has a degenerate ImageOrientationPatient {_fmt(arr)} "
                                      f"(zero or non-orthogonal direction cosines)")
        r, c = arr[:3], arr[3:]
        values.append(np.round(np.concatenate([r / np.linalg.norm(r), c / np.linalg.norm(c)]), 12))
    ref = _odd_one_out(values, items, uid, "ImageOrientationPatient",
                       same_orientation)
    r, c = ref[:3], ref[3:]  # type: ignore[index]
    c = c - np.dot(c, r) * r  # exact orthonormal pair
    return np.concatenate([r / np.linalg.norm(r), c / np.linalg.norm(c)])


def _position(it: _Item) -> np.ndarray | None:
    ipp = it.header.get("ImagePositionPatient", None)
    if ipp is None or ipp == "":
        return None
    try:
        arr = np.array([float(x) for x in ipp], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (3,) and np.all(np.isfinite(arr)) else None


def _instance_number_fallback(items: list[_Item], positions: list, normal: np.ndarray, uid: str, why: str,
                              warnings: list[str]):
    """Order by InstanceNumber when positions cannot be used; step along the normal by the nominal
    spacing (SpacingBetweenSlices, else SliceThickness, else 1 mm)."""
    numbers = []
    for it in items:
        num = it.header.get("InstanceNumber", None)
        if num is None or num == "":
            raise SeriesGeometryError(f"series {uid}: ImagePositionPatient {why} and {it.name} has no InstanceNumber: "
                                      f"cannot order the slices")
        numbers.append(int(num))
    dup = [n for n, k in Counter(numbers).items() if k > 1]
    if dup:
        raise SeriesGeometryError(f"series {uid}: ImagePositionPatient {why} and InstanceNumber {dup[0]} is used by "
                                  f"more than one file: cannot order the slices")
    order = np.argsort(numbers, kind="stable")
    items = [items[i] for i in order]
    hdr = items[0].header
    spacing = None
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        value = hdr.get(key, None)
        if value not in (None, "") and float(value) > 0:
            spacing = float(value)
            break
    if spacing is None:
        spacing = 1.0
        warnings.append(f"series {uid}: no SpacingBetweenSlices/SliceThickness; assuming 1 mm between slices")
    first = positions[order[0]]
    origin = first if first is not None else np.zeros(3)
    warnings.append(f"series {uid}: ImagePositionPatient {why}; slices ordered by InstanceNumber with "
                    f"{spacing:g} mm spacing along the normal (geometry is approximate)")
    return items, normal * spacing, np.asarray(origin, dtype=np.float64)


def _has_decoder(transfer_syntax) -> bool:
    """Whether pydicom has a usable decoder for ``transfer_syntax`` (False when unknown)."""
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(transfer_syntax).is_available)
    except Exception:  # unknown / unsupported transfer syntax
        return False


def _plugins(transfer_syntax) -> list[str]:
    """pydicom decoding plugins to try for ``transfer_syntax``, GDCM only when nothing else can:
    GDCM aborts the whole process (an uncaught C++ exception, not a Python error) on some corrupt
    JPEG 2000 codestreams, which pydicom would otherwise hand it first. ``[""]`` = pydicom's
    choice (native / unknown transfer syntaxes)."""
    try:
        from pydicom.pixels import get_decoder

        available = list(get_decoder(transfer_syntax).available_plugins)
    except Exception:  # native or unknown transfer syntax
        return [""]
    others = [p for p in available if p != "gdcm"]
    return others or available or [""]


def _decode(it: _Item, uid: str) -> np.ndarray:
    """``it``'s stored pixel values (reads the file when needed; fills ``it.full``). Compressed
    data is decoded with each available non-GDCM plugin in turn (GDCM when it is the only one)."""
    if it.full is None and it.parsed is not None:
        it.full = _with_rest_of_file(it.parsed)
    if it.full is None:
        it.full = pydicom.dcmread(it.path)  # type: ignore[arg-type]
    ds = it.full
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    native = _native_frame(ds, ts)
    if native is not None:
        return native
    plugins = _plugins(ts) if ts is not None else [""]
    try:
        for k, plugin in enumerate(plugins):
            try:
                if plugin:
                    ds.pixel_array_options(decoding_plugin=plugin)
                return ds.pixel_array
            except Exception:
                if k == len(plugins) - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover
    except Exception as exc:  # decoders raise many types
        ts_text = f"{ts.name} ({ts})" if ts is not None else "unknown transfer syntax"
        advice = ("a decoder for it is installed, so the pixel data is probably corrupt" if _has_decoder(ts) else
                  "Install a decoder (pylibjpeg / python-gdcm) or send the series uncompressed "
                  "(Explicit VR Little Endian)")
        raise PixelDecodeError(
            f"series {uid}: {it.name}: cannot decode pixel data with transfer syntax {ts_text}: "
            f"{type(exc).__name__}: {exc}. {advice}") from exc


_LITTLE_ENDIAN_NATIVE = frozenset({pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian})


def _native_frame(ds: Dataset, transfer_syntax) -> np.ndarray | None:
    """The stored values of a plain single-frame greyscale image, ``(Rows, Columns)`` uint8/uint16
    (int8/int16 when PixelRepresentation is 1), read straight from its uncompressed little-endian
    Pixel Data: what ``ds.pixel_array`` gives for such an image (no unused high bits to clear, no
    colour to convert), without pydicom's per-image decoder set-up. ``None`` for anything else
    (compressed, big endian, multi-frame, colour, BitsStored below BitsAllocated, too little pixel
    data...): the caller decodes it with pydicom, which also reports what is wrong."""
    if transfer_syntax not in _LITTLE_ENDIAN_NATIVE:
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        signed = int(ds.PixelRepresentation)
        if (bits not in (8, 16) or int(ds.BitsStored) != bits or signed not in (0, 1) or rows < 1 or cols < 1
                or int(ds.get("SamplesPerPixel", 1) or 1) != 1 or _n_frames(ds) != 1
                or str(ds.get("PhotometricInterpretation", "")).strip() not in ("MONOCHROME1", "MONOCHROME2")):
            return None
        data = ds.PixelData
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    dtype = np.dtype(f"{'<i' if signed else '<u'}{bits // 8}")
    n_bytes = rows * cols * dtype.itemsize
    if not isinstance(data, (bytes, bytearray)) or len(data) < n_bytes:
        return None
    return np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols).astype(dtype.newbyteorder("="))


def _with_rest_of_file(parsed: ParsedHeader) -> Dataset | None:
    """The scan's parsed header with the rest of its file (the Pixel Data element, and whatever
    follows it) read from where the header ended and added to it: the dataset ``dcmread(path)``
    gives, without parsing the header again. ``None`` (the caller then reads the whole file) when
    the file changed since the scan or the rest cannot be read."""
    from pydicom.filereader import read_dataset

    ds = parsed.dataset
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return None
    try:
        with open(parsed.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size != parsed.size or st.st_mtime_ns != parsed.mtime_ns:
                return None
            fh.seek(parsed.offset)
            rest = read_dataset(fh, implicit, little)
    except Exception:  # noqa: BLE001 - e.g. truncated pixel data: the whole file read says why
        return None
    for elem in rest.elements():  # raw elements, converted when first used, as a whole-file read leaves them
        ds[elem.tag] = elem
    return ds


def _rescale(pixels: np.ndarray, header: Dataset) -> np.ndarray:
    slope = header.get("RescaleSlope", None)
    intercept = header.get("RescaleIntercept", None)
    slope = 1.0 if slope in (None, "") else float(slope)
    intercept = 0.0 if intercept in (None, "") else float(intercept)
    if slope == 1.0 and intercept == 0.0 and pixels.dtype.kind in "iub" and pixels.dtype.itemsize <= 2:
        return pixels.astype(np.float32)  # the same values: every 8/16-bit integer is exact in float32
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


def _read_enhanced_pixels(sources: list[_Item], frames: list[_Item], uid: str, workers: int) -> np.ndarray:
    """All frames of the enhanced sources, ``(total frames, Rows, Columns) float32`` in the order
    of the concatenated sources (each in file frame order), each rescaled with its own (per-frame
    functional group) slope and intercept."""
    by_source: dict[int, list[_Item]] = {}
    for it in frames:
        by_source.setdefault(it.source, []).append(it)

    def one(index: int) -> tuple[int, np.ndarray]:
        src, its = sources[index], by_source.get(index, [])
        pixels = _decode(src, uid)
        n = _n_frames(src.header)
        if pixels.ndim == 2 and n == 1:
            pixels = pixels[None]
        if pixels.ndim != 3 or pixels.shape[0] != n:
            raise SeriesGeometryError(f"series {uid}: {src.name}: expected {n} greyscale frames, got pixel "
                                      f"shape {pixels.shape}")
        return index, pixels

    total = sum(_n_frames(s.header) for s in sources)
    out: np.ndarray | None = None
    decoded = [one(i) for i in read_ahead(_unread_paths(sources), workers, nbytes=None)]
    starts = np.cumsum([0] + [_n_frames(s.header) for s in sources])
    for index, pixels in decoded:
        if out is None:
            out = np.empty((total, *pixels.shape[1:]), dtype=np.float32)
        elif pixels.shape[1:] != out.shape[1:]:
            raise SeriesGeometryError(f"series {uid}: {sources[index].name}: frames of {pixels.shape[1:]}, other "
                                      f"instances {out.shape[1:]}")
        for it in by_source.get(index, []):
            out[it.frame] = _rescale(pixels[it.frame - starts[index]], it.header)
    assert out is not None
    return out


def _unread_paths(items: list[_Item]) -> list[Path | None]:
    """Per item, the file :func:`_decode` will read (``None`` when its pixel data is at hand)."""
    return [it.path if it.full is None else None for it in items]


def _read_pixels(items: list[_Item], uid: str, workers: int, *, into: np.ndarray,
                 rows_columns: tuple[int, int]) -> None:
    """Rescaled frames in ``items`` order written to ``into[k]`` (``into``: ``(n, Rows, Columns)``,
    e.g. a view of the volume, :func:`_frames_view`); fills ``item.full``. Decoded in this thread
    (pydicom's decoding is Python work), the files read ahead."""
    for i in read_ahead(_unread_paths(items), workers, nbytes=None):
        it = items[i]
        pixels = _decode(it, uid)
        if pixels.ndim != 2:
            raise SeriesGeometryError(f"series {uid}: {it.name}: expected one greyscale frame, got pixel shape "
                                      f"{pixels.shape}")
        if pixels.shape != rows_columns:
            raise SeriesGeometryError(f"series {uid}: {it.name}: decoded frame is {pixels.shape}, headers say "
                                      f"{rows_columns}")
        into[i] = _rescale(pixels, it.full)  # type: ignore[arg-type]


def _oriented_shape(shape: tuple[int, ...], ornt: np.ndarray) -> tuple[int, ...]:
    """The shape ``apply_orientation(array of shape, ornt)`` has (input axis ``i`` becomes output axis
    ``ornt[i, 0]``)."""
    out = [0] * len(shape)
    for i, n in enumerate(shape):
        out[int(ornt[i, 0])] = n
    return tuple(out)


def _frames_view(array: np.ndarray, ornt: np.ndarray, stack_shape: tuple[int, int, int]) -> np.ndarray:
    """The ``(n, Rows, Columns)`` view of ``array`` (``apply_orientation`` of the ``(Columns, Rows, n)``
    frame stack by ``ornt``) through which frame ``k`` is written in place: the inverse flips and
    axis order, no copy."""
    inverse = np.zeros_like(np.asarray(ornt, dtype=float))
    for i, (axis, flip) in enumerate(np.asarray(ornt)):
        inverse[int(axis)] = (i, flip)
    view = apply_orientation(array, inverse)
    if view.shape != tuple(stack_shape) or not np.shares_memory(view, array):  # pragma: no cover - defensive
        raise AssertionError(f"frame view {view.shape} of the volume is not the frame stack {stack_shape}")
    return view.transpose(2, 1, 0)
