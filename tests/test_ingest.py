"""hippo.dicom.ingest: walking a study folder, grouping series, choosing the HippoCrop series.

The DICOM files are written here with pydicom (tiny 4x5 slices), so nothing depends on
``hippo.scanner``; real-world headers come from ``pydicom.data`` where useful.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, EnhancedMRImageStorage, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, MRImageStorage, generate_uid)

from hippo.dicom.ingest import (SelectionRules, SeriesSelectionError, StudyError, read_header,
                                scan_study, select_series)

ROWS, COLS = 4, 5


def make_slice(*, series_uid: str, study_uid: str, description: str, index: int,
               modality: str = "MR", sop_class: str = MRImageStorage, frames: int = 1,
               spacing=(1.0, 1.0), slice_gap: float = 1.0,
               orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), series_number: int = 1,
               position=None, implicit: bool = False) -> Dataset:
    """One small uint16 image (``frames`` frames of ROWS x COLS) with file meta."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P001"
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = index + 1
    ds.Rows, ds.Columns = ROWS, COLS
    ds.PixelSpacing = [f"{s:g}" for s in spacing]
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)
    pos = normal * slice_gap * index if position is None else np.asarray(position, float)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames != 1:
        ds.NumberOfFrames = frames
    ds.PixelData = (np.arange(ROWS * COLS * frames, dtype=np.uint16) + index).tobytes()
    return ds


