"""A volume onto the model's voxel grid and its labels back onto the volume's own grid.

Both grids share the volume's field of view and axes (``(X, Y, Z)``, closest canonical RAS): voxel
``i`` of an axis of ``n`` voxels of size ``s`` covers ``[i * s, (i + 1) * s)`` mm, and the model grid
cuts the same extent into voxels of (about) the model's size. :func:`to_model_grid` interpolates
intensities linearly (``scipy.ndimage.zoom`` in grid mode, so the grids' outer edges coincide);
:func:`labels_to_source` maps labels back by nearest neighbour onto exactly the source shape, so the
labelled volume in mm³ is kept to within a voxel's partial coverage along the boundary.
:func:`block_mean` averages integer blocks of voxels (the registration's coarser levels).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["model_grid_shape", "to_model_grid", "labels_to_source", "block_mean"]


def model_grid_shape(shape: Sequence[int], spacing_mm: Sequence[float], model_spacing_mm: Sequence[float]
                     ) -> tuple[int, int, int]:
    """The shape that covers ``shape * spacing_mm`` with voxels of about ``model_spacing_mm``."""
    return tuple(max(1, int(round(n * s / m))) for n, s, m in zip(shape, spacing_mm, model_spacing_mm))  # type: ignore[return-value]


def to_model_grid(image: np.ndarray, spacing_mm: Sequence[float], model_spacing_mm: Sequence[float]
                  ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample ``image`` ``(X, Y, Z)`` onto the model's grid.

    Returns:
        ``(resampled float32, its voxel size in mm)``; the voxel size differs from the model's by at
        most half a voxel over the field of view (the grid keeps the field of view exactly).
    """
    from scipy.ndimage import zoom

    image = np.asarray(image, dtype=np.float32)
    shape = model_grid_shape(image.shape, spacing_mm, model_spacing_mm)
    factors = [t / n for t, n in zip(shape, image.shape)]
    out = zoom(image, factors, order=1, mode="nearest", grid_mode=True)
    spacing = tuple(float(n * s / t) for n, s, t in zip(image.shape, spacing_mm, shape))
    return out.astype(np.float32, copy=False), spacing  # type: ignore[return-value]


def labels_to_source(labels: np.ndarray, source_shape: Sequence[int]) -> np.ndarray:
    """Map labels ``(X', Y', Z')`` on the model grid back onto the source grid ``source_shape`` (nearest
    neighbour; the two grids cover the same field of view)."""
    from scipy.ndimage import zoom

    labels = np.asarray(labels)
    factors = [t / n for t, n in zip(source_shape, labels.shape)]
    out = zoom(labels, factors, order=0, mode="nearest", grid_mode=True)
    if out.shape != tuple(source_shape):  # pragma: no cover - zoom rounds to the requested shape
        raise RuntimeError(f"labels_to_source: got {out.shape}, expected {tuple(source_shape)}")
    return out.astype(labels.dtype, copy=False)


def block_mean(array: np.ndarray, affine: np.ndarray, target_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Average ``array`` over integer blocks so that voxels become about ``target_mm``.

    Returns:
        ``(array', affine')``: the block means (``float32``) and the affine of their centres.
    """
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    f = np.array([max(1, int(round(target_mm / s))) for s in spacing])
    if f.max() == 1:
        return np.asarray(array, np.float32), np.asarray(affine, np.float64)
    shape = [(s // k) * k for s, k in zip(array.shape, f)]
    a = np.asarray(array[: shape[0], : shape[1], : shape[2]], np.float32)
    a = a.reshape(shape[0] // f[0], f[0], shape[1] // f[1], f[1], shape[2] // f[2], f[2]).mean((1, 3, 5))
    out = np.asarray(affine, np.float64).copy()
    out[:3, 3] = affine[:3, :3] @ ((f - 1) / 2.0) + affine[:3, 3]
    out[:3, :3] = affine[:3, :3] * f
    return a.astype(np.float32), out
