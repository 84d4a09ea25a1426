"""A per-study quality score of a segmentation, from what inference already produced.

The shipped model is an ensemble: its members segment the same volume independently and the agent
averages their probabilities (:class:`hippo.infer.InferenceAgent`). Where the members agree, the
result is usually right; where they disagree, at least some of them are wrong. This module turns
that, and a few plain checks of the mask, into a number and a flag:

* ``score``: the agreement of the members -- for each structure (anterior, posterior) the mean
  Dice over all pairs of members' label maps, and the lower of the two (0 to 1, 1 = identical
  masks). ``None`` for a single-network model (nothing to compare).
* ``volume_cv``: spread of the members' total volumes (standard deviation / mean).
* ``margin``: mean probability margin (top class minus runner-up) of the averaged probabilities
  inside the final mask (0 to 1); reported, not used for the flag.
* plain checks of the final mask: a structure split into pieces, the mask touching the edge of the
  volume (the Decathlon labels never do: 0 of the 187 training/validation labels touch their
  crop's border, and every structure is one piece), a large part of the segmentation removed as
  disconnected islands by the post-processing, and the volumes outside the believable ranges of
  :func:`hippo.plausibility.assess_volumes` (which also catches a missing structure: 0 mm³).

The limits are fields of :class:`hippo.plausibility.PlausibilityRules` (``conf/plausibility``):

* ``min_member_agreement`` (0.85): lowest acceptable score. The shipped model's test Dice against
  the reference labels is about 0.88-0.90 per structure; members that agree with each other less
  than 0.85 are below what the model usually achieves against the truth.
* ``max_member_volume_cv`` (0.10): largest acceptable spread of the members' total volumes.
* ``min_largest_piece`` (0.90): a structure whose largest 26-connected piece holds less than this
  fraction of its voxels is "split" (the training labels: at least 0.998).
* ``max_removed_fraction`` (0.10): largest fraction of the segmented voxels the largest-component
  post-processing may remove.
* ``max_edge_voxels`` (0): most mask voxels allowed on the outer faces of the volume.

A study is **flagged** (status "review") when any limit is crossed; every reason is a sentence a
clinician can read. ``docs/quality.md`` shows how the score ranks the true Dice on the held-out test volumes and
on degraded inputs (``benchmarks/bench_quality.py``).

numpy and scipy only.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from hippo.metrics import dice
from hippo.plausibility import PlausibilityRules, assess_volumes
from hippo.preprocessing import label_volumes_mm3, voxel_volume_mm3

__all__ = ["QualityAssessment", "assess_quality", "member_agreement"]

#: label value -> structure name
STRUCTURES = {1: "anterior", 2: "posterior"}
_CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-neighbourhood


@dataclass
class QualityAssessment:
    """The quality of one segmentation (:func:`assess_quality`).

    Attributes:
        score: members' agreement, 0-1 (the weaker structure's mean pairwise Dice); ``None`` with
            one member.
        flagged: True when ``reasons`` is not empty (the study goes to "review").
        reasons: plain-words reasons to review, empty when none.
        n_members: networks that segmented the volume.
        agreement: structure name -> mean pairwise Dice between members (``None`` with one member).
        member_volumes_mm3: each member's total volume in mm³ (its argmax mask).
        volume_cv: standard deviation / mean of ``member_volumes_mm3`` (``None`` with one member).
        margin: mean top-minus-runner-up probability inside the final mask (``None``: no mask or no
            probabilities).
        edge_voxels: mask voxels on the outer faces of the volume.
        largest_piece: structure name -> fraction of its voxels in its largest piece (1.0 if empty).
        removed_fraction: fraction of the segmented voxels the post-processing removed.
    """

    score: float | None
    flagged: bool = False
    reasons: list[str] = field(default_factory=list)
    n_members: int = 1
    agreement: dict[str, float] | None = None
    member_volumes_mm3: list[float] = field(default_factory=list)
    volume_cv: float | None = None
    margin: float | None = None
    edge_voxels: int = 0
    largest_piece: dict[str, float] = field(default_factory=dict)
    removed_fraction: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every attribute."""
        return asdict(self)


