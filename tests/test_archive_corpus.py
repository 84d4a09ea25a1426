"""Studies as real archives send them: a header-mutation corpus made from the real data.

A HippoCrop study is written from a real Decathlon crop (``hippo.scanner``), then every attribute that
archives and anonymisers drop or mangle is, in turn, removed, emptied or given a malformed value in
every file of the study. Each mutated study goes through the whole pipeline
(:class:`hippo.deploy.pipeline.StudyProcessor`). The promise tested: for every mutation either the SC, SEG and
SR are written and pass ``dciodvfy`` (Debian ``dicom3tools``) without errors, with the empty Type 2
values the source implies and ``result.json`` naming the field, or -- only for a missing Type 1
attribute without which there is no volume -- the study fails with an error naming the attribute and
a file. The one exception is SeriesDescription absent or empty: it is what the selection rules find
the crop by, so such a study fails at ingest, naming the unlabelled series and why it was passed
over. A small random network stands in for the shipped model: the headers, not the volumes, are
under test here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword

from conftest import ANY_VOLUME, dciodvfy_problems, require_real_data

pytestmark = pytest.mark.realdata

#: Type 2 and 3 attributes archives drop or mangle -> a malformed value seen in real exports.
MALFORMED = {
    "PatientName": "DOE^JOHN\nSMITH",          # a newline from a free-text field
    "PatientID": "12\x0134",                   # a control character
    "PatientBirthDate": "1951-05-16",         # ISO date instead of YYYYMMDD
    "PatientSex": "male",                     # free text instead of M/F/O
    "PatientAge": "075",                      # no unit
    "StudyDate": "20190230",                  # no such day
    "StudyTime": "25:61:00",                  # colons, hour 25
    "StudyID": "STUDY-ID-LONGER-THAN-16",     # over the SH limit
    "AccessionNumber": "ACC\\0001",           # a backslash: two values where one is allowed
    "ReferringPhysicianName": "A^B^C^D^E^F^G",  # more components than a person name has
    "StudyDescription": "MRI\x07HEAD",         # a bell character
    "SeriesNumber": "x1",                     # not an integer string
    "SeriesDescription": "HippoCrop\rleft",   # a carriage return (the series is still found)
    "InstitutionName": "X" * 80,              # over the LO limit
    "Manufacturer": "Vendor\x00Name",          # a NUL inside
    "BodyPartExamined": "brain",              # lower case is not a code string
    "InstanceNumber": "one",                  # not an integer string
}
#: Dropped or emptied by archives; the series stays selectable (SeriesDescription is what the rules
#: look for, so only its malformed variant is tried).
TYPE2_OR_3 = sorted(MALFORMED)
#: Type 1 attributes without which no volume can be built.
TYPE1 = ["PixelData", "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"]


def _raw(keyword: str, text: str) -> RawDataElement:
    """``text`` as the raw value of ``keyword``, written as it is (no validation, as a PACS would)."""
    from pydicom.datadict import dictionary_VR

    tag = tag_for_keyword(keyword)
    value = text.encode("latin-1")
    if len(value) % 2:
        value += b" "
    return RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


def _mutate(src: Path, dst: Path, keyword: str, how: str) -> None:
    """Copy the study ``src`` to ``dst`` with ``keyword`` removed / emptied / malformed in every file
    (SeriesDescription: in the HippoCrop series only, else every series would look like one)."""
    dst.mkdir(parents=True)
    tag = tag_for_keyword(keyword)
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        if keyword == "SeriesDescription" and ds.SeriesDescription != "HippoCrop":
            pass
        elif how == "absent":
            if tag in ds:
                del ds[tag]
        elif how == "empty":
            ds[tag] = _raw(keyword, "")
        else:
            ds[tag] = _raw(keyword, MALFORMED[keyword])
        ds.save_as(dst / f.name)


@pytest.fixture(scope="module")
def base_study(tmp_path_factory) -> Path:
    """A real-data HippoCrop study (hippocampus_001, with the emulator's distractor series)."""
    from hippo.scanner import write_study

    root = require_real_data()
    out = tmp_path_factory.mktemp("corpus") / "base"
    write_study(root / "imagesTr/hippocampus_001.nii.gz", out, seed=7)
    return out


@pytest.fixture(scope="module")
def processor(model_file, tmp_path_factory):
    from hippo.deploy.pipeline import build_processor

    return build_processor(model_file, tmp_path_factory.mktemp("corpus_out"), write_png=False, plausibility=ANY_VOLUME)


def _check_objects(outcome) -> dict:
    """The three objects exist and pass dciodvfy without errors; returns result.json."""
    assert outcome.status == "ok", f"{outcome.stage}: {outcome.error}"
    for name in ("report_sc", "seg", "sr"):
        errors = dciodvfy_problems(outcome.files[name])["errors"]
        assert not errors, f"{name}: {errors}"
    return json.loads(Path(outcome.files["result_json"]).read_text())


def test_complete_study_gives_conformant_objects(base_study, processor):
    """The emulator's tidy study: objects valid, nothing reported missing but the Type 3 fields the
    emulator does not write."""
    result = _check_objects(processor.process(base_study))
    assert result["header"]["malformed"] == {}
    assert "PatientName" not in result["header"]["missing"]


@pytest.mark.parametrize("how", ["absent", "empty"])
@pytest.mark.parametrize("keyword", TYPE2_OR_3)
def test_dropped_type2_and_type3_attributes_still_give_valid_objects(base_study, processor, tmp_path, keyword, how):
    """An archive's export without (or with an empty) attribute: all three objects are made, valid,
    with the Type 2 patient/study attributes present and empty -- never an invented value -- and
    ``result.json`` names the field. SeriesDescription is how the selection rules find the crop:
    without it the crop is not guessed at, the study fails at ingest and the error shows the series
    (number 5, description '') and why it was passed over."""
    study = tmp_path / "study"
    _mutate(base_study, study, keyword, how)
    outcome = processor.process(study)
    if keyword == "SeriesDescription":
        assert (outcome.status, outcome.stage) == ("failed", "ingest"), outcome.error
        for fragment in ("no series matches the HippoCrop selection rules", "#5 MR '' (35 instances)",
                         "description does not contain 'HippoCrop'"):
            assert fragment in outcome.error, outcome.error
        return
    result = _check_objects(outcome)
    assert keyword in result["header"]["missing"]
    for name in ("report_sc", "seg", "sr"):
        ds = pydicom.dcmread(outcome.files[name])
        if keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "StudyID", "AccessionNumber", "ReferringPhysicianName"):
            assert keyword in ds and str(ds[keyword].value or "") == "", f"{name}: {keyword} {ds.get(keyword)!r}"