def write_series(folder: Path, n: int, description: str, *, study_uid: str | None = None,
                 names=None, **kw) -> tuple[str, list[Path]]:
    """Write an ``n``-slice series under ``folder`` (file names from ``names(i)`` or
    ``IM{i:04d}``); returns (SeriesInstanceUID, paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    study_uid = study_uid or STUDY
    paths = []
    for i in range(n):
        ds = make_slice(series_uid=series_uid, study_uid=study_uid, description=description,
                        index=i, **kw)
        p = folder / (names(i) if names else f"IM{i:04d}")
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return series_uid, paths


STUDY = generate_uid()


@pytest.fixture
def study(tmp_path: Path) -> dict:
    """A study folder: HippoCrop (5 slices, odd names, nested) + T1/FLAIR/T2 distractors, a
    README, a truncated DICOM and a DICOMDIR."""
    root = tmp_path / "study"
    names = [lambda i: f"slice{i}", lambda i: f"IMG{i}.IMA", lambda i: f"Z{i}.DCM"]
    crop_uid, crop = write_series(root / "a" / "b", 5, "HippoCrop", series_number=7,
                                  names=lambda i: names[i % 3](i), spacing=(1.0, 1.0))
    t1_uid, t1 = write_series(root / "T1", 4, "T1 MPRAGE full brain", series_number=2)
    flair_uid, _ = write_series(root / "x" / "y" / "z", 3, "FLAIR", series_number=3,
                                names=lambda i: f".hidden{i}")
    t2_uid, _ = write_series(root / "T2", 3, "T2 TSE", series_number=4, implicit=True,
                             names=lambda i: f"{i}")
    (root / "README.txt").write_text("not an image\n" * 20)
    trunc = root / "T1" / "broken"
    trunc.write_bytes(t1[0].read_bytes()[:200])
    shutil.copy(pydicom.data.get_testdata_file("DICOMDIR"), root / "DICOMDIR")
    return {"root": root, "crop": crop_uid, "crop_files": crop, "t1": t1_uid, "flair": flair_uid,
            "t2": t2_uid, "truncated": trunc}


def test_scan_groups_series_and_ignores_non_images(study, caplog):
    caplog.set_level(logging.INFO, logger="hippo.dicom.ingest")
    scan = scan_study(study["root"], workers=3)
    by_uid = {s.uid: s for s in scan.series}
    assert set(by_uid) == {study["crop"], study["t1"], study["flair"], study["t2"]}
    crop = by_uid[study["crop"]]
    assert crop.n_instances == 5 and crop.description == "HippoCrop" and crop.modality == "MR"
    assert {p.name for p in crop.files} == {"slice0", "IMG1.IMA", "Z2.DCM", "slice3", "IMG4.IMA"}
    assert crop.series_number == 7 and crop.sop_class_uid == MRImageStorage
    assert crop.rows_columns == {(ROWS, COLS)} and crop.pixel_spacings == {(1.0, 1.0)}
    assert crop.orientations == {(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)}
    assert crop.is_single_frame and crop.is_consistent and crop.is_single_frame_consistent
    assert crop.study_uid == STUDY and crop.patient_id == "P001"
    assert crop.transfer_syntaxes == {ExplicitVRLittleEndian}
    assert by_uid[study["t1"]].n_instances == 4          # the truncated copy is not counted
    assert by_uid[study["flair"]].n_instances == 3       # hidden files are scanned
    assert by_uid[study["t2"]].transfer_syntaxes == {ImplicitVRLittleEndian}
    assert scan.study_uids == (STUDY,) and not scan.multiple_studies
    ignored = {p.name: reason for p, reason in scan.ignored}
    assert set(ignored) == {"README.txt", "broken", "DICOMDIR"}
    assert "not DICOM" in ignored["README.txt"]
    assert "missing" in ignored["broken"] and "truncated" in ignored["broken"]
    assert "DICOMDIR" in ignored["DICOMDIR"]
    assert scan.n_files == 5 + 4 + 3 + 3 + 3
    assert "README.txt" in caplog.text                  # ignored files are logged ...
    assert "Doe" not in caplog.text                     # ... patient names never are


def test_select_series_picks_hippocrop_among_distractors(study):
    scan = scan_study(study["root"])
    chosen = select_series(scan, SelectionRules())
    assert chosen.uid == study["crop"]
    # sorted by InstanceNumber, not by file name
    assert [pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber for p in chosen.files] \
        == [1, 2, 3, 4, 5]


def test_rules_from_plain_mapping_and_case_insensitive(study):
    cfg = {"modality": "mr", "description_contains": "hippocrop", "single_volume": True,
           "consistent_geometry": True, "min_instances": 3, "sop_classes": ["MRImageStorage"]}
    rules = SelectionRules(**cfg)
    assert rules.sop_classes == (MRImageStorage,)
    assert EnhancedMRImageStorage in SelectionRules().sop_classes
    # older configs: 'single_frame' is read as 'single_volume'
    legacy = SelectionRules.from_mapping({"single_frame": False})
    assert legacy.single_volume is False and legacy.single_frame is None
    assert SelectionRules.from_mapping({"single_frame": True}).single_volume is True
    assert select_series(scan_study(study["root"]), rules).uid == study["crop"]
    assert select_series(scan_study(study["root"]),
                         {"_target_": "x", **cfg}).uid == study["crop"]
    with pytest.raises(ValueError, match="SelectionRules: unknown setting.*'colour'"):
        SelectionRules.from_mapping({"colour": "red"})
    with pytest.raises(ValueError, match="SOP class"):
        SelectionRules(sop_classes=["NoSuchStorage"])


def test_no_match_lists_every_series(study):
    shutil.rmtree(study["crop_files"][0].parent)
    scan = scan_study(study["root"])
    with pytest.raises(SeriesSelectionError) as err:
        select_series(scan, SelectionRules())
    msg = str(err.value)
    assert "no series matches" in msg and str(study["root"]) in msg
    for uid, desc in [(study["t1"], "T1 MPRAGE full brain"), (study["flair"], "FLAIR"),
                      (study["t2"], "T2 TSE")]:
        assert uid in msg and desc in msg
    assert "(4 instances)" in msg and "does not contain 'HippoCrop'" in msg
    assert err.value.matches == () and set(err.value.rejected) == {study["t1"], study["flair"],
                                                                   study["t2"]}
    assert "Doe" not in msg


def test_two_matches_is_an_error(study):
    second, _ = write_series(study["root"] / "again", 4, "hippocrop repeat", series_number=8)
    with pytest.raises(SeriesSelectionError) as err:
        select_series(scan_study(study["root"]))
    msg = str(err.value)
    assert "2 series match" in msg and study["crop"] in msg and second in msg
    assert {s.uid for s in err.value.matches} == {study["crop"], second}


def test_multiframe_non_mr_and_bad_geometry_are_rejected_with_reasons(tmp_path):
    root = tmp_path / "s"
    # multi-frame without functional groups: enhanced SOP class (accepted) but no frame geometry
    mf, _ = write_series(root / "mf", 3, "HippoCrop enhanced", frames=4,
                         sop_class=EnhancedMRImageStorage)
    mfc, _ = write_series(root / "mfc", 3, "HippoCrop classic multi-frame", frames=4)
    ct, _ = write_series(root / "ct", 4, "HippoCrop CT", modality="CT", sop_class=CTImageStorage)
    few, _ = write_series(root / "few", 2, "HippoCrop short")
    # one slice rotated: orientation differs
    tilt, paths = write_series(root / "tilt", 4, "HippoCrop tilted")
    ds = pydicom.dcmread(paths[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
    ds.save_as(paths[2])
    gap, gpaths = write_series(root / "gap", 5, "HippoCrop gap")
    gpaths[2].unlink()  # a missing slice -> uneven spacing
    good, _ = write_series(root / "good", 4, "HippoCrop")
    scan = scan_study(root)
    assert select_series(scan).uid == good
    reasons = {uid: SelectionRules().rejection_reasons(scan.get(uid))
               for uid in (mf, mfc, ct, few, tilt, gap)}
    assert any("multi-frame (NumberOfFrames 4) without per-frame functional groups" in r for r in reasons[mf])
    assert not any("SOP class" in r for r in reasons[mf])  # Enhanced MR is an accepted SOP class
    assert any("multi-frame (NumberOfFrames 4)" in r for r in reasons[mfc])
    assert any("modality CT" in r for r in reasons[ct]) and any("SOP class" in r for r in reasons[ct])
    assert any("only 2 instance" in r for r in reasons[few])
    assert any("ImageOrientationPatient differs" in r for r in reasons[tilt])
    assert any("uneven slice spacing" in r for r in reasons[gap])
    assert not scan.get(mf).is_single_frame and scan.get(mf).number_of_frames == {4}

    shutil.rmtree(root / "good")
    with pytest.raises(SeriesSelectionError) as err:
        select_series(scan_study(root))
    msg = str(err.value)
    assert "multi-frame" in msg and "modality CT" in msg and "uneven slice spacing" in msg
    # relaxing the rules makes the gapped series acceptable on its own
    relaxed = SelectionRules(description_contains="HippoCrop gap", consistent_geometry=False)
    assert select_series(scan_study(root), relaxed).uid == gap


def test_oblique_series_is_consistent(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    uid, _ = write_series(tmp_path, 4, "HippoCrop", orientation=(1, 0, 0, 0, c, s),
                          spacing=(0.9, 0.8), slice_gap=1.5)
    series = scan_study(tmp_path).get(uid)
    assert series.geometry_problems() == []


def test_sheared_series_is_inconsistent(tmp_path):
    uid, paths = write_series(tmp_path, 3, "HippoCrop")
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient = [0.5 * i, 0, float(i)]  # drifts in-plane along x
        ds.save_as(p)
    assert any("not stacked" in p for p in scan_study(tmp_path).get(uid).geometry_problems())


def test_empty_and_missing_directories_name_the_path(tmp_path):
    empty = tmp_path / "empty_study"
    empty.mkdir()
    with pytest.raises(StudyError, match="empty_study"):
        scan_study(empty)
    only_text = tmp_path / "text_only"
    only_text.mkdir()
    (only_text / "notes.txt").write_text("hello")
    with pytest.raises(StudyError, match="text_only") as err:
        scan_study(only_text)
    assert "not DICOM" in str(err.value)
    missing = tmp_path / "no_such_study"
    with pytest.raises(FileNotFoundError, match="no_such_study"):
        scan_study(missing)


def test_scan_never_reads_pixel_data(tmp_path, monkeypatch):
    uid, paths = write_series(tmp_path, 3, "HippoCrop")
    # garbage where the pixels are (same length): headers still scan
    raw = bytearray(paths[1].read_bytes())
    n = ROWS * COLS * 2
    raw[-n:] = b"\xde\xad" * (n // 2)
    paths[1].write_bytes(bytes(raw))

    def boom(*a, **k):
        raise AssertionError("pixel data must not be decoded during the scan")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(boom))
    monkeypatch.setattr(pydicom.dataset.Dataset, "convert_pixel_data", boom)
    scan = scan_study(tmp_path)
    assert scan.get(uid).n_instances == 3 and not scan.ignored


def test_truncated_pixel_data_is_ignored_with_reason(tmp_path):
    uid, paths = write_series(tmp_path, 4, "HippoCrop")
    paths[3].write_bytes(paths[3].read_bytes()[:-10])
    scan = scan_study(tmp_path)
    assert scan.get(uid).n_instances == 3
    [(path, reason)] = scan.ignored
    assert path == paths[3] and "pixel data truncated" in reason


def test_raw_dicom_without_preamble_is_read(tmp_path):
    """Old exports without the 128-byte preamble/DICM: parsed with force=True when they start
    like a data set and carry a SOPClassUID."""
    uid, paths = write_series(tmp_path, 3, "HippoCrop", implicit=True)
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(p, enforce_file_format=False, implicit_vr=True, little_endian=True)
        assert p.read_bytes()[128:132] != b"DICM"
    series = scan_study(tmp_path).get(uid)
    assert series.n_instances == 3 and series.transfer_syntaxes == {ImplicitVRLittleEndian}


def test_real_world_sample_header(tmp_path):
    """pydicom's MR_small.dcm (a real scanner header, big image tags) scans as one MR series."""
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), tmp_path / "mr")
    header, reason = read_header(tmp_path / "mr")
    assert reason is None and header.modality == "MR" and header.rows == 64
    [series] = scan_study(tmp_path).series
    assert series.sop_class_uid == MRImageStorage and series.is_single_frame


