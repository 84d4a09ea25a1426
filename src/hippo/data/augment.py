"""Batch augmentation of training slices, run on the device inside the training step.

Torch only. Each sample of a batch draws its own parameters:

- **spatial**: rotation by up to ``rotation_deg`` degrees and isotropic scaling by a factor in
  ``[1 - scale, 1 + scale]`` about the slice centre (image bilinear, label nearest);
- **elastic**: a smooth random displacement field (white noise smoothed by a Gaussian of
  ``elastic_sigma`` pixels, scaled to a root-mean-square displacement drawn from
  ``[0, elastic_alpha]`` pixels), composed with the rotation/zoom into one resampling;
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
        p_elastic: probability that a sample is deformed elastically (0: never, the default).
        elastic_alpha: largest root-mean-square displacement of the elastic field, in pixels.
        elastic_sigma: standard deviation of the Gaussian that smooths the field, in pixels
            (larger: smoother, more global deformation).

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
        p_elastic: float = 0.0,
        elastic_alpha: float = 3.0,
        elastic_sigma: float = 6.0,
    ):
        super().__init__()
        for name, p in (("p_spatial", p_spatial), ("p_intensity", p_intensity), ("p_mirror_slices", p_mirror_slices),
                        ("p_elastic", p_elastic)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if not 0.0 <= scale < 1.0:
            raise ValueError(f"scale must be in [0, 1), got {scale}")
        if elastic_alpha < 0 or elastic_sigma <= 0:
            raise ValueError(f"elastic_alpha must be >= 0 and elastic_sigma > 0 (pixels), got {elastic_alpha}, {elastic_sigma}")
        self.p_spatial, self.rotation_deg, self.scale = float(p_spatial), float(rotation_deg), float(scale)
        self.p_intensity, self.gamma, self.brightness = float(p_intensity), tuple(gamma), tuple(brightness)
        self.noise_std, self.p_mirror_slices = float(noise_std), float(p_mirror_slices)
        self.p_elastic, self.elastic_alpha, self.elastic_sigma = float(p_elastic), float(elastic_alpha), float(elastic_sigma)

    def _uniform(self, n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, device=like.device, dtype=torch.float32).uniform_(low, high)

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 4 or label.ndim != 3:
            raise ValueError(f"expected image (N, C, H, W) and label (N, H, W), got {tuple(image.shape)}, {tuple(label.shape)}")
        n = image.shape[0]
        image = image.float()
        if self.p_spatial > 0 or self.p_elastic > 0:
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
        if self.p_elastic > 0 and self.elastic_alpha > 0:
            grid = grid + self._elastic_displacement(image)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[:, 0].round().long()
        return image, label

    def _elastic_displacement(self, image: torch.Tensor) -> torch.Tensor:
        """A smooth random displacement per sample, ``(N, H, W, 2)`` in ``grid_sample``'s normalised
        ``(x, y)`` units; zero for samples not drawn (probability ``p_elastic``)."""
        n, _, h, w = image.shape
        radius = max(1, int(math.ceil(3 * self.elastic_sigma)))
        taps = torch.arange(-radius, radius + 1, device=image.device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps / self.elastic_sigma) ** 2)
        kernel = kernel / kernel.sum()
        field = torch.randn(n, 2, h, w, device=image.device)
        # separable Gaussian smoothing; replicate padding works for any slice size
        field = F.conv2d(F.pad(field, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).expand(2, 1, 1, -1),
                         groups=2)
        field = F.conv2d(F.pad(field, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).expand(2, 1, -1, 1),
                         groups=2)
        rms = field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-8)
        apply = (torch.rand(n, device=image.device) < self.p_elastic).float()
        pixels = field / rms * (self._uniform(n, 0.0, self.elastic_alpha, image) * apply)[:, None, None, None]
        # pixels -> normalised coordinates (align_corners=False: the slice spans 2 units over W or H pixels)
        pixels = pixels * torch.tensor([2.0 / w, 2.0 / h], device=image.device)[None, :, None, None]
        return pixels.permute(0, 2, 3, 1)

    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        n = image.shape[0]
        apply = (torch.rand(n, device=image.device) < self.p_intensity)[:, None, None, None]
        gamma = self._uniform(n, *self.gamma, image)[:, None, None, None]
        gain = self._uniform(n, *self.brightness, image)[:, None, None, None]
        noise = torch.randn_like(image) * self._uniform(n, 0.0, self.noise_std, image)[:, None, None, None]
        changed = image.clamp(0, 1).pow(gamma) * gain + noise
        return torch.where(apply, changed, image)
