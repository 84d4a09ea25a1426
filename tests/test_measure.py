"""hippo.measure: volumes in mm³, DICOM ages, the indicative normative comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hippo.measure import (
    BAND_50_95, BAND_5_50, BAND_ABOVE_95, BAND_BELOW_5, NORM_TABLE, NormRange, Volumes, compare,
    measure_volumes, normative_range, parse_age, percentile_band,
)


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


def test_norm_table_is_coherent_and_rounded():
    assert len(NORM_TABLE) == 7 * 4
    for row in NORM_TABLE:
        assert row.p5_mm3 < row.p50_mm3 < row.p95_mm3
        assert all(v % 10 == 0 for v in (row.p5_mm3, row.p50_mm3, row.p95_mm3))
    # medians decline with age within each sex / hemisphere
    for sex in "MF":
        for hemi in ("left", "right"):
            medians = [r.p50_mm3 for r in NORM_TABLE if r.sex == sex and r.hemisphere == hemi]
            assert medians == sorted(medians, reverse=True)


def test_normative_range_lookup_and_none_cases():
    nr = normative_range(72, "F", "left")
    assert isinstance(nr, NormRange)
    assert (nr.age_lo, nr.age_hi, nr.sex, nr.hemisphere) == (70, 75, "F", "left")
    assert "Nobis" in nr.source and "101904" in nr.source
    assert "indicative" in nr.caveat.lower() and "FIRST" in nr.caveat
    both = normative_range(72, "female")
    assert both.hemisphere == "mean of left and right"
    assert nr.p50_mm3 < both.p50_mm3 < normative_range(72, "F", "right").p50_mm3
    assert both.p50_mm3 % 10 == 0
    assert normative_range(80, "M") is not None and normative_range(45, "M") is not None
    assert normative_range(44.9, "M") is None and normative_range(80.5, "M") is None
    assert normative_range(None, "M") is None and normative_range(60, None) is None
    assert normative_range(60, "O") is None
    with pytest.raises(ValueError):
        normative_range(60, "M", "middle")


def _volumes(total_voxels: int) -> Volumes:
    return Volumes(anterior_voxels=total_voxels // 2, posterior_voxels=total_voxels - total_voxels // 2,
                   spacing_mm=(1.0, 1.0, 1.0), voxel_volume_mm3=1.0)


def test_compare_bands():
    nr = normative_range(66, "M")
    cases = {
        BAND_BELOW_5: nr.p5_mm3 - 1, BAND_5_50: nr.p5_mm3, BAND_50_95: nr.p50_mm3,
        BAND_ABOVE_95: nr.p95_mm3 + 1,
    }
    for band, total in cases.items():
        assert percentile_band(total, nr) == band
        result = compare(_volumes(int(total)), "066Y", "M")
        assert result["available"] and result["band"] == band and result["reason"] is None
        assert result["norm"]["p50_mm3"] == nr.p50_mm3 and result["age_years"] == 66.0
        assert result["norm"]["age_band"] == "65-70 years"
        assert "Nobis" in result["source"] and result["caveat"]


@pytest.mark.parametrize("age, sex, reason", [
    (None, "F", "age unknown"), ("070Y", "", "sex unknown"), (None, None, "age and sex unknown"),
    ("030Y", "F", "outside"), ("090Y", "M", "outside"), ("7OY", "M", "unreadable"),
])
def test_compare_without_norm(age, sex, reason):
    result = compare(_volumes(3000), age, sex)
    assert result["available"] is False and result["band"] is None and result["norm"] is None
    assert reason in result["reason"]
    assert result["total_mm3"] == 3000.0
