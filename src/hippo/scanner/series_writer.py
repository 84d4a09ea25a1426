"""One volume as a DICOM MR (or CT) series with exact geometry: positions, orientation and spacings
derived from the voxel->RAS affine (in LPS), so :func:`hippo.dicom.volume.load_series` gives back
the same array and affine.

Layouts (``layout``): ``"classic"`` (MR Image Storage, one single-frame file per slice) and the
enhanced forms real archives hold (``"enhanced"``: Enhanced MR Image Storage; ``"legacy"``: Legacy
Converted Enhanced MR Image Storage): every slice in one multi-frame instance, split over several
multi-frame instances (``frames_per_instance``), or one frame per instance
(``frames_per_instance=1``, the single-frame enhanced form of archives and converters); pixel
measures and plane orientation in the shared or in the per-frame functional groups
(``functional_groups``), MR timing (TR, TE, TI, flip angle) in the MR timing / echo / modifier
functional groups as enhanced images keep them."""

from __future__ import annotations

import io
import os
import random
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from hippo.fileio import write_bytes_atomic
from hippo.scanner.study_info import StudyInfo


MANUFACTURER = "HippoVolume scanner emulator"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SOP_CLASS = {"MR": MRImageStorage, "CT": CTImageStorage}

FileNames = Literal["instance", "uid", "random"]
Layout = Literal["classic", "enhanced", "legacy"]
#: The enhanced SOP classes of the layouts.
_ENHANCED_SOP_CLASS = {"enhanced": EnhancedMRImageStorage, "legacy": LegacyConvertedEnhancedMRImageStorage}


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
    layout: Layout = "classic",
    frames_per_instance: int | None = None,
    functional_groups: Literal["shared", "per_frame"] = "shared",
) -> list[Path]:
    """Write a 3D volume as a DICOM image series: single-frame files (one per slice), or enhanced
    MR instances (``layout``).

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
        extra: further header attributes by keyword (e.g. ``{"RepetitionTime": 2300}``). In an
            enhanced layout the MR timing attributes among them (RepetitionTime, EchoTime,
            InversionTime, FlipAngle, EchoTrainLength, ScanningSequence, SequenceVariant,
            SequenceName, ScanOptions) go where enhanced images keep them (functional groups,
            EchoPulseSequence, PulseSequenceName), the rest to the top level.
        layout: ``"classic"`` (MR/CT Image Storage, one file per slice), ``"enhanced"`` (Enhanced
            MR Image Storage) or ``"legacy"`` (Legacy Converted Enhanced MR Image Storage); MR only.
        frames_per_instance: enhanced layouts: slices per instance (``None``: all in one
            instance; ``1``: one single-frame enhanced instance per slice; else the last instance
            holds the rest).
        functional_groups: enhanced layouts: PixelMeasures and PlaneOrientation in the
            ``"shared"`` functional groups or repeated in each ``"per_frame"`` item (as Siemens XA
            writes them). PlanePosition, FrameContent and PixelValueTransformation are per frame.

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
    if layout not in ("classic", *_ENHANCED_SOP_CLASS):
        raise ValueError(f"write_series: layout must be 'classic', 'enhanced' or 'legacy', got {layout!r}")
    if layout != "classic" and modality != "MR":
        raise ValueError(f"write_series: the enhanced layouts are MR only, got modality {modality!r}")
    if functional_groups not in ("shared", "per_frame"):
        raise ValueError(f"write_series: functional_groups must be 'shared' or 'per_frame', got {functional_groups!r}")
    if frames_per_instance is not None and int(frames_per_instance) < 1:
        raise ValueError(f"write_series: frames_per_instance must be >= 1, got {frames_per_instance}")

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
    if layout != "classic":
        per = n_slices if frames_per_instance is None else int(frames_per_instance)
        for i, first in enumerate(range(0, n_slices, per)):
            ks = list(range(first, min(first + per, n_slices)))
            sop_uid = study._uid("instance", series_uid, "enhanced", i) if study.seed is not None else generate_uid()
            headers = [_slice_dataset(
                study=study, modality=modality, series_uid=series_uid, sop_uid=sop_uid,
                series_description=series_description, series_number=series_number,
                series_time=series_time or study.study_time, instance_number=i + 1,
                position=aff_stack[:3, 3] + k * step, iop=np.concatenate([r_dir, c_dir]), row_spacing=row_spacing,
                col_spacing=col_spacing, slice_spacing=slice_spacing,
                slice_location=float(np.dot(aff_stack[:3, 3] + k * step, normal)), rows=n_rows, columns=n_cols,
                signed=signed, slope=slope, intercept=intercept, window=(window_center, window_width), extra=extra,
            ) for k in ks]
            ds = _enhanced_dataset(headers, ks, layout=layout, per_frame_groups=functional_groups == "per_frame")
            ds.PixelData = np.ascontiguousarray(np.stack([stored[:, :, k].T for k in ks])).tobytes()
            name = {"instance": f"IM{i + 1:05d}.dcm", "uid": f"{sop_uid}.dcm"}.get(
                file_names, f"{name_rng.getrandbits(64):016x}")
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
            paths.append(write_bytes_atomic(out_dir / name, buf.getvalue()))
        return paths
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


#: Classic MR attributes that an enhanced image keeps elsewhere (functional groups or other names).
_MR_CLASSIC_ONLY = ("RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "EchoTrainLength", "ScanningSequence",
                    "SequenceVariant", "ScanOptions", "SequenceName", "ImagedNucleus", "ImagingFrequency",
                    "MagneticFieldStrength", "SliceLocation", "ImagesInAcquisition", "PatientOrientation",
                    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "SpacingBetweenSlices", "RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth")


def _enhanced_dataset(headers: list[Dataset], slices: list[int], *, layout: str, per_frame_groups: bool) -> Dataset:
    """One enhanced MR instance (everything but PixelData) holding the slices whose classic headers
    are ``headers`` (``slices``: their indices in the whole series, for the frame content)."""
    first = headers[0]
    ds = Dataset()
    ds.file_meta = first.file_meta
    sop_class = _ENHANCED_SOP_CLASS[layout]
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    for elem in first:
        if elem.keyword not in _MR_CLASSIC_ONLY:
            ds.add(elem)
    ds.SOPClassUID = sop_class
    ds.NumberOfFrames = len(headers)
    acq = first
    scanning = [str(v).upper() for v in (acq.get("ScanningSequence") or [])]
    variant = [str(v).upper() for v in (acq.get("SequenceVariant") or [])]
    contrast = str(acq.get("AcquisitionContrast", "") or "") or ("T1" if "IR" in scanning and "GR" in scanning
                                                                 else "UNKNOWN")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.PixelPresentation, ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = "MONOCHROME", "VOLUME", "NONE"
    ds.ComplexImageComponent, ds.AcquisitionContrast = "MAGNITUDE", contrast
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    if "MagneticFieldStrength" in acq:
        ds.MagneticFieldStrength = acq.MagneticFieldStrength
        ds.ResonantNucleus = acq.get("ImagedNucleus", "1H")
    ds.PulseSequenceName = str(acq.get("SequenceName", "") or "unknown")[:16]
    ds.EchoPulseSequence = "GRADIENT" if "GR" in scanning and "SE" not in scanning else         ("BOTH" if "GR" in scanning else "SPIN")
    ds.MultipleSpinEcho, ds.MultiPlanarExcitation, ds.PhaseContrast = "NO", "NO", "NO"
    ds.TimeOfFlightContrast, ds.ArterialSpinLabelingContrast, ds.SteadyStatePulseSequence = "NO", "NO", "NONE"
    ds.EchoPlanarPulseSequence = "YES" if "EP" in scanning else "NO"
    ds.SaturationRecovery, ds.SpectrallySelectedSuppression = "NO", "NONE"
    ds.OversamplingPhase, ds.GeometryOfKSpaceTraversal, ds.SegmentedKSpaceTraversal = "NONE", "RECTILINEAR", "SINGLE"
    ds.RectilinearPhaseEncodeReordering, ds.CoverageOfKSpace = "LINEAR", "FULL"
    ds.KSpaceFiltering, ds.ParallelAcquisition, ds.PartialFourier = "NONE", "NO", "NO"
    ds.ResonantNucleus = str(acq.get("ImagedNucleus", "1H") or "1H")
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.AcquisitionDateTime = f"{acq.get('AcquisitionDate', '')}{acq.get('AcquisitionTime', '')}"
    ds.AcquisitionDuration = 0

    timing = Dataset()
    if "RepetitionTime" in acq:
        timing.RepetitionTime = acq.RepetitionTime
    if "FlipAngle" in acq:
        timing.FlipAngle = acq.FlipAngle
    timing.EchoTrainLength = int(acq.get("EchoTrainLength", 1) or 1)
    timing.RFEchoTrainLength, timing.GradientEchoTrainLength = 0 if ds.EchoPulseSequence == "GRADIENT" else 1, 1
    timing.SpecificAbsorptionRateSequence = []
    timing.GradientOutputType = "DB_DT"
    timing.GradientOutput = 0
    echo = Dataset()
    if "EchoTime" in acq:
        echo.EffectiveEchoTime = acq.EchoTime
    modifier = Dataset()
    modifier.InversionRecovery = "YES" if "InversionTime" in acq or "IR" in scanning else "NO"
    if "InversionTime" in acq:
        modifier.InversionTimes = [acq.InversionTime]
    modifier.FlowCompensation, modifier.Spoiling = "NONE", "RF_AND_GRADIENT" if "SP" in variant else "NONE"
    modifier.T2Preparation, modifier.SpectrallySelectedExcitation, modifier.SpatialPresaturation = "NO", "NONE", "NONE"
    modifier.PartialFourier, modifier.ParallelAcquisition = "NO", "NO"

    def measures_of(h: Dataset) -> Dataset:
        m = Dataset()
        m.PixelSpacing, m.SliceThickness = h.PixelSpacing, h.SliceThickness
        m.SpacingBetweenSlices = h.SpacingBetweenSlices
        return m

    def orientation_of(h: Dataset) -> Dataset:
        o = Dataset()
        o.ImageOrientationPatient = h.ImageOrientationPatient
        return o

    shared = Dataset()
    shared.MRTimingAndRelatedParametersSequence = [timing]
    shared.MREchoSequence = [echo]
    shared.MRModifierSequence = [modifier]
    if not per_frame_groups:
        shared.PixelMeasuresSequence = [measures_of(first)]
        shared.PlaneOrientationSequence = [orientation_of(first)]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for h, k in zip(headers, slices):
        item = Dataset()
        content = Dataset()
        content.StackID, content.InStackPositionNumber = "1", k + 1
        content.DimensionIndexValues = [1, k + 1]
        content.FrameAcquisitionNumber = 1
        item.FrameContentSequence = [content]
        position = Dataset()
        position.ImagePositionPatient = h.ImagePositionPatient
        item.PlanePositionSequence = [position]
        transform = Dataset()
        transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = \
            h.RescaleIntercept, h.RescaleSlope, "US"
        item.PixelValueTransformationSequence = [transform]
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = h.WindowCenter, h.WindowWidth
        item.FrameVOILUTSequence = [voi]
        ftype = Dataset()
        ftype.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ftype.PixelPresentation, ftype.VolumetricProperties = "MONOCHROME", "VOLUME"
        ftype.VolumeBasedCalculationTechnique, ftype.ComplexImageComponent = "NONE", "MAGNITUDE"
        ftype.AcquisitionContrast = contrast
        item.MRImageFrameTypeSequence = [ftype]
        if per_frame_groups:
            item.PixelMeasuresSequence = [measures_of(h)]
            item.PlaneOrientationSequence = [orientation_of(h)]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    dim_org = Dataset()
    dim_org.DimensionOrganizationUID = pydicom.uid.generate_uid(entropy_srcs=[str(first.SeriesInstanceUID), "dim"])
    ds.DimensionOrganizationSequence = [dim_org]
    stack_dim, pos_dim = Dataset(), Dataset()
    stack_dim.DimensionOrganizationUID = pos_dim.DimensionOrganizationUID = dim_org.DimensionOrganizationUID
    stack_dim.DimensionIndexPointer = pydicom.tag.Tag("StackID")
    stack_dim.FunctionalGroupPointer = pydicom.tag.Tag("FrameContentSequence")
    pos_dim.DimensionIndexPointer = pydicom.tag.Tag("InStackPositionNumber")
    pos_dim.FunctionalGroupPointer = pydicom.tag.Tag("FrameContentSequence")
    ds.DimensionIndexSequence = [stack_dim, pos_dim]
    return ds


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
