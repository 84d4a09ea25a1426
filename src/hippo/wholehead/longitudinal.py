"""Paired measurement of two scans of the same head: change you can trust.

Two independent runs of the whole-head pipeline each place their crops on their own (registration
to MNI, locator, refinement), and a crop placed 1 mm differently moves a volume by up to a few %:
as much as a year of atrophy. The paired mode removes that source of difference:

1. **Rigid registration of the later scan to the earlier** (:func:`rigid_between`: SimpleITK
   Euler3D, normalised correlation, 4 -> 2 -> 1 mm; then, per side, a local rigid refinement
   inside a sphere about that hippocampus, since the heads' other parts may not move with it).
   ``T`` maps an earlier scan point (RAS mm) onto the same anatomy in the later scan.
2. **Halfway space**: ``S = T^(1/2)`` (the principal matrix square root of the rigid ``T``,
   itself rigid). A halfway point ``h`` is the earlier scan's ``S^-1(h)`` and the later scan's
   ``S(h)``: both scans move by half the motion, neither is the reference.
3. **Crops placed once for both**: per side, the crop centre is the mean of both scans' own final
   localisations (mask centroids) mapped into halfway space, its axes the mean of both scans'
   registration rotations (orthonormalised). The crop's voxel -> halfway affine composed with
   ``S^-1`` and ``S`` gives each scan its crop, sampled straight from the scan (one interpolation).
   One refinement re-centres the shared crop on the mean of both segmentations' centroids.
4. **Both crops segmented by the same ensemble** (the same model, the same crop); volumes counted
   on the shared 1 mm crop grid (a rigid map keeps mm³), and the change per structure is
   ``later - earlier``.
5. **The change reported** (``DEFAULT_METHOD``): the boundary shift between the two scans, from a
   deformable registration of the same crop grown by a margin (:func:`jacobian_change`), over the
   segmentation.

The independent figure (each scan's own pipeline volumes on its own grid) is kept beside the
paired one. Functions here only use the public API of :mod:`hippo.wholehead.register`,
:mod:`hippo.wholehead.crops` and :mod:`hippo.wholehead.segment`.

numpy, scipy, SimpleITK; the agent brings torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hippo.wholehead.crops import CROP_SHAPE, CropGeometry, crop_geometry, sample_crop

__all__ = ["RigidResult", "rigid_between", "halfway", "jacobian_change", "differential_bias", "with_margin",
           "jacobian_settings", "PairedSide", "PairedResult",
           "paired_change", "read_prior_input", "pacs_prior_input", "change_since_prior", "PriorInput",
           "STRUCTURES"]

STRUCTURES = ("anterior", "posterior", "total")
#: How the paired mode reports the change (``PairedSide.change_percent``): ``"jacobian"``
#: (:func:`jacobian_change`: the boundary shift between the two crops), ``"soft"`` (the two crops'
#: summed class probabilities) or ``"labels"`` (their label counts). On benchmarks/bench_atrophy.py the
#: segmentation-based figures under-read a known atrophy by about a fifth on every head (the model
#: responds to a contraction by less than its size: a bias no MDC reveals), the Jacobian did not, on
#: the stored grids and on re-acquired follow-ups alike (docs/longitudinal.md, "Measured").
DEFAULT_METHOD = "jacobian"
METHODS = ("soft", "labels", "jacobian")


# --------------------------------------------------------------------------------------------- rigid

def _sitk():
    import SimpleITK as sitk

    return sitk


def _image(array: np.ndarray, affine: np.ndarray):
    """``(X, Y, Z)`` array + voxel -> RAS affine -> SimpleITK image in a RAS physical frame."""
    sitk = _sitk()
    affine = np.asarray(affine, np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    u, _, vt = np.linalg.svd(affine[:3, :3] / spacing)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, np.float32).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(x) for x in affine[:3, 3]])
    img.SetDirection([float(x) for x in (u @ vt).ravel()])
    return img


def _normalise(array: np.ndarray) -> np.ndarray:
    """Intensities scaled by the head's robust range (1st-99th percentile of non-zero voxels)."""
    a = np.asarray(array, np.float32)
    nz = a[a > 0]
    if nz.size < 100:
        return a
    lo, hi = np.percentile(nz, [1, 99])
    return np.clip((a - lo) / max(hi - lo, 1e-6), -0.5, 1.5).astype(np.float32)


def _matrix(transform) -> np.ndarray:
    """SimpleITK Euler3D (fixed -> moving points) as a ``(4, 4)`` matrix."""
    m = np.eye(4)
    r = np.asarray(transform.GetMatrix(), np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), np.float64)
    t = np.asarray(transform.GetTranslation(), np.float64)
    m[:3, :3] = r
    m[:3, 3] = t + c - r @ c
    return m


