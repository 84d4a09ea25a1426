"""Batch augmentation of training slices, run on the device inside the training step.

Torch only. Each sample of a batch draws its own parameters:

- **spatial**: rotation by up to ``rotation_deg`` degrees and isotropic scaling by a factor in
  ``[1 - scale, 1 + scale]`` about the slice centre (image bilinear, label nearest);
- **intensity**: gamma in ``gamma`` (on the ``[0, 1]`` normalised image), a multiplicative
  ``brightness`` factor, and Gaussian noise with a standard deviation up to ``noise_std``;
- **slice-order mirror**: reverse the neighbouring-slice channels of 2.5D input.

No in-plane flip is offered: with the Decathlon crops sliced along the left-right axis (voxel
axis 0, as the default configuration does) the slice plane holds the anterior-posterior axis,
and a flip along it would turn anterior into posterior. Reversing the slice order instead is a
left-right mirror, which maps a left hippocampus onto a plausible right one without changing
what either label means.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SliceAugmentation(nn.Module):
    """Random augmentation of a batch of 2D (or 2.5D) slices and their labels.

    Args:
        p_spatial: probability that a sample is rotated/scaled.
        rotation_deg: largest rotation angle in degrees.
        scale: largest relative zoom (0.15: factors 0.85..1.15).
        p_intensity: probability that a sample gets gamma/brightness/noise.
        gamma: ``(low, high)`` range of the gamma exponent.
        brightness: ``(low, high)`` range of the multiplicative factor.
        noise_std: largest standard deviation of the additive Gaussian noise.
        p_mirror_slices: probability that the channel (neighbouring-slice) order is reversed.

    Shapes: ``image (N, C, H, W)`` float in ``[0, 1]``, ``label (N, H, W)`` int64 -> same shapes.
    """

    def __init__(
        self,
        p_spatial: float = 0.5,
        rotation_deg: float = 15.0,
        scale: float = 0.15,
        p_intensity: float = 0.5,
        gamma: Sequence[float] = (0.7, 1.5),
        brightness: Sequence[float] = (0.9, 1.1),
        noise_std: float = 0.03,
        p_mirror_slices: float = 0.5,
    ):
        super().__init__()
        for name, p in (("p_spatial", p_spatial), ("p_intensity", p_intensity), ("p_mirror_slices", p_mirror_slices)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if not 0.0 <= scale < 1.0:
            raise ValueError(f"scale must be in [0, 1), got {scale}")
        self.p_spatial, self.rotation_deg, self.scale = float(p_spatial), float(rotation_deg), float(scale)
        self.p_intensity, self.gamma, self.brightness = float(p_intensity), tuple(gamma), tuple(brightness)
        self.noise_std, self.p_mirror_slices = float(noise_std), float(p_mirror_slices)

    def _uniform(self, n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, device=like.device, dtype=torch.float32).uniform_(low, high)

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 4 or label.ndim != 3:
            raise ValueError(f"expected image (N, C, H, W) and label (N, H, W), got {tuple(image.shape)}, {tuple(label.shape)}")
        n = image.shape[0]
        image = image.float()
        if self.p_spatial > 0:
            image, label = self._spatial(image, label)
        if self.p_intensity > 0:
            image = self._intensity(image)
        if self.p_mirror_slices > 0 and image.shape[1] > 1:
            flip = torch.rand(n, device=image.device) < self.p_mirror_slices
            image = torch.where(flip[:, None, None, None], image.flip(1), image)
        return image, label

    def _spatial(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = image.shape[0]
        apply = torch.rand(n, device=image.device) < self.p_spatial
        angle = self._uniform(n, -self.rotation_deg, self.rotation_deg, image) * math.pi / 180 * apply
        zoom = torch.where(apply, self._uniform(n, 1 - self.scale, 1 + self.scale, image), torch.ones_like(angle))
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[:, 0].round().long()
        return image, label

    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        n = image.shape[0]
        apply = (torch.rand(n, device=image.device) < self.p_intensity)[:, None, None, None]
        gamma = self._uniform(n, *self.gamma, image)[:, None, None, None]
        gain = self._uniform(n, *self.brightness, image)[:, None, None, None]
        noise = torch.randn_like(image) * self._uniform(n, 0.0, self.noise_std, image)[:, None, None, None]
        changed = image.clamp(0, 1).pow(gamma) * gain + noise
        return torch.where(apply, changed, image)
