"""hippo.data.nifti: normalisation, centre pad/crop and its inverse, pairing, loading and validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_pair, write_nifti
from hippo.data.nifti import CaseError, CasePaths, case_name, find_pairs, load_case, load_nifti
from hippo.preprocessing import label_volumes_mm3, normalize_minmax, pad_or_crop, undo_pad_or_crop, voxel_volume_mm3

# ---- normalize_minmax --------------------------------------------------------------------------


def test_normalize_float_maps_min_to_0_and_max_to_1() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(50.0, 20.0, size=(5, 6, 7)).astype(np.float32)
    out = normalize_minmax(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() == 0.0 and out.max() == 1.0
    assert out.flat[image.argmin()] == 0.0 and out.flat[image.argmax()] == 1.0
    expected = (image.astype(np.float64) - image.min()) / (float(image.max()) - float(image.min()))
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_normalize_negative_and_float64_input() -> None:
    image = np.array([[-3.0, -1.0], [0.0, 1.0]], dtype=np.float64)
    out = normalize_minmax(image)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.5], [0.75, 1.0]])


@pytest.mark.parametrize("value", [0.0, 7.5, 1.7e6])
def test_normalize_constant_volume_is_zeros(value: float) -> None:
    out = normalize_minmax(np.full((3, 4, 5), value, dtype=np.float32))
    assert out.dtype == np.float32 and out.shape == (3, 4, 5)
    assert not out.any()


def test_normalize_uint8() -> None:
    image = np.array([[3, 250], [126, 3]], dtype=np.uint8)  # would wrap if subtracted in uint8
    out = normalize_minmax(image)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 1.0], [123 / 247, 0.0]], rtol=1e-6)


def test_normalize_huge_float_maxima() -> None:
    rng = np.random.default_rng(1)
    image = rng.uniform(2e5, 1.7e6, size=(8, 9, 10)).astype(np.float32)
    image.flat[3] = 1.7e6
    out = normalize_minmax(image)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() == 0.0 and out.max() == 1.0 and out.flat[3] == 1.0
    lo, hi = float(image.min()), float(image.max())
    np.testing.assert_allclose(out, (image.astype(np.float64) - lo) / (hi - lo), atol=1e-6)


# ---- pad_or_crop / undo_pad_or_crop ------------------------------------------------------------

PAD_CROP_CASES = [
    pytest.param((4, 6), (8, 10), id="pad-even"),
    pytest.param((5, 7), (8, 10), id="pad-odd"),
    pytest.param((10, 12), (6, 8), id="crop-even"),
    pytest.param((9, 11), (6, 8), id="crop-odd"),
    pytest.param((5, 12), (8, 7), id="mixed-pad-h-odd-crop-w-odd"),
    pytest.param((10, 3), (7, 8), id="mixed-crop-h-odd-pad-w-odd"),
    pytest.param((6, 9), (10, 5), id="mixed-pad-h-even-crop-w-even"),
    pytest.param((6, 6), (6, 6), id="unchanged"),
]
LEADING = [pytest.param((), id="2d"), pytest.param((3,), id="3d"), pytest.param((2, 3), id="4d")]


def _expected_centred(array: np.ndarray, size: tuple[int, int], value: float) -> np.ndarray:
    """Reference: place the centre of ``array`` into a ``value``-filled array of the target size,
    axis by axis (start offset ``diff // 2`` in the bigger of the two)."""
    out = np.full(array.shape[:-2] + tuple(size), value, dtype=array.dtype)
    src, dst = [slice(None)] * (array.ndim - 2), [slice(None)] * (array.ndim - 2)
    for cur, tgt in zip(array.shape[-2:], size):
        n = min(cur, tgt)
        s = (cur - tgt) // 2 if cur > tgt else 0
        d = (tgt - cur) // 2 if tgt > cur else 0
        src.append(slice(s, s + n))
        dst.append(slice(d, d + n))
    out[tuple(dst)] = array[tuple(src)]
    return out


@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("shape,size", PAD_CROP_CASES)
def test_pad_or_crop_places_content_in_the_centre(shape, size, leading) -> None:
    array = np.arange(1, int(np.prod(leading + shape)) + 1, dtype=np.float32).reshape(leading + shape)
    out, record = pad_or_crop(array, size, value=-1)
    assert out.shape == leading + tuple(size)
    assert record.original == shape
    np.testing.assert_array_equal(out, _expected_centred(array, size, -1))


def test_pad_or_crop_explicit_odd_placement() -> None:
    """An odd difference puts the extra row/column after the content (pad) or cuts it at the end (crop)."""
    out, rec = pad_or_crop(np.ones((1, 2), dtype=np.int64), (4, 5))
    assert rec.before == (1, 1) and rec.after == (2, 2)
    np.testing.assert_array_equal(out, [[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    out, rec = pad_or_crop(np.arange(5)[None].repeat(2, 0), (2, 2))
    assert rec.before == (0, -1) and rec.after == (0, -2)
    np.testing.assert_array_equal(out, [[1, 2], [1, 2]])


@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("shape,size", PAD_CROP_CASES)
def test_undo_pad_or_crop_round_trip(shape, size, leading) -> None:
    array = np.arange(1, int(np.prod(leading + shape)) + 1, dtype=np.int32).reshape(leading + shape)
    out, record = pad_or_crop(array, size)
    restored = undo_pad_or_crop(out, record, value=-7)
    assert restored.shape == array.shape and restored.dtype == array.dtype
    # the part that survived the crop: the kept centre, identical to the original
    kept = [slice(None)] * len(leading)
    for cur, tgt in zip(shape, size):
        s = (cur - tgt) // 2 if cur > tgt else 0
        kept.append(slice(s, s + min(cur, tgt)))
    kept = tuple(kept)
    np.testing.assert_array_equal(restored[kept], array[kept])
    mask = np.ones(array.shape, bool)
    mask[kept] = False
    assert (restored[mask] == -7).all()                 # cropped-away borders come back as value
    if all(tgt >= cur for cur, tgt in zip(shape, size)):  # nothing was cropped: exact original
        np.testing.assert_array_equal(restored, array)
        assert not mask.any()
    else:
        assert mask.any()


def test_undo_accepts_a_new_leading_axis() -> None:
    """Probabilities (C, D, H', W') are un-padded with the record of the (D, H, W) image."""
    image = np.random.default_rng(0).random((4, 5, 7)).astype(np.float32)
    padded, record = pad_or_crop(image, (8, 8))
    stacked = np.stack([padded, 2 * padded, 3 * padded])
    restored = undo_pad_or_crop(stacked, record)
    np.testing.assert_array_equal(restored, np.stack([image, 2 * image, 3 * image]))


# ---- find_pairs -------------------------------------------------------------------------------


def _touch_nifti(path: Path) -> Path:
    return write_nifti(path, np.zeros((2, 2, 2), np.uint8))


def test_find_pairs_pairs_by_name_and_lists_unpaired_both_ways(tmp_path: Path) -> None:
    for n in ("hippocampus_001", "hippocampus_002", "hippocampus_003"):
        _touch_nifti(tmp_path / "imagesTr" / f"{n}.nii.gz")
    for n in ("hippocampus_003", "hippocampus_001", "hippocampus_004"):
        _touch_nifti(tmp_path / "labelsTr" / f"{n}.nii.gz")
    pairs, unpaired = find_pairs(tmp_path)
    assert [p.name for p in pairs] == ["hippocampus_001", "hippocampus_003"]
    for p in pairs:
        assert p.image == tmp_path / "imagesTr" / f"{p.name}.nii.gz"
        assert p.label == tmp_path / "labelsTr" / f"{p.name}.nii.gz"
    assert unpaired == [str(tmp_path / "imagesTr" / "hippocampus_002.nii.gz"),
                        str(tmp_path / "labelsTr" / "hippocampus_004.nii.gz")]


def test_find_pairs_skips_appledouble_and_non_nifti(tmp_path: Path) -> None:
    _touch_nifti(tmp_path / "imagesTr" / "hippocampus_001.nii.gz")
    _touch_nifti(tmp_path / "labelsTr" / "hippocampus_001.nii.gz")
    _touch_nifti(tmp_path / "imagesTr" / "hippocampus_002.nii")      # uncompressed is fine
    _touch_nifti(tmp_path / "labelsTr" / "hippocampus_002.nii")
    for d in ("imagesTr", "labelsTr"):
        (tmp_path / d / "._hippocampus_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (tmp_path / d / "._hippocampus_009.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (tmp_path / d / "notes.txt").write_text("not an image")
        (tmp_path / d / "hippocampus_007.nii.gz.bak").write_bytes(b"backup")
        (tmp_path / d / "subdir.nii.gz").mkdir()
    pairs, unpaired = find_pairs(tmp_path)
    assert [p.name for p in pairs] == ["hippocampus_001", "hippocampus_002"]
    assert unpaired == []


def test_find_pairs_without_labels_dir_lists_every_image(tmp_path: Path) -> None:
    _touch_nifti(tmp_path / "imagesTr" / "hippocampus_001.nii.gz")
    pairs, unpaired = find_pairs(tmp_path)
    assert pairs == [] and unpaired == [str(tmp_path / "imagesTr" / "hippocampus_001.nii.gz")]


def test_find_pairs_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        find_pairs(missing)
    (tmp_path / "ds").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "ds" / "imagesTr")):
        find_pairs(tmp_path / "ds")


@pytest.mark.parametrize("contents", ["empty", "only_hidden_and_text"])
def test_find_pairs_empty_directory(tmp_path: Path, contents: str) -> None:
    img_dir = tmp_path / "imagesTr"
    img_dir.mkdir()
    (tmp_path / "labelsTr").mkdir()
    if contents != "empty":
        (img_dir / "._hippocampus_001.nii.gz").write_bytes(b"junk")
        (img_dir / "readme.txt").write_text("x")
    with pytest.raises(CaseError, match="no NIfTI") as info:
        find_pairs(tmp_path)
    assert info.value.path == str(img_dir)
    assert str(img_dir) in str(info.value)


def test_case_name() -> None:
    assert case_name("/a/b/hippocampus_001.nii.gz") == "hippocampus_001"
    assert case_name("hippocampus_001.nii") == "hippocampus_001"


# ---- load_case --------------------------------------------------------------------------------


def _pair(tmp_path: Path, image: np.ndarray, label: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> CasePaths:
    img = write_nifti(tmp_path / "imagesTr" / "case.nii.gz", image, spacing)
    lbl = write_nifti(tmp_path / "labelsTr" / "case.nii.gz", label, spacing)
    return CasePaths("case", img, lbl)


def _image(shape=(4, 5, 6), dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).uniform(10, 900, size=shape).astype(dtype)


def _label(shape=(4, 5, 6), dtype=np.uint8) -> np.ndarray:
    lbl = np.zeros(shape, dtype)
    lbl[1, 1:3, 2:4] = 1
    lbl[2, 2:4, 1:3] = 2
    return lbl


def test_load_case_valid(tmp_path: Path) -> None:
    image, label = _image(), _label()
    case = load_case(_pair(tmp_path, image, label, spacing=(0.5, 1.0, 2.0)))
    assert case.name == "case"
    assert case.image.dtype == np.float32 and case.image.shape == image.shape
    assert case.image.min() == 0.0 and case.image.max() == 1.0
    np.testing.assert_allclose(case.image, normalize_minmax(image))
    assert case.label.dtype == np.uint8
    np.testing.assert_array_equal(case.label, label)
    assert case.spacing == (0.5, 1.0, 2.0)


def test_load_case_uint8_image(tmp_path: Path) -> None:
    image = _image(dtype=np.float32).astype(np.uint8)
    arr, _, _ = load_nifti(write_nifti(tmp_path / "u8.nii.gz", image))
    assert arr.dtype == np.uint8
    case = load_case(_pair(tmp_path, image, _label()))
    assert case.image.dtype == np.float32 and case.image.min() == 0.0 and case.image.max() == 1.0


def test_load_case_accepts_float32_label(tmp_path: Path) -> None:
    label = _label(dtype=np.float32)
    case = load_case(_pair(tmp_path, _image(), label))
    assert case.label.dtype == np.uint8
    np.testing.assert_array_equal(case.label, label.astype(np.uint8))
    assert set(np.unique(case.label).tolist()) == {0, 1, 2}


def test_load_case_without_label(tmp_path: Path) -> None:
    img = write_nifti(tmp_path / "x.nii.gz", _image())
    case = load_case(CasePaths("x", img, None))
    assert case.label is None and case.image.shape == (4, 5, 6)


def _bad_label_cases():
    shape_mismatch = _label(shape=(4, 5, 7))
    seven = _label()
    seven[0, 0, 0] = 7
    half = _label(dtype=np.float32)
    half[0, 0, 0] = 0.5
    nan = _label(dtype=np.float32)
    nan[0, 0, 0] = np.nan
    empty = np.zeros((4, 5, 6), np.uint8)
    return [
        pytest.param(shape_mismatch, "shape", id="shape-mismatch"),
        pytest.param(seven, "7", id="value-7"),
        pytest.param(half, "non-integer", id="non-integer-float"),
        pytest.param(nan, "NaN", id="nan-label"),
        pytest.param(empty, "empty", id="empty-label"),
    ]


@pytest.mark.parametrize("label,problem", _bad_label_cases())
def test_load_case_bad_label_names_the_label_file(tmp_path: Path, label: np.ndarray, problem: str) -> None:
    paths = _pair(tmp_path, _image(), label)
    with pytest.raises(CaseError) as info:
        load_case(paths)
    assert info.value.path == str(paths.label)
    assert str(paths.label) in str(info.value)
    assert problem in info.value.problem


def test_empty_label_is_accepted_when_foreground_not_required(tmp_path: Path) -> None:
    case = load_case(_pair(tmp_path, _image(), np.zeros((4, 5, 6), np.uint8)), require_foreground=False)
    assert case.label is not None and not case.label.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_load_case_non_finite_image_names_the_image(tmp_path: Path, bad: float) -> None:
    image = _image()
    image[1, 2, 3] = bad
    paths = _pair(tmp_path, image, _label())
    with pytest.raises(CaseError, match="NaN") as info:
        load_case(paths)
    assert info.value.path == str(paths.image)


@pytest.mark.parametrize("which", ["image", "label"])
def test_load_case_truncated_gz_names_the_file(tmp_path: Path, which: str) -> None:
    paths = _pair(tmp_path, np.random.default_rng(0).random((20, 20, 20)).astype(np.float32),
                  np.ones((20, 20, 20), np.uint8))
    target = getattr(paths, which)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaseError, match="unreadable") as info:
        load_case(paths)
    assert info.value.path == str(target)
    assert str(target) in str(info.value)


def test_load_nifti_garbage_and_4d(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file at all")
    with pytest.raises(CaseError, match="garbage.nii.gz"):
        load_nifti(garbage)
    four_d = write_nifti(tmp_path / "4d.nii.gz", np.zeros((3, 4, 5, 2), np.float32))
    with pytest.raises(CaseError, match="3D"):
        load_nifti(four_d)
    trailing_one = write_nifti(tmp_path / "4d1.nii.gz", np.zeros((3, 4, 5, 1), np.float32))
    assert load_nifti(trailing_one)[0].shape == (3, 4, 5)


# ---- slice_axis -------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [1, 2])
def test_load_case_slice_axis_moves_the_axis(tmp_path: Path, axis: int) -> None:
    image, label = _image(shape=(4, 5, 6)), _label(shape=(4, 5, 6))
    spacing = (0.5, 1.0, 2.0)
    case = load_case(_pair(tmp_path, image, label, spacing), slice_axis=axis)
    np.testing.assert_allclose(case.image, np.moveaxis(normalize_minmax(image), axis, 0))
    np.testing.assert_array_equal(case.label, np.moveaxis(label, axis, 0))
    assert case.image.shape[0] == image.shape[axis] and case.image.flags.c_contiguous
    rest = [s for i, s in enumerate(spacing) if i != axis]
    assert case.spacing == (spacing[axis], *rest)


def test_load_case_slice_axis_0_is_the_stored_order(tmp_path: Path) -> None:
    image, label = _image(), _label()
    case = load_case(_pair(tmp_path, image, label, (0.5, 1.0, 2.0)), slice_axis=0)
    np.testing.assert_array_equal(case.label, label)
    assert case.spacing == (0.5, 1.0, 2.0)


# ---- volumes ----------------------------------------------------------------------------------


def test_label_volumes_anisotropic_spacing(tmp_path: Path) -> None:
    label = np.zeros((4, 5, 6), np.uint8)
    label[0, 0, :5] = 1          # 5 anterior voxels
    label[3, 4, 3:6] = 2         # 3 posterior voxels
    spacing = (0.5, 1.5, 2.0)    # 1.5 mm³ per voxel
    assert voxel_volume_mm3(spacing) == pytest.approx(1.5)
    vols = label_volumes_mm3(label, spacing)
    assert vols == pytest.approx({"anterior_mm3": 7.5, "posterior_mm3": 4.5, "total_mm3": 12.0})
    # the same through a NIfTI file: the spacing comes from the header
    case = load_case(_pair(tmp_path, _image(), label, spacing))
    assert label_volumes_mm3(case.label, case.spacing) == pytest.approx(vols)


def test_tiny_pair_helper_round_trips(tmp_path: Path) -> None:
    img, lbl = tiny_pair(tmp_path, spacing=(1.0, 2.0, 0.5))
    pairs, unpaired = find_pairs(tmp_path)
    assert unpaired == [] and [p.image for p in pairs] == [img] and [p.label for p in pairs] == [lbl]
    case = load_case(pairs[0])
    assert case.spacing == (1.0, 2.0, 0.5)
    assert label_volumes_mm3(case.label, case.spacing)["total_mm3"] == pytest.approx(36 * 1.0)


def test_with_neighbours_stacks_context_and_repeats_edges() -> None:
    from hippo.preprocessing import with_neighbours

    volume = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)
    assert with_neighbours(volume, 0).shape == (4, 1, 2, 3)
    stacked = with_neighbours(volume, 1)
    assert stacked.shape == (4, 3, 2, 3)
    np.testing.assert_array_equal(stacked[:, 1], volume)                       # the slice itself
    np.testing.assert_array_equal(stacked[2, 0], volume[1])                    # one before
    np.testing.assert_array_equal(stacked[2, 2], volume[3])                    # one after
    np.testing.assert_array_equal(stacked[0, 0], volume[0])                    # edge repeated
    np.testing.assert_array_equal(stacked[3, 2], volume[3])
    with pytest.raises(ValueError, match="context"):
        with_neighbours(volume, -1)


def test_percentile_normalisation_ignores_a_few_bright_voxels() -> None:
    from hippo.preprocessing import normalize, normalize_percentile

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 100, size=(20, 20, 20)).astype(np.float32)
    spiked = image.copy()
    spiked[0, 0, :5] = 1e6                                   # five very bright voxels
    robust, naive = normalize_percentile(spiked), normalize(spiked, "minmax_per_volume")
    assert robust.dtype == np.float32 and robust.min() == 0.0 and robust.max() == 1.0
    # the tissue keeps its contrast with percentiles, and is crushed to ~0 by min-max
    np.testing.assert_allclose(robust[1:], normalize_percentile(image)[1:], atol=0.01)
    assert naive[1:].max() < 1e-3
    np.testing.assert_array_equal(normalize_percentile(np.full((3, 3, 3), 7.0)), 0.0)
    with pytest.raises(ValueError, match="unknown normalization 'zscore'"):
        normalize(image, "zscore")