def member_agreement(member_labels: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean pairwise Dice between members' label maps, per structure.

    Args:
        member_labels: two or more ``(X, Y, Z)`` integer label maps of the same shape.

    Returns:
        ``{"anterior": d, "posterior": d}``, each in [0, 1].

    Raises:
        ValueError: fewer than two maps, or maps of different shapes.
    """
    maps = [np.asarray(m) for m in member_labels]
    if len(maps) < 2:
        raise ValueError(f"agreement needs at least two members' label maps, got {len(maps)}")
    if len({m.shape for m in maps}) != 1:
        raise ValueError(f"members' label maps differ in shape: {sorted({m.shape for m in maps})}")
    out = {}
    for value, name in STRUCTURES.items():
        masks = [m == value for m in maps]
        out[name] = float(np.mean([dice(a, b) for a, b in itertools.combinations(masks, 2)]))
    return out


def _edge_voxels(mask: np.ndarray) -> int:
    """Foreground voxels of ``mask (X, Y, Z)`` on the six outer faces (each voxel counted once)."""
    fg = mask > 0
    inner = np.zeros_like(fg)
    inner[1:-1, 1:-1, 1:-1] = True
    return int(np.count_nonzero(fg & ~inner))


def _largest_piece(structure: np.ndarray) -> tuple[float, int]:
    """(fraction of ``structure``'s voxels in its largest 26-connected piece, number of pieces)."""
    pieces, n = ndimage.label(structure, structure=_CONNECTIVITY)
    if n <= 1:
        return 1.0, n
    sizes = np.bincount(pieces.ravel())[1:]
    return float(sizes.max() / sizes.sum()), int(n)


def assess_quality(
    labels: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    member_probabilities: Sequence[np.ndarray] = (),
    probabilities: np.ndarray | None = None,
    unprocessed_labels: np.ndarray | None = None,
    rules: PlausibilityRules | None = None,
    volumes_mm3: Mapping[str, float] | None = None,
    check_edge: bool = True,
    check_volumes: bool = True,
) -> QualityAssessment:
    """Score one segmentation and list the reasons to review it.

    Args:
        labels: ``(X, Y, Z)`` final labels in ``{0, 1 anterior, 2 posterior}`` on the grid the model
            saw (the volume it segmented).
        spacing_mm: voxel size (mm) of ``labels``' axes, for the volumes in mm³.
        member_probabilities: each member's ``(C, X, Y, Z)`` probabilities
            (:attr:`hippo.infer.MemberSegmentation.member_probabilities`); with fewer than two there
            is no agreement score and only the plain checks apply.
        probabilities: ``(C, X, Y, Z)`` averaged probabilities, for the margin (default: the mean of
            ``member_probabilities`` when given).
        unprocessed_labels: ``(X, Y, Z)`` labels before post-processing, for the removed fraction.
        rules: the flagging limits and believable volume ranges (default :class:`PlausibilityRules`).
        volumes_mm3: the measured ``anterior_mm3``, ``posterior_mm3``, ``total_mm3`` to check against
            those ranges (default: counted from ``labels`` with ``spacing_mm``; give them when the
            volume was measured on another grid, e.g. after resampling back to the series).
        check_edge, check_volumes: ``False`` leaves the edge check or the volume-range check out of
            the reasons (``edge_voxels`` is still counted), for a caller with its own check of the
            same thing in its own words (the whole-head path: a mask on its crop's edge and each
            side's volumes are :func:`hippo.wholehead.segment.segment_wholehead`'s review checks).

    Raises:
        ValueError: arrays of mismatched shapes.
    """
    rules = rules or PlausibilityRules()
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D (X, Y, Z), got shape {labels.shape}")
    parts = [np.asarray(p) for p in member_probabilities]
    for p in parts + ([np.asarray(probabilities)] if probabilities is not None else []):
        if p.ndim != 4 or p.shape[1:] != labels.shape:
            raise ValueError(f"probabilities of shape {p.shape} do not match labels {labels.shape} (C, X, Y, Z)")
    voxel_mm3 = voxel_volume_mm3(spacing_mm)
    out = QualityAssessment(score=None, n_members=max(1, len(parts)))
    reasons = out.reasons

    if len(parts) >= 2:
        member_labels = [p.argmax(0) for p in parts]
        out.agreement = member_agreement(member_labels)
        out.score = min(out.agreement.values())
        volumes = [float(np.count_nonzero(m > 0)) * voxel_mm3 for m in member_labels]
        out.member_volumes_mm3 = volumes
        mean = float(np.mean(volumes))
        out.volume_cv = float(np.std(volumes) / mean) if mean > 0 else None
        weakest = min(out.agreement, key=out.agreement.get)
        if out.score < rules.min_member_agreement:
            reasons.append(f"the model's {len(parts)} networks disagree on the {weakest} hippocampus "
                           f"(agreement {out.score:.2f}, below {rules.min_member_agreement:.2f})")
        if out.volume_cv is not None and out.volume_cv > rules.max_member_volume_cv:
            reasons.append(f"the networks' total volumes differ by {100 * out.volume_cv:.0f} % "
                           f"({min(volumes):,.0f}-{max(volumes):,.0f} mm³; "
                           f"limit {100 * rules.max_member_volume_cv:.0f} %)")
    if probabilities is None and parts:
        probabilities = parts[0] if len(parts) == 1 else np.mean(parts, axis=0)
    fg = labels > 0
    if probabilities is not None and fg.any():
        top2 = np.sort(np.asarray(probabilities)[:, fg], axis=0)[-2:]
        out.margin = float(np.mean(top2[1] - top2[0]))

    for value, name in STRUCTURES.items():
        frac, n = _largest_piece(labels == value)
        out.largest_piece[name] = frac
        if frac < rules.min_largest_piece:
            reasons.append(f"the {name} hippocampus is split into {n} pieces (the largest holds "
                           f"{100 * frac:.0f} % of it)")
    out.edge_voxels = _edge_voxels(labels)
    if check_edge and out.edge_voxels > rules.max_edge_voxels:
        reasons.append(f"the segmentation touches the edge of the image ({out.edge_voxels} voxels): the "
                       "hippocampus may extend beyond the field of view")
    if unprocessed_labels is not None:
        before = int(np.count_nonzero(np.asarray(unprocessed_labels) > 0))
        out.removed_fraction = 1.0 - int(np.count_nonzero(fg)) / before if before else 0.0
        if out.removed_fraction > rules.max_removed_fraction:
            reasons.append(f"{100 * out.removed_fraction:.0f} % of the segmented voxels lay apart from the "
                           "main structure and were removed")
    if check_volumes:
        if volumes_mm3 is None:
            volumes_mm3 = label_volumes_mm3(labels, spacing_mm)
        reasons += assess_volumes(volumes_mm3, rules)
    out.flagged = bool(reasons)
    return out
