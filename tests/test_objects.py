"""hippo.dicom.objects: the SEG and the TID 1500 SR, written to files and read back."""

from __future__ import annotations

import random

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from hippo.dicom.objects import (
    SEG_SERIES_DESCRIPTION, SR_SERIES_DESCRIPTION, make_seg, make_sr,
)
from hippo.measure import measure_volumes

N_SLICES, ROWS, COLS = 12, 32, 40
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def mr_series(n=N_SLICES, rows=ROWS, cols=COLS, shuffle=True) -> list[Dataset]:
    """A small MR series (1 mm sagittal slices, patient headers) sorted along the slice normal."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    row_dir, col_dir = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])  # sagittal slices (LPS)
    normal = np.cross(row_dir, col_dir)
    origin = np.array([10.0, -30.0, 25.0])
    slices = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID = "Doe^Jane", "PAT-0001"
        ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19530214", "F", "072Y"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250311", "101500", "1", "ACC1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, k + 1
        ds.SeriesDescription = "HippoCrop"
        ds.ImageOrientationPatient = [*row_dir.tolist(), *col_dir.tolist()]
        ds.ImagePositionPatient = (origin + k * 1.0 * normal).tolist()
        ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [1.0, 1.0], 1.0, 1.0
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = (np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) + 7 * k).tobytes()
        slices.append(ds)
    if shuffle:  # what a study walk returns; sort along the normal as the volume loader does
        random.Random(0).shuffle(slices)
    return sorted(slices, key=lambda d: float(np.dot(normal, d.ImagePositionPatient)))


def mask_frames(n=N_SLICES, rows=ROWS, cols=COLS) -> np.ndarray:
    mask = np.zeros((n, rows, cols), np.uint8)
    mask[2:7, 8:20, 5:16] = 1
    mask[5:10, 10:24, 16:33] = 2
    mask[11, 0, 0] = 2  # a lone voxel on the last slice
    return mask


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Sources, mask, SEG and SR built once and written to files."""
    tmp = tmp_path_factory.mktemp("objects")
    sources = mr_series()
    mask = mask_frames()
    seg = make_seg(sources, mask, model_version="0.1.0+test")
    seg_path = tmp / "seg.dcm"
    seg.save_as(seg_path)
    volumes = measure_volumes(mask, (1.0, 1.0, 1.0))  # counts do not depend on axis order
    sr = make_sr(sources, seg, volumes, model_version="0.1.0+test")
    sr_path = tmp / "sr.dcm"
    sr.save_as(sr_path)
    return dict(sources=sources, mask=mask, seg=seg, seg_path=seg_path, volumes=volumes, sr=sr, sr_path=sr_path)


def test_seg_reads_back_with_two_labelled_segments(case):
    seg = hd.seg.segread(case["seg_path"])
    src = case["sources"][0]
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert seg.SeriesNumber == 9002 and seg.SeriesDescription == SEG_SERIES_DESCRIPTION
    assert "research use" in seg.SeriesDescription and seg.ContentQualification == "RESEARCH"
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == src.PatientID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.get_segment_numbers() == [1, 2]
    labels = [seg.get_segment_description(i).segment_label for i in (1, 2)]
    assert labels == ["Anterior hippocampus", "Posterior hippocampus"]
    for number, modifier in ((1, "255549009"), (2, "255551008")):
        desc = seg.get_segment_description(number)
        assert desc.segmented_property_type == codes.SCT.Hippocampus
        assert desc.segmented_property_type.value == "5366008"
        assert desc.segmented_property_category == codes.SCT.AnatomicalStructure
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algo = desc.algorithm_identification[0]
        assert algo.AlgorithmName == "HippoVolume UNet" and algo.AlgorithmVersion == "0.1.0+test"
        assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        # the modifier sits inside the property type's code item, where the IOD puts it (dciodvfy)
        assert "SegmentedPropertyTypeModifierCodeSequence" not in desc
        assert desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue \
            == modifier
    # no empty frame omitted: one frame per segment per source slice
    assert seg.NumberOfFrames == 2 * N_SLICES
    per_segment = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                   for f in seg.PerFrameFunctionalGroupsSequence]
    assert per_segment.count(1) == per_segment.count(2) == N_SLICES


