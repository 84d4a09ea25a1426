"""hippo.dicom.volume: one DICOM series -> (X, Y, Z) volume in closest canonical RAS, geometry checks.

Series are written with the scanner emulator (tiny volumes, a few ms each) and then damaged.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from hippo.dicom.volume import PixelDecodeError, SeriesError, SeriesGeometryError, SeriesVolume, load_series
from hippo.scanner import StudyInfo, write_series

SHAPE = (6, 5, 7)  # (X, Y, Z); Z is the slice axis (7 slices)
FLIPPED = np.diag([-0.8, 1.0, 2.0, 1.0])  # anisotropic, X flipped against RAS


def _volume(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 250, size=shape).astype(np.uint8)


def _write(tmp_path: Path, affine=FLIPPED, vol=None, **kwargs) -> tuple[np.ndarray, list[Path]]:
    vol = _volume() if vol is None else vol
    kwargs.setdefault("study", StudyInfo(seed=7))
    paths = write_series(vol, affine, tmp_path / "series", **kwargs)
    return vol, paths


def _canonical(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ornt = io_orientation(affine)
    return apply_orientation(vol, ornt), affine @ inv_ornt_aff(ornt, vol.shape)


def _edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _projection(ds) -> float:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return float(np.dot([float(v) for v in ds.ImagePositionPatient], np.cross(iop[:3], iop[3:])))


def test_load_series_returns_canonical_volume_and_sorted_datasets(tmp_path):
    vol, paths = _write(tmp_path)
    sv = load_series(paths, workers=2)
    assert isinstance(sv, SeriesVolume)
    expected, expected_affine = _canonical(vol, FLIPPED)
    assert sv.array.dtype == np.float32 and sv.array.shape == expected.shape
    np.testing.assert_array_equal(sv.array, expected)
    np.testing.assert_allclose(sv.affine, expected_affine, atol=1e-6)
    assert np.all(np.diag(sv.affine)[:3] > 0)
    np.testing.assert_allclose(sv.spacing, (0.8, 1.0, 2.0))
    projections = [_projection(ds) for ds in sv.datasets]
    assert projections == sorted(projections)
    assert sv.warnings == []
    assert sv.series_uid == sv.datasets[0].SeriesInstanceUID


def test_to_source_reproduces_stored_frames_in_datasets_order(tmp_path):
    rot = np.array([[0, 0, -2.0, 5], [0.8, 0, 0, 1], [0, -1.0, 0, 3], [0, 0, 0, 1]])  # permuted + flipped
    _, paths = _write(tmp_path, affine=rot, slice_axis=1)
    sv = load_series(paths)
    frames = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                       for ds in sv.datasets]).astype(np.float32)
    back = sv.to_source(sv.array)
    assert back.shape == sv.source_shape == (len(sv.datasets), sv.datasets[0].Rows, sv.datasets[0].Columns)
    np.testing.assert_array_equal(back, frames)
    mask = (sv.array > 100).astype(np.uint8)
    assert sv.to_source(mask).dtype == np.uint8
    np.testing.assert_array_equal(sv.from_source(sv.to_source(mask)), mask)
    with pytest.raises(ValueError, match="shape"):
        sv.to_source(mask[:-1])


def test_shuffled_order_and_random_names_give_same_volume(tmp_path):
    _, paths = _write(tmp_path)
    reference = load_series(paths)
    _, random_paths = _write(tmp_path / "other", file_names="random")
    assert all(p.suffix == "" for p in random_paths)
    shuffled = list(random_paths)
    random.Random(3).shuffle(shuffled)
    sv = load_series([str(p) for p in shuffled])
    np.testing.assert_array_equal(sv.array, reference.array)
    np.testing.assert_allclose(sv.affine, reference.affine)


def test_datasets_input_is_accepted(tmp_path):
    _, paths = _write(tmp_path)
    datasets = [pydicom.dcmread(p) for p in reversed(paths)]
    from_files = load_series(paths)
    from_datasets = load_series(datasets)
    np.testing.assert_array_equal(from_datasets.array, from_files.array)
    assert [ds.SOPInstanceUID for ds in from_datasets.datasets] == [ds.SOPInstanceUID for ds in from_files.datasets]


def test_missing_slice_names_the_gap(tmp_path):
    _, paths = _write(tmp_path)
    sorted_ds = load_series(paths).datasets
    before = _projection(sorted_ds[2])
    victim = Path(sorted_ds[3].filename)
    victim.unlink()
    with pytest.raises(SeriesGeometryError, match="missing slice") as err:
        load_series([p for p in paths if p.exists()])
    assert f"{before:.4f} mm" in str(err.value)
    assert str(err.value).startswith(f"series {sorted_ds[0].SeriesInstanceUID}")


def test_duplicate_position_with_new_uid_is_an_error(tmp_path):
    _, paths = _write(tmp_path)
    copy = paths[0].parent / "copy.dcm"
    shutil.copy(paths[2], copy)
    new_uid = generate_uid()
    ds = pydicom.dcmread(copy)
    ds.SOPInstanceUID = new_uid
    ds.file_meta.MediaStorageSOPInstanceUID = new_uid
    ds.save_as(copy)
    with pytest.raises(SeriesGeometryError, match="same position") as err:
        load_series(paths + [copy])
    assert "copy.dcm" in str(err.value)


def test_exact_duplicate_instance_is_dropped_with_warning(tmp_path):
    vol, paths = _write(tmp_path)
    copy = paths[0].parent / "copy.dcm"
    shutil.copy(paths[3], copy)
    sv = load_series(paths + [copy])
    assert len(sv.datasets) == vol.shape[2]
    assert any("dropped duplicate instance" in w for w in sv.warnings)
    np.testing.assert_array_equal(sv.array, _canonical(vol, FLIPPED)[0])


def test_non_uniform_spacing_is_an_error(tmp_path):
    _, paths = _write(tmp_path)  # slices 2 mm apart along +z
    ds = pydicom.dcmread(paths[3])
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    _edit(paths[3], ImagePositionPatient=[x, y, z + 0.5])  # 2.5 / 1.5 mm: no gap, but not uniform
    with pytest.raises(SeriesGeometryError, match="non-uniform slice spacing"):
        load_series(paths)
    # within tolerance it loads
    _edit(paths[3], ImagePositionPatient=[x, y, z + 0.01])
    assert load_series(paths).array.shape[2] == 7


def test_inconsistent_pixel_spacing_names_the_file(tmp_path):
    _, paths = _write(tmp_path)
    _edit(paths[4], PixelSpacing=[1.0, 0.9])
    with pytest.raises(SeriesGeometryError, match="PixelSpacing") as err:
        load_series(paths)
    assert str(paths[4]) in str(err.value)


@pytest.mark.parametrize("keyword,value", [("Rows", 9), ("ImageOrientationPatient", [0, 1, 0, 0, 0, -1])])
def test_inconsistent_size_or_orientation_names_the_file(tmp_path, keyword, value):
    _, paths = _write(tmp_path)
    _edit(paths[1], **{keyword: value})
    with pytest.raises(SeriesGeometryError, match=keyword) as err:
        load_series(paths)
    assert str(paths[1]) in str(err.value)


def test_missing_positions_fall_back_to_instance_number(tmp_path):
    vol, paths = _write(tmp_path)
    for p in paths:
        _edit(p, ImagePositionPatient=None)
    random.Random(0).shuffle(paths)
    sv = load_series(paths)
    assert any("InstanceNumber" in w for w in sv.warnings)
    np.testing.assert_array_equal(sv.array, _canonical(vol, FLIPPED)[0])
    np.testing.assert_allclose(sv.spacing, (0.8, 1.0, 2.0))
    assert [int(ds.InstanceNumber) for ds in sv.datasets] == sorted(int(ds.InstanceNumber) for ds in sv.datasets)


def test_degenerate_positions_fall_back_to_instance_number(tmp_path):
    vol, paths = _write(tmp_path)
    for p in paths:
        _edit(p, ImagePositionPatient=[1.0, 2.0, 3.0])
    sv = load_series(paths)
    assert any("identical" in w for w in sv.warnings)
    np.testing.assert_array_equal(sv.array, _canonical(vol, FLIPPED)[0])


def test_single_slice_is_an_error(tmp_path):
    _, paths = _write(tmp_path)
    with pytest.raises(SeriesGeometryError, match="single slice"):
        load_series(paths[:1])


def test_several_series_are_refused_unless_one_is_chosen(tmp_path):
    study = StudyInfo(seed=1)
    _, a = _write(tmp_path / "a", study=study, series_number=1)
    _, b = _write(tmp_path / "b", study=study, series_number=2, series_description="other",
                  vol=_volume(seed=5))
    with pytest.raises(SeriesGeometryError, match="2 series"):
        load_series(a + b)
    uid = pydicom.dcmread(b[0]).SeriesInstanceUID
    sv = load_series(a + b, series_uid=uid)
    assert sv.series_uid == uid and len(sv.datasets) == len(b)
    with pytest.raises(SeriesGeometryError):
        load_series([])


def test_undecodable_pixels_name_file_and_transfer_syntax(tmp_path):
    _, paths = _write(tmp_path)
    datasets = [pydicom.dcmread(p) for p in paths]
    bad = datasets[2]
    bad.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    bad.BitsAllocated = bad.BitsStored = 8
    bad.HighBit = 7
    bad.PixelData = encapsulate([b"\xff\xd8 not really a jpeg \xff\xd9"])
    bad["PixelData"].VR = "OB"
    bad["PixelData"].is_undefined_length = True
    with pytest.raises(PixelDecodeError, match="JPEG Baseline") as err:
        load_series(datasets)
    assert str(paths[2]) in str(err.value)
    assert isinstance(err.value, SeriesError) and isinstance(err.value, ValueError)


def test_rescale_is_applied(tmp_path):
    vol = np.random.default_rng(2).uniform(-50.0, 300.0, size=SHAPE).astype(np.float32)
    _, paths = _write(tmp_path, affine=np.eye(4), vol=vol)
    ds = pydicom.dcmread(paths[0])
    assert float(ds.RescaleSlope) != 1.0 and float(ds.RescaleIntercept) < 0
    sv = load_series(paths)
    np.testing.assert_allclose(sv.array, vol, atol=1e-3 * 350)


def test_sheared_stack_keeps_the_shear_with_a_warning(tmp_path):
    sheared = np.eye(4)
    sheared[:3, 2] = [0.3, 0.0, 2.0]  # slices step 0.3 mm sideways: gantry tilt
    vol, paths = _write(tmp_path, affine=sheared)
    sv = load_series(paths)
    expected, expected_affine = _canonical(vol, sheared)
    np.testing.assert_array_equal(sv.array, expected)
    np.testing.assert_allclose(sv.affine, expected_affine, atol=1e-6)
    assert any("gantry tilt" in w for w in sv.warnings)


def test_volume_module_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, hippo.dicom.volume; "
            "bad = [m for m in ('torch', 'lightning', 'hydra') if m in sys.modules]; sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_multiframe_without_functional_groups_and_mixed_inputs_are_refused(tmp_path):
    """A classic multi-frame image has no per-frame positions: refused naming the file; a series
    mixing single-frame files with a multi-frame one is refused (one enhanced instance or
    single-frame slices, never both)."""
    vol, paths = _write(tmp_path)
    frames = [pydicom.dcmread(p) for p in paths]
    mf = pydicom.dcmread(paths[0])
    mf.NumberOfFrames = len(frames)
    mf.PixelData = b"".join(f.PixelData for f in frames)
    out = tmp_path / "mf.dcm"
    mf.save_as(out)
    with pytest.raises(SeriesGeometryError, match=r"mf\.dcm is a multi-frame image \(7 frames\) without per-frame "
                                                  r"functional groups"):
        load_series([out])
    with pytest.raises(SeriesGeometryError, match=r"7 instances, 1 of them multi-frame or enhanced .*mf\.dcm"):
        load_series([out, *paths[1:]], series_uid=str(mf.SeriesInstanceUID))


def test_is_multiframe_is_false_for_classic_series(tmp_path):
    vol, paths = _write(tmp_path)
    sv = load_series(paths)
    assert not sv.is_multiframe and sv.frame_order is None and sv.source_shape[0] == len(paths)


@pytest.mark.parametrize("axes", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_frames_go_straight_into_the_canonical_volume(tmp_path, axes):
    """Slices along any voxel axis, some axes flipped: the volume is the canonical array of the
    written one, built without a stack of the frames or a reordered copy of it (peak memory of the
    pixel stage about one volume: a 0.7 mm head is ~160 MB of float32)."""
    import tracemalloc

    vol = _volume(shape=(192, 160, 6), seed=3)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for i, (axis, scale) in enumerate(zip(axes, (-0.9, 1.1, -2.0))):
        affine[axis, i] = scale  # voxel axis i runs along RAS axis ``axis``, some reversed
    _, paths = _write(tmp_path, affine=affine, vol=vol)
    datasets = [pydicom.dcmread(p) for p in paths]  # pixels read: what load_series allocates is its own
    tracemalloc.start()
    try:
        sv = load_series(datasets)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected, expected_affine = _canonical(vol, affine)
    np.testing.assert_array_equal(sv.array, expected)
    np.testing.assert_allclose(sv.affine, expected_affine, atol=1e-6)
    assert sv.array.flags["C_CONTIGUOUS"]
    assert peak < 1.5 * sv.array.nbytes, (peak, sv.array.nbytes)  # a stack and a reordered copy: over 2x
