"""ONNX Runtime runs the same networks as torch: the graph written from a UNet's modules gives
torch's logits, the agent picks it only where it can run, and the shipped ensemble segments the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hippo.infer import InferenceAgent, resolve_backend
from hippo.model.onnx_runtime import OnnxUNet, available, unet_graph
from hippo.model.unet import UNet

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _randomised(net: UNet, seed: int) -> UNet:
    """Non-trivial norm parameters and running statistics (fresh ones are 1 and 0), so that a norm
    written with the wrong inputs or epsilon shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.InstanceNorm2d, torch.nn.BatchNorm2d)) and module.affine:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.3)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.2)
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
    return net.eval()


@pytest.mark.parametrize("config", [
    dict(in_channels=1, initial_filters=8, num_downs=2, norm="instance"),
    dict(in_channels=5, initial_filters=6, num_downs=3, norm="instance", dropout=0.3),
    dict(in_channels=3, initial_filters=4, num_downs=2, norm="batch", kernel_size=5),
    dict(in_channels=1, initial_filters=4, num_downs=1, norm="none", num_classes=2),
])
def test_graph_gives_the_networks_logits(config: dict) -> None:
    """Every layer kind UNet builds (both norms and none, 3x3 and 5x5 kernels, dropout, any depth,
    channel count and class count), on a batch of non-square slices."""
    torch.manual_seed(0)
    net = _randomised(UNet(**config), seed=1)
    x = torch.rand(3, config["in_channels"], 32, 48)
    with torch.inference_mode():
        expected = net(x)
        got = OnnxUNet(net, threads=1)(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-4 * max(1.0, scale)


def test_graph_refuses_what_unet_does_not_take() -> None:
    net = UNet(initial_filters=4, num_downs=2)
    runner = OnnxUNet(net, threads=1)
    with pytest.raises(ValueError, match="divisible by 4"):
        runner(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match="divisible"):
        runner(torch.rand(1, 30, 32))
    net.model.encode[0] = torch.nn.Conv2d(1, 4, 3, padding=2, dilation=2, bias=False)
    with pytest.raises(ValueError, match="dilated"):
        unet_graph(net)


def test_auto_backend_is_onnxruntime_only_where_it_runs() -> None:
    assert available()
    assert resolve_backend("auto", "cpu", "float32") == "onnxruntime"
    assert resolve_backend("auto", "cpu", "bfloat16") == "torch"    # autocast is torch's
    assert resolve_backend("auto", "cuda", "float32") == "torch"
    assert resolve_backend("torch", "cpu", "float32") == "torch"
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_backend("onnxruntime", "cpu", "bfloat16")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("tvm", "cpu", "float32")


@pytest.fixture(scope="module")
def shipped_agents() -> tuple[InferenceAgent, InferenceAgent]:
    from hippo.weights import default_model_path

    path = default_model_path()
    return (InferenceAgent.from_file(path, precision="float32", backend="onnxruntime"),
            InferenceAgent.from_file(path, precision="float32", backend="torch"))


def test_shipped_ensemble_segments_the_same_on_either_backend(shipped_agents) -> None:
    """The five members of the shipped model on the left hippocampus crop of the shipped MNI template
    (as the whole-head path cuts it): the same labels (but for voxels at a tie) and probabilities
    within float32 rounding."""
    from hippo.wholehead.crops import crop_geometry, sample_crop
    from hippo.wholehead.template import HIPPOCAMPUS_CENTROIDS_MNI, load_template

    ort_agent, torch_agent = shipped_agents
    assert (ort_agent.backend, torch_agent.backend) == ("onnxruntime", "torch")
    template = load_template()
    image, _ = sample_crop(template.array, template.affine,
                           crop_geometry(np.eye(3), np.asarray(HIPPOCAMPUS_CENTROIDS_MNI["left"]), "left"))
    labels_o, probs_o = ort_agent.segment(image, return_probabilities=True)
    labels_t, probs_t = torch_agent.segment(image, return_probabilities=True)
    assert int((labels_t > 0).sum()) > 500                     # the crop holds a segmented structure
    assert float(np.abs(probs_o - probs_t).max()) < 1e-3
    assert float((labels_o != labels_t).mean()) < 1e-4


def test_subset_shares_the_sessions(shipped_agents) -> None:
    """The localisation pass's lighter agent reuses the ensemble's sessions (none built again)."""
    from hippo.wholehead.segment import locator_agent

    agent, _ = shipped_agents
    light = locator_agent(agent)
    assert 1 < len(light.members) < len(agent.members)
    assert all(any(r is s for s in agent._runners) for r in light._runners)
    assert light.backend == "onnxruntime" and light.precision == agent.precision


def test_concurrent_calls_get_their_share_of_the_threads(shipped_agents) -> None:
    """An agent for two callers at once runs each member on half the threads, shares those sessions
    with its subsets (the locator), gives the same probabilities, and is refused where torch runs
    the networks (its thread count is process-wide) or one thread is all there is."""
    from hippo.wholehead.crops import crop_geometry, sample_crop
    from hippo.wholehead.segment import locator_agent
    from hippo.wholehead.template import HIPPOCAMPUS_CENTROIDS_MNI, load_template

    agent, torch_agent = shipped_agents
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert agent.for_concurrent_calls(2) is None
        torch.set_num_threads(2)
        assert agent.for_concurrent_calls(1) is None and torch_agent.for_concurrent_calls(2) is None
        both = agent.for_concurrent_calls(2)
        assert both is not None and len(both.members) == len(agent.members)
        assert [r.session.get_session_options().intra_op_num_threads for r in both._runners] == [1] * 5
        assert all(not any(r is s for s in agent._runners) for r in both._runners)
        again = agent.for_concurrent_calls(2)
        assert all(r is s for r, s in zip(again._runners, both._runners))  # built once
        light = locator_agent(both)
        assert all(any(r is s for s in both._runners) for r in light._runners)
        template = load_template()
        image, _ = sample_crop(template.array, template.affine,
                               crop_geometry(np.eye(3), np.asarray(HIPPOCAMPUS_CENTROIDS_MNI["left"]), "left"))
        labels_a, probs_a = agent.segment(image, return_probabilities=True)
        labels_b, probs_b = both.segment(image, return_probabilities=True)
        assert float(np.abs(probs_a - probs_b).max()) < 1e-5 and (labels_a == labels_b).all()
    finally:
        torch.set_num_threads(before)