@pytest.mark.parametrize("keyword", TYPE2_OR_3)
def test_malformed_values_are_left_out_not_copied(base_study, processor, tmp_path, keyword):
    """A malformed value never reaches our objects (it would make them invalid): left out, the Type 2
    ones emptied, and ``result.json`` says which field and why."""
    study = tmp_path / "study"
    _mutate(base_study, study, keyword, "malformed")
    outcome = processor.process(study)
    result = _check_objects(outcome)
    assert keyword in result["header"]["malformed"], result["header"]
    for name in ("report_sc", "seg", "sr"):
        ds = pydicom.dcmread(outcome.files[name])
        value = str(ds.get(keyword, "") or "")
        assert value != MALFORMED[keyword].strip(), f"{name} copied the malformed {keyword}"


def test_trailing_blank_in_a_date_is_trimmed_not_dropped(base_study, processor, tmp_path):
    """``"19510516 "`` (a blank where an archive pads) is a valid date once trimmed: kept."""
    study = tmp_path / "study"
    study.mkdir()
    for f in sorted(base_study.iterdir()):
        ds = pydicom.dcmread(f)
        ds[tag_for_keyword("PatientBirthDate")] = _raw("PatientBirthDate", "19510516 ")
        ds.save_as(study / f.name)
    outcome = processor.process(study)
    result = _check_objects(outcome)
    assert "PatientBirthDate" not in result["header"]["malformed"]
    assert "PatientBirthDate" not in result["header"]["missing"]
    for name in ("report_sc", "seg", "sr"):
        assert pydicom.dcmread(outcome.files[name]).PatientBirthDate == "19510516"


