"""hippo.scanner: NIfTI -> DICOM MR series with exact geometry, emulated studies, C-STORE sending."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import ALL_TRANSFER_SYNTAXES

from fakes import StorageSCP
from hippo.data.nifti import load_nifti
from hippo.preprocessing import label_volumes_mm3
from hippo.dicom.volume import load_series
from hippo.scanner import DISTRACTOR_DESCRIPTIONS, MANUFACTURER, ScannerSendError, StudyInfo, send_study, \
    write_series, write_study
from hippo.scanner.__main__ import main
from hippo.network.orthanc import free_port as _free_port


def _oblique() -> np.ndarray:
    """Rotated 20 deg about the RAS y axis, 0.9 x 1.1 x 1.5 mm, with an offset."""
    t = np.radians(20)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.9, 1.1, 1.5])
    aff[:3, 3] = [-12.5, 30.25, 7.0]
    return aff


AFFINES = {
    "identity": np.eye(4),
    "anisotropic_flipped": np.diag([-0.8, 1.0, 2.0, 1.0]),
    "oblique": _oblique(),
}


def _canonical(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What load_series must return: the volume and affine in closest canonical RAS."""
    ornt = io_orientation(affine)
    return apply_orientation(vol, ornt), affine @ inv_ornt_aff(ornt, vol.shape)


# --------------------------------------------------------------------------------------------
# write_series round trips


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
@pytest.mark.parametrize("affine_name", list(AFFINES))
def test_uint8_round_trip_is_exact_with_same_affine(tmp_path, nifti_writer, slice_axis, affine_name):
    affine = AFFINES[affine_name]
    vol = np.random.default_rng(slice_axis).integers(0, 256, size=(5, 6, 4)).astype(np.uint8)
    path = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    array, _, nifti_affine = load_nifti(path)
    paths = write_series(array, nifti_affine, tmp_path / "dcm", study=StudyInfo(seed=0), slice_axis=slice_axis)
    assert len(paths) == vol.shape[slice_axis]
    sv = load_series(paths)
    expected, expected_affine = _canonical(vol, nifti_affine)
    np.testing.assert_array_equal(sv.array, expected)
    np.testing.assert_allclose(sv.affine, expected_affine, atol=1e-5)
    np.testing.assert_allclose(sv.spacing, np.linalg.norm(nifti_affine[:3, :3], axis=0)[np.argsort(
        io_orientation(nifti_affine)[:, 0])], atol=1e-6)
    assert sv.warnings == []


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_float_round_trip_within_tolerance(tmp_path, slice_axis):
    affine = AFFINES["anisotropic_flipped"]
    vol = np.random.default_rng(1).normal(100.0, 40.0, size=(6, 5, 4)).astype(np.float32)
    paths = write_series(vol, affine, tmp_path, study=StudyInfo(seed=1), slice_axis=slice_axis)
    sv = load_series(paths)
    expected, expected_affine = _canonical(vol, affine)
    value_range = float(vol.max() - vol.min())
    assert np.abs(sv.array - expected).max() <= 1e-3 * value_range
    np.testing.assert_allclose(sv.affine, expected_affine, atol=1e-5)
    ds = pydicom.dcmread(paths[0])
    assert ds.PixelRepresentation == 0 and ds.BitsAllocated == 16 and float(ds.RescaleSlope) != 1.0


