"""Study ingest: walk a study folder, read DICOM headers, group them into series and pick the one
series the model should run on.

Only headers are read (``dcmread(stop_before_pixels=True)``): a 1000-file study costs 1000 small
reads, never the pixel data. Pixels are decoded later, for the selected series only, by
:mod:`hippo.dicom.volume`.

Typical use::

    scan = scan_study("/incoming/study-42")
    series = select_series(scan, SelectionRules(**cfg.selection))   # exactly one, or an error
    series.files                                                     # -> paths for load_series

A series is one 3D volume as single-frame instances (one per slice) or as enhanced instances
(Enhanced / Legacy Converted Enhanced MR: one multi-frame instance, several multi-frame instances,
or one frame per instance; per-frame geometry from the shared or per-frame functional groups, read
from the header too). Series that cannot be one anatomical volume (Siemens mosaics, time
series, field maps, phase or diffusion images) are refused by name with the reason.

Nothing in here raises for a single bad file: files that are not DICOM, are truncated, or lack the
identifying UIDs are listed in :attr:`StudyScan.ignored` with a reason and logged. Only "there is no
DICOM at all" (:class:`StudyError`), a missing directory (:class:`FileNotFoundError`) and "not
exactly one series matches" (:class:`SeriesSelectionError`) are errors.

Never imports torch, Lightning or Hydra; never logs patient names.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import struct
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pydicom
import pydicom.uid
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from hippo.config import settings_fields
from hippo.dicom.geometry import same_orientation, same_pixel_spacing, slice_normal, stack_problem
from hippo.dicom.prefetch import HEADER_BYTES, read_ahead

log = logging.getLogger(__name__)

__all__ = [
    "FrameHeader",
    "InstanceHeader",
    "ParsedHeader",
    "SeriesInfo",
    "StudyScan",
    "StudyError",
    "SeriesSelectionError",
    "SelectionRules",
    "scan_study",
    "select_series",
    "read_header",
    "frame_attributes",
    "has_functional_groups",
    "mosaic_evidence",
    "mr_parameters",
    "contrast_state",
    "ENHANCED_MR_SOP_CLASSES",
]

#: Media Storage Directory Storage: the SOP class of a DICOMDIR (an index, not an image).
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PIXEL_DATA_TAG = 0x7FE00010

#: Enhanced (multi-frame, functional-group) MR SOP classes that can be one series = one volume.
ENHANCED_MR_SOP_CLASSES = (pydicom.uid.EnhancedMRImageStorage,
                           pydicom.uid.LegacyConvertedEnhancedMRImageStorage)

#: Functional group macro -> the attributes read from its (first) item, per frame (PS3.3 C.7.6.16,
#: C.8.13.5). A per-frame value overrides the shared one.
FRAME_GROUP_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
    "MRImageFrameTypeSequence": ("FrameType", "ComplexImageComponent"),
    "FrameContentSequence": ("TemporalPositionIndex", "StackID", "InStackPositionNumber"),
    "MRDiffusionSequence": ("DiffusionBValue",),
}

#: ImageType / FrameType values (3rd value on) of images that are not an anatomical magnitude
#: image: token -> what the image is. ``M`` (magnitude) is deliberately absent.
NON_ANATOMICAL_IMAGE_TYPES: dict[str, str] = {
    "P": "phase image", "PHASE": "phase image", "PHASE_MAP": "phase image",
    "B0": "field map", "B0MAP": "field map", "B0_MAP": "field map", "FIELD_MAP": "field map",
    "FIELDMAP": "field map", "B1": "field map", "B1MAP": "field map", "B1_MAP": "field map",
    "DIFFUSION": "diffusion image", "ADC": "diffusion image", "EADC": "diffusion image",
    "TRACEW": "diffusion image", "TRACE": "diffusion image", "FA": "diffusion image",
    "TENSOR": "diffusion image",
    "REAL": "real-part image", "IMAGINARY": "imaginary-part image",
}
#: ComplexImageComponent values of images that are not magnitude images.
_NON_MAGNITUDE_COMPONENTS = {"PHASE": "phase image", "REAL": "real-part image",
                             "IMAGINARY": "imaginary-part image"}
_KIND_PRIORITY = ("field map", "diffusion image", "phase image", "real-part image", "imaginary-part image")
#: Siemens CSA private tag NumberOfImagesInMosaic (0019,xx0A) in block "SIEMENS MR HEADER".
_SIEMENS_MOSAIC_TAG = 0x0019100A


def has_functional_groups(ds: Dataset) -> bool:
    """True for an image whose per-frame geometry is in functional groups (Enhanced MR, Legacy
    Converted Enhanced MR, ...): it has a PerFrameFunctionalGroupsSequence, or (a single-frame
    enhanced instance as some converters write it) only a SharedFunctionalGroupsSequence."""
    return "PerFrameFunctionalGroupsSequence" in ds or bool(ds.get("SharedFunctionalGroupsSequence"))


def _group_values(item: Dataset | None, out: dict[str, Any]) -> None:
    if item is None:
        return
    for seq_kw, keywords in FRAME_GROUP_ATTRIBUTES.items():
        seq = item.get(seq_kw)
        if not seq:
            continue
        first = seq[0]
        for kw in keywords:
            value = first.get(kw)
            if value is not None and value != "":
                out[kw] = value


def frame_attributes(ds: Dataset) -> list[dict[str, Any]]:
    """The per-frame attributes (:data:`FRAME_GROUP_ATTRIBUTES`) of a functional-group image, one
    dict per frame in the file's frame order: the PerFrameFunctionalGroupsSequence item's value,
    else the SharedFunctionalGroupsSequence's; an attribute in neither is absent from the dict.
    Headers only (works on a ``stop_before_pixels`` read). Empty list without functional groups."""
    if not has_functional_groups(ds):
        return []
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared: dict[str, Any] = {}
    _group_values(shared_seq[0] if len(shared_seq) else None, shared)
    if "PerFrameFunctionalGroupsSequence" not in ds:  # shared groups only: every frame alike
        n = _int_or_none(ds.get("NumberOfFrames")) or 1
        return [dict(shared) for _ in range(max(n, 1))]
    out = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        values = dict(shared)
        _group_values(item, values)
        out.append(values)
    return out


#: What an MR image's headers say about its acquisition, for telling a T1 from other scans
#: (:func:`mr_parameters`): top-level attribute -> where an enhanced image keeps it instead
#: (functional group sequence, attribute in its item).
_MR_PARAMETER_GROUPS: dict[str, tuple[str, str]] = {
    "RepetitionTime": ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
    "FlipAngle": ("MRTimingAndRelatedParametersSequence", "FlipAngle"),
    "EchoTrainLength": ("MRTimingAndRelatedParametersSequence", "EchoTrainLength"),
    "EchoTime": ("MREchoSequence", "EffectiveEchoTime"),
    "InversionTime": ("MRModifierSequence", "InversionTimes"),
    "InversionRecovery": ("MRModifierSequence", "InversionRecovery"),
    "AcquisitionContrast": ("MRImageFrameTypeSequence", "AcquisitionContrast"),
}
#: ContrastBolusAgent values that say "no agent" rather than name one.
NO_AGENT_VALUES = frozenset({"", "NONE", "NO", "N/A", "NA", "NIL", "-", "0", "NO CONTRAST", "WITHOUT"})


def _first_group_value(ds: Dataset, seq_kw: str, kw: str) -> Any:
    """``kw`` from the first item of ``seq_kw`` in the shared functional groups, else in the first
    per-frame item; ``None`` when neither has it."""
    for groups in (ds.get("SharedFunctionalGroupsSequence") or [], (ds.get("PerFrameFunctionalGroupsSequence")
                                                                      or [])[:1]):
        for item in groups:
            seq = item.get(seq_kw)
            if seq:
                value = seq[0].get(kw)
                if value is not None and value != "":
                    return value
    return None


def mr_parameters(ds: Dataset) -> dict[str, Any]:
    """What the headers of one MR image say about its acquisition, from the top level or (enhanced
    images) the functional groups: ``ScanningSequence``, ``SequenceVariant`` (tuples of upper-case
    strings), ``SequenceName``, ``PulseSequenceName``, ``EchoPulseSequence`` (SPIN/GRADIENT/BOTH),
    ``AcquisitionContrast`` (T1, T2, FLUID_ATTENUATED, ...), ``InversionRecovery`` (YES/NO),
    ``RepetitionTime``, ``EchoTime``, ``InversionTime``, ``FlipAngle``, ``EchoTrainLength``
    (floats; ms / degrees), and ``contrast``: ``(state, evidence)`` from the contrast/bolus
    attributes (:func:`contrast_state`). Absent attributes are absent keys. Headers only."""
    out: dict[str, Any] = {}
    for kw in ("ScanningSequence", "SequenceVariant", "ScanOptions"):
        values = _strings(ds.get(kw))
        if values:
            out[kw] = values
    for kw in ("SequenceName", "PulseSequenceName", "EchoPulseSequence", "AcquisitionContrast",
               "InversionRecovery"):
        value = str(ds.get(kw, "") or "").strip()
        if value:
            out[kw] = value.upper() if kw != "SequenceName" and kw != "PulseSequenceName" else value
    for kw in ("RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "EchoTrainLength"):
        value = _float_or_none(ds.get(kw))
        if value is not None:
            out[kw] = value
    if has_functional_groups(ds):
        for kw, (seq_kw, item_kw) in _MR_PARAMETER_GROUPS.items():
            if kw in out:
                continue
            value = _first_group_value(ds, seq_kw, item_kw)
            if value is None:
                continue
            if isinstance(value, (list, tuple, MultiValue)):
                value = value[0] if len(value) else None
            if kw in ("InversionRecovery", "AcquisitionContrast"):
                out[kw] = str(value).strip().upper()
            elif _float_or_none(value) is not None:
                out[kw] = _float_or_none(value)
    out["contrast"] = contrast_state(ds)
    return out


def contrast_state(ds: Dataset) -> tuple[str, str]:
    """Whether the headers say a contrast agent was given: ``("agent", evidence)`` (e.g.
    ``"ContrastBolusAgent 'Gadovist'"``), ``("none", evidence)`` when they say none was
    (ContrastBolusAgent present and empty or "NONE", ContrastBolusAgentAdministered NO) or
    ``("", "")`` when no contrast/bolus attribute is there at all. Looks at the top level
    (Contrast/Bolus module) and the Contrast/Bolus Usage functional group of enhanced images."""
    none_evidence = ""
    if "ContrastBolusAgent" in ds:
        agent = str(ds.get("ContrastBolusAgent") or "").strip()
        if agent.upper() not in NO_AGENT_VALUES:
            return "agent", f"ContrastBolusAgent {agent!r}"
        none_evidence = f"ContrastBolusAgent {agent!r}" if agent else "ContrastBolusAgent empty"
    for item in ds.get("ContrastBolusAgentSequence") or []:
        meaning = str(item.get("CodeMeaning", "") or item.get("CodeValue", "") or "").strip()
        if meaning and meaning.upper() not in NO_AGENT_VALUES:
            return "agent", f"ContrastBolusAgentSequence {meaning!r}"
    for kw in ("ContrastBolusVolume", "ContrastBolusTotalDose", "ContrastBolusIngredientConcentration"):
        value = _float_or_none(ds.get(kw))
        if value is not None and value > 0:
            return "agent", f"{kw} {value:g}"
    ingredient = str(ds.get("ContrastBolusIngredient", "") or "").strip()
    if ingredient and ingredient.upper() not in NO_AGENT_VALUES:
        return "agent", f"ContrastBolusIngredient {ingredient!r}"
    groups = list(ds.get("SharedFunctionalGroupsSequence") or []) + \
        list((ds.get("PerFrameFunctionalGroupsSequence") or []))
    for item in groups:
        for usage in item.get("ContrastBolusUsageSequence") or []:
            given = str(usage.get("ContrastBolusAgentAdministered", "") or "").strip().upper()
            if given == "YES":
                return "agent", "ContrastBolusUsageSequence ContrastBolusAgentAdministered YES"
            if given == "NO" and not none_evidence:
                none_evidence = "ContrastBolusUsageSequence ContrastBolusAgentAdministered NO"
    return ("none", none_evidence) if none_evidence else ("", "")


class StudyError(RuntimeError):
    """A study folder cannot be used at all (e.g. it holds no readable DICOM)."""


class SeriesSelectionError(StudyError):
    """Not exactly one series matched the :class:`SelectionRules`.

    Attributes:
        matches: the series that matched (empty, or two or more).
        rejected: ``{series_uid: [reason, ...]}`` for every series that did not match.
    """

    def __init__(self, message: str, matches: Sequence["SeriesInfo"] = (),
                 rejected: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__(message)
        self.matches = tuple(matches)
        self.rejected = {k: list(v) for k, v in (rejected or {}).items()}


# --------------------------------------------------------------------------------------------------
# Per-file header
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameHeader:
    """One frame of a functional-group (enhanced) multi-frame instance, from its header.

    ``index`` is the 0-based frame number in the file; geometry as in :class:`InstanceHeader`;
    ``frame_type`` the FrameType (MR Image Frame Type), ``complex_component`` its
    ComplexImageComponent, ``temporal_index`` the TemporalPositionIndex (Frame Content),
    ``b_value`` the DiffusionBValue.
    """

    index: int
    pixel_spacing: tuple[float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    position: tuple[float, float, float] | None
    frame_type: tuple[str, ...] = ()
    complex_component: str = ""
    temporal_index: int | None = None
    b_value: float | None = None


@dataclass(frozen=True)
class InstanceHeader:
    """The header fields of one DICOM file that ingest and selection need.

    Positions / orientations are in DICOM patient coordinates (LPS, mm); ``pixel_spacing`` is
    (row spacing, column spacing) in mm as stored in (0028,0030).
    """

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    series_description: str
    series_number: int | None
    instance_number: int | None
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    position: tuple[float, float, float] | None
    number_of_frames: int
    transfer_syntax: str
    image_type: tuple[str, ...] = ()
    #: Siemens CSA NumberOfImagesInMosaic (0019,100A), when present.
    mosaic_images: int | None = None
    number_of_temporal_positions: int | None = None
    temporal_position: int | None = None      # TemporalPositionIdentifier
    acquisition_number: int | None = None
    complex_component: str = ""
    b_value: float | None = None              # DiffusionBValue (0018,9087)
    images_in_acquisition: int | None = None  # ImagesInAcquisition (0020,1002): the expected count
    #: per-frame headers of a functional-group (enhanced) instance, in file frame order; () else.
    frames: tuple[FrameHeader, ...] = ()
    mr_acquisition_type: str = ""             # MRAcquisitionType (0018,0023): "2D" / "3D" / ""
    protocol_name: str = ""                   # ProtocolName (0018,1030)
    slice_thickness: float | None = None      # SliceThickness (0018,0050), mm
    #: what the headers say about the acquisition (:func:`mr_parameters`); whole-head T1 selection
    mr: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_enhanced(self) -> bool:
        """True for a functional-group multi-frame instance (Enhanced / Legacy Converted MR)."""
        return bool(self.frames)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``value`` (a DS multi-value) as a tuple of ``n`` finite floats, or None."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _strings(value: Any) -> tuple[str, ...]:
    """A CS multi-value as upper-case stripped strings."""
    if value is None or value == "":
        return ()
    if isinstance(value, (str, bytes)):
        value = [value]
    try:
        return tuple(str(v).strip().upper() for v in value)
    except TypeError:
        return ()


def _mosaic_images(ds: Dataset) -> int | None:
    """Siemens NumberOfImagesInMosaic (0019,100A) when the private block is Siemens', else None."""
    if _SIEMENS_MOSAIC_TAG not in ds:
        return None
    creator = str(ds.get((0x0019, 0x0010)).value if (0x0019, 0x0010) in ds else "")
    if creator and "SIEMENS" not in creator.upper():
        return None
    value = ds[_SIEMENS_MOSAIC_TAG].value
    if isinstance(value, (bytes, bytearray)):
        if len(value) < 2:
            return None
        little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
        value = struct.unpack("<H" if little else ">H", bytes(value[:2]))[0]
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    return _int_or_none(value)


