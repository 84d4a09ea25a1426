"""SliceAugmentation: label values and image/label alignment survive, the mirror only reorders
slices, and nothing changes when every probability is 0."""

from __future__ import annotations

import pytest
import torch

from hippo.data.augment import SliceAugmentation


def _batch(n: int = 16, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose intensity encodes the label (0, 0.5, 1.0) so alignment can be checked."""
    label = torch.zeros(n, 64, 64, dtype=torch.long)
    label[:, 20:40, 15:30] = 1
    label[:, 20:40, 30:50] = 2
    image = (label.float() / 2)[:, None].repeat(1, channels, 1, 1)
    image[:, 0] += 0.01                      # mark the first channel to see the mirror
    return image.clamp(0, 1), label


def _assert_transformed_and_aligned(out_image: torch.Tensor, out_label: torch.Tensor, label: torch.Tensor) -> None:
    """The labels moved, kept their values, and still follow the image: where the label says k, the
    (middle channel) intensity is k / 2."""
    assert out_label.dtype == torch.long and set(out_label.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(out_label, label)
    middle = out_image[:, 1]
    for k, value in ((1, 0.5), (2, 1.0)):
        inside = middle[out_label == k]
        assert inside.numel() > 0 and (inside - value).abs().median() < 0.05


def test_all_probabilities_zero_is_identity() -> None:
    image, label = _batch()
    aug = SliceAugmentation(p_spatial=0, p_intensity=0, p_mirror_slices=0)
    out_image, out_label = aug(image, label)
    assert torch.equal(out_image, image) and torch.equal(out_label, label)


def test_spatial_keeps_label_values_and_alignment() -> None:
    torch.manual_seed(0)
    image, label = _batch()
    aug = SliceAugmentation(p_spatial=1.0, rotation_deg=30, scale=0.2, p_intensity=0, p_mirror_slices=0)
    out_image, out_label = aug(image, label)
    assert out_image.shape == image.shape and out_label.shape == label.shape
    _assert_transformed_and_aligned(out_image, out_label, label)
    # the structure neither vanishes nor doubles: per-sample label areas stay within the zoom range
    ratio = (out_label > 0).flatten(1).sum(1).float() / (label > 0).flatten(1).sum(1).float()
    assert ((ratio > 0.6) & (ratio < 1.6)).all()


def test_mirror_reverses_slice_order_and_keeps_labels() -> None:
    torch.manual_seed(0)
    image, label = _batch(n=64)
    out_image, out_label = SliceAugmentation(p_spatial=0, p_intensity=0, p_mirror_slices=0.5)(image, label)
    assert torch.equal(out_label, label)                                 # never an in-plane flip
    mirrored = torch.tensor([torch.equal(o, i.flip(0)) for o, i in zip(out_image, image)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out_image, image)])
    assert (mirrored ^ kept).all() and 10 < int(mirrored.sum()) < 54


def test_intensity_changes_image_only_and_stays_finite() -> None:
    torch.manual_seed(0)
    image, label = _batch()
    out_image, out_label = SliceAugmentation(p_spatial=0, p_intensity=1.0, p_mirror_slices=0)(image, label)
    assert torch.equal(out_label, label) and torch.isfinite(out_image).all()
    assert not torch.allclose(out_image, image)


def test_elastic_deforms_smoothly_and_keeps_alignment() -> None:
    torch.manual_seed(0)
    image, label = _batch()
    aug = SliceAugmentation(p_spatial=0, p_intensity=0, p_mirror_slices=0, p_elastic=1.0, elastic_alpha=3, elastic_sigma=5)
    out_image, out_label = aug(image, label)
    _assert_transformed_and_aligned(out_image, out_label, label)
    # a deformation of a few pixels: the label areas barely change and most voxels keep their label
    ratio = (out_label > 0).flatten(1).sum(1).float() / (label > 0).flatten(1).sum(1).float()
    assert ((ratio > 0.8) & (ratio < 1.25)).all()
    assert (out_label == label).float().mean() > 0.85
    # the field is smooth: neighbouring pixels move together (displacement differences well under its size)
    field = aug._elastic_displacement(image)
    step = (field[:, 1:] - field[:, :-1]).abs().mean()
    assert field.abs().mean() > 0 and step < 0.2 * field.abs().mean()


def test_elastic_probability_and_zero_size_leave_samples_unchanged() -> None:
    torch.manual_seed(0)
    image, label = _batch(n=64)
    off = SliceAugmentation(p_spatial=0, p_intensity=0, p_mirror_slices=0, p_elastic=1.0, elastic_alpha=0.0)
    out_image, out_label = off(image, label)
    assert torch.allclose(out_image, image, atol=1e-5) and torch.equal(out_label, label)
    some = SliceAugmentation(p_spatial=0, p_intensity=0, p_mirror_slices=0, p_elastic=0.5, elastic_alpha=3)
    out_image, out_label = some(image, label)
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out_label, label)])
    assert 10 < int(kept.sum()) < 54


@pytest.mark.parametrize("kwargs", [{"p_spatial": 1.5}, {"p_mirror_slices": -0.1}, {"scale": 1.0},
                                    {"p_elastic": 2.0}, {"elastic_alpha": -1.0}, {"elastic_sigma": 0.0}])
def test_bad_parameters_rejected(kwargs) -> None:
    with pytest.raises(ValueError):
        SliceAugmentation(**kwargs)
