"""Independent truths for the tests: overlap figures computed here with plain Python set arithmetic
on voxel indices, never with :mod:`hippo.metrics`, so that a bug there cannot pass by agreeing with
itself."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def voxel_set(labels: np.ndarray, classes) -> set[int]:
    """Flat indices of the voxels whose label is one of ``classes``."""
    wanted = {int(c) for c in classes}
    return {i for i, v in enumerate(np.asarray(labels).ravel().tolist()) if v in wanted}


def set_dice(pred: set[int], truth: set[int]) -> float:
    """``2 |P & T| / (|P| + |T|)``; 1.0 when both are empty."""
    total = len(pred) + len(truth)
    return 1.0 if total == 0 else 2 * len(pred & truth) / total


def set_jaccard(pred: set[int], truth: set[int]) -> float:
    """``|P & T| / |P | T|``; 1.0 when both are empty."""
    union = len(pred | truth)
    return 1.0 if union == 0 else len(pred & truth) / union


def overlap(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of anterior (1), posterior (2) and both merged, and the mean Jaccard of the two classes."""
    assert pred.shape == truth.shape, (pred.shape, truth.shape)
    p = {c: voxel_set(pred, (c,)) for c in (1, 2)}
    t = {c: voxel_set(truth, (c,)) for c in (1, 2)}
    return {"dice_anterior": set_dice(p[1], t[1]), "dice_posterior": set_dice(p[2], t[2]),
            "dice_foreground": set_dice(p[1] | p[2], t[1] | t[2]),
            "jaccard_mean": (set_jaccard(p[1], t[1]) + set_jaccard(p[2], t[2])) / 2}


def read_pair(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Image and integer label of one Decathlon-layout case, read with nibabel alone (stored voxel order)."""
    image = nib.load(str(Path(root) / "imagesTr" / f"{name}.nii.gz")).get_fdata(dtype=np.float32)
    label = np.rint(nib.load(str(Path(root) / "labelsTr" / f"{name}.nii.gz")).get_fdata()).astype(np.uint8)
    return image, label
