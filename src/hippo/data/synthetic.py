"""Synthetic hippocampus-like NIfTI pairs: the project's embedded default dataset.

The generator imitates the Medical Segmentation Decathlon Task04_Hippocampus crops closely enough
that the whole pipeline (curation, training, evaluation, deployment) runs end to end without the
real data, and that a model trained on it learns something sensible:

* **Geometry.** Volumes of ``(X, Y, Z)`` voxels with ``X`` in 31..43, ``Y`` in 40..59, ``Z`` in
  24..47 (the real range), 1 mm isotropic spacing and the real data's RAS affine (identity with a
  +1 mm offset). The hippocampus is a curved, elongated tube along a bent centre-line running mainly
  along ``Y`` (posterior -> anterior in RAS): a thick head at larger ``Y`` (label 1, anterior) and a
  thinner body/tail at smaller ``Y`` that curves upwards in ``Z`` (label 2, posterior). Total
  volumes are drawn from ~2200-4500 mm³ (real cases: ~2400-4300 mm³), the anterior share from
  ~38-66 % (real: ~40-60 %).
* **Intensities (T1-like).** Grey-matter-like hippocampus, brighter white-matter regions, dark CSF
  patches (including a temporal-horn-like crescent above the structure), a smooth random texture,
  a few small bright spots (vessels/fat), partial-volume edges, a smooth multiplicative bias field
  and Rician noise. A random global scale gives maxima from ~100 to ~1.7e6; ~22 % of cases are
  stored as ``uint8`` and the rest as ``float32``, like the real set.

Public API: :func:`make_case` (one case in memory) and :func:`generate_dataset` (a Decathlon-layout
directory on disk, idempotent, atomic file writes). Also ``python -m hippo.data.synthetic --out DIR
--n-cases N --seed S``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np

from hippo.fileio import write_bytes_atomic

#: Bump when the generator's output changes, so that existing datasets are regenerated.
GENERATOR_VERSION = 1
GENERATOR_NAME = "hippo.data.synthetic"

#: Real Task04 shape range per voxel axis (inclusive), and the real mean/std of the shapes.
SHAPE_MIN = (31, 40, 24)
SHAPE_MAX = (43, 59, 47)
_SHAPE_MEAN = (35.3, 50.1, 35.7)
_SHAPE_STD = (2.0, 3.3, 4.2)

#: The real data's voxel-to-RAS affine: 1 mm isotropic, axes aligned, origin at (1, 1, 1) mm.
AFFINE = np.array([[1.0, 0.0, 0.0, 1.0],
                   [0.0, 1.0, 0.0, 1.0],
                   [0.0, 0.0, 1.0, 1.0],
                   [0.0, 0.0, 0.0, 1.0]])

#: Total hippocampal volume range (mm³ = voxels at 1 mm) drawn for the label, and the anterior share.
TOTAL_MM3_RANGE = (2200.0, 4500.0)
ANTERIOR_FRACTION_RANGE = (0.38, 0.66)

_CASE_RE = re.compile(r"^hippocampus_\d+\.nii\.gz$")
_STREAM_TRAIN, _STREAM_TEST = 0, 1


# --------------------------------------------------------------------------------------------- #
# One case
# --------------------------------------------------------------------------------------------- #


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise (periodic, via FFT), rescaled to zero mean and unit std.

    Returns:
        float32 array of ``shape``; ``sigma`` is the smoothing width in voxels.
    """
    white = rng.standard_normal(shape)
    spec = np.fft.rfftn(white)
    fx = np.fft.fftfreq(shape[0])[:, None, None]
    fy = np.fft.fftfreq(shape[1])[None, :, None]
    fz = np.fft.rfftfreq(shape[2])[None, None, :]
    spec *= np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2 + fz**2))
    field = np.fft.irfftn(spec, s=shape, axes=(0, 1, 2))
    field -= field.mean()
    std = field.std()
    return (field / std if std > 0 else field).astype(np.float32)


def _draw_shape(rng: np.random.Generator) -> tuple[int, int, int]:
    """Volume shape ``(X, Y, Z)`` in voxels: a normal around the real mean, clipped to the real range."""
    dims = []
    for mean, std, lo, hi in zip(_SHAPE_MEAN, _SHAPE_STD, SHAPE_MIN, SHAPE_MAX):
        dims.append(int(np.clip(round(rng.normal(mean, 1.6 * std)), lo, hi)))
    return dims[0], dims[1], dims[2]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))).astype(np.float32)


