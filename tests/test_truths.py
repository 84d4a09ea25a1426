"""The independent overlap figures of :mod:`truths` (used by the model-quality tests) on cases whose
values are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from truths import overlap


def test_overlap_of_shifted_boxes_has_the_values_worked_out_by_hand() -> None:
    truth = np.zeros((6, 6, 6), np.uint8)
    pred = np.zeros_like(truth)
    truth[1:3, 1:3, 1:3] = 1          # 8 voxels
    pred[2:4, 1:3, 1:3] = 1           # 8 voxels, 4 shared: Dice 8/16, Jaccard 4/12
    truth[4:6, 4:6, 4:5] = 2          # 4 voxels, predicted as anterior: posterior Dice 0
    pred[4:6, 4:6, 4:5] = 1
    got = overlap(pred, truth)
    assert got["dice_anterior"] == pytest.approx(2 * 4 / (12 + 8))   # pred anterior 12 voxels, 4 shared
    assert got["dice_posterior"] == 0.0
    assert got["dice_foreground"] == pytest.approx(2 * 8 / (12 + 12))
    assert got["jaccard_mean"] == pytest.approx((4 / 16 + 0.0) / 2)
    same = overlap(truth, truth)
    assert same == {"dice_anterior": 1.0, "dice_posterior": 1.0, "dice_foreground": 1.0, "jaccard_mean": 1.0}
    empty = np.zeros((2, 2, 2), np.uint8)
    assert overlap(empty, empty)["dice_posterior"] == 1.0           # both empty: agreement, by convention
