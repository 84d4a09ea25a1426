"""Source headers as archives send them: audit and clean the patient and study attributes that the
result objects (SC, SEG, SR) copy from the source images.

Real exports and anonymisers drop or empty Type 2 attributes (PatientBirthDate, StudyID,
ReferringPhysicianName, ...) and leave malformed values behind (a date ``"1951-05-16"``, an age
``"075"``, a name with a newline). highdicom's constructors read the Type 2 patient/study attributes
of the source directly (a missing one raises ``AttributeError``) and copy every Patient and Study
module attribute as it is (a malformed one makes our object non-conformant). So the result objects
are built from a *cleaned copy* of each source header:

* a Type 2 attribute the source lacks is present and empty (never an invented value);
* a value that breaks the rules of its value representation (PS3.5 6.2) is left out: emptied when
  the attribute is Type 2, removed otherwise; surrounding blanks are trimmed first, so
  ``"19510516 "`` is kept as ``"19510516"``;
* the source datasets themselves are never modified (the copies share the pixel data).

:class:`HeaderReport` says which of the attributes users look for were missing or malformed; the
pipeline puts it into ``result.json`` and the report page prints "not given" for them.

pydicom + highdicom's tables of the standard only (no torch).
"""

from __future__ import annotations

import datetime as _dt
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

__all__ = ["HeaderReport", "clean_source_headers", "REPORTED_ATTRIBUTES", "value_problem"]

#: Type 2 patient/study attributes every result object carries (empty when the source has none).
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")

#: What users look for in a header; ``result.json`` lists those of them that were missing or malformed.
REPORTED_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "SeriesNumber",
    "SeriesDescription", "InstitutionName", "Manufacturer", "BodyPartExamined", "InstanceNumber",
)

#: Attributes outside the Patient and Study modules that our objects also copy (the SC's General
#: Equipment and General Series), cleaned the same way.
_ALSO_COPIED = ("InstitutionName", "Laterality", "BodyPartExamined", "SeriesDescription", "Manufacturer")

_MODULES = ("patient", "clinical-trial-subject", "general-study", "patient-study", "clinical-trial-study")


def _patient_study_keywords() -> tuple[str, ...]:
    """Root-level keywords of the Patient and Study modules (from highdicom's tables of the standard)."""
    try:
        from highdicom._standard_utils import get_module_attribute_map

        table = get_module_attribute_map()
        found = [str(item["keyword"]) for key in _MODULES for item in table.get(key, ()) if not item["path"]]
    except Exception:  # pragma: no cover - highdicom moved its tables: fall back to the core set
        found = []
    return tuple(dict.fromkeys([*TYPE2_PATIENT_STUDY, "PatientAge", "PatientSize", "PatientWeight",
                                "StudyDescription", "IssuerOfPatientID", "OtherPatientNames", *found]))


