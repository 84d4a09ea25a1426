"""Plain-words review checks of a whole-head result: when is a number not to be trusted as it is.

Each check returns sentences for a person; an empty list means nothing to flag. The caller puts
them in ``result.json`` (``review``) and on the report page; a scan with any is status ``review``.

numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from hippo.config import settings_fields

__all__ = ["ReviewRules", "TEMPORAL_LANDMARKS_MNI", "volume_reasons", "coverage_reasons", "mask_shape",
           "shape_reasons", "atlas_distance_reasons"]

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
        max_score: a registration score (Mattes MI, negative) above this gives a *note*, not a
            review: the score depends on contrast, field of view and skull as much as on alignment
            (real heads aligned within 3-5 mm of their hippocampi scored -0.13 to -0.45; a
            20 mm / 20° misalignment about -0.15), so whether a crop holds the hippocampus is
            decided by :func:`atlas_distance_reasons`, :func:`shape_reasons`, settling and the
            segmentation quality instead (docs/wholehead.md, "Localisation for any head").
        determinant_range: believable head size relative to MNI (det of the affine).
        max_outside_fraction: a crop with more of its voxels outside the scan is "not covered".
        min_voxel_mm, max_voxel_mm: voxel sizes outside this range are flagged (the model was
            trained on 1 mm crops; coarser scans are interpolated).
        max_atlas_distance_mm: the segmented hippocampus' centroid, taken into MNI space by the
            registration, further than this from the atlas centroid of its side: the registration
            and the segmentation disagree about where the hippocampus is (one of them is wrong).
            Measured: 1.6-4.4 mm on five real heads whose crops the registration put 3-4.6 mm from
            the reference centroids; 10.5 / 10.7 mm on ``fnndsc_pediatric`` (a 3-year-old), whose
            registration was 12-13 mm off and scaled the head 1.29 x MNI (eTIV 2.5 L; hippodeep
            1.33 L) while the re-centred masks were right.
        max_axis_angle_deg, min_elongation: the final crop mask's shape (:func:`mask_shape`): its
            long axis turned further than this from the training crops' mean hippocampal axis, or
            less elongated than this (sqrt of the first over the second principal variance), is
            not shaped like a hippocampus. On the 234 Task04 training labels: angle median 6.2°,
            99th percentile 19.4°, max 22.8°; elongation min 1.98, 1st percentile 2.13.
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
    max_atlas_distance_mm: float = 8.0
    max_axis_angle_deg: float = 35.0
    min_elongation: float = 1.6

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "ReviewRules":
        """Rules from a mapping (the volume ranges of the ``plausibility`` group and the ``review``
        block of ``conf/predict.yaml``); a key this class does not have raises ``ValueError`` naming
        it (:func:`hippo.config.settings_fields`)."""
        values = {k: (tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v)
                  for k, v in settings_fields(cls, cfg).items()}
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


def mask_shape(crop_labels: np.ndarray) -> dict[str, float] | None:
    """Shape of a crop's foreground (crop voxels, training-crop convention: a left hippocampus,
    axes lateral->medial / posterior->anterior / inferior->superior at 1 mm).

    Returns:
        ``{"axis_angle_deg", "elongation"}``: the angle between the first principal axis and the
        training crops' mean hippocampal axis (:data:`hippo.wholehead.crops.TRAINING_AXIS_PITCH_YAW_DEG`),
        and ``sqrt(l1 / l2)`` of the principal variances; ``None`` for fewer than 10 voxels.
    """
    from hippo.wholehead.crops import TRAINING_AXIS_PITCH_YAW_DEG

    idx = np.argwhere(np.asarray(crop_labels) > 0).astype(np.float64)
    if idx.shape[0] < 10:
        return None
    idx -= idx.mean(axis=0)
    w, v = np.linalg.eigh(np.cov(idx.T))
    pitch, yaw = np.radians(TRAINING_AXIS_PITCH_YAW_DEG)
    mean_axis = np.array([np.tan(yaw), 1.0, np.tan(pitch)])
    mean_axis /= np.linalg.norm(mean_axis)
    angle = float(np.degrees(np.arccos(min(1.0, abs(float(v[:, -1] @ mean_axis))))))
    elongation = float(np.sqrt(w[-1] / max(w[-2], 1e-9)))
    return {"axis_angle_deg": angle, "elongation": elongation}


def shape_reasons(side: str, shape: dict[str, float] | None, rules: ReviewRules) -> list[str]:
    """A mask not shaped like a hippocampus (see :func:`mask_shape`, :class:`ReviewRules`)."""
    if shape is None:
        return []
    out = []
    if shape["axis_angle_deg"] > rules.max_axis_angle_deg:
        out.append(f"the {side} mask's long axis is turned {shape['axis_angle_deg']:.0f}° from a hippocampus' "
                   f"(at most {rules.max_axis_angle_deg:.0f}° in the training data's range): it may not be the "
                   "hippocampus")
    if shape["elongation"] < rules.min_elongation:
        out.append(f"the {side} mask is not elongated like a hippocampus (axis ratio {shape['elongation']:.2f}, "
                   f"below {rules.min_elongation:.2f}): it may not be the hippocampus")
    return out


def atlas_distance_reasons(side: str, distance_mm: float | None, rules: ReviewRules) -> list[str]:
    """The segmented hippocampus far from where the registration puts the atlas' (in MNI mm)."""
    if distance_mm is None or distance_mm <= rules.max_atlas_distance_mm:
        return []
    return [f"the {side} hippocampus found lies {distance_mm:.0f} mm (in template space) from where the "
            f"registration puts it (more than {rules.max_atlas_distance_mm:.0f} mm): the registration or the "
            "segmentation is wrong (the eTIV depends on the registration)"]
