"""The model file and InferenceAgent: round trip, load errors, whole-volume segmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import hippo
from hippo.preprocessing import LABEL_NAMES, normalize_minmax
from hippo.infer import MODEL_FORMAT, InferenceAgent, load_model_file, save_model_file
from hippo.model.slicewise import segment_slices
from hippo.model.unet import UNet

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PREPROCESSING = {"normalization": "minmax_per_volume", "slice_axis": 0, "patch_size": (64, 64)}


def _net(seed: int = 0, norm: str = "instance") -> UNet:
    torch.manual_seed(seed)
    net = UNet(initial_filters=4, num_downs=2, norm=norm)
    # a random net tends to predict one class everywhere; zero the head's biases and enlarge its
    # weights so that several classes occur and the label comparisons below are meaningful
    with torch.no_grad():
        net.model.head.weight.mul_(8.0)
        net.model.head.bias.zero_()
    return net.eval()


def _volume(shape=(35, 51, 35), seed: int = 0) -> np.ndarray:
    """Integer-valued float32 intensities with smooth structure (exact under scaling by 1000)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    smooth = np.sin(grid[0] / 3.0) + np.cos(grid[1] / 4.0) * np.sin(grid[2] / 5.0)
    vol = 1000.0 * (smooth - smooth.min()) + rng.integers(0, 300, size=shape)
    return np.rint(vol).astype(np.float32)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "sub" / "model.pt"
    save_model_file(path, _net(), preprocessing=PREPROCESSING,
                    metrics={"dice_mean": np.float64(0.8), "per_class": (0.7, 0.9)},
                    training={"epochs": np.int64(3), "data": Path("/data/x")})
    return path


@pytest.fixture(scope="module")
def agent(model_file: Path) -> InferenceAgent:
    return InferenceAgent.from_file(model_file)


# ---- model file --------------------------------------------------------------------------------


