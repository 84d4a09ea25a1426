"""Hippocampal volumes in mm³ from a label mask, and an indicative normative comparison.

numpy only (plus the voxel-volume helper of the preprocessing contract, :mod:`hippo.preprocessing`):
no torch, no DICOM.

Conventions
-----------
* A mask is a 3D array ``(X, Y, Z)`` of integers in ``{0 background, 1 anterior, 2 posterior}``
  (the Decathlon Task04 labels); ``spacing_mm`` is the voxel size in mm of the mask's three axes.
* One mask is one hemisphere (the model works on crops around one hippocampus), so volumes and
  norms here are per hemisphere. No asymmetry index: a crop does not see the other side.

Normative comparison — read before showing it to anyone
-------------------------------------------------------
:data:`NORM_TABLE` holds *approximate* 5th / 50th / 95th percentiles of the volume of ONE
hippocampus (mm³) by 5-year age band (45–80 years), sex and hemisphere, after the UK Biobank
nomograms of Nobis et al. 2019 (NeuroImage: Clinical 23:101904, doi:10.1016/j.nicl.2019.101904;
19,793 generally healthy participants). The numbers are rounded to 10 mm³ and were read off the
published percentile curves approximately — they are not a transcription of the paper's tables,
and should be checked against the paper's supplementary data before any use beyond research
display. Those volumes come from a different segmentation protocol (FSL FIRST, the UK Biobank
imaging pipeline) than our model, which learnt the Decathlon Task04 labels (anterior + posterior
hippocampus on 1 mm crops; on its training labels the median total is about 3,320 mm³, lower than
the FIRST medians here). A volume in a low band may therefore reflect the protocol difference
rather than atrophy. Every result carries ``source`` and ``caveat`` strings saying so; the
comparison is indicative only and never a diagnosis.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from hippo.preprocessing import voxel_volume_mm3

#: Label values of the mask.
ANTERIOR, POSTERIOR = 1, 2

NORM_SOURCE = (
    "Nobis L. et al. (2019) Hippocampal volume across age: nomograms derived from over 19,700 "
    "people in UK Biobank. NeuroImage: Clinical 23:101904. doi:10.1016/j.nicl.2019.101904"
)
NORM_CAVEAT = (
    "Indicative only, not for diagnosis. Approximate percentiles (rounded to 10 mm³, read from the "
    "published curves) of one hippocampus in UK Biobank, segmented with FSL FIRST — a different "
    "protocol from this model's (Decathlon labels, whose volumes run lower), so a low band may "
    "reflect the method rather than atrophy."
)

#: Percentile band labels returned by :func:`compare` (``band``).
BAND_BELOW_5 = "below 5th"
BAND_5_50 = "5th-50th"
BAND_50_95 = "50th-95th"
BAND_ABOVE_95 = "above 95th"
BANDS = (BAND_BELOW_5, BAND_5_50, BAND_50_95, BAND_ABOVE_95)

NORM_AGE_MIN, NORM_AGE_MAX = 45.0, 80.0

# (age_lo, age_hi, p50 male-left, male-right, female-left, female-right) in mm³; the 5th and 95th
# percentiles are p50 - spread_lo and p50 + spread_hi (the spread widens a little with age).
_MEDIANS = (
    (45, 50, 4000, 4100, 3760, 3850),
    (50, 55, 3960, 4060, 3730, 3820),
    (55, 60, 3910, 4010, 3680, 3770),
    (60, 65, 3850, 3950, 3620, 3710),
    (65, 70, 3770, 3870, 3540, 3630),
    (70, 75, 3680, 3780, 3450, 3540),
    (75, 80, 3560, 3660, 3350, 3440),
)
_SPREAD = {45: (640, 610), 50: (640, 610), 55: (640, 610), 60: (660, 630), 65: (660, 630),
           70: (690, 650), 75: (690, 650)}


@dataclass(frozen=True)
class NormRow:
    """One row of :data:`NORM_TABLE`: percentiles in mm³ of one hippocampus for ``age_lo <= age <
    age_hi`` (the last band includes 80), ``sex`` "M"/"F", ``hemisphere`` "left"/"right"."""

    age_lo: float
    age_hi: float
    sex: str
    hemisphere: str
    p5_mm3: float
    p50_mm3: float
    p95_mm3: float


def _build_table() -> tuple[NormRow, ...]:
    rows = []
    for lo, hi, ml, mr, fl, fr in _MEDIANS:
        s_lo, s_hi = _SPREAD[lo]
        for sex, hemi, p50 in (("M", "left", ml), ("M", "right", mr), ("F", "left", fl), ("F", "right", fr)):
            rows.append(NormRow(lo, hi, sex, hemi, float(p50 - s_lo), float(p50), float(p50 + s_hi)))
    return tuple(rows)


#: Approximate UK Biobank percentiles (see the module docstring for what they are and are not).
NORM_TABLE: tuple[NormRow, ...] = _build_table()


@dataclass(frozen=True)
class Volumes:
    """Voxel counts of one hemisphere's mask and their volumes.

    Attributes:
        anterior_voxels, posterior_voxels: voxels labelled 1 and 2.
        spacing_mm: voxel size (mm) of the mask's three axes.
        voxel_volume_mm3: volume of one voxel in mm³.
    Properties give ``total_voxels`` and the volumes ``*_mm3`` (mm³) and ``*_ml`` (mL = 1000 mm³).
    """

    anterior_voxels: int
    posterior_voxels: int
    spacing_mm: tuple[float, float, float]
    voxel_volume_mm3: float

    @property
    def total_voxels(self) -> int:
        return self.anterior_voxels + self.posterior_voxels

    @property
    def anterior_mm3(self) -> float:
        return self.anterior_voxels * self.voxel_volume_mm3

    @property
    def posterior_mm3(self) -> float:
        return self.posterior_voxels * self.voxel_volume_mm3

    @property
    def total_mm3(self) -> float:
        return self.total_voxels * self.voxel_volume_mm3

    @property
    def anterior_ml(self) -> float:
        return self.anterior_mm3 / 1000.0

    @property
    def posterior_ml(self) -> float:
        return self.posterior_mm3 / 1000.0

    @property
    def total_ml(self) -> float:
        return self.total_mm3 / 1000.0

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: voxel counts, spacing, voxel volume and volumes in mm³ and mL."""
        return {
            "anterior_voxels": self.anterior_voxels,
            "posterior_voxels": self.posterior_voxels,
            "total_voxels": self.total_voxels,
            "spacing_mm": list(self.spacing_mm),
            "voxel_volume_mm3": self.voxel_volume_mm3,
            "anterior_mm3": self.anterior_mm3,
            "posterior_mm3": self.posterior_mm3,
            "total_mm3": self.total_mm3,
            "anterior_ml": self.anterior_ml,
            "posterior_ml": self.posterior_ml,
            "total_ml": self.total_ml,
        }


