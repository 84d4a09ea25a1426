"""Hippocampal volumes in mm³ from a label mask.

numpy only (plus the voxel-volume helper of the preprocessing contract, :mod:`hippo.preprocessing`):
no torch, no DICOM.

Conventions
-----------
* A mask is a 3D array ``(X, Y, Z)`` of integers in ``{0 background, 1 anterior, 2 posterior}``
  (the Decathlon Task04 labels); ``spacing_mm`` is the voxel size in mm of the mask's three axes.
* One mask is one hemisphere (the model works on crops around one hippocampus), so volumes here
  are per hemisphere. No asymmetry index: a crop does not see the other side.

No normative comparison: no age/sex reference for this model's segmentation protocol (Decathlon
Task04 labels) has been checked, so no percentile is computed; the report says so
(:data:`NO_NORMATIVE_REFERENCE`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hippo.preprocessing import voxel_volume_mm3

#: Label values of the mask.
ANTERIOR, POSTERIOR = 1, 2

#: What the report and ``result.json`` say in place of a normative comparison.
NO_NORMATIVE_REFERENCE = "No verified normative reference"
NO_NORMATIVE_REFERENCE_DETAIL = (
    "Age- and sex-matched percentiles are not shown: no reference range for this model's "
    "segmentation protocol has been checked against its source.")


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
# DICOM age strings

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