@dataclass
class RigidResult:
    """Rigid map between two scans of one head.

    Attributes:
        matrix: ``(4, 4)`` earlier RAS mm -> later RAS mm (whole head).
        local: per side, the same refined inside a sphere about that hippocampus (``None``: not run).
        metric: final normalised-correlation value per stage (more negative = better).
        timings_s: seconds.
    """

    matrix: np.ndarray
    local: dict[str, np.ndarray] = field(default_factory=dict)
    metric: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def for_side(self, side: str) -> np.ndarray:
        return self.local.get(side, self.matrix)

    def as_dict(self) -> dict[str, Any]:
        def summary(m):
            ang = float(np.degrees(np.arccos(np.clip((np.trace(m[:3, :3]) - 1) / 2, -1, 1))))
            return {"matrix": np.round(m, 6).tolist(), "rotation_deg": round(ang, 3),
                    "translation_mm": np.round(m[:3, 3], 3).tolist()}
        return {"whole_head": summary(self.matrix), "local": {k: summary(v) for k, v in self.local.items()},
                "metric": {k: round(v, 5) for k, v in self.metric.items()},
                "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()}}


def _run_rigid(fixed, moving, initial, *, shrink: Sequence[int], smooth_mm: Sequence[float], sampling: float,
               iterations: int, mask=None, seed: int = 0):
    sitk = _sitk()
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(sampling), seed)
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=int(iterations),
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(smooth_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    out = reg.Execute(fixed, moving)
    # Execute returns a composite holding the optimised Euler3D
    if hasattr(out, "GetNumberOfTransforms") and out.GetNumberOfTransforms() == 1:
        out = out.GetNthTransform(0)
    return sitk.Euler3DTransform(out), float(reg.GetMetricValue())


def rigid_between(earlier: np.ndarray, earlier_affine: np.ndarray, later: np.ndarray, later_affine: np.ndarray, *,
                  local_centres_mm: Mapping[str, np.ndarray] | None = None, local_radius_mm: float = 30.0,
                  initial: np.ndarray | None = None) -> RigidResult:
    """Rigid registration of ``later`` onto ``earlier`` (both ``(X, Y, Z)`` with voxel -> RAS
    affines), optionally refined per side inside a sphere about each ``local_centres_mm`` point
    (earlier scan RAS mm).

    Returns:
        :class:`RigidResult` whose matrices map earlier RAS mm -> later RAS mm.
    """
    sitk = _sitk()
    t0 = time.perf_counter()
    fixed = _image(_normalise(earlier), earlier_affine)
    moving = _image(_normalise(later), later_affine)
    tf = sitk.Euler3DTransform()
    centre = np.asarray(earlier_affine, np.float64)[:3, :3] @ ((np.asarray(earlier.shape) - 1) / 2.0) + \
        np.asarray(earlier_affine, np.float64)[:3, 3]
    tf.SetCenter([float(x) for x in centre])
    if initial is not None:
        m = np.asarray(initial, np.float64)
        tf.SetMatrix([float(x) for x in m[:3, :3].ravel()])
        tf.SetTranslation([float(x) for x in (m[:3, 3] + m[:3, :3] @ centre - centre)])
    else:  # start from the centres of mass
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        tf = sitk.Euler3DTransform(init)
    tf, metric = _run_rigid(fixed, moving, tf, shrink=(4, 2), smooth_mm=(2.0, 1.0), sampling=0.1, iterations=200)
    out = RigidResult(_matrix(tf), metric={"whole_head": metric})
    out.timings_s["whole_head"] = time.perf_counter() - t0
    e_aff = np.asarray(earlier_affine, np.float64)
    e_norm = None
    for side, c in (local_centres_mm or {}).items():
        t = time.perf_counter()
        c = np.asarray(c, np.float64)
        # the earlier scan's box of +-radius about the centre (the moving image is only sampled where
        # the box maps to, so nothing else of the head pulls on this side's alignment)
        if e_norm is None:
            e_norm = _normalise(earlier)
        inv = np.linalg.inv(e_aff)
        reach = np.abs(inv[:3, :3]) @ np.full(3, float(local_radius_mm))
        ci = inv[:3, :3] @ c + inv[:3, 3]
        lo = np.maximum(np.floor(ci - reach).astype(int), 0)
        hi = np.minimum(np.ceil(ci + reach).astype(int) + 1, np.asarray(earlier.shape))
        if np.any(hi - lo < 8):
            continue
        box = e_norm[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        box_aff = e_aff.copy()
        box_aff[:3, 3] = e_aff[:3, :3] @ lo + e_aff[:3, 3]
        local = sitk.Euler3DTransform()
        local.SetCenter([float(x) for x in c])
        m = out.matrix  # the whole-head map, re-expressed about this side's centre
        local.SetMatrix([float(x) for x in m[:3, :3].ravel()])
        local.SetTranslation([float(x) for x in (m[:3, 3] + m[:3, :3] @ c - c)])
        local, metric = _run_rigid(_image(box, box_aff), moving, local, shrink=(2, 1), smooth_mm=(1.0, 0.0),
                                   sampling=0.25, iterations=100)
        out.local[side] = _matrix(local)
        out.metric[side] = metric
        out.timings_s[side] = time.perf_counter() - t
    return out


def halfway(matrix: np.ndarray) -> np.ndarray:
    """``S`` with ``S @ S == matrix`` for a rigid ``(4, 4)`` map (rotation below 180°): the
    principal square root, itself rigid (half the rotation angle about the same axis)."""
    from scipy.linalg import sqrtm

    m = np.asarray(matrix, np.float64)
    s = np.real(sqrtm(m))
    s[3] = (0, 0, 0, 1)
    # polish the rotation (sqrtm is accurate to ~1e-12 here; keep it exactly orthonormal)
    u, _, vt = np.linalg.svd(s[:3, :3])
    s[:3, :3] = u @ vt
    # translation: S(S(x)) = R x + t  ->  (R_s + I) t_s = t
    s[:3, 3] = np.linalg.solve(s[:3, :3] + np.eye(3), m[:3, 3])
    return s


#: :func:`jacobian_change` settings, chosen among a few variants on benchmarks/bench_atrophy.py's pairs
#: (docs/longitudinal.md, "Measured"). Margin: voxels sampled round the crop on every face, so that
#: the demons field is not cut off at the segmentation crop's edge.
JACOBIAN_MARGIN_VOXELS = 8
#: Gaussian smoothing (sigma, voxels) of both crops before the demons: the noise of a re-acquired
#: scan otherwise drives the field.
JACOBIAN_PRESMOOTH_VOXELS = 1.0
#: Gaussian smoothing (sigma, voxels) of the demons displacement field.
JACOBIAN_FIELD_SMOOTHING_VOXELS = 2.0
#: Demons iterations per direction.
JACOBIAN_ITERATIONS = 30
#: The differential bias field: a quadratic polynomial (in crop voxel coordinates scaled by
#: ``BIAS_SCALE_VOXELS``) fitted to ``log(later / earlier)`` over the voxels above
#: ``BIAS_THRESHOLD`` x each crop's 99th percentile, Tukey biweight (``BIAS_TUKEY_C``, in robust SDs)
#: by ``BIAS_IRLS_STEPS`` reweighted least-squares solves.
BIAS_POLYNOMIAL_ORDER = 2
BIAS_THRESHOLD = 0.2
BIAS_SCALE_VOXELS = 25.0
BIAS_TUKEY_C = 4.685
BIAS_IRLS_STEPS = 3


def _polynomial_terms(index: np.ndarray, centre: np.ndarray, order: int) -> np.ndarray:
    """``(N, 3)`` voxel indices -> ``(N, P)`` monomials up to ``order`` (1 or 2) about ``centre``."""
    x = (np.asarray(index, np.float64) - centre) / BIAS_SCALE_VOXELS
    cols = [np.ones(len(x)), x[:, 0], x[:, 1], x[:, 2]]
    if order >= 2:
        cols += [x[:, 0] * x[:, 1], x[:, 0] * x[:, 2], x[:, 1] * x[:, 2], x[:, 0] ** 2, x[:, 1] ** 2, x[:, 2] ** 2]
    return np.stack(cols, 1)


def differential_bias(earlier_crop: np.ndarray, later_crop: np.ndarray, *, order: int = BIAS_POLYNOMIAL_ORDER
                      ) -> np.ndarray:
    """The smooth intensity ratio between two crops of the same grid: a robust polynomial fit of
    ``log(later / earlier)`` over the voxels both crops show as tissue (see ``BIAS_*``).

    Args:
        earlier_crop, later_crop: ``(X, Y, Z)`` intensities on the same grid.
        order: polynomial order (1 or 2).

    Returns:
        ``(X, Y, Z)`` float64 log ratio (natural log); ``0`` where too few voxels to fit (< 100).
    """
    a = np.asarray(earlier_crop, np.float64)
    b = np.asarray(later_crop, np.float64)
    sel = (a > BIAS_THRESHOLD * np.percentile(a, 99)) & (b > BIAS_THRESHOLD * np.percentile(b, 99))
    sel &= (a > 0) & (b > 0)
    n_terms = 10 if order >= 2 else 4
    if sel.sum() < max(100, 10 * n_terms):
        return np.zeros(a.shape)
    centre = (np.asarray(a.shape, np.float64) - 1) / 2.0
    design = _polynomial_terms(np.argwhere(sel), centre, order)
    y = np.log(b[sel] / a[sel])
    w = np.ones(len(y))  # square roots of the Tukey weights; the first solve is ordinary least squares
    coef = np.zeros(design.shape[1])
    for _ in range(BIAS_IRLS_STEPS):
        coef = np.linalg.lstsq(design * w[:, None], y * w, rcond=None)[0]
        r = y - design @ coef
        u = r / (BIAS_TUKEY_C * (1.4826 * np.median(np.abs(r)) + 1e-6))
        w = np.sqrt(np.where(np.abs(u) < 1, (1 - u ** 2) ** 2, 0.0))
    grid = np.indices(a.shape).reshape(3, -1).T
    return (_polynomial_terms(grid, centre, order) @ coef).reshape(a.shape)


def jacobian_change(earlier_crop: np.ndarray, later_crop: np.ndarray, earlier_labels: np.ndarray,
                    later_labels: np.ndarray, *, smoothing_voxels: float = JACOBIAN_FIELD_SMOOTHING_VOXELS,
                    iterations: int = JACOBIAN_ITERATIONS, presmooth_voxels: float = JACOBIAN_PRESMOOTH_VOXELS,
                    bias_order: int = BIAS_POLYNOMIAL_ORDER) -> dict[str, float | None]:
    """Relative volume change per structure from a deformable registration of the two crops (the
    same 1 mm halfway grid): the mean Jacobian determinant of the earlier -> later map over the
    earlier segmentation (``V_later / V_earlier``) and, symmetrically, one over the inverse map's over
    the later segmentation; the change is the mean of the two, in %.

    By the divergence theorem the integral only depends on how the structure's boundary moved, so
    this measures the boundary shift the two scans show, with the segmentation choosing the region:
    no second segmentation's boundary noise enters.

    Steps: (1) the differential bias field (:func:`differential_bias`, ``bias_order``; 0: none) is
    divided out, half from each crop; (2) both crops Gaussian-smoothed by ``presmooth_voxels``; (3)
    the later crop histogram-matched to the earlier; (4) SimpleITK diffeomorphic demons both ways
    (``iterations``, displacement field smoothed by ``smoothing_voxels``); (5) the Jacobian
    determinant of each field averaged over the (hard) segmentation of its fixed crop.

    Args:
        earlier_crop, later_crop: ``(X + 2m, Y + 2m, Z + 2m)`` intensities, the segmentation crop
            with a margin of ``m >= 0`` voxels on every face (``JACOBIAN_MARGIN_VOXELS`` in
            :func:`paired_change`), so that the field is not cut off at the crop's edge.
        earlier_labels, later_labels: ``(X, Y, Z)`` label maps (0 background, 1 anterior,
            2 posterior) of the segmentation crop.
        smoothing_voxels, iterations, presmooth_voxels, bias_order: as above (voxels of the 1 mm grid).

    Returns:
        ``{"anterior", "posterior", "total"}`` -> % of the earlier volume (``None`` where a structure
        is empty), plus ``"forward_total"`` and ``"backward_total"`` (each direction's total, %).

    Raises:
        ValueError: crops of different shapes, or not the labels' shape plus the same even margin.
    """
    from scipy import ndimage

    sitk = _sitk()
    a = np.asarray(earlier_crop, np.float32)
    b = np.asarray(later_crop, np.float32)
    ea, la = np.asarray(earlier_labels), np.asarray(later_labels)
    extra = np.asarray(a.shape) - np.asarray(ea.shape)
    if a.shape != b.shape or ea.shape != la.shape or a.ndim != 3 or extra.min() < 0 or extra.min() != extra.max() \
            or extra[0] % 2:
        raise ValueError(f"crops {a.shape} / {b.shape} must be the labels' {ea.shape} / {la.shape} plus the same "
                         "margin on every face")
    m = int(extra[0]) // 2
    if m:
        ea, la = np.pad(ea, m), np.pad(la, m)
    if bias_order:
        half = np.exp(differential_bias(a, b, order=bias_order) / 2.0).astype(np.float32)
        a, b = a * half, b / half
    if presmooth_voxels:
        a = ndimage.gaussian_filter(a, float(presmooth_voxels))
        b = ndimage.gaussian_filter(b, float(presmooth_voxels))
    fixed = sitk.GetImageFromArray(np.ascontiguousarray(a, np.float32))
    moving = sitk.GetImageFromArray(np.ascontiguousarray(b, np.float32))
    moving = sitk.HistogramMatching(moving, fixed, numberOfHistogramLevels=128, numberOfMatchPoints=15,
                                    thresholdAtMeanIntensity=True)

    def jac(f_img, m_img) -> np.ndarray:
        f = sitk.DiffeomorphicDemonsRegistrationFilter()
        f.SetNumberOfIterations(int(iterations))
        f.SetStandardDeviations(float(smoothing_voxels))
        f.SetSmoothDisplacementField(True)
        return sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(f.Execute(f_img, m_img)))

    j_fwd, j_bwd = jac(fixed, moving), jac(moving, fixed)
    out: dict[str, float | None] = {}
    for key, sel_e, sel_l in (("anterior", ea == 1, la == 1), ("posterior", ea == 2, la == 2),
                              ("total", ea > 0, la > 0)):
        if not sel_e.any() or not sel_l.any():
            out[key] = None
            continue
        fwd = float(j_fwd[sel_e].mean())
        bwd = float(j_bwd[sel_l].mean())
        out[key] = 100.0 * ((fwd - 1.0) + (1.0 / bwd - 1.0)) / 2.0
        if key == "total":
            out["forward_total"], out["backward_total"] = 100.0 * (fwd - 1.0), 100.0 * (1.0 / bwd - 1.0)
    return out


def with_margin(geometry: CropGeometry, margin: int) -> CropGeometry:
    """The same crop grid grown by ``margin`` voxels on every face (index ``i`` of the result is
    index ``i - margin`` of ``geometry``)."""
    shift = np.eye(4)
    shift[:3, 3] = -float(margin)
    return CropGeometry(geometry.side, tuple(int(n + 2 * margin) for n in geometry.shape),
                        np.asarray(geometry.index_to_scan, np.float64) @ shift, geometry.spacing_mm)


def jacobian_settings() -> dict[str, Any]:
    """The settings :func:`paired_change` measures the Jacobian with (recorded in result.json)."""
    return {"margin_voxels": JACOBIAN_MARGIN_VOXELS, "presmooth_voxels": JACOBIAN_PRESMOOTH_VOXELS,
            "field_smoothing_voxels": JACOBIAN_FIELD_SMOOTHING_VOXELS, "iterations": JACOBIAN_ITERATIONS,
            "bias_polynomial_order": BIAS_POLYNOMIAL_ORDER, "demons": "SimpleITK DiffeomorphicDemons, both ways",
            "intensities": "differential bias divided out, Gaussian-smoothed, later histogram-matched to earlier"}


def _mean_rotation(rotations: Sequence[np.ndarray]) -> np.ndarray:
    u, _, vt = np.linalg.svd(np.mean(rotations, axis=0))
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return r


# ------------------------------------------------------------------------------------------- paired

@dataclass
class PairedSide:
    """One hippocampus measured on both scans through the same crop.

    Attributes:
        side: ``"left"`` / ``"right"``.
        earlier_mm3, later_mm3: ``{"anterior", "posterior", "total"}`` mm³ on the shared 1 mm crop
            grid (hard labels).
        earlier_soft_mm3, later_soft_mm3: the same from the summed class probabilities.
        geometry_halfway: the shared crop (voxel -> halfway RAS mm).
        centre_gap_mm: distance between the two scans' own localisations (halfway space).
        passes: crops segmented per scan.
    """

    side: str
    earlier_mm3: dict[str, float]
    later_mm3: dict[str, float]
    earlier_soft_mm3: dict[str, float]
    later_soft_mm3: dict[str, float]
    geometry_halfway: CropGeometry
    centre_gap_mm: float
    passes: int
    earlier_labels: np.ndarray | None = None
    later_labels: np.ndarray | None = None
    jacobian_percent: dict[str, float | None] = field(default_factory=dict)
    method: str = DEFAULT_METHOD

    def change_percent(self, structure: str = "total", soft: bool = False, method: str | None = None) -> float | None:
        """The change (% of the earlier volume): ``method`` ``"jacobian"`` (the default when computed,
        :func:`jacobian_change`), ``"labels"`` (the two crops' label counts) or ``"soft"`` (their summed
        probabilities)."""
        method = method or ("soft" if soft else self.method)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "jacobian":
            return self.jacobian_percent.get(structure)
        soft = method == "soft"
        a = (self.earlier_soft_mm3 if soft else self.earlier_mm3)[structure]
        b = (self.later_soft_mm3 if soft else self.later_mm3)[structure]
        return None if a <= 0 else 100.0 * (b - a) / a

    def later_mm3_by(self, method: str | None = None) -> dict[str, float]:
        """Later volumes consistent with :meth:`change_percent`: for the Jacobian method the earlier
        crop volume times ``1 + change``."""
        method = method or self.method
        base = self.earlier_soft_mm3 if method == "soft" else self.earlier_mm3
        out = {}
        for k in STRUCTURES:
            c = self.change_percent(k, method=method)
            out[k] = self.later_mm3[k] if c is None else base[k] * (1.0 + c / 100.0)
        return out

    def earlier_mm3_by(self, method: str | None = None) -> dict[str, float]:
        return dict(self.earlier_soft_mm3 if (method or self.method) == "soft" else self.earlier_mm3)

    def as_dict(self) -> dict[str, Any]:
        r = lambda d: {k: round(float(v), 1) for k, v in d.items()}  # noqa: E731
        rp = lambda v: None if v is None else round(float(v), 3)  # noqa: E731
        return {"method": self.method,
                "earlier_mm3": r(self.earlier_mm3_by()), "later_mm3": r(self.later_mm3_by()),
                "change_percent": {k: rp(self.change_percent(k)) for k in STRUCTURES},
                "jacobian_change_percent": {k: rp(v) for k, v in self.jacobian_percent.items()},
                "labels": {"later_mm3": r(self.later_mm3),
                           "change_percent": {k: rp(self.change_percent(k, method="labels")) for k in STRUCTURES}},
                "soft": {"earlier_mm3": r(self.earlier_soft_mm3), "later_mm3": r(self.later_soft_mm3),
                         "change_percent": {k: None if self.change_percent(k, True) is None
                                            else round(self.change_percent(k, True), 3) for k in STRUCTURES}},
                "centre_gap_mm": round(self.centre_gap_mm, 2), "passes": self.passes,
                "crop_halfway": self.geometry_halfway.as_dict()}


@dataclass
class PairedResult:
    """Both sides measured as a pair, with the rigid map and the independent figures.

    Attributes:
        left, right: :class:`PairedSide`.
        rigid: :class:`RigidResult` (earlier -> later).
        halfway: ``(4, 4)`` ``S`` (earlier RAS -> halfway; halfway -> later RAS).
        independent: per side ``{"earlier_mm3", "later_mm3"}`` of each scan's own pipeline run
            (``{"anterior", "posterior", "total"}``), when given.
        timings_s: seconds per stage.
    """

    left: PairedSide
    right: PairedSide
    rigid: RigidResult
    halfway: np.ndarray
    independent: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def side(self, name: str) -> PairedSide:
        return {"left": self.left, "right": self.right}[name]

    def independent_change_percent(self, side: str, structure: str = "total") -> float | None:
        d = self.independent.get(side)
        if not d or d["earlier_mm3"].get(structure, 0) <= 0:
            return None
        return 100.0 * (d["later_mm3"][structure] - d["earlier_mm3"][structure]) / d["earlier_mm3"][structure]

    def as_dict(self) -> dict[str, Any]:
        return {"method": ("paired: later scan rigidly registered to the earlier, both resampled into their halfway "
                           "space, one crop per side placed once for both, both segmented by the same ensemble; "
                           "volumes on the shared 1 mm crop grid"),
                "left": self.left.as_dict(), "right": self.right.as_dict(),
                "independent": {s: {k: {kk: round(float(vv), 1) for kk, vv in v.items()} for k, v in d.items()}
                                for s, d in self.independent.items()},
                "rigid": self.rigid.as_dict(), "jacobian_settings": jacobian_settings(),
                "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()}}


def _volumes(labels: np.ndarray, probs: np.ndarray, voxel_mm3: float) -> tuple[dict[str, float], dict[str, float]]:
    hard = {"anterior": float((labels == 1).sum()) * voxel_mm3, "posterior": float((labels == 2).sum()) * voxel_mm3}
    hard["total"] = hard["anterior"] + hard["posterior"]
    soft = {"anterior": float(probs[1].sum()) * voxel_mm3, "posterior": float(probs[2].sum()) * voxel_mm3}
    soft["total"] = soft["anterior"] + soft["posterior"]
    return hard, soft


def _centroid_index(labels: np.ndarray) -> np.ndarray | None:
    idx = np.argwhere(labels > 0)
    return None if idx.size == 0 else idx.mean(0)


def _apply(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.asarray(m)[:3, :3] @ np.asarray(p, np.float64) + np.asarray(m)[:3, 3]


def paired_change(
    earlier: tuple[np.ndarray, np.ndarray],
    later: tuple[np.ndarray, np.ndarray],
    agent: Any,
    *,
    earlier_result: Any,
    later_result: Any,
    local: bool = True,
    refine: int = 0,
    crop_shape: tuple[int, int, int] = CROP_SHAPE,
    keep_labels: bool = False,
    jacobian: bool = True,
    method: str = DEFAULT_METHOD,
) -> PairedResult:
    """Measure the change between two scans of one head as a pair.

    Args:
        earlier, later: ``(array (X, Y, Z), affine voxel -> RAS mm)`` of each scan (closest
            canonical RAS, as :func:`hippo.scan_io.read_scan` gives).
        agent: the ensemble (``agent.segment(crop, return_probabilities=True)``).
        earlier_result, later_result: each scan's own
            :class:`hippo.wholehead.segment.WholeHeadResult` (its localisation seeds the shared crop,
            its volumes are the independent figure).
        local: refine the rigid map per side inside a 30 mm sphere about that hippocampus.
        refine: re-centre the shared crop on the mean of both segmentations' centroids this many
            times.
        crop_shape: the crop (voxels at 1 mm).
        keep_labels: keep both crops' labels in the result (tests, pictures).
        jacobian: also measure the change by :func:`jacobian_change` on the two crops (sampled again
            with a margin of ``JACOBIAN_MARGIN_VOXELS`` for it; the segmentation crops are unchanged).
        method: which figure :meth:`PairedSide.change_percent` reports (:data:`METHODS`); all are
            kept in the result.

    Returns:
        :class:`PairedResult`.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    e_arr, e_aff = np.asarray(earlier[0]), np.asarray(earlier[1], np.float64)
    l_arr, l_aff = np.asarray(later[0]), np.asarray(later[1], np.float64)

    def own_centre(result, side):
        s = result.side(side)
        return np.asarray(s.centroid_scan_mm if s.centroid_scan_mm is not None else s.geometry.centre_scan_mm, float)

    # an initial guess from the two MNI registrations: later = A_l A_e^-1 earlier (affine; keep its rotation)
    guess = later_result.registration.matrix @ np.linalg.inv(earlier_result.registration.matrix)
    u, _, vt = np.linalg.svd(guess[:3, :3])
    guess[:3, :3] = u @ vt
    rigid = rigid_between(e_arr, e_aff, l_arr, l_aff, initial=guess,
                          local_centres_mm={s: own_centre(earlier_result, s) for s in ("left", "right")} if local else None)
    timings["rigid"] = time.perf_counter() - t

    sides: dict[str, PairedSide] = {}
    voxel_mm3 = 1.0
    half_for: dict[str, np.ndarray] = {}
    for side in ("left", "right"):
        s_half = halfway(rigid.for_side(side))
        half_for[side] = s_half
        s_inv = np.linalg.inv(s_half)
        # each scan's own localisation and pose, in halfway space
        c_e = _apply(s_half, own_centre(earlier_result, side))
        c_l = _apply(s_inv, own_centre(later_result, side))
        rot = _mean_rotation([s_half[:3, :3] @ earlier_result.registration.rotation,
                              s_inv[:3, :3] @ later_result.registration.rotation])
        centre = (c_e + c_l) / 2.0
        passes = 0
        for attempt in range(1 + max(0, int(refine))):
            t = time.perf_counter()
            geo_h = crop_geometry(rot, centre, side, shape=crop_shape)
            geo_e = CropGeometry(side, geo_h.shape, s_inv @ geo_h.index_to_scan, geo_h.spacing_mm)
            geo_l = CropGeometry(side, geo_h.shape, s_half @ geo_h.index_to_scan, geo_h.spacing_mm)
            crop_e, _ = sample_crop(e_arr, e_aff, geo_e)
            crop_l, _ = sample_crop(l_arr, l_aff, geo_l)
            timings["crop"] = timings.get("crop", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            lab_e, prob_e = agent.segment(crop_e, return_probabilities=True)
            lab_l, prob_l = agent.segment(crop_l, return_probabilities=True)
            timings["infer"] = timings.get("infer", 0.0) + time.perf_counter() - t
            passes += 1
            ce, cl = _centroid_index(lab_e), _centroid_index(lab_l)
            if attempt == refine or ce is None or cl is None:
                break
            centre = geo_h.to_scan((ce + cl) / 2.0)
        voxel_mm3 = float(geo_h.spacing_mm) ** 3
        hard_e, soft_e = _volumes(np.asarray(lab_e), np.asarray(prob_e), voxel_mm3)
        hard_l, soft_l = _volumes(np.asarray(lab_l), np.asarray(prob_l), voxel_mm3)
        t = time.perf_counter()
        jac: dict[str, float | None] = {}
        if jacobian:  # the same crop grown by a margin, sampled from both scans for the demons only
            wide_e, _ = sample_crop(e_arr, e_aff, with_margin(geo_e, JACOBIAN_MARGIN_VOXELS))
            wide_l, _ = sample_crop(l_arr, l_aff, with_margin(geo_l, JACOBIAN_MARGIN_VOXELS))
            jac = jacobian_change(wide_e, wide_l, lab_e, lab_l)
        timings["jacobian"] = timings.get("jacobian", 0.0) + time.perf_counter() - t
        sides[side] = PairedSide(side, hard_e, hard_l, soft_e, soft_l, geo_h, float(np.linalg.norm(c_e - c_l)), passes,
                                 np.asarray(lab_e) if keep_labels else None, np.asarray(lab_l) if keep_labels else None,
                                 jac, method)

    independent = {}
    for side in ("left", "right"):
        ve, vl = earlier_result.side(side).volumes, later_result.side(side).volumes
        independent[side] = {
            "earlier_mm3": {"anterior": ve.anterior_mm3, "posterior": ve.posterior_mm3, "total": ve.total_mm3},
            "later_mm3": {"anterior": vl.anterior_mm3, "posterior": vl.posterior_mm3, "total": vl.total_mm3}}
    return PairedResult(sides["left"], sides["right"], rigid, half_for["left"], independent, timings)


# ------------------------------------------------------------------------------------ prior inputs

SCAN_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")


@dataclass
class PriorInput:
    """What ``prior=PATH`` named, read.

    Attributes:
        kind: ``"scan"`` (NIfTI/MGZ), ``"dicom"`` (a study folder, or the T1 series fetched from the
            PACS) or ``"result"`` (our result.json whose scan could not be found, or our SR in the
            PACS: volumes only).
        source: the path given (and the scan behind a result.json).
        array, affine: the earlier scan in closest canonical RAS (``None`` for ``"result"``).
        volumes: per side ``{"anterior", "posterior", "total"}`` mm³ (only for ``"result"``).
        study_date: ISO date when known (DICOM StudyDate, or recorded in the result.json).
        patient_id: DICOM PatientID when known.
    """

    kind: str
    source: str
    array: np.ndarray | None = None
    affine: np.ndarray | None = None
    volumes: dict[str, dict[str, float]] | None = None
    study_date: str | None = None
    patient_id: str | None = None
    algorithm_version: str | None = None
    #: more for the change block's ``prior`` record (e.g. where in the PACS it was found)
    record: dict[str, Any] = field(default_factory=dict)
    #: a sentence for the change block's note (e.g. why the earlier scan itself is not used)
    note: str = ""
    #: the patient's measured time points up to this prior, oldest first (:func:`trajectory_point`):
    #: from a result.json's own trajectory, or every earlier SR in the PACS; empty: the prior alone
    history: list[dict[str, Any]] = field(default_factory=list)


def trajectory_point(date: Any, volumes: Mapping[str, Mapping[str, float]], source: str = "") -> dict[str, Any]:
    """One time point of a trajectory: ``{"date": ISO or None, "left_mm3", "right_mm3", "source"}``
    (total volumes, each measured on its own: the points of a trajectory are independent)."""
    return {"date": _iso(date), "left_mm3": round(float(volumes["left"]["total"]), 1),
            "right_mm3": round(float(volumes["right"]["total"]), 1), "source": str(source)}


def _trajectory(history: Sequence[Mapping[str, Any]], prior_point: Mapping[str, Any],
                current_point: Mapping[str, Any], limits: Any) -> dict[str, Any]:
    """The ``trajectory`` of a change block: every known time point (one per date, the latest
    measurement of a date kept), oldest first, with the independent MDC95 per side (%) for the
    noise band (each point is one measurement)."""
    by_date: dict[Any, dict[str, Any]] = {}
    for point in [*history, prior_point, current_point]:
        by_date[point.get("date") or f"undated {len(by_date)}"] = dict(point)
    points = sorted(by_date.values(), key=lambda q: (q.get("date") is None, q.get("date") or ""))
    mdc = None if limits is None else {s: limits.mdc("independent", s) for s in ("left", "right")}
    return {"points": points, "mdc95_percent": mdc,
            "band": "an unchanged head's later measurements fall within ± the independent MDC95 of the first point"}


def _iso(value: Any) -> str | None:
    from hippo.change import parse_date

    d = parse_date(value)
    return d.isoformat() if d else None


def _read_dicom_study(folder) -> PriorInput:
    from hippo.dicom.ingest import scan_study
    from hippo.dicom.volume import load_series
    from hippo.dicom.wholehead_select import select_input_series
    from hippo.dicom.ingest import SelectionRules
    from hippo.dicom.wholehead_select import WholeHeadRules

    scan = scan_study(folder, workers=4)
    series, kind = select_input_series(scan, SelectionRules(), WholeHeadRules())
    if kind != "wholehead":
        raise ValueError(f"the earlier study {folder} holds a hippocampus crop series, not a whole-head T1")
    vol = load_series(series.files, workers=4, series_uid=series.uid)
    ds = vol.datasets[0] if getattr(vol, "datasets", None) else None
    return PriorInput("dicom", str(folder), np.asarray(vol.array, np.float32), np.asarray(vol.affine, np.float64),
                      study_date=_iso(ds.get("StudyDate")) if ds is not None else None,
                      patient_id=str(ds.get("PatientID", "")) if ds is not None else None)


def read_prior_input(path) -> PriorInput:
    """Read ``prior=PATH``: a NIfTI/MGZ scan, a DICOM study folder, or a ``result.json`` of ours (from
    ``hippo.predict`` or ``hippo.deploy``; its scan or study is read when it is still there, so the
    pair can be measured as a pair; otherwise its recorded volumes are used).

    Raises:
        ValueError / FileNotFoundError: with a sentence saying what is wrong.
    """
    import json
    from pathlib import Path

    from hippo.scan_io import read_scan

    p = Path(path)
    if p.is_dir():
        return _read_dicom_study(p)
    if not p.is_file():
        raise FileNotFoundError(f"prior={p}: no such file or folder")
    if p.name.lower().endswith(SCAN_SUFFIXES):
        s = read_scan(p)
        return PriorInput("scan", str(p), np.asarray(s.array, np.float32), np.asarray(s.affine, np.float64))
    with open(p, "rb") as fh:
        head = fh.read(64).lstrip()
    if not head.startswith(b"{"):
        raise ValueError(f"prior={p}: not a scan (NIfTI/MGZ), a DICOM study folder or a result.json")
    data = json.loads(p.read_text(encoding="utf-8"))
    vols = data.get("volumes_mm3") or data.get("volumes") or {}
    if not isinstance(vols, dict) or not all(isinstance(vols.get(s), dict) for s in ("left", "right")):
        raise ValueError(f"prior={p}: not a whole-head result of ours (no left/right volumes)")
    if data.get("status") not in ("ok", "review"):
        raise ValueError(f"prior={p}: not a finished measurement (status {data.get('status')!r})")
    date = _iso(data.get("scan_date") or data.get("study_date"))
    version = (data.get("model") or {}).get("hippo_version") or data.get("hippo_version")
    recorded = {s: {k: float(vols[s][f"{k}_mm3"]) for k in STRUCTURES} for s in ("left", "right")}
    # the time points this result knew (its own trajectory ends with itself), else itself alone
    history = [dict(q) for q in ((data.get("change") or {}).get("trajectory") or {}).get("points") or []] \
        or [trajectory_point(date, recorded, str(p))]
    for key in ("scan", "study"):  # hippo.predict records "scan", hippo.deploy "study"
        src = data.get(key)
        if not src:
            continue
        q = Path(src) if Path(src).is_absolute() else (p.parent / src)
        if q.exists():
            prior = read_prior_input(q)
            prior.study_date = prior.study_date or date
            prior.source = f"{p} (scan {q})"
            prior.algorithm_version = version
            prior.history = history
            return prior
    return PriorInput("result", str(p), volumes=recorded, study_date=date, algorithm_version=str(version or ""),
                      history=history)


def pacs_prior_input(source: Any, *, patient_id: Any, study_date: Any, study_instance_uid: str) -> PriorInput:
    """This patient's earlier whole-head scan from the PACS (``source``: a
    :class:`hippo.prior.DicomwebPriorSource`), for :func:`change_since_prior`.

    1. Our most recent whole-head SR of the same PatientID from an earlier study (another
       StudyInstanceUID, an earlier StudyDate): :func:`hippo.prior.find_prior` with
       :func:`hippo.prior.read_wholehead_sr` (QIDO-RS + WADO-RS).
    2. The image series that SR measured (its evidence) fetched over WADO-RS into a temporary folder
       and read as a study (the whole-head T1 chosen by :mod:`hippo.dicom.wholehead_select`, as for
       this study): a ``"dicom"`` input, so that the pair is measured in the paired mode.
    3. When that series cannot be fetched or read: the SR's left/right volumes, a ``"result"`` input
       (the independent change) whose note says why.

    Raises:
        hippo.prior.PriorError: no study date or patient ID here, no earlier whole-head result in
            the PACS, the PACS unreachable or refusing (one sentence each).
    """
    import tempfile
    from pathlib import Path

    from hippo.change import parse_date
    from hippo.prior import NO_PATIENT_ID, NO_STUDY_DATE, PriorCandidate, PriorError, find_priors, read_wholehead_sr

    date = parse_date(study_date)
    if date is None:
        raise PriorError(NO_STUDY_DATE)
    if not str(patient_id or "").strip():
        raise PriorError(NO_PATIENT_ID)
    earlier = find_priors(source, patient_id=str(patient_id), study_date=date, study_instance_uid=study_instance_uid,
                          reader=read_wholehead_sr)
    found = earlier[0]  # the most recent
    history = [trajectory_point(r.study_date, r.volumes_mm3, r.source) for r in reversed(earlier)]
    day = found.study_date.isoformat()
    record = {"found_in": f"PACS {source.url}", "study_instance_uid": found.study_instance_uid,
              "sr_sop_instance_uid": found.sop_instance_uid,
              "algorithm": {"name": found.algorithm_name, "version": found.algorithm_version}}
    problems = []
    for series_uid in found.image_series:
        try:
            with tempfile.TemporaryDirectory(prefix="hippo-prior-") as tmp:
                source.fetch_files(PriorCandidate(found.study_instance_uid, series_uid, found.study_date), tmp)
                prior = _read_dicom_study(Path(tmp))  # the pixels are in memory: the folder can go
        except Exception as exc:  # noqa: BLE001 - the SR's volumes still give a change
            problems.append(str(exc) if isinstance(exc, PriorError)
                            else f"series {series_uid}: {type(exc).__name__}: {exc}")
            continue
        prior.source = f"PACS {source.url}: the earlier T1 series {series_uid} (study of {day})"
        prior.study_date = prior.study_date or day
        prior.algorithm_version = found.algorithm_version
        prior.record = {**record, "series_instance_uid": series_uid,
                        "used": "the earlier T1 series itself, fetched from the PACS (paired mode)"}
        prior.note = f"the earlier scan (study of {day}) was fetched from the PACS"
        prior.history = history
        return prior
    why = "; ".join(problems) or "our earlier result names no image series"
    return PriorInput("result",
                      f"PACS {source.url}: our earlier whole-head SR {found.sop_instance_uid} (study of {day})",
                      volumes={s: dict(v) for s, v in found.volumes_mm3.items()}, study_date=day,
                      algorithm_version=found.algorithm_version,
                      record={**record, "used": "the volumes of our earlier SR (independent mode)"},
                      note=f"the earlier T1 series could not be fetched from the PACS ({why})", history=history)


def change_since_prior(
    prior: str | PriorInput | Callable[[], PriorInput],
    current: tuple[np.ndarray, np.ndarray],
    current_result: Any,
    agent: Any,
    *,
    locator: Any = None,
    segment_options: Mapping[str, Any] | None = None,
    current_date: Any = None,
    prior_date: Any = None,
    limits: Any = "shipped",
) -> dict[str, Any]:
    """The ``change`` block of a whole-head result (:func:`hippo.change.wholehead_change`) against an
    earlier scan or result; never raises: ``{"available": False, "reason": ...}`` says why not.

    With an earlier *scan* (or a result.json whose scan is still there) the earlier scan is segmented
    as usual (the independent figure) and the pair is measured in the paired mode
    (:func:`paired_change`), whose MDC applies; with only recorded volumes the change is the
    independent one.

    Args:
        prior: ``prior=PATH`` (see :func:`read_prior_input`), one already read, or a function that
            reads it (e.g. :func:`pacs_prior_input`; what it raises becomes the reason).
        current: ``(array, affine)`` of this scan (closest canonical RAS).
        current_result: this scan's :class:`hippo.wholehead.segment.WholeHeadResult`.
        agent, locator: the ensemble and its light locator (as for ``segment_wholehead``).
        segment_options: more ``segment_wholehead`` keywords for the earlier scan (settings, rules...).
        current_date, prior_date: study dates (``YYYYMMDD``/ISO); ``prior_date`` overrides what the
            prior records.
        limits: :class:`hippo.change.ChangeLimits`, ``None``, or ``"shipped"`` (the model's
            ``.change.json``).
    """
    from hippo.change import load_change_limits, wholehead_change
    from hippo.wholehead.segment import segment_wholehead

    t0 = time.perf_counter()
    try:
        if limits == "shipped":
            limits = load_change_limits()
        p = prior if isinstance(prior, PriorInput) else prior() if callable(prior) else read_prior_input(prior)
        e_date = _iso(prior_date) or p.study_date
        now = {s: {"anterior": current_result.side(s).volumes.anterior_mm3,
                   "posterior": current_result.side(s).volumes.posterior_mm3,
                   "total": current_result.side(s).volumes.total_mm3} for s in ("left", "right")}
        record = {"source": p.source, "kind": p.kind, "study_date": e_date, **p.record}
        if p.kind == "result":
            note = "; ".join(n for n in ("the earlier scan itself was not available: two independent measurements",
                                         p.note) if n)
            block = wholehead_change(p.volumes, now, earlier_date=e_date, later_date=current_date, mode="independent",
                                     limits=limits, prior=record, note=note)
            block["trajectory"] = _trajectory(p.history, trajectory_point(e_date, p.volumes, p.source),
                                              trajectory_point(current_date, now, "this scan"), limits)
            block["seconds"] = round(time.perf_counter() - t0, 2)
            return block
        earlier_result = segment_wholehead(p.array, p.affine, agent, locator=locator, **dict(segment_options or {}))
        pr = paired_change((p.array, p.affine), current, agent, earlier_result=earlier_result,
                           later_result=current_result)
        record["review"] = list(earlier_result.review)
        earlier = {s: pr.side(s).earlier_mm3_by() for s in ("left", "right")}
        later = {s: pr.side(s).later_mm3_by() for s in ("left", "right")}
        ind_e = {s: pr.independent[s]["earlier_mm3"] for s in ("left", "right")}
        ind_l = {s: pr.independent[s]["later_mm3"] for s in ("left", "right")}
        flagged = ("the earlier scan was flagged for review: " + "; ".join(earlier_result.review)
                   if earlier_result.review else "")
        note = "; ".join(n for n in (p.note, flagged) if n)
        block = wholehead_change(earlier, later, earlier_date=e_date, later_date=current_date, mode="paired",
                                 limits=limits, independent=(ind_e, ind_l), prior=record, note=note)
        block["paired"] = pr.as_dict()
        # the earlier point as recorded when it was measured (else as measured now), this scan's own
        earlier_point = next((q for q in reversed(p.history) if q.get("date") == e_date), None) \
            or trajectory_point(e_date, {s: {"total": ind_e[s]["total"]} for s in ("left", "right")}, p.source)
        block["trajectory"] = _trajectory(p.history, earlier_point, trajectory_point(current_date, now, "this scan"),
                                          limits)
        block["seconds"] = round(time.perf_counter() - t0, 2)
        return block
    except Exception as exc:  # noqa: BLE001 - the study itself is still measured
        import logging

        from hippo.prior import PriorError

        logging.getLogger(__name__).warning("change since the prior failed: %s: %s", type(exc).__name__, exc)
        reason = str(exc) if isinstance(exc, PriorError) else f"{type(exc).__name__}: {exc}"
        return {"available": False, "reason": reason}