@functools.cache
def header_keywords() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(cleaned, audited)`` keywords of :func:`clean_source_headers`: built on first use from
    highdicom's tables of the standard (about 0.5 s, which a process that only reads DICOM need
    not pay, and ``hippo.deploy`` pays in its background model load)."""
    cleaned = tuple(dict.fromkeys([*_patient_study_keywords(), *_ALSO_COPIED]))
    return cleaned, tuple(dict.fromkeys([*cleaned, *REPORTED_ATTRIBUTES]))

@functools.cache
def _audited_tags() -> tuple[tuple[str, int], ...]:
    """``(keyword, tag)`` of each audited keyword of :func:`header_keywords` that has a tag."""
    return tuple((k, t) for k in header_keywords()[1] if (t := tag_for_keyword(k)) is not None)


# --- value representations (PS3.5 table 6.2-1) --------------------------------------------------------
_MAX_LEN = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "IS": 12, "LO": 64, "SH": 16, "TM": 14,
            "UI": 64, "DT": 26, "LT": 10240, "ST": 1024, "UT": 2 ** 32 - 2, "UC": 2 ** 32 - 2}
_CONTROL_NO_TAB = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")  # LT/ST/UT allow TAB, LF, FF, CR, ESC
_CS = re.compile(r"^[A-Z0-9 _]*$")
_AS = re.compile(r"^\d{3}[DWMY]$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_DT = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_IS = re.compile(r"^[+-]?\d+$")
_DS = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_UI = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))*$")
_SEX = {"M", "F", "O"}
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR",
                       "UT"})


def _valid_date(text: str) -> bool:
    try:
        _dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def value_problem(keyword: str, vr: str, text: str) -> str | None:
    """Why ``text`` (one value, blanks already trimmed) is not a valid ``vr`` value, or None.

    Args:
        keyword: the attribute (some have narrower rules: PatientSex is M, F or O).
        vr: its value representation (``"DA"``, ``"PN"``, ...).
        text: one value as text.
    """
    limit = _MAX_LEN.get(vr)
    if limit is not None and len(text) > limit:
        return f"longer than the {limit} characters a {vr} value may have"
    if vr in ("LT", "ST", "UT"):
        return "control characters" if _TEXT_CONTROL.search(text) else None
    if _CONTROL_NO_TAB.search(text):
        return "control characters"
    if vr == "DA":
        return None if len(text) == 8 and text.isdigit() and _valid_date(text) else "not a date (YYYYMMDD)"
    if vr == "TM":
        m = _TM.match(text)
        ok = m is not None and int(m.group(1)) < 24 and int(m.group(2) or 0) < 60 and int(m.group(3) or 0) < 61
        return None if ok else "not a time (HHMMSS.FFFFFF)"
    if vr == "DT":
        return None if _DT.match(text) and _valid_date((text[:8] + "0101"[len(text[4:8]):])[:8]) \
            else "not a date-time"
    if vr == "AS":
        return None if _AS.match(text) else "not an age (nnnD, nnnW, nnnM or nnnY)"
    if vr == "CS":
        if not _CS.match(text):
            return "not a code string (upper-case letters, digits, space, underscore)"
        if keyword == "PatientSex" and text not in _SEX:
            return "not M, F or O"
        return None
    if vr == "IS":
        return None if _IS.match(text) and -2 ** 31 <= int(text) < 2 ** 31 else "not an integer string"
    if vr == "DS":
        try:
            finite = _DS.match(text) is not None and abs(float(text)) < float("inf")
        except ValueError:
            finite = False
        return None if finite else "not a decimal string"
    if vr == "UI":
        return None if _UI.match(text) else "not a UID"
    if vr == "PN":
        groups = text.split("=")
        if len(groups) > 3 or any(len(g.split("^")) > 5 for g in groups):
            return "more name components than a person name has"
        if any(len(g) > 64 for g in groups):
            return "a name component group longer than 64 characters"
        return None
    return None


@dataclass
class HeaderReport:
    """What the source header lacked, for the attributes users look for.

    Attributes:
        missing: keywords of :data:`REPORTED_ATTRIBUTES` absent or empty in the source.
        malformed: ``{keyword: why}`` for values left out of the result objects because they break
            their value representation (any cleaned attribute, not only the reported ones).
    """

    missing: list[str] = field(default_factory=list)
    malformed: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"missing": list(self.missing), "malformed": dict(self.malformed)}

    @property
    def not_given(self) -> set[str]:
        """Keywords whose value the report shows as "not given" (missing or malformed)."""
        return set(self.missing) | set(self.malformed)

    def summary(self) -> str:
        """One line for logs and warnings ("" when the header was complete)."""
        parts = []
        if self.missing:
            parts.append("not given: " + ", ".join(self.missing))
        if self.malformed:
            parts.append("malformed, left out: " + "; ".join(f"{k} ({why})" for k, why in self.malformed.items()))
        return "source header " + "; ".join(parts) if parts else ""


def _values(elem: DataElement) -> list[Any]:
    value = elem.value
    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    return [value]


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return "" if value is None else str(value)


def _clean_element(keyword: str, elem: DataElement) -> tuple[Any, str | None]:
    """``(value to write, problem)``: the element's value with blanks trimmed, or a problem."""
    vr = str(elem.VR)
    if vr not in _TEXT_VRS:
        return elem.value, None  # sequences and binary values: nothing to trim or parse
    values = _values(elem)
    if len(values) > 1 and dictionary_VM(elem.tag) == "1":
        return None, f"{len(values)} values (a backslash inside the value) where one is allowed"
    texts = []
    for v in values:
        text = _as_text(v)
        text = text.strip(" \x00") if vr not in ("LT", "ST", "UT") else text.rstrip(" \x00")
        if vr in ("PN", "DA", "TM", "DT", "AS", "CS", "IS", "DS", "UI", "SH", "LO"):
            text = text.strip()
        problem = value_problem(keyword, vr, text) if text else None
        if problem:
            return None, problem
        texts.append(text)
    texts = [t for t in texts if t != ""] if len(texts) > 1 else texts
    if not texts or all(t == "" for t in texts):
        return "", None
    return (texts if len(texts) > 1 else texts[0]), None


