"""Affine registration of a whole-head T1 scan to the MNI template (SimpleITK, Mattes MI).

The result maps template (MNI, RAS mm) points to scan (RAS mm) points: ``scan = A @ mni``. Both
images are handed to SimpleITK with their RAS affines as the physical frame (SimpleITK does not
care which frame, only that both share it), so no LPS conversion happens here.

Stages (:class:`RegistrationSettings` holds the numbers):

1. **Prepare**: the scan is block-averaged to about ``moving_mm`` voxels and clipped at its 99.5th
   percentile; the template is the shipped 2 mm one (brain only), sampled inside its brain mask.
   Each pyramid level (8, 4 mm) is made once by block averaging both images, so SimpleITK runs
   every level at shrink 1 without smoothing of its own.
2. **Initialise**: a head mask (:func:`head_mask`) gives several starts for the template's brain
   centre (:func:`initial_centres`: the centre of the head's top ``head_top_mm``, the template's
   vertex-to-centre distance below the head's top, the mask's centre of mass).
3. **Search** at ``search_mm`` voxels (exhaustive, Mattes MI): translations along y and z
   (±20 mm), then rotations (pitch ±45°, roll and yaw ±20°), then translations again (±5 mm).
   Without it a strongly tilted head ends in a wrong local optimum.
   Every start is searched; the ``carry`` best results (plus the best start searched without
   turning) go on to the next stages, each refined on the scan as it is and padded with
   ``pad_mm`` of background, and the final alignment with the best score on the padded scan wins.
4. **Similarity** (rotation, translation, one scale) over ``levels_mm``, then **affine** (12
   parameters) over ``affine_levels_mm``: gradient descent with physical-shift scales and the
   learning rate re-estimated each iteration so that no point moves more than one voxel of the
   level per step; a fixed-seed random sample of ``samples`` points (deterministic).

The final Mattes MI (negative; lower is better) is measured at one fixed setting
(:func:`registration_score`) so that it is comparable between scans.

SimpleITK + numpy only (never torch, Lightning or Hydra). SimpleITK releases the GIL while it runs,
so a caller may import torch in another thread meanwhile.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from hippo.config import settings_fields
from hippo.regrid import block_mean
from hippo.wholehead.template import MNI_ETIV_CONSTANT_MM3, Template, load_template

__all__ = ["RegistrationSettings", "Registration", "register_to_template", "registration_score", "PRESETS"]


@dataclass(frozen=True)
class RegistrationSettings:
    """The numbers of the registration (see the module docstring).

    Attributes:
        moving_mm: the scan is block-averaged to about this voxel size first.
        carry: how many of the starts' search results (best search metric first) go through the
            similarity and affine stages; the final alignment with the best score wins.
        upright_candidate: also carry the best start with translations searched only (the head as
            scanned, unturned): on a tight field of view the rotation search's metric at 8 mm
            picked a 15° pitch that the later stages could not undo (seg3d, one re-acquisition in
            four ended 14 mm off with it alone).
        pad_mm: the block-averaged scan is padded with this much zero (background) on every side.
            Without it, template points mapped outside a tight field of view are dropped from the
            metric, so enlarging the template past the cut edge *improved* Mattes MI: on
            ``seg3d_epilepsy_t1`` (field of view cut at the cerebellum) two of four simulated
            re-acquisitions ended 13-21 mm off (head scale 0.84-0.94 instead of 0.70), and a side
            or both went missing. Padded, the points past the edge see background and count, but
            another re-acquisition then failed (13 mm): each carried candidate is refined on both the
            unpadded and the padded scan, and every result is scored on the padded one.
        head_top_mm: initial centring uses the head's top this many mm.
        search_mm: voxel size of the exhaustive search (template shrunk to it).
        search_translation_mm: (step, steps each side) of the translation search along y and z.
        search_pitch_deg, search_roll_yaw_deg: (step, steps each side) of the rotation search.
        search_joint_steps: translation steps (each side, along y and z) tried with every rotation.
        search_rounds: how many times the translation then rotation searches alternate.
        starts: initial placements of the template's brain centre tried (each followed by the whole
            search, the results ranked by Mattes MI at ``search_mm``; starts within 10 mm of an
            earlier one are skipped): ``"top"`` the centre of the head's top ``head_top_mm``; ``"vertex"`` the
            template's own vertex-to-centre distance below the head's highest point; ``"mass"`` the
            head mask's centre of mass. A single start is what failed on heads with the neck and
            shoulders in view (real heads from other sites); here the final choice among the starts is made
            after refinement (``carry``).
        levels_mm: voxel sizes of the gradient-descent pyramid (similarity, then affine).
        affine_levels_mm: the pyramid levels at which the affine stage runs.
        iterations: gradient-descent iterations per level.
        samples: metric sample points per evaluation (random, fixed seed: deterministic).
        bins: Mattes MI histogram bins.
        threads: SimpleITK's threads while registering (0: its default, the core count; the global
            default is restored afterwards: the metric only follows the global setting). 1 by
            default because ITK's multi-threaded Mattes MI adds per-thread partial sums in an order
            that depends on scheduling: with 2 threads the same scan registered four times gave
            matrices up to 1.2e-6 apart (and different crops, so volumes that differed); with 1
            thread the results are bit-identical, and on 2 busy cores no slower.
    """

    moving_mm: float = 2.0
    head_top_mm: float = 150.0
    search_mm: float = 8.0
    search_translation_mm: tuple[float, int] = (10.0, 2)
    search_pitch_deg: tuple[float, int] = (15.0, 3)
    search_roll_yaw_deg: tuple[float, int] = (20.0, 1)
    search_joint_steps: int = 0
    search_rounds: int = 1
    starts: tuple[str, ...] = ("top", "vertex", "mass")
    pad_mm: float = 30.0
    carry: int = 2
    upright_candidate: bool = True
    levels_mm: tuple[float, ...] = (8.0, 4.0)
    affine_levels_mm: tuple[float, ...] = (4.0,)
    iterations: int = 60
    samples: int = 4000
    bins: int = 32
    threads: int = 1

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "RegistrationSettings":
        """Settings from a mapping (``preset`` picks one of :data:`PRESETS` first; other keys
        override it); a key this class does not have, or an unknown preset, raises ``ValueError``
        naming it (:func:`hippo.config.settings_fields`)."""
        values = settings_fields(cls, cfg, handled=("preset",))
        preset = str(values.pop("preset", "fast"))
        if preset not in PRESETS:
            raise ValueError(f"{cls.__name__}: unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
        tuples = {k: tuple(v) for k, v in values.items() if isinstance(v, (list, tuple))}
        return replace(PRESETS[preset], **{**values, **tuples})


#: Named settings: ``fast`` (the default), ``thorough`` (more samples, iterations and a 2 mm affine level).
PRESETS: dict[str, RegistrationSettings] = {
    "fast": RegistrationSettings(),
    "thorough": RegistrationSettings(levels_mm=(8.0, 4.0, 2.0), affine_levels_mm=(4.0, 2.0), iterations=150,
                                     samples=20000, search_translation_mm=(8.0, 3),
                                     search_roll_yaw_deg=(15.0, 2)),
}


@dataclass
class Registration:
    """An affine from template (MNI mm) to scan (RAS mm).

    Attributes:
        matrix: ``(4, 4)``: ``scan_xyz = matrix @ [mni_xyz, 1]``.
        score: Mattes MI of the final alignment at a fixed setting (negative; lower is better;
            :func:`registration_score`).
        timings_s: seconds per stage (prepare, search, similarity, affine, score).
        settings: what was used.
        search_best: the rotation search's pick (degrees about x, y, z and translation mm) and how
            many starts were tried.
        start: the initial placement that won (:attr:`RegistrationSettings.starts`).
    """

    matrix: np.ndarray
    score: float
    timings_s: dict[str, float] = field(default_factory=dict)
    settings: RegistrationSettings = field(default_factory=RegistrationSettings)
    search_best: dict[str, float] = field(default_factory=dict)
    start: str = ""

    def to_scan(self, mni_xyz: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """MNI point(s) ``(..., 3)`` mm -> scan RAS mm."""
        p = np.asarray(mni_xyz, dtype=np.float64)
        return p @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def to_mni(self, scan_xyz: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """Scan RAS point(s) ``(..., 3)`` mm -> MNI mm."""
        inv = np.linalg.inv(self.matrix)
        p = np.asarray(scan_xyz, dtype=np.float64)
        return p @ inv[:3, :3].T + inv[:3, 3]

    @property
    def determinant(self) -> float:
        """``det`` of the linear part: scan volume per template volume (head size / MNI's)."""
        return float(np.linalg.det(self.matrix[:3, :3]))

    @property
    def rotation(self) -> np.ndarray:
        """``(3, 3)`` the rotation of the linear part (polar decomposition ``L = R S``, ``det R = +1``)."""
        u, _, vt = np.linalg.svd(self.matrix[:3, :3])
        r = u @ vt
        if np.linalg.det(r) < 0:  # a reflection: keep the closest proper rotation
            u[:, -1] *= -1
            r = u @ vt
        return r

    @property
    def scales(self) -> np.ndarray:
        """Singular values of the linear part (scan mm per template mm along its principal axes)."""
        return np.linalg.svd(self.matrix[:3, :3], compute_uv=False)

    @property
    def etiv_mm3(self) -> float:
        """Estimated total intracranial volume: ``det × MNI_ETIV_CONSTANT_MM3`` (see
        :data:`hippo.wholehead.template.MNI_ETIV_CONSTANT_MM3`)."""
        return abs(self.determinant) * MNI_ETIV_CONSTANT_MM3

    def rotation_degrees(self) -> float:
        """Angle (degrees) of :attr:`rotation`: how far the head is turned from the template's pose."""
        return float(np.degrees(np.arccos(np.clip((np.trace(self.rotation) - 1) / 2, -1.0, 1.0))))

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "matrix_mni_to_scan": np.round(self.matrix, 6).tolist(),
            "score_mattes_mi": round(float(self.score), 4),
            "determinant": round(self.determinant, 4),
            "scales": np.round(self.scales, 4).tolist(),
            "rotation_deg": round(self.rotation_degrees(), 2),
            "search_best": {k: round(float(v), 2) for k, v in self.search_best.items()},
            "start": self.start,
            "timings_s": {k: round(float(v), 3) for k, v in self.timings_s.items()},
        }