def validate_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    """Return ``spacing_mm`` as three floats; ValueError unless three finite values > 0."""
    try:
        values = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spacing must be three numbers in mm, got {spacing_mm!r}") from exc
    if len(values) != 3:
        raise ValueError(f"spacing must have 3 values (one per mask axis), got {len(values)}: {values}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be finite and > 0 mm, got {values}")
    return values  # type: ignore[return-value]


def validate_mask(mask: np.ndarray) -> np.ndarray:
    """Check a label mask and return it as ``uint8``.

    Args:
        mask: 3D array of integers (or bool, or integer-valued floats) in ``{0, 1, 2}``.

    Raises:
        ValueError: not 3D, non-numeric, non-finite, non-integer or values outside ``{0, 1, 2}``
        (the offending values are named).
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be a 3D array (X, Y, Z), got shape {mask.shape}")
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.isfinite(mask).all():
            raise ValueError("mask holds NaN or infinite values")
        if not np.array_equal(mask, np.round(mask)):
            raise ValueError("mask holds non-integer values")
    elif not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must hold integers, got dtype {mask.dtype}")
    bad = sorted(set(np.unique(mask).tolist()) - {0, 1, 2})
    if bad:
        raise ValueError(f"mask values {bad[:10]} outside {{0 background, 1 anterior, 2 posterior}}")
    return mask.astype(np.uint8, copy=False)


def measure_volumes(mask: np.ndarray, spacing_mm: Sequence[float]) -> Volumes:
    """Count anterior (1) and posterior (2) voxels of ``mask (X, Y, Z)`` and turn them into mm³.

    Args:
        mask: ``(X, Y, Z)`` integer array in ``{0, 1, 2}`` (see :func:`validate_mask`).
        spacing_mm: voxel size in mm of the three axes, in the mask's axis order.

    Raises:
        ValueError: invalid mask values or spacing.
    """
    spacing = validate_spacing(spacing_mm)
    mask = validate_mask(mask)
    return Volumes(
        anterior_voxels=int(np.count_nonzero(mask == ANTERIOR)),
        posterior_voxels=int(np.count_nonzero(mask == POSTERIOR)),
        spacing_mm=spacing,
        voxel_volume_mm3=voxel_volume_mm3(spacing),
    )


# ------------------------------------------------------------------------------------------------
# Age, sex and the normative table

_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def parse_age(value: str | bytes | float | int | None) -> float | None:
    """A DICOM Age String (AS, ``nnnD|W|M|Y``) in years: ``"072Y" -> 72.0``, ``"006M" -> 0.5``.

    Numbers pass through as years; ``None`` or an empty string gives ``None``. Leading zeros and
    surrounding spaces are tolerated (``"72Y"``, ``" 072Y "``), the unit letter is not optional.

    Raises:
        ValueError: a malformed age string or a negative / non-finite number.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        years = float(value)
        if not math.isfinite(years) or years < 0:
            raise ValueError(f"age must be finite and >= 0 years, got {value!r}")
        return years
    text = str(value)
    if not text.strip():
        return None
    match = _AGE_RE.match(text)
    if not match:
        raise ValueError(f"not a DICOM age string (nnnD/W/M/Y): {value!r}")
    return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()]