def _copy(ds: Dataset) -> Dataset:
    """A new Dataset holding the same elements (no element is shared for writing: replacements go
    into the copy's own mapping); file meta and encoding are carried over."""
    new = Dataset(dict(ds.items()))  # the elements as they are (raw ones decoded when first used)
    for attr in ("file_meta", "preamble", "filename"):
        if hasattr(ds, attr):
            object.__setattr__(new, attr, getattr(ds, attr))
    return new


def _set(ds: Dataset, keyword: str, value: Any) -> None:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    ds[tag] = DataElement(tag, dictionary_VR(tag), value)


def clean_source_headers(datasets: Sequence[Dataset]) -> tuple[list[Dataset], HeaderReport]:
    """Cleaned copies of the source headers for building the result objects, and what was wrong.

    Args:
        datasets: the source images (one per slice, or one multi-frame instance); never modified.

    Returns:
        ``(copies, report)``: ``copies[i]`` is ``datasets[i]`` with the Patient and Study module
        attributes (and the few others our objects copy) trimmed, malformed values left out (Type 2:
        emptied; others: removed), every Type 2 patient/study attribute present, and the character
        set ISO_IR 192 (UTF-8) when any cleaned text is not plain ASCII and the source declares none.
        ``report`` is computed from the first dataset (patient and study are one for a series).
    """
    if not datasets:
        raise ValueError("clean_source_headers: no source dataset")
    report = HeaderReport()
    copies = []
    cleaned, audited = header_keywords()
    audited_tags = _audited_tags()
    # the slices of a series mostly repeat the same patient/study values: an element whose stored
    # bytes (and character set) were seen before is cleaned as it was then, without decoding it again
    # (and the new element made then is put into this copy too: elements are never modified in place)
    seen: dict[tuple, tuple[Any, str | None, DataElement | None]] = {}

    made: dict[tuple, DataElement] = {}

    def element(keyword: str, value: Any) -> DataElement:
        key = (keyword, tuple(value) if isinstance(value, list) else value)
        elem = made.get(key)
        if elem is None:
            tag = tag_for_keyword(keyword)
            assert tag is not None
            elem = made[key] = DataElement(tag, dictionary_VR(tag), value)
        return elem

    for index, ds in enumerate(datasets):
        new = _copy(ds)
        non_ascii = False
        charset = None
        for keyword, tag in audited_tags:
            raw = ds.get_item(tag, keep_deferred=True)
            if raw is None:
                continue
            key = None
            if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
                if charset is None:
                    charset = str(ds.get("SpecificCharacterSet", "") or "")
                key = (tag, raw.VR, raw.value, charset)
                hit = seen.get(key)
                if hit is not None:
                    value, problem, elem_new = hit  # never on the first dataset: it records the problems
                    if problem:
                        if keyword in cleaned:
                            if elem_new is not None:
                                new[tag] = elem_new
                            else:
                                del new[tag]
                        continue
                    if elem_new is not None:
                        new[tag] = elem_new
                    non_ascii = non_ascii or not _as_text(value).isascii()
                    continue
            try:
                elem = ds[tag]
                value, problem = _clean_element(keyword, elem)
            except Exception as exc:  # undecodable bytes and the like
                elem, value, problem = None, None, f"unreadable ({type(exc).__name__})"
            if problem:
                if index == 0:
                    report.malformed[keyword] = problem
                elem_new = element(keyword, "") if keyword in cleaned and keyword in TYPE2_PATIENT_STUDY else None
                if key is not None:
                    seen[key] = (value, problem, elem_new)
                if keyword not in cleaned:
                    continue  # reported only: our objects never copy it
                if elem_new is not None:
                    new[tag] = elem_new
                else:
                    del new[tag]
                continue
            text_vr = str(elem.VR) in _TEXT_VRS
            elem_new = None
            if keyword in cleaned and text_vr:
                elem_new = element(keyword, value)  # a fresh element: text re-encoded in the copy's character set
                new[tag] = elem_new
            if key is not None:
                seen[key] = (value, problem, elem_new)
            non_ascii = non_ascii or not _as_text(value).isascii()
        for keyword in TYPE2_PATIENT_STUDY:
            if keyword not in new:
                blank = element(keyword, "")  # made once, shared by the copies
                new[blank.tag] = blank
        if non_ascii and not ds.get("SpecificCharacterSet"):
            _set(new, "SpecificCharacterSet", "ISO_IR 192")
        copies.append(new)
    first = datasets[0]
    report.missing = [k for k in REPORTED_ATTRIBUTES
                      if k not in report.malformed and _is_empty(first.get(k, None))]
    return copies, report


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (MultiValue, list, tuple)):
        return all(_is_empty(v) for v in value)
    return _as_text(value).strip(" \x00") == ""
