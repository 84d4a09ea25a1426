"""The recursive 2D UNet: one :class:`UnetSkipConnectionBlock` nested ``num_downs`` times.

Plain ``torch.nn`` (no Lightning), so the deploy side can rebuild it from a model file.

Shapes: input ``(N, in_channels, H, W)`` with ``H`` and ``W`` divisible by ``2 ** num_downs``;
output logits ``(N, num_classes, H, W)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

_NORMS: dict[str, type[nn.Module]] = {
    "instance": nn.InstanceNorm2d,
    "batch": nn.BatchNorm2d,
    "none": nn.Identity,
}


def _norm(name: str, channels: int) -> nn.Module:
    if name not in _NORMS:
        raise ValueError(f"unknown norm layer {name!r}; choose one of {sorted(_NORMS)}")
    if name == "none":
        return nn.Identity()
    if name == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.BatchNorm2d(channels)


class DoubleConv(nn.Sequential):
    """Two ``kernel_size`` convolutions, each followed by the norm layer and LeakyReLU.

    ``(N, in_ch, H, W) -> (N, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, norm: str, kernel_size: int = 3, dropout: float = 0.0):
        pad = kernel_size // 2
        layers: list[nn.Module] = []
        for cin in (in_ch, out_ch):
            layers += [
                nn.Conv2d(cin, out_ch, kernel_size, padding=pad, bias=norm == "none"),
                _norm(norm, out_ch),
                nn.LeakyReLU(0.01, inplace=True),
            ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class UnetSkipConnectionBlock(nn.Module):
    """One level of the UNet, wrapping the deeper levels as ``submodule``.

    ``encode`` (DoubleConv ``in_ch -> filters``) keeps full resolution for the skip connection;
    the submodule sees the max-pooled features and returns ``2 * filters`` channels at half
    resolution; a transposed convolution brings them back up, they are concatenated with the
    skip, and ``decode`` (DoubleConv ``2 * filters -> filters``) fuses them. The innermost block
    (``submodule=None``) is the bottleneck and only encodes. The outermost block ends with a 1x1
    convolution to ``num_classes`` logits.

    Args:
        in_ch: input channels of this level.
        filters: feature channels of this level.
        submodule: the next deeper level (input ``filters`` channels, output ``2 * filters``), or
            ``None`` for the innermost level.
        num_classes: output channels of the outermost level (ignored elsewhere).
        outermost: whether this block is the top level.
    """

    def __init__(
        self,
        in_ch: int,
        filters: int,
        submodule: "UnetSkipConnectionBlock | None" = None,
        *,
        num_classes: int = 3,
        outermost: bool = False,
        norm: str = "instance",
        kernel_size: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.outermost = outermost
        self.encode = DoubleConv(in_ch, filters, norm, kernel_size, dropout if submodule is None else 0.0)
        self.submodule = submodule
        if submodule is not None:
            self.pool = nn.MaxPool2d(2)
            self.up = nn.ConvTranspose2d(2 * filters, filters, kernel_size=2, stride=2)
            self.decode = DoubleConv(2 * filters, filters, norm, kernel_size)
        self.head = nn.Conv2d(filters, num_classes, kernel_size=1) if outermost else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.encode(x)
        if self.submodule is None:
            return skip
        y = self.up(self.submodule(self.pool(skip)))
        y = self.decode(torch.cat([skip, y], dim=1))
        return self.head(y) if self.head is not None else y


class UNet(nn.Module):
    """Recursive 2D UNet.

    Args:
        in_channels: image channels per slice (1 for a single MR slice).
        num_classes: output classes (3: background, anterior, posterior).
        initial_filters: channels of the top level; level ``i`` has ``initial_filters * 2**i``.
        num_downs: number of 2x down-samplings (levels below the top).
        norm: ``"instance"``, ``"batch"`` or ``"none"``.
        kernel_size: odd convolution kernel size.
        dropout: dropout probability in the bottleneck.

    Shapes: ``(N, in_channels, H, W) -> (N, num_classes, H, W)``; ``H, W`` divisible by
    ``2 ** num_downs`` (see :attr:`size_multiple`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        initial_filters: int = 32,
        num_downs: int = 4,
        norm: str = "instance",
        kernel_size: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        if num_downs < 1:
            raise ValueError(f"num_downs must be >= 1, got {num_downs}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if norm not in _NORMS:
            raise ValueError(f"unknown norm layer {norm!r}; choose one of {sorted(_NORMS)}")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, num_classes=num_classes, initial_filters=initial_filters,
            num_downs=num_downs, norm=norm, kernel_size=kernel_size, dropout=dropout,
        )
        f = [initial_filters * 2**i for i in range(num_downs + 1)]
        block = UnetSkipConnectionBlock(f[-2], f[-1], None, norm=norm, kernel_size=kernel_size, dropout=dropout)
        for level in range(num_downs - 1, -1, -1):
            block = UnetSkipConnectionBlock(
                in_channels if level == 0 else f[level - 1], f[level], block,
                num_classes=num_classes, outermost=level == 0, norm=norm, kernel_size=kernel_size,
            )
        self.model = block

    @property
    def size_multiple(self) -> int:
        """In-plane sizes must be multiples of this (``2 ** num_downs``)."""
        return 2 ** self.config["num_downs"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x.shape, self.size_multiple)
        return self.model(x)


def check_input_shape(shape: Sequence[int], size_multiple: int) -> None:
    """Raise ``ValueError`` unless ``shape`` is ``(N, C, H, W)`` with ``H`` and ``W`` multiples of
    ``size_multiple`` (what a UNet, or its ONNX Runtime session, takes)."""
    if len(shape) != 4 or shape[-1] % size_multiple or shape[-2] % size_multiple:
        raise ValueError(f"UNet expects (N, C, H, W) with H, W divisible by {size_multiple}; got {tuple(shape)}")
