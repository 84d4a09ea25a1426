"""Plain-words review checks of a whole-head result: when is a number not to be trusted as it is.

Each check returns sentences for a person; an empty list means nothing to flag. The caller puts
them in ``result.json`` (``review``) and on the report page; a scan with any is status ``review``.

numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["ReviewRules", "TEMPORAL_LANDMARKS_MNI", "volume_reasons", "coverage_reasons"]

#: MNI points (mm) a scan must contain for both medial temporal lobes to be covered: temporal
#: poles, inferior temporal gyri and the hippocampal tails, per side.
TEMPORAL_LANDMARKS_MNI: dict[str, dict[str, tuple[float, float, float]]] = {
    "left": {"temporal pole": (-40.0, 16.0, -34.0), "inferior temporal gyrus": (-54.0, -30.0, -28.0),
             "hippocampal tail": (-22.0, -40.0, 0.0)},
    "right": {"temporal pole": (40.0, 16.0, -34.0), "inferior temporal gyrus": (54.0, -30.0, -28.0),
              "hippocampal tail": (22.0, -40.0, 0.0)},
}


@dataclass(frozen=True)
class ReviewRules:
    """Limits beyond which a result is flagged for review.

    Attributes:
        anterior_mm3, posterior_mm3, total_mm3: ``(min, max)`` believable volumes of one
            hippocampus (the plausibility group's defaults: Decathlon protocol).
        max_asymmetry_percent: ``|100 (L - R) / ((L + R) / 2)|`` above this is flagged.
        max_score: a registration score (Mattes MI, negative) above this is poor. Good whole-head
            alignments measured -0.37 to -0.45 here; a 20 mm / 20° misalignment about -0.15.
        determinant_range: believable head size relative to MNI (det of the affine).
        max_outside_fraction: a crop with more of its voxels outside the scan is "not covered".
        min_voxel_mm, max_voxel_mm: voxel sizes outside this range are flagged (the model was
            trained on 1 mm crops; coarser scans are interpolated).
    """

    anterior_mm3: tuple[float, float] = (400.0, 4000.0)
    posterior_mm3: tuple[float, float] = (400.0, 3500.0)
    total_mm3: tuple[float, float] = (1000.0, 7000.0)
    max_asymmetry_percent: float = 20.0
    max_score: float = -0.25
    determinant_range: tuple[float, float] = (0.45, 1.6)
    max_outside_fraction: float = 0.02
    min_voxel_mm: float = 0.4
    max_voxel_mm: float = 2.0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "ReviewRules":
        """Rules from a mapping; keys this class does not have are ignored (so the
        ``plausibility`` config group can be passed as it is for the volume ranges)."""
        known = {f.name for f in fields(cls)}
        values = {k: (tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v)
                  for k, v in dict(cfg or {}).items() if k in known}
        return cls(**values)


def volume_reasons(side: str, anterior: float, posterior: float, rules: ReviewRules) -> list[str]:
    """Missing side or volumes (mm³) outside the believable ranges."""
    total = anterior + posterior
    if total <= 0:
        return [f"no {side} hippocampus was found"]
    out = []
    for name, value, (lo, hi) in (("total", total, rules.total_mm3), ("anterior", anterior, rules.anterior_mm3),
                                  ("posterior", posterior, rules.posterior_mm3)):
        if not lo <= value <= hi:
            out.append(f"the {side} {name} volume {value:.0f} mm³ is outside the believable {lo:.0f}-{hi:.0f} mm³")
    return out


def coverage_reasons(to_scan, scan_shape: Sequence[int], scan_affine: np.ndarray) -> list[str]:
    """Temporal-lobe landmarks (:data:`TEMPORAL_LANDMARKS_MNI`) that fall outside the scan.

    Args:
        to_scan: MNI mm ``(..., 3)`` -> scan RAS mm (the registration's ``to_scan``).
        scan_shape: ``(X, Y, Z)``.
        scan_affine: voxel -> RAS mm.
    """
    inv = np.linalg.inv(np.asarray(scan_affine, np.float64))
    n = np.asarray(scan_shape, np.float64)
    out = []
    for side, points in TEMPORAL_LANDMARKS_MNI.items():
        missing = []
        for name, p in points.items():
            v = inv[:3, :3] @ to_scan(np.asarray(p)) + inv[:3, 3]
            if np.any(v < -0.5) or np.any(v > n - 0.5):
                missing.append(name)
        if missing:
            out.append(f"the scan does not cover the {side} temporal lobe ({', '.join(missing)} outside the field of view)")
    return out
