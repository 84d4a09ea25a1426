"""hippo.dicom.report: the report page and its Secondary Capture."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from hippo.dicom.report import (
    DISCLAIMER, PAGE_SIZE, SC_SERIES_DESCRIPTION, SC_SOP_CLASS_UID, patient_study_from_dataset,
    render_report, secondary_capture,
)
from hippo.measure import measure_volumes

#: Where the test writes the page it renders, for a person to look at (HIPPO_REPORT_DIR overrides).
REPORT_PNG = Path(os.environ.get("HIPPO_REPORT_DIR", "/tmp/hippo_report")) / "test_report.png"


def _case(shape=(24, 32, 20)):
    """A small synthetic (X, Y, Z) RAS volume with an elongated two-part 'hippocampus'."""
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    image = 300 + 200 * np.sin(x / 3.0) * np.cos(y / 4.0) + 5 * z
    mask = np.zeros(shape, np.uint8)
    body = ((x - 12) / 4) ** 2 + ((z - 10) / 3) ** 2 <= 1
    mask[body & (y >= 6) & (y < 16)] = 2  # posterior part: lower y
    mask[body & (y >= 16) & (y < 26)] = 1  # anterior part: higher y (RAS: +y is anterior)
    image[mask > 0] += 150
    return image.astype(np.float32), mask


def _source() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PAT-0001"
    ds.PatientBirthDate = "19530214"
    ds.PatientSex = "F"
    ds.PatientAge = "072Y"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = "20250311", "101500"
    ds.AccessionNumber = "ACC12345"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MR Brain"
    ds.SeriesDescription = "HippoCrop"
    return ds


MODEL = {"name": "HippoVolume UNet", "version": "0.1.0+test", "trained_on": "Decathlon Task04 (test)",
         "metrics": {"dice_anterior": 0.88, "dice_posterior": 0.86}}


def _colour_counts(page: Image.Image) -> tuple[int, int]:
    """Pixels that look orange (anterior overlay) and cyan (posterior overlay)."""
    a = np.asarray(page.convert("RGB")).astype(int)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    orange = (r - b > 60) & (r > g) & (g - b > 20)
    cyan = (b - r > 60) & (g - r > 40)
    return int(orange.sum()), int(cyan.sum())


def _render(image, mask, age, sex, spacing=(1.0, 1.0, 1.0)):
    patient, study = patient_study_from_dataset(_source())
    patient.update(age=age, sex=sex)
    vols = measure_volumes(mask, spacing)
    return render_report(image, mask, spacing, patient=patient, study=study, volumes=vols, model=MODEL,
                         timestamp=dt.datetime(2025, 3, 11, 14, 5, tzinfo=dt.timezone.utc))


def test_render_report_size_and_overlay_colours():
    image, mask = _case()
    page = _render(image, mask, "072Y", "F")
    REPORT_PNG.parent.mkdir(parents=True, exist_ok=True)
    page.save(REPORT_PNG)
    assert page.mode == "RGB" and page.size == PAGE_SIZE
    orange, cyan = _colour_counts(page)
    blank_orange, blank_cyan = _colour_counts(_render(image, np.zeros_like(mask), "072Y", "F"))
    # the overlay adds thousands of coloured pixels over what legend and swatches draw
    assert orange - blank_orange > 2000 and cyan - blank_cyan > 2000
    assert blank_orange > 0 and blank_cyan > 0  # the legend swatches are there even without mask


def test_render_report_without_age_sex_and_anisotropic():
    image, mask = _case()
    page = _render(image, mask, "", "", spacing=(1.0, 0.8, 2.0))
    assert page.size == PAGE_SIZE
    page.save(REPORT_PNG.with_name("test_report_no_age.png"))
    page2 = render_report(image, mask, (1, 1, 1), patient={}, study={}, volumes=measure_volumes(mask, (1, 1, 1)),
                          model={})
    assert page2.size == PAGE_SIZE


def test_render_report_rejects_mismatched_shapes():
    image, mask = _case()
    with pytest.raises(ValueError, match="shape"):
        render_report(image[:-1], mask, (1, 1, 1), patient={}, study={},
                      volumes=measure_volumes(mask, (1, 1, 1)), model={})


def test_secondary_capture_round_trip(tmp_path):
    image, mask = _case()
    page = _render(image, mask, "072Y", "F")
    source = _source()
    ds = secondary_capture(page, source)
    path = tmp_path / "sc.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPClassUID == SC_SOP_CLASS_UID
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert back.SOPClassUID == SC_SOP_CLASS_UID
    assert back.SamplesPerPixel == 3 and back.PhotometricInterpretation == "RGB"
    assert (back.Rows, back.Columns) == (PAGE_SIZE[1], PAGE_SIZE[0])
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientID == source.PatientID and str(back.PatientName) == "Doe^Jane"
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.SeriesNumber == 9001 and back.SeriesDescription == SC_SERIES_DESCRIPTION
    assert "research use" in back.SeriesDescription
    assert back.ConversionType == "WSD" and back.BurnedInAnnotation == "YES"
    assert back.AccessionNumber == "ACC12345" and back.PatientAge == "072Y"
    np.testing.assert_array_equal(back.pixel_array, np.asarray(page))


def test_secondary_capture_needs_study_uid():
    src = _source()
    del src.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        secondary_capture(Image.new("RGB", (8, 8)), src)


def test_disclaimer_wording():
    assert DISCLAIMER == "Research use only — not for diagnostic use"