def test_multiple_studies_are_recorded_and_filterable(tmp_path, caplog):
    other = generate_uid()
    a, _ = write_series(tmp_path / "a", 3, "HippoCrop")
    b, _ = write_series(tmp_path / "b", 3, "HippoCrop", study_uid=other)
    scan = scan_study(tmp_path)
    assert scan.multiple_studies and set(scan.study_uids) == {STUDY, other}
    with caplog.at_level(logging.WARNING, logger="hippo.dicom.ingest"):
        with pytest.raises(SeriesSelectionError):
            select_series(scan)
    assert "mixes 2 studies" in caplog.text
    assert select_series(scan, SelectionRules(study_uid=other)).uid == b
    with pytest.raises(StudyError, match="mixes 2 studies"):
        select_series(scan, SelectionRules(single_study=True))


def test_symlinks_outside_and_duplicates(tmp_path):
    root = tmp_path / "study"
    uid, paths = write_series(root, 3, "HippoCrop")
    outside_uid, outside = write_series(tmp_path / "elsewhere", 3, "Other")
    (root / "link_out").symlink_to(outside[0])
    (root / "dir_out").symlink_to(outside[0].parent, target_is_directory=True)
    (root / "link_in").symlink_to(paths[0])
    shutil.copy(paths[1], root / "copy_of_1")
    scan = scan_study(root)
    assert [s.uid for s in scan.series] == [uid] and scan.get(uid).n_instances == 3
    reasons = {p.name: r for p, r in scan.ignored}
    assert "outside" in reasons["link_out"]
    assert "not followed" in reasons["dir_out"]
    assert "second name" in reasons["link_in"] or "second name" in reasons[paths[0].name]
    assert "duplicate SOPInstanceUID" in reasons["copy_of_1"] or \
        "duplicate SOPInstanceUID" in reasons[paths[1].name]


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        scan_study(tmp_path, workers=0)


