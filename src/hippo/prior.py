"""Change since the patient's last scan: find our earlier result, read its volumes, compute the change.

::

    this study (PatientID, StudyDate, StudyInstanceUID)
      -> DicomwebPriorSource.find   QIDO-RS  GET <dicom-web>/series?PatientID=..&Modality=SR
      -> DicomwebPriorSource.fetch  WADO-RS  GET <dicom-web>/studies/<uid>/series/<uid>  (multipart)
      -> read_sr                    our TID 1500 SR (hippo.dicom.objects.make_sr) -> PriorResult
      -> compare_with_prior         change per structure in mm³, %, mm³/year and %/year

or, without a PACS, ``read_prior_file(PATH)`` on an SR file or a ``result.json`` of ours.

A whole-head study's earlier result is found the same way (``find_prior(..., reader=read_wholehead_sr)``:
our left/right SR and the T1 series it measured), and that series is fetched with
:meth:`DicomwebPriorSource.fetch_files` for the paired mode
(:func:`hippo.wholehead.longitudinal.pacs_prior_input`).

:func:`prior_comparison` ties these together and never raises: when there is no comparison (no
earlier result, PACS unreachable or refusing, prior unreadable, dates missing) the returned block
says why in one plain sentence, and the study is processed as usual.

The block (``result.json`` key ``prior_comparison``; shown on the report page, written into the SR)::

    {"available": bool, "reason": str | None,        # reason: why there is no comparison
     "comparable": bool, "note": str,                  # same algorithm name and version?
     "interval_days": int, "interval_years": float,
     "prior": {"study_date": "YYYY-MM-DD", "study_instance_uid", "sop_instance_uid", "source",
               "algorithm": {"name", "version"}, "volumes": {"anterior_mm3", ...}},
     "change": {"anterior" | "posterior" | "total": {"prior_mm3", "current_mm3", "change_mm3",
                "change_percent", "rate_mm3_per_year", "rate_percent_per_year"}},
     "this_result": {"study_date": "YYYY-MM-DD" | None, "algorithm": {"name", "version"}}}

Volumes in mm³; percentages relative to the prior volume; rates annualised with 365.25-day years
(given only when the scans are at least :data:`MIN_DAYS_FOR_RATE` days apart).

pydicom + urllib only: no torch, Lightning, Hydra or ``hippo.network`` (callers pass the Orthanc
credentials as ``(user, password)``, read with :func:`hippo.credentials.read_credentials`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import logging
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pydicom
from pydicom.dataset import Dataset

from hippo.change import parse_date

log = logging.getLogger(__name__)

__all__ = [
    "STRUCTURES",
    "LABELS",
    "MIN_DAYS_FOR_RATE",
    "PriorError",
    "PriorResult",
    "PriorCandidate",
    "WholeHeadPriorResult",
    "WHOLEHEAD_LABELS",
    "DicomwebPriorSource",
    "PriorLookup",
    "read_sr",
    "read_wholehead_sr",
    "read_result_json",
    "read_prior_file",
    "compare_with_prior",
    "unavailable",
    "find_prior",
    "prior_comparison",
    "lookup_from_config",
    "parse_multipart",
]

#: The compared structures (keys of the ``change`` block) and the SR tracking identifiers of their
#: measurement groups (:data:`hippo.dicom.objects.SEGMENTS` labels and "Total hippocampus").
STRUCTURES = ("anterior", "posterior", "total")
LABELS = {"anterior": "Anterior hippocampus", "posterior": "Posterior hippocampus", "total": "Total hippocampus"}
#: Scans closer together than this give no annualised rate (a few weeks' noise would be multiplied).
MIN_DAYS_FOR_RATE = 90
#: Why a study cannot be compared (the reasons shown when it lacks what the search matches on).
NO_STUDY_DATE = "this study has no study date, so the interval to an earlier scan is unknown"
NO_PATIENT_ID = "this study has no patient ID, so no earlier result can be matched to it"
DAYS_PER_YEAR = 365.25

_VOLUME = ("SCT", "118565006")           # Volume
_TRACKING_ID = ("DCM", "112039")         # Tracking Identifier
_ALGORITHM_NAME = ("DCM", "111001")
_ALGORITHM_VERSION = ("DCM", "111003")
_MEASUREMENT_GROUP = ("DCM", "125007")


class PriorError(Exception):
    """No comparison is possible; ``str(exc)`` is one plain sentence for the report saying why."""


@dataclass(frozen=True)
class PriorResult:
    """The volumes of an earlier result of ours.

    Attributes:
        study_date: the prior study's StudyDate.
        volumes_mm3: ``{"anterior": mm³, "posterior": mm³, "total": mm³}``.
        algorithm_name, algorithm_version: what made it (the SR's Algorithm Identification).
        study_instance_uid, sop_instance_uid: of the prior study / its SR ("" when unknown).
        source: where it was read ("PACS ..." or a file path), for the record.
    """

    study_date: _dt.date
    volumes_mm3: Mapping[str, float]
    algorithm_name: str
    algorithm_version: str
    study_instance_uid: str = ""
    sop_instance_uid: str = ""
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"study_date": self.study_date.isoformat(), "study_instance_uid": self.study_instance_uid,
                "sop_instance_uid": self.sop_instance_uid, "source": self.source,
                "algorithm": {"name": self.algorithm_name, "version": self.algorithm_version},
                "volumes": {f"{k}_mm3": float(self.volumes_mm3[k]) for k in STRUCTURES}}


# --------------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------------
# parse_date (DICOM DA or ISO) lives in hippo.change, the one place dates of results are read


# --------------------------------------------------------------------------------------------------
# Reading a prior
# --------------------------------------------------------------------------------------------------
def _code(item: Dataset) -> tuple[str, str]:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return ("", "")
    return (str(seq[0].get("CodingSchemeDesignator", "")), str(seq[0].get("CodeValue", "")))


def _walk(items: Sequence[Dataset]):
    for item in items or ():
        yield item
        yield from _walk(item.get("ContentSequence", ()))


def _sr_volumes(ds: Dataset, wanted: Mapping[str, str], where: str
                ) -> tuple[_dt.date, dict[str, float], str, str]:
    """``(study date, {key: mm³}, algorithm name, algorithm version)`` of one of our TID 1500 SRs:
    the Volume (SCT 118565006, ``mm3``) of each measurement group whose Tracking Identifier is
    ``wanted[key]``.

    Raises:
        PriorError: not an SR, a wanted group or its volume missing, another unit, no StudyDate.
    """
    if str(ds.get("Modality", "")) != "SR" or "ContentSequence" not in ds:
        raise PriorError(f"the earlier result ({where}) is not a structured report")
    study_date = parse_date(ds.get("StudyDate"))
    if study_date is None:
        raise PriorError(f"the earlier result ({where}) has no study date")
    volumes: dict[str, float] = {}
    names, versions = set(), set()
    by_label = {v: k for k, v in wanted.items()}
    for group in _walk(ds.ContentSequence):
        if group.get("ValueType") != "CONTAINER" or _code(group) != _MEASUREMENT_GROUP:
            continue
        children = list(group.get("ContentSequence", ()))
        label = next((str(c.get("TextValue", "")) for c in children
                      if c.get("ValueType") == "TEXT" and _code(c) == _TRACKING_ID), "")
        key = by_label.get(label)
        if key is None:
            continue
        for c in children:
            if c.get("ValueType") != "NUM" or _code(c) != _VOLUME:
                continue
            mv = c.get("MeasuredValueSequence")
            if not mv:
                continue
            unit = str(mv[0].MeasurementUnitsCodeSequence[0].CodeValue)
            if unit != "mm3":
                raise PriorError(f"the earlier result ({where}) gives the {wanted[key].lower()} volume in "
                                 f"{unit!r}, not mm3")
            volumes[key] = float(mv[0].NumericValue)
            for sub in c.get("ContentSequence", ()):
                if _code(sub) == _ALGORITHM_NAME:
                    names.add(str(sub.get("TextValue", "")))
                elif _code(sub) == _ALGORITHM_VERSION:
                    versions.add(str(sub.get("TextValue", "")))
    missing = [wanted[k].lower() for k in wanted if k not in volumes]
    if missing:
        raise PriorError(f"the earlier result ({where}) holds no volume for the {', '.join(missing)}")
    if not all(math.isfinite(v) and v >= 0 for v in volumes.values()):
        raise PriorError(f"the earlier result ({where}) holds a negative or non-numeric volume")
    return (study_date, volumes, " / ".join(sorted(names)) or "not recorded",
            " / ".join(sorted(versions)) or "not recorded")


def read_sr(ds: Dataset, *, source: str = "") -> PriorResult:
    """The volumes of one of our TID 1500 SRs (:func:`hippo.dicom.objects.make_sr`).

    Reads the measurement groups whose Tracking Identifier is "Anterior hippocampus", "Posterior
    hippocampus" or "Total hippocampus" and their Volume (SCT 118565006) in ``mm3``, the Algorithm
    Name/Version recorded with the measurements, and the StudyDate.

    Raises:
        PriorError: not an SR, a structure or its volume missing, another unit, no StudyDate.
    """
    where = source or f"SR {ds.get('SOPInstanceUID', '?')}"
    study_date, volumes, name, version = _sr_volumes(ds, LABELS, where)
    return PriorResult(study_date=study_date, volumes_mm3=volumes, algorithm_name=name, algorithm_version=version,
                       study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                       sop_instance_uid=str(ds.get("SOPInstanceUID", "")), source=source)


#: The tracking identifiers of a whole-head SR's groups (:func:`hippo.dicom.objects.make_wholehead_sr`:
#: one per segment, one per side's total), keyed ``"<side>.<structure>"``.
WHOLEHEAD_LABELS = {f"{side}.{key}": (f"{side.capitalize()} {key} hippocampus" if key != "total"
                                      else f"{side.capitalize()} hippocampus")
                    for side in ("left", "right") for key in STRUCTURES}


@dataclass(frozen=True)
class WholeHeadPriorResult:
    """An earlier whole-head result of ours (its SR), and the image series it measured.

    Attributes:
        study_date, algorithm_name, algorithm_version, study_instance_uid, sop_instance_uid, source:
            as for :class:`PriorResult`.
        volumes_mm3: ``{"left": {"anterior", "posterior", "total"}, "right": {...}}`` mm³.
        image_series: SeriesInstanceUIDs of the images the SR was measured on (its evidence, the SEG
            left out): the earlier whole-head T1.
    """

    study_date: _dt.date
    volumes_mm3: Mapping[str, Mapping[str, float]]
    algorithm_name: str
    algorithm_version: str
    study_instance_uid: str = ""
    sop_instance_uid: str = ""
    source: str = ""
    image_series: tuple[str, ...] = ()


_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def read_wholehead_sr(ds: Dataset, *, source: str = "") -> WholeHeadPriorResult:
    """The left and right volumes of one of our whole-head SRs (groups "Left anterior hippocampus"
    ... "Right hippocampus") and the image series its evidence names.

    Raises:
        PriorError: not an SR, a side's structure or its volume missing, another unit, no StudyDate.
    """
    where = source or f"SR {ds.get('SOPInstanceUID', '?')}"
    study_date, flat, name, version = _sr_volumes(ds, WHOLEHEAD_LABELS, where)
    series = []
    for attr in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(attr, ()):
            for item in study.get("ReferencedSeriesSequence", ()):
                classes = {str(r.get("ReferencedSOPClassUID", "")) for r in item.get("ReferencedSOPSequence", ())}
                uid = str(item.get("SeriesInstanceUID", ""))
                if uid and classes and _SEG_STORAGE not in classes and uid not in series:
                    series.append(uid)
    return WholeHeadPriorResult(
        study_date=study_date, algorithm_name=name, algorithm_version=version,
        volumes_mm3={side: {k: flat[f"{side}.{k}"] for k in STRUCTURES} for side in ("left", "right")},
        study_instance_uid=str(ds.get("StudyInstanceUID", "")), sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        source=source, image_series=tuple(series))


def read_result_json(path: str | os.PathLike) -> PriorResult:
    """The volumes of one of our ``result.json`` files (``volumes`` and, for the study date and the
    algorithm, ``prior_comparison.this_result``).

    Raises:
        PriorError: unreadable, not ours, or without study date or volumes.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PriorError(f"the earlier result {path} could not be read ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("volumes"), dict):
        raise PriorError(f"the earlier result {path} holds no volumes")
    if data.get("status") not in ("ok", "review"):
        raise PriorError(f"the earlier result {path} is not a finished measurement (status {data.get('status')!r})")
    this = (data.get("prior_comparison") or {}).get("this_result") or {}
    study_date = parse_date(this.get("study_date"))
    if study_date is None:
        raise PriorError(f"the earlier result {path} does not record its study date")
    try:
        volumes = {k: float(data["volumes"][f"{k}_mm3"]) for k in STRUCTURES}
    except (KeyError, TypeError, ValueError):
        raise PriorError(f"the earlier result {path} lacks the anterior, posterior or total volume") from None
    if not all(math.isfinite(v) and v >= 0 for v in volumes.values()):
        raise PriorError(f"the earlier result {path} holds a negative or non-numeric volume")
    algorithm = this.get("algorithm") or {}
    return PriorResult(study_date=study_date, volumes_mm3=volumes,
                       algorithm_name=str(algorithm.get("name") or "not recorded"),
                       algorithm_version=str(algorithm.get("version") or "not recorded"),
                       study_instance_uid=str(data.get("study_uid", "")), source=str(path))


def read_prior_file(path: str | os.PathLike) -> PriorResult:
    """An SR file or a ``result.json`` of ours (told apart by content: JSON starts with ``{``).

    Raises:
        PriorError: missing, unreadable, or not one of ours.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(256).lstrip()
    except OSError as exc:
        raise PriorError(f"the earlier result {path} could not be opened ({exc.strerror or type(exc).__name__})") \
            from None
    if head.startswith(b"{"):
        return read_result_json(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise PriorError(f"the earlier result {path} is neither a DICOM file nor a result.json "
                         f"({type(exc).__name__})") from None
    return read_sr(ds, source=str(path))


# --------------------------------------------------------------------------------------------------
# The change
# --------------------------------------------------------------------------------------------------
def _this_result(study_date: _dt.date | None, algorithm: Mapping[str, str]) -> dict[str, Any]:
    return {"study_date": study_date.isoformat() if study_date else None,
            "algorithm": {"name": str(algorithm.get("name", "")), "version": str(algorithm.get("version", ""))}}


def unavailable(reason: str, *, study_date: _dt.date | None = None,
                algorithm: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The block for a study without comparison; ``reason`` is one plain sentence (no final stop)."""
    return {"available": False, "reason": str(reason).rstrip("."), "comparable": False, "note": "",
            "this_result": _this_result(study_date, algorithm or {})}


def compare_with_prior(current_mm3: Mapping[str, float], current_date: _dt.date, prior: PriorResult, *,
                       algorithm: Mapping[str, str]) -> dict[str, Any]:
    """The change from ``prior`` to this result.

    Args:
        current_mm3: this study's volumes, ``{"anterior_mm3", "posterior_mm3", "total_mm3"}`` (mm³;
            :meth:`hippo.measure.Volumes.as_dict` or plain keys ``anterior``...).
        current_date: this study's StudyDate.
        prior: the earlier result.
        algorithm: ``{"name", "version"}`` of this result (as recorded in its SR).

    Returns:
        The ``prior_comparison`` block (module docstring): per structure the change in mm³, in % of
        the prior volume (``None`` when the prior volume is 0), and annualised in mm³/year and
        %/year (``None`` when the scans are less than :data:`MIN_DAYS_FOR_RATE` days apart).

    Raises:
        PriorError: the prior is not earlier than this study.
    """
    days = (current_date - prior.study_date).days
    if days <= 0:
        raise PriorError(f"the earlier result found is dated {prior.study_date.isoformat()}, not before this "
                         f"study ({current_date.isoformat()})")
    years = days / DAYS_PER_YEAR
    change: dict[str, dict[str, float | None]] = {}
    for key in STRUCTURES:
        now = float(current_mm3[f"{key}_mm3"] if f"{key}_mm3" in current_mm3 else current_mm3[key])
        before = float(prior.volumes_mm3[key])
        delta = now - before
        pct = 100.0 * delta / before if before > 0 else None
        rate_ok = days >= MIN_DAYS_FOR_RATE
        change[key] = {
            "prior_mm3": round(before, 3), "current_mm3": round(now, 3), "change_mm3": round(delta, 3),
            "change_percent": None if pct is None else round(pct, 3),
            "rate_mm3_per_year": round(delta / years, 3) if rate_ok else None,
            "rate_percent_per_year": round(pct / years, 3) if rate_ok and pct is not None else None,
        }
    this_name, this_version = str(algorithm.get("name", "")), str(algorithm.get("version", ""))
    comparable = (prior.algorithm_name, prior.algorithm_version) == (this_name, this_version)
    note = "" if comparable else (
        f"not directly comparable: the earlier result was made by {prior.algorithm_name} version "
        f"{prior.algorithm_version}, this one by {this_name} version {this_version}")
    if days < MIN_DAYS_FOR_RATE:
        note = "; ".join(n for n in (note, f"no annualised rate: the scans are only {days} days apart "
                                           f"(at least {MIN_DAYS_FOR_RATE} needed)") if n)
    return {"available": True, "reason": None, "comparable": comparable, "note": note,
            "interval_days": days, "interval_years": round(years, 4), "prior": prior.as_dict(),
            "change": change, "this_result": _this_result(current_date, algorithm)}


# --------------------------------------------------------------------------------------------------
# Finding the prior in the PACS (DICOMweb: QIDO-RS + WADO-RS)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PriorCandidate:
    """An SR series of the patient in the PACS (from QIDO-RS)."""

    study_instance_uid: str
    series_instance_uid: str
    study_date: _dt.date | None
    series_description: str = ""


def _tag(entry: Mapping[str, Any], tag: str) -> str:
    value = (entry.get(tag) or {}).get("Value") or [""]
    first = value[0]
    if isinstance(first, dict):  # PN
        first = first.get("Alphabetic", "")
    return str(first)


def parse_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a ``multipart/related`` body (WADO-RS), each part's payload without headers.

    Raises:
        PriorError: not multipart or no boundary.
    """
    params = {}
    for piece in content_type.split(";")[1:]:
        key, _, value = piece.strip().partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    boundary = params.get("boundary")
    if not content_type.lower().startswith("multipart/") or not boundary:
        raise PriorError(f"the PACS answered with {content_type or 'no content type'!r}, not a multipart body")
    delimiter = b"--" + boundary.encode("latin-1")
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        if chunk.startswith(b"\r\n"):  # a part without headers
            payload = chunk[2:]
        else:
            _, sep, payload = chunk.partition(b"\r\n\r\n")
            if not sep:
                continue
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


class DicomwebPriorSource:
    """Earlier SRs of a patient in a DICOMweb PACS (Orthanc's plugin at ``<http>/dicom-web``).

    Args:
        url: the DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        auth: ``(user, password)`` for HTTP Basic (Orthanc's service account), or ``None``.
        timeout: seconds per HTTP request.
        auth_problem: why no credentials could be read (added to the reason on HTTP 401).
    """

    def __init__(self, url: str, *, auth: tuple[str, str] | None = None, timeout: float = 10.0,
                 auth_problem: str | None = None) -> None:
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"DICOMweb root must be an http(s) URL, got {url!r}")
        self.url = str(url).rstrip("/")
        self.timeout = float(timeout)
        self.auth_problem = auth_problem
        self._headers: dict[str, str] = {}
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"

    def __repr__(self) -> str:  # never shows the credentials
        return f"DicomwebPriorSource({self.url!r})"

    def _get(self, path: str, accept: str) -> tuple[bytes, str]:
        req = urllib.request.Request(self.url + path, headers={**self._headers, "Accept": accept})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read(), str(resp.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                extra = f" ({self.auth_problem})" if self.auth_problem and exc.code == 401 else ""
                raise PriorError(f"the PACS at {self.url} refused access (HTTP {exc.code}){extra}") from None
            raise PriorError(f"the PACS at {self.url} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PriorError(f"the PACS at {self.url} could not be reached ({reason})") from None

    def find(self, patient_id: str) -> list[PriorCandidate]:
        """The patient's SR series (QIDO-RS, exact PatientID match checked again here)."""
        query = urllib.parse.urlencode([("PatientID", patient_id), ("Modality", "SR"),
                                        ("includefield", "StudyDate"), ("includefield", "PatientID"),
                                        ("includefield", "SeriesDescription")])
        body, _ = self._get(f"/series?{query}", "application/dicom+json")
        try:
            entries = json.loads(body or b"[]")
        except ValueError:
            raise PriorError(f"the PACS at {self.url} answered the search with something that is not JSON") from None
        out = []
        for e in entries if isinstance(entries, list) else []:
            if _tag(e, "00100020") != patient_id:  # wildcards in an ID must not match other patients
                continue
            out.append(PriorCandidate(study_instance_uid=_tag(e, "0020000D"),
                                      series_instance_uid=_tag(e, "0020000E"),
                                      study_date=parse_date(_tag(e, "00080020")),
                                      series_description=_tag(e, "0008103E")))
        return out

    def _series_parts(self, candidate: PriorCandidate) -> list[bytes]:
        """The instances of one series as they came (WADO-RS, multipart ``application/dicom``)."""
        path = (f"/studies/{urllib.parse.quote(candidate.study_instance_uid, safe='')}"
                f"/series/{urllib.parse.quote(candidate.series_instance_uid, safe='')}")
        body, ctype = self._get(path, 'multipart/related; type="application/dicom"')
        return parse_multipart(body, ctype)

    def fetch(self, candidate: PriorCandidate) -> list[Dataset]:
        """The instances of one series (WADO-RS, multipart ``application/dicom``)."""
        out = []
        for part in self._series_parts(candidate):
            try:
                out.append(pydicom.dcmread(BytesIO(part)))
            except Exception as exc:
                log.warning("prior: an instance of series %s could not be parsed: %s", candidate.series_instance_uid,
                            type(exc).__name__)
        return out

    def fetch_files(self, candidate: PriorCandidate, folder: str | os.PathLike) -> list[Path]:
        """Write the instances of one series, byte for byte as the PACS sent them, into ``folder``
        (created) as ``00000.dcm``, ``00001.dcm``...: e.g. an earlier whole-head T1 to be read again.

        Raises:
            PriorError: the PACS refused, could not be reached, or returned no instance.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, part in enumerate(self._series_parts(candidate)):
            paths.append(folder / f"{i:05d}.dcm")
            paths[-1].write_bytes(part)
        if not paths:
            raise PriorError(f"the PACS at {self.url} returned no instance of series {candidate.series_instance_uid}")
        return paths


def find_prior(source: DicomwebPriorSource, *, patient_id: str, study_date: _dt.date,
               study_instance_uid: str, reader: Callable[..., Any] = read_sr) -> Any:
    """Our most recent result of this patient from a study before ``study_date``.

    Studies are tried newest first; within a study the SR with the latest ContentDate/Time that
    reads as ours wins (a newer result supersedes an older one of the same study).

    Args:
        reader: ``reader(ds, source=...)`` reads one SR or raises :class:`PriorError`:
            :func:`read_sr` (a HippoCrop result, :class:`PriorResult`) or :func:`read_wholehead_sr`
            (a whole-head result, :class:`WholeHeadPriorResult`).

    Raises:
        PriorError: no earlier result, PACS unreachable or refusing, every earlier SR unreadable.
    """
    return find_priors(source, patient_id=patient_id, study_date=study_date, study_instance_uid=study_instance_uid,
                       reader=reader, first_only=True)[0]


def find_priors(source: DicomwebPriorSource, *, patient_id: str, study_date: _dt.date,
                study_instance_uid: str, reader: Callable[..., Any] = read_sr, first_only: bool = False) -> list[Any]:
    """Our results of this patient from every study before ``study_date`` (one per study day, the
    latest SR of that day), newest first: :func:`find_prior` takes the first; a trajectory all.

    Raises:
        PriorError: as :func:`find_prior` (none readable).
    """
    candidates = [c for c in source.find(patient_id)
                  if c.study_instance_uid != study_instance_uid and c.study_date is not None
                  and c.study_date < study_date]
    if not candidates:
        raise PriorError(f"the PACS holds no earlier result for patient ID {patient_id} before "
                         f"{study_date.isoformat()}")
    problems: list[str] = []
    results: list[Any] = []
    for day in sorted({c.study_date for c in candidates}, reverse=True):
        found: list[tuple[str, Any]] = []
        for cand in (c for c in candidates if c.study_date == day):
            for ds in source.fetch(cand):
                where = f"PACS study of {day.isoformat()}, SR {ds.get('SOPInstanceUID', '?')}"
                try:
                    result = reader(ds, source=where)
                except PriorError as exc:
                    problems.append(str(exc))
                    continue
                found.append((f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}", result))
        if found:
            results.append(max(found, key=lambda f: f[0])[1])
            if first_only:
                break
    if not results:
        raise PriorError(problems[0] if problems else
                         f"the PACS holds no readable earlier result for patient ID {patient_id}")
    return results


# --------------------------------------------------------------------------------------------------
# The whole step
# --------------------------------------------------------------------------------------------------
@dataclass
class PriorLookup:
    """Where the prior comes from (one per processor; picklable).

    Attributes:
        path: an SR file or ``result.json`` to compare with (runs without a PACS); wins over ``source``.
        source: the PACS to search (``None``: no search).
    """

    path: str | None = None
    source: DicomwebPriorSource | None = None

    @classmethod
    def from_settings(cls, *, path: str | os.PathLike | None = None, url: str | None = None,
                      auth: tuple[str, str] | None = None, timeout: float = 10.0,
                      auth_problem: str | None = None) -> "PriorLookup":
        """From plain settings (``conf/prior_lookup``): ``url`` is the DICOMweb root or ``None``."""
        source = DicomwebPriorSource(url, auth=auth, timeout=timeout, auth_problem=auth_problem) if url else None
        return cls(path=str(path) if path else None, source=source)

    def describe(self) -> str:
        return f"file {self.path}" if self.path else (repr(self.source) if self.source else "none")


def prior_comparison(lookup: PriorLookup | None, *, patient_id: str, study_date: Any, study_instance_uid: str,
                     volumes_mm3: Mapping[str, float], algorithm: Mapping[str, str]) -> dict[str, Any]:
    """The ``prior_comparison`` block for one study; never raises.

    Args:
        lookup: where to look (``None``: nowhere).
        patient_id, study_date (DICOM DA), study_instance_uid: of this study.
        volumes_mm3: this study's volumes (``anterior_mm3``, ``posterior_mm3``, ``total_mm3``).
        algorithm: ``{"name", "version"}`` of this result.
    """
    date = parse_date(study_date)
    try:
        if lookup is None or (lookup.path is None and lookup.source is None):
            raise PriorError("no earlier result was looked for: no PACS search and no prior file configured")
        if date is None:
            raise PriorError(NO_STUDY_DATE)
        if lookup.path is not None:
            prior = read_prior_file(lookup.path)
        else:
            if not str(patient_id or "").strip():
                raise PriorError(NO_PATIENT_ID)
            prior = find_prior(lookup.source, patient_id=str(patient_id), study_date=date,
                               study_instance_uid=study_instance_uid)
        return compare_with_prior(volumes_mm3, date, prior, algorithm=algorithm)
    except PriorError as exc:
        log.info("study %s: no prior comparison: %s", study_instance_uid, exc)
        return unavailable(str(exc), study_date=date, algorithm=algorithm)
    except Exception as exc:  # a bug or an unexpected answer must not fail the study
        log.warning("study %s: prior comparison failed: %s: %s", study_instance_uid, type(exc).__name__, exc)
        return unavailable(f"the earlier result could not be read ({type(exc).__name__})", study_date=date,
                           algorithm=algorithm)


def lookup_from_config(cfg: Mapping[str, Any], *, send: bool = True,
                       read_credentials: Callable[[str], tuple[str, str]] | None = None) -> PriorLookup | None:
    """The :class:`PriorLookup` of a resolved deploy/listen config: ``prior`` (a file) wins; else the
    ``prior_lookup`` group (``enabled``, ``url``, ``credentials``, ``timeout``) when results go to a
    PACS (``send``); else ``None``.

    Args:
        read_credentials: ``path -> (user, password)`` for the credentials file
            (:func:`hippo.credentials.read_credentials`, passed in by the entrypoint); a file
            that cannot be read leaves the search without credentials and the reason is kept for
            the report (the PACS will answer 401).
    """
    path = cfg.get("prior")
    if path:
        return PriorLookup(path=str(path))
    settings = dict(cfg.get("prior_lookup") or {})
    if not send or not settings.get("enabled", True) or not settings.get("url"):
        return None
    auth, problem = None, None
    credentials = settings.get("credentials")
    if credentials and read_credentials is not None:
        try:
            auth = read_credentials(str(credentials))
        except Exception as exc:  # missing or malformed file: the search goes on without
            problem = str(exc)
            log.warning("prior search: %s", problem)
    return PriorLookup.from_settings(url=str(settings["url"]), auth=auth, timeout=float(settings.get("timeout", 10.0)),
                                     auth_problem=problem)