# ------------------------------------------------------------------------------------------------


def _sitk():
    import SimpleITK as sitk

    return sitk


def _to_sitk(array: np.ndarray, affine: np.ndarray):
    """``(X, Y, Z)`` array + voxel -> RAS affine -> SimpleITK image whose physical frame is RAS."""
    sitk = _sitk()
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    direction = affine[:3, :3] / spacing
    u, _, vt = np.linalg.svd(direction)  # SimpleITK wants an orthonormal direction matrix
    direction = u @ vt
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(x) for x in affine[:3, 3]])
    img.SetDirection([float(x) for x in direction.ravel()])
    return img


def head_mask(array: np.ndarray) -> np.ndarray:
    """``(X, Y, Z) bool``: the head (or brain, for a skull-stripped scan) in a (block-averaged) scan.

    Voxels above 15 % of the 99.5th percentile, opened once (drops thin noise bridges and the
    detached specks of a noisy background), the largest connected component, holes filled. Falls
    back to the plain threshold when the opening leaves nothing.
    """
    from scipy import ndimage

    a = np.asarray(array, np.float32)
    hi = float(np.percentile(a, 99.5))
    mask = a > 0.15 * hi if hi > 0 else a > 0
    opened = ndimage.binary_opening(mask, iterations=1)
    if opened.any():
        mask = opened
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return ndimage.binary_fill_holes(mask)


