"""Outliers over the whole data set: robust z-scores (median/MAD) of the total hippocampal volume
and of the image maximum, flagged on the records (excluded when configured)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from hippo.curate.records import CaseRecord, Flag, OUTLIER, ROBUST_Z_SCALE


def robust_z(values: Sequence[float]) -> tuple[np.ndarray, float, float]:
    """Robust z-scores ``0.6745 (x - median) / MAD``.

    When the MAD is 0 (over half the values equal) the mean absolute deviation times 1.2533 is
    used instead; when that is 0 too, every score is 0.

    Returns:
        ``(z, median, scale)`` where ``z = (x - median) / scale``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x, math.nan, math.nan
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    scale = mad / ROBUST_Z_SCALE if mad > 0 else 1.2533 * float(np.mean(np.abs(x - med)))
    if scale <= 0:
        return np.zeros_like(x), med, 0.0
    return (x - med) / scale, med, scale


def flag_outliers(records: list[CaseRecord], volume_z: float | None, intensity_z: float | None,
                   min_cases: int) -> dict[str, Any]:
    """Robust z-scores over the error-free cases; flag those beyond the thresholds."""
    eligible = [r for r in records if not r.has_error and r.volumes_mm3 is not None]
    info: dict[str, Any] = {"n_eligible": len(eligible), "volume": None, "intensity": None}
    if len(eligible) < max(min_cases, 3):
        info["skipped"] = f"only {len(eligible)} error-free cases (< {min_cases}); outlier detection skipped"
        return info
    for key in ("total_mm3", "anterior_mm3", "posterior_mm3"):
        z, med, scale = robust_z([r.volumes_mm3[key] for r in eligible])
        for r, zi in zip(eligible, z):
            r.volume_z = (r.volume_z or {}) | {key: round(float(zi), 3)}
        if key == "total_mm3":
            lo = med - volume_z * scale if volume_z is not None else None
            hi = med + volume_z * scale if volume_z is not None else None
            info["volume"] = {"median": med, "scale": scale, "threshold": volume_z, "low": lo, "high": hi}
            if volume_z is not None and scale > 0:
                for r, zi in zip(eligible, z):
                    if abs(zi) > volume_z:
                        r.flags.append(Flag(
                            "volume_outlier", OUTLIER, r.label,
                            f"total volume {r.volumes_mm3['total_mm3']:.0f} mm³, robust z {zi:+.2f} "
                            f"(median {med:.0f}, threshold |z| > {volume_z:g})"))
    with_max = [r for r in eligible if r.intensity and r.intensity.get("max") is not None and r.intensity["max"] > 0]
    if intensity_z is not None and len(with_max) >= max(min_cases, 3):
        z, med, scale = robust_z([math.log10(r.intensity["max"]) for r in with_max])
        info["intensity"] = {"median_log10_max": med, "scale": scale, "threshold": intensity_z}
        for r, zi in zip(with_max, z):
            r.intensity_z = round(float(zi), 3)
            if scale > 0 and abs(zi) > intensity_z:
                r.flags.append(Flag("intensity_outlier", OUTLIER, r.image,
                                    f"image maximum {r.intensity['max']:.4g}, robust z of log10 {zi:+.2f} "
                                    f"(threshold |z| > {intensity_z:g})"))
    return info