def mosaic_evidence(ds: Dataset) -> str:
    """What marks ``ds`` as a Siemens mosaic (``"ImageType MOSAIC, NumberOfImagesInMosaic 5"``), or
    ``""`` when nothing does. Headers only."""
    what = []
    if "MOSAIC" in _strings(ds.get("ImageType")):
        what.append("ImageType MOSAIC")
    tiles = _mosaic_images(ds)
    if tiles:
        what.append(f"NumberOfImagesInMosaic {tiles}")
    return ", ".join(what)


def _frame_headers(ds: Dataset) -> tuple[FrameHeader, ...]:
    out = []
    for k, values in enumerate(frame_attributes(ds)):
        out.append(FrameHeader(
            index=k,
            pixel_spacing=_floats(values.get("PixelSpacing"), 2),  # type: ignore[arg-type]
            orientation=_floats(values.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
            position=_floats(values.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
            frame_type=_strings(values.get("FrameType")),
            complex_component=str(values.get("ComplexImageComponent", "") or "").strip().upper(),
            temporal_index=_int_or_none(values.get("TemporalPositionIndex")),
            b_value=_float_or_none(values.get("DiffusionBValue")),
        ))
    return tuple(out)


def _slice_thickness(ds: Dataset) -> float | None:
    """SliceThickness at the top level, else (enhanced) from the Pixel Measures functional group."""
    value = _float_or_none(ds.get("SliceThickness"))
    if value is None and has_functional_groups(ds):
        value = _float_or_none(_first_group_value(ds, "PixelMeasuresSequence", "SliceThickness"))
    return value


def _looks_like_raw_dicom(path: Path) -> bool:
    """True when a file without the DICM preamble starts like a raw (meta-less) DICOM data set: its
    first element is in group 0x0002 or 0x0008, little endian. A cheap guard so that text files and
    other binaries are not fed to ``dcmread(force=True)``, which parses almost anything."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    if len(head) < 8:
        return False
    group, _elem = struct.unpack("<HH", head[:4])
    return group in (0x0002, 0x0008)


def _pixel_data_problem(path: Path, pos: int, size: int, little_endian: bool,
                        implicit_vr: bool) -> str | None:
    """Check, without reading pixel values, that the Pixel Data element after the header is whole.

    ``pos`` is where header reading stopped. Returns a reason string, or None when fine (or when the
    element is encapsulated / not Pixel Data, which we cannot check cheaply).
    """
    if pos >= size:
        return "no Pixel Data after the header (file truncated?)"
    try:
        with open(path, "rb") as fh:
            fh.seek(pos)
            head = fh.read(12)
    except OSError as exc:  # pragma: no cover - racing deletion
        return f"unreadable: {exc}"
    order = "<" if little_endian else ">"
    if len(head) < 8:
        return "pixel data element truncated"
    group, elem = struct.unpack(order + "HH", head[:4])
    if (group << 16 | elem) != _PIXEL_DATA_TAG:
        return None  # float pixel data or something unusual: leave it to the volume reader
    if implicit_vr:
        (length,), header_len = struct.unpack(order + "L", head[4:8]), 8
    else:
        if len(head) < 12:
            return "pixel data element truncated"
        (length,), header_len = struct.unpack(order + "L", head[8:12]), 12
    if length == 0xFFFFFFFF:
        return None  # encapsulated (compressed): fragments are not checked here
    available = size - pos - header_len
    if available < length:
        return f"pixel data truncated ({available} of {length} bytes)"
    return None


@dataclass(frozen=True)
class ParsedHeader:
    """One file's header as :func:`scan_study` parsed it (``stop_before_pixels``) and where reading
    stopped: :func:`hippo.dicom.volume.load_series` given it reads only the rest of the file (the
    pixel data) instead of parsing the whole file a second time.

    Attributes:
        path: the file.
        dataset: the header (a pydicom ``FileDataset`` without its pixel data; ``load_series`` adds
            the rest of the file to it).
        offset: the file position where the header ended (the Pixel Data element starts there).
        size, mtime_ns: the file's size and modification time when it was scanned: a file changed
            since is read whole again.
    """

    path: Path
    dataset: Dataset = field(repr=False, compare=False)
    offset: int
    size: int
    mtime_ns: int


def read_header(path: str | os.PathLike) -> tuple[InstanceHeader | None, str | None]:
    """Read one file's header (never its pixel data).

    Returns ``(header, None)`` for a usable DICOM instance, or ``(None, reason)`` for anything to
    ignore (not DICOM, DICOMDIR, truncated, missing UIDs). Never raises for file content problems.
    """
    header, reason = _read_header(path)
    return (None, reason) if reason else (header, None)


def _read_header(path: str | os.PathLike) -> tuple[InstanceHeader | None, str | None]:
    """:func:`read_header`, except that a *damaged* instance (identifying header read, pixel data
    truncated) comes back as ``(header, reason)``, so that :func:`scan_study` can hold the damage
    against its series instead of silently dropping one slice."""
    header, reason, _ = _parse_header(path)
    return header, reason


class _SharedValues:
    """The header values of one scan's files, decoded once: the files of a series repeat most of
    their header (UIDs of the study and series, patient, geometry but the position, sequence
    parameters), and pydicom's decoding of each value (``DS``/``IS``/``UI``/... strings, validation)
    is most of the time :func:`scan_study` spends on a file, and again later for each source image
    the SEG and SR are made from. :meth:`share` puts into a file's freshly read header the elements
    already decoded from the same bytes (same tag, VR, encoding and character set) in another file
    of the scan -- the same element objects, as the datasets' cleaned copies share their elements
    (elements are never modified in place); :meth:`keep` remembers what reading a header decoded.
    Standard, non-sequence elements of an unambiguous VR, up to 1 KiB; thread-safe enough (a race
    decodes a value twice)."""

    MAX_BYTES = 1024

    def __init__(self) -> None:
        self._decoded: dict[tuple, DataElement] = {}
        self._tags: dict[int, bool] = {}  # tags that reading a header decodes -> shareable

    @staticmethod
    def _key(tag: int, elem: RawDataElement, charset: Any) -> tuple:
        return (tag, elem.VR, elem.value, elem.is_implicit_VR, elem.is_little_endian, charset)

    @staticmethod
    def _charset(ds: Dataset) -> Any:
        charset = ds.original_character_set
        return tuple(charset) if isinstance(charset, (list, MultiValue)) else charset

    def share(self, ds: Dataset) -> dict:
        """Put the already decoded elements into ``ds``; returns its elements as read (for :meth:`keep`)."""
        as_read = dict(ds.items())
        charset = self._charset(ds)
        for tag, shareable in list(self._tags.items()):
            elem = as_read.get(tag) if shareable else None
            if isinstance(elem, RawDataElement):
                decoded = self._decoded.get(self._key(tag, elem, charset))
                if decoded is not None:
                    ds[tag] = decoded
        return as_read

    def keep(self, ds: Dataset, as_read: dict) -> None:
        """Remember the values that reading ``ds`` decoded (``as_read``: its elements before)."""
        charset = None
        for tag, elem in ds.items():
            raw = as_read.get(tag)
            if not isinstance(raw, RawDataElement) or not isinstance(elem, DataElement):
                continue
            shareable = self._tags.get(tag)
            if shareable is None:
                shareable = self._tags[tag] = self._shareable(raw)
            if shareable and isinstance(raw.value, bytes) and len(raw.value) <= self.MAX_BYTES:
                charset = self._charset(ds) if charset is None else charset
                self._decoded.setdefault(self._key(tag, raw, charset), elem)

    @classmethod
    def _shareable(cls, elem: RawDataElement) -> bool:
        """Whether a value of this element's tag decodes from its bytes alone (not private, not a
        sequence, no VR that depends on other elements)."""
        if elem.tag.is_private:
            return False
        vr = elem.VR
        if vr is None:
            try:
                vr = dictionary_VR(elem.tag)
            except KeyError:
                return False
        return vr != "SQ" and " or " not in vr


def _parse_header(path: str | os.PathLike, shared: _SharedValues | None = None
                  ) -> tuple[InstanceHeader | None, str | None, ParsedHeader | None]:
    """:func:`_read_header` and, for a usable undamaged instance, the parsed header itself
    (:class:`ParsedHeader`; ``None`` for a deflated data set, whose file position says nothing).
    ``shared``: the values already decoded from other files of the scan (:class:`_SharedValues`)."""
    path = Path(path)
    if path.name.upper() == "DICOMDIR":
        return None, "DICOMDIR (media directory index, not an image)", None
    try:
        st = path.stat()
        size = st.st_size
        with open(path, "rb") as fh:
            try:
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=False)
            except InvalidDicomError:
                if not _looks_like_raw_dicom(path):
                    return None, "not DICOM (no DICM preamble)", None
                fh.seek(0)
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
                sop_class = str(ds.get("SOPClassUID", "") or "")
                if not _UID_RE.match(sop_class):
                    return None, "not DICOM (no DICM preamble and no SOPClassUID)", None
            pos = fh.tell()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}", None
    except Exception as exc:  # pydicom raises many types on corrupt input
        return None, f"unreadable DICOM header: {type(exc).__name__}: {exc}", None
    if shared is not None:
        as_read = shared.share(ds)
        header, reason = _header_from_dataset(path, ds, pos=pos, size=size)
        shared.keep(ds, as_read)
    else:
        header, reason = _header_from_dataset(path, ds, pos=pos, size=size)
    if header is None or reason or header.transfer_syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return header, reason, None
    return header, reason, ParsedHeader(path, ds, pos, size, st.st_mtime_ns)


def _header_from_dataset(path: Path, ds: Dataset, *, pos: int, size: int
                         ) -> tuple[InstanceHeader | None, str | None]:
    try:
        meta = getattr(ds, "file_meta", None)
        media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
        sop_class = str(ds.get("SOPClassUID", "") or media_class)
        if MEDIA_STORAGE_DIRECTORY in (sop_class, media_class) or "DirectoryRecordSequence" in ds:
            return None, "DICOMDIR (media directory index, not an image)"
        missing = [kw for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
                   if not str(ds.get(kw, "") or "")]
        if not sop_class:
            missing.insert(0, "SOPClassUID")
        if missing:
            truncated = " (file truncated?)" if pos >= size else ""
            return None, f"missing {', '.join(missing)}{truncated}"
        rows, columns = _int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))
        problem = None
        deflated = meta is not None and str(meta.get("TransferSyntaxUID", "")) == pydicom.uid.DeflatedExplicitVRLittleEndian
        if rows is not None and columns is not None and not deflated:
            # (a deflated data set is read through zlib: the file position says nothing about it)
            implicit, little = ds.original_encoding
            if implicit is None:  # pragma: no cover - read from file, always known
                implicit, little = True, True
            problem = _pixel_data_problem(path, pos, size, bool(little), bool(implicit))
        frames = _int_or_none(ds.get("NumberOfFrames"))
        ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        if not ts:
            ts = pydicom.uid.ImplicitVRLittleEndian if ds.original_encoding[0] else \
                pydicom.uid.ExplicitVRLittleEndian
        header = InstanceHeader(
            path=path,
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=sop_class,
            series_uid=str(ds.SeriesInstanceUID),
            study_uid=str(ds.StudyInstanceUID),
            patient_id=str(ds.get("PatientID", "") or ""),
            modality=str(ds.get("Modality", "") or ""),
            series_description=str(ds.get("SeriesDescription", "") or ""),
            series_number=_int_or_none(ds.get("SeriesNumber")),
            instance_number=_int_or_none(ds.get("InstanceNumber")),
            rows=rows,
            columns=columns,
            pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
            position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
            number_of_frames=frames if frames is not None and frames > 0 else 1,
            transfer_syntax=ts,
            image_type=_strings(ds.get("ImageType")),
            mosaic_images=_mosaic_images(ds),
            number_of_temporal_positions=_int_or_none(ds.get("NumberOfTemporalPositions")),
            temporal_position=_int_or_none(ds.get("TemporalPositionIdentifier")),
            acquisition_number=_int_or_none(ds.get("AcquisitionNumber")),
            complex_component=str(ds.get("ComplexImageComponent", "") or "").strip().upper(),
            b_value=_float_or_none(ds.get("DiffusionBValue")),
            images_in_acquisition=_int_or_none(ds.get("ImagesInAcquisition")),
            frames=_frame_headers(ds),
            mr_acquisition_type=str(ds.get("MRAcquisitionType", "") or "").strip().upper(),
            protocol_name=str(ds.get("ProtocolName", "") or ""),
            slice_thickness=_slice_thickness(ds),
            mr=mr_parameters(ds),
        )
    except Exception as exc:  # a malformed value somewhere in the header
        return None, f"unreadable DICOM header: {type(exc).__name__}: {exc}"
    return header, problem  # problem set: a damaged instance of a known series


# --------------------------------------------------------------------------------------------------
# Series
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesInfo:
    """One series of a scanned study (headers only).

    Attributes:
        uid: SeriesInstanceUID.
        modality, description, series_number: from the first instance (by InstanceNumber).
        sop_class_uids: distinct SOPClassUIDs of the instances (one for a sane series).
        files: instance paths sorted by (InstanceNumber, path); ``len(files)`` instances.
        rows_columns: distinct ``(Rows, Columns)``; ``(None, None)`` when absent.
        pixel_spacings: distinct PixelSpacing (row, column) in mm; ``None`` when absent (of every
            frame, from the functional groups, for enhanced multi-frame instances).
        orientations: distinct ImageOrientationPatient 6-tuples (LPS); ``None`` when absent (per
            frame for enhanced instances).
        number_of_frames: distinct NumberOfFrames per instance (1 when absent).
        transfer_syntaxes: distinct TransferSyntaxUIDs.
        study_uid, patient_id: of the first instance (``study_uids`` lists all, normally one).
        instances: the per-file headers in ``files`` order (positions for geometry checks).
        damaged: ``(path, reason)`` of files of this series that were left out because they are
            damaged (pixel data truncated or missing); such a series is never selected. A series
            whose every instance is damaged is still listed, its ``files``/``instances`` being the
            damaged ones, so that selection names it with the reason.
    """

    uid: str
    modality: str
    description: str
    series_number: int | None
    sop_class_uids: frozenset[str]
    files: tuple[Path, ...]
    rows_columns: frozenset[tuple[int | None, int | None]]
    pixel_spacings: frozenset[tuple[float, float] | None]
    orientations: frozenset[tuple[float, ...] | None]
    number_of_frames: frozenset[int]
    transfer_syntaxes: frozenset[str]
    study_uid: str
    study_uids: frozenset[str]
    patient_id: str
    instances: tuple[InstanceHeader, ...] = field(repr=False)
    damaged: tuple[tuple[Path, str], ...] = ()

    @classmethod
    def from_instances(cls, instances: Iterable[InstanceHeader],
                       damaged: Iterable[tuple[Path, str]] = ()) -> "SeriesInfo":
        """Group headers that share one SeriesInstanceUID (sorted by InstanceNumber, then path);
        ``damaged`` lists the series' files that could not be used."""
        inst = sorted(instances, key=lambda h: (h.instance_number is None,
                                                h.instance_number or 0, str(h.path)))
        if not inst:
            raise ValueError("a series needs at least one instance")
        uids = {h.series_uid for h in inst}
        if len(uids) != 1:
            raise ValueError(f"instances of several series given: {sorted(uids)}")
        first = inst[0]
        return cls(
            uid=first.series_uid,
            modality=first.modality,
            description=first.series_description,
            series_number=first.series_number,
            sop_class_uids=frozenset(h.sop_class_uid for h in inst),
            files=tuple(h.path for h in inst),
            rows_columns=frozenset((h.rows, h.columns) for h in inst),
            pixel_spacings=frozenset(sl.pixel_spacing for sl in _slices(inst)),
            orientations=frozenset(sl.orientation for sl in _slices(inst)),
            number_of_frames=frozenset(h.number_of_frames for h in inst),
            transfer_syntaxes=frozenset(h.transfer_syntax for h in inst),
            study_uid=first.study_uid,
            study_uids=frozenset(h.study_uid for h in inst),
            patient_id=first.patient_id,
            instances=tuple(inst),
            damaged=tuple(sorted(damaged, key=lambda pr: str(pr[0]))),
        )

    @property
    def n_instances(self) -> int:
        """Number of instances (files) in the series."""
        return len(self.files)

    @property
    def sop_class_uid(self) -> str:
        """The series' SOPClassUID, or ``""`` when its instances disagree."""
        return next(iter(self.sop_class_uids)) if len(self.sop_class_uids) == 1 else ""

    @property
    def is_single_frame(self) -> bool:
        """True when every instance holds exactly one frame (classic one-slice-per-file series)."""
        return self.number_of_frames == frozenset({1})

    @property
    def n_frames(self) -> int:
        """Number of frames (slices) over all instances (``n_instances`` for a single-frame series)."""
        return sum(h.number_of_frames for h in self.instances)

    @property
    def is_enhanced(self) -> bool:
        """True when every instance is a functional-group (enhanced) multi-frame instance."""
        return all(h.is_enhanced for h in self.instances)

    @property
    def is_single_enhanced(self) -> bool:
        """True for a series of exactly one enhanced multi-frame instance (the form
        :func:`hippo.dicom.volume.load_series` reads as a multi-frame volume)."""
        return self.n_instances == 1 and self.is_enhanced

    def volume_problems(self) -> list[str]:
        """Why this series cannot be *one* 3D volume, from the headers (empty list when it can).

        Refused: a Siemens mosaic (ImageType MOSAIC or CSA NumberOfImagesInMosaic); a multi-frame
        instance without per-frame functional groups (classic multi-frame); a series mixing
        enhanced and classic instances; several images at each slice position (a time series when
        the headers say so: NumberOfTemporalPositions, TemporalPositionIdentifier/Index or
        AcquisitionNumber vary; otherwise echoes / contrasts / field-map parts mixed in one series).
        A series is acceptable as single-frame instances (one per slice) or as enhanced instances
        (one multi-frame instance, several multi-frame instances, or one frame per instance) whose
        frames together make one stack.
        """
        inst = self.instances
        problems: list[str] = []
        mosaic = [h for h in inst if "MOSAIC" in h.image_type or h.mosaic_images]
        if mosaic:
            what = []
            if any("MOSAIC" in h.image_type for h in mosaic):
                what.append("ImageType MOSAIC")
            tiles = sorted({h.mosaic_images for h in mosaic if h.mosaic_images})
            if tiles:
                what.append(f"NumberOfImagesInMosaic {_fmt_set(tiles)}")
            n = f"{len(mosaic)} of {len(inst)} instances" if len(mosaic) != len(inst) else \
                f"{len(inst)} instance{'s' if len(inst) != 1 else ''}"
            problems.append(f"Siemens mosaic ({', '.join(what)}; {n}): slices tiled in one image, "
                            "not a volume")
            return problems
        classic_mf = [h for h in inst if h.number_of_frames > 1 and not h.is_enhanced]
        if classic_mf:
            problems.append(f"multi-frame (NumberOfFrames {_fmt_set({h.number_of_frames for h in classic_mf})}) "
                            "without per-frame functional groups: not an enhanced image, its frames "
                            f"cannot be placed in space ({classic_mf[0].path})")
            return problems
        enhanced = [h for h in inst if h.is_enhanced]
        if enhanced and len(enhanced) != len(inst):
            classic = next(h for h in inst if not h.is_enhanced)
            problems.append(f"mixes {len(enhanced)} enhanced (functional-group) instance(s) with "
                            f"{len(inst) - len(enhanced)} classic one(s) (e.g. {classic.path}): not one volume")
        repeated = self._repeated_positions()
        if repeated:
            problems.append(repeated)
        return problems

    def _repeated_positions(self) -> str:
        """A reason when most slice positions hold several images (4D / mixed series), else ``""``."""
        slices = _slices(self.instances)
        keyed = [(tuple(round(v, 2) for v in sl.position), sl) for sl in slices if sl.position is not None]
        if len(keyed) < 2:
            return ""
        counts = Counter(k for k, _ in keyed)
        n_pos = len(counts)
        multi = [c for c in counts.values() if c > 1]
        if not multi or len(multi) * 2 < n_pos:
            return ""  # a stray duplicate is a geometry problem, not a 4D series
        lo, hi = min(counts.values()), max(counts.values())
        inst = self.instances
        evidence = []
        ntp = {h.number_of_temporal_positions for h in inst if (h.number_of_temporal_positions or 0) > 1}
        if ntp:
            evidence.append(f"NumberOfTemporalPositions {_fmt_set(ntp)}")
        for label, values in (("TemporalPositionIdentifier", {h.temporal_position for h in inst}),
                              ("TemporalPositionIndex", {f.temporal_index for h in inst for f in h.frames}),
                              ("AcquisitionNumber", {h.acquisition_number for h in inst})):
            values.discard(None)
            if len(values) > 1:
                evidence.append(f"{label} {min(values)}..{max(values)}")  # type: ignore[type-var]
        if evidence:
            if lo == hi:
                head = f"time series: {hi} volumes of {n_pos} slices at the same positions"
            else:
                head = f"time series: {lo} to {hi} images at each of {n_pos} slice positions"
            return f"{head} (fMRI / dynamic; {', '.join(evidence)}), not one 3D volume"
        types = sorted({(sl.type_label, "\\".join(sl.image_type) or "none") for _, sl in keyed})
        kinds = ""
        if len(types) > 1:
            kinds = f"; {types[0][0]} " + ", ".join(t for _, t in types)
        each = f"{hi}" if lo == hi else f"{lo} to {hi}"
        return (f"{each} images at each of {n_pos} slice positions (several volumes in one series: "
                f"echoes, contrasts or parts of a map{kinds}), not one 3D volume")

    def content_problems(self) -> list[str]:
        """Why this series is not an anatomical magnitude image (empty list when it may be): a
        field map, phase, real/imaginary, diffusion (incl. ADC / TRACEW / FA) image, from
        ImageType / FrameType values 3 on (``M`` is magnitude and fine), ComplexImageComponent and
        DiffusionBValue > 0. One reason per kind, with the evidence and how many images show it."""
        slices = _slices(self.instances)
        found: dict[str, Counter[str]] = defaultdict(Counter)
        for sl in slices:
            evidence: list[tuple[str, str]] = []  # (kind, what shows it)
            for token in sl.image_type[2:]:
                kind = NON_ANATOMICAL_IMAGE_TYPES.get(token)
                if kind:
                    evidence.append((kind, f"{sl.type_label} {token}"))
            kind = _NON_MAGNITUDE_COMPONENTS.get(sl.complex_component)
            if kind:
                evidence.append((kind, f"ComplexImageComponent {sl.complex_component}"))
            if sl.b_value is not None and sl.b_value > 0:
                evidence.append(("diffusion image", "DiffusionBValue > 0"))
            if evidence:  # one kind per image, the most specific; all its evidence under it
                main = min((k for k, _ in evidence), key=_KIND_PRIORITY.index)
                for _, what in evidence:
                    found[main][what] += 1
        unit = "frames" if any(h.frames for h in self.instances) else "images"
        problems = []
        for kind in sorted(found, key=_KIND_PRIORITY.index):
            items = sorted(found[kind].items(), key=lambda wn: (wn[0].startswith("Complex"), wn[0]))
            shown = "; ".join(what + (f" in {n} of {len(slices)} {unit}" if n != len(slices) else "")
                              for what, n in items)
            problems.append(f"{kind} ({shown}): not an anatomical magnitude image")
        return problems

    def geometry_problems(self) -> list[str]:
        """Why this series is not one regular stack of slices (empty list when it is).

        Checks (headers only): one (Rows, Columns); then the checks of :mod:`hippo.dicom.geometry`
        that :func:`hippo.dicom.volume.load_series` applies too, with the same tolerances: one
        PixelSpacing and one ImageOrientationPatient; an ImagePositionPatient on every slice; no two
        slices at one position, no gap, even steps, and (stricter than loading, which keeps a
        gantry tilt in the affine) every slice on the normal through the first. The slices are the instances of a single-frame series, or
        the frames (per-frame functional groups) of enhanced multi-frame instances; positions of
        classic multi-frame instances are not examined. Each problem names a file (and frame)
        that shows it (the odd one out, or the two slices around a gap).
        """
        problems: list[str] = []
        if len(self.rows_columns) != 1 or None in next(iter(self.rows_columns)):
            problems.append(f"Rows/Columns missing or differ ({_fmt_set(self.rows_columns)})"
                            + _odd_one_out(self.instances, lambda h: (h.rows, h.columns), "Rows/Columns"))
        inst = _slices(self.instances)
        if None in self.pixel_spacings:
            problems.append("PixelSpacing missing on some instances"
                            + _odd_one_out(inst, lambda h: h.pixel_spacing, "PixelSpacing"))
        elif not _all_same(self.pixel_spacings, same_pixel_spacing):
            problems.append(f"PixelSpacing differs ({_fmt_set(self.pixel_spacings)})"
                            + _odd_one_out(inst, lambda h: h.pixel_spacing, "PixelSpacing",
                                           same_pixel_spacing))
        if None in self.orientations:
            problems.append("ImageOrientationPatient missing on some instances"
                            + _odd_one_out(inst, lambda h: h.orientation, "ImageOrientationPatient"))
            return problems
        if not _all_same(self.orientations, same_orientation):
            problems.append(f"ImageOrientationPatient differs ({len(self.orientations)} values)"
                            + _odd_one_out(inst, lambda h: h.orientation, "ImageOrientationPatient",
                                           same_orientation))
            return problems
        if any(h.number_of_frames > 1 and not h.is_enhanced for h in self.instances):
            return problems
        positions = [h.position for h in inst]
        if any(p is None for p in positions):
            problems.append("ImagePositionPatient missing on some instances"
                            + _odd_one_out(inst, lambda h: h.position is not None, "ImagePositionPatient"))
            return problems
        normal = slice_normal(inst[0].orientation)  # type: ignore[arg-type]
        if normal is None:
            problems.append("ImageOrientationPatient is degenerate (row and column not orthogonal)")
            return problems
        if len(inst) < 2:
            return problems
        problem = stack_problem(np.array(positions, dtype=np.float64), normal, [h.label for h in inst],
                                what="frames" if self.is_enhanced else "instances", allow_shear=False)
        if problem is not None:
            problems.append(problem.message)
        return problems

    def completeness_problems(self) -> list[str]:
        """Why this classic series is known to be incomplete (empty list when it is not known to be).

        The count to expect comes from ImagesInAcquisition, and only when every instance is an
        ORIGINAL image of one acquisition that states the same count (a derived series, such as a
        crop, may carry its source's count). Fewer instances than that: the rest of the series has
        not arrived (a sender that paused, a partial export).
        """
        inst = self.instances
        if not inst or not self.is_single_frame:
            return []
        counts = {h.images_in_acquisition for h in inst}
        original = all(h.image_type[:1] == ("ORIGINAL",) for h in inst)
        acquisitions = {h.acquisition_number for h in inst}
        if not original or len(counts) != 1 or None in counts or len(acquisitions) > 1:
            return []
        expected = next(iter(counts))
        if expected is not None and len(inst) < expected:
            return [f"incomplete: {len(inst)} of {expected} instances (ImagesInAcquisition {expected}); the rest "
                    "of the series has not arrived"]
        return []

    @property
    def is_consistent(self) -> bool:
        """True when :meth:`geometry_problems` finds nothing."""
        return not self.geometry_problems()

    @property
    def is_single_frame_consistent(self) -> bool:
        """True for a single-frame series that forms one regular stack (what the model needs)."""
        return self.is_single_frame and self.is_consistent

    def summary(self) -> str:
        """One line: uid, modality, description, instance count (no patient data)."""
        num = "" if self.series_number is None else f" #{self.series_number}"
        return (f"{self.uid}{num} {self.modality or '?'} {self.description!r} "
                f"({self.n_instances} instance{'s' if self.n_instances != 1 else ''})")


@dataclass(frozen=True)
class _Slice:
    """One slice for the geometry checks: a single-frame instance, or one frame of an enhanced
    instance (``label`` names the file, and the frame)."""

    label: str
    pixel_spacing: tuple[float, float] | None
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None
    image_type: tuple[str, ...]
    type_label: str
    complex_component: str
    b_value: float | None


def _slices(instances: Iterable[InstanceHeader]) -> list[_Slice]:
    """The slices of ``instances``: each frame of an enhanced instance (FrameType as its image
    type), else each instance."""
    out = []
    for h in instances:
        if h.frames:
            out.extend(_Slice(f"{h.path} frame {f.index + 1}", f.pixel_spacing, f.orientation, f.position,
                              f.frame_type or h.image_type, "FrameType" if f.frame_type else "ImageType",
                              f.complex_component or h.complex_component,
                              f.b_value if f.b_value is not None else h.b_value)
                       for f in h.frames)
        else:
            out.append(_Slice(str(h.path), h.pixel_spacing, h.orientation, h.position, h.image_type,
                              "ImageType", h.complex_component, h.b_value))
    return out


def _all_same(values: Iterable[tuple[float, ...] | None], same) -> bool:
    """Whether every non-missing value is ``same`` as the first (one of the geometry predicates)."""
    vals = [v for v in values if v is not None]
    return all(same(v, vals[0]) for v in vals[1:])


def _odd_one_out(instances: Sequence[InstanceHeader] | Sequence[_Slice], key, label: str, same=None) -> str:
    """``": PATH has X, the other N instance(s) have Y"`` for the first instance (or slice) whose
    ``key`` differs from the most common value (``same(a, b)`` decides "equal"; default ``==``),
    or ``""``."""
    same = same or (lambda a, b: a == b)
    values = [key(h) for h in instances]
    common = Counter(values).most_common(1)[0][0]
    n_common = sum(1 for v in values if same(v, common))
    for h, v in zip(instances, values):
        if not same(v, common):
            show = {True: "one", False: "none"} if isinstance(v, bool) else {}
            name = h.label if isinstance(h, _Slice) else h.path
            unit = "frame(s)" if isinstance(h, _Slice) and h.type_label == "FrameType" else "instance(s)"
            return (f": {name} has {label} {show.get(v, _fmt_value(v))}, the other {n_common} {unit} "
                    f"have {show.get(common, _fmt_value(common))}")
    if instances and (common is None or common is False or (isinstance(common, tuple) and None in common)):
        h = instances[0]  # missing everywhere: name a file that lacks it
        name = h.label if isinstance(h, _Slice) else h.path
        unit = "frame(s)" if isinstance(h, _Slice) and h.type_label == "FrameType" else "instance(s)"
        return f": all {len(instances)} {unit} lack {label} (e.g. {name})"
    return ""


def _fmt_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return "(" + ", ".join("none" if x is None else f"{x:g}" if isinstance(x, float) else str(x)
                               for x in v) + ")"
    return str(v)


def _fmt_set(values: Iterable[Any]) -> str:
    return ", ".join(sorted(str(v) for v in values))


# --------------------------------------------------------------------------------------------------
# Study scan
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyScan:
    """What :func:`scan_study` found under one directory.

    Attributes:
        root: the scanned directory.
        series: every series found, sorted by (StudyInstanceUID, SeriesNumber, uid).
        ignored: ``(path, reason)`` for every file that is not a usable DICOM instance.
        study_uids: distinct StudyInstanceUIDs (normally exactly one).
        n_files: number of files looked at.
        elapsed_s: wall time of the scan in seconds.
    """

    root: Path
    series: tuple[SeriesInfo, ...]
    ignored: tuple[tuple[Path, str], ...]
    study_uids: tuple[str, ...]
    n_files: int
    elapsed_s: float
    #: ``scan_study(keep_headers=True)``: the parsed header of each usable file (path -> it), until
    #: :meth:`series_inputs` hands them out
    parsed: dict[Path, ParsedHeader] = field(default_factory=dict, repr=False, compare=False)

    def series_inputs(self, series: "SeriesInfo", *, release: bool = True) -> list[Path | ParsedHeader]:
        """What :func:`hippo.dicom.volume.load_series` reads ``series`` from: its files, each as the
        header already parsed by the scan where kept (``scan_study(keep_headers=True)``: every file is
        then parsed once), else as its path.

        Args:
            release: forget every kept header afterwards, the other series' too (their memory is
                freed; the handed-out ones belong to the caller, which may add the pixel data to them).
        """
        out = [self.parsed.get(p, p) for p in series.files]
        if release:
            self.parsed.clear()
        return out

    @property
    def multiple_studies(self) -> bool:
        """True when the directory mixes instances of more than one study."""
        return len(self.study_uids) > 1

    @property
    def n_instances(self) -> int:
        """Total number of usable instances."""
        return sum(s.n_instances for s in self.series)

    def get(self, uid: str) -> SeriesInfo:
        """The series with SeriesInstanceUID ``uid`` (KeyError naming it when absent)."""
        for s in self.series:
            if s.uid == uid:
                return s
        raise KeyError(f"series {uid} not found under {self.root}")

    def describe(self) -> str:
        """A multi-line listing of the series found (no patient data)."""
        return "\n".join(f"  - {s.summary()}" for s in self.series) or "  (no series)"


def _walk_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Every regular file below ``root`` (hidden ones too), sorted. Symlinked directories are not
    descended; symlinked files are kept only when they resolve inside ``root``; a second name for
    a file already listed (symlink or hard link) is skipped.

    Returns ``(files, ignored, unreadable)``: ``unreadable`` lists the folders that could not be
    listed and the entries that could not be examined (permissions, I/O errors) -- input that exists
    but cannot be read, which the caller must not treat as absent."""
    real_root = root.resolve()
    files: list[Path] = []
    ignored: list[tuple[Path, str]] = []
    unreadable: list[tuple[Path, str]] = []
    seen: set[tuple[int, int]] = set()

    def walk_error(exc: OSError) -> None:
        unreadable.append((Path(exc.filename or root), f"folder cannot be listed: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=walk_error):
        base = Path(dirpath)
        dirnames.sort()
        for d in dirnames:
            if (base / d).is_symlink():
                ignored.append((base / d, "symlinked directory not followed"))
        for name in sorted(filenames):
            p = base / name
            try:
                if p.is_symlink():
                    target = p.resolve(strict=True)
                    if not target.is_relative_to(real_root):
                        ignored.append((p, "symlink pointing outside the study directory"))
                        continue
                st = p.stat()
            except (OSError, RuntimeError) as exc:
                if p.is_symlink():
                    ignored.append((p, "broken symlink"))
                else:
                    unreadable.append((p, f"cannot be examined: {getattr(exc, 'strerror', None) or exc}"))
                continue
            if not stat.S_ISREG(st.st_mode):
                ignored.append((p, "not a regular file"))
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                ignored.append((p, "second name (link) of a file already scanned"))
                continue
            seen.add(key)
            files.append(p)
    return files, ignored, unreadable


def scan_study(study_dir: str | os.PathLike, *, workers: int = 8, keep_headers: bool = False) -> StudyScan:
    """Scan every file under ``study_dir`` (any names, nested folders, hidden files) and group the
    DICOM instances by SeriesInstanceUID.

    Headers only (``dcmread(stop_before_pixels=True)``), parsed one after the other in the calling
    thread while the operating system reads the next files ahead
    (:func:`hippo.dicom.prefetch.read_ahead`). Files without the DICM preamble are parsed with
    ``force=True`` only when they start like a raw DICOM data set and carry a SOPClassUID.
    Non-DICOM, truncated or unidentifiable files and DICOMDIRs are listed in ``StudyScan.ignored``
    with a reason (and logged), never fatal; a file whose header names its series but whose pixel
    data is truncated is also recorded in that series' :attr:`SeriesInfo.damaged` (selection then
    rejects the series, naming the file). A SOPInstanceUID seen twice keeps the first file (by path)
    and ignores the other.

    Args:
        study_dir: the study folder.
        workers: how far the files are read ahead of the parse (``4 * workers`` files; >= 1; 1: none).
        keep_headers: keep each usable file's parsed header (:attr:`StudyScan.parsed`), so that the
            selected series is read from them (:meth:`StudyScan.series_inputs`) instead of parsed again.

    Raises:
        FileNotFoundError: ``study_dir`` does not exist (the message names it).
        NotADirectoryError: ``study_dir`` is a file.
        StudyError: no DICOM instance at all under ``study_dir`` (the message names it), or a file
            or folder under it cannot be read (permissions, I/O): a study is never measured from
            part of its input.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(study_dir)
    if not root.exists():
        raise FileNotFoundError(2, "study directory not found", str(root))
    if not root.is_dir():
        raise NotADirectoryError(20, "study path is not a directory", str(root))
    t0 = time.perf_counter()
    files, ignored, unreadable = _walk_files(root)
    # parsed in this thread (Python work: parsing threads would only take turns at the GIL)
    shared = _SharedValues()
    parsed_all = [_parse_header(files[i], shared) for i in read_ahead(files, workers, nbytes=HEADER_BYTES)]
    results = [(h, r) for h, r, _ in parsed_all]
    kept = {p: ph for p, (_, _, ph) in zip(files, parsed_all) if ph is not None} if keep_headers else {}
    del parsed_all

    by_series: dict[str, list[InstanceHeader]] = defaultdict(list)
    damaged: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    damaged_headers: dict[str, list[InstanceHeader]] = defaultdict(list)
    seen_sop: dict[str, Path] = {}
    for path, (header, reason) in zip(files, results):
        if header is None or reason:
            ignored.append((path, reason or "unknown"))
            if header is not None:
                damaged[header.series_uid].append((path, reason))
                damaged_headers[header.series_uid].append(header)
            continue
        if header.sop_instance_uid in seen_sop:
            ignored.append((path, f"duplicate SOPInstanceUID (same as {seen_sop[header.sop_instance_uid]})"))
            continue
        seen_sop[header.sop_instance_uid] = path
        by_series[header.series_uid].append(header)

    unreadable += [(p, r) for p, (h, r) in zip(files, results) if h is None and r and r.startswith("unreadable:")]
    if unreadable:  # part of the study cannot be read: measuring the rest could give a partial volume
        shown = "; ".join(f"{p}: {why}" for p, why in unreadable[:5])
        more = f" (and {len(unreadable) - 5} more)" if len(unreadable) > 5 else ""
        raise StudyError(f"{root}: {len(unreadable)} input(s) cannot be read: {shown}{more}; fix the permissions "
                         "or the storage and run the study again (a partial study is never measured)")
    for path, reason in ignored:
        log.info("ignored %s: %s", path, reason)
    elapsed = time.perf_counter() - t0
    if not by_series:
        why = Counter(r.split(" (")[0] for _, r in ignored)
        detail = "; ".join(f"{n} x {r}" for r, n in why.most_common(5)) or "directory is empty"
        raise StudyError(f"no DICOM instances found under {root} ({len(files)} files; {detail})")

    # a series whose every instance is damaged is still listed (with its damaged instances), so that
    # selection names it and why instead of silently not seeing it; it is never selected
    for uid, headers in damaged_headers.items():
        if uid not in by_series:
            by_series[uid] = headers
    series = sorted((SeriesInfo.from_instances(v, damaged.get(uid, ())) for uid, v in by_series.items()),
                    key=lambda s: (s.study_uid, s.series_number is None, s.series_number or 0,
                                   s.uid))
    study_uids = tuple(sorted({u for s in series for u in s.study_uids}))
    listed = {p for s in series for p in s.files}  # duplicates and damaged files are read from their path
    scan = StudyScan(root=root, series=tuple(series), ignored=tuple(ignored),
                     study_uids=study_uids, n_files=len(files), elapsed_s=elapsed,
                     parsed={p: ph for p, ph in kept.items() if p in listed})
    log.info("scanned %s: %d files, %d instances in %d series, %d ignored, %d stud%s, %.2f s",
             root, len(files), scan.n_instances, len(series), len(ignored), len(study_uids),
             "y" if len(study_uids) == 1 else "ies", elapsed)
    if scan.multiple_studies:
        log.warning("%s mixes %d studies: %s", root, len(study_uids), ", ".join(study_uids))
    return scan


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------
def _resolve_sop_class(value: str) -> str:
    """A SOP class given as a dotted UID or a pydicom keyword (``"MRImageStorage"``) -> UID."""
    value = str(value).strip()
    if _UID_RE.match(value):
        return value
    uid = getattr(pydicom.uid, value, None)
    if isinstance(uid, str) and _UID_RE.match(uid):
        return str(uid)
    raise ValueError(f"unknown SOP class {value!r} (give a UID or a pydicom.uid keyword "
                     "such as 'MRImageStorage')")