def _head_top_centre(array: np.ndarray, affine: np.ndarray, top_mm: float) -> np.ndarray:
    """RAS centre (mm) of the head's voxels within ``top_mm`` of its highest point."""
    return initial_centres(array, affine, top_mm=top_mm, starts=("top",), template_vertex_mm=0.0)["top"]


def initial_centres(array: np.ndarray, affine: np.ndarray, *, top_mm: float, starts=("top", "vertex", "mass"),
                    template_vertex_mm: float = 70.0) -> dict[str, np.ndarray]:
    """Candidate RAS positions (mm) of the brain's centre, one per name in ``starts``.

    * ``"top"``: the centre of the head mask's voxels within ``top_mm`` of its highest point;
    * ``"vertex"``: ``template_vertex_mm`` below the highest point (the template brain's top-to-centre
      distance), at the mean x, y of the mask's top 60 mm: independent of how much neck is in view;
    * ``"mass"``: the mask's centre of mass: right for a skull-stripped brain or a field of view cut
      tight to the head, whose top may be missing.
    """
    mask = head_mask(array)
    idx = np.argwhere(mask)
    if idx.shape[0] < 10:
        c = affine[:3, :3] @ ((np.array(array.shape) - 1) / 2.0) + affine[:3, 3]
        return {name: c for name in starts}
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    top = float(np.percentile(world[:, 2], 99.9))
    out: dict[str, np.ndarray] = {}
    for name in starts:
        if name == "top":
            out[name] = world[world[:, 2] > top - top_mm].mean(axis=0)
        elif name == "vertex":
            xy = world[world[:, 2] > top - 60.0, :2].mean(axis=0)
            out[name] = np.array([xy[0], xy[1], top - template_vertex_mm])
        elif name == "mass":
            out[name] = world.mean(axis=0)
        else:
            raise ValueError(f"unknown start {name!r}: choose from 'top', 'vertex', 'mass'")
    return out