def test_seg_pixels_match_mask_and_sources(case):
    seg = hd.seg.segread(case["seg_path"])
    sources, mask = case["sources"], case["mask"]
    uids = [d.SOPInstanceUID for d in sources]
    labelmap = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    assert labelmap.shape == mask.shape
    np.testing.assert_array_equal(labelmap, mask)
    for number in (1, 2):
        binary = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number])
        assert int(binary.sum()) == int((mask == number).sum())
    # every frame references one source image, at that image's position (pixel-aligned)
    by_uid = {d.SOPInstanceUID: d for d in sources}
    referenced = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        source = by_uid[ref.ReferencedSOPInstanceUID]
        referenced.add(ref.ReferencedSOPInstanceUID)
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in source.ImagePositionPatient])
    assert referenced == set(uids)
    assert {u[2] for u in seg.get_source_image_uids()} == set(uids)


def test_seg_rejects_bad_input():
    sources = mr_series(n=4, shuffle=False)
    with pytest.raises(ValueError, match="shape"):
        make_seg(sources, np.zeros((3, ROWS, COLS), np.uint8), model_version="x")
    with pytest.raises(ValueError, match="outside"):
        make_seg(sources, np.full((4, ROWS, COLS), 3, np.uint8), model_version="x")
    other = mr_series(n=1, shuffle=False)
    with pytest.raises(ValueError, match="FrameOfReferenceUID|SeriesInstanceUID|StudyInstanceUID"):
        make_seg(sources[:3] + other, np.zeros((4, ROWS, COLS), np.uint8), model_version="x")


def _volume_of(group) -> tuple[float, str]:
    (measurement,) = group.get_measurements(name=codes.SCT.Volume)
    return float(measurement.value), measurement.unit.value


def test_sr_volumes_and_references(case):
    sr = hd.sr.srread(case["sr_path"])
    seg, volumes, sources = case["seg"], case["volumes"], case["sources"]
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SeriesNumber == 9003 and sr.SeriesDescription == SR_SERIES_DESCRIPTION
    assert "research use" in sr.SeriesDescription
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID and sr.PatientID == sources[0].PatientID
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"

    report = sr.content
    groups = report.get_volumetric_roi_measurement_groups()
    by_label = {str(g.tracking_identifier): g for g in groups}
    assert set(by_label) == {"Anterior hippocampus", "Posterior hippocampus"}
    expected = {"Anterior hippocampus": (1, volumes.anterior_mm3), "Posterior hippocampus": (2, volumes.posterior_mm3)}
    seg_tracking = {int(s.SegmentNumber): s.TrackingUID for s in seg.SegmentSequence}
    for label, (number, mm3) in expected.items():
        group = by_label[label]
        value, unit = _volume_of(group)
        assert value == pytest.approx(mm3) and unit == "mm3"
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == SEG_STORAGE
        assert list(ref.referenced_segment_numbers) == [number]
        assert {s.referenced_sop_instance_uid for s in ref.source_images_for_segmentation} == {
            d.SOPInstanceUID for d in sources}
        assert group.tracking_uid == seg_tracking[number]
    (total,) = report.get_image_measurement_groups()
    assert str(total.tracking_identifier) == "Total hippocampus"
    value, unit = _volume_of(total)
    assert value == pytest.approx(volumes.total_mm3) and unit == "mm3"
    assert volumes.total_mm3 == int((case["mask"] > 0).sum())

    # evidence: the SEG and every source image
    evidence = {
        sop.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert {d.SOPInstanceUID for d in sources} <= evidence


def test_sr_accepts_a_seg_read_from_file(case):
    seg = pydicom.dcmread(case["seg_path"])
    sr = make_sr(case["sources"], seg, case["volumes"], model_version="0.1.0+test")
    assert sr.SeriesNumber == 9003


def test_sr_rejects_foreign_seg(case):
    other = mr_series(n=2, shuffle=False)
    seg = make_seg(other, np.zeros((2, ROWS, COLS), np.uint8), model_version="x")
    with pytest.raises(ValueError, match="another study"):
        make_sr(case["sources"], seg, case["volumes"], model_version="x")


def test_empty_prediction_still_gives_seg_and_sr():
    """A model that finds nothing still yields a complete SEG (all frames) and an SR of zeros."""
    sources = mr_series(n=3, shuffle=False)
    empty = np.zeros((3, ROWS, COLS), np.uint8)
    seg = make_seg(sources, empty, model_version="x")
    assert seg.NumberOfFrames == 6
    sr = make_sr(sources, seg, measure_volumes(empty, (1, 1, 1)), model_version="x")
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr)  # parse the content tree
    (total,) = sr.content.get_image_measurement_groups()
    assert _volume_of(total) == (0.0, "mm3")
