"""Scanner emulator: a NIfTI volume becomes a DICOM MR study; the study can be sent by C-STORE.

What it is for: end-to-end tests and demonstrations of the deployment (ingest -> volume -> model
-> results -> PACS) without a scanner. It writes

* :func:`write_series`: one volume (with its voxel->RAS affine) as a single-frame MR Image Storage
  series with exact geometry (ImagePositionPatient / ImageOrientationPatient / PixelSpacing /
  SliceThickness / SpacingBetweenSlices derived from the affine, in LPS), so
  :func:`hippo.dicom.volume.load_series` gives the same array (after reorientation to closest
  canonical RAS) and the same affine;
* :func:`write_study`: the "HippoCrop" input series plus distractor series ("T1 MPRAGE full
  brain", "FLAIR", "T2 TSE") of the same study, optionally in nested folders with non-DICOM junk;
* :func:`write_wholehead_study`: a brain study around a real whole-head T1 (NIfTI or MGZ): the T1
  as a 3D MPRAGE ("t1_mprage_sag" / "t1_mprage_tra"), localizers, 2D T2 and FLAIR, a reformat;
* :func:`send_study`: C-STORE of every DICOM file of a folder over one association.

Command line::

    python -m hippo.scanner write --nifti X.nii.gz --out DIR [--label L.nii.gz] [--no-distractors]
                                  [--seed N] [--nested] [--manifest M.json]
    python -m hippo.scanner write-wholehead --scan T1.nii.gz|T1.mgz --out DIR [--orientation axial]
                                            [--no-t1] [--no-distractors] [--no-localizer] [--seed N]
    python -m hippo.scanner send --dir DIR --host H --port P [--called-ae A] [--calling-ae B]

Units: positions and spacings in mm; affines map voxel indices to RAS mm (NIfTI) or LPS mm
(DICOM); ``RAS = diag(-1, -1, 1) @ LPS``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import random
import socket
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from hippo.data.nifti import labels_to_uint8, load_nifti
from hippo.preprocessing import label_volumes_mm3
from hippo.fileio import write_bytes_atomic, write_json_atomic

__all__ = [
    "StudyInfo",
    "ScannerSendError",
    "write_series",
    "write_study",
    "write_wholehead_study",
    "send_study",
    "find_dicom_files",
    "main",
    "MANUFACTURER",
    "DISTRACTOR_DESCRIPTIONS",
]

MANUFACTURER = "HippoVolume scanner emulator"
#: Series descriptions of the distractor series written by :func:`write_study`.
DISTRACTOR_DESCRIPTIONS = ("T1 MPRAGE full brain", "FLAIR", "T2 TSE")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SOP_CLASS = {"MR": MRImageStorage, "CT": CTImageStorage}
_FIRST_NAMES = ("Anna", "Ben", "Clara", "David", "Eva", "Frank", "Greta", "Hans", "Ines", "Jon", "Karin", "Lars")
_LAST_NAMES = ("Hippo", "Campus", "Dentate", "Subiculum", "Fornix", "Ammon", "Entorhinal", "Parahippo")

FileNames = Literal["instance", "uid", "random"]


# ----------------------------------------------------------------------------------------------
# Study information


@dataclass
class StudyInfo:
    """Patient and study attributes shared by every series of one emulated study.

    Every field left ``None`` is generated in ``__post_init__``; with ``seed`` set, the generated
    values (names, dates, UIDs, and the UIDs :func:`write_series` derives from them) are
    deterministic. ``patient_age`` is a DICOM AS string such as ``"072Y"`` consistent with
    ``patient_birth_date`` and ``study_date`` (``YYYYMMDD``).
    """

    patient_name: str | None = None
    patient_id: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    patient_age: str | None = None
    study_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_id: str | None = None
    study_description: str = "MRI BRAIN HIPPOCAMPUS"
    referring_physician_name: str = "Referrer^Rita"
    institution_name: str = "HippoVolume Test Hospital"
    station_name: str = "HIPPOSCANNER"
    magnetic_field_strength: float = 3.0
    seed: int | None = None

    def __post_init__(self) -> None:
        rng = random.Random(self.seed) if self.seed is not None else random.Random(uuid.uuid4().int)
        if self.patient_sex is None:
            self.patient_sex = rng.choice(("F", "M"))
        if self.patient_name is None:
            self.patient_name = f"{rng.choice(_LAST_NAMES)}^{rng.choice(_FIRST_NAMES)}"
        if self.patient_id is None:
            self.patient_id = f"HV{rng.randrange(10**6):06d}"
        if self.study_date is None:
            if self.seed is None:
                day = _dt.date.today()
            else:
                day = _dt.date(2024, 1, 1) + _dt.timedelta(days=rng.randrange(365))
            self.study_date = day.strftime("%Y%m%d")
        if self.study_time is None:
            self.study_time = f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
        study_day = _dt.datetime.strptime(self.study_date, "%Y%m%d").date()
        if self.patient_birth_date is None:
            years = int(self.patient_age[:3]) if self.patient_age else rng.randrange(55, 86)
            birth = _add_years(study_day, -years) - _dt.timedelta(days=rng.randrange(1, 360))
            self.patient_birth_date = birth.strftime("%Y%m%d")
        if self.patient_age is None:
            birth = _dt.datetime.strptime(self.patient_birth_date, "%Y%m%d").date()
            years = study_day.year - birth.year - ((study_day.month, study_day.day) < (birth.month, birth.day))
            self.patient_age = f"{max(0, min(years, 999)):03d}Y"
        if self.accession_number is None:
            self.accession_number = f"ACC{rng.randrange(10**8):08d}"
        if self.study_id is None:
            self.study_id = str(rng.randrange(1, 10**5))
        if self.study_instance_uid is None:
            self.study_instance_uid = self._uid("study")
        if self.frame_of_reference_uid is None:
            self.frame_of_reference_uid = self._uid("frame-of-reference")

    def _uid(self, *parts: object) -> str:
        """A new UID; deterministic from ``seed`` (and the study UID) plus ``parts`` when seeded."""
        if self.seed is None:
            return generate_uid()
        return generate_uid(entropy_srcs=["hippo.scanner", str(self.seed), str(self.study_instance_uid),
                                          *map(str, parts)])


def _add_years(day: _dt.date, years: int) -> _dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


# ----------------------------------------------------------------------------------------------
# One series


def write_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    study: StudyInfo,
    series_description: str = "HippoCrop",
    series_number: int = 1,
    modality: str = "MR",
    slice_axis: int = 2,
    file_names: FileNames = "instance",
    series_instance_uid: str | None = None,
    series_time: str | None = None,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write a 3D volume as a single-frame DICOM image series (one file per slice).

    Args:
        volume: ``(X, Y, Z)`` array (any integer or float dtype, finite). Integer-valued data whose
            range fits 16 bits is stored exactly (uint16, or int16 for negatives, or uint16 with an
            integer RescaleIntercept); other data is stored as uint16 with RescaleSlope/Intercept
            chosen so values round trip within ``range / 131070`` (far below 1e-3 of the range).
        affine: ``(4, 4)`` voxel index -> RAS mm (the NIfTI affine). Its two in-plane axes must be
            orthogonal; the slice axis may be oblique to them (a sheared stack is written as such).
        out_dir: folder for the files (created).
        study: patient/study attributes (:class:`StudyInfo`), shared by the study's series.
        series_description: SeriesDescription.
        series_number: SeriesNumber.
        modality: ``"MR"`` (MR Image Storage) or ``"CT"`` (CT Image Storage).
        slice_axis: the voxel axis of ``volume`` that becomes the DICOM slice direction
            (2 = axial-like for a RAS volume). The in-plane axes are assigned and flipped so that the
            frames display in the radiological convention (row direction towards patient left, or
            posterior for sagittal planes; column direction posterior or feet).
        file_names: ``"instance"`` (``IM00001.dcm``...), ``"uid"`` (``<SOPInstanceUID>.dcm``) or
            ``"random"`` (random hex, no extension, like many PACS exports).
        series_instance_uid: SeriesInstanceUID (generated when ``None``).
        series_time: SeriesTime ``HHMMSS`` (the study time when ``None``).
        extra: further header attributes by keyword (e.g. ``{"RepetitionTime": 2300}``).

    Returns:
        The written paths, in InstanceNumber order (ascending position along the slice normal).

    Raises:
        ValueError: not 3D, non-finite values, a bad ``slice_axis``/``modality``/``file_names``,
            an affine whose in-plane axes are not orthogonal.
    """
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"write_series: expected a 3D volume, got shape {volume.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"write_series: expected a 4x4 affine, got shape {affine.shape}")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"write_series: slice_axis must be 0, 1 or 2, got {slice_axis}")
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise ValueError(f"write_series: modality must be one of {sorted(_SOP_CLASS)}, got {modality!r}")
    if file_names not in ("instance", "uid", "random"):
        raise ValueError(f"write_series: file_names must be 'instance', 'uid' or 'random', got {file_names!r}")
    if np.issubdtype(volume.dtype, np.floating) and not np.isfinite(volume).all():
        raise ValueError("write_series: the volume holds NaN or infinite values")

    stack, aff_stack = _to_stack(volume, affine, slice_axis)  # (Columns, Rows, n), voxel -> LPS
    stored, slope, intercept, signed = _choose_storage(stack)
    n_cols, n_rows, n_slices = stack.shape
    r_vec, c_vec, step = aff_stack[:3, 0], aff_stack[:3, 1], aff_stack[:3, 2]
    col_spacing, row_spacing = float(np.linalg.norm(r_vec)), float(np.linalg.norm(c_vec))
    r_dir, c_dir = r_vec / col_spacing, c_vec / row_spacing
    normal = np.cross(r_dir, c_dir)
    slice_spacing = float(np.dot(step, normal))
    real = stored.astype(np.float64) * slope + intercept
    lo, hi = np.percentile(real, [1.0, 99.0]) if real.size else (0.0, 1.0)
    window_center, window_width = (lo + hi) / 2.0, max(hi - lo, 1.0)

    series_uid = series_instance_uid or study._uid("series", series_description, series_number)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name_rng = random.Random(series_uid) if study.seed is not None else random.Random(uuid.uuid4().int)
    paths: list[Path] = []
    for k in range(n_slices):
        sop_uid = study._uid("instance", series_uid, k) if study.seed is not None else generate_uid()
        position = aff_stack[:3, 3] + k * step
        ds = _slice_dataset(
            study=study, modality=modality, series_uid=series_uid, sop_uid=sop_uid,
            series_description=series_description, series_number=series_number,
            series_time=series_time or study.study_time, instance_number=k + 1,
            position=position, iop=np.concatenate([r_dir, c_dir]), row_spacing=row_spacing,
            col_spacing=col_spacing, slice_spacing=slice_spacing, slice_location=float(np.dot(position, normal)),
            rows=n_rows, columns=n_cols, signed=signed, slope=slope, intercept=intercept,
            window=(window_center, window_width), extra=extra,
        )
        ds.ImagesInAcquisition = n_slices  # as scanners write it: how many images make the series whole
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # frame (Rows, Columns)
        if file_names == "instance":
            name = f"IM{k + 1:05d}.dcm"
        elif file_names == "uid":
            name = f"{sop_uid}.dcm"
        else:
            name = f"{name_rng.getrandbits(64):016x}"
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        paths.append(write_bytes_atomic(out_dir / name, buf.getvalue()))
    return paths