def test_model_file_is_weights_only_loadable(model_file: Path) -> None:
    payload = torch.load(model_file, map_location="cpu", weights_only=True)
    assert payload["format"] == MODEL_FORMAT == "hippo-model/1"
    assert payload["hippo_version"] == hippo.__version__
    assert payload["net"] == {"class": "hippo.model.unet.UNet", "config": _net().config}
    assert payload["preprocessing"] == {"normalization": "minmax_per_volume", "slice_axis": 0,
                                        "patch_size": [64, 64]}
    assert payload["labels"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert payload["metrics"] == {"dice_mean": 0.8, "per_class": [0.7, 0.9]}
    assert type(payload["metrics"]["dice_mean"]) is float
    assert payload["training"] == {"epochs": 3, "data": "/data/x"}
    reference = _net().state_dict()
    assert payload["state_dict"].keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(payload["state_dict"][k], v), k
    assert not list(model_file.parent.glob(".*.tmp"))  # atomic write left no temporary file


def test_round_trip_same_outputs_and_metadata(agent: InferenceAgent, model_file: Path) -> None:
    net = _net()
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(agent.net(x), net(x))
    assert not agent.net.training
    volume = _volume((20, 30, 25))
    direct = InferenceAgent(net, PREPROCESSING).segment(volume)
    np.testing.assert_array_equal(agent.segment(volume), direct)
    assert agent.labels == LABEL_NAMES == {0: "background", 1: "anterior", 2: "posterior"}
    assert agent.preprocessing == {"normalization": "minmax_per_volume", "slice_axis": 0, "patch_size": [64, 64]}
    assert agent.slice_axis == 0
    meta = agent.metadata
    assert meta["format"] == MODEL_FORMAT
    assert meta["hippo_version"] == hippo.__version__
    assert meta["metrics"] == {"dice_mean": 0.8, "per_class": [0.7, 0.9]}
    assert meta["labels"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert meta["preprocessing"] == agent.preprocessing
    assert meta["training"]["epochs"] == 3
    assert meta["path"] == str(model_file)
    assert "state_dict" not in meta and "created" in meta


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        InferenceAgent.from_file(missing)


@pytest.mark.parametrize("content", ["plain_dict", "other_format", "tensor"])
def test_load_non_model_torch_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / f"{content}.pt"
    obj = {"plain_dict": {"state_dict": {"w": torch.zeros(2)}},
           "other_format": {"format": "hippo-model/99"},
           "tensor": torch.zeros(3)}[content]
    torch.save(obj, path)
    with pytest.raises(ValueError, match="expected model format") as info:
        InferenceAgent.from_file(path)
    assert str(path) in str(info.value)


def test_load_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01 definitely not a torch file" * 10)
    with pytest.raises(ValueError, match="not a readable hippo model file") as info:
        InferenceAgent.from_file(path)
    assert str(path) in str(info.value)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_load_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": MODEL_FORMAT, "x": _Evil()}, path)
    with pytest.raises(ValueError, match=str(path)):
        load_model_file(path)


# ---- InferenceAgent.segment --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(35, 51, 35), (20, 70, 90), (10, 13, 17), (3, 64, 64)])
def test_segment_any_shape(agent: InferenceAgent, shape: tuple[int, int, int]) -> None:
    labels = agent.segment(_volume(shape))
    assert labels.shape == shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}


def test_segment_is_the_network_on_min_max_slices_computed_by_hand(agent: InferenceAgent) -> None:
    """What the file's preprocessing says, done here without hippo's helpers: min-max to [0, 1] over
    the whole volume, each slice along axis 0 zero-padded in the centre to the 64 x 64 patch, the
    network, the argmax, the padding cut off again."""
    volume = _volume((35, 50, 36))
    labels = agent.segment(volume)
    unit = ((volume - volume.min()) / (volume.max() - volume.min())).astype(np.float32)
    padded = np.pad(unit, ((0, 0), (7, 7), (14, 14)))           # 50 -> 64, 36 -> 64
    with torch.no_grad():
        logits = agent.net(torch.from_numpy(padded[:, None]))
    by_hand = logits.argmax(1).numpy()[:, 7:57, 14:50]
    counts = np.bincount(by_hand.ravel(), minlength=3)
    assert (counts > 0.01 * by_hand.size).all(), counts       # every class occurs: the comparison means something
    assert (labels == by_hand).mean() > 0.999                  # float rounding may flip a tie, nothing more


@pytest.mark.parametrize("norm", ["instance", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_segment_is_invariant_to_intensity_scale(norm: str, dtype) -> None:
    agent = InferenceAgent(_net(norm=norm), PREPROCESSING)
    x = _volume().astype(dtype)
    labels, probs = agent.segment(x, return_probabilities=True)
    labels_big, probs_big = agent.segment(1000 * x, return_probabilities=True)
    assert len(np.unique(labels)) >= 2
    np.testing.assert_array_equal(labels, labels_big)
    np.testing.assert_allclose(probs, probs_big, atol=1e-6)
    np.testing.assert_array_equal(agent.segment(x + 300), labels)    # offsets are removed as well
    if norm == "none":
        # without normalisation layers the net itself is not scale invariant: the invariance above
        # comes from the per-volume normalisation of segment()
        unit = normalize_minmax(x)
        raw = segment_slices(agent.net, unit, size_multiple=4)
        raw_big = segment_slices(agent.net, 1000 * unit, size_multiple=4)
        assert (raw != raw_big).mean() > 0.01


def test_segment_uint8_equals_float(agent: InferenceAgent) -> None:
    x = np.clip(_volume() / 10, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(agent.segment(x), agent.segment(x.astype(np.float32)))


@pytest.mark.parametrize("axis", [1, 2])
def test_segment_slice_axis(agent: InferenceAgent, axis: int) -> None:
    volume = _volume((12, 20, 16))
    other = InferenceAgent(agent.net, {**PREPROCESSING, "slice_axis": axis})
    assert other.slice_axis == axis
    labels, probs = other.segment(volume, return_probabilities=True)
    assert labels.shape == volume.shape and probs.shape == (3, *volume.shape)
    # slicing along `axis` == slicing along 0 of the volume with `axis` moved to the front
    ref_labels, ref_probs = agent.segment(np.moveaxis(volume, axis, 0), return_probabilities=True)
    np.testing.assert_array_equal(labels, np.moveaxis(ref_labels, 0, axis))
    np.testing.assert_allclose(probs, np.moveaxis(ref_probs, 1, axis + 1), atol=1e-6)
    assert not np.array_equal(labels, agent.segment(volume))   # the axis does matter


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_segment_non_finite_raises(agent: InferenceAgent, bad: float) -> None:
    volume = _volume((10, 13, 17))
    volume[2, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        agent.segment(volume)


def test_segment_wrong_rank_raises(agent: InferenceAgent) -> None:
    with pytest.raises(ValueError, match="3D"):
        agent.segment(np.zeros((10, 13), np.float32))


def test_return_probabilities(agent: InferenceAgent) -> None:
    shape = (10, 13, 17)
    labels, probs = agent.segment(_volume(shape), return_probabilities=True)
    assert probs.shape == (3, *shape) and probs.dtype == np.float32
    assert (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), labels)


def test_unsupported_normalization() -> None:
    with pytest.raises(ValueError, match="zscore"):
        InferenceAgent(_net(), {**PREPROCESSING, "normalization": "zscore"})


# ---- segment_slices ----------------------------------------------------------------------------


def test_segment_slices_equals_manual_pipeline(agent: InferenceAgent) -> None:
    net = agent.net
    image = normalize_minmax(_volume((7, 30, 70)))
    labels = segment_slices(net, image, size_multiple=4, min_size=(64, 64))
    # by hand: H 30 -> 64 (17 before, 17 after), W 70 -> 72 (1 before, 1 after)
    padded = np.pad(image, ((0, 0), (17, 17), (1, 1)))
    assert padded.shape == (7, 64, 72)
    with torch.no_grad():
        logits = net(torch.from_numpy(padded[:, None]))
    manual = logits.argmax(1).numpy()[:, 17:47, 1:71].astype(np.uint8)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, manual)
    # batching over slices does not change the result
    small_batches, probs = segment_slices(net, image, size_multiple=4, batch_size=3, return_probabilities=True)
    np.testing.assert_allclose(probs, torch.softmax(logits, 1).numpy()[:, :, 17:47, 1:71].transpose(1, 0, 2, 3),
                               atol=1e-5)
    assert (small_batches == labels).mean() > 0.999


def test_segment_slices_rejects_2d() -> None:
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        segment_slices(_net(), np.zeros((64, 64), np.float32), size_multiple=4)


# ---- 2.5D context and post-processing ----------------------------------------------------------


def test_keep_largest_component_removes_islands_only() -> None:
    from hippo.model.slicewise import keep_largest_component

    labels = np.zeros((12, 12, 12), np.uint8)
    labels[2:7, 2:7, 2:5] = 1            # main structure: anterior and posterior touching
    labels[2:7, 2:7, 5:8] = 2
    labels[10:12, 10:12, 10:12] = 2      # a separate island
    out = keep_largest_component(labels)
    assert out[10:, 10:, 10:].sum() == 0
    np.testing.assert_array_equal(out[:9], labels[:9])
    assert labels[10, 10, 10] == 2       # input untouched
    np.testing.assert_array_equal(keep_largest_component(np.zeros((3, 3, 3), np.uint8)), 0)


def test_context_model_round_trip_applies_context_and_postprocessing(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = UNet(in_channels=3, initial_filters=4, num_downs=2).eval()
    with torch.no_grad():
        net.model.head.weight.mul_(8.0)
    pre = {**PREPROCESSING, "context_slices": 1}
    path = save_model_file(tmp_path / "m.pt", net, preprocessing=pre, postprocessing={"largest_component": True})
    agent = InferenceAgent.from_file(path)
    assert agent.context_slices == 1 and agent.postprocessing == {"largest_component": True}
    volume = _volume((20, 30, 25))
    labels = agent.segment(volume)
    image = normalize_minmax(volume)
    expected = segment_slices(net, image, size_multiple=net.size_multiple, context=1, largest_component=True)
    np.testing.assert_array_equal(labels, expected)
    with pytest.raises(ValueError, match="3 input channels but context_slices=0"):
        InferenceAgent(net, PREPROCESSING)


def test_agent_applies_the_model_files_normalisation(tmp_path: Path) -> None:
    from hippo.preprocessing import normalize_percentile

    net = _net()
    path = save_model_file(tmp_path / "p.pt", net, preprocessing={**PREPROCESSING, "normalization": "percentile_per_volume"})
    volume = _volume((12, 30, 30))
    volume[0, 0, 0] = 1e7                                    # one bright voxel: min-max would differ
    expected = segment_slices(net, normalize_percentile(volume), size_multiple=net.size_multiple)
    np.testing.assert_array_equal(InferenceAgent.from_file(path).segment(volume), expected)
    bad = save_model_file(tmp_path / "bad.pt", net, preprocessing={**PREPROCESSING, "normalization": "zscore"})
    with pytest.raises(ValueError, match="unsupported normalization 'zscore'"):
        InferenceAgent.from_file(bad)


def test_ensemble_file_averages_members_across_slicing_axes(tmp_path: Path) -> None:
    from hippo.infer import save_ensemble_file

    a, b = _net(seed=1), _net(seed=2)
    pre_a = PREPROCESSING
    pre_b = {**PREPROCESSING, "slice_axis": 2, "normalization": "percentile_per_volume"}
    path = save_ensemble_file(tmp_path / "ens.pt", [(a, pre_a), (b, pre_b)], weight_format="float16",
                              postprocessing={"largest_component": False}, metrics={"dice_mean": 0.9})
    stored = load_model_file(path)["members"]
    assert all(v.dtype == torch.float16 for m in stored for v in m["state_dict"].values() if v.is_floating_point())
    agent = InferenceAgent.from_file(path)
    assert agent.metadata["n_members"] == 2 and len(agent.members) == 2
    volume = _volume((14, 22, 18))
    labels, probs = agent.segment(volume, return_probabilities=True)
    # the same members rebuilt in float32 from float16 weights, run one by one, averaged by hand
    members = [InferenceAgent(net, pre) for net, pre in agent.members]
    by_hand = sum(m.segment(volume, return_probabilities=True)[1] for m in members) / 2
    np.testing.assert_allclose(probs, by_hand, atol=1e-6)
    np.testing.assert_array_equal(labels, by_hand.argmax(0))
    assert probs.shape == (3, *volume.shape)
    # float16 storage changes the weights by at most fp16 rounding
    for (k, v) in a.state_dict().items():
        if v.is_floating_point():
            np.testing.assert_allclose(agent.members[0][0].state_dict()[k].numpy(), v.numpy(), rtol=1e-3, atol=1e-4)


def test_int8_ensemble_file_is_smaller_and_runs_close_to_float32(tmp_path: Path) -> None:
    """int8 kernels with per-output-channel scales: about a quarter of float32's bytes, weights
    within half a quantisation step, and probabilities close to the float32 network's."""
    from hippo.infer import save_ensemble_file

    net = _net(seed=3)
    f32 = save_ensemble_file(tmp_path / "f32.pt", [(net, PREPROCESSING)], weight_format="float32")
    q8 = save_ensemble_file(tmp_path / "q8.pt", [(net, PREPROCESSING)], weight_format="int8")
    stored = load_model_file(q8)["members"][0]

    def nbytes(m):
        return sum(t.numel() * t.element_size() for part in ("state_dict", "weight_scales")
                   for t in m.get(part, {}).values())

    assert nbytes(stored) < 0.3 * nbytes(load_model_file(f32)["members"][0])
    kernels = [k for k, v in net.state_dict().items() if v.is_floating_point() and v.ndim >= 2]
    assert kernels and set(stored["weight_scales"]) == set(kernels)
    assert all(stored["state_dict"][k].dtype == torch.int8 for k in kernels)
    agent = InferenceAgent.from_file(q8)
    rebuilt = agent.members[0][0].state_dict()
    for k in kernels:
        step = stored["weight_scales"][k].view(-1, *[1] * (net.state_dict()[k].ndim - 1))
        assert ((rebuilt[k] - net.state_dict()[k]).abs() <= step / 2 + 1e-7).all(), k
    volume = _volume((10, 24, 20))
    l_q8, p_q8 = agent.segment(volume, return_probabilities=True)
    l_f32, p_f32 = InferenceAgent.from_file(f32).segment(volume, return_probabilities=True)
    assert np.abs(p_q8 - p_f32).mean() < 0.01 and (l_q8 == l_f32).mean() > 0.95
    # the payload in memory (publish evaluates it before writing) runs exactly as the file written from it
    from hippo.infer import ensemble_payload, write_model_payload

    payload = ensemble_payload([(net, PREPROCESSING)], weight_format="int8")
    l_mem, p_mem = InferenceAgent.from_payload(payload).segment(volume, return_probabilities=True)
    np.testing.assert_array_equal(p_mem, p_q8)
    payload["metrics"] = {"dice_mean": 0.5}
    written = write_model_payload(tmp_path / "once.pt", payload)
    assert load_model_file(written)["metrics"] == {"dice_mean": 0.5}
    np.testing.assert_array_equal(InferenceAgent.from_file(written).segment(volume, return_probabilities=True)[1], p_q8)
    with pytest.raises(ValueError, match="weight_format"):
        save_ensemble_file(tmp_path / "x.pt", [(net, PREPROCESSING)], weight_format="int4")


def test_bfloat16_precision_runs_the_members_under_autocast_and_matches_float32(tmp_path: Path) -> None:
    """precision="bfloat16" (deploy/eval/listen ``precision``) changes how the networks compute, not
    what the agent returns: float32 probabilities close to float32's, the same labels almost everywhere."""
    from hippo.infer import save_ensemble_file

    path = save_ensemble_file(tmp_path / "m.pt", [(_net(seed=5), PREPROCESSING), (_net(seed=6), PREPROCESSING)],
                              weight_format="float32")
    volume = _volume((12, 24, 20))
    l32, p32 = InferenceAgent.from_file(path).segment(volume, return_probabilities=True)
    agent = InferenceAgent.from_file(path, precision="bfloat16")
    assert agent.precision == "bfloat16"
    l16, p16 = agent.segment(volume, return_probabilities=True)
    assert p16.dtype == np.float32 and p16.shape == p32.shape
    assert not np.array_equal(p16, p32)                       # it did run in bfloat16
    assert np.abs(p16 - p32).mean() < 0.01 and (l16 == l32).mean() > 0.95
    with pytest.raises(ValueError, match="precision"):
        InferenceAgent.from_file(path, precision="float8")


def test_model_file_without_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save({"format": MODEL_FORMAT, "members": []}, path)
    with pytest.raises(ValueError, match="members list"):
        load_model_file(path)


def test_deploy_listen_and_eval_read_one_inference_group():
    """model_path, device, batch_size and precision come from conf/inference/default.yaml for all
    three commands (one set of defaults), read once into InferenceSettings; overrides keep their
    top-level names."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from hippo.config import config_dir
    from hippo.infer import InferenceSettings

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        read = {name: InferenceSettings.from_config(OmegaConf.to_container(
                    compose(config_name=name), resolve=False))
                for name in ("deploy", "listen", "eval")}
        tuned = InferenceSettings.from_config(OmegaConf.to_container(
            compose(config_name="deploy", overrides=["precision=bfloat16", "model_path=/m.pt"]), resolve=False))
    assert read["deploy"] == read["listen"] == read["eval"] == InferenceSettings(None, "cpu", 64, "auto", "auto")
    assert (tuned.precision, tuned.model_path) == ("bfloat16", "/m.pt")
    with pytest.raises(KeyError, match="inference"):
        InferenceSettings.from_config({"device": "cpu"})
    with pytest.raises(ValueError, match="precision"):
        InferenceSettings.from_config({"model_path": None, "device": "cpu", "batch_size": 1, "precision": "fp8",
                                       "backend": "auto"})
    with pytest.raises(ValueError, match="backend"):
        InferenceSettings.from_config({"model_path": None, "device": "cpu", "batch_size": 1, "precision": "auto",
                                       "backend": "tensorrt"})


def test_auto_precision_runs_bfloat16_only_where_the_hardware_has_it() -> None:
    """precision="auto" (the default of conf/inference) must never pick emulated bfloat16: on a CPU
    without oneDNN bfloat16 kernels it is tens of times slower than float32."""
    from hippo.infer import resolve_precision

    native_cpu = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_precision("auto", "cpu") == ("bfloat16" if native_cpu else "float32")
    assert resolve_precision("float32", "cpu") == "float32" and resolve_precision("bfloat16", "cpu") == "bfloat16"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "cuda") == "float32"
    with pytest.raises(ValueError, match="float16"):
        resolve_precision("float16", "cpu")
    net = UNet(in_channels=1, num_classes=3, initial_filters=4, num_downs=2)
    agent = InferenceAgent(net, {"normalization": "minmax_per_volume", "context_slices": 0}, precision="auto")
    assert agent.precision == resolve_precision("auto", "cpu")  # what runs, as recorded in result.json
