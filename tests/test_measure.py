"""hippo.measure: volumes in mm³, DICOM ages, and no unverified normative comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

import re
from pathlib import Path

import hippo.measure
from hippo.measure import NO_NORMATIVE_REFERENCE, measure_volumes, parse_age


def _mask() -> np.ndarray:
    mask = np.zeros((6, 7, 8), dtype=np.uint8)
    mask[1:3, 2:5, 1:5] = 1  # 2*3*4 = 24 anterior voxels
    mask[3:6, 2:4, 4:8] = 2  # 3*2*4 = 24 posterior voxels
    mask[0, 0, 0] = 2  # + 1 -> 25
    return mask


def test_volumes_anisotropic_spacing_match_hand_count():
    vols = measure_volumes(_mask(), (0.5, 1.25, 2.0))
    assert (vols.anterior_voxels, vols.posterior_voxels, vols.total_voxels) == (24, 25, 49)
    assert vols.voxel_volume_mm3 == pytest.approx(1.25)
    assert vols.anterior_mm3 == pytest.approx(30.0)
    assert vols.posterior_mm3 == pytest.approx(31.25)
    assert vols.total_mm3 == pytest.approx(61.25)
    assert vols.total_ml == pytest.approx(0.06125)
    d = vols.as_dict()
    assert d["total_mm3"] == pytest.approx(61.25) and d["spacing_mm"] == [0.5, 1.25, 2.0]
    assert d["anterior_voxels"] == 24 and d["posterior_ml"] == pytest.approx(0.03125)


def test_volumes_accept_bool_int_and_integer_floats():
    assert measure_volumes(_mask().astype(np.int64), (1, 1, 1)).total_voxels == 49
    assert measure_volumes(_mask().astype(np.float32), (1, 1, 1)).total_voxels == 49
    assert measure_volumes(np.ones((2, 2, 2), bool), (1, 1, 1)).anterior_voxels == 8
    empty = measure_volumes(np.zeros((3, 3, 3), np.uint8), (1, 1, 1))
    assert empty.total_mm3 == 0.0


@pytest.mark.parametrize("mask, match", [
    (np.full((2, 2, 2), 3, np.uint8), r"\[3\]"),
    (np.full((2, 2, 2), -1, np.int16), r"\[-1\]"),
    (np.full((2, 2, 2), 0.5, np.float32), "non-integer"),
    (np.full((2, 2, 2), np.nan, np.float32), "NaN"),
    (np.zeros((4, 4), np.uint8), "3D"),
    (np.array([["a"]]), "3D"),
])
def test_invalid_masks_raise(mask, match):
    with pytest.raises(ValueError, match=match):
        measure_volumes(mask, (1, 1, 1))


@pytest.mark.parametrize("spacing", [(1, 1), (1, 1, 0), (1, -1, 1), (1, math.nan, 1), (1, math.inf, 1), "abc"])
def test_invalid_spacing_raises(spacing):
    with pytest.raises(ValueError, match="spacing"):
        measure_volumes(_mask(), spacing)


@pytest.mark.parametrize("text, years", [
    ("072Y", 72.0), ("72Y", 72.0), (" 072Y ", 72.0), ("072y", 72.0), ("006M", 0.5),
    ("012W", 12 * 7 / 365.25), ("100D", 100 / 365.25), (b"065Y", 65.0), (64, 64.0), (63.5, 63.5),
    (None, None), ("", None), ("   ", None),
])
def test_parse_age(text, years):
    got = parse_age(text)
    assert got == pytest.approx(years) if years is not None else got is None


@pytest.mark.parametrize("bad", ["72", "Y072", "07.2Y", "0072Y", "072X", -3, math.nan])
def test_parse_age_rejects_malformed(bad):
    with pytest.raises(ValueError):
        parse_age(bad)


def test_no_normative_reference_is_offered():
    assert NO_NORMATIVE_REFERENCE == "No verified normative reference"
    for name in ("NORM_TABLE", "normative_range", "percentile_band", "compare", "NormRange"):
        assert not hasattr(hippo.measure, name), name


def test_no_normative_numbers_in_the_package():
    """No percentile table or band code anywhere in src/hippo: a norm needs a checked source first."""
    src = Path(hippo.measure.__file__).parent
    pattern = re.compile(r"NORM_TABLE|p50_mm3|percentile_band|normative_range|Nobis|UK Biobank")
    hits = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []
