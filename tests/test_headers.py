"""hippo.dicom.headers: the cleaned copies of source headers that the result objects are made from."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword

from hippo.dicom.headers import REPORTED_ATTRIBUTES, TYPE2_PATIENT_STUDY, clean_source_headers, value_problem
from hippo.dicom.report import NOT_GIVEN, _fmt_age, _fmt_date, _fmt_name, _fmt_sex


def _source():
    return pydicom.dcmread(get_testdata_file("MR_small.dcm"))


def _raw(ds, keyword, text):
    tag = tag_for_keyword(keyword)
    value = text.encode("latin-1")
    value += b" " * (len(value) % 2)
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


@pytest.mark.parametrize("keyword, vr, text, ok", [
    ("PatientBirthDate", "DA", "19510516", True),
    ("PatientBirthDate", "DA", "1951-05-16", False),
    ("StudyDate", "DA", "20190230", False),
    ("StudyTime", "TM", "235959.123456", True),
    ("StudyTime", "TM", "25:61:00", False),
    ("PatientAge", "AS", "075Y", True),
    ("PatientAge", "AS", "075", False),
    ("PatientSex", "CS", "F", True),
    ("PatientSex", "CS", "male", False),
    ("PatientSex", "CS", "U", False),
    ("PatientName", "PN", "Müller^Jürgen", True),
    ("PatientName", "PN", "DOE^JOHN\nSMITH", False),
    ("PatientName", "PN", "A^B^C^D^E^F", False),
    ("StudyID", "SH", "X" * 17, False),
    ("PatientWeight", "DS", "72.5", True),
    ("PatientWeight", "DS", "heavy", False),
    ("SeriesNumber", "IS", "x1", False),
    ("StudyDescription", "LO", "MRI\x07HEAD", False),
])
def test_value_rules_follow_the_value_representation(keyword, vr, text, ok):
    """Each VR's rules (PS3.5 table 6.2-1): a value that breaks them is named with the reason."""
    assert (value_problem(keyword, vr, text) is None) is ok


def test_source_is_never_modified_and_pixels_are_shared():
    ds = _source()
    del ds.PatientBirthDate
    _raw(ds, "PatientAge", "075")
    before = {k: str(ds.get(k, "<absent>")) for k in ("PatientBirthDate", "PatientAge", "PatientName")}
    (copy,), report = clean_source_headers([ds])
    assert {k: str(ds.get(k, "<absent>")) for k in before} == before
    assert copy.PixelData is ds.PixelData  # no second copy of the pixels
    assert copy.PatientBirthDate == "" and "PatientAge" not in copy
    assert "PatientBirthDate" in report.missing and "PatientAge" in report.malformed


def test_every_type2_attribute_is_present_even_when_the_source_has_none():
    ds = _source()
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword in ds:
            delattr(ds, keyword)
    (copy,), report = clean_source_headers([ds])
    for keyword in TYPE2_PATIENT_STUDY:
        assert keyword in copy and str(copy[keyword].value or "") == ""
        assert keyword in report.missing
    assert "not given" in report.summary()


def test_blanks_are_trimmed_and_valid_values_kept():
    ds = _source()
    _raw(ds, "PatientBirthDate", "19510516 ")
    (copy,), report = clean_source_headers([ds])
    assert copy.PatientBirthDate == "19510516"
    assert report.malformed == {} and "PatientBirthDate" not in report.missing


def test_non_ascii_names_get_a_character_set_that_holds_them():
    """A Latin-1 name in a source without SpecificCharacterSet: the copy declares UTF-8 so it writes."""
    ds = _source()
    if "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    ds.PatientName = "Müller^Jürgen"
    (copy,), _ = clean_source_headers([ds])
    assert copy.SpecificCharacterSet == "ISO_IR 192"
    assert str(copy.PatientName) == "Müller^Jürgen"


def test_complete_header_reports_nothing_for_what_it_has():
    (copy,), report = clean_source_headers([_source()])
    present = [k for k in REPORTED_ATTRIBUTES if str(_source().get(k, "") or "").strip()]
    assert not set(present) & set(report.missing)


def test_report_page_prints_not_given_for_absent_values():
    assert NOT_GIVEN == "not given"
    assert _fmt_date("") == _fmt_name(None) == _fmt_sex("") == _fmt_age("") == NOT_GIVEN
    assert _fmt_date("19510516") == "1951-05-16" and _fmt_sex("F") == "Female" and _fmt_age("075Y") == "75 years"