def test_scan_of_many_files_is_headers_only(tmp_path, monkeypatch):
    """200 files: the scan reads headers only -- every read stops before the pixels (its speed is
    measured by benchmarks/bench_deploy.py's ingest stage, not asserted here)."""
    uid, paths = write_series(tmp_path, 200, "HippoCrop")
    reads, real_dcmread = [], pydicom.dcmread

    def recording_dcmread(*args, **kwargs):
        reads.append(kwargs.get("stop_before_pixels", False))
        return real_dcmread(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", recording_dcmread)
    scan = scan_study(tmp_path, workers=4)
    assert scan.get(uid).n_instances == 200 and scan.get(uid).is_consistent
    assert len(reads) >= 200 and all(reads), f"{reads.count(False)} of {len(reads)} reads loaded the pixels"


def _set(paths, **attrs):
    for p in paths:
        ds = pydicom.dcmread(p)
        for kw, value in attrs.items():
            setattr(ds, kw, value)
        ds.save_as(p)


def test_image_types_of_maps_are_refused_but_magnitude_is_not(tmp_path):
    """ImageType values 3 on: 'M' (magnitude, what Siemens and the emulator's real cousins write)
    and 'OTHER' are anatomy; 'P' / 'PHASE', 'FIELD_MAP' / 'B0', 'ADC' / 'DIFFUSION' / 'TRACEW' and a
    DiffusionBValue > 0 are refused with what they are. 'P' in values 1-2 is never read as phase."""
    cases = {
        "magnitude": (["ORIGINAL", "PRIMARY", "M", "ND", "NORM"], None),
        "other": (["ORIGINAL", "PRIMARY", "OTHER"], None),
        "phase": (["ORIGINAL", "PRIMARY", "P", "ND"], "phase image (ImageType P)"),
        "fieldmap": (["ORIGINAL", "PRIMARY", "FIELD_MAP"], "field map (ImageType FIELD_MAP)"),
        "b0": (["DERIVED", "PRIMARY", "B0", "M"], "field map (ImageType B0)"),
        "adc": (["DERIVED", "PRIMARY", "DIFFUSION", "ADC"], "diffusion image (ImageType ADC; ImageType DIFFUSION)"),
        "tracew": (["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"], "diffusion image (ImageType DIFFUSION; "
                                                                  "ImageType TRACEW)"),
    }
    for name, (image_type, reason) in cases.items():
        uid, paths = write_series(tmp_path / name, 4, "HippoCrop")
        _set(paths, ImageType=image_type)
        reasons = SelectionRules().rejection_reasons(scan_study(tmp_path / name).get(uid))
        if reason is None:
            assert reasons == [], (name, reasons)
        else:
            assert reasons == [f"{reason}: not an anatomical magnitude image"], (name, reasons)
            assert SelectionRules(anatomical_only=False).rejection_reasons(scan_study(tmp_path / name).get(uid)) == []
    uid, paths = write_series(tmp_path / "dwi", 4, "HippoCrop")
    _set(paths[:2], DiffusionBValue=1000)
    assert SelectionRules().rejection_reasons(scan_study(tmp_path / "dwi").get(uid)) == [
        "diffusion image (DiffusionBValue > 0 in 2 of 4 images): not an anatomical magnitude image"]


def test_classic_time_series_and_mosaic_are_refused_by_name(tmp_path):
    """Several instances at each position: a time series when the headers say so (here
    NumberOfTemporalPositions / TemporalPositionIdentifier), else 'several volumes in one series';
    a lone duplicate is left to the geometry check. A mosaic flag refuses the series by name.
    single_volume=False lifts these (the geometry check still reports the duplicates)."""
    uid, a = write_series(tmp_path / "dyn", 4, "HippoCrop")
    _, b = write_series(tmp_path / "dyn2", 4, "HippoCrop")
    for k, p in enumerate(b):  # second time point of the same series, same positions
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = uid
        ds.InstanceNumber = 5 + k
        ds.save_as(tmp_path / "dyn" / f"T2_{k}")
    shutil.rmtree(tmp_path / "dyn2")
    _set(list((tmp_path / "dyn").iterdir()), NumberOfTemporalPositions=2)
    series = scan_study(tmp_path / "dyn").get(uid)
    reasons = SelectionRules().rejection_reasons(series)
    assert ("time series: 2 volumes of 4 slices at the same positions (fMRI / dynamic; "
            "NumberOfTemporalPositions 2), not one 3D volume") in reasons
    assert any("share one position" in r for r in reasons)
    assert not any("time series" in r for r in SelectionRules(single_volume=False).rejection_reasons(series))
    _set(list((tmp_path / "dyn").iterdir()), NumberOfTemporalPositions=1)
    reasons = SelectionRules().rejection_reasons(scan_study(tmp_path / "dyn").get(uid))
    assert ("2 images at each of 4 slice positions (several volumes in one series: echoes, contrasts or "
            "parts of a map), not one 3D volume") in reasons

    uid, paths = write_series(tmp_path / "one_dup", 4, "HippoCrop")
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID, ds.InstanceNumber = generate_uid(), 9
    ds.save_as(tmp_path / "one_dup" / "dup")
    reasons = SelectionRules().rejection_reasons(scan_study(tmp_path / "one_dup").get(uid))
    assert len(reasons) == 1 and reasons[0].startswith("geometry: two or more slices share one position")

    uid, paths = write_series(tmp_path / "mosaic", 4, "HippoCrop")
    _set(paths, ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"])
    reasons = SelectionRules().rejection_reasons(scan_study(tmp_path / "mosaic").get(uid))
    assert reasons == ["Siemens mosaic (ImageType MOSAIC; 4 instances): slices tiled in one image, not a volume"]


def test_unreadable_file_fails_the_study_naming_it(study, monkeypatch):
    """A slice that exists but cannot be read (permissions, I/O error) is not junk to skip: the study
    would be measured from part of its input. It fails, naming the file and why."""
    import builtins

    import hippo.dicom.ingest as ingest

    locked = study["crop_files"][2]
    real_open = builtins.open

    def guarded_open(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(ingest, "open", guarded_open, raising=False)
    with pytest.raises(StudyError, match="cannot be read") as err:
        scan_study(study["root"])
    assert str(locked) in str(err.value) and "Permission denied" in str(err.value)


def test_unlistable_folder_fails_the_study_naming_it(study, monkeypatch):
    """A sub-folder that cannot be listed hides an unknown part of the study: an error, not a skip."""
    import os

    hidden = study["root"] / "a"
    real_walk = os.walk

    def walk(top, *args, onerror=None, **kwargs):
        for dirpath, dirnames, filenames in real_walk(top, *args, onerror=onerror, **kwargs):
            if Path(dirpath) == hidden:
                onerror(PermissionError(13, "Permission denied", str(hidden)))
                dirnames[:] = []
                continue
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(os, "walk", walk)
    with pytest.raises(StudyError, match="folder cannot be listed") as err:
        scan_study(study["root"])
    assert str(hidden) in str(err.value)


def test_series_with_fewer_instances_than_announced_is_incomplete(tmp_path):
    """A series cut short (a sender that paused, a partial export): its ORIGINAL images announce
    ImagesInAcquisition 6 and only 4 are there -- refused as incomplete, never measured in part.
    A derived series (a crop may carry its source's count) is not judged by that count."""
    root = tmp_path / "study"
    uid, paths = write_series(root, 6, "HippoCrop")
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.ImageType, ds.ImagesInAcquisition = ["ORIGINAL", "PRIMARY", "M"], 6
        ds.save_as(p)
    assert select_series(scan_study(root)).uid == uid  # whole: selected
    for p in paths[4:]:
        p.unlink()
    with pytest.raises(SeriesSelectionError, match=r"incomplete: 4 of 6 instances \(ImagesInAcquisition 6\)"):
        select_series(scan_study(root))
    for p in paths[:4]:
        ds = pydicom.dcmread(p)
        ds.ImageType = ["DERIVED", "SECONDARY", "M"]
        ds.save_as(p)
    assert select_series(scan_study(root)).uid == uid
