"""Real-world DICOM through ingest, selection and volume loading: real vendor series (GE, Siemens,
Philips), pydicom's bundled MR files, and Enhanced (multi-frame) MR objects built from a classic
series of the scanner emulator.

The vendor corpus lives outside the repository (``../shared/data/vendor_dicom``, read-only; never
copied into the project); its tests skip, naming the path, when it is absent. Files are only ever
copied to ``tmp_path``.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

from hippo.dicom.ingest import (SelectionRules, SeriesSelectionError, StudyError, scan_study,
                                select_series)
from hippo.dicom.volume import SeriesError, SeriesGeometryError, SeriesVolume, load_series
from hippo.scanner import StudyInfo, write_series

VENDOR = Path(__file__).resolve().parents[1].parent / "shared/data/vendor_dicom"

#: Everything off that could refuse a series before its pixels are read.
ANYTHING = dict(modality=None, description_contains=None, single_volume=False, anatomical_only=False,
                consistent_geometry=False, min_instances=1, sop_classes=(), max_instances=None,
                max_rows_columns=None)


def _vendor(name: str) -> Path:
    folder = VENDOR / name
    if not folder.is_dir():
        pytest.skip(f"vendor DICOM corpus not found at {folder}")
    return folder


def _rejection(folder: Path, rules: SelectionRules | None = None) -> tuple[str, list[str]]:
    """(SeriesSelectionError message, reasons of the folder's one series)."""
    scan = scan_study(folder)
    assert len(scan.series) == 1
    with pytest.raises(SeriesSelectionError) as err:
        select_series(scan, rules or SelectionRules())
    return str(err.value), err.value.rejected[scan.series[0].uid]


# --------------------------------------------------------------------------------------------------
# geometry check against the headers
# --------------------------------------------------------------------------------------------------
def _frame_geometry(sv: SeriesVolume) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of every source frame, in the
    order of ``to_source``'s first axis, read from the headers (functional groups when enhanced)."""
    out = []
    if sv.is_multiframe:
        ds = sv.datasets[0]
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
        for item in ds.PerFrameFunctionalGroupsSequence:
            def get(seq, kw):
                for group in (item, shared):
                    if seq in group:
                        return np.array([float(v) for v in getattr(group[seq].value[0], kw)])
                raise AssertionError(f"{seq} missing")
            out.append((get("PlanePositionSequence", "ImagePositionPatient"),
                        get("PlaneOrientationSequence", "ImageOrientationPatient"),
                        get("PixelMeasuresSequence", "PixelSpacing")))
    else:
        for ds in sv.datasets:
            out.append(tuple(np.array([float(v) for v in getattr(ds, kw)])
                             for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")))
    return out


def assert_affine_matches_headers(sv: SeriesVolume) -> None:
    """For each source frame: the voxel that ``from_source`` puts its pixel (row i, column j) at
    lies, through ``sv.affine``, at IPP + j * PixelSpacing[1] * r + i * PixelSpacing[0] * c (LPS)."""
    n, rows, cols = sv.source_shape
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    for k, (ipp, iop, ps) in enumerate(_frame_geometry(sv)):
        for i, j in ((0, 0), (rows - 1, 0), (0, cols - 1)):
            probe = np.zeros(sv.source_shape, dtype=np.uint8)
            probe[k, i, j] = 1
            voxel = np.argwhere(sv.from_source(probe))
            assert len(voxel) == 1
            ras = sv.affine @ np.append(voxel[0], 1.0)
            expected = ipp + j * ps[1] * iop[:3] + i * ps[0] * iop[3:]
            np.testing.assert_allclose(ras[:3] * lps_to_ras, expected, atol=2e-3)


# --------------------------------------------------------------------------------------------------
# real vendor series
# --------------------------------------------------------------------------------------------------
def test_ge_epi_time_series_is_refused_as_a_time_series_and_one_time_point_loads(tmp_path):
    """GE axial EPI fMRI: 150 single-frame files = 10 volumes of 15 slices, plus a text file. The
    README is ignored (not DICOM); selection names the time series (default and permissive rules);
    with every rule off, load_series still refuses the repeated positions. One time point (files
    1-15) truly is a 3D volume: it loads with the header geometry (3.75 x 3.75 mm, 5 mm steps)."""
    folder = _vendor("ge_epi_axial")
    scan = scan_study(folder)
    assert scan.n_instances == 150 and len(scan.series) == 1
    assert [(p.name, why) for p, why in scan.ignored] == [("README-Series.txt", "not DICOM (no DICM preamble)")]
    expected = ("time series: 10 volumes of 15 slices at the same positions (fMRI / dynamic; "
                "NumberOfTemporalPositions 10), not one 3D volume")
    for rules in (None, SelectionRules(description_contains=None)):
        msg, reasons = _rejection(folder, rules)
        assert expected in reasons and expected in msg
    series = select_series(scan, SelectionRules(**ANYTHING))
    with pytest.raises(SeriesGeometryError, match="at the same position"):
        load_series(series.files)

    first = sorted(folder.glob("*.dcm"))[:15]
    sv = load_series(first)
    assert sv.array.shape == (64, 64, 15) and not sv.is_multiframe
    np.testing.assert_allclose(sv.spacing, (3.75, 3.75, 5.0), atol=1e-3)
    assert_affine_matches_headers(sv)


def test_siemens_mosaic_is_refused_as_a_mosaic():
    """Siemens EPI mosaic (ImageType MOSAIC, CSA NumberOfImagesInMosaic): refused at selection
    with the mosaic reason, and by load_series when every rule is off (it must never be read as
    two 216 x 216 slices)."""
    folder = _vendor("siemens_epi_mosaic")
    scan = scan_study(folder)
    assert scan.n_instances == 2 and [p.name for p, _ in scan.ignored] == ["README-Series.txt"]
    expected = ("Siemens mosaic (ImageType MOSAIC, NumberOfImagesInMosaic 5; 2 instances): slices tiled "
                "in one image, not a volume")
    for rules in (None, SelectionRules(description_contains=None)):
        msg, reasons = _rejection(folder, rules)
        assert expected in reasons and expected in msg
    series = select_series(scan, SelectionRules(**ANYTHING))
    with pytest.raises(SeriesGeometryError, match="Siemens mosaic"):
        load_series(series.files)


def test_siemens_xa10_enhanced_split_series_is_refused_and_one_instance_loads(tmp_path):
    """Siemens XA10 Enhanced MR: 4 instances of 6 frames = 4 time points. Several multi-frame
    instances are one series (their frames stacked by position), so what refuses this one is what
    it is: a time series (TemporalPositionIndex 1..4); load_series finds frames of two instances at
    one position. One instance alone is one 3D volume: selected by the default rules (bar the
    description), loaded with the per-frame geometry (3.375 mm, 2.4 mm slices), and to_source
    gives the stored frames back in the file's frame order."""
    folder = _vendor("siemens_xa10_enhanced")
    scan = scan_study(folder)
    assert scan.n_instances == 4 and not scan.ignored and scan.series[0].is_enhanced
    time = ("time series: 4 volumes of 6 slices at the same positions (fMRI / dynamic; TemporalPositionIndex "
            "1..4, AcquisitionNumber 1..4), not one 3D volume")
    for rules in (None, SelectionRules(description_contains=None)):
        msg, reasons = _rejection(folder, rules)
        assert time in reasons and time in msg and not any("split" in r for r in reasons)
    with pytest.raises(SeriesGeometryError, match=r"6_1\.dcm frame \d and .*6_2\.dcm frame \d are at the same "
                                                  r"position"):
        load_series(select_series(scan, SelectionRules(**ANYTHING)).files)

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(folder / "6_1.dcm", one / "6_1.dcm")
    series = select_series(scan_study(one), SelectionRules(description_contains=None))
    assert series.is_single_enhanced and series.n_frames == 6 and series.geometry_problems() == []
    sv = load_series(series.files)
    assert sv.is_multiframe and sv.source_shape == (6, 64, 64) and len(sv.datasets) == 1
    np.testing.assert_allclose(sv.spacing, (3.375, 3.375, 2.4), atol=1e-3)
    assert_affine_matches_headers(sv)
    stored = pydicom.dcmread(one / "6_1.dcm").pixel_array.astype(np.float32)  # slope 1, intercept 0
    np.testing.assert_array_equal(sv.to_source(sv.array), stored)


def test_philips_enhanced_field_map_is_refused_as_a_field_map():
    """Philips Enhanced MR field map: 64 frames = magnitude + field map (REAL) at 32 positions.
    Selection names the field map and the two images per position; with every rule off,
    load_series refuses two frames at one position, naming the file and both frames."""
    folder = _vendor("philips_enhanced")
    scan = scan_study(folder)
    assert scan.n_instances == 1 and scan.series[0].n_frames == 64
    field_map = ("field map (FrameType FIELD_MAP in 32 of 64 frames; ComplexImageComponent REAL in 32 of 64 "
                 "frames): not an anatomical magnitude image")
    for rules in (None, SelectionRules(description_contains=None)):
        msg, reasons = _rejection(folder, rules)
        assert field_map in reasons and field_map in msg
        assert any(r.startswith("2 images at each of 32 slice positions") for r in reasons)
    with pytest.raises(SeriesGeometryError, match=r"IM_0027_fMAP.dcm frame 1 and .*frame 33 are at the same"):
        load_series(select_series(scan, SelectionRules(**ANYTHING)).files)


# --------------------------------------------------------------------------------------------------
# pydicom's bundled MR files
# --------------------------------------------------------------------------------------------------
_PYDICOM_MR = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
               "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
               "MR_small_padded.dcm", "MR_truncated.dcm", "emri_small.dcm", "emri_small_big_endian.dcm",
               "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm", "emri_small_RLE.dcm",
               "MR2_J2KR.dcm", "MR2_J2KI.dcm", "MR2_UNCR.dcm", "MR2_UNCI.dcm",
               "MR-SIEMENS-DICOM-WithOverlays.dcm", "zipMR.gz"]


def _pydicom_file(name: str) -> Path:
    """A pydicom test file found locally -- bundled with pydicom, or from the ``pydicom-data`` package
    (a test dependency) -- never downloaded; skips naming it otherwise."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"pydicom test file {name} not available offline (install the pydicom-data package)")
    return Path(found)


@pytest.mark.parametrize("name", _PYDICOM_MR)
def test_pydicom_mr_files_load_or_are_refused_by_name(name, tmp_path):
    """Each pydicom MR test file, alone in a study folder: scan_study never crashes; selection and
    load_series either give a volume with the header geometry or refuse with a reason (a single
    slice is no volume, a truncated file is ignored with its reason)."""
    src = _pydicom_file(name)
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(src, study / name)
    try:
        scan = scan_study(study)
    except StudyError as exc:  # the one file is unusable: the message says why
        assert str(study) in str(exc) and ("truncated" in str(exc) or "not DICOM" in str(exc))
        return
    assert len(scan.series) == 1
    series = scan.series[0]
    with pytest.raises(SeriesSelectionError) as err:  # no HippoCrop description in any of them
        select_series(scan)
    reasons = err.value.rejected[series.uid]
    assert reasons and all(r in str(err.value) for r in reasons)
    try:
        sv = load_series(series.files)
    except SeriesError as exc:
        assert str(exc).startswith(f"series {series.uid}: ")
        if series.n_frames == 1:
            assert "a single slice" in str(exc) and any("only 1 instance(s)" in r for r in reasons)
        return
    assert_affine_matches_headers(sv)
    assert np.isfinite(sv.array).all() and sv.array.shape[2] >= 2


def test_pydicom_mr_small_as_a_three_slice_series_loads_in_every_encoding(tmp_path):
    """MR_small and its re-encodings (RLE, big endian, implicit, JPEG 2000 / JPEG-LS lossless)
    stacked as three slices 5 mm apart: selected by rules that accept its description, and loaded
    to the same voxels with the header geometry whatever the transfer syntax."""
    volumes = []
    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                 "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        src = pydicom.dcmread(_pydicom_file(name))
        folder = tmp_path / name
        series_uid = generate_uid()
        ipp = np.array([float(v) for v in src.ImagePositionPatient])
        iop = np.array([float(v) for v in src.ImageOrientationPatient])
        for k in range(3):
            ds = pydicom.dcmread(_pydicom_file(name))
            ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp + 5.0 * k * np.cross(iop[:3], iop[3:])]
            folder.mkdir(exist_ok=True)
            ds.save_as(folder / f"{k}.dcm")
        series = select_series(scan_study(folder), SelectionRules(description_contains=None))
        sv = load_series(series.files)
        assert sv.array.shape == (64, 64, 3)
        np.testing.assert_allclose(sorted(sv.spacing), sorted([float(v) for v in src.PixelSpacing] + [5.0]),
                                   rtol=1e-4)
        assert_affine_matches_headers(sv)
        volumes.append(sv.array)
    for v in volumes[1:]:
        np.testing.assert_array_equal(v, volumes[0])


# --------------------------------------------------------------------------------------------------
# Enhanced MR built from a classic series
# --------------------------------------------------------------------------------------------------
SHAPE = (6, 5, 7)
_C, _S = np.cos(0.2), np.sin(0.2)
#: X flipped against RAS, anisotropic voxels, oblique (rotated 11.5 deg about X) slices.
AFFINE = np.array([[-1.0, 0.0, 0.0, 10.0], [0.0, _C, -_S, -20.0], [0.0, _S, _C, 5.0], [0.0, 0.0, 0.0, 1.0]]) \
    @ np.diag([0.8, 0.9, 1.8, 1.0])


def _classic(tmp_path: Path, description: str = "HippoCrop") -> tuple[np.ndarray, list[Path]]:
    vol = np.random.default_rng(3).integers(0, 250, size=SHAPE).astype(np.uint8)
    paths = write_series(vol, AFFINE, tmp_path / "classic", study=StudyInfo(seed=11),
                         series_description=description)
    return vol, paths


def make_enhanced(classic: list[Path], out: Path, *, order=None, per_frame_rescale: bool = False,
                  edit=None) -> Path:
    """An Enhanced MR Image Storage instance holding the classic series' slices as frames, built by
    hand with pydicom: shared PixelMeasures / PlaneOrientation, per-frame PlanePosition /
    FrameContent / PixelValueTransformation / MRImageFrameType. ``order``: classic slice index of
    each frame (file order; default ascending). ``per_frame_rescale``: store each frame with its own
    RescaleSlope / RescaleIntercept (the real values unchanged; needs integer data with slope 1).
    ``edit(k, per_frame_item)`` may damage a frame's functional groups."""
    src = [pydicom.dcmread(p) for p in classic]
    order = list(range(len(src))) if order is None else list(order)
    first = src[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedMRImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    for kw in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
               "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription",
               "ReferringPhysicianName", "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
               "SeriesDate", "SeriesTime", "BodyPartExamined", "Manufacturer", "InstitutionName",
               "FrameOfReferenceUID", "PositionReferenceIndicator", "Rows", "Columns", "SamplesPerPixel",
               "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        if kw in first:
            setattr(ds, kw, first.data_element(kw).value)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = first.StudyDate, first.StudyTime
    ds.NumberOfFrames = len(order)
    ds.AcquisitionContrast, ds.ComplexImageComponent, ds.PixelPresentation = "T1", "MAGNITUDE", "MONOCHROME"
    ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = "VOLUME", "NONE"
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    measures.SpacingBetweenSlices = first.SpacingBetweenSlices
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame, pixels = [], []
    for k, idx in enumerate(order):
        s = src[idx]
        real = s.pixel_array.astype(np.float64) * float(s.RescaleSlope) + float(s.RescaleIntercept)
        slope, intercept = float(s.RescaleSlope), float(s.RescaleIntercept)
        if per_frame_rescale:
            slope, intercept = (0.5 if k % 2 else 1.0), -3.0 * k
        stored = np.rint((real - intercept) / slope)
        np.testing.assert_array_equal(stored * slope + intercept, real)  # exact round trip
        pixels.append(stored.astype(np.uint16))
        item, pos, content, pvt, ftype = Dataset(), Dataset(), Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = s.ImagePositionPatient
        content.StackID, content.InStackPositionNumber = "1", idx + 1
        content.DimensionIndexValues = [1, idx + 1]
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
        ftype.FrameType, ftype.ComplexImageComponent = ["ORIGINAL", "PRIMARY", "M", "NONE"], "MAGNITUDE"
        item.PlanePositionSequence, item.FrameContentSequence = [pos], [content]
        item.PixelValueTransformationSequence, item.MRImageFrameTypeSequence = [pvt], [ftype]
        if edit is not None:
            edit(k, item)
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelRepresentation = 0
    ds.PixelData = np.stack(pixels).tobytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("order", ["ascending", "shuffled", "descending"])
@pytest.mark.parametrize("per_frame_rescale", [False, True])
def test_enhanced_mr_loads_like_its_classic_series(tmp_path, order, per_frame_rescale):
    """The multi-frame contract: an Enhanced MR instance of the same slices gives the same volume,
    spacing and affine as the classic series; ``datasets`` is the one instance; ``to_source`` gives
    ``(NumberOfFrames, Rows, Columns)`` with frame k = frame k of the file even when the frames are
    stored out of spatial order, and ``from_source`` is its inverse; per-frame RescaleSlope /
    Intercept are applied frame by frame. Default selection rules accept it."""
    vol, paths = _classic(tmp_path)
    n = len(paths)
    perm = {"ascending": list(range(n)), "descending": list(range(n))[::-1],
            "shuffled": random.Random(4).sample(range(n), n)}[order]
    enh = make_enhanced(paths, tmp_path / "enh" / "ENH.dcm", order=perm, per_frame_rescale=per_frame_rescale)

    series = select_series(scan_study(enh.parent))
    assert series.is_single_enhanced and series.n_frames == n and series.geometry_problems() == []
    classic = load_series(paths)
    sv = load_series(series.files)
    assert sv.is_multiframe and not classic.is_multiframe
    assert len(sv.datasets) == 1 and sv.datasets[0].SOPInstanceUID == pydicom.dcmread(enh).SOPInstanceUID
    assert sv.source_shape == (n, classic.source_shape[1], classic.source_shape[2])
    np.testing.assert_array_equal(sv.array, classic.array)
    np.testing.assert_allclose(sv.affine, classic.affine, atol=1e-9)
    np.testing.assert_allclose(sv.spacing, classic.spacing)
    assert_affine_matches_headers(sv)

    # to_source: file frame order, pixel-aligned with the stored (rescaled) frames
    ds = pydicom.dcmread(enh)
    stored = ds.pixel_array.astype(np.float64)
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        t = item.PixelValueTransformationSequence[0]
        stored[k] = stored[k] * float(t.RescaleSlope) + float(t.RescaleIntercept)
    np.testing.assert_array_equal(sv.to_source(sv.array), stored.astype(np.float32))
    # the same mask goes to the same pixels as for the classic series (frame k = classic slice perm[k])
    mask = (classic.array > 120).astype(np.uint8)
    back = sv.to_source(mask)
    assert back.dtype == np.uint8 and back.shape == sv.source_shape
    classic_back = classic.to_source(mask)  # in classic.datasets (ascending) order
    classic_idx = {str(d.SOPInstanceUID): i for i, d in enumerate(classic.datasets)}
    src_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    for k, idx in enumerate(perm):
        np.testing.assert_array_equal(back[k], classic_back[classic_idx[src_uids[idx]]])
    np.testing.assert_array_equal(sv.from_source(back), mask)
    with pytest.raises(ValueError, match="from_source"):
        sv.from_source(back[:-1])


def test_legacy_converted_enhanced_mr_from_highdicom_loads_like_its_classic_series(tmp_path):
    """highdicom's Legacy Converted Enhanced MR (a different writer, its own frame order and
    functional groups) loads to the classic series' volume and affine and is selected by default."""
    hd = pytest.importorskip("highdicom")
    vol, paths = _classic(tmp_path)
    src = [pydicom.dcmread(p) for p in paths]
    random.Random(1).shuffle(src)
    lc = hd.legacy.LegacyConvertedEnhancedMRImage(src, series_instance_uid=src[0].SeriesInstanceUID,
                                                  series_number=7, sop_instance_uid=generate_uid(),
                                                  instance_number=1)
    out = tmp_path / "lc" / "LC.dcm"
    out.parent.mkdir()
    lc.save_as(out)
    series = select_series(scan_study(out.parent))
    assert series.sop_class_uid == pydicom.uid.LegacyConvertedEnhancedMRImageStorage
    classic, sv = load_series(paths), load_series(series.files)
    assert sv.is_multiframe
    np.testing.assert_array_equal(sv.array, classic.array)
    np.testing.assert_allclose(sv.affine, classic.affine, atol=1e-9)
    assert_affine_matches_headers(sv)


def _drop_position(k, item, which=3):
    if k == which:
        del item.PlanePositionSequence


def test_enhanced_geometry_problems_are_named_by_file_and_frame(tmp_path):
    """The classic geometry checks hold for frames: a missing frame (gap), two frames at one
    position, a frame with another orientation, a frame without a position. Selection names the
    file and frame from the headers; load_series refuses with the same kind of message."""
    _, paths = _classic(tmp_path)
    cases = {
        "gap": dict(order=[0, 1, 2, 4, 5, 6]),
        "duplicate": dict(order=[0, 1, 2, 3, 3, 4, 5, 6]),
        "orientation": dict(edit=lambda k, item: k == 2 and item.__setattr__(
            "PlaneOrientationSequence", [_orientation((1, 0, 0, 0, 0.8, 0.6))])),
        "position": dict(edit=_drop_position),
    }
    expected = {
        "gap": ("uneven slice spacing", "missing slice"),
        "duplicate": ("two or more slices share one position", "same position"),
        "orientation": ("ImageOrientationPatient differs", "ImageOrientationPatient"),
        "position": ("ImagePositionPatient missing", "ImagePositionPatient"),
    }
    for case, kw in cases.items():
        enh = make_enhanced(paths, tmp_path / case / "ENH.dcm", **kw)
        scan = scan_study(enh.parent)
        with pytest.raises(SeriesSelectionError) as err:
            select_series(scan)
        select_reason, load_reason = expected[case]
        assert select_reason in str(err.value) and f"{enh} frame " in str(err.value), (case, str(err.value))
        if case == "position":  # classic fallback: InstanceNumber order, with a warning
            sv = load_series([enh])
            assert any("ImagePositionPatient missing" in w for w in sv.warnings)
            continue
        with pytest.raises(SeriesGeometryError) as lerr:
            load_series([enh])
        assert load_reason in str(lerr.value) and f"{enh} frame " in str(lerr.value), (case, str(lerr.value))


def _orientation(iop) -> Dataset:
    d = Dataset()
    d.ImageOrientationPatient = [f"{v:g}" for v in iop]
    return d


def test_enhanced_time_series_and_non_magnitude_frames_are_refused(tmp_path):
    """Within one enhanced instance: two time points at the same positions (TemporalPositionIndex)
    is a time series; phase frames (FrameType P / ComplexImageComponent PHASE) are not anatomy. A
    multi-frame classic MR and an enhanced series split over two instances are refused too."""
    _, paths = _classic(tmp_path)
    n = len(paths)

    def temporal(k, item):
        item.FrameContentSequence[0].TemporalPositionIndex = 1 + k // n
    enh = make_enhanced(paths, tmp_path / "dyn" / "ENH.dcm", order=list(range(n)) * 2, edit=temporal)
    msg = _rejection(enh.parent)[0]
    assert f"time series: 2 volumes of {n} slices at the same positions (fMRI / dynamic; " \
           f"TemporalPositionIndex 1..2), not one 3D volume" in msg

    def phase(k, item):
        item.MRImageFrameTypeSequence[0].FrameType = ["ORIGINAL", "PRIMARY", "P", "NONE"]
        item.MRImageFrameTypeSequence[0].ComplexImageComponent = "PHASE"
    enh = make_enhanced(paths, tmp_path / "phase" / "ENH.dcm", edit=phase)
    assert "phase image (FrameType P; ComplexImageComponent PHASE): not an anatomical magnitude image" \
        in _rejection(enh.parent)[0]

    # the same series split over two enhanced instances is one volume; one of them mixed with
    # classic single-frame files is not
    split = tmp_path / "split"
    make_enhanced(paths[:4], split / "A.dcm")
    make_enhanced(paths[4:], split / "B.dcm")
    series = select_series(scan_study(split))
    assert series.n_instances == 2 and series.n_frames == n
    np.testing.assert_array_equal(load_series(series.files).array, load_series(paths).array)
    mixed = tmp_path / "mixed"
    make_enhanced(paths[:4], mixed / "A.dcm")
    for k, path in enumerate(paths[4:]):
        shutil.copy(path, mixed / f"classic{k}.dcm")
    assert "mixes 1 enhanced (functional-group) instance(s) with 3 classic one(s)" in _rejection(mixed)[0]
    with pytest.raises(SeriesGeometryError, match="not both"):
        load_series(sorted(mixed.iterdir()))
