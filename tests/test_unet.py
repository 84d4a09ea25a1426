"""The recursive 2D UNet: shapes, argument checks, nesting, gradients, size; the TensorBoard grid."""

from __future__ import annotations

import pytest
import torch

from hippo.model.module import LABEL_COLOURS, make_grid_image
from hippo.model.unet import UNet, UnetSkipConnectionBlock


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    "num_downs,filters,norm,h,w",
    [
        (4, 8, "instance", 64, 64),
        (4, 4, "batch", 48, 80),
        (4, 4, "none", 80, 48),
        (3, 8, "instance", 32, 56),
        (2, 4, "batch", 20, 12),
        (1, 4, "none", 6, 10),
    ],
)
def test_output_shape(num_downs: int, filters: int, norm: str, h: int, w: int) -> None:
    torch.manual_seed(0)
    net = UNet(initial_filters=filters, num_downs=num_downs, norm=norm)
    assert net.size_multiple == 2**num_downs
    x = torch.rand(2, 1, h, w)
    y = net(x)
    assert y.shape == (2, 3, h, w) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    net.eval()
    with torch.no_grad():
        assert net(x[:1]).shape == (1, 3, h, w)


def test_channels_and_classes_and_kernel() -> None:
    net = UNet(in_channels=2, num_classes=5, initial_filters=4, num_downs=2, kernel_size=5)
    assert net(torch.rand(1, 2, 16, 16)).shape == (1, 5, 16, 16)
    assert net.model.encode[0].kernel_size == (5, 5) and net.model.encode[0].padding == (2, 2)


@pytest.mark.parametrize("h,w", [(60, 64), (64, 40), (63, 63)])
def test_indivisible_size_is_a_value_error(h: int, w: int) -> None:
    net = UNet(initial_filters=4, num_downs=4)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, h, w))