def normalize_sex(sex: str | None) -> str | None:
    """``"M"``/``"male"`` -> ``"M"``, ``"F"``/``"female"`` -> ``"F"``; anything else (``"O"``, empty,
    ``None``) -> ``None`` (no sex-specific norm)."""
    if sex is None:
        return None
    text = str(sex).strip().upper()
    if text in ("M", "MALE"):
        return "M"
    if text in ("F", "FEMALE"):
        return "F"
    return None


@dataclass(frozen=True)
class NormRange:
    """Indicative percentiles in mm³ of one hippocampus for an age band, sex and hemisphere.

    ``hemisphere`` is "left", "right" or "mean of left and right" (side unknown). ``source`` cites
    the publication; ``caveat`` says why the numbers are approximate and indicative only.
    """

    age_lo: float
    age_hi: float
    sex: str
    hemisphere: str
    p5_mm3: float
    p50_mm3: float
    p95_mm3: float
    source: str = NORM_SOURCE
    caveat: str = NORM_CAVEAT

    @property
    def age_band(self) -> str:
        return f"{self.age_lo:g}-{self.age_hi:g} years"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "age_band": self.age_band}


def normative_range(age_years: float | None, sex: str | None, hemisphere: str | None = None) -> NormRange | None:
    """The indicative percentile range for one hippocampus, or ``None`` when not applicable.

    Args:
        age_years: age in years (the table covers 45 to 80 inclusive).
        sex: "M"/"F" (or "male"/"female"); other values give ``None``.
        hemisphere: "left", "right", or ``None`` when unknown: the mean of the two sides' values
            (right is slightly larger than left in the source).

    Returns:
        A :class:`NormRange` (values rounded to 10 mm³, with ``source`` and ``caveat``), or ``None``
        when age or sex is unknown or the age lies outside 45–80 years.
    """
    sex = normalize_sex(sex)
    if age_years is None or sex is None:
        return None
    age = float(age_years)
    if not math.isfinite(age) or not (NORM_AGE_MIN <= age <= NORM_AGE_MAX):
        return None
    if hemisphere is not None:
        hemisphere = str(hemisphere).strip().lower()
        if hemisphere in ("l", "left"):
            hemisphere = "left"
        elif hemisphere in ("r", "right"):
            hemisphere = "right"
        else:
            raise ValueError(f"hemisphere must be 'left', 'right' or None, got {hemisphere!r}")
    rows = [r for r in NORM_TABLE if r.sex == sex and (r.age_lo <= age < r.age_hi or
                                                        (age == r.age_hi == NORM_AGE_MAX))]
    if hemisphere is not None:
        rows = [r for r in rows if r.hemisphere == hemisphere]
    if not rows:
        return None

    def _mean(attr: str) -> float:
        return float(round(np.mean([getattr(r, attr) for r in rows]) / 10.0) * 10.0)

    return NormRange(
        age_lo=rows[0].age_lo,
        age_hi=rows[0].age_hi,
        sex=sex,
        hemisphere=hemisphere or "mean of left and right",
        p5_mm3=_mean("p5_mm3"),
        p50_mm3=_mean("p50_mm3"),
        p95_mm3=_mean("p95_mm3"),
    )