def test_label_round_trip_is_exact(tmp_path, pair_writer):
    _, label_path = pair_writer(tmp_path, shape=(6, 8, 10))
    label, spacing, affine = load_nifti(label_path)
    paths = write_series(label, affine, tmp_path / "dcm", study=StudyInfo(seed=2), series_description="label")
    sv = load_series(paths)
    assert set(np.unique(sv.array).tolist()) == {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(sv.array.astype(np.uint8), label)
    assert label_volumes_mm3(sv.array.astype(np.uint8), sv.spacing) == label_volumes_mm3(label, spacing)


def test_signed_integers_round_trip_exactly(tmp_path):
    vol = np.random.default_rng(3).integers(-1000, 3000, size=(4, 4, 3)).astype(np.int16)
    paths = write_series(vol, np.eye(4), tmp_path, study=StudyInfo(seed=3))
    assert pydicom.dcmread(paths[0]).PixelRepresentation == 1
    np.testing.assert_array_equal(load_series(paths).array, vol)
    wide = np.random.default_rng(3).integers(100000, 150000, size=(4, 4, 3)).astype(np.int32)
    paths = write_series(wide, np.eye(4), tmp_path / "wide", study=StudyInfo(seed=3))
    np.testing.assert_array_equal(load_series(paths).array, wide)


def test_headers_are_realistic_and_geometry_is_in_lps(tmp_path):
    study = StudyInfo(seed=4)
    vol = np.zeros((5, 4, 3), np.uint8)
    paths = write_series(vol, np.diag([-0.8, 1.0, 2.0, 1.0]), tmp_path, study=study, series_number=7)
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "MR" and ds.Manufacturer == MANUFACTURER and ds.SeriesDescription == "HippoCrop"
    assert ds.SeriesNumber == 7 and ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
    assert ds.StudyInstanceUID == study.study_instance_uid
    assert ds.FrameOfReferenceUID == study.frame_of_reference_uid
    assert ds.PatientID == study.patient_id and str(ds.PatientName) == study.patient_name
    assert ds.AccessionNumber == study.accession_number and float(ds.MagneticFieldStrength) == 3.0
    # columns run along voxel X (0.8 mm), rows along Y (1 mm): PixelSpacing is [row, column] spacing
    assert (ds.Rows, ds.Columns) == (4, 5)
    assert [float(v) for v in ds.PixelSpacing] == [1.0, 0.8]
    assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 2.0
    # RAS X is flipped (-0.8) -> LPS +x; rows go posterior (+y LPS): radiological axial display
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])
    positions = [[float(v) for v in pydicom.dcmread(p).ImagePositionPatient] for p in paths]
    np.testing.assert_allclose(positions, [[0, -3, 0], [0, -3, 2], [0, -3, 4]])
    assert [int(pydicom.dcmread(p).InstanceNumber) for p in paths] == [1, 2, 3]
    assert [float(pydicom.dcmread(p).SliceLocation) for p in paths] == [0.0, 2.0, 4.0]
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in paths}) == 3


def test_file_name_modes(tmp_path):
    vol = np.zeros((3, 3, 3), np.uint8)
    study = StudyInfo(seed=5)
    by_instance = write_series(vol, np.eye(4), tmp_path / "i", study=study, file_names="instance")
    assert [p.name for p in by_instance] == ["IM00001.dcm", "IM00002.dcm", "IM00003.dcm"]
    by_uid = write_series(vol, np.eye(4), tmp_path / "u", study=study, file_names="uid")
    assert all(p.name == f"{pydicom.dcmread(p).SOPInstanceUID}.dcm" for p in by_uid)
    by_random = write_series(vol, np.eye(4), tmp_path / "r", study=study, file_names="random")
    assert all(p.suffix == "" and len(p.name) == 16 for p in by_random)
    assert not list((tmp_path / "i").glob(".*tmp"))  # atomic writes leave no temporaries
    with pytest.raises(ValueError, match="slice_axis"):
        write_series(vol, np.eye(4), tmp_path, study=study, slice_axis=3)
    with pytest.raises(ValueError, match="NaN"):
        write_series(np.full((2, 2, 2), np.nan, np.float32), np.eye(4), tmp_path, study=study)


def test_study_info_is_deterministic_and_consistent():
    a, b, c = StudyInfo(seed=11), StudyInfo(seed=11), StudyInfo(seed=12)
    assert a == b and a.study_instance_uid != c.study_instance_uid
    assert a.patient_age.endswith("Y") and len(a.patient_age) == 4
    study_day = dt.datetime.strptime(a.study_date, "%Y%m%d").date()
    birth = dt.datetime.strptime(a.patient_birth_date, "%Y%m%d").date()
    years = study_day.year - birth.year - ((study_day.month, study_day.day) < (birth.month, birth.day))
    assert a.patient_age == f"{years:03d}Y"
    assert a.patient_sex in ("F", "M")
    assert StudyInfo().study_instance_uid != StudyInfo().study_instance_uid
    assert StudyInfo(patient_age="072Y", seed=1).patient_age == "072Y"


# --------------------------------------------------------------------------------------------
# write_study