def _tube(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """Draw a bent centre-line with tapering elliptical cross-sections and measure every voxel.

    The tube is the union of axis-aligned ellipsoids centred on the centre-line samples
    ``c(t), t in [0, 1]`` (``t = 0`` posterior tail, ``t = 1`` anterior head), with radii
    ``r(t)`` in mm. For each voxel the normalised distance ``min_k |(p - c_k) / r_k|`` is computed,
    so that scaling all radii by ``s`` turns the tube into ``{distance < s}``.

    Returns:
        ``(dist, t, centre_z, radius_z)``: float32 arrays of ``shape``: the normalised distance, the
        centre-line parameter of the nearest sample, that sample's ``z`` centre and ``z`` radius.
    """
    nx, ny, nz = shape
    span_y = ny * rng.uniform(0.56, 0.64)                 # centre-line extent along Y (mm)
    yc = ny * rng.uniform(0.39, 0.44)
    z_head = nz * rng.uniform(0.28, 0.36)
    rise = nz * rng.uniform(0.30, 0.50)                    # the tail curves upwards (superior)
    gamma = rng.uniform(1.0, 1.6)
    xc = nx * rng.uniform(0.36, 0.48)
    dx = rng.uniform(-2.0, 8.0)                            # medio-lateral tilt head vs tail
    bend_x = rng.uniform(-2.0, 2.0)
    rx_head, rx_tail = rng.uniform(9.0, 11.0), rng.uniform(3.5, 4.5)
    rz_head, rz_tail = rng.uniform(3.8, 4.8), rng.uniform(2.5, 3.2)
    taper = rng.uniform(1.2, 2.0)

    n_samples = int(np.ceil(span_y / 0.5)) + 1
    t = np.linspace(0.0, 1.0, n_samples)
    cx = xc + dx * (t - 0.5) + bend_x * np.sin(np.pi * t)
    cy = yc + span_y * (t - 0.5)
    cz = z_head + rise * (1.0 - t) ** gamma
    prof = t**taper
    rx = rx_tail + (rx_head - rx_tail) * prof
    rz = rz_tail + (rz_head - rz_tail) * prof
    ry = 0.75 * rx

    x = np.arange(nx, dtype=np.float32)[:, None, None]
    y = np.arange(ny, dtype=np.float32)[None, :, None]
    z = np.arange(nz, dtype=np.float32)[None, None, :]
    best = np.full(shape, np.inf, dtype=np.float32)
    idx = np.zeros(shape, dtype=np.int32)
    for k in range(n_samples):
        d2 = ((x - cx[k]) / rx[k]) ** 2 + ((y - cy[k]) / ry[k]) ** 2 + ((z - cz[k]) / rz[k]) ** 2
        closer = d2 < best
        best = np.where(closer, d2, best)
        idx[closer] = k
    return (np.sqrt(best), t[idx].astype(np.float32), cz[idx].astype(np.float32),
            rz[idx].astype(np.float32))


def _label(rng: np.random.Generator, shape: tuple[int, int, int]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw the structure and its label, retrying until it lies at least 1 voxel inside the box.

    Returns:
        ``(label, ratio, scale, centre_z, radius_z)``: ``label (X, Y, Z) uint8`` in ``{0, 1, 2}``;
        ``ratio`` the perturbed normalised distance (float32, inside where ``ratio < scale``);
        ``scale`` a 0-d array; the nearest centre-line sample's ``z`` centre and ``z`` radius.
    """
    for attempt in range(20):
        dist, t, cz, rz = _tube(rng, shape)
        ratio = dist / (1.0 + 0.09 * _smooth_noise(rng, shape, 2.5))   # irregular boundary
        target = rng.normal(3350.0, 400.0) * (0.97 ** attempt)
        n_inside = int(np.clip(target, *TOTAL_MM3_RANGE))
        flat = np.partition(ratio.ravel(), (n_inside - 1, n_inside))
        scale = 0.5 * (flat[n_inside - 1] + flat[n_inside])
        inside = ratio < scale
        fg = np.argwhere(inside)
        if fg.min() >= 1 and (fg.max(0) <= np.array(shape) - 2).all():
            break
    # Anterior (head, larger t and so larger Y) vs posterior: split the centre-line parameter at
    # the quantile giving the drawn anterior share; a little smooth noise makes the cut irregular.
    t_cut = t + 0.015 * _smooth_noise(rng, shape, 2.0)
    frac_anterior = float(np.clip(rng.normal(0.52, 0.06), *ANTERIOR_FRACTION_RANGE))
    threshold = np.quantile(t_cut[inside], 1.0 - frac_anterior)
    label = np.zeros(shape, dtype=np.uint8)
    label[inside & (t_cut >= threshold)] = 1
    label[inside & (t_cut < threshold)] = 2
    return label, ratio, np.float32(scale), cz, rz


def make_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one hippocampus-like image/label pair.

    Args:
        rng: the random generator; the case is a deterministic function of its state.

    Returns:
        ``(image, label, affine)``:

        * ``image``: ``(X, Y, Z) float32`` MR-like intensities, non-negative, arbitrary global
          scale (maxima ~1e2..1.7e6). Cases meant to be stored as ``uint8`` (about 22 %) already
          hold integer values in ``[0, 255]``.
        * ``label``: ``(X, Y, Z) uint8`` in ``{0 background, 1 anterior, 2 posterior}``, both
          classes present; 1 voxel = 1 mm³.
        * ``affine``: ``(4, 4) float64`` voxel-to-RAS (mm), axis 0 = X (R), 1 = Y (A), 2 = Z (S).
    """
    shape = _draw_shape(rng)
    label, ratio, scale, cz, rz = _label(rng, shape)
    z = np.arange(shape[2], dtype=np.float32)[None, None, :]
    rel = ratio / scale                                   # < 1 inside the hippocampus

    # Tissue classes in units of grey matter (GM = 1): WM brighter, CSF darker (T1-like).
    wm, csf = rng.uniform(1.55, 1.85), rng.uniform(0.10, 0.30)
    wm_frac = _sigmoid((_smooth_noise(rng, shape, 3.5) - rng.uniform(-0.8, -0.2)) / 0.3)
    tissue = 1.0 + (wm - 1.0) * wm_frac
    csf_frac = _sigmoid((_smooth_noise(rng, shape, 2.5) - rng.uniform(0.7, 1.2)) / 0.2)
    # Temporal-horn-like CSF crescent above the structure, white matter band below it.
    band = np.exp(-(((rel - 1.3) / 0.18) ** 2))
    above = np.clip((z - cz) / (rz * scale), 0.0, 1.0)
    below = np.clip((cz - z) / (rz * scale), 0.0, 1.0)
    gate = _sigmoid(_smooth_noise(rng, shape, 3.0) / 0.4)
    csf_frac = np.maximum(csf_frac, rng.uniform(0.5, 0.9) * band * above * gate)
    tissue = tissue + (wm - tissue) * (rng.uniform(0.3, 0.7) * band * below)
    tissue = tissue * (1.0 - csf_frac) + csf * csf_frac
    tissue *= 1.0 + 0.04 * _smooth_noise(rng, shape, 1.0)

    # Hippocampus (grey-matter-like) with partial-volume edges consistent with the label.
    hippo = rng.uniform(0.85, 1.0) * (1.0 + 0.08 * _smooth_noise(rng, shape, 1.5))
    soft = _sigmoid((1.0 - rel) / 0.18)
    image = tissue * (1.0 - soft) + hippo * soft

    # A few small bright spots (vessels, fat) like the real crops' outliers.
    grid = np.indices(shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 6))):
        centre = [rng.uniform(0, n - 1) for n in shape]
        d2 = sum((grid[a] - centre[a]) ** 2 for a in range(3))
        image += rng.uniform(2.0, 5.0) * np.exp(-d2 / (2.0 * rng.uniform(0.7, 1.6) ** 2))

    # Smooth multiplicative bias field, then Rician noise (magnitude of complex Gaussian noise).
    image *= np.exp(rng.uniform(0.04, 0.12) * _smooth_noise(rng, shape, 10.0))
    sigma = rng.uniform(0.03, 0.08) * wm
    real = image + sigma * rng.standard_normal(shape)
    imag = sigma * rng.standard_normal(shape)
    image = np.sqrt(real**2 + imag**2)

    # Random global scale: 8-bit cases with maxima ~100..255, float cases ~8e2..5e3 or ~2e5..1.7e6.
    if rng.random() < 0.22:
        image = np.clip(np.rint(image * (rng.uniform(100, 255) / image.max())), 0, 255)
    else:
        lo, hi = (2e5, 1.7e6) if rng.random() < 0.2 else (8e2, 5e3)
        image = image * (np.exp(rng.uniform(np.log(lo), np.log(hi))) / image.max())
    return image.astype(np.float32), label, AFFINE.copy()