def _to_stack(volume: np.ndarray, affine_ras: np.ndarray, slice_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Rearrange ``volume`` into the DICOM stack ``(Columns, Rows, n_slices)`` and its voxel->LPS affine.

    The in-plane voxel axes are assigned to columns/rows and flipped to be closest to the display
    convention of the plane the slice axis points along; slices are ordered by ascending position
    along the normal ``r x c``.
    """
    aff_lps = _LPS_TO_RAS @ affine_ras
    dirs = aff_lps[:3, :3] / np.linalg.norm(aff_lps[:3, :3], axis=0)
    if not np.all(np.isfinite(dirs)):
        raise ValueError("write_series: the affine has a zero-length axis")
    main = int(np.argmax(np.abs(dirs[:, slice_axis])))
    # (target row direction r, target column direction c) in LPS for sagittal/coronal/axial planes
    targets = {0: ((0, 1, 0), (0, 0, -1)), 1: ((1, 0, 0), (0, 0, -1)), 2: ((1, 0, 0), (0, 1, 0))}[main]
    t_r, t_c = np.array(targets[0], float), np.array(targets[1], float)
    a, b = [ax for ax in range(3) if ax != slice_axis]
    col_ax, row_ax = (a, b) if abs(dirs[:, a] @ t_r) + abs(dirs[:, b] @ t_c) >= abs(dirs[:, b] @ t_r) + abs(dirs[:, a] @ t_c) \
        else (b, a)
    if abs(float(dirs[:, col_ax] @ dirs[:, row_ax])) > 1e-6:
        raise ValueError("write_series: the affine's in-plane axes are not orthogonal; DICOM "
                         "ImageOrientationPatient cannot represent it")
    flip_col = float(dirs[:, col_ax] @ t_r) < 0
    flip_row = float(dirs[:, row_ax] @ t_c) < 0
    r = dirs[:, col_ax] * (-1 if flip_col else 1)
    c = dirs[:, row_ax] * (-1 if flip_row else 1)
    flip_slice = float(dirs[:, slice_axis] @ np.cross(r, c)) < 0
    axes, flips = (col_ax, row_ax, slice_axis), (flip_col, flip_row, flip_slice)
    stack = np.transpose(volume, axes)
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for t, (ax, flip) in enumerate(zip(axes, flips)):
        if flip:
            stack = np.flip(stack, axis=t)
            m[ax, t], m[ax, 3] = -1.0, volume.shape[ax] - 1
        else:
            m[ax, t] = 1.0
    return np.ascontiguousarray(stack), aff_lps @ m


def _ds_value(x: float) -> float:
    """A float as it will read back from a DS string (at most 16 characters)."""
    x = float(x)
    if abs(x) < 1e-12:
        return 0.0
    return float(format_number_as_ds(x))


def _ds_str(x: float) -> str:
    x = float(x)
    return "0" if abs(x) < 1e-12 else format_number_as_ds(x)


def _choose_storage(stack: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
    """Stored 16-bit values and ``(slope, intercept, signed)`` so that ``stored * slope + intercept``
    reproduces ``stack``: exactly for integer-valued data with a 16-bit range, within
    ``range / 131070`` otherwise."""
    values = stack.astype(np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    integral = np.issubdtype(stack.dtype, np.integer) or bool(np.array_equal(values, np.round(values)))
    if integral:
        if lo >= 0 and hi <= 65535:
            return values.astype(np.uint16), 1.0, 0.0, False
        if lo >= -32768 and hi <= 32767:
            return values.astype(np.int16), 1.0, 0.0, True
        if hi - lo <= 65535:
            return (values - lo).astype(np.uint16), 1.0, lo, False
    intercept = _ds_value(lo)
    slope = _ds_value((hi - lo) / 65535.0) if hi > lo else 1.0
    if slope <= 0:
        slope = 1.0
    stored = np.clip(np.round((values - intercept) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, intercept, False


def _slice_dataset(*, study: StudyInfo, modality: str, series_uid: str, sop_uid: str, series_description: str,
                   series_number: int, series_time: str, instance_number: int, position: np.ndarray,
                   iop: np.ndarray, row_spacing: float, col_spacing: float, slice_spacing: float,
                   slice_location: float, rows: int, columns: int, signed: bool, slope: float, intercept: float,
                   window: tuple[float, float], extra: dict[str, Any] | None) -> Dataset:
    """The header of one slice (everything but PixelData)."""
    sop_class = _SOP_CLASS[modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "HIPPO_SCANNER"

    ds = Dataset()
    ds.file_meta = meta
    # SOP common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = series_time
    # patient
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.PatientAge = study.patient_age
    # study
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.study_description
    ds.ReferringPhysicianName = study.referring_physician_name
    # series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description
    ds.SeriesDate = study.study_date
    ds.SeriesTime = series_time
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.ProtocolName = series_description
    # equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "HippoScan 3T"
    ds.InstitutionName = study.institution_name
    ds.StationName = study.station_name
    ds.SoftwareVersions = "hippo.scanner 0.1"
    ds.DeviceSerialNumber = "0001"
    # frame of reference
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # acquisition
    if modality == "MR":
        ds.ScanningSequence = ["GR", "IR"]
        ds.SequenceVariant = ["SP", "MP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = "2300"
        ds.EchoTime = "2.98"
        ds.EchoTrainLength = 1
        ds.FlipAngle = "9"
        ds.ImagingFrequency = _ds_str(42.577478 * float(study.magnetic_field_strength))
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = _ds_str(study.magnetic_field_strength)
    else:
        ds.KVP = ""
        ds.RescaleType = "HU"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = series_time
    ds.ContentDate = study.study_date
    ds.ContentTime = series_time
    # image plane
    ds.InstanceNumber = int(instance_number)
    ds.PatientOrientation = ""
    ds.ImagePositionPatient = [_ds_str(v) for v in position]
    ds.ImageOrientationPatient = [_ds_str(v) for v in iop]
    ds.PixelSpacing = [_ds_str(row_spacing), _ds_str(col_spacing)]  # [between rows, between columns]
    ds.SliceThickness = _ds_str(abs(slice_spacing))
    ds.SpacingBetweenSlices = _ds_str(abs(slice_spacing))
    ds.SliceLocation = _ds_str(slice_location)
    # image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(rows)
    ds.Columns = int(columns)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = _ds_str(intercept)
    ds.RescaleSlope = _ds_str(slope)
    ds.WindowCenter = _ds_str(window[0])
    ds.WindowWidth = _ds_str(window[1])
    ds.LossyImageCompression = "00"
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    return ds


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
    t1_description = WHOLEHEAD_T1_DESCRIPTIONS[orientation]
    t1_headers = dict(_SEQUENCE_HEADERS["T1"], ProtocolName=t1_description)
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
                             series_time=series_time, extra=headers)
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


# ----------------------------------------------------------------------------------------------
# Sending


class ScannerSendError(ConnectionError):
    """The study could not be sent: peer unreachable, association rejected or aborted."""


def find_dicom_files(folder: str | os.PathLike) -> tuple[list[tuple[Path, Dataset]], list[Path]]:
    """Every DICOM file under ``folder`` (recursively) with its header, and the skipped non-DICOM files.

    Returns:
        ``(dicom, skipped)``: ``(path, header without pixels)`` pairs sorted by path, and the paths of
        files that are not readable DICOM (or lack SOPClassUID/SOPInstanceUID).
    """
    dicom: list[tuple[Path, Dataset]] = []
    skipped: list[Path] = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # InvalidDicomError, truncated files, ...
            skipped.append(path)
            continue
        if "SOPClassUID" not in header or "SOPInstanceUID" not in header:
            skipped.append(path)
            continue
        dicom.append((path, header))
    return dicom, skipped


_STORE_WARNINGS = {0xB000, 0xB006, 0xB007}


def send_study(
    dir: str | os.PathLike,
    host: str,
    port: int,
    called_ae: str = "ORTHANC",
    calling_ae: str = "HIPPOSCANNER",
    *,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """C-STORE every DICOM file under ``dir`` to ``called_ae@host:port`` over one association.

    Only the SOP classes present are proposed, each with Explicit and Implicit VR Little Endian (and
    a context of its own for each other transfer syntax the files carry).

    Returns:
        ``{"total", "sent", "warnings", "failed", "skipped_non_dicom", "failures": [{"file",
        "reason"}], "host", "port", "called_ae", "calling_ae"}`` (``sent`` counts successes
        including warning statuses).

    Raises:
        FileNotFoundError: ``dir`` does not exist.
        ScannerSendError: nothing to send, the peer is unreachable, or the association is rejected
            or aborted (the message names ``AE@host:port``).
    """
    from pynetdicom import AE

    from hippo.pacs import TCP_NODELAY_HANDLERS, presentation_contexts

    folder = Path(dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    files, skipped = find_dicom_files(folder)
    peer = f"{called_ae}@{host}:{port}"
    if not files:
        raise ScannerSendError(f"no DICOM files under {folder} to send to {peer}")
    contexts, left_out = presentation_contexts(
        (str(header.SOPClassUID), str(getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "") or ""))
        for _, header in files)
    if left_out:
        raise ScannerSendError(f"the SOP classes and transfer syntaxes under {folder} need more than the 128 "
                               f"presentation contexts one association can propose")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10.0)
    for sop_class, ts_list in contexts:
        ae.add_requested_context(sop_class, ts_list)
    assoc = ae.associate(host, int(port), ae_title=called_ae, evt_handlers=TCP_NODELAY_HANDLERS)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise ScannerSendError(f"association with {peer} rejected (check the called AE title "
                                   f"{called_ae!r} and that {calling_ae!r} is a known modality)")
        # Only now probe the TCP port, for a clearer message: a probe before every association
        # would hold one of the peer's association slots until its ACSE timeout.
        try:
            with socket.create_connection((host, int(port)), timeout=min(timeout_s, 10.0)):
                pass
        except OSError as exc:
            raise ScannerSendError(f"cannot reach DICOM peer {peer}: {exc.strerror or exc}") from exc
        raise ScannerSendError(f"association with {peer} failed ({'aborted' if assoc.is_aborted else 'no answer'})")

    result: dict[str, Any] = {"total": len(files), "sent": 0, "warnings": 0, "failed": 0,
                              "skipped_non_dicom": len(skipped), "failures": [], "host": host, "port": int(port),
                              "called_ae": called_ae, "calling_ae": calling_ae}
    try:
        for path, _ in files:
            if not assoc.is_established:
                result["failed"] += 1
                result["failures"].append({"file": str(path), "reason": "association lost"})
                continue
            try:
                status = assoc.send_c_store(pydicom.dcmread(path))
            except Exception as exc:  # no accepted context for it, unreadable pixels, ...
                result["failed"] += 1
                result["failures"].append({"file": str(path), "reason": f"{type(exc).__name__}: {exc}"})
                continue
            code = int(status.Status) if status is not None and "Status" in status else None
            if code == 0x0000:
                result["sent"] += 1
            elif code in _STORE_WARNINGS:
                result["sent"] += 1
                result["warnings"] += 1
            else:
                result["failed"] += 1
                reason = "no response (timeout or abort)" if code is None else f"status 0x{code:04X}"
                result["failures"].append({"file": str(path), "reason": reason})
    finally:
        if assoc.is_established:
            assoc.release()
    return result


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hippo.scanner",
                                     description="Emulate an MR scanner: write a DICOM study from NIfTI, send it.")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a study (HippoCrop + distractor series) from a NIfTI image")
    w.add_argument("--nifti", required=True, help="NIfTI image (e.g. imagesTr/hippocampus_001.nii.gz)")
    w.add_argument("--out", required=True, help="output folder")
    w.add_argument("--label", default=None, help="NIfTI label: expected volumes go into the manifest")
    w.add_argument("--no-distractors", action="store_true", help="write only the HippoCrop series")
    w.add_argument("--seed", type=int, default=None, help="deterministic patient, UIDs and noise")
    w.add_argument("--nested", action="store_true", help="nested folders with non-DICOM junk files")
    w.add_argument("--manifest", default=None, help="also write the full manifest as JSON here")
    h = sub.add_parser("write-wholehead", help="write a brain study around a whole-head T1 (NIfTI/MGZ): 3D MPRAGE, "
                                               "localizers, T2, FLAIR, a reformat")
    h.add_argument("--scan", required=True, help="whole-head T1 (.nii, .nii.gz, .mgz)")
    h.add_argument("--out", required=True, help="output folder")
    h.add_argument("--orientation", choices=("sagittal", "axial"), default="sagittal")
    h.add_argument("--no-t1", action="store_true", help="leave the T1 out (e.g. a localizer-only study)")
    h.add_argument("--no-distractors", action="store_true", help="no T2, FLAIR or reformat")
    h.add_argument("--no-localizer", action="store_true", help="no localizer series")
    h.add_argument("--seed", type=int, default=None, help="deterministic patient and UIDs")
    s = sub.add_parser("send", help="C-STORE every DICOM file of a folder over one association")
    s.add_argument("--dir", required=True, help="folder to send (searched recursively)")
    s.add_argument("--host", required=True)
    s.add_argument("--port", required=True, type=int)
    s.add_argument("--called-ae", default="ORTHANC")
    s.add_argument("--calling-ae", default="HIPPOSCANNER")
    s.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 error or failed instances, 2 usage)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "write":
            manifest = write_study(args.nifti, args.out, label_path=args.label, distractors=not args.no_distractors,
                                   seed=args.seed, nested=args.nested)
            if args.manifest:
                write_json_atomic(args.manifest, manifest)
            summary = {k: manifest[k] for k in ("study_instance_uid", "patient_id", "out_dir", "label_volumes_mm3")}
            summary["series"] = {d: s["n_instances"] for d, s in manifest["series"].items()}
            print(json.dumps(summary, indent=2))
            return 0
        if args.command == "write-wholehead":
            manifest = write_wholehead_study(args.scan, args.out, orientation=args.orientation, t1=not args.no_t1,
                                             distractors=not args.no_distractors, localizer=not args.no_localizer,
                                             seed=args.seed)
            summary = {k: manifest[k] for k in ("study_instance_uid", "patient_id", "out_dir")}
            summary["series"] = {d: s["n_instances"] for d, s in manifest["series"].items()}
            print(json.dumps(summary, indent=2))
            return 0
        result = send_study(args.dir, args.host, args.port, called_ae=args.called_ae, calling_ae=args.calling_ae,
                            timeout_s=args.timeout)
        print(json.dumps(result, indent=2))
        if result["failed"]:
            print(f"hippo.scanner: error: {result['failed']} of {result['total']} instances failed "
                  f"(first: {result['failures'][0]['reason']})", file=sys.stderr)
            return 1
        return 0
    except Exception as exc:  # one line, no traceback, for scripts
        print(f"hippo.scanner: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