def test_write_study_nested_with_distractors_and_junk(tmp_path, pair_writer):
    image_path, label_path = pair_writer(tmp_path / "nifti", shape=(6, 8, 10))
    manifest = write_study(image_path, tmp_path / "study", label_path=label_path, seed=3, nested=True)
    assert set(manifest["series_uids"]) == {"HippoCrop", *DISTRACTOR_DESCRIPTIONS}
    assert len(set(manifest["series_uids"].values())) == 4
    for name in ("README.txt", "notes.txt", ".DS_Store", "Thumbs.db", "broken.dcm"):
        assert any(Path(p).name == name and Path(p).is_file() for p in manifest["junk_files"])
    crop_files = [Path(p) for p in manifest["files"]["HippoCrop"]]
    assert len(crop_files) == 10 and len(crop_files[0].relative_to(tmp_path / "study").parts) >= 4
    image, _, affine = load_nifti(image_path)
    frames = set()
    for desc, files in manifest["files"].items():
        sv = load_series(files)
        assert len(sv.datasets) == manifest["series"][desc]["n_instances"]
        ds = sv.datasets[0]
        assert ds.StudyInstanceUID == manifest["study_instance_uid"]
        assert ds.SeriesInstanceUID == manifest["series_uids"][desc] and ds.SeriesDescription == desc
        frames.add(ds.FrameOfReferenceUID)
        if desc == "HippoCrop":
            np.testing.assert_allclose(sv.array, image, atol=1e-3 * float(image.max() - image.min()))
            np.testing.assert_allclose(sv.affine, affine, atol=1e-5)
        else:
            assert sv.array.max() > 0 and sv.array.shape[0] >= 10
    assert frames == {manifest["frame_of_reference_uid"]}
    t1 = pydicom.dcmread(manifest["files"]["T1 MPRAGE full brain"][0])
    assert abs(float(t1.ImageOrientationPatient[0])) < 0.5  # sagittal, tilted: not the crop's orientation
    # tiny_pair's label: anterior box 2 x 3 x 3 voxels, posterior box 2 x 3 x 3, 1 mm voxels
    assert manifest["label_volumes_mm3"] == {"anterior_mm3": 18.0, "posterior_mm3": 18.0, "total_mm3": 36.0}


def test_write_study_flat_without_distractors_is_deterministic(tmp_path, pair_writer):
    image_path, _ = pair_writer(tmp_path / "nifti", shape=(4, 5, 3))
    first = write_study(image_path, tmp_path / "a", distractors=False, seed=9)
    second = write_study(image_path, tmp_path / "b", distractors=False, seed=9)
    assert list(first["series_uids"]) == ["HippoCrop"] and first["label_volumes_mm3"] is None
    assert first["series_uids"] == second["series_uids"] and first["junk_files"] == []
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(Path(p).name for p in first["files"]["HippoCrop"])


@pytest.mark.realdata
def test_real_study_manifest_label_volumes(tmp_path, real_data_root):
    image_path = real_data_root / "imagesTr/hippocampus_001.nii.gz"
    label_path = real_data_root / "labelsTr/hippocampus_001.nii.gz"
    manifest = write_study(image_path, tmp_path, label_path=label_path, seed=1, nested=True)
    img = nib.load(str(label_path))     # counted here from the file, not by hippo's own helper
    label, voxel_mm3 = np.asarray(img.dataobj), float(np.prod(img.header.get_zooms()[:3]))
    expected = {"anterior_mm3": np.count_nonzero(label == 1) * voxel_mm3,
                "posterior_mm3": np.count_nonzero(label == 2) * voxel_mm3}
    assert expected["anterior_mm3"] > 0 and expected["posterior_mm3"] > 0
    got = manifest["label_volumes_mm3"]
    assert got["anterior_mm3"] == pytest.approx(expected["anterior_mm3"])
    assert got["posterior_mm3"] == pytest.approx(expected["posterior_mm3"])
    assert got["total_mm3"] == pytest.approx(expected["anterior_mm3"] + expected["posterior_mm3"])
    image, _, affine = load_nifti(image_path)
    sv = load_series(manifest["files"]["HippoCrop"])
    np.testing.assert_array_equal(sv.array, image)  # uint8 crops are stored exactly
    np.testing.assert_allclose(sv.affine, affine, atol=1e-6)


# --------------------------------------------------------------------------------------------
# send_study


def test_send_study_stores_every_instance(tmp_path, pair_writer):
    image_path, _ = pair_writer(tmp_path / "nifti", shape=(4, 5, 6))
    manifest = write_study(image_path, tmp_path / "study", distractors=False, seed=2, nested=True)
    expected = {pydicom.dcmread(p).SOPInstanceUID for p in manifest["files"]["HippoCrop"]}
    with StorageSCP(sop_classes=[MRImageStorage], transfer_syntaxes=ALL_TRANSFER_SYNTAXES) as server:
        result = send_study(tmp_path / "study", "127.0.0.1", server.port)
    assert result["total"] == result["sent"] == len(expected) == 6
    assert result["failed"] == 0 and result["failures"] == []
    assert result["skipped_non_dicom"] == len(manifest["junk_files"])
    assert set(server.stored_uids()) == expected


