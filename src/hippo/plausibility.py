"""Is this input something the model can measure, and is the measured volume believable?

"ok" means the number can be shown to a clinician. The model learnt hippocampus crops of about
35 x 50 x 36 voxels at 1 mm isotropic (Decathlon Task04); a series far from that gives a number that
looks like a result and is not one (a PixelSpacing ten times too large gave 309,000 mm³; 4 mm slices
gave 0 mm³; 0.5 mm isotropic voxels gave -48 %). So, before inference:

* voxel sizes within ``resample_tolerance`` of the model's grid: the volume goes in as it is;
* voxel sizes within ``[min_voxel_mm, max_voxel_mm]`` per axis (and anisotropy up to
  ``max_anisotropy``): resampled onto the model's grid (:mod:`hippo.regrid`), the labels mapped back;
* anything else, a field of view outside ``fov_mm``, or an image without contrast: **refused**, with
  the reason (the study fails at stage ``plausibility``; no result object is made);
* clipped intensities (``max_saturated_fraction`` of the voxels at the maximum): **review**.

After inference, volumes outside the configured per-structure ranges are flagged for **review**: the
objects are made, the report page says why, and the study's status is ``review``, never ``ok``.

numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from hippo.config import settings_fields

__all__ = ["PlausibilityRules", "InputAssessment", "ImplausibleInputError", "assess_input", "assess_volumes"]


class ImplausibleInputError(ValueError):
    """The series cannot give a trustworthy volume (the message says why and what would)."""


@dataclass(frozen=True)
class PlausibilityRules:
    """Limits of what the model is trusted to measure (``conf/plausibility/default.yaml``).

    Attributes:
        model_spacing_mm: voxel size (mm) of the grid the model was trained on.
        resample_tolerance: relative difference from ``model_spacing_mm`` below which no resampling
            is done.
        min_voxel_mm, max_voxel_mm: voxel sizes (mm, any axis) that are resampled; outside, refused.
        max_anisotropy: largest ratio of the coarsest to the finest voxel axis that is resampled.
        fov_mm: ``(min, max)`` extent in mm of every axis of the series.
        max_saturated_fraction: fraction of voxels at the maximum intensity above which the image is
            flagged as clipped.
        anterior_mm3, posterior_mm3, total_mm3: ``(min, max)`` believable volumes of one hippocampus
            (Decathlon protocol: the 234 training labels span 1054-2593 / 993-2169 / 2382-4401 mm³;
            the ranges leave room for atrophy and large heads).
        min_member_agreement, max_member_volume_cv, min_largest_piece, max_removed_fraction,
            max_edge_voxels: when a segmentation is flagged for review by :mod:`hippo.quality`
            (:func:`hippo.quality.assess_quality` documents each).
    """

    model_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resample_tolerance: float = 0.05
    min_voxel_mm: float = 0.25
    max_voxel_mm: float = 1.6
    max_anisotropy: float = 3.5
    fov_mm: tuple[float, float] = (15.0, 300.0)
    max_saturated_fraction: float = 0.02
    anterior_mm3: tuple[float, float] = (400.0, 4000.0)
    posterior_mm3: tuple[float, float] = (400.0, 3500.0)
    total_mm3: tuple[float, float] = (1000.0, 7000.0)
    # segmentation quality (hippo.quality)
    min_member_agreement: float = 0.85
    max_member_volume_cv: float = 0.10
    min_largest_piece: float = 0.90
    max_removed_fraction: float = 0.10
    max_edge_voxels: float = 0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "PlausibilityRules":
        """Rules from a (Hydra) mapping; ``_target_`` ignored, a key this class does not have raises
        ``ValueError`` naming it (:func:`hippo.config.settings_fields`)."""
        cfg = settings_fields(cls, cfg)
        tuples = {k: tuple(float(x) for x in v) for k, v in cfg.items() if isinstance(v, (list, tuple))}
        return cls(**{**cfg, **tuples})


@dataclass
class InputAssessment:
    """What :func:`assess_input` decided for one series.

    Attributes:
        refused: reasons the series cannot be measured (empty: it can).
        review: reasons a clinician should look before trusting the number.
        resample: True when the volume goes through the model's grid (voxel size differs).
        spacing_mm: the series' voxel size.
    """

    refused: list[str] = field(default_factory=list)
    review: list[str] = field(default_factory=list)
    resample: bool = False
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def raise_if_refused(self) -> None:
        if self.refused:
            raise ImplausibleInputError("; ".join(self.refused))


def _mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values) + " mm"


def assess_input(image: np.ndarray, spacing_mm: Sequence[float], rules: PlausibilityRules | None = None
                 ) -> InputAssessment:
    """Check a series volume against what the model can measure.

    Args:
        image: ``(X, Y, Z)`` intensities (any scale).
        spacing_mm: voxel size of the three axes in mm.
        rules: the limits (defaults: :class:`PlausibilityRules`).
    """
    rules = rules or PlausibilityRules()
    spacing = tuple(float(s) for s in spacing_mm)
    out = InputAssessment(spacing_mm=spacing)  # type: ignore[arg-type]
    model = np.asarray(rules.model_spacing_mm, dtype=float)
    s = np.asarray(spacing, dtype=float)
    if s.min() < rules.min_voxel_mm or s.max() > rules.max_voxel_mm:
        out.refused.append(
            f"voxel size {_mm(spacing)} is outside {rules.min_voxel_mm:g}-{rules.max_voxel_mm:g} mm per axis: "
            f"the model measures {_mm(rules.model_spacing_mm)} voxels and a hippocampus cannot be measured "
            "reliably from coarser ones (check PixelSpacing and the slice spacing; a 3D T1 with about 1 mm "
            "voxels is needed)")
    elif s.max() / s.min() > rules.max_anisotropy:
        out.refused.append(f"voxels {_mm(spacing)} are {s.max() / s.min():.1f}x anisotropic (limit "
                           f"{rules.max_anisotropy:g}x): too coarse along one axis to resample soundly")
    elif np.any(np.abs(s - model) > rules.resample_tolerance * model):
        out.resample = True
    fov = s * np.asarray(image.shape[:3], dtype=float)
    lo, hi = rules.fov_mm
    if fov.min() < lo or fov.max() > hi:
        out.refused.append(f"field of view {_mm(tuple(fov))} is outside {lo:g}-{hi:g} mm per axis")
    finite = image[np.isfinite(image)]
    if finite.size == 0 or float(finite.max()) == float(finite.min()):
        value = "no finite value" if finite.size == 0 else f"every voxel {float(finite.min()):g}"
        out.refused.append(f"constant image ({value}): no anatomy to segment")
    else:
        saturated = float(np.mean(finite >= finite.max()))
        if saturated > rules.max_saturated_fraction:
            out.review.append(f"{100 * saturated:.1f} % of the voxels sit at the maximum intensity "
                              "(clipped or saturated image)")
    return out


def assess_volumes(volumes: Mapping[str, float], rules: PlausibilityRules | None = None) -> list[str]:
    """Reasons to review the measured volumes (empty: all within the believable ranges).

    Args:
        volumes: ``anterior_mm3``, ``posterior_mm3``, ``total_mm3`` (mm³).
    """
    rules = rules or PlausibilityRules()
    reasons = []
    for key, name in (("anterior_mm3", "anterior"), ("posterior_mm3", "posterior"), ("total_mm3", "total")):
        lo, hi = getattr(rules, key)
        value = float(volumes[key])
        if not lo <= value <= hi:
            reasons.append(f"{name} volume {value:,.0f} mm³ is outside the believable {lo:,.0f}-{hi:,.0f} mm³ "
                           "for one hippocampus")
    return reasons