@dataclass
class SelectionRules:
    """Which series of a study the model runs on. Constructible from a plain (Hydra) mapping:
    ``SelectionRules(**cfg)`` or :meth:`from_mapping` (which also drops ``_target_``).

    Attributes:
        modality: required Modality (None or "" = any).
        description_contains: case-insensitive substring of SeriesDescription (None or "" = any).
        single_volume: require a series that is one 3D volume: single-frame instances (one per
            slice) or enhanced instances whose frames make one stack (one or several multi-frame
            instances, or single-frame enhanced ones); refuses Siemens mosaics, time series (4D),
            classic multi-frame instances and series mixing enhanced and classic instances
            (:meth:`SeriesInfo.volume_problems`).
        anatomical_only: refuse field maps, phase, real/imaginary and diffusion images
            (:meth:`SeriesInfo.content_problems`).
        complete_series: refuse a series with fewer instances than its headers announce
            (:meth:`SeriesInfo.completeness_problems`: the rest has not arrived yet).
        consistent_geometry: require one regular stack (see :meth:`SeriesInfo.geometry_problems`).
        min_instances: minimum number of slices (instances, or frames of an enhanced instance).
        sop_classes: accepted SOPClassUIDs (UIDs or pydicom keywords; empty = any).
        study_uid: only consider this StudyInstanceUID (None = any).
        single_study: when True, a folder that mixes studies is an error unless ``study_uid`` picks
            one; when False (default) it is only logged as a warning.
        max_instances: refuse a series of more slices (instances or frames) than this (None = no
            limit).
        max_rows_columns: refuse a series whose Rows or Columns exceed this (None = no limit).
            With ``max_instances`` this bounds the memory a study may take; both are checked from
            the headers, before any pixel is read.

        single_frame: deprecated alias of ``single_volume`` (older configs); ``None`` = not given.

    A series with a damaged instance (:attr:`SeriesInfo.damaged`: pixel data truncated) is always
    rejected, naming the file: using the rest would silently drop a slice.
    """

    modality: str | None = "MR"
    description_contains: str | None = "HippoCrop"
    single_volume: bool = True
    anatomical_only: bool = True
    complete_series: bool = True
    consistent_geometry: bool = True
    min_instances: int = 3
    sop_classes: Sequence[str] = (pydicom.uid.MRImageStorage, *ENHANCED_MR_SOP_CLASSES)
    study_uid: str | None = None
    single_study: bool = False
    max_instances: int | None = 2000
    max_rows_columns: int | None = 512
    single_frame: bool | None = None

    def __post_init__(self) -> None:
        if self.single_frame is not None:
            log.warning("selection rule 'single_frame' is deprecated: read as single_volume=%s "
                        "(one volume: single-frame slices or one enhanced multi-frame instance)",
                        bool(self.single_frame))
            self.single_volume = bool(self.single_frame)
            self.single_frame = None
        if isinstance(self.sop_classes, str):
            self.sop_classes = (self.sop_classes,)
        self.sop_classes = tuple(_resolve_sop_class(s) for s in (self.sop_classes or ()))
        self.min_instances = int(self.min_instances)
        if self.min_instances < 1:
            raise ValueError(f"min_instances must be >= 1, got {self.min_instances}")
        self.single_volume = bool(self.single_volume)
        self.anatomical_only = bool(self.anatomical_only)
        self.consistent_geometry = bool(self.consistent_geometry)
        self.single_study = bool(self.single_study)
        for name in ("max_instances", "max_rows_columns"):
            value = getattr(self, name)
            if value is not None:
                if int(value) < 1:
                    raise ValueError(f"{name} must be >= 1 or null, got {value}")
                setattr(self, name, int(value))

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "SelectionRules":
        """Rules from a mapping (e.g. the ``series`` config group); ``_target_`` is ignored, a key
        this class does not have raises ``ValueError`` naming it (:func:`hippo.config.settings_fields`)."""
        values = settings_fields(cls, cfg, handled=("wholehead",))
        values.pop("wholehead", None)  # the whole-head T1 fallback's own rules (hippo.dicom.wholehead_select)
        return cls(**values)

    def rejection_reasons(self, series: SeriesInfo) -> list[str]:
        """Every rule ``series`` breaks (empty list = it matches)."""
        reasons: list[str] = []
        if self.study_uid and series.study_uid != self.study_uid:
            reasons.append(f"other study ({series.study_uid})")
        if self.modality and series.modality.upper() != self.modality.upper():
            reasons.append(f"modality {series.modality or '(none)'} is not {self.modality}")
        if self.description_contains and \
                self.description_contains.casefold() not in series.description.casefold():
            reasons.append(f"description does not contain {self.description_contains!r}")
        if self.sop_classes and not series.sop_class_uids <= set(self.sop_classes):
            names = ", ".join(sorted(pydicom.uid.UID(u).name for u in series.sop_class_uids))
            reasons.append(f"SOP class {names} not accepted")
        if self.single_volume:
            reasons.extend(series.volume_problems())
        if self.anatomical_only:
            reasons.extend(series.content_problems())
        if self.complete_series:
            reasons.extend(series.completeness_problems())
        # slices: the frames of enhanced instances, else the instances
        if series.is_enhanced and series.n_frames < self.min_instances:
            where = "the enhanced instance" if series.n_instances == 1 else f"{series.n_instances} enhanced instances"
            reasons.append(f"only {series.n_frames} frame(s) in {where}, need >= {self.min_instances}")
        elif not series.is_enhanced and series.n_instances < self.min_instances:
            reasons.append(f"only {series.n_instances} instance(s), need >= {self.min_instances}")
        if self.max_instances is not None and series.n_frames > self.max_instances:
            unit = "instances" if series.is_single_frame else "frames"
            reasons.append(f"too large: {series.n_frames} {unit} exceed max_instances {self.max_instances}")
        if self.max_rows_columns is not None:
            big = sorted((r, c) for r, c in series.rows_columns
                         if r is not None and c is not None and max(r, c) > self.max_rows_columns)
            if big:
                reasons.append(f"too large: Rows x Columns {', '.join(f'{r}x{c}' for r, c in big)} exceed "
                               f"max_rows_columns {self.max_rows_columns}")
        if series.damaged:
            shown = "; ".join(f"{p}: {why}" for p, why in series.damaged[:5])
            more = f" (and {len(series.damaged) - 5} more)" if len(series.damaged) > 5 else ""
            reasons.append(f"{len(series.damaged)} damaged instance(s) left out of the series: {shown}{more}")
        if self.consistent_geometry:
            reasons.extend(f"geometry: {p}" for p in series.geometry_problems())
        return reasons