def moving_image(array: np.ndarray, affine: np.ndarray, moving_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The scan as the registration sees it: block-averaged to about ``moving_mm`` voxels
    (:func:`block_mean`) and clipped to ``[0, 99.5th percentile of its positive voxels]``.

    Returns:
        ``(array', affine')``: ``float32`` block means and the voxel -> RAS affine of their centres.
    """
    small, small_affine = block_mean(array, affine, moving_mm)
    positive = small[small > 0]
    hi = float(np.percentile(positive, 99.5)) if positive.size else float(small.max())
    return np.clip(small, 0.0, hi if hi > 0 else None), small_affine


#: Level (mm) at which :func:`registration_score` measures the final alignment.
_SCORE_MM = 4.0
#: Radius (mm) used to turn rotation/scale parameters into physical shifts for the optimiser.
_RADIUS_MM = 80.0


class _Problem:
    """The fixed (template) and moving (scan) images at each pyramid level, prepared once per scan
    by block averaging (so SimpleITK runs every level with shrink 1 and no smoothing of its own)."""

    def __init__(self, array: np.ndarray, affine: np.ndarray, template: Template, settings: RegistrationSettings,
                 *, moving: tuple[np.ndarray, np.ndarray] | None = None):
        sitk = _sitk()
        self.sitk = sitk
        self.settings = settings
        small, small_affine = moving if moving is not None else moving_image(array, affine, settings.moving_mm)
        self.mask_array, self.mask_affine = small, small_affine  # the starts come from the unpadded scan
        if settings.pad_mm > 0:  # zeros around the field of view (see RegistrationSettings.pad_mm)
            k = int(np.ceil(settings.pad_mm / max(float(np.sqrt((small_affine[:3, :3] ** 2).sum(0)).min()), 1e-6)))
            small = np.pad(small, k)
            small_affine = small_affine.copy()
            small_affine[:3, 3] -= small_affine[:3, :3] @ np.full(3, float(k))
        self.moving_array, self.moving_affine = small, small_affine
        self._template = template
        self._levels: dict[float, tuple] = {}

    def level(self, mm: float):
        """``(fixed, fixed_mask, moving, n_mask_voxels, n_voxels)`` at about ``mm`` voxels."""
        if mm not in self._levels:
            fa, faff, fmask = self._template.block_means(mm)  # made once per template and level

            ma, maff = block_mean(self.moving_array, self.moving_affine, mm)
            self._levels[mm] = (_to_sitk(fa, faff), _to_sitk(fmask.astype(np.uint8), faff), _to_sitk(ma, maff),
                                int(fmask.sum()), int(fa.size))
        return self._levels[mm]

    def method(self, mm: float, samples: int):
        """A registration method on level ``mm`` with about ``samples`` metric samples in the mask."""
        sitk = self.sitk
        fixed, fmask, moving, n_mask, n_all = self.level(mm)
        r = sitk.ImageRegistrationMethod()
        r.SetMetricAsMattesMutualInformation(self.settings.bins)
        r.SetMetricSamplingStrategy(r.RANDOM)
        # ITK draws the percentage of the whole fixed grid at random and keeps the points in the mask
        r.SetMetricSamplingPercentage(float(min(1.0, samples / max(n_mask, 1))), 12345)
        r.SetMetricFixedMask(fmask)
        r.SetInterpolator(sitk.sitkLinear)
        return r, fixed, moving

    def run(self, transform, mm: float, samples: int, *, exhaustive=None, iterations: int = 0,
            learning_rate: float = 1.0, scales=None):
        r, fixed, moving = self.method(mm, samples)
        if exhaustive is not None:
            steps, step_scales = exhaustive
            r.SetOptimizerAsExhaustive([int(x) for x in steps])
            r.SetOptimizerScales([float(x) for x in step_scales])
        else:
            r.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=int(iterations),
                                            convergenceMinimumValue=1e-6, convergenceWindowSize=10,
                                            estimateLearningRate=r.EachIteration,
                                            maximumStepSizeInPhysicalUnits=float(learning_rate))
            r.SetOptimizerScalesFromPhysicalShift()
        r.SetInitialTransform(transform, inPlace=True)
        r.Execute(fixed, moving)
        return r


def register_to_template(
    array: np.ndarray,
    affine: np.ndarray,
    *,
    settings: RegistrationSettings | None = None,
    template: Template | None = None,
    retry_above: float | None = -0.25,
) -> Registration:
    """Register a whole-head T1 scan to the MNI template.

    Args:
        array: ``(X, Y, Z)`` scan intensities (any numeric dtype), any voxel order.
        affine: ``(4, 4)`` voxel index -> RAS mm of ``array``.
        settings: the numbers (default :data:`PRESETS` ``["fast"]``).
        template: the target (default: the shipped 2 mm ICBM152 2009 template).
        retry_above: when the score is worse (higher) than this, register again with a wider
            search (translations tried with every rotation, two search rounds) and keep the better
            of the two; ``None``: never.

    Returns:
        A :class:`Registration` (MNI -> scan affine, score, timings; ``timings_s["retry"]`` when a
        second attempt ran).
    """
    settings = settings or PRESETS["fast"]
    first = _register_once(array, affine, settings, template)
    if retry_above is None or first.score <= retry_above:
        return first
    t = time.perf_counter()
    wider = replace(settings, search_joint_steps=max(1, settings.search_joint_steps),
                    search_rounds=max(2, settings.search_rounds))
    second = _register_once(array, affine, wider, template)
    best = second if second.score < first.score else first
    best.timings_s = {**first.timings_s, "retry": time.perf_counter() - t}
    return best


@contextlib.contextmanager
def _sitk_threads(threads: int):
    """SimpleITK's global default thread count set to ``threads`` (0: unchanged) meanwhile; yields
    the count it had before (the threads this process may use)."""
    sitk = _sitk()
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        yield int(before)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _register_once(array: np.ndarray, affine: np.ndarray, settings: RegistrationSettings,
                   template: Template | None) -> Registration:
    """One registration with ``settings`` (see :func:`register_to_template`), on ``settings.threads``
    ITK threads per registration; with one ITK thread each, the independent refinements run side by
    side on up to as many cores as SimpleITK's global default allowed this process (at most 2)."""
    with _sitk_threads(settings.threads) as allowed:
        side_by_side = min(2, allowed) if int(settings.threads) == 1 else 1
        return _register_once_threaded(array, affine, settings, template, side_by_side)


def _register_once_threaded(
    array: np.ndarray,
    affine: np.ndarray,
    settings: RegistrationSettings,
    template: Template | None,
    threads: int = 1,
) -> Registration:
    template = template or load_template()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    array, affine = np.asarray(array), np.asarray(affine, np.float64)
    moving = moving_image(array, affine, settings.moving_mm)  # once for both problems
    prob = _Problem(array, affine, template, replace(settings, pad_mm=0.0), moving=moving)
    # the padded problem (see RegistrationSettings.pad_mm) refines too and scores every candidate
    prob_pad = (_Problem(array, affine, template, settings, moving=moving)
                if settings.pad_mm > 0 else prob)
    centre = template.brain_centre_mm
    centres = initial_centres(prob.mask_array, prob.mask_affine, top_mm=settings.head_top_mm,
                              starts=tuple(settings.starts) or ("top",), template_vertex_mm=template.vertex_to_centre_mm)
    prob.level(settings.search_mm)
    timings["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    kept: list[tuple[str, np.ndarray]] = []
    for name, c in centres.items():  # starts closer than 10 mm to an earlier one add nothing
        if all(np.linalg.norm(c - k) >= 10.0 for _, k in kept):
            kept.append((name, c))
    searched = []
    for name, head in kept:
        euler = _search(prob, settings, centre, head)
        searched.append((_metric(prob, euler, settings.search_mm, max(500, settings.samples // 2)), name, euler))
    searched.sort(key=lambda x: x[0])
    if settings.upright_candidate:  # the head as scanned (no turn) from the best start, as one more candidate
        head = dict(kept)[searched[0][1]]
        euler = _search(prob, settings, centre, head, rotate=False)
        searched.insert(min(1, len(searched)), (_metric(prob, euler, settings.search_mm, max(500, settings.samples // 2)),
                                                f"{searched[0][1]}, upright", euler))
    timings["search"] = time.perf_counter() - t

    # each start's search result is carried through the similarity and affine stages, and the final
    # alignment with the best score wins (one scan, one fixed metric setting: comparable); the search
    # metric alone picked a wrong pitch on a tight field of view
    t = time.perf_counter()
    carried = searched[: max(1, int(settings.carry))]
    problems = list(dict.fromkeys((prob, prob_pad)))  # unpadded and padded refinements: each failed on a
    finals = _refine_all(problems, prob_pad, carried, settings, timings, threads)  # different re-acquisition
    timings["refine"] = time.perf_counter() - t  # of a tight field of view
    finals.sort(key=lambda x: x[0])
    score, start_name, euler, matrix = finals[0]
    search_best = {"rx_deg": np.degrees(euler.GetAngleX()), "ry_deg": np.degrees(euler.GetAngleY()),
                   "rz_deg": np.degrees(euler.GetAngleZ()),
                   **{f"t{a}_mm": v for a, v in zip("xyz", euler.GetTranslation())},
                   "starts_tried": float(len(kept)), "refined": float(len(finals))}
    return Registration(matrix, score, timings, settings, search_best, start=start_name)


def _refine_all(problems: list["_Problem"], scorer: "_Problem", carried: list, settings: RegistrationSettings,
                timings: dict[str, float], threads: int) -> list[tuple[float, str, Any, np.ndarray]]:
    """Every carried search result refined on every problem and scored on ``scorer``:
    ``[(score, start name, search transform, MNI -> scan matrix), ...]`` in a fixed order.

    With ``threads > 1`` the problems run side by side, one Python thread each (SimpleITK releases
    the GIL; each registration keeps its own single ITK thread, so the result is bit-identical to
    running them one after the other). ``timings`` gains ``similarity``, ``affine`` and ``score``
    (seconds summed over the refinements, as if serial).
    """
    levels = {*settings.levels_mm, *settings.affine_levels_mm}
    for p in problems:  # every level made before the threads start: they only read them
        for mm in levels:
            p.level(mm)
    scorer.level(_SCORE_MM)

    def run(p: "_Problem") -> tuple[list, dict[str, float]]:
        own: dict[str, float] = {"similarity": 0.0, "affine": 0.0, "score": 0.0}
        out = []
        for _, name, euler in carried:
            matrix = _refine(p, settings, euler, own)
            t = time.perf_counter()
            out.append((_score(scorer, matrix), name, euler, matrix))
            own["score"] += time.perf_counter() - t
        return out, own

    if threads > 1 and len(problems) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(problems))) as pool:
            results = list(pool.map(run, problems))
    else:
        results = [run(p) for p in problems]
    finals = []
    for i in range(len(carried)):  # the serial order: each candidate on the unpadded, then the padded scan
        for out, _ in results:
            finals.append(out[i])
    for _, own in results:
        for k, v in own.items():
            timings[k] = timings.get(k, 0.0) + v
    return finals


def _refine(prob: _Problem, settings: RegistrationSettings, euler, timings: dict[str, float]) -> np.ndarray:
    """Similarity then affine gradient descent from the rigid ``euler``: the MNI -> scan matrix."""
    sitk = prob.sitk
    t = time.perf_counter()
    sim = sitk.Similarity3DTransform()
    sim.SetCenter(euler.GetCenter())
    sim.SetMatrix(euler.GetMatrix())
    sim.SetTranslation(euler.GetTranslation())
    sim_scales = [_RADIUS_MM ** 2] * 3 + [1.0] * 3 + [_RADIUS_MM ** 2]
    for mm in settings.levels_mm:
        prob.run(sim, mm, settings.samples, iterations=settings.iterations, learning_rate=mm / 2.0, scales=sim_scales)
    timings["similarity"] = timings.get("similarity", 0.0) + time.perf_counter() - t

    t = time.perf_counter()
    aff = sitk.AffineTransform(3)
    aff.SetCenter(sim.GetCenter())
    aff.SetMatrix(sim.GetMatrix())
    aff.SetTranslation(sim.GetTranslation())
    aff_scales = [_RADIUS_MM ** 2] * 9 + [1.0] * 3
    for mm in settings.affine_levels_mm:
        prob.run(aff, mm, settings.samples, iterations=settings.iterations, learning_rate=mm / 4.0, scales=aff_scales)
    timings["affine"] = timings.get("affine", 0.0) + time.perf_counter() - t
    matrix = np.eye(4)
    linear = np.array(aff.GetMatrix()).reshape(3, 3)
    c = np.array(aff.GetCenter())
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.array(aff.GetTranslation()) + c - linear @ c
    return matrix


def _search(prob: _Problem, settings: RegistrationSettings, centre: np.ndarray, head: np.ndarray, rotate: bool = True):
    """The exhaustive search (translation, rotation, translation) from the template's brain centre
    placed on ``head``: the rigid transform it ends with (``rotate=False``: translations only)."""
    sitk = prob.sitk
    euler = sitk.Euler3DTransform()
    euler.SetCenter([float(x) for x in centre])
    euler.SetTranslation([float(x) for x in head - centre])
    (t_step, t_n), (p_step, p_n), (r_step, r_n) = (settings.search_translation_mm, settings.search_pitch_deg,
                                                   settings.search_roll_yaw_deg)
    search_samples = max(500, settings.samples // 2)
    for _ in range(max(1, int(settings.search_rounds))):
        prob.run(euler, settings.search_mm, search_samples,
                 exhaustive=([0, 0, 0, 0, t_n, t_n], [1, 1, 1, 1, t_step, t_step]))
        joint = int(settings.search_joint_steps)
        if not rotate:
            continue
        prob.run(euler, settings.search_mm, search_samples,
                 exhaustive=([p_n, r_n, r_n, 0, joint, joint],
                             [np.radians(p_step), np.radians(r_step), np.radians(r_step), 1, t_step, t_step]))
    prob.run(euler, settings.search_mm, search_samples,
             exhaustive=([0, 0, 0, 1, 1, 1], [1, 1, 1, t_step / 2, t_step / 2, t_step / 2]))
    return euler


def _metric(prob: _Problem, transform, mm: float, samples: int) -> float:
    """Mattes MI of ``transform`` at level ``mm`` (the same fixed-seed samples for every start)."""
    r, fixed, moving = prob.method(mm, samples)
    r.SetInitialTransform(transform, inPlace=False)
    return float(r.MetricEvaluate(fixed, moving))


def _score(prob: _Problem, matrix: np.ndarray) -> float:
    sitk = prob.sitk
    tr = sitk.AffineTransform(3)
    tr.SetMatrix([float(x) for x in matrix[:3, :3].ravel()])
    tr.SetTranslation([float(x) for x in matrix[:3, 3]])
    r, fixed, moving = prob.method(_SCORE_MM, 20000)
    r.SetInitialTransform(tr, inPlace=False)
    return float(r.MetricEvaluate(fixed, moving))


def registration_score(array: np.ndarray, affine: np.ndarray, matrix: np.ndarray,
                       template: Template | None = None) -> float:
    """Mattes MI (32 bins, 4 mm, 20,000 fixed-seed samples in the template's brain) of the scan
    under the MNI -> scan ``matrix``: negative, lower is better. A good whole-head alignment
    measured about -0.33 to -0.42 here; a wrong one is near -0.1 to -0.2."""
    prob = _Problem(np.asarray(array), np.asarray(affine, np.float64), template or load_template(), PRESETS["fast"])
    with _sitk_threads(PRESETS["fast"].threads):
        return _score(prob, np.asarray(matrix, np.float64))