def test_send_to_closed_port_is_a_clear_error(tmp_path, pair_writer):
    image_path, _ = pair_writer(tmp_path / "nifti", shape=(3, 3, 3))
    write_study(image_path, tmp_path / "study", distractors=False, seed=2)
    port = _free_port()
    with pytest.raises(ScannerSendError, match=f"cannot reach DICOM peer ORTHANC@127.0.0.1:{port}"):
        send_study(tmp_path / "study", "127.0.0.1", port)
    with pytest.raises(ScannerSendError, match="no DICOM files"):
        (tmp_path / "empty").mkdir()
        send_study(tmp_path / "empty", "127.0.0.1", port)


# --------------------------------------------------------------------------------------------
# command line


def test_cli_write_and_send_errors(tmp_path, pair_writer, capsys):
    image_path, label_path = pair_writer(tmp_path / "nifti", shape=(4, 5, 3))
    out = tmp_path / "out"
    rc = main(["write", "--nifti", str(image_path), "--out", str(out), "--label", str(label_path),
               "--no-distractors", "--seed", "1", "--manifest", str(tmp_path / "manifest.json")])
    assert rc == 0
    assert '"HippoCrop": 3' in capsys.readouterr().out and (tmp_path / "manifest.json").is_file()
    rc = main(["send", "--dir", str(out), "--host", "127.0.0.1", "--port", str(_free_port())])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("hippo.scanner: error: cannot reach DICOM peer") and err.count("\n") == 1


def test_cli_module_entry_point_reports_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hippo.scanner", "write", "--nifti", str(tmp_path / "nope.nii.gz"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("hippo.scanner: error:") and "nope.nii.gz" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_enhanced_layouts_from_the_api_and_the_command_line(tmp_path, capsys):
    """write_series writes the enhanced layouts (issue 28) and refuses nonsense; write-wholehead
    --t1-layout writes the T1 as several Enhanced MR instances with per-frame groups."""
    vol = np.arange(6 * 7 * 8, dtype=np.uint16).reshape(6, 7, 8)
    aff = np.diag([1.0, 1.2, 2.0, 1.0])
    paths = write_series(vol, aff, tmp_path / "enh", study=StudyInfo(seed=3), layout="enhanced", frames_per_instance=3)
    assert len(paths) == 3  # 8 slices: 3 + 3 + 2 frames
    ds = [pydicom.dcmread(p) for p in paths]
    assert [int(d.NumberOfFrames) for d in ds] == [3, 3, 2] and [int(d.InstanceNumber) for d in ds] == [1, 2, 3]
    assert {str(d.SOPClassUID) for d in ds} == {pydicom.uid.EnhancedMRImageStorage}
    assert len({str(d.SeriesInstanceUID) for d in ds}) == 1 and len({str(d.SOPInstanceUID) for d in ds}) == 3
    timing = ds[0].SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence[0]
    assert float(timing.RepetitionTime) == 2300 and "RepetitionTime" not in ds[0]
    np.testing.assert_array_equal(load_series(paths).array, load_series(
        write_series(vol, aff, tmp_path / "classic", study=StudyInfo(seed=3))).array)
    for bad, match in (({"layout": "mosaic"}, "layout"), ({"layout": "enhanced", "modality": "CT"}, "MR only"),
                       ({"layout": "enhanced", "frames_per_instance": 0}, "frames_per_instance"),
                       ({"layout": "enhanced", "functional_groups": "some"}, "functional_groups")):
        with pytest.raises(ValueError, match=match):
            write_series(vol, aff, tmp_path / "bad", study=StudyInfo(seed=3), **bad)

    head = nib.Nifti1Image((np.random.default_rng(0).random((30, 34, 28)) * 400).astype(np.float32),
                           np.diag([4.0, 4.0, 4.0, 1.0]))
    nib.save(head, str(tmp_path / "head.nii.gz"))
    rc = main(["write-wholehead", "--scan", str(tmp_path / "head.nii.gz"), "--out", str(tmp_path / "wh"),
               "--no-distractors", "--no-localizer", "--seed", "2", "--t1-layout", "enhanced",
               "--frames-per-instance", "10", "--per-frame-groups"])
    assert rc == 0 and '"t1_mprage_sag": 3' in capsys.readouterr().out  # 30 sagittal slices, 10 per instance
    first = pydicom.dcmread(sorted((tmp_path / "wh").iterdir())[0], stop_before_pixels=True)
    assert "PlaneOrientationSequence" in first.PerFrameFunctionalGroupsSequence[0]
    assert main(["write-wholehead", "--scan", str(tmp_path / "head.nii.gz"), "--out", str(tmp_path / "x"),
                 "--per-frame-groups"]) == 1
    assert "need --t1-layout enhanced or legacy" in capsys.readouterr().err