def select_series(scan: StudyScan, rules: SelectionRules | Mapping[str, Any] | None = None
                  ) -> SeriesInfo:
    """The one series of ``scan`` that satisfies ``rules`` (defaults: the HippoCrop MR series).

    Raises:
        SeriesSelectionError: none or several series match; the message lists every series found
            (uid, modality, description, instance count) with why each was rejected.
        StudyError: the scan mixes studies, ``rules.single_study`` is set and no
            ``rules.study_uid`` picks one.
    """
    if rules is None:
        rules = SelectionRules()
    elif not isinstance(rules, SelectionRules):
        rules = SelectionRules.from_mapping(rules)
    if scan.multiple_studies:
        msg = (f"{scan.root} mixes {len(scan.study_uids)} studies ({', '.join(scan.study_uids)})")
        if rules.study_uid:
            log.warning("%s; considering only study %s", msg, rules.study_uid)
        elif rules.single_study:
            raise StudyError(f"{msg}; set selection.study_uid to choose one")
        else:
            log.warning("%s; selecting across all of them", msg)

    rejected: dict[str, list[str]] = {}
    matches: list[SeriesInfo] = []
    for s in scan.series:
        reasons = rules.rejection_reasons(s)
        if reasons:
            rejected[s.uid] = reasons
        else:
            matches.append(s)

    if len(matches) == 1:
        chosen = matches[0]
        log.info("selected series %s (%d of %d series rejected)", chosen.summary(),
                 len(rejected), len(scan.series))
        return chosen

    lines = []
    for s in scan.series:
        why = "; ".join(rejected[s.uid]) if s.uid in rejected else "MATCHES"
        lines.append(f"  - {s.summary()}: {why}")
    head = ("no series matches" if not matches
            else f"{len(matches)} series match (expected exactly one)")
    msg = (f"{head} the selection rules ({_describe_rules(rules)}) in {scan.root}; "
           f"{len(scan.series)} series found:\n" + "\n".join(lines))
    log.error(msg)
    raise SeriesSelectionError(msg, matches=matches, rejected=rejected)


def _describe_rules(rules: SelectionRules) -> str:
    parts = []
    if rules.modality:
        parts.append(f"modality={rules.modality}")
    if rules.description_contains:
        parts.append(f"description contains {rules.description_contains!r}")
    if rules.sop_classes:
        parts.append("SOP class in {" + ", ".join(pydicom.uid.UID(u).name
                                                   for u in rules.sop_classes) + "}")
    if rules.single_volume:
        parts.append("one volume")
    if rules.anatomical_only:
        parts.append("anatomical images")
    if rules.complete_series:
        parts.append("complete series")
    if rules.consistent_geometry:
        parts.append("consistent geometry")
    parts.append(f">= {rules.min_instances} instances")
    if rules.max_instances is not None:
        parts.append(f"<= {rules.max_instances} instances")
    if rules.max_rows_columns is not None:
        parts.append(f"Rows/Columns <= {rules.max_rows_columns}")
    if rules.study_uid:
        parts.append(f"study {rules.study_uid}")
    return ", ".join(parts)
