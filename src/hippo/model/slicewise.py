"""A 2D network applied to a volume slice by slice: the one definition that validation during
training (:class:`hippo.model.module.SegmentationModule`) and inference (:mod:`hippo.infer`) share.

torch + numpy (+ scipy for the connected components); never Lightning or Hydra.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from hippo.preprocessing import pad_or_crop, undo_pad_or_crop, with_neighbours


def keep_largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest 26-connected 3D component of the foreground (all labels > 0).

    The hippocampus is one connected structure in each crop; small islands elsewhere are false
    positives. Anterior and posterior labels inside the kept component are left as they are.

    Args:
        labels: ``(D, H, W)`` integer labels.

    Returns:
        A copy with every foreground voxel outside the largest component set to 0.
    """
    from scipy import ndimage

    fg = labels > 0
    components, n = ndimage.label(fg, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return labels.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    out = labels.copy()
    out[components != int(sizes.argmax())] = 0
    return out


@torch.inference_mode()
def segment_slices(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    size_multiple: int,
    min_size: Sequence[int] = (64, 64),
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    return_probabilities: bool = False,
    context: int = 0,
    largest_component: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Segment a preprocessed volume slice by slice along axis 0.

    Args:
        net: network mapping ``(N, 2 * context + 1, H', W')`` to ``(N, C, H', W')`` logits.
        image: ``(D, H, W) float32`` in ``[0, 1]`` (already normalised and oriented).
        size_multiple: in-plane sizes are padded up to a multiple of this.
        min_size: in-plane sizes are padded up to at least this (the training patch size).
        batch_size: slices per forward pass.
        device: where to run the network.
        return_probabilities: also return the softmax probabilities.
        context: neighbouring slices per side given as channels (2.5D models; 0 for 2D).
        largest_component: keep only the largest connected foreground component
            (:func:`keep_largest_component`; the probabilities are returned unchanged).

    Returns:
        ``(D, H, W) uint8`` labels, and with ``return_probabilities`` also ``(C, D, H, W) float32``.
    """
    if image.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume, got shape {image.shape}")
    h, w = image.shape[1:]
    target = [max(int(m), -(-s // size_multiple) * size_multiple) for s, m in zip((h, w), min_size)]
    target = [-(-t // size_multiple) * size_multiple for t in target]
    padded, record = pad_or_crop(image.astype(np.float32, copy=False), target)
    stacked = with_neighbours(padded, int(context))
    labels_out, probs_out = [], []
    device = torch.device(device)
    for start in range(0, stacked.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(stacked[start:start + batch_size])).to(device)
        logits = net(x).float()
        labels_out.append(logits.argmax(1).to(torch.uint8).cpu().numpy())
        if return_probabilities:
            probs_out.append(torch.softmax(logits, 1).cpu().numpy())
    labels = undo_pad_or_crop(np.concatenate(labels_out), record)
    if largest_component:
        labels = keep_largest_component(labels)
    if not return_probabilities:
        return labels
    probs = undo_pad_or_crop(np.concatenate(probs_out).transpose(1, 0, 2, 3), record)
    return labels, probs
