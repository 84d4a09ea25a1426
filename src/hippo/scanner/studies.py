"""Whole emulated studies: the HippoCrop input series with distractor series (optionally nested with
non-DICOM junk), and a brain study around a real whole-head T1 (3D MPRAGE, localizers, T2, FLAIR, a
reformat)."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from hippo.data.nifti import labels_to_uint8, load_nifti
from hippo.preprocessing import label_volumes_mm3
from hippo.fileio import write_bytes_atomic
from hippo.scanner.series_writer import MANUFACTURER, FileNames, write_series
from hippo.scanner.study_info import StudyInfo


#: Series descriptions of the distractor series written by :func:`write_study`.
DISTRACTOR_DESCRIPTIONS = ("T1 MPRAGE full brain", "FLAIR", "T2 TSE")


# ----------------------------------------------------------------------------------------------
# A study: the crop and distractors


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    cth, sth = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = cth, -sth, sth, cth
    return rot


def _grid_affine(shape: Sequence[int], spacing: Sequence[float], center_ras: np.ndarray,
                 rot: np.ndarray) -> np.ndarray:
    """voxel -> RAS affine of a grid of ``shape``/``spacing`` (mm) rotated by ``rot``, centred at ``center_ras``."""
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([float(s) for s in spacing])
    aff[:3, 3] = np.asarray(center_ras, float) - aff[:3, :3] @ ((np.asarray(shape, float) - 1) / 2.0)
    return aff


def _synthetic_head(shape: Sequence[int], affine: np.ndarray, brain_center: np.ndarray, contrast: str,
                    rng: np.random.Generator) -> np.ndarray:
    """A smooth head-like volume ``shape`` (float32, arbitrary MR units) sampled on ``affine``'s grid:
    an ellipsoid "brain" with a white-matter core and ventricles, contrast per sequence."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)
    xyz = idx @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32) - brain_center.astype(np.float32)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    radii = np.array([30.0, 36.0, 28.0], np.float32)
    head = (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2
    vent = ((np.abs(x) - 6) / 4) ** 2 + (y / 12) ** 2 + ((z - 4) / 7) ** 2
    tissue = {"T1": (180.0, 520.0, 780.0, 60.0), "FLAIR": (90.0, 560.0, 430.0, 150.0),
              "T2": (900.0, 420.0, 300.0, 120.0)}[contrast]  # (CSF, grey, white, scalp)
    csf, grey, white, scalp = tissue
    out = np.where(head < 1.0, np.where(head < 0.55, white, grey), np.where(head < 1.25, scalp, 0.0))
    out = np.where(vent < 1.0, csf, out).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    wobble = 1.0 + 0.08 * np.sin(x / 9 + phase[0]) * np.sin(y / 11 + phase[1]) * np.sin(z / 7 + phase[2])
    out = out * wobble + rng.normal(0, 4.0, out.shape).astype(np.float32) * (out > 0)
    return np.clip(out, 0, None).astype(np.float32)


_SEQUENCE_HEADERS: dict[str, dict[str, Any]] = {
    "T1": dict(ScanningSequence=["GR", "IR"], SequenceVariant=["SP", "MP"], MRAcquisitionType="3D",
               RepetitionTime="2300", EchoTime="2.98", InversionTime="900", FlipAngle="9", SequenceName="*tfl3d1"),
    "FLAIR": dict(ScanningSequence=["SE", "IR"], SequenceVariant=["SK", "SP", "MP"], MRAcquisitionType="2D",
                  RepetitionTime="9000", EchoTime="81", InversionTime="2500", FlipAngle="150",
                  SequenceName="*tir2d1"),
    "T2": dict(ScanningSequence=["SE"], SequenceVariant=["SK", "SP"], MRAcquisitionType="2D",
               RepetitionTime="6000", EchoTime="100", FlipAngle="150", SequenceName="*tse2d1", EchoTrainLength=15),
}


def write_study(
    image_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    label_path: str | os.PathLike | None = None,
    distractors: bool = True,
    seed: int | None = None,
    nested: bool = False,
    study: StudyInfo | None = None,
) -> dict[str, Any]:
    """Write an emulated MR study: the "HippoCrop" series from a NIfTI image, plus distractors.

    Args:
        image_path: the NIfTI image (e.g. a Decathlon ``hippocampus_XXX.nii.gz`` crop), written
            with its own affine as series "HippoCrop" (axial-like slices, voxel axis 2).
        out_dir: destination folder (created).
        label_path: optional NIfTI label of the image (``{0, 1, 2}``): not written as DICOM; its
            expected volumes in mm³ go into the manifest.
        distractors: also write "T1 MPRAGE full brain" (64x64x40 at 1 mm, sagittal and tilted),
            "FLAIR" (48x48x12, axial 1.2x1.2x4 mm, integer data) and "T2 TSE" (48x10x48, coronal)
            synthetic series, same study and frame of reference.
        seed: makes the patient/study attributes, UIDs, file names and distractor noise deterministic.
        nested: write ``<out>/<PatientID>/<StudyDate>_<Accession>/<series folder>/...`` (one
            series a level deeper, file names per series "instance"/"uid"/"random") with non-DICOM
            junk (``README.txt``, ``notes.txt``, ``.DS_Store``, ``Thumbs.db``, a ``broken.dcm``
            that is not DICOM); otherwise every instance flat in ``out_dir`` named by SOPInstanceUID.
        study: patient/study attributes (default ``StudyInfo(seed=seed)``).

    Returns:
        Manifest (JSON-serialisable): ``study_instance_uid``, ``frame_of_reference_uid``,
        ``patient_id``, ``patient_name``, ``accession_number``, ``out_dir``, ``image``, ``label``,
        ``series_uids`` (description -> UID), ``files`` (description -> list of paths),
        ``series`` (description -> {series_instance_uid, series_number, n_instances, shape,
        spacing_mm, slice_axis, folder}), ``junk_files``, ``label_volumes_mm3`` (``None`` without a
        label; else ``anterior_mm3``/``posterior_mm3``/``total_mm3``), ``label_spacing_mm``.

    Raises:
        hippo.data.nifti.CaseError: unreadable NIfTI, or a label of another shape / invalid values.
    """
    out_dir = Path(out_dir)
    study = study or StudyInfo(seed=seed)
    image, spacing, affine = load_nifti(image_path)
    rng = np.random.default_rng(seed)

    volumes_mm3 = None
    if label_path is not None:
        label, label_spacing, _ = load_nifti(label_path)
        if label.shape != image.shape:
            from hippo.data.nifti import CaseError

            raise CaseError(label_path, f"label shape {label.shape} differs from image shape {image.shape}")
        volumes_mm3 = label_volumes_mm3(labels_to_uint8(label, label_path), label_spacing)

    if nested:
        study_dir = out_dir / str(study.patient_id) / f"{study.study_date}_{study.accession_number}"
    else:
        study_dir = out_dir

    # (description, volume, affine, slice_axis, series number, folder, file names, sequence)
    plans: list[tuple[str, np.ndarray, np.ndarray, int, int, str, FileNames, str]] = []
    crop_center = (affine @ np.append((np.asarray(image.shape, float) - 1) / 2.0, 1.0))[:3]
    if distractors:
        # the crop is a hippocampus: put the "brain" centre medial-superior of it
        brain_center = crop_center + np.array([-22.0, 8.0, 18.0])
        t1_aff = _grid_affine((40, 64, 64), (1.0, 1.0, 1.0), brain_center, _rotation(0, 10.0))
        flair_aff = _grid_affine((48, 48, 12), (1.25, 1.25, 4.0), brain_center + [0, 0, 2.0], _rotation(2, -5.0))
        t2_aff = _grid_affine((48, 10, 48), (1.2, 3.0, 1.2), brain_center + [0, -4.0, 0], np.eye(3))
        t1 = _synthetic_head((40, 64, 64), t1_aff, brain_center, "T1", rng)
        flair = np.round(_synthetic_head((48, 48, 12), flair_aff, brain_center, "FLAIR", rng)).astype(np.int16)
        t2 = _synthetic_head((48, 10, 48), t2_aff, brain_center, "T2", rng)
        plans += [
            ("T1 MPRAGE full brain", t1, t1_aff, 0, 2, "S002_T1_MPRAGE", "instance", "T1"),
            ("FLAIR", flair, flair_aff, 2, 3, "S003_FLAIR/EXPORT/0001", "random", "FLAIR"),
            ("T2 TSE", t2, t2_aff, 1, 4, "S004_T2_TSE", "uid", "T2"),
        ]
    plans.append(("HippoCrop", image, affine, 2, 5, "S005_HippoCrop", "instance", "T1"))

    manifest: dict[str, Any] = {
        "study_instance_uid": study.study_instance_uid,
        "frame_of_reference_uid": study.frame_of_reference_uid,
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "accession_number": study.accession_number,
        "study": asdict(study),
        "out_dir": str(out_dir),
        "image": str(image_path),
        "label": None if label_path is None else str(label_path),
        "series_uids": {},
        "files": {},
        "series": {},
        "junk_files": [],
        "label_volumes_mm3": volumes_mm3,
        "label_spacing_mm": list(spacing) if volumes_mm3 is not None else None,
    }
    base_time = _dt.datetime.strptime(str(study.study_time), "%H%M%S")
    for i, (desc, vol, aff, axis, number, folder, names, seq) in enumerate(plans):
        series_uid = study._uid("series", desc, number)
        target = study_dir / folder if nested else study_dir
        series_time = (base_time + _dt.timedelta(minutes=4 * (i + 1))).strftime("%H%M%S")
        paths = write_series(vol, aff, target, study=study, series_description=desc, series_number=number,
                             slice_axis=axis, file_names=names if nested else "uid",
                             series_instance_uid=series_uid, series_time=series_time,
                             extra=_SEQUENCE_HEADERS[seq])
        zooms = np.linalg.norm(np.asarray(aff)[:3, :3], axis=0)
        manifest["series_uids"][desc] = series_uid
        manifest["files"][desc] = [str(p) for p in paths]
        manifest["series"][desc] = {
            "series_instance_uid": series_uid, "series_number": number, "n_instances": len(paths),
            "shape": list(vol.shape), "spacing_mm": [float(z) for z in zooms], "slice_axis": axis,
            "folder": str(target),
        }
    if nested:
        manifest["junk_files"] = [str(p) for p in _write_junk(out_dir, study_dir, study)]
    return manifest


#: Whole-head study (:func:`write_wholehead_study`): description of the T1 series per orientation
WHOLEHEAD_T1_DESCRIPTIONS = {"sagittal": "t1_mprage_sag", "axial": "t1_mprage_tra"}
_WHOLEHEAD_SLICE_AXIS = {"sagittal": 0, "axial": 2}


def _subsample(volume: np.ndarray, affine: np.ndarray, steps: Sequence[int],
               starts: Sequence[int] = (0, 0, 0), counts: Sequence[int | None] = (None, None, None)
               ) -> tuple[np.ndarray, np.ndarray]:
    """Every ``steps[i]``-th voxel from ``starts[i]`` (at most ``counts[i]``) and the matching affine."""
    index = tuple(slice(b, None if n is None else b + n * k, k) for b, k, n in zip(starts, steps, counts))
    scale = np.diag([float(k) for k in steps] + [1.0])
    scale[:3, 3] = starts
    return np.ascontiguousarray(volume[index]), np.asarray(affine, float) @ scale


def write_wholehead_study(
    scan_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    orientation: Literal["sagittal", "axial"] = "sagittal",
    t1: bool = True,
    distractors: bool = True,
    localizer: bool = True,
    seed: int | None = None,
    study: StudyInfo | None = None,
    t1_layout: Mapping[str, Any] | None = None,
    t1_description: str | None = None,
    t1_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an emulated brain MR study around a real whole-head T1 (NIfTI or MGZ): the T1 as a 3D
    MPRAGE series ("t1_mprage_sag" or "t1_mprage_tra", MRAcquisitionType 3D, its own voxels and
    geometry), plus what a real study holds beside it.

    Args:
        scan_path: the whole-head T1 (read with :func:`hippo.scan_io.read_scan`: closest canonical RAS).
        out_dir: destination folder (created); every instance flat, named by SOPInstanceUID.
        orientation: slices of the T1 series: ``"sagittal"`` (voxel axis 0) or ``"axial"`` (axis 2).
        t1: write the T1 series (``False``: a study without it, e.g. a localizer only).
        distractors: also write "t2_tse_tra" (2D, every 2nd voxel in-plane, 4 slices thick),
            "t2_flair_tra" (2D, 5 slices thick) and "t1_mprage_tra_MPR" (a DERIVED\\SECONDARY\\MPR
            reformat, every 3rd slice), all sampled from the scan.
        localizer: write three 3-slice localizer series ("localizer", 2D; sagittal, coronal, axial).
        seed: deterministic patient/study attributes and UIDs.
        study: patient/study attributes (default ``StudyInfo(seed=seed)``).
        t1_layout: how the T1 series is stored, as :func:`write_series` keywords: ``layout``
            (``"classic"``, ``"enhanced"``, ``"legacy"``), ``frames_per_instance``,
            ``functional_groups`` (``"shared"`` / ``"per_frame"``); default classic.
        t1_description: the T1's SeriesDescription and ProtocolName (default by orientation).
        t1_extra: more T1 header attributes (e.g. ``{"ContrastBolusAgent": "Gadovist"}``).

    Returns:
        Manifest: ``study_instance_uid``, ``scan``, ``t1_description``, ``series`` (description ->
        {series_instance_uid, series_number, n_instances, shape, slice_axis}), ``files``
        (description -> paths).

    Raises:
        hippo.scan_io.NotAScanError: the scan cannot be read; ValueError: a bad ``orientation``.
    """
    from hippo.scan_io import read_scan

    if orientation not in _WHOLEHEAD_SLICE_AXIS:
        raise ValueError(f"write_wholehead_study: orientation must be 'sagittal' or 'axial', got {orientation!r}")
    out_dir = Path(out_dir)
    study = study or StudyInfo(seed=seed, study_description="MRI BRAIN")
    scan = read_scan(scan_path)
    image, affine = scan.array, scan.affine
    shape = np.asarray(image.shape)
    t1_description = t1_description or WHOLEHEAD_T1_DESCRIPTIONS[orientation]
    t1_headers = dict(_SEQUENCE_HEADERS["T1"], ProtocolName=t1_description, **dict(t1_extra or {}))
    layouts = {t1_description: dict(t1_layout or {})} if t1 else {}
    # (description, volume, affine, slice_axis, headers)
    plans: list[tuple[str, np.ndarray, np.ndarray, int, dict[str, Any]]] = []
    if localizer:
        loc_headers = dict(ScanningSequence=["GR"], SequenceVariant=["SP"], MRAcquisitionType="2D",
                           RepetitionTime="8.6", EchoTime="4", FlipAngle="20", SequenceName="*fl2d1",
                           ProtocolName="localizer")
        for axis, name in ((0, "sag"), (1, "cor"), (2, "tra")):
            step = max(1, int(round(10.0 / scan.spacing[axis])))   # 3 slices 10 mm apart at the centre
            starts, steps, counts = [0, 0, 0], [2, 2, 2], [None, None, None]
            starts[axis], steps[axis], counts[axis] = int(shape[axis] // 2 - step), step, 3
            vol, aff = _subsample(image, affine, steps, starts, counts)
            plans.append((f"localizer_{name}", vol, aff, axis, loc_headers))
    if t1:
        plans.append((t1_description, image, affine, _WHOLEHEAD_SLICE_AXIS[orientation], t1_headers))
    if distractors:
        t2, t2_aff = _subsample(image, affine, (2, 2, 4))
        flair, flair_aff = _subsample(image, affine, (2, 2, 5))
        mpr, mpr_aff = _subsample(image, affine, (1, 1, 3))
        plans += [
            ("t2_tse_tra", t2.max() - t2, t2_aff, 2, dict(_SEQUENCE_HEADERS["T2"], ProtocolName="t2_tse_tra")),
            ("t2_flair_tra", flair, flair_aff, 2, dict(_SEQUENCE_HEADERS["FLAIR"], ProtocolName="t2_flair_tra")),
            ("t1_mprage_tra_MPR", mpr, mpr_aff, 2,
             dict(t1_headers, ImageType=["DERIVED", "SECONDARY", "MPR"], ProtocolName=t1_description)),
        ]
    manifest: dict[str, Any] = {"study_instance_uid": study.study_instance_uid, "patient_id": study.patient_id,
                                "scan": str(scan_path), "out_dir": str(out_dir), "t1_description": t1_description,
                                "orientation": orientation, "series": {}, "files": {}}
    base_time = _dt.datetime.strptime(str(study.study_time), "%H%M%S")
    for i, (desc, vol, aff, axis, headers) in enumerate(plans):
        number = i + 1
        series_uid = study._uid("series", desc, number)
        series_time = (base_time + _dt.timedelta(minutes=3 * i)).strftime("%H%M%S")
        paths = write_series(vol, aff, out_dir, study=study, series_description=desc, series_number=number,
                             slice_axis=axis, file_names="uid", series_instance_uid=series_uid,
                             series_time=series_time, extra=headers, **layouts.get(desc, {}))
        manifest["files"][desc] = [str(p) for p in paths]
        manifest["series"][desc] = {"series_instance_uid": series_uid, "series_number": number,
                                    "n_instances": len(paths), "shape": list(vol.shape), "slice_axis": axis}
    return manifest


def _write_junk(out_dir: Path, study_dir: Path, study: StudyInfo) -> list[Path]:
    """Non-DICOM files an export folder typically holds (and one fake ``.dcm``)."""
    junk = {
        out_dir / "README.txt": (f"Export of study {study.study_instance_uid} by {MANUFACTURER}.\n"
                                 f"No DICOMDIR: walk the folders.\n").encode(),
        study_dir / "notes.txt": b"Scanner notes: patient cooperative, no motion.\n",
        study_dir / ".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(64),
        study_dir / "S002_T1_MPRAGE" / "Thumbs.db": bytes(128),
        study_dir / "S005_HippoCrop" / "broken.dcm": b"this is not a DICOM file\n",
    }
    for path, data in junk.items():
        write_bytes_atomic(path, data)
    return list(junk)