def test_everything_optional_stripped_at_once(base_study, processor, tmp_path):
    """An aggressively anonymised export: every Type 2/3 attribute above gone at once."""
    study = tmp_path / "study"
    study.mkdir()
    for f in sorted(base_study.iterdir()):
        ds = pydicom.dcmread(f)
        for keyword in TYPE2_OR_3:
            if keyword != "SeriesDescription" and keyword in ds:
                del ds[keyword]
        ds.save_as(study / f.name)
    result = _check_objects(processor.process(study))
    assert set(TYPE2_OR_3) - {"SeriesDescription"} <= set(result["header"]["missing"])


@pytest.mark.parametrize("keyword", TYPE1)
def test_missing_type1_geometry_fails_naming_attribute_and_file(base_study, processor, tmp_path, keyword):
    """Without pixel data, rows, spacing, orientation or position there is no volume: the study fails,
    and the error names the attribute and a file that lacks it."""
    study = tmp_path / "study"
    study.mkdir()
    hippo_files = []
    for f in sorted(base_study.iterdir()):
        ds = pydicom.dcmread(f)
        if "HippoCrop" in str(ds.get("SeriesDescription", "")):
            if keyword in ds:
                del ds[keyword]
            hippo_files.append(f.name)
        ds.save_as(study / f.name)
    outcome = processor.process(study)
    assert outcome.status == "failed"
    shown = "Pixel Data" if keyword == "PixelData" else keyword
    assert shown in outcome.error, outcome.error
    assert any(name in outcome.error for name in hippo_files), outcome.error


def test_missing_frame_of_reference_fails_naming_attribute_and_file(base_study, processor, tmp_path):
    """FrameOfReferenceUID (Type 1) places the SEG on the images; without it no SEG can be made, and
    the error says so instead of a Python attribute name."""
    study = tmp_path / "study"
    study.mkdir()
    for f in sorted(base_study.iterdir()):
        ds = pydicom.dcmread(f)
        if "FrameOfReferenceUID" in ds:
            del ds.FrameOfReferenceUID
        ds.save_as(study / f.name)
    outcome = processor.process(study)
    assert outcome.status == "failed"
    assert "FrameOfReferenceUID" in outcome.error and str(study) in outcome.error, outcome.error


def test_dciodvfy_sees_errors_when_there_are_some(tmp_path):
    """The validator is really consulted: a Secondary Capture without its Type 1 SOP Instance UID is an error."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.Modality = "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_problems(path)["errors"]


def test_enhanced_multiframe_source_gives_conformant_objects(base_study, processor, tmp_path):
    """The HippoCrop series as one Legacy Converted Enhanced MR instance (what archives that convert
    classic series send): the SEG references frames of the one instance; all three objects pass."""
    import highdicom as hd

    crop = [pydicom.dcmread(f) for f in sorted(base_study.iterdir())]
    crop = [ds for ds in crop if ds.SeriesDescription == "HippoCrop"]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        crop, series_instance_uid=crop[0].SeriesInstanceUID, series_number=5,
        sop_instance_uid=hd.UID(), instance_number=1)
    study = tmp_path / "study"
    study.mkdir()
    enhanced.save_as(study / "enhanced.dcm")
    outcome = processor.process(study)
    _check_objects(outcome)
    seg = pydicom.dcmread(outcome.files["seg"])
    refs = {str(item.ReferencedSOPInstanceUID) for f in seg.PerFrameFunctionalGroupsSequence
            for item in f.DerivationImageSequence[0].SourceImageSequence}
    assert refs == {str(enhanced.SOPInstanceUID)}
