"""Both hippocampi of a whole-head T1, end to end, on the scan's own grid.

:func:`segment_wholehead` takes an ``(X, Y, Z)`` array in closest canonical RAS with its voxel ->
RAS affine (what :func:`hippo.scan_io.read_scan` and :func:`hippo.dicom.volume.load_series` give),
and an inference agent (:class:`hippo.infer.InferenceAgent` or anything with its ``segment``):

1. register the scan to the MNI template (:mod:`hippo.wholehead.register`);
2. per side, centre a 35 x 50 x 36 mm crop (1 mm, template-aligned, the right side mirrored) on
   the MNI hippocampus centroid mapped into the scan (:mod:`hippo.wholehead.crops`) and segment it;
3. refine: re-centre the crop on the first segmentation's centroid (where the training crops
   have theirs) and segment again (the light locator first looks again while it lands more than
   ``relocate_mm`` off);
4. map the crop's labels back onto the scan grid (the label map, :attr:`SideResult.labels`) and
   measure the volumes as the ensemble's **expected (soft) volume** on the 1 mm crop grid: the sum
   of each class' probability over the labelled hippocampus and the voxels within
   :data:`SOFT_MARGIN_VOXELS` of it (:func:`soft_volumes`, :class:`SideVolumes`). A label count on
   the scan grid moved by up to 3.4 % (CoV up to 1.9 %) between simulated re-acquisitions of the
   same head (each boundary voxel in or out as the grids fall), the soft volume by at most 2.1 %
   (CoV at most 0.74 %; ``benchmarks/bench_rescan.py``, ``docs/wholehead.md``); the label map's
   own counts are kept beside it (``SideVolumes.label_*_mm3``);
5. per side, the segmentation quality score of the final crop (:mod:`hippo.quality`: the ensemble
   members' agreement from that same pass, :meth:`hippo.infer.InferenceAgent.segment_members`);
6. review checks in plain words (:mod:`hippo.wholehead.review`, and each side's quality reasons).

Output labels on the scan grid (:data:`LABELS`): 1 left anterior, 2 left posterior, 3 right
anterior, 4 right posterior hippocampus; per side, masks use the model's 1 anterior, 2 posterior.

Imports no torch itself (the agent brings it), never Lightning or Hydra.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from hippo.measure import Volumes, measure_volumes
from hippo.plausibility import PlausibilityRules
from hippo.preprocessing import label_volumes_mm3
from hippo.quality import QualityAssessment, assess_quality
from hippo.wholehead.crops import (CROP_SHAPE, CropGeometry, crop_edge_faces, crop_geometry, probabilities_to_scan,
                                   sample_crop)
from hippo.wholehead.register import Registration, RegistrationSettings, register_to_template
from hippo.wholehead.review import (ReviewRules, atlas_distance_reasons, coverage_reasons, mask_shape, shape_reasons,
                                    volume_reasons)
from hippo.wholehead.template import HIPPOCAMPUS_CENTROIDS_MNI

__all__ = ["LABELS", "SideResult", "SideVolumes", "WholeHeadResult", "segment_wholehead", "asymmetry_index",
           "MIN_FOV_MM", "locator_agent", "soft_volumes", "SOFT_MARGIN_VOXELS", "VOLUME_METHOD"]

#: Label values of the combined label map on the scan grid.
LABELS: dict[int, str] = {0: "background", 1: "left anterior hippocampus", 2: "left posterior hippocampus",
                          3: "right anterior hippocampus", 4: "right posterior hippocampus"}
#: First label value of each side in the combined map (anterior = offset + 1, posterior = offset + 2).
SIDE_OFFSET = {"left": 0, "right": 2}
#: A whole-head scan spans at least this (mm) along every axis.
MIN_FOV_MM = 100.0
#: The soft volume sums the class probabilities over the labelled hippocampus (its largest
#: component) grown by this many face-connected 1 mm crop voxels: the whole soft boundary on both
#: sides of the label's edge (the ensemble's probabilities fall from 1 to 0 within about 2 mm), but
#: not the small probability of a separate structure elsewhere in the crop.
SOFT_MARGIN_VOXELS = 2
#: How a whole-head side's reported volumes are measured (``result.json`` ``volume_method``).
VOLUME_METHOD = ("soft: the sum of the ensemble's class probabilities on the 1 mm crop grid over the labelled "
                 f"hippocampus grown by {SOFT_MARGIN_VOXELS} voxels (its expected volume); "
                 "label_map_mm3 counts the label map's voxels on the scan grid")


@dataclass(frozen=True)
class SideVolumes(Volumes):
    """The volumes of one whole-head side: ``*_mm3`` are the **soft** (expected) volumes of the
    ensemble's posterior on the 1 mm crop grid (:func:`soft_volumes`); the voxel counts are those of
    the label map on the scan grid, whose volumes are ``label_*_mm3`` (count x scan voxel volume).

    The two differ by the boundary's partial probabilities and the label map's resampling (0-3 % on
    the real heads); the soft volume is the one reported, as it moves far less when the same head
    is scanned again on another grid.

    Attributes:
        soft_anterior_mm3, soft_posterior_mm3: the soft volumes (mm³).
    """

    soft_anterior_mm3: float = 0.0
    soft_posterior_mm3: float = 0.0

    @property
    def anterior_mm3(self) -> float:
        return self.soft_anterior_mm3

    @property
    def posterior_mm3(self) -> float:
        return self.soft_posterior_mm3

    @property
    def total_mm3(self) -> float:
        return self.soft_anterior_mm3 + self.soft_posterior_mm3

    @property
    def label_anterior_mm3(self) -> float:
        return self.anterior_voxels * self.voxel_volume_mm3

    @property
    def label_posterior_mm3(self) -> float:
        return self.posterior_voxels * self.voxel_volume_mm3

    @property
    def label_total_mm3(self) -> float:
        return self.total_voxels * self.voxel_volume_mm3

    def as_dict(self) -> dict[str, Any]:
        """:meth:`hippo.measure.Volumes.as_dict` (``*_mm3``, ``*_ml``: the soft volumes; voxel counts:
        the label map's) with the label map's volumes (``label_*_mm3``) and ``volume_method``."""
        return {**super().as_dict(), "label_anterior_mm3": self.label_anterior_mm3,
                "label_posterior_mm3": self.label_posterior_mm3, "label_total_mm3": self.label_total_mm3,
                "volume_method": VOLUME_METHOD}


def soft_volumes(probabilities: np.ndarray, labels: np.ndarray, spacing_mm: float = 1.0,
                 margin: int = SOFT_MARGIN_VOXELS) -> dict[str, float]:
    """The expected volumes (mm³) of a crop's segmentation: ``{"anterior", "posterior", "total"}``,
    each class' probability summed over the labelled voxels (``labels > 0``) grown by ``margin``
    face-connected voxels, times the crop's voxel volume. Nothing labelled: all 0.

    Args:
        probabilities: ``(3, X, Y, Z)`` (background, anterior, posterior) on the crop grid.
        labels: ``(X, Y, Z)`` the crop's final labels (after the largest-component step).
        spacing_mm: the crop's (isotropic) voxel size.
        margin: voxels added around the labels (0: the labelled voxels only).
    """
    from scipy import ndimage

    fg = np.asarray(labels) > 0
    if not fg.any():
        return {"anterior": 0.0, "posterior": 0.0, "total": 0.0}
    region = ndimage.binary_dilation(fg, iterations=int(margin)) if margin > 0 else fg
    voxel = float(spacing_mm) ** 3
    probs = np.asarray(probabilities)
    ant = float(probs[1][region].sum(dtype=np.float64)) * voxel
    post = float(probs[2][region].sum(dtype=np.float64)) * voxel
    return {"anterior": ant, "posterior": post, "total": ant + post}


class SegmentingAgent(Protocol):  # what segment_wholehead needs of hippo.infer.InferenceAgent
    def segment(self, volume: np.ndarray, return_probabilities: bool = False) -> Any: ...


@dataclass
class SideResult:
    """One hippocampus.

    Attributes:
        side: ``"left"`` or ``"right"`` (the patient's).
        labels: ``(X, Y, Z) uint8`` on the scan grid: 0 background, 1 anterior, 2 posterior.
        volumes: the reported volumes (:class:`SideVolumes`, mm³): soft volumes on the 1 mm crop
            grid (:func:`soft_volumes`), with the label map's voxel counts on the scan grid.
        crop_volumes_mm3: ``{"anterior", "posterior", "total"}`` labels counted on the 1 mm crop grid.
        geometry: the final crop (:class:`CropGeometry`).
        crop_image: ``geometry.shape`` ``float32`` crop as segmented (left-hippocampus orientation).
        crop_labels: the model's labels on the crop grid.
        centroid_scan_mm: labelled centroid in scan RAS mm (``None`` when nothing was found).
        centroid_mni: the same in MNI mm through the registration.
        edge_faces: crop faces the mask touches (``"lateral"``, ``"anterior"``...).
        outside_fraction: fraction of the crop outside the scan's field of view.
        refine_shift_mm: how far the refinement moved the crop (mm, summed over passes).
        passes: crops segmented for this side (locator and ensemble).
        settled: the final segmentation's centroid lies within ``settle_mm`` of the crop's centre.
        final_offset_mm: that distance (mm).
        quality: the final crop's segmentation quality (:func:`hippo.quality.assess_quality`;
            ``None`` only when built by hand).
    """

    side: str
    labels: np.ndarray
    volumes: SideVolumes
    crop_volumes_mm3: dict[str, float]
    geometry: CropGeometry
    crop_image: np.ndarray
    crop_labels: np.ndarray
    centroid_scan_mm: np.ndarray | None
    centroid_mni: np.ndarray | None
    edge_faces: list[str]
    outside_fraction: float
    refine_shift_mm: float
    passes: int = 0
    settled: bool = True
    final_offset_mm: float = 0.0
    quality: QualityAssessment | None = None

    @property
    def shape(self) -> dict[str, float] | None:
        """The final crop mask's long-axis angle to the training axis and elongation
        (:func:`hippo.wholehead.review.mask_shape`)."""
        return mask_shape(self.crop_labels)

    @property
    def atlas_distance_mm(self) -> float | None:
        """Distance (MNI mm) of :attr:`centroid_mni` from the atlas centroid of this side."""
        if self.centroid_mni is None:
            return None
        return float(np.linalg.norm(np.asarray(self.centroid_mni) - np.asarray(HIPPOCAMPUS_CENTROIDS_MNI[self.side])))

    def as_dict(self) -> dict[str, Any]:
        v = self.volumes
        shape = self.shape
        dist = self.atlas_distance_mm
        return {
            "anterior_mm3": round(v.anterior_mm3, 1), "posterior_mm3": round(v.posterior_mm3, 1),
            "total_mm3": round(v.total_mm3, 1),
            "volume_method": VOLUME_METHOD,
            "label_map_mm3": {"anterior": round(v.anterior_voxels * v.voxel_volume_mm3, 1),
                              "posterior": round(v.posterior_voxels * v.voxel_volume_mm3, 1),
                              "total": round(v.total_voxels * v.voxel_volume_mm3, 1)},
            "voxels": {"anterior": v.anterior_voxels, "posterior": v.posterior_voxels},
            "crop_grid_mm3": {k: round(x, 1) for k, x in self.crop_volumes_mm3.items()},
            "centroid_scan_mm": None if self.centroid_scan_mm is None else np.round(self.centroid_scan_mm, 2).tolist(),
            "centroid_mni_mm": None if self.centroid_mni is None else np.round(self.centroid_mni, 2).tolist(),
            "touches_crop_edge": self.edge_faces,
            "crop_outside_scan_fraction": round(self.outside_fraction, 4),
            "refine_shift_mm": round(self.refine_shift_mm, 2),
            "passes": self.passes, "settled": self.settled, "final_offset_mm": round(self.final_offset_mm, 2),
            "atlas_distance_mm": None if dist is None else round(dist, 2),
            "shape": None if shape is None else {k: round(x, 2) for k, x in shape.items()},
            "crop": self.geometry.as_dict(),
        }


@dataclass
class WholeHeadResult:
    """Both hippocampi of one scan.

    Attributes:
        left, right: :class:`SideResult` per side.
        registration: the MNI -> scan affine and its score.
        spacing: scan voxel size (mm).
        review: reasons in plain words to review this result (empty: nothing flagged).
        notes: remarks that do not call for review.
        timings_s: seconds per stage: register, crop, infer, quality, map_back, review (and total);
            crop to map_back are summed over both sides, which may have run at once; segment is
            the wall time of both sides (crop to map_back).
    """

    left: SideResult
    right: SideResult
    registration: Registration
    spacing: tuple[float, float, float]
    review: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    def side(self, name: str) -> SideResult:
        return {"left": self.left, "right": self.right}[name]

    @property
    def labels(self) -> np.ndarray:
        """``(X, Y, Z) uint8`` on the scan grid with :data:`LABELS` (1/2 left, 3/4 right)."""
        out = np.zeros(self.left.labels.shape, np.uint8)
        for s in (self.left, self.right):
            sel = s.labels > 0
            out[sel] = s.labels[sel] + SIDE_OFFSET[s.side]
        return out

    @property
    def asymmetry_index(self) -> float | None:
        """``100 (L - R) / ((L + R) / 2)`` of the total volumes (percent), None when both are 0."""
        return asymmetry_index(self.left.volumes.total_mm3, self.right.volumes.total_mm3)

    @property
    def etiv_mm3(self) -> float:
        """Estimated total intracranial volume (mm³) from the registration's scaling."""
        return self.registration.etiv_mm3

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: volumes per side, asymmetry, eTIV, registration, quality per side (``quality``:
        ``{"left": QualityAssessment.as_dict(), "right": ...}``), review, timings."""
        return {
            "labels": {str(k): v for k, v in LABELS.items()},
            "left": self.left.as_dict(),
            "right": self.right.as_dict(),
            "asymmetry_index_percent": None if self.asymmetry_index is None else round(self.asymmetry_index, 2),
            "etiv_mm3": round(self.etiv_mm3, 0),
            "registration": self.registration.as_dict(),
            "quality": {s.side: None if s.quality is None else s.quality.as_dict() for s in (self.left, self.right)},
            "spacing_mm": [round(s, 5) for s in self.spacing],
            "review": list(self.review),
            "notes": list(self.notes),
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
        }


def asymmetry_index(left_mm3: float, right_mm3: float) -> float | None:
    """``100 (L - R) / ((L + R) / 2)`` in percent; ``None`` when ``L + R == 0``."""
    mean = (left_mm3 + right_mm3) / 2.0
    return None if mean <= 0 else 100.0 * (left_mm3 - right_mm3) / mean


def _centroid(labels: np.ndarray) -> np.ndarray | None:
    idx = np.argwhere(labels > 0)
    return None if idx.size == 0 else idx.mean(axis=0)


def locator_agent(agent: Any) -> Any:
    """A lighter agent for the localisation pass: for each slicing axis of the ensemble, its member
    with the fewest parameters (the shipped model: its three 16-filter members, one per axis,
    instead of all five), with the same device, precision, backend and post-processing, sharing its
    networks (:meth:`hippo.infer.InferenceAgent.subset`). ``agent`` itself when it is not an
    :class:`hippo.infer.InferenceAgent` ensemble of more than one axis' worth.

    One light network alone localised worse: on the right side of a turned head one of them
    landed 9 mm off, where the three together stay within about 1 mm of the final centre.
    """
    members = getattr(agent, "members", None)
    if not members or len(members) < 2:
        return agent
    size = lambda m: sum(p.numel() for p in m[0].parameters())  # noqa: E731
    by_axis: dict[int, tuple] = {}
    for m in members:
        axis = int(m[1].get("slice_axis", 0))
        if axis not in by_axis or size(m) < size(by_axis[axis]):
            by_axis[axis] = m
    chosen = [i for i, m in enumerate(members) if any(m is v for v in by_axis.values())]
    if len(chosen) == len(members):
        return agent
    return agent.subset(chosen)


def _segment_crop(agent: SegmentingAgent, array, affine, geometry, timings: dict[str, float] | None = None,
                  members: bool = False):
    """``(crop, outside fraction, labels, probabilities, member segmentation or None)`` of one crop;
    ``members``: through ``agent.segment_members`` where it has one (the same single pass, each
    member's probabilities kept for the quality score)."""
    t = time.perf_counter()
    crop, outside = sample_crop(array, affine, geometry)
    t1 = time.perf_counter()
    segment_members = getattr(agent, "segment_members", None) if members else None
    seg = None
    if segment_members is not None:
        seg = segment_members(crop)
        labels, probs = seg.labels, seg.probabilities
    else:
        labels, probs = agent.segment(crop, return_probabilities=True)
    if timings is not None:
        timings["crop"] = timings.get("crop", 0.0) + t1 - t
        timings["infer"] = timings.get("infer", 0.0) + time.perf_counter() - t1
    return crop, outside, np.asarray(labels, np.uint8), np.asarray(probs, np.float32), seg


def segment_wholehead(
    array: np.ndarray,
    affine: np.ndarray,
    agent: SegmentingAgent,
    *,
    spacing: Sequence[float] | None = None,
    registration: Registration | None = None,
    settings: RegistrationSettings | None = None,
    refine_passes: int = 1,
    crop_shape: tuple[int, int, int] = CROP_SHAPE,
    rules: ReviewRules | None = None,
    map_back: str = "nearest",
    locator: SegmentingAgent | None = None,
    settle_mm: float = 2.0,
    extra_passes: int = 2,
    quality_rules: PlausibilityRules | None = None,
    relocate_mm: float = 5.0,
    relocate_passes: int = 2,
    sides_at_once: bool = True,
) -> WholeHeadResult:
    """Segment both hippocampi of a whole-head T1 scan.

    Args:
        array: ``(X, Y, Z)`` intensities in closest canonical RAS (any numeric dtype; a different
            voxel order works too as long as ``affine`` describes it).
        affine: ``(4, 4)`` voxel index -> RAS mm of ``array``.
        agent: the model (``agent.segment(crop, return_probabilities=True)`` ->
            ``((X, Y, Z) uint8 labels {0, 1, 2}, (3, X, Y, Z) probabilities)``).
        spacing: voxel size (mm); checked against ``affine`` when given (a DICOM ``SeriesVolume``
            carries both).
        registration: a precomputed MNI -> scan registration (skips step 1).
        settings: registration settings (default: the ``fast`` preset).
        refine_passes: how many times to re-centre on the segmentation and segment again (the
            passes before run with ``locator``).
        crop_shape: crop size (voxels at 1 mm).
        rules: review limits (:class:`ReviewRules`).
        map_back: ``"nearest"`` (the default: the crop's labels sampled at each scan voxel's
            centre, which keeps volumes unbiased across voxel sizes) or ``"linear"`` (trilinear
            probabilities, then the most probable class: smoother, but thin parts shrink ~5 %).
        locator: the agent for the first ``refine_passes`` (localisation) passes, e.g.
            :func:`locator_agent` (one network instead of the ensemble); default ``agent``.
        settle_mm: a final segmentation whose centroid lies further than this (mm) from where the
            crop meant to put it (the training crops' centroid position) is re-centred and run
            again with ``agent``, at most ``extra_passes`` times; still unsettled, it is flagged
            for review.
        relocate_mm, relocate_passes: a localisation (``locator``) pass whose segmentation's centre
            lies more than ``relocate_mm`` from where the crop meant to put it is re-centred and run
            again with ``locator``, at most ``relocate_passes`` more times, before the ensemble's
            passes. A crop placed far off (the registration 10-15 mm off on a child's head with skull)
            holds only part of the hippocampus, whose centroid moves the crop only part of the way:
            left to the ensemble's passes, one of four re-acquisitions of that head ran out of passes
            3 mm off with a volume 4.6 % low. A locator pass costs about 40 % of an ensemble pass;
            heads whose first crop lands within a few mm take none.
        quality_rules: the segmentation quality limits (``min_member_agreement``...,
            :class:`hippo.plausibility.PlausibilityRules`; default its defaults). Each side's final
            crop is scored by :func:`hippo.quality.assess_quality` from the ensemble's own pass (no
            extra inference); its reasons go into ``review`` as ``"left: ..."``. The crop-edge and
            volume-range checks stay this function's own (worded per side).
        sides_at_once: segment the left and right sides side by side in two threads, each agent
            call on half the cores (:meth:`hippo.infer.InferenceAgent.for_concurrent_calls`), where
            the agents can (ONNX Runtime on two or more cores); else, or ``False``, one after the
            other. The result is the same either way.

    Returns:
        A :class:`WholeHeadResult`: per-side masks on ``array``'s grid, volumes (mm³), the
        registration, eTIV, review reasons and timings.

    Raises:
        ValueError: not a 3D array, an affine that does not match ``spacing``, or a field of view
            too small for a whole head (e.g. a hippocampus crop).
    """
    rules = rules or ReviewRules()
    t_all = time.perf_counter()
    array = np.asarray(array)
    affine = np.asarray(affine, np.float64)
    if array.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {array.shape}")
    voxel = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if spacing is not None and not np.allclose(voxel, np.asarray(spacing, float), rtol=1e-3, atol=1e-4):
        raise ValueError(f"spacing {tuple(spacing)} mm does not match the affine's voxel size {tuple(np.round(voxel, 4))}")
    extent = voxel * np.asarray(array.shape)
    if extent.min() < MIN_FOV_MM:
        raise ValueError(f"field of view {' x '.join(f'{e:.0f}' for e in extent)} mm is too small for a whole head "
                         f"(at least {MIN_FOV_MM:.0f} mm per axis); a hippocampus crop goes to hippo.deploy / "
                         "InferenceAgent.segment directly")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if registration is None:
        registration = register_to_template(array, affine, settings=settings)
    timings["register"] = time.perf_counter() - t
    timings.update(crop=0.0, infer=0.0, map_back=0.0, quality=0.0)

    side_options = dict(crop_shape=crop_shape, map_back=map_back, settle_mm=settle_mm, refine_passes=refine_passes,
                        extra_passes=extra_passes, relocate_mm=relocate_mm, relocate_passes=relocate_passes,
                        quality_rules=quality_rules)
    t = time.perf_counter()
    pair = _side_by_side(agent, locator) if sides_at_once else None
    if pair is not None:  # both sides at once, each on its share of the cores
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda side: _segment_side(side, array, affine, voxel, registration, *pair,
                                                            **side_options), ("left", "right")))
    else:
        done = [_segment_side(side, array, affine, voxel, registration, agent, locator, **side_options)
                for side in ("left", "right")]
    sides: dict[str, SideResult] = {}
    for result, side_timings in done:
        sides[result.side] = result
        for k, v in side_timings.items():
            timings[k] += v
    timings["segment"] = time.perf_counter() - t

    t = time.perf_counter()
    review, notes = _review(sides, registration, array.shape, affine, tuple(voxel), rules)
    timings["review"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    return WholeHeadResult(sides["left"], sides["right"], registration, tuple(float(v) for v in voxel),  # type: ignore[arg-type]
                           review, notes, timings)


def _side_by_side(agent: Any, locator: Any) -> tuple[Any, Any] | None:
    """``(agent, locator)`` for segmenting both sides at once (each call on its share of the cores:
    :meth:`hippo.infer.InferenceAgent.for_concurrent_calls`), or ``None`` where the agents cannot
    (torch, one core, an agent without that method): the sides then run one after the other."""
    make = getattr(agent, "for_concurrent_calls", None)
    both = make(2) if make is not None else None
    if both is None:
        return None
    if locator is None or locator is agent:
        return both, (None if locator is None else both)
    make = getattr(locator, "for_concurrent_calls", None)
    loc = make(2) if make is not None else None
    return None if loc is None else (both, loc)


def _segment_side(side: str, array: np.ndarray, affine: np.ndarray, voxel: np.ndarray, registration: Registration,
                  agent: SegmentingAgent, locator: SegmentingAgent | None, *, crop_shape, map_back: str,
                  settle_mm: float, refine_passes: int, extra_passes: int, relocate_mm: float, relocate_passes: int,
                  quality_rules: PlausibilityRules | None) -> tuple[SideResult, dict[str, float]]:
    """One side of :func:`segment_wholehead` (its steps 2-5): the :class:`SideResult` and its seconds
    per stage (crop, infer, quality, map_back). Touches nothing shared, so both sides may run at once."""
    timings = dict(crop=0.0, infer=0.0, map_back=0.0, quality=0.0)
    rotation = registration.rotation
    t = time.perf_counter()
    geometry = crop_geometry(rotation, registration.to_scan(HIPPOCAMPUS_CENTROIDS_MNI[side]), side, shape=crop_shape)
    timings["crop"] += time.perf_counter() - t
    shift, offset, passes = 0.0, 0.0, 0
    planned = max(0, int(refine_passes))
    extra = max(0, int(extra_passes))
    loc = locator
    attempt, relocated = 0, 0
    while True:
        final = attempt >= planned  # from here on each result may be the final one
        use = agent if final or loc is None else loc
        crop, outside, labels, probs, members = _segment_crop(use, array, affine, geometry, timings,
                                                              members=use is agent)
        passes += 1
        centre = _centroid(labels)
        if centre is None and use is not agent:  # the locator found nothing: ask the ensemble
            crop, outside, labels, probs, members = _segment_crop(agent, array, affine, geometry, timings,
                                                                  members=True)
            centre, loc, final, use = _centroid(labels), None, True, agent
            passes += 1
        if centre is None:
            break
        target = geometry.to_scan(centre)
        offset = float(np.linalg.norm(target - geometry.centre_scan_mm))
        if final and (offset <= settle_mm or attempt >= planned + extra):
            break
        # a locator pass that found the hippocampus far from the crop's centre saw only part of
        # it: the (light) locator looks again from there before the ensemble's passes
        if use is not agent and offset > relocate_mm and relocated < max(0, int(relocate_passes)):
            relocated += 1
        else:
            attempt += 1
        t = time.perf_counter()
        geometry = crop_geometry(rotation, target, side, shape=crop_shape)
        shift += offset
        timings["crop"] += time.perf_counter() - t
    t = time.perf_counter()
    quality = assess_quality(
        labels, (geometry.spacing_mm,) * 3, probabilities=probs, rules=quality_rules, check_edge=False,
        check_volumes=False, **({} if members is None else {
            "member_probabilities": members.member_probabilities, "unprocessed_labels": members.unprocessed_labels}))
    timings["quality"] += time.perf_counter() - t
    t = time.perf_counter()
    sub, box = probabilities_to_scan(probs, geometry, array.shape, affine, keep=labels > 0, method=map_back)
    full = np.zeros(array.shape, np.uint8)
    if sub.size:
        full[box] = sub
    # counted and located inside the crop's box (nothing outside it is labelled): a 0.7 mm head
    # has 40 million voxels
    counted = measure_volumes(sub if sub.size else np.zeros((1, 1, 1), np.uint8), tuple(float(v) for v in voxel))
    soft = soft_volumes(probs, labels, geometry.spacing_mm)
    volumes = SideVolumes(counted.anterior_voxels, counted.posterior_voxels, counted.spacing_mm,
                          counted.voxel_volume_mm3, soft_anterior_mm3=soft["anterior"],
                          soft_posterior_mm3=soft["posterior"])
    centroid_idx = _centroid(sub) if sub.size else None
    if centroid_idx is not None:
        centroid_idx = centroid_idx + np.array([b.start or 0 for b in box], np.float64)
    centroid_scan = None if centroid_idx is None else affine[:3, :3] @ centroid_idx + affine[:3, 3]
    result = SideResult(
        side=side, labels=full, volumes=volumes,
        crop_volumes_mm3={k.removesuffix("_mm3"): v
                          for k, v in label_volumes_mm3(labels, (geometry.spacing_mm,) * 3).items()},
        geometry=geometry, crop_image=crop, crop_labels=labels, centroid_scan_mm=centroid_scan,
        centroid_mni=None if centroid_scan is None else registration.to_mni(centroid_scan),
        edge_faces=crop_edge_faces(labels, side), outside_fraction=outside, refine_shift_mm=shift,
        passes=passes, settled=centre is not None and offset <= settle_mm, final_offset_mm=offset,
        quality=quality)
    timings["map_back"] += time.perf_counter() - t
    return result, timings


def _review(sides: dict[str, SideResult], registration: Registration, shape, affine, voxel, rules: ReviewRules
            ) -> tuple[list[str], list[str]]:
    review: list[str] = []
    notes: list[str] = []
    if registration.score > rules.max_score:  # a note: the checks below decide whether the crops are right
        notes.append(f"registration score {registration.score:.2f} (Mattes MI) is above {rules.max_score:.2f}; it "
                     "depends on contrast, field of view and skull, so it is no review reason by itself: the "
                     "localisation checks (mask position in template space, shape, settling) passed or are listed")
    lo, hi = rules.determinant_range
    if not lo <= registration.determinant <= hi:
        review.append(f"the registration scaled the head by {registration.determinant:.2f} (volume) relative to MNI, "
                      f"outside {lo:.2f}-{hi:.2f}: the registration probably failed")
    review.extend(coverage_reasons(registration.to_scan, shape, affine))
    for side, s in sides.items():
        if s.outside_fraction > rules.max_outside_fraction:
            review.append(f"the scan does not cover the {side} hippocampus region "
                          f"({100 * s.outside_fraction:.0f} % of its crop lies outside the field of view)")
        missing = volume_reasons(side, s.volumes.anterior_mm3, s.volumes.posterior_mm3, rules)
        review.extend(missing)
        if not s.settled and s.volumes.total_mm3 > 0:
            review.append(f"the {side} hippocampus segmentation did not settle in its crop (its centre stays "
                          f"{s.final_offset_mm:.1f} mm from where the crop puts it after {s.passes} passes)")
        if s.edge_faces and s.volumes.total_mm3 > 0:
            review.append(f"the {side} hippocampus mask touches the {', '.join(s.edge_faces)} edge(s) of its crop: "
                          "part of it may be cut off or the crop mislocated")
        if s.volumes.total_mm3 > 0:
            review.extend(shape_reasons(side, s.shape, rules))
            review.extend(atlas_distance_reasons(side, s.atlas_distance_mm, rules))
        if s.quality is not None:
            review.extend(f"{side}: {r}" for r in s.quality.reasons)
    ai = asymmetry_index(sides["left"].volumes.total_mm3, sides["right"].volumes.total_mm3)
    if ai is not None and sides["left"].volumes.total_mm3 > 0 and sides["right"].volumes.total_mm3 > 0 \
            and abs(ai) > rules.max_asymmetry_percent:
        review.append(f"left/right asymmetry of {ai:+.0f} % is larger than {rules.max_asymmetry_percent:.0f} %: "
                      "check both segmentations")
    if max(voxel) > rules.max_voxel_mm or min(voxel) < rules.min_voxel_mm:
        review.append(f"voxel size {' x '.join(f'{v:.2f}' for v in voxel)} mm is outside "
                      f"{rules.min_voxel_mm:g}-{rules.max_voxel_mm:g} mm: the crops are interpolated far from the "
                      "model's 1 mm training data")
    elif max(voxel) > 1.3:
        notes.append(f"coarse voxels ({max(voxel):.2f} mm): the 1 mm crops are interpolated from them (more "
                     "partial-volume error) and the label map on the scan grid is coarse")
    return review, notes