def test_wrong_rank_is_a_value_error() -> None:
    net = UNet(initial_filters=4, num_downs=2)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        net(torch.rand(1, 16, 16))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"norm": "group"}, "group"),
        ({"kernel_size": 4}, "odd"),
        ({"kernel_size": 2}, "odd"),
        ({"num_downs": 0}, "num_downs"),
        ({"num_downs": -1}, "num_downs"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNet(initial_filters=4, **kwargs)


@pytest.mark.parametrize("num_downs", [1, 2, 3, 5])
def test_recursive_nesting(num_downs: int) -> None:
    f = 4
    net = UNet(initial_filters=f, num_downs=num_downs)
    blocks = [m for m in net.modules() if isinstance(m, UnetSkipConnectionBlock)]
    assert len(blocks) == num_downs + 1
    # follow the chain of submodules from the top: each level wraps the next, doubling the filters
    chain, block = [], net.model
    while block is not None:
        chain.append(block)
        block = block.submodule
    assert chain == blocks
    for level, b in enumerate(chain):
        assert b.encode[0].out_channels == f * 2**level
        assert b.outermost == (level == 0)
        assert (b.head is not None) == (level == 0)
        assert hasattr(b, "up") == (level < num_downs)
    assert chain[0].encode[0].in_channels == 1
    assert chain[0].head.out_channels == 3


def test_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    net = UNet(initial_filters=4, num_downs=3)
    x = torch.rand(2, 1, 32, 32)
    target = torch.randint(0, 3, (2, 32, 32))
    torch.nn.functional.cross_entropy(net(x), target).backward()
    first = net.model.encode[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None, name
    # the bottleneck is reached too (the whole recursion is in the graph)
    inner = net.model
    while inner.submodule is not None:
        inner = inner.submodule
    assert inner.encode[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("num_downs", [2, 4])
def test_parameter_count_grows_about_4x_with_doubled_filters(num_downs: int) -> None:
    small = _n_params(UNet(initial_filters=8, num_downs=num_downs))
    big = _n_params(UNet(initial_filters=16, num_downs=num_downs))
    assert 3.8 < big / small <= 4.0


def test_dropout_only_in_bottleneck_and_config_kept() -> None:
    net = UNet(initial_filters=4, num_downs=2, dropout=0.3)
    drops = [m for m in net.modules() if isinstance(m, torch.nn.Dropout2d)]
    assert len(drops) == 1 and drops[0].p == 0.3
    assert net.config == dict(in_channels=1, num_classes=3, initial_filters=4, num_downs=2,
                              norm="instance", kernel_size=3, dropout=0.3)
    rebuilt = UNet(**net.config)
    assert _n_params(rebuilt) == _n_params(net)


# ---- make_grid_image ---------------------------------------------------------------------------


def test_make_grid_image_shape_range_and_content() -> None:
    torch.manual_seed(0)
    n, h, w = 3, 8, 10
    image = torch.rand(n, 1, h, w) * 3 - 1                 # outside [0, 1] on purpose
    label = torch.randint(0, 3, (n, h, w))
    logits = torch.randn(n, 3, h, w) * 5
    grid = make_grid_image(image, label, logits)
    assert grid.shape == (3, 4 * h, n * w)
    assert grid.min() >= 0.0 and grid.max() <= 1.0
    i = 1                                                  # second slice, second column of tiles
    cols = slice(i * w, (i + 1) * w)
    gray = image[i, 0].clamp(0, 1)
    for c in range(3):
        assert torch.equal(grid[c, 0:h, cols], gray)       # row 0: the input
    truth_rgb = grid[:, h:2 * h, cols].permute(1, 2, 0)    # row 1: ground truth colours
    assert torch.equal(truth_rgb, LABEL_COLOURS[label[i]])
    pred_rgb = grid[:, 2 * h:3 * h, cols].permute(1, 2, 0)  # row 2: prediction colours
    assert torch.equal(pred_rgb, LABEL_COLOURS[logits[i].argmax(0)])
    fg = 1 - torch.softmax(logits[i], 0)[0]                # row 3: foreground probability
    assert torch.allclose(grid[0, 3 * h:4 * h, cols], fg, atol=1e-6)


def test_make_grid_image_single_slice_and_extra_classes() -> None:
    grid = make_grid_image(torch.rand(1, 1, 4, 6), torch.zeros(1, 4, 6, dtype=torch.long), torch.randn(1, 5, 4, 6))
    assert grid.shape == (3, 16, 6)
    assert 0.0 <= grid.min() and grid.max() <= 1.0


# ---- deep supervision (SegmentationModule) --------------------------------------------------------


def _module(deep_supervision: int, num_downs: int = 3):
    from hippo.model.module import SegmentationModule

    torch.manual_seed(0)
    net = UNet(in_channels=1, num_classes=3, initial_filters=4, num_downs=num_downs)
    return SegmentationModule(net, optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                              deep_supervision=deep_supervision, log_images_every_n_epochs=0)


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    label[:, 8:20, 6:18], label[:, 20:26, 10:22] = 1, 2
    return {"image": label[:, None].float() / 2 + 0.1 * torch.randn(2, 1, 32, 32), "label": label}


def test_deep_supervision_trains_coarse_heads_but_leaves_the_network_and_validation_alone() -> None:
    """Two coarser levels get 1x1 heads that receive gradient in training; the exported network's
    weights and output are those of a plain UNet, and the validation loss is the full-resolution one."""
    plain, deep = _module(0), _module(2)
    assert len(plain.deep_heads) == 0 and len(deep.deep_heads) == 2
    assert [h.in_channels for h in deep.deep_heads] == [8, 16]        # the decoder filters at 1/2 and 1/4
    assert set(deep.net.state_dict()) == set(plain.net.state_dict())  # nothing added to what is exported
    batch = _batch()
    deep.train()
    loss, logits, _ = deep.model_step(batch)
    assert logits.shape == (2, 3, 32, 32) and deep._decoder_features == []
    loss.backward()
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in deep.deep_heads)
    plain.load_state_dict({k: v for k, v in deep.state_dict().items() if not k.startswith("deep_heads")})
    plain.train()
    full_only, _, _ = plain.model_step(batch)
    assert not torch.isclose(loss, full_only)                         # the coarse levels count in training
    deep.eval(), plain.eval()
    with torch.no_grad():
        v_deep, out_deep, _ = deep.model_step(batch)
        v_plain, out_plain, _ = plain.model_step(batch)
    assert torch.equal(out_deep, out_plain) and torch.isclose(v_deep, v_plain)


def test_deep_supervision_loss_is_the_weighted_mean_of_the_levels() -> None:
    """Level i weighs 2**-i; the weights are normalised, so the loss stays on the scale of one level."""
    deep = _module(2)
    deep.train()
    batch = _batch()
    loss, _, _ = deep.model_step(batch)
    deep._decoder_features = []
    with torch.no_grad():
        full = deep._loss(deep(batch["image"]), batch["label"])
        feats = deep._decoder_features[::-1]
        deep._decoder_features = []
        parts = [deep._loss(h(f), batch["label"][:, s // 2::s, s // 2::s])
                 for h, f, s in zip(deep.deep_heads, feats, (2, 4))]
    expected = (full + 0.5 * parts[0] + 0.25 * parts[1]) / 1.75
    assert torch.isclose(loss.detach(), expected, rtol=1e-5)


def test_deep_supervision_deeper_than_the_network_is_refused() -> None:
    with pytest.raises(ValueError, match="num_downs > 3"):
        _module(3, num_downs=3)
    with pytest.raises(ValueError, match=">= 0"):
        _module(-1)