def percentile_band(volume_mm3: float, norm: NormRange) -> str:
    """Where ``volume_mm3`` lies in ``norm``: one of :data:`BANDS` (``p5 <= v < p50`` is
    "5th-50th", ``p50 <= v <= p95`` is "50th-95th")."""
    if volume_mm3 < norm.p5_mm3:
        return BAND_BELOW_5
    if volume_mm3 < norm.p50_mm3:
        return BAND_5_50
    if volume_mm3 <= norm.p95_mm3:
        return BAND_50_95
    return BAND_ABOVE_95


def compare(volumes: Volumes, age: float | str | None, sex: str | None,
            hemisphere: str | None = None) -> dict[str, Any]:
    """Place the total hippocampal volume in the indicative age/sex percentile bands.

    Args:
        volumes: the measured :class:`Volumes` (one hemisphere).
        age: years, or a DICOM AS string ("072Y"), or ``None``.
        sex: DICOM PatientSex ("M"/"F"; "O" or empty means unknown).
        hemisphere: "left"/"right" when known, else ``None``.

    Returns:
        A JSON-able dict, always: ``available`` (bool), ``band`` (one of :data:`BANDS`, or ``None``
        when no comparison is possible), ``reason`` (why not, else ``None``), ``total_mm3``,
        ``age_years``, ``sex``, ``norm`` (:meth:`NormRange.as_dict` or ``None``), ``source`` and
        ``caveat``.
    """
    result: dict[str, Any] = {
        "available": False, "band": None, "reason": None, "total_mm3": volumes.total_mm3,
        "age_years": None, "sex": normalize_sex(sex), "norm": None,
        "source": NORM_SOURCE, "caveat": NORM_CAVEAT,
    }
    try:
        years = parse_age(age)
    except ValueError:
        result["reason"] = f"age unreadable ({age!r})"
        return result
    result["age_years"] = years
    missing = [name for name, value in (("age", years), ("sex", result["sex"])) if value is None]
    if missing:
        result["reason"] = f"{' and '.join(missing)} unknown"
        return result
    norm = normative_range(years, result["sex"], hemisphere)
    if norm is None:
        result["reason"] = (f"age {years:g} years outside the reference range "
                            f"{NORM_AGE_MIN:g}-{NORM_AGE_MAX:g} years")
        return result
    result.update(available=True, band=percentile_band(volumes.total_mm3, norm), norm=norm.as_dict())
    return result
