"""hippo.metrics against hand-computed values, and the Lightning-side (torchmetrics) metrics against
the same hand definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.segmentation import DiceScore

from hippo.metrics import dice, jaccard, paired_difference, summarize, volume_metrics
from hippo.model.module import SegmentationModule, soft_dice_loss

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# ---- dice / jaccard ----------------------------------------------------------------------------


def test_dice_jaccard_hand_computed() -> None:
    pred = np.zeros(10, bool)
    truth = np.zeros(10, bool)
    pred[[0, 1, 2]] = True          # 3 voxels
    truth[[1, 2, 5, 6]] = True      # 4 voxels, overlap {1, 2} = 2
    assert dice(pred, truth) == pytest.approx(4 / 7)
    assert jaccard(pred, truth) == pytest.approx(2 / 5)
    # symmetric
    assert dice(truth, pred) == pytest.approx(4 / 7)
    assert jaccard(truth, pred) == pytest.approx(2 / 5)


def test_dice_jaccard_on_3d_integer_masks() -> None:
    pred = np.zeros((2, 2, 2), np.uint8)
    truth = np.zeros((2, 2, 2), np.uint8)
    pred[0] = 1                     # 4 voxels
    truth[:, 0] = 3                 # 4 voxels (non-zero counts as True), overlap 2
    assert dice(pred, truth) == pytest.approx(0.5)
    assert jaccard(pred, truth) == pytest.approx(2 / 6)


def test_dice_jaccard_identical_and_empty() -> None:
    mask = np.array([[1, 0], [1, 1]], bool)
    empty = np.zeros((2, 2), bool)
    assert dice(mask, mask) == 1.0 and jaccard(mask, mask) == 1.0
    assert dice(empty, empty) == 1.0 and jaccard(empty, empty) == 1.0
    assert dice(mask, empty) == 0.0 and jaccard(mask, empty) == 0.0
    assert dice(empty, mask) == 0.0 and jaccard(empty, mask) == 0.0
    assert dice(mask, ~mask) == 0.0


# ---- volume_metrics ----------------------------------------------------------------------------


def _hand_example() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros(24, np.uint8)
    pred = np.zeros(24, np.uint8)
    truth[0:4] = 1        # anterior: 4 voxels
    truth[10:13] = 2      # posterior: 3 voxels
    pred[2:5] = 1         # 3 voxels, 2 shared with the true anterior
    pred[10:14] = 2       # 4 voxels, 3 shared with the true posterior
    return pred.reshape(2, 3, 4), truth.reshape(2, 3, 4)


def test_volume_metrics_hand_example() -> None:
    pred, truth = _hand_example()
    m = volume_metrics(pred, truth, spacing=(0.5, 2.0, 3.0))   # 3 mm³ per voxel
    assert set(m) == {
        "dice_anterior", "jaccard_anterior", "dice_posterior", "jaccard_posterior",
        "dice_mean", "jaccard_mean", "dice_foreground", "jaccard_foreground",
        "pred_anterior_mm3", "pred_posterior_mm3", "pred_total_mm3",
        "true_anterior_mm3", "true_posterior_mm3", "true_total_mm3",
    }
    expected = {
        "dice_anterior": 4 / 7, "jaccard_anterior": 2 / 5,
        "dice_posterior": 6 / 7, "jaccard_posterior": 3 / 4,
        "dice_mean": 5 / 7, "jaccard_mean": (2 / 5 + 3 / 4) / 2,
        # foreground: truth {0,1,2,3,10,11,12}, pred {2,3,4,10,11,12,13}, overlap 5
        "dice_foreground": 10 / 14, "jaccard_foreground": 5 / 9,
        "pred_anterior_mm3": 9.0, "pred_posterior_mm3": 12.0, "pred_total_mm3": 21.0,
        "true_anterior_mm3": 12.0, "true_posterior_mm3": 9.0, "true_total_mm3": 21.0,
    }
    assert m == pytest.approx(expected)


def test_volume_metrics_swapped_classes() -> None:
    """Anterior and posterior swapped: per-class overlap 0 but the merged foreground is perfect."""
    _, truth = _hand_example()
    swapped = np.where(truth == 1, 2, np.where(truth == 2, 1, 0)).astype(np.uint8)
    m = volume_metrics(swapped, truth)
    assert m["dice_anterior"] == 0.0 and m["dice_posterior"] == 0.0 and m["dice_mean"] == 0.0
    assert m["dice_foreground"] == 1.0 and m["jaccard_foreground"] == 1.0
    assert m["pred_total_mm3"] == m["true_total_mm3"] == 7.0
    assert m["pred_anterior_mm3"] == 3.0 and m["true_anterior_mm3"] == 4.0


def test_volume_metrics_perfect_and_missing_class() -> None:
    _, truth = _hand_example()
    m = volume_metrics(truth, truth)
    assert all(m[k] == 1.0 for k in m if k.startswith(("dice", "jaccard")))
    only_anterior = np.where(truth == 2, 0, truth).astype(np.uint8)
    m = volume_metrics(only_anterior, only_anterior)
    assert m["dice_posterior"] == 1.0                     # both empty
    m = volume_metrics(np.zeros_like(truth), truth)
    assert m["dice_anterior"] == 0.0 and m["dice_foreground"] == 0.0 and m["pred_total_mm3"] == 0.0


def test_volume_metrics_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 5\)"):
        volume_metrics(np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3, 5), np.uint8))


# ---- summarize ---------------------------------------------------------------------------------


def test_summarize_mean_std_min_max() -> None:
    rows = [{"name": "a", "dice": 1.0, "vol": 2}, {"name": "b", "dice": 3.0, "vol": 2},
            {"name": "c", "dice": 5.0, "vol": 2}]
    s = summarize(rows)
    assert s["n_volumes"] == {"count": 3}
    assert "name" not in s
    stats = {k: s["dice"][k] for k in ("mean", "std", "min", "max")}
    assert stats == pytest.approx({"mean": 3.0, "std": math.sqrt(8 / 3), "min": 1.0, "max": 5.0})
    assert s["vol"] == pytest.approx({"mean": 2.0, "std": 0.0, "min": 2.0, "max": 2.0, "ci_low": 2.0, "ci_high": 2.0})
    assert summarize(iter(rows)) == s                        # any iterable; the same interval every time
    assert summarize([]) == {"n_volumes": {"count": 0}}
    assert "ci_low" not in summarize(rows[:1])["dice"]       # one volume: no interval


def test_summarize_confidence_interval_of_the_mean() -> None:
    """The 95 % bootstrap interval brackets the mean, matches the normal-theory interval on a large
    sample, and narrows as volumes are added (what decides whether a model is above a target)."""
    rng = np.random.default_rng(1)
    values = rng.normal(0.88, 0.04, size=400)
    s = summarize([{"dice": float(v)} for v in values])["dice"]
    half = 1.96 * values.std() / math.sqrt(values.size)
    assert s["ci_low"] < s["mean"] < s["ci_high"]
    assert s["ci_low"] == pytest.approx(s["mean"] - half, abs=0.15 * half)
    assert s["ci_high"] == pytest.approx(s["mean"] + half, abs=0.15 * half)
    small = summarize([{"dice": float(v)} for v in values[:40]])["dice"]
    assert small["ci_high"] - small["ci_low"] > 2.5 * (s["ci_high"] - s["ci_low"])
    wider = summarize([{"dice": float(v)} for v in values[:40]], confidence=0.99)["dice"]
    assert wider["ci_low"] < small["ci_low"] and wider["ci_high"] > small["ci_high"]
    with pytest.raises(ValueError, match="confidence"):
        summarize([{"dice": 1.0}], confidence=95)


def test_paired_difference_matches_cases_by_name() -> None:
    """New model minus reference, case by case (whatever the order), with the count of cases each
    side wins; the paired interval excludes 0 for a small but consistent gain that the two unpaired
    intervals cannot separate."""
    rng = np.random.default_rng(3)
    base = rng.normal(0.88, 0.04, size=47)
    gain = 0.003 + rng.normal(0, 0.002, size=47)
    ref = [{"name": f"c{i}", "dice_posterior": float(b), "dice_anterior": 0.9} for i, b in enumerate(base)]
    new = [{"name": f"c{i}", "dice_posterior": float(b + g), "dice_anterior": 0.9}
           for i, b, g in reversed(list(zip(range(47), base, gain)))]
    d = paired_difference(new, ref, keys=("dice_posterior", "dice_anterior"))
    assert d["n_volumes"] == {"count": 47}
    assert d["dice_posterior"]["mean"] == pytest.approx(gain.mean())
    assert 0 < d["dice_posterior"]["ci_low"] < d["dice_posterior"]["mean"] < d["dice_posterior"]["ci_high"]
    assert d["dice_posterior"]["better"] == int((gain > 0).sum()) and d["dice_posterior"]["worse"] == int((gain < 0).sum())
    assert d["dice_anterior"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "better": 0, "worse": 0}
    unpaired_new, unpaired_ref = summarize(new)["dice_posterior"], summarize(ref)["dice_posterior"]
    assert unpaired_new["ci_low"] < unpaired_ref["ci_high"]          # unpaired: the intervals overlap
    with pytest.raises(ValueError, match="c46"):
        paired_difference(new, ref[:-1], keys=("dice_posterior",))
    with pytest.raises(ValueError, match="dice_foreground"):
        paired_difference(new, ref, keys=("dice_foreground",))


def test_summarize_of_volume_metrics() -> None:
    pred, truth = _hand_example()
    rows = [volume_metrics(pred, truth), volume_metrics(truth, truth)]
    s = summarize(rows)
    assert s["dice_anterior"]["mean"] == pytest.approx((4 / 7 + 1) / 2)
    assert s["dice_anterior"]["min"] == pytest.approx(4 / 7) and s["dice_anterior"]["max"] == 1.0


# ---- the Lightning-side metrics equal the hand definition --------------------------------------


def _module_metrics() -> tuple[DiceScore, MulticlassJaccardIndex]:
    """The metrics exactly as SegmentationModule configures them (checked against the module)."""
    module = SegmentationModule(torch.nn.Conv2d(1, 3, 1), optimizer=lambda params: None)
    dice_m, jacc_m = module.val_metrics["dice"], module.val_metrics["jaccard"]
    assert isinstance(dice_m, DiceScore) and isinstance(jacc_m, MulticlassJaccardIndex)
    assert dice_m.num_classes == 3 and dice_m.average == "none"
    assert dice_m.aggregation_level == "global" and dice_m.input_format == "index"
    assert jacc_m.num_classes == 3 and jacc_m.average == "none"
    return (DiceScore(num_classes=3, average="none", aggregation_level="global", input_format="index"),
            MulticlassJaccardIndex(num_classes=3, average="none"))


@pytest.mark.parametrize("background_share", [1 / 3, 0.9])
def test_torchmetrics_equal_hand_definition(background_share: float) -> None:
    dice_m, jacc_m = _module_metrics()
    rng = np.random.default_rng(0)
    p_fg = (1 - background_share) / 2
    preds, targets = [], []
    for _ in range(3):  # several updates, as over an epoch: global aggregation
        shape = (4, 16, 20)
        p = rng.choice(3, size=shape, p=[background_share, p_fg, p_fg])
        t = rng.choice(3, size=shape, p=[background_share, p_fg, p_fg])
        t[0, :8] = p[0, :8]  # some agreement
        dice_m.update(torch.from_numpy(p), torch.from_numpy(t))
        jacc_m.update(torch.from_numpy(p), torch.from_numpy(t))
        preds.append(p)
        targets.append(t)
    p, t = np.concatenate(preds), np.concatenate(targets)
    d, j = dice_m.compute().double().numpy(), jacc_m.compute().double().numpy()
    assert d.shape == (3,) and j.shape == (3,)
    for k in (1, 2):
        assert d[k] == pytest.approx(dice(p == k, t == k), abs=1e-6)
        assert j[k] == pytest.approx(jaccard(p == k, t == k), abs=1e-6)
    # and the foreground mean the module logs is the hand mean over classes 1 and 2
    assert d[1:].mean() == pytest.approx(np.mean([dice(p == k, t == k) for k in (1, 2)]), abs=1e-6)


def test_torchmetrics_perfect_prediction() -> None:
    dice_m, jacc_m = _module_metrics()
    t = torch.from_numpy(np.random.default_rng(1).integers(0, 3, size=(2, 8, 8)))
    dice_m.update(t, t)
    jacc_m.update(t, t)
    assert torch.allclose(dice_m.compute().float(), torch.ones(3))
    assert torch.allclose(jacc_m.compute().float(), torch.ones(3))


# ---- soft_dice_loss ----------------------------------------------------------------------------


def _target() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(2).integers(0, 3, size=(2, 16, 16)))


def test_soft_dice_loss_perfect_is_zero() -> None:
    target = _target()
    logits = 50.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-4)


def test_soft_dice_loss_completely_wrong_is_one() -> None:
    target = _target()
    wrong = (target + 1) % 3
    logits = 50.0 * F.one_hot(wrong, 3).permute(0, 3, 1, 2).float()
    loss = soft_dice_loss(logits, target).item()
    assert 0.98 < loss <= 1.0


def test_soft_dice_loss_between_and_differentiable() -> None:
    target = _target()
    logits = torch.zeros(2, 3, 16, 16, requires_grad=True)    # uniform probabilities
    loss = soft_dice_loss(logits, target)
    assert 0.2 < loss.item() < 0.8
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_soft_dice_loss_empty_foreground_predicted_empty() -> None:
    target = torch.zeros(2, 8, 8, dtype=torch.int64)
    logits = torch.zeros(2, 3, 8, 8)
    logits[:, 0] = 50.0
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-4)