# --------------------------------------------------------------------------------------------- #
# Writing a dataset
# --------------------------------------------------------------------------------------------- #


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Serialise a 3D array as a gzipped NIfTI-1 file (deterministic bytes: gzip mtime 0)."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _case_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Independent generator per case, so a case does not depend on n_cases or the worker count."""
    return np.random.default_rng([seed, stream, index])


def _write_case(task: tuple[str, int, int, int, str, bool]) -> str:
    """Generate and write one case; ``task = (root, seed, stream, index, name, with_label)``."""
    root, seed, stream, index, name, with_label = task
    image, label, affine = make_case(_case_rng(seed, stream, index))
    stored = image.astype(np.uint8) if _is_8bit(image) else image
    img_dir = Path(root) / ("imagesTr" if with_label else "imagesTs")
    write_bytes_atomic(img_dir / f"{name}.nii.gz", _nifti_bytes(stored, affine))
    if with_label:
        write_bytes_atomic(Path(root) / "labelsTr" / f"{name}.nii.gz", _nifti_bytes(label, affine))
    return name


def _is_8bit(image: np.ndarray) -> bool:
    """The 8-bit cases of :func:`make_case` are integer-valued with a maximum of at most 255
    (the float cases have maxima >= 800, so they never qualify)."""
    return bool(image.max() <= 255.0 and np.array_equal(image, np.rint(image)))


