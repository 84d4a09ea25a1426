"""Choosing a whole-head 3D T1 series when a study has no HippoCrop series.

The HippoCrop rules (:class:`hippo.dicom.ingest.SelectionRules`) stay first: when exactly one
HippoCrop series matches, it is used as before. Only when *none* matches are the study's series
tried as a whole-head T1 (:class:`WholeHeadRules`, ``conf/series/wholehead/t1.yaml``):

* the generic checks of the HippoCrop rules (modality, SOP class, one complete anatomical volume,
  consistent geometry, size limits), except the description;
* a 3D acquisition (``MRAcquisitionType`` 3D), or a stack of at least ``min_thin_slices`` slices
  no thicker than ``max_slice_mm``;
* a T1-like ``SeriesDescription`` or ``ProtocolName`` (case-insensitive regular expressions,
  ``description_patterns``) and none of ``exclude_patterns`` (localizers, contrast, other
  weightings);
* ``ORIGINAL`` images (``original_only``: no reformats);
* head coverage from the geometry: the stack spans at least ``min_extent_mm`` along each of its
  three axes (rows x row spacing, columns x column spacing, slices x slice step).

Headers only (:mod:`hippo.dicom.ingest`); never torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np

from hippo.dicom.geometry import slice_normal
from hippo.dicom.ingest import (SelectionRules, SeriesInfo, SeriesSelectionError, StudyScan, _slices,
                                select_series)

log = logging.getLogger(__name__)

__all__ = ["WholeHeadRules", "series_extent_mm", "select_input_series"]

_DEFAULT_PATTERNS = (r"t1", r"mprage", r"mp-?rage", r"spgr", r"bravo", r"tfe", r"\bfl3d", r"vibe", r"mp2rage",
                     r"3d[ _-]?t1")
_DEFAULT_EXCLUDES = (r"locali[sz]er", r"scout", r"survey", r"\bloc\b", r"aahead", r"\bgd\b", r"gado", r"contrast",
                     r"\+c\b", r"post", r"flair", r"t2", r"dwi", r"\bdti\b", r"swi", r"tof", r"phase")


@dataclass
class WholeHeadRules:
    """What makes a series a usable whole-head T1 (see the module docstring).

    Attributes:
        enabled: try whole-head series at all when no HippoCrop series matches.
        description_patterns: regular expressions (case-insensitive, searched) of which at least one
            must match SeriesDescription or ProtocolName.
        exclude_patterns: regular expressions refusing a series whose SeriesDescription or
            ProtocolName matches any (localizers, post-contrast, other weightings).
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
    require_3d_or_thin_stack: bool = True
    min_thin_slices: int = 100
    max_slice_mm: float = 2.0
    min_extent_mm: float = 100.0
    original_only: bool = True
    min_instances: int = 20
    _include: list[re.Pattern] = field(default_factory=list, init=False, repr=False)
    _exclude: list[re.Pattern] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.description_patterns, str):
            self.description_patterns = (self.description_patterns,)
        if isinstance(self.exclude_patterns, str):
            self.exclude_patterns = (self.exclude_patterns,)
        self.description_patterns = tuple(str(p) for p in self.description_patterns or ())
        self.exclude_patterns = tuple(str(p) for p in self.exclude_patterns or ())
        try:
            self._include = [re.compile(p, re.IGNORECASE) for p in self.description_patterns]
            self._exclude = [re.compile(p, re.IGNORECASE) for p in self.exclude_patterns]
        except re.error as exc:
            raise ValueError(f"whole-head series rules: bad regular expression: {exc}") from None
        self.min_thin_slices, self.min_instances = int(self.min_thin_slices), int(self.min_instances)
        self.max_slice_mm, self.min_extent_mm = float(self.max_slice_mm), float(self.min_extent_mm)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "WholeHeadRules":
        """Rules from a mapping (``None``: disabled); unknown keys raise ``TypeError`` naming them."""
        if cfg is None:
            return cls(enabled=False)
        cfg = dict(cfg)
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(k for k in cfg if k not in known and not k.startswith("_"))
        if unknown:
            raise TypeError(f"unknown whole-head selection rule(s): {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(known))}")
        return cls(**{k: v for k, v in cfg.items() if k in known})

    def generic(self, base: SelectionRules) -> SelectionRules:
        """``base`` (the HippoCrop rules) without the description rule, with this minimum."""
        return replace(base, description_contains=None, min_instances=self.min_instances)

    def rejection_reasons(self, series: SeriesInfo, base: SelectionRules) -> list[str]:
        """Every rule ``series`` breaks as a whole-head T1 (empty list = it matches)."""
        reasons = self.generic(base).rejection_reasons(series)
        names = [n for n in (series.description, series.instances[0].protocol_name if series.instances else "") if n]
        shown = " / ".join(repr(n) for n in names) or "(no SeriesDescription or ProtocolName)"
        excluded = [p.pattern for p in self._exclude if any(p.search(n) for n in names)]
        if excluded:
            reasons.append(f"{shown} matches an excluded pattern ({', '.join(excluded)}): not a plain T1")
        elif self._include and not any(p.search(n) for p in self._include for n in names):
            reasons.append(f"{shown} does not look like a T1 (none of the patterns "
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
    if len(matches) == 1:
        log.info("no HippoCrop series; selected the whole-head T1 series %s", matches[0].summary())
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
