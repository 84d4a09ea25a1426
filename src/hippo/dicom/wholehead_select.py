"""Choosing a whole-head 3D T1 series when a study has no HippoCrop series.

The HippoCrop rules (:class:`hippo.dicom.ingest.SelectionRules`) stay first: when exactly one
HippoCrop series matches, it is used as before. Only when *none* matches are the study's series
tried as a whole-head T1 (:class:`WholeHeadRules`, ``conf/series/wholehead/t1.yaml``):

* the generic checks of the HippoCrop rules (modality, SOP class, one complete anatomical volume,
  consistent geometry, size limits), except the description;
* a 3D acquisition (``MRAcquisitionType`` 3D), or a stack of at least ``min_thin_slices`` slices
  no thicker than ``max_slice_mm``;
* T1-weighted by what the headers say about the acquisition (:meth:`WholeHeadRules.t1_weighting`), never by its
  name when they say anything: ``AcquisitionContrast`` (enhanced images), echo-planar
  (``ScanningSequence`` EP), ``EchoTime`` (long: T2/T2*/PD), ``InversionTime`` (long: FLAIR;
  300-1500 ms with a short echo: an inversion-prepared T1 such as MPRAGE / IR-SPGR / BRAVO),
  ``RepetitionTime`` (short gradient echo: spoiled GRE T1; short spin echo: SE T1); in enhanced
  images these are read from the MR timing, echo, modifier and frame-type functional groups. Only
  when the headers hold none of them is the name asked (``description_patterns``,
  ``other_weighting_patterns``);
* no contrast agent: refused when ``ContrastBolusAgent`` (or ContrastBolusAgentSequence,
  ContrastBolusVolume, ContrastBolusIngredient, the enhanced Contrast/Bolus Usage group) says one
  was given; when the headers say none was, the name is not asked; only when no contrast/bolus
  attribute is there at all do post-contrast names (``contrast_description_patterns``: "Gd",
  "gado", "+C", "post") refuse it -- a vendor protocol name such as ``MPRAGE_EnchancedContrast``
  is not one of them;
* not a localizer / scout by name (``exclude_patterns``);
* ``ORIGINAL`` images (``original_only``: no reformats);
* head coverage from the geometry: the stack spans at least ``min_extent_mm`` along each of its
  three axes (rows x row spacing, columns x column spacing, slices x slice step).

Every refusal names the attribute (and value) that decided it. ``override_series`` (a
SeriesInstanceUID or a regular expression on SeriesDescription / ProtocolName) is the user's
override: such a series is taken as the whole-head T1 whatever its weighting and contrast
attributes say (the volume, geometry, 3D and coverage checks still apply).

Headers only (:mod:`hippo.dicom.ingest`); never torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from hippo.config import settings_fields
from hippo.dicom.geometry import slice_normal
from hippo.dicom.ingest import (SelectionRules, SeriesInfo, SeriesSelectionError, StudyScan, _slices,
                                select_series)

log = logging.getLogger(__name__)

__all__ = ["WholeHeadRules", "series_extent_mm", "select_input_series"]

_DEFAULT_PATTERNS = (r"t1", r"mprage", r"mp-?rage", r"spgr", r"bravo", r"tfe", r"\bfl3d", r"vibe", r"mp2rage",
                     r"3d[ _-]?t1")
_DEFAULT_EXCLUDES = (r"locali[sz]er", r"scout", r"survey", r"\bloc\b", r"aahead")
#: asked only when the headers say nothing about the weighting
_DEFAULT_OTHER_WEIGHTINGS = (r"flair", r"t2", r"dwi", r"\bdti\b", r"swi", r"tof", r"phase", r"\bpd\b")
#: asked only when no contrast/bolus attribute is in the headers ("x" not between letters/digits)
_DEFAULT_CONTRAST_NAMES = (r"(?<![a-z0-9])gd(?![a-z])", r"gado", r"\+\s*c(?![a-z0-9])", r"(?<![a-z0-9])c\+",
                           r"(?<![a-z0-9])post(?![a-z0-9])", r"post[ _-]?(contrast|gd|gad|km)",
                           r"with[ _-]?contrast")


@dataclass
class WholeHeadRules:
    """What makes a series a usable whole-head T1 (see the module docstring).

    Attributes:
        enabled: try whole-head series at all when no HippoCrop series matches.
        description_patterns: regular expressions (case-insensitive, searched) of which at least one
            must match SeriesDescription or ProtocolName -- asked only when the headers hold no
            weighting attribute (EchoTime, RepetitionTime, InversionTime, AcquisitionContrast).
        other_weighting_patterns: names of other weightings (FLAIR, T2, ...), refusing a series in
            that same case only.
        contrast_description_patterns: post-contrast names ("Gd", "+C", "post"), refusing a series
            only when its headers hold no contrast/bolus attribute at all.
        exclude_patterns: regular expressions refusing a series whose SeriesDescription or
            ProtocolName matches any (localizers and scouts, whatever their headers).
        override_series: the user's override (None = none): a SeriesInstanceUID, or a regular
            expression searched in SeriesDescription / ProtocolName; a matching series skips the
            weighting, contrast and name rules (the volume, geometry, 3D and coverage checks stay).
        max_echo_time_ms: a longer EchoTime is T2/T2*/PD weighting, not T1.
        inversion_time_ms: ``[low, high]``: an inversion-prepared image with an InversionTime in
            this range (and a short echo) is a T1 (MPRAGE, IR-SPGR, BRAVO, TFE); longer is FLAIR-like.
        max_gradient_echo_tr_ms: a gradient echo without inversion with RepetitionTime up to this
            (and a short echo) is a spoiled GRE T1 (FLASH, SPGR, T1-FFE).
        max_spin_echo_tr_ms: a spin echo without inversion with RepetitionTime up to this (and a
            short echo) is a spin-echo T1.
        require_3d_or_thin_stack: require MRAcquisitionType 3D, or ``min_thin_slices`` slices of at
            most ``max_slice_mm`` (SliceThickness, else the slice step).
        min_thin_slices: see above.
        max_slice_mm: see above (mm).
        min_extent_mm: the stack must span at least this along each of its three axes (mm).
        original_only: refuse DERIVED images (reformats, MPRs, maps).
        min_instances: at least this many slices (the generic check of :class:`SelectionRules`).
    """

    enabled: bool = True
    description_patterns: Sequence[str] = _DEFAULT_PATTERNS
    exclude_patterns: Sequence[str] = _DEFAULT_EXCLUDES
    other_weighting_patterns: Sequence[str] = _DEFAULT_OTHER_WEIGHTINGS
    contrast_description_patterns: Sequence[str] = _DEFAULT_CONTRAST_NAMES
    override_series: str | None = None
    max_echo_time_ms: float = 15.0
    inversion_time_ms: Sequence[float] = (300.0, 1500.0)
    max_gradient_echo_tr_ms: float = 50.0
    max_spin_echo_tr_ms: float = 800.0
    require_3d_or_thin_stack: bool = True
    min_thin_slices: int = 100
    max_slice_mm: float = 2.0
    min_extent_mm: float = 100.0
    original_only: bool = True
    min_instances: int = 20
    _include: list[re.Pattern] = field(default_factory=list, init=False, repr=False)
    _exclude: list[re.Pattern] = field(default_factory=list, init=False, repr=False)
    _other: list[re.Pattern] = field(default_factory=list, init=False, repr=False)
    _contrast: list[re.Pattern] = field(default_factory=list, init=False, repr=False)
    _override: re.Pattern | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("description_patterns", "exclude_patterns", "other_weighting_patterns",
                     "contrast_description_patterns"):
            value = getattr(self, name)
            setattr(self, name, (str(value),) if isinstance(value, str) else tuple(str(p) for p in value or ()))
        try:
            self._include = [re.compile(p, re.IGNORECASE) for p in self.description_patterns]
            self._exclude = [re.compile(p, re.IGNORECASE) for p in self.exclude_patterns]
            self._other = [re.compile(p, re.IGNORECASE) for p in self.other_weighting_patterns]
            self._contrast = [re.compile(p, re.IGNORECASE) for p in self.contrast_description_patterns]
            self._override = re.compile(str(self.override_series), re.IGNORECASE) \
                if self.override_series not in (None, "") else None
        except re.error as exc:
            raise ValueError(f"whole-head series rules: bad regular expression: {exc}") from None
        self.min_thin_slices, self.min_instances = int(self.min_thin_slices), int(self.min_instances)
        self.max_slice_mm, self.min_extent_mm = float(self.max_slice_mm), float(self.min_extent_mm)
        self.max_echo_time_ms = float(self.max_echo_time_ms)
        ti = tuple(float(v) for v in self.inversion_time_ms)
        if len(ti) != 2 or ti[0] >= ti[1]:
            raise ValueError(f"whole-head series rules: inversion_time_ms must be [low, high], got {list(ti)}")
        self.inversion_time_ms = ti
        self.max_gradient_echo_tr_ms = float(self.max_gradient_echo_tr_ms)
        self.max_spin_echo_tr_ms = float(self.max_spin_echo_tr_ms)

    def overridden(self, series: SeriesInfo) -> bool:
        """Whether ``override_series`` names ``series`` (its UID, or a match in its names)."""
        if self.override_series in (None, ""):
            return False
        if str(self.override_series) == series.uid:
            return True
        return self._override is not None and any(self._override.search(n) for n in _names(series))

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "WholeHeadRules":
        """Rules from a mapping (``None``: disabled); a key this class does not have raises
        ``ValueError`` naming it (:func:`hippo.config.settings_fields`)."""
        if cfg is None:
            return cls(enabled=False)
        return cls(**settings_fields(cls, cfg))

    def generic(self, base: SelectionRules) -> SelectionRules:
        """``base`` (the HippoCrop rules) without the description rule, with this minimum."""
        return replace(base, description_contains=None, min_instances=self.min_instances)

    def rejection_reasons(self, series: SeriesInfo, base: SelectionRules) -> list[str]:
        """Every rule ``series`` breaks as a whole-head T1 (empty list = it matches)."""
        reasons = self.generic(base).rejection_reasons(series)
        names = _names(series)
        shown = " / ".join(repr(n) for n in names) or "(no SeriesDescription or ProtocolName)"
        if not self.overridden(series):
            excluded = [p.pattern for p in self._exclude if any(p.search(n) for n in names)]
            if excluded:
                reasons.append(f"{shown} matches an excluded pattern ({', '.join(excluded)}): a localizer or scout")
            reasons.extend(self.contrast_reasons(series))
            weighting, why = self.t1_weighting(series)
            if weighting is False:
                reasons.append(f"not T1-weighted: {why}")
            elif weighting is None:  # the headers say nothing: the name decides
                other = [p.pattern for p in self._other if any(p.search(n) for n in names)]
                if other:
                    reasons.append(f"{why}; {shown} names another weighting ({', '.join(other)})")
                elif self._include and not any(p.search(n) for p in self._include for n in names):
                    reasons.append(f"{why}; {shown} does not look like a T1 either (none of the patterns "
                                   f"{', '.join(self.description_patterns)})")
        if self.original_only and series.instances and \
                any(h.image_type[:1] and h.image_type[:1] != ("ORIGINAL",) for h in series.instances):
            reasons.append(f"derived images (ImageType {'/'.join(series.instances[0].image_type)}), not the acquisition")
        n_slices = series.n_frames
        extent = series_extent_mm(series)
        if self.require_3d_or_thin_stack:
            kinds = {h.mr_acquisition_type for h in series.instances}
            if kinds != {"3D"}:
                thickness = extent[3] if extent else None
                thick = {h.slice_thickness for h in series.instances if h.slice_thickness is not None}
                thickness = max(thick) if thick else thickness
                if n_slices < self.min_thin_slices or thickness is None or thickness > self.max_slice_mm:
                    what = "/".join(sorted(k or "none" for k in kinds))
                    reasons.append(f"not a 3D acquisition (MRAcquisitionType {what}) and not a stack of >= "
                                   f"{self.min_thin_slices} slices of <= {self.max_slice_mm:g} mm ({n_slices} "
                                   f"slice(s)" + (f" of {thickness:.3g} mm" if thickness is not None else "") + ")")
        if extent is None:
            reasons.append("head coverage unknown: the geometry (positions, orientation, spacing) is incomplete")
        elif min(extent[:3]) < self.min_extent_mm:
            reasons.append(f"covers {' x '.join(f'{e:.0f}' for e in extent[:3])} mm, not a whole head (at least "
                           f"{self.min_extent_mm:.0f} mm along each axis)")
        return reasons


    def contrast_reasons(self, series: SeriesInfo) -> list[str]:
        """Why ``series`` is post-contrast (empty: it is not, as far as its headers -- or, when they
        hold no contrast/bolus attribute at all, its name -- say)."""
        states = [h.mr.get("contrast", ("", "")) for h in series.instances]
        agent = [ev for state, ev in states if state == "agent"]
        if agent:
            n = len(agent)
            where = "" if n == len(states) else f" in {n} of {len(states)} instances"
            return [f"post-contrast: {agent[0]}{where} (a contrast agent was given)"]
        if any(state == "none" for state, _ in states):
            return []  # the headers say no agent: the name is not asked
        names = _names(series)
        hits = [p.pattern for p in self._contrast if any(p.search(n) for n in names)]
        if hits:
            shown = " / ".join(repr(n) for n in names)
            return [f"post-contrast by its name: {shown} matches {', '.join(hits)} and no contrast/bolus attribute "
                    "(ContrastBolusAgent, ...) says otherwise"]
        return []

    def t1_weighting(self, series: SeriesInfo) -> tuple[bool | None, str]:
        """``(True, evidence)`` when the headers say T1-weighted, ``(False, evidence)`` when they say
        another weighting or kind of scan, ``(None, what is missing)`` when they hold none of the
        attributes that decide (the name is asked then). From the first instance (an enhanced
        image's functional groups included); the evidence names the attributes and values."""
        mr = series.instances[0].mr if series.instances else {}
        te, tr, ti = mr.get("EchoTime"), mr.get("RepetitionTime"), mr.get("InversionTime")
        contrast = str(mr.get("AcquisitionContrast", "") or "")
        scanning = tuple(mr.get("ScanningSequence", ()))
        echo_pulse = str(mr.get("EchoPulseSequence", "") or "")
        if contrast and contrast not in ("UNKNOWN", "MIXED", "T1"):
            return False, f"AcquisitionContrast {contrast}"
        if "EP" in scanning:
            return False, f"echo-planar (ScanningSequence {'/'.join(scanning)})"
        inverted = (ti is not None and ti > 0) or "IR" in scanning or mr.get("InversionRecovery") == "YES"
        lo, hi = self.inversion_time_ms
        if inverted and ti is not None and ti > hi:
            return False, f"InversionTime {ti:g} ms (longer than {hi:g} ms: fluid-attenuated, FLAIR-like)"
        if te is not None and te > self.max_echo_time_ms:
            return False, (f"EchoTime {te:g} ms (longer than {self.max_echo_time_ms:g} ms: T2/T2*/PD weighting)")
        if inverted and ti is not None and ti > 0:
            if ti < lo:
                return False, f"InversionTime {ti:g} ms (shorter than {lo:g} ms: fat-suppressing, STIR-like)"
            echo = f", EchoTime {te:g} ms" if te is not None else ""
            return True, f"InversionTime {ti:g} ms{echo}: inversion-prepared T1"
        if contrast == "T1":
            return True, "AcquisitionContrast T1"
        gradient = "GR" in scanning or echo_pulse == "GRADIENT"
        spin = "SE" in scanning or echo_pulse == "SPIN"
        if tr is not None and te is not None and not inverted:
            if gradient and tr <= self.max_gradient_echo_tr_ms:
                return True, f"gradient echo, RepetitionTime {tr:g} ms, EchoTime {te:g} ms: spoiled GRE T1"
            if spin and not gradient and tr <= self.max_spin_echo_tr_ms:
                return True, f"spin echo, RepetitionTime {tr:g} ms, EchoTime {te:g} ms: spin-echo T1"
            kind = "gradient echo" if gradient else "spin echo" if spin else "sequence"
            limit = self.max_gradient_echo_tr_ms if gradient else self.max_spin_echo_tr_ms
            return False, (f"{kind} without inversion, RepetitionTime {tr:g} ms (longer than {limit:g} ms), "
                           f"EchoTime {te:g} ms: PD/T2*-like, not T1")
        if inverted:
            return None, "inversion-prepared but no InversionTime in the headers"
        missing = [k for k, v in (("EchoTime", te), ("RepetitionTime", tr), ("InversionTime", ti),
                                  ("AcquisitionContrast", contrast or None)) if v is None]
        return None, f"the headers do not say the weighting ({', '.join(missing)} absent)"


def _names(series: SeriesInfo) -> list[str]:
    """SeriesDescription and ProtocolName (the non-empty ones, once each)."""
    names = (series.description, series.instances[0].protocol_name if series.instances else "")
    return list(dict.fromkeys(n for n in names if n))


def series_extent_mm(series: SeriesInfo) -> tuple[float, float, float, float] | None:
    """``(columns x column spacing, rows x row spacing, slices x slice step, slice step)`` in mm
    from the headers, or ``None`` when the geometry is missing or mixed."""
    sl = _slices(series.instances)
    if not sl or len(series.rows_columns) != 1:
        return None
    rows, cols = next(iter(series.rows_columns))
    sp, ori = sl[0].pixel_spacing, sl[0].orientation
    if rows is None or cols is None or sp is None or ori is None or any(s.position is None for s in sl):
        return None
    normal = slice_normal(ori)
    if normal is None:
        return None
    proj = sorted(float(np.dot(s.position, normal)) for s in sl)  # type: ignore[arg-type]
    steps = sorted(b - a for a, b in zip(proj, proj[1:]))
    step = steps[len(steps) // 2] if steps else 0.0
    return cols * sp[1], rows * sp[0], (proj[-1] - proj[0]) + step, step


def select_input_series(scan: StudyScan, rules: SelectionRules, wholehead: WholeHeadRules | None
                        ) -> tuple[SeriesInfo, str]:
    """The series to segment and its kind, ``"hippocrop"`` or ``"wholehead"``.

    The HippoCrop rules first (:func:`select_series`, unchanged: it decides whenever at least one
    series matches them, or the whole-head rules are off); when no series matches them, exactly one
    series must match the whole-head rules.

    Raises:
        SeriesSelectionError: several HippoCrop series match; or none does and not exactly one
            whole-head T1 does: the message lists every series with why it was refused as a
            HippoCrop and as a whole-head T1.
    """
    considered = [s for s in scan.series if not (rules.study_uid and s.study_uid != rules.study_uid)]
    crop_reasons = {s.uid: rules.rejection_reasons(s) for s in considered}
    if wholehead is None or not wholehead.enabled or not all(crop_reasons.values()) or \
            (scan.multiple_studies and rules.single_study and not rules.study_uid):
        return select_series(scan, rules), "hippocrop"  # its own messages (and errors) as before
    rejected: dict[str, list[str]] = {}
    matches: list[SeriesInfo] = []
    for s in considered:
        reasons = wholehead.rejection_reasons(s, rules)
        (rejected.__setitem__(s.uid, reasons) if reasons else matches.append(s))
    if len(matches) > 1:  # the user's override picks among several
        chosen = [s for s in matches if wholehead.overridden(s)]
        matches = chosen or matches
    if len(matches) == 1:
        weighting, why = wholehead.t1_weighting(matches[0])
        decided = "override_series" if wholehead.overridden(matches[0]) else \
            (why if weighting else f"{why}; by its name")
        log.info("no HippoCrop series; selected the whole-head T1 series %s (%s)", matches[0].summary(), decided)
        return matches[0], "wholehead"
    lines = []
    for s in scan.series:
        crop = "; ".join(crop_reasons.get(s.uid, ["other study"]))
        head = "; ".join(rejected.get(s.uid, [])) if s.uid in rejected else "MATCHES"
        lines.append(f"  - {s.summary()}:\n      as HippoCrop: {crop}\n      as whole-head T1: {head}")
    head = ("no series matches the HippoCrop selection rules, and no whole-head 3D T1 series either" if not matches
            else f"no series matches the HippoCrop selection rules, and {len(matches)} whole-head T1 series "
                 "match (expected exactly one)")
    msg = f"{head} in {scan.root}; {len(scan.series)} series found:\n" + "\n".join(lines)
    log.error(msg)
    raise SeriesSelectionError(msg, matches=matches, rejected={u: crop_reasons[u] + r for u, r in rejected.items()})