def _params(n_cases: int, seed: int, n_test: int) -> dict[str, Any]:
    return {"generator": GENERATOR_NAME, "generator_version": GENERATOR_VERSION,
            "n_cases": n_cases, "seed": seed, "n_test": n_test}


def _names(n_cases: int, n_test: int) -> tuple[list[str], list[str]]:
    width = max(3, len(str(n_cases + n_test)))
    train = [f"hippocampus_{i:0{width}d}" for i in range(1, n_cases + 1)]
    test = [f"hippocampus_{i:0{width}d}" for i in range(n_cases + 1, n_cases + n_test + 1)]
    return train, test


def _dataset_json(params: dict[str, Any], train: list[str], test: list[str]) -> dict[str, Any]:
    """The Decathlon ``dataset.json`` (same keys as the real one) plus the generator parameters."""
    return {
        "name": "Hippocampus",
        "description": "Synthetic hippocampus-like MRI crops (left/right hippocampus stand-in)",
        "reference": "generated by hippo.data.synthetic",
        "licence": "synthetic, CC0",
        "relase": f"synthetic v{GENERATOR_VERSION}",   # sic: the real file spells it 'relase'
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": len(train),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                     for n in train],
        "test": [f"./imagesTs/{n}.nii.gz" for n in test],
        "synthetic": params,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    """True when ``root`` holds a finished dataset made with ``params`` (all files present)."""
    meta = _read_json(root / "dataset.json")
    if meta is None or meta.get("synthetic") != params:
        return False
    files = [e[k] for e in meta.get("training", []) for k in ("image", "label")] + meta.get("test", [])
    return all((root / f).is_file() and (root / f).stat().st_size > 0 for f in files)


_MARKER = ".synthetic-in-progress"


def _check_owned(root: Path) -> None:
    """Refuse to write into a directory holding data this generator did not make."""
    meta = _read_json(root / "dataset.json")
    if meta is not None and "synthetic" in meta:
        return
    if (root / _MARKER).exists():
        return
    has_data = (root / "dataset.json").exists() or any(
        (root / d).is_dir() and any(p.name.endswith((".nii", ".nii.gz")) for p in (root / d).iterdir())
        for d in ("imagesTr", "labelsTr", "imagesTs"))
    if has_data:
        raise FileExistsError(f"{root}: holds a dataset not made by {GENERATOR_NAME}; refusing to "
                              f"overwrite it (choose another directory for the synthetic data)")


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``root`` (e.g. parallel Hydra jobs), where fcntl exists."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(root / ".synthetic.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def generate_dataset(root: str | os.PathLike, n_cases: int = 40, seed: int = 0, n_test: int = 0,
                     workers: int = 1) -> Path:
    """Write a synthetic dataset in the Decathlon layout under ``root`` (idempotent).

    Layout: ``imagesTr/hippocampus_NNN.nii.gz`` (``float32`` or ``uint8`` MR-like images),
    ``labelsTr/hippocampus_NNN.nii.gz`` (``uint8`` labels ``{0, 1, 2}``), ``imagesTs/`` (unlabelled,
    numbered after the training cases) when ``n_test > 0``, and ``dataset.json`` with the real
    file's keys plus ``"synthetic": {generator, generator_version, n_cases, seed, n_test}``. Every
    volume is ``(X, Y, Z)`` at 1 mm spacing with the real data's RAS affine (see :func:`make_case`).

    If ``root`` already holds a complete dataset made with the same parameters nothing is written.
    Otherwise the cases are (re)generated; files are written under temporary names and moved into
    place with ``os.replace``, and ``dataset.json`` is written last, so an interrupted run is
    never mistaken for a complete one. Case ``i`` depends only on ``(seed, i)``, not on
    ``n_cases`` or ``workers``.

    Args:
        root: output directory (created if missing).
        n_cases: number of labelled training cases (>= 1).
        seed: non-negative random seed.
        n_test: number of unlabelled test images.
        workers: processes generating cases in parallel (1: in this process).

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: invalid arguments.
        FileExistsError: ``root`` holds a dataset this generator did not make.
    """
    if n_cases < 1 or n_test < 0 or seed < 0 or workers < 1:
        raise ValueError(f"need n_cases >= 1, n_test >= 0, seed >= 0, workers >= 1; got "
                         f"n_cases={n_cases}, n_test={n_test}, seed={seed}, workers={workers}")
    root = Path(root)
    params = _params(int(n_cases), int(seed), int(n_test))
    if _is_complete(root, params):
        return root
    if root.is_dir():
        _check_owned(root)                   # before creating anything (even the lock) there
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        if _is_complete(root, params):       # another process finished it while we waited
            return root
        _check_owned(root)
        write_bytes_atomic(root / _MARKER, json.dumps(params).encode())
        with contextlib.suppress(FileNotFoundError):
            (root / "dataset.json").unlink()
        train, test = _names(int(n_cases), int(n_test))
        dirs = ["imagesTr", "labelsTr"] + (["imagesTs"] if test else [])
        for d in dirs:
            (root / d).mkdir(exist_ok=True)
        tasks = [(str(root), int(seed), _STREAM_TRAIN, i, n, True) for i, n in enumerate(train)]
        tasks += [(str(root), int(seed), _STREAM_TEST, i, n, False) for i, n in enumerate(test)]
        if workers > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
                list(pool.map(_write_case, tasks, chunksize=max(1, len(tasks) // (4 * workers))))
        else:
            for task in tasks:
                _write_case(task)
        _remove_stale(root, {"imagesTr": set(train), "labelsTr": set(train), "imagesTs": set(test)})
        meta = _dataset_json(params, train, test)
        write_bytes_atomic(root / "dataset.json", (json.dumps(meta, indent=4) + "\n").encode())
        (root / _MARKER).unlink()
    return root


def _remove_stale(root: Path, keep: dict[str, set[str]]) -> None:
    """Delete case files of an earlier run with other parameters, and leftover temporary files."""
    for sub, names in keep.items():
        d = root / sub
        if not d.is_dir():
            continue
        for p in d.iterdir():
            stale_case = _CASE_RE.match(p.name) and p.name[: -len(".nii.gz")] not in names
            if p.is_file() and (stale_case or p.name.startswith(".tmp-")):
                p.unlink()


# --------------------------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> int:
    """``python -m hippo.data.synthetic --out DIR [--n-cases N] [--seed S] [--n-test T] [--workers W]``."""
    parser = argparse.ArgumentParser(prog="python -m hippo.data.synthetic",
                                     description="Write a synthetic hippocampus dataset "
                                                 "(Decathlon Task04 layout).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-cases", type=int, default=40, help="labelled training cases (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--n-test", type=int, default=0, help="unlabelled test images (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        root = generate_dataset(args.out, n_cases=args.n_cases, seed=args.seed, n_test=args.n_test,
                                workers=args.workers)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"synthetic dataset ready at {root} ({args.n_cases} training, {args.n_test} test cases, "
          f"seed {args.seed}; {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
