"""Whole-head T1 in: reading scans, finding inputs, the template and registration, crop geometry
(mirroring, mapping back), review checks, and both hippocampi on the real whole-head scans.

Real scans: ``../shared/data/wholehead`` (skipped, naming the path, when absent). The invariance
tests (rotation, shift, resampling, permuted axes, mirroring) take a few minutes: ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hippo.metrics import dice
from hippo.scan_io import (NotAScanError, ScanVolume, find_inputs, label_map_reason, read_scan,
                           save_label_map)
from hippo.wholehead.crops import (CENTRE_FRACTION, CROP_SHAPE, ATLAS_AXIS_MNI, TRAINING_AXIS_PITCH_YAW_DEG,
                                   crop_edge_faces, crop_geometry, probabilities_to_scan, sample_crop,
                                   training_pose)
from hippo.wholehead.register import Registration, RegistrationSettings, register_to_template
from hippo.wholehead.review import (ReviewRules, atlas_distance_reasons, coverage_reasons, mask_shape, shape_reasons,
                                   volume_reasons)
from hippo.wholehead.segment import LABELS, asymmetry_index, segment_wholehead
from hippo.wholehead.template import HIPPOCAMPUS_CENTROIDS_MNI, TEMPLATE_PATH, load_template

WHOLEHEAD = Path(__file__).resolve().parents[1].parent / "shared/data/wholehead"
SCANS = {"chris": "chris_t1.nii.gz", "example": "example_brain_t1.nii.gz", "fs_subject": "fs_subject/norm.mgz"}
#: hippodeep's left/right volumes (mm³) from REFERENCE.tsv, FreeSurfer's for fs_subject (17 / 53)
HIPPODEEP = {"chris": (3698, 3800), "example": (3161, 3344), "fs_subject": (2932, 3047)}


def require_wholehead() -> Path:
    if not all((WHOLEHEAD / f).is_file() for f in SCANS.values()):
        pytest.skip(f"whole-head scans not found at {WHOLEHEAD}")
    return WHOLEHEAD


# ------------------------------------------------------------------------------------------------ helpers


def _rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about voxel/world axis ``axis`` (0 x, 1 y, 2 z)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz"[axis], degrees, degrees=True).as_matrix()


def _template_scan(linear: np.ndarray, shift, voxel_mm: float, origin, shape
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shipped template as a scan with a known MNI -> scan affine: ``(scan array, its voxel ->
    RAS affine, the true MNI -> scan affine)``; ``linear`` (3x3) and ``shift`` (mm) make the truth,
    the scan grid has ``voxel_mm`` voxels from ``origin`` (mm) with ``shape``."""
    from scipy import ndimage

    t = load_template()
    truth = np.eye(4)
    truth[:3, :3] = linear
    truth[:3, 3] = shift
    out_affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    out_affine[:3, 3] = origin
    # scan voxel -> scan mm -> MNI (inverse truth) -> template voxel
    m = np.linalg.inv(t.affine) @ np.linalg.inv(truth) @ out_affine
    return ndimage.affine_transform(t.array, m[:3, :3], m[:3, 3], output_shape=shape, order=1), out_affine, truth


def _move_head(scan: ScanVolume, rotation: np.ndarray, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """The scan's array with the head turned by ``rotation`` about the array centre and moved by
    ``shift`` mm in world space (same grid and affine: as if the patient lay differently)."""
    from scipy import ndimage

    a = scan.affine
    c = a[:3, :3] @ ((np.array(scan.array.shape) - 1) / 2.0) + a[:3, 3]
    ai = np.linalg.inv(a)
    matrix = ai[:3, :3] @ rotation.T @ a[:3, :3]
    offset = ai[:3, :3] @ (rotation.T @ (a[:3, 3] - c) + c - np.asarray(shift)) + ai[:3, 3]
    return ndimage.affine_transform(scan.array, matrix, offset, order=1, mode="constant", cval=0.0)


def _resample(scan: ScanVolume, mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The scan on an isotropic ``mm`` grid covering the same field of view."""
    from scipy import ndimage

    a, sp = scan.affine, np.asarray(scan.spacing)
    shape = np.floor(np.asarray(scan.array.shape) * sp / mm).astype(int)
    b = np.diag([mm, mm, mm, 1.0])
    b[:3, :3] = a[:3, :3] / sp * mm
    b[:3, 3] = a[:3, 3] + a[:3, :3] @ (np.full(3, -0.5) + mm / sp / 2)
    m = np.linalg.inv(a) @ b
    return ndimage.affine_transform(scan.array, m[:3, :3], m[:3, 3], output_shape=tuple(shape), order=1), b


class BlobAgent:
    """Stands in for the model: an ellipsoid at the training crops' centroid, its anterior half
    (high crop y) labelled 1, posterior 2, and its lateral third (low crop x) given a higher
    anterior probability (to check mirroring)."""

    def __init__(self):
        self.calls = 0

    def segment(self, volume, return_probabilities=False):
        self.calls += 1
        shape = np.asarray(volume.shape)
        c = np.asarray(CENTRE_FRACTION) * (shape - 1)
        idx = np.indices(volume.shape).astype(float)
        r = ((idx[0] - c[0]) / 6) ** 2 + ((idx[1] - c[1]) / 15) ** 2 + ((idx[2] - c[2]) / 5) ** 2
        fg = r <= 1
        labels = np.where(fg, np.where(idx[1] >= c[1], 1, 2), 0).astype(np.uint8)
        probs = np.zeros((3, *volume.shape), np.float32)
        for k in range(3):
            probs[k] = labels == k
        return (labels, probs) if return_probabilities else labels


def _blank_head(spacing=1.5, shape=(120, 150, 120)) -> tuple[np.ndarray, np.ndarray]:
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = -np.asarray(shape) * spacing / 2
    rng = np.random.default_rng(0)
    return rng.uniform(0, 100, shape).astype(np.float32), affine


# ------------------------------------------------------------------------------------------------ scan_io


def test_read_scan_reorients_to_ras_and_writes_back_in_source_order(tmp_path):
    data = np.zeros((20, 30, 40), np.int16)
    data[2, 3, 4] = 1000  # a marker
    data += np.arange(20 * 30 * 40, dtype=np.int16).reshape(data.shape) % 97  # many values: a scan
    # LIA storage, like FreeSurfer's conformed space
    affine = np.array([[-1.0, 0, 0, 10], [0, 0, 1, -20], [0, -1, 0, 30], [0, 0, 0, 1]])
    path = tmp_path / "lia.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    scan = read_scan(path)
    assert nib.aff2axcodes(scan.affine) == ("R", "A", "S")
    assert scan.array.shape == (20, 40, 30) and scan.array.dtype == np.float32
    world = affine[:3, :3] @ [2, 3, 4] + affine[:3, 3]
    marker = np.argwhere(scan.array == scan.array.max())[0]
    np.testing.assert_allclose(scan.affine[:3, :3] @ marker + scan.affine[:3, 3], world)
    labels = (scan.array == scan.array.max()).astype(np.uint8) * 3
    out = save_label_map(tmp_path / "out_dseg.nii.gz", labels, scan)
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, affine)
    assert written.shape == data.shape and np.asarray(written.dataobj)[2, 3, 4] == 3
    assert np.asarray(written.dataobj).sum() == 3


def test_label_maps_and_atlases_are_refused_by_content(tmp_path):
    aseg = np.zeros((30, 30, 30), np.int32)
    aseg[5:10] = 17
    aseg[10:15] = 53
    aseg[15:20] = 1035
    aseg[20:25] = 12175
    for v in range(100):  # many labels, sparse over 0..12175
        aseg[25 + v % 5, v % 30, v // 30] = 11100 + v
    assert "label map" in label_map_reason(aseg)
    atlas = (np.arange(27000).reshape(30, 30, 30) % 33).astype(np.float32)  # float, few integer values
    assert "label map" in label_map_reason(atlas)
    assert "mask" in label_map_reason((atlas > 3).astype(np.uint8))
    scan = np.random.default_rng(0).integers(0, 255, (30, 30, 30)).astype(np.uint8)
    assert label_map_reason(scan) is None
    assert label_map_reason(scan.astype(np.float32) * 1.37) is None
    p = tmp_path / "aparc+aseg.nii.gz"
    nib.save(nib.Nifti1Image(aseg, np.eye(4)), str(p))
    with pytest.raises(NotAScanError, match="aparc\\+aseg.nii.gz: a label map"):
        read_scan(p)
    p4 = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), str(p4))
    with pytest.raises(NotAScanError, match="3D volume"):
        read_scan(p4)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(NotAScanError, match="broken.nii.gz: not a readable"):
        read_scan(bad)


def test_real_label_map_is_refused():
    root = require_wholehead()
    with pytest.raises(NotAScanError, match="aparc.a2009s\\+aseg.mgz: a label map"):
        read_scan(root / "fs_subject/aparc.a2009s+aseg.mgz")
    scan = read_scan(root / SCANS["fs_subject"])  # norm.mgz: 124 intensity values, a scan
    assert scan.array.shape == (256, 256, 256)


def test_find_inputs_file_folder_bids(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (8, 8, 8)).astype(np.uint8)
    for rel in ("a/t1.nii.gz", "b/t1.nii.gz", "c/scan.mgz", ".hidden/x.nii", "notes.txt", "out/old.nii.gz"):
        p = tmp_path / "folder" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            p.write_text("x")
        elif rel.endswith(".mgz"):
            nib.save(nib.MGHImage(img, np.eye(4)), str(p))
        else:
            nib.save(nib.Nifti1Image(img, np.eye(4)), str(p))
    found = find_inputs(tmp_path / "folder", exclude=[tmp_path / "folder" / "out"])
    assert found.kind == "folder"
    assert [s.name for s in found.scans] == ["a_t1", "b_t1", "c_scan"]  # unique names, no hidden, no output
    one = find_inputs(tmp_path / "folder" / "a" / "t1.nii.gz")
    assert one.kind == "file" and one.scans[0].explicit and one.scans[0].name == "t1"
    bids = tmp_path / "bids"
    (bids / "dataset_description.json").parent.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    for rel in ("sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_run-2_T1w.nii.gz",
                "sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz", "sub-02/ses-1/func/sub-02_ses-1_task-x_bold.nii.gz",
                "derivatives/hippo/sub-01/anat/sub-01_T1w.nii.gz"):
        p = bids / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(p))
    found = find_inputs(bids)
    assert found.kind == "bids"
    assert [(s.name, s.bids_dir) for s in found.scans] == [("sub-01", "sub-01/anat"),
                                                          ("sub-02_ses-1_run-2", "sub-02/ses-1/anat")]
    assert all(s.explicit for s in found.scans)
    with pytest.raises(FileNotFoundError):
        find_inputs(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a NIfTI"):
        find_inputs(tmp_path / "folder" / "notes.txt")


# ------------------------------------------------------------------------------------------------ template, registration


def test_template_and_centroids():
    t = load_template()
    assert TEMPLATE_PATH.is_file() and (TEMPLATE_PATH.parent / "TEMPLATE_NOTICE.md").is_file()
    assert t.spacing == (2.0, 2.0, 2.0) and t.array.shape == (99, 117, 95)
    inv = np.linalg.inv(t.affine)
    for side, xyz in HIPPOCAMPUS_CENTROIDS_MNI.items():
        v = np.round(inv[:3, :3] @ xyz + inv[:3, 3]).astype(int)
        assert t.brain_mask[tuple(v)], side  # the centroids lie in the template's brain
    assert HIPPOCAMPUS_CENTROIDS_MNI["left"][0] < 0 < HIPPOCAMPUS_CENTROIDS_MNI["right"][0]


def test_registration_recovers_a_known_affine():
    """The template itself, turned 25° (pitch) and 10° (yaw), scaled by 0.9 and moved 12 mm, on a
    1.5 mm grid: the registration finds the MNI -> scan affine within 2 mm at the hippocampi."""
    scan, out_affine, truth = _template_scan(_rotation(0, 25) @ _rotation(2, 10) * 0.9, [5.0, -12.0, 8.0], 1.5,
                                             [-100, -130, -90], (134, 160, 130))
    reg = register_to_template(scan, out_affine)
    for xyz in HIPPOCAMPUS_CENTROIDS_MNI.values():
        assert np.linalg.norm(reg.to_scan(xyz) - (truth[:3, :3] @ xyz + truth[:3, 3])) < 2.0
    assert reg.determinant == pytest.approx(0.9 ** 3, rel=0.05)
    assert reg.score < -0.4
    np.testing.assert_allclose(reg.to_mni(reg.to_scan([1.0, 2.0, 3.0])), [1, 2, 3], atol=1e-6)
    assert reg.etiv_mm3 == pytest.approx(abs(reg.determinant) * 1_948_106.0)


def test_registration_is_the_same_with_refinements_side_by_side():
    """The refinements run on two cores side by side (one ITK thread each) give bit for bit the
    registration they give one after the other: the same scan always gets the same crops."""
    import SimpleITK as sitk

    scan, out_affine, _ = _template_scan(_rotation(0, 15) * 0.95, [3.0, -8.0, 5.0], 2.0, [-100, -130, -90],
                                         (100, 120, 98))
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
        side_by_side = register_to_template(scan, out_affine, retry_above=None)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        serial = register_to_template(scan, out_affine, retry_above=None)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before
    np.testing.assert_array_equal(side_by_side.matrix, serial.matrix)
    assert side_by_side.score == serial.score and side_by_side.start == serial.start
    assert side_by_side.search_best["refined"] == serial.search_best["refined"] >= 2


def test_registration_settings_from_mapping():
    s = RegistrationSettings.from_mapping({"preset": "thorough", "samples": 5000, "levels_mm": [8, 4]})
    assert s.samples == 5000 and s.levels_mm == (8, 4) and s.iterations == 150
    with pytest.raises(ValueError, match="RegistrationSettings: unknown setting.*'nonsense'"):
        RegistrationSettings.from_mapping({"nonsense": 1})
    with pytest.raises(ValueError, match="unknown preset 'slow'"):
        RegistrationSettings.from_mapping({"preset": "slow"})


def _synthetic_head(neck_mm: float = 0.0, skull: bool = True, top_cut_mm: float = 0.0):
    """A 1.5 mm head phantom: an ellipsoid 'brain' (radii 70, 85, 60 mm, centre at the origin) in a
    'scalp' shell 10 mm thick, optionally a neck cylinder reaching ``neck_mm`` below it and the top
    ``top_cut_mm`` of the field of view removed. Returns ``(array, affine, brain centre)``."""
    mm = 1.5
    lo = np.array([-110.0, -130.0, -100.0 - neck_mm])
    hi = np.array([110.0, 130.0, 85.0 - top_cut_mm])
    shape = tuple(int(x) for x in np.ceil((hi - lo) / mm))
    affine = np.diag([mm, mm, mm, 1.0])
    affine[:3, 3] = lo
    idx = np.indices(shape, dtype=np.float32)
    x, y, z = (idx[k] * mm + lo[k] for k in range(3))
    brain = (x / 70) ** 2 + (y / 85) ** 2 + (z / 60) ** 2 <= 1
    head = (x / 80) ** 2 + (y / 95) ** 2 + (z / 70) ** 2 <= 1
    neck = (z < -40) & (z > -100 - neck_mm) & ((x / 55) ** 2 + ((y + 10) / 60) ** 2 <= 1) if neck_mm else False
    a = np.zeros(shape, np.float32)
    if skull:
        a[head | neck] = 60.0
    a[brain] = 100.0
    return a, affine, np.zeros(3)


def test_initial_centres_hold_with_neck_skull_stripping_and_a_cut_vertex():
    """Every start lands near the brain's centre on a plain head; with a long neck in view the
    'top' start is pulled down but the 'vertex' one is not; with the vertex cut off the 'mass'
    start stays near; a skull-stripped brain gives all three near."""
    from hippo.wholehead.register import head_mask, initial_centres

    for kw, good in (({}, ("top", "vertex", "mass")), ({"neck_mm": 120.0}, ("vertex",)),
                     ({"skull": False}, ("top", "vertex", "mass")), ({"top_cut_mm": 30.0}, ("mass", "top"))):
        a, affine, centre = _synthetic_head(**kw)
        assert head_mask(a).sum() > 0.9 * (a > 0).sum(), kw
        starts = initial_centres(a, affine, top_mm=150.0, template_vertex_mm=62.0)
        for name in good:
            assert np.linalg.norm(starts[name] - centre) < 20.0, (kw, name, starts[name])
    a, affine, _ = _synthetic_head(neck_mm=120.0)
    starts = initial_centres(a, affine, top_mm=150.0)
    assert starts["mass"][2] < -40  # the neck drags the centre of mass down: why there are several starts


def test_registration_tries_several_starts_and_names_the_winner():
    """The template on a grid with 120 mm of 'neck' below it and 40 mm more above: registered within
    2 mm at the hippocampi, the starts tried are counted, the winner named."""
    from scipy import ndimage

    t = load_template()
    out_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    out_affine[:3, 3] = [-100, -130, -200]
    shape = (100, 115, 150)  # z from -200 to +98 mm
    m = np.linalg.inv(t.affine) @ out_affine
    scan = ndimage.affine_transform(t.array, m[:3, :3], m[:3, 3], output_shape=shape, order=1)
    idx = np.indices(shape, dtype=np.float32)
    x, y, z = (idx[k] * 2.0 + out_affine[k, 3] for k in range(3))
    neck = (z < -50) & ((x / 50) ** 2 + ((y + 20) / 55) ** 2 <= 1) & (scan == 0)
    scan[neck] = 40.0
    reg = register_to_template(scan, out_affine)
    for xyz in HIPPOCAMPUS_CENTROIDS_MNI.values():
        assert np.linalg.norm(reg.to_scan(xyz) - np.asarray(xyz)) < 2.0
    assert reg.start in ("top", "vertex", "mass")
    assert reg.search_best["starts_tried"] >= 2
    assert reg.as_dict()["start"] == reg.start


def test_registration_holds_on_a_field_of_view_cut_below_the_temporal_lobes():
    """The template turned 8° and scaled 0.9 on a grid that ends 35 mm below the MNI origin (the
    cerebellum cut, as on seg3d_epilepsy_t1): within 2.5 mm at the hippocampi and the right scale.
    (A guard for the padded refinement: on seg3d's re-acquisitions, template points mapped past the
    cut dropped out of the metric and an enlarged template scored better.)"""
    scan, out_affine, truth = _template_scan(_rotation(0, 8) * 0.9, [2.0, -6.0, 4.0], 1.5, [-90, -120, -35],
                                             (120, 150, 80))  # z from -35 to +83 mm
    reg = register_to_template(scan, out_affine)
    for xyz in HIPPOCAMPUS_CENTROIDS_MNI.values():
        assert np.linalg.norm(reg.to_scan(xyz) - (truth[:3, :3] @ xyz + truth[:3, 3])) < 2.5, reg.as_dict()
    assert reg.determinant == pytest.approx(0.9 ** 3, rel=0.08)


def test_mask_shape_and_the_review_of_it():
    """An ellipsoid along the training crops' hippocampal axis passes; a ball (not elongated) and
    the same ellipsoid turned 60° are flagged; a centroid far from the atlas' is flagged."""
    pitch, yaw = np.radians(TRAINING_AXIS_PITCH_YAW_DEG)
    axis = np.array([np.tan(yaw), 1.0, np.tan(pitch)])
    axis /= np.linalg.norm(axis)
    idx = np.indices(CROP_SHAPE).reshape(3, -1).T.astype(float)
    c = np.asarray(CENTRE_FRACTION) * (np.asarray(CROP_SHAPE) - 1)
    rules = ReviewRules()

    def ellipsoid(long_axis, radii=(15.0, 5.0, 4.0)):
        a = np.asarray(long_axis, float) / np.linalg.norm(long_axis)
        b = np.cross(a, [1.0, 0, 0])
        b /= np.linalg.norm(b)
        d = idx - c
        r = (d @ a / radii[0]) ** 2 + (d @ b / radii[1]) ** 2 + (d @ np.cross(a, b) / radii[2]) ** 2
        return (r <= 1).reshape(CROP_SHAPE).astype(np.uint8)

    good = mask_shape(ellipsoid(axis))
    assert good["axis_angle_deg"] < 3 and good["elongation"] > 2.5
    assert shape_reasons("left", good, rules) == []
    ball = mask_shape(ellipsoid(axis, radii=(6.0, 6.0, 6.0)))
    assert any("not elongated" in r for r in shape_reasons("left", ball, rules))
    turned = ellipsoid(_rotation(0, 60) @ axis)
    assert mask_shape(turned)["axis_angle_deg"] == pytest.approx(60, abs=3)
    assert any("long axis is turned" in r for r in shape_reasons("right", mask_shape(turned), rules))
    assert mask_shape(np.zeros(CROP_SHAPE, np.uint8)) is None and shape_reasons("left", None, rules) == []
    assert atlas_distance_reasons("left", 5.0, rules) == []
    assert "registration or the segmentation is wrong" in atlas_distance_reasons("left", 20.0, rules)[0]


# ------------------------------------------------------------------------------------------------ crops


def test_training_pose_turns_the_atlas_axis_into_the_training_axis():
    pitch, yaw = np.radians(TRAINING_AXIS_PITCH_YAW_DEG)
    train = np.array([np.tan(yaw), 1.0, np.tan(pitch)])
    q = training_pose()
    np.testing.assert_allclose(q @ (train / np.linalg.norm(train)),
                               np.asarray(ATLAS_AXIS_MNI) / np.linalg.norm(ATLAS_AXIS_MNI), atol=1e-9)
    assert np.linalg.det(q) == pytest.approx(1.0)


def test_right_crop_is_the_mirror_image_of_the_left():
    """A head symmetric about x = 0: the right side's crop equals the left side's crop of the
    mirrored head, voxel for voxel; and crop -> scan -> crop mapping puts labels back in place."""
    rng = np.random.default_rng(1)
    shape = (101, 100, 90)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-50.0, -60.0, -60.0]  # x index 50 is x = 0 mm: [::-1] mirrors about x = 0
    head = rng.uniform(0, 100, shape).astype(np.float32)
    mirrored = head[::-1].copy()
    centre = np.array([-27.0, -20.0, -15.0])
    left = crop_geometry(np.eye(3), centre, "left")
    right = crop_geometry(np.eye(3), centre * [-1, 1, 1], "right")
    assert right.mirrored and not left.mirrored
    a, out_a = sample_crop(mirrored, affine, right)
    b, out_b = sample_crop(head, affine, left)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert out_a == out_b == 0.0
    np.testing.assert_allclose(right.centre_scan_mm, centre * [-1, 1, 1], atol=1e-9)
    # labels back onto the scan: the crop's low-x (lateral) face lands at the patient's far right
    labels = np.zeros(right.shape, np.uint8)
    labels[0:3, 20:30, 15:20] = 1
    probs = np.stack([labels == k for k in range(3)]).astype(np.float32)
    sub, box = probabilities_to_scan(probs, right, shape, affine)
    full = np.zeros(shape, np.uint8)
    full[box] = sub
    assert abs(int(full.sum()) - int(labels.sum())) <= 0.05 * labels.sum()  # nearest sampling, rotated grid
    xs = np.argwhere(full)[:, 0] + affine[0, 3]
    lateral_face = right.to_scan(np.array([[0, 25, 17], [2, 25, 17]]))[:, 0]
    assert xs.min() > 0 and lateral_face[1] - 1.5 <= xs.mean() <= lateral_face[0] + 1.5
    assert crop_edge_faces(labels, "right") == ["lateral"]


def test_crops_follow_a_rotated_head():
    """Rotating the head and passing the rotation gives the same crop (up to interpolation)."""
    rng = np.random.default_rng(2)
    from scipy import ndimage

    base = ndimage.gaussian_filter(rng.uniform(0, 100, (80, 80, 80)).astype(np.float32), 2)
    affine = np.eye(4)
    affine[:3, 3] = -40.0
    rot = _rotation(0, 30) @ _rotation(1, -20)
    turned = _move_head(ScanVolume(base, affine, (1.0, 1.0, 1.0)), rot)
    centre = np.array([5.0, -3.0, 2.0])
    a, _ = sample_crop(base, affine, crop_geometry(np.eye(3), centre, "left"))
    b, _ = sample_crop(turned, affine, crop_geometry(rot, rot @ centre, "left"))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.97


# ------------------------------------------------------------------------------------------------ segment (stub model)


def test_segment_wholehead_places_both_sides_with_a_stub_model():
    image, affine = _blank_head()
    reg = Registration(np.eye(4), score=-0.4)  # the scan is in MNI's pose
    agent = BlobAgent()
    result = segment_wholehead(image, affine, agent, registration=reg, spacing=(1.5, 1.5, 1.5))
    assert agent.calls == 4  # two sides, one refinement each
    assert set(np.unique(result.labels)) == {0, 1, 2, 3, 4}
    assert set(LABELS) == {0, 1, 2, 3, 4}
    for side, sign in (("left", -1), ("right", 1)):
        s = result.side(side)
        assert s.volumes.total_mm3 > 0 and np.sign(s.centroid_scan_mm[0]) == sign
        np.testing.assert_allclose(s.centroid_mni, HIPPOCAMPUS_CENTROIDS_MNI[side], atol=1.5)
        # the anterior label lies anterior (higher y) of the posterior one on the scan grid
        ant = np.argwhere(s.labels == 1).mean(0)
        post = np.argwhere(s.labels == 2).mean(0)
        assert ant[1] > post[1]
        assert s.volumes.total_mm3 == pytest.approx(s.crop_volumes_mm3["total"], rel=0.06)
        assert s.refine_shift_mm < 0.5
    assert result.asymmetry_index == pytest.approx(asymmetry_index(result.left.volumes.total_mm3,
                                                                   result.right.volumes.total_mm3))
    d = result.as_dict()
    assert d["left"]["touches_crop_edge"] == [] and d["etiv_mm3"] == pytest.approx(1_948_106, rel=1e-6)
    assert not any("registration" in r for r in result.review)


class ConcurrentBlobAgent(BlobAgent):
    """A :class:`BlobAgent` that can be called from two threads at once (as ONNX Runtime sessions
    can): records which thread ran each call and how many calls overlapped."""

    def __init__(self):
        super().__init__()
        import threading

        self.lock, self.threads, self.running, self.overlapped = threading.Lock(), set(), 0, 0
        self.concurrent_for = None

    def for_concurrent_calls(self, callers):
        self.concurrent_for = callers
        return self

    def segment(self, volume, return_probabilities=False):
        import threading
        import time as _time

        with self.lock:
            self.running += 1
            self.overlapped = max(self.overlapped, self.running)
            self.threads.add(threading.get_ident())
        try:
            _time.sleep(0.05)  # long enough for the other side's call to start meanwhile
            return super().segment(volume, return_probabilities)
        finally:
            with self.lock:
                self.running -= 1


def test_both_sides_run_at_once_where_the_agent_allows_and_give_the_same_result():
    image, affine = _blank_head()
    reg = Registration(np.eye(4), score=-0.4)
    agent = ConcurrentBlobAgent()
    at_once = segment_wholehead(image, affine, agent, registration=reg, locator=agent)
    assert agent.concurrent_for == 2 and agent.overlapped == 2 and len(agent.threads) == 2
    in_turn_agent = ConcurrentBlobAgent()
    in_turn = segment_wholehead(image, affine, in_turn_agent, registration=reg, locator=in_turn_agent,
                                sides_at_once=False)
    assert in_turn_agent.concurrent_for is None and in_turn_agent.overlapped == 1
    plain = BlobAgent()  # no for_concurrent_calls: one side after the other
    assert segment_wholehead(image, affine, plain, registration=reg).left.volumes == at_once.left.volumes
    for side in ("left", "right"):
        a, b = at_once.side(side), in_turn.side(side)
        assert (a.labels == b.labels).all() and a.volumes == b.volumes and a.passes == b.passes
    assert at_once.review == in_turn.review
    assert set(at_once.timings_s) == set(in_turn.timings_s) and at_once.timings_s["infer"] > 0


def test_segment_wholehead_refuses_a_crop_and_flags_coverage():
    image, affine = _blank_head(shape=(40, 50, 40), spacing=1.0)
    with pytest.raises(ValueError, match="too small for a whole head"):
        segment_wholehead(image, affine, BlobAgent(), registration=Registration(np.eye(4), -0.4))
    with pytest.raises(ValueError, match="does not match"):
        segment_wholehead(*_blank_head(), BlobAgent(), spacing=(1.0, 1.0, 1.0))
    # a head cut off below z = -10 mm: the temporal lobes are not covered
    image, affine = _blank_head(shape=(120, 150, 70), spacing=1.5)
    affine[2, 3] = -10.0
    result = segment_wholehead(image, affine, BlobAgent(), registration=Registration(np.eye(4), -0.1))
    text = " ".join(result.review)
    assert "does not cover the left temporal lobe" in text
    # a poor Mattes MI alone is a note (it depends on contrast, field of view and skull), not a review reason
    assert "score" not in text and any("registration score -0.10" in n for n in result.notes)


class MemberBlobAgent(BlobAgent):
    """:class:`BlobAgent` as a five-member ensemble with ``segment_members``: member ``k``'s blob is
    ``1 + spread * k`` times as long (crop y), so ``spread=0`` gives identical members."""

    def __init__(self, spread: float = 0.0, members: int = 5):
        super().__init__()
        self.spread, self.n, self.member_calls = spread, members, 0

    def segment_members(self, volume):
        from hippo.infer import MemberSegmentation

        self.calls += 1
        self.member_calls += 1
        shape = np.asarray(volume.shape)
        c = np.asarray(CENTRE_FRACTION) * (shape - 1)
        idx = np.indices(volume.shape).astype(float)
        parts = []
        for k in range(self.n):
            r = ((idx[0] - c[0]) / 6) ** 2 + ((idx[1] - c[1]) / (10 * (1 + self.spread * k))) ** 2 \
                + ((idx[2] - c[2]) / 5) ** 2
            lab = np.where(r <= 1, np.where(idx[1] >= c[1], 1, 2), 0)
            parts.append(np.stack([lab == j for j in range(3)]).astype(np.float32))
        probs = np.mean(parts, axis=0)
        labels = probs.argmax(0).astype(np.uint8)
        return MemberSegmentation(labels, probs, tuple(parts), labels)


def test_each_side_gets_a_quality_score_from_the_final_ensemble_pass():
    image, affine = _blank_head()
    reg = Registration(np.eye(4), score=-0.4)
    agent = MemberBlobAgent(spread=0.0)
    result = segment_wholehead(image, affine, agent, registration=reg, spacing=(1.5, 1.5, 1.5))
    assert agent.calls == 4 and agent.member_calls == 4  # the ensemble's own passes, nothing extra
    for side in ("left", "right"):
        q = result.side(side).quality
        assert q.score == pytest.approx(1.0) and q.n_members == 5 and not q.flagged
    assert not any(r.startswith(("left:", "right:")) for r in result.review)
    d = result.as_dict()
    assert set(d["quality"]) == {"left", "right"} and d["quality"]["left"]["score"] == pytest.approx(1.0)
    assert "quality" in result.timings_s

    # members that disagree: each side flagged, the reasons in the review prefixed with the side
    result = segment_wholehead(image, affine, MemberBlobAgent(spread=0.3), registration=reg)
    for side in ("left", "right"):
        q = result.side(side).quality
        assert q.flagged and q.score < 0.85, q
        assert any(r.startswith(f"{side}: the model's 5 networks disagree") for r in result.review)
    # an agent with segment() only: no agreement score, the plain checks of the mask still run
    result = segment_wholehead(image, affine, BlobAgent(), registration=reg)
    assert result.left.quality.score is None and result.left.quality.n_members == 1
    assert not result.left.quality.flagged
    # the crop-edge and volume checks stay the whole-head review's own (no second sentence for them)
    assert result.left.quality.reasons == []


class IntensityAgent:
    """Stands in for the model on a scan that holds a bright smooth ellipsoid per side: the
    foreground probability is a ramp of the crop's intensity (0 at 30, 1 at 70), split into
    anterior (high crop y) and posterior; labels where it passes 0.5."""

    def __init__(self):
        self.calls = 0

    def segment(self, volume, return_probabilities=False):
        self.calls += 1
        v = np.asarray(volume, np.float32)
        fg = np.clip((v - 30.0) / 40.0, 0.0, 1.0)
        ant = np.indices(v.shape)[1] >= CENTRE_FRACTION[1] * (v.shape[1] - 1)
        probs = np.stack([1.0 - fg, fg * ant, fg * ~ant]).astype(np.float32)
        labels = np.where(fg > 0.5, np.where(ant, 1, 2), 0).astype(np.uint8)
        return (labels, probs) if return_probabilities else labels


def _ellipsoid_head(grid_shift=(0.0, 0.0, 0.0), offset_mm=(0.0, 0.0, 0.0), spacing=1.5, shape=(120, 150, 120)):
    """A 1.5 mm scan in MNI's pose holding, per side, a smooth bright ellipsoid (semi-axes 7, 16,
    6 mm) at the atlas hippocampus centroid moved by ``offset_mm``; the voxel grid's origin moved by
    ``grid_shift`` voxels (the same anatomy sampled on another grid)."""
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = -np.asarray(shape) * spacing / 2 + np.asarray(grid_shift) * spacing
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3].astype(np.float32) @ idx + affine[:3, 3:4].astype(np.float32)
    image = np.zeros(idx.shape[1], np.float32)
    for side in ("left", "right"):
        c = np.asarray(HIPPOCAMPUS_CENTROIDS_MNI[side], np.float32) + np.asarray(offset_mm, np.float32)
        r = np.sqrt((((world - c[:, None]) / np.array([[7.0], [16.0], [6.0]], np.float32)) ** 2).sum(0))
        image = np.maximum(image, 100.0 / (1.0 + np.exp(np.minimum((r - 1.0) * 8.0, 50.0))))
    return image.reshape(shape), affine


def test_reported_volume_is_the_soft_volume_and_holds_on_another_voxel_grid():
    """The reported volume is the ensemble's expected (soft) volume on the crop grid; the same
    anatomy on a grid shifted by a fraction of a voxel gives it again within 0.3 %, while the label
    map's count on the 1.5 mm scan grid moves by several times that. The label counts stay in the
    result beside it."""
    from hippo.wholehead.segment import VOLUME_METHOD, SideVolumes, soft_volumes

    reg = Registration(np.eye(4), score=-0.4)
    soft, counted = {"left": [], "right": []}, {"left": [], "right": []}
    for shift in ((0.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.3, -0.2, 0.45), (-0.4, 0.15, -0.25)):
        image, affine = _ellipsoid_head(grid_shift=shift)
        result = segment_wholehead(image, affine, IntensityAgent(), registration=reg)
        for side in ("left", "right"):
            s = result.side(side)
            v = s.volumes
            assert isinstance(v, SideVolumes)
            # the soft volume of the final crop, as soft_volumes gives it from the crop's own result
            labels, probs = IntensityAgent().segment(s.crop_image, return_probabilities=True)
            expect = soft_volumes(probs, labels)
            assert v.total_mm3 == pytest.approx(expect["total"], rel=1e-5)
            assert v.anterior_mm3 == pytest.approx(expect["anterior"], rel=1e-5)
            assert v.total_mm3 == pytest.approx(v.anterior_mm3 + v.posterior_mm3)
            assert v.label_total_mm3 == pytest.approx(v.total_voxels * 1.5 ** 3)
            assert v.label_total_mm3 == pytest.approx(float((s.labels > 0).sum()) * 1.5 ** 3)
            d = s.as_dict()
            assert d["total_mm3"] == pytest.approx(v.total_mm3, abs=0.1)
            assert d["label_map_mm3"]["total"] == pytest.approx(v.label_total_mm3, abs=0.1)
            assert d["volume_method"] == VOLUME_METHOD and d["volume_method"].startswith("soft")
            soft[side].append(v.total_mm3)
            counted[side].append(v.label_total_mm3)
    for side in ("left", "right"):
        spread = max(soft[side]) / min(soft[side]) - 1
        label_spread = max(counted[side]) / min(counted[side]) - 1
        assert 0.9 * 4 / 3 * np.pi * 7 * 16 * 6 < soft[side][0] < 1.1 * 4 / 3 * np.pi * 7 * 16 * 6
        assert spread < 0.003, (side, soft[side])
        assert label_spread > 2 * spread, (side, counted[side], soft[side])


def test_a_locator_pass_far_off_looks_again_before_the_ensemble():
    """The registration 20 mm off (the hippocampus half out of the first crop): the light locator
    is re-centred and run again (``relocate_mm``), and the ensemble settles in one pass per side with
    the volume of a well-placed crop."""
    reg = Registration(np.eye(4), score=-0.4)
    image, affine = _ellipsoid_head()
    placed = segment_wholehead(image, affine, IntensityAgent(), registration=reg, locator=IntensityAgent())
    image, affine = _ellipsoid_head(offset_mm=(0.0, 0.0, 20.0))
    agent, locator = IntensityAgent(), IntensityAgent()
    result = segment_wholehead(image, affine, agent, registration=reg, locator=locator)
    assert agent.calls == 2 and locator.calls >= 4  # one ensemble pass per side, the locator twice or more
    for side in ("left", "right"):
        s = result.side(side)
        assert s.settled and s.final_offset_mm < 0.5 and s.refine_shift_mm > 15
        assert s.volumes.total_mm3 == pytest.approx(placed.side(side).volumes.total_mm3, rel=0.01)
    # without it the ensemble's own passes do the walking
    agent, locator = IntensityAgent(), IntensityAgent()
    segment_wholehead(image, affine, agent, registration=reg, locator=locator, relocate_passes=0)
    assert locator.calls == 2 and agent.calls > 2


def test_the_page_gives_one_quality_line_per_side():
    from hippo.dicom.report import quality_text
    from hippo.wholehead.page import render_wholehead_report

    image, affine = _blank_head(shape=(60, 70, 60))
    labels = np.zeros(image.shape, np.uint8)
    labels[20:24, 30:36, 28:32], labels[36:40, 30:36, 28:32] = 1, 3
    summary = {"left": {"total_mm3": 100.0}, "right": {"total_mm3": 100.0}, "review": []}
    plain = render_wholehead_report(image, labels, (1.5,) * 3, summary)
    q = {"score": 0.93, "flagged": False, "n_members": 5}
    page = render_wholehead_report(image, labels, (1.5,) * 3, {**summary, "quality": {"left": q, "right": q}})
    assert page.height == plain.height + 2 * 20 + 8  # one line per side
    assert quality_text(q).startswith("Segmentation quality score 0.93 (agreement of the model's 5 networks")


def test_review_sentences():
    rules = ReviewRules()
    assert volume_reasons("left", 0, 0, rules) == ["no left hippocampus was found"]
    assert "outside the believable" in volume_reasons("right", 300, 300, rules)[0]
    assert volume_reasons("right", 1500, 1500, rules) == []
    affine = np.eye(4)
    affine[:3, 3] = -100.0  # covers -100..99 mm
    assert coverage_reasons(lambda p: np.asarray(p), (200, 200, 200), affine) == []
    assert "right temporal lobe" in coverage_reasons(lambda p: np.asarray(p), (150, 200, 200), affine)[0]
    r = ReviewRules.from_mapping({"total_mm3": [10, 20], "min_voxel_mm": 0.25})
    assert r.total_mm3 == (10.0, 20.0)
    with pytest.raises(ValueError, match="ReviewRules: unknown setting.*'unknown'"):
        ReviewRules.from_mapping({"total_mm3": [10, 20], "unknown": 1})


# ------------------------------------------------------------------------------------------------ real scans, the model


@pytest.fixture(scope="module")
def agent():
    from hippo.infer import InferenceAgent
    from hippo.weights import resolve_model_path

    return InferenceAgent.from_file(resolve_model_path(None, "outputs"), precision="auto")


def _segment(agent, array, affine):
    from hippo.wholehead.segment import locator_agent

    return segment_wholehead(array, affine, agent, locator=locator_agent(agent))


@pytest.mark.realdata
def test_fs_subject_against_freesurfer(agent):
    """Dice against FreeSurfer's hippocampus (17 left, 53 right) about 0.79/0.81; sides not
    swapped; our protocol's volumes below FreeSurfer's (25-30 % here)."""
    root = require_wholehead()
    scan = read_scan(root / SCANS["fs_subject"])
    aseg = read_scan(root / "fs_subject/aparc.a2009s+aseg.mgz", refuse_label_maps=False).array
    result = _segment(agent, scan.array, scan.affine)
    left, right = result.left.labels > 0, result.right.labels > 0
    assert dice(left, aseg == 17) > 0.72
    assert dice(right, aseg == 53) > 0.72
    assert dice(left, aseg == 53) < 0.05 and dice(right, aseg == 17) < 0.05  # not swapped
    fs_left, fs_right = (aseg == 17).sum(), (aseg == 53).sum()
    assert 0.6 * fs_left < result.left.volumes.total_mm3 < fs_left
    assert 0.6 * fs_right < result.right.volumes.total_mm3 < fs_right
    assert result.review == []
    assert result.left.quality.score > 0.85 and result.right.quality.score > 0.85  # measured 0.92 / 0.93
    assert 1.2e6 < result.etiv_mm3 < 1.6e6  # hippodeep: 1.37e6


def _fs_variant(scan: ScanVolume, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fs_subject (skull-stripped, LIA 256³) changed as real inputs differ: ``(array, affine, world)``,
    ``world`` (4 x 4) taking the stored scan's RAS mm to the variant's (for the labels' centroids)."""
    from scipy import ndimage

    a, aff = scan.array.astype(np.float32), scan.affine
    world = np.eye(4)

    def onto(new_aff, shape, w=world):
        m = np.linalg.inv(aff) @ np.linalg.inv(w) @ new_aff
        return ndimage.affine_transform(a, m[:3, :3], m[:3, 3], output_shape=shape, order=1)

    if name == "neck":  # 110 mm more field of view below, filled with a tissue-bright neck and shoulders
        new = aff.copy()
        new[:3, 3] = aff[:3, 3] + aff[:3, :3] @ np.array([0.0, 110.0, 0.0])  # LIA: +j is inferior
        out = onto(new, (256, 366, 256))
        idx = np.indices(out.shape, dtype=np.float32)
        x, y, z = (sum(new[r, c] * idx[c] for c in range(3)) + new[r, 3] for r in range(3))
        depth = -60.0 - z
        rx = np.clip(np.where(depth < 50, 55.0, 55.0 + 3 * (depth - 50)), None, 125)
        neck = (depth > 0) & ((x / rx) ** 2 + ((y + 15) / 60) ** 2 <= 1) & (out < 5)
        out[neck] = 60.0 * np.random.default_rng(0).normal(1.0, 0.15, int(neck.sum()))
        return out, new, world
    if name == "oblique20":  # the head turned 20° about an oblique axis, same grid
        from scipy.spatial.transform import Rotation

        c = aff[:3, :3] @ np.full(3, 127.5) + aff[:3, 3]
        rot = Rotation.from_rotvec(np.array([1.0, 0.6, 0.4]) / np.linalg.norm([1.0, 0.6, 0.4]) * np.radians(20)).as_matrix()
        world = np.eye(4)
        world[:3, :3], world[:3, 3] = rot, c - rot @ c
        return onto(aff, a.shape, world), aff, world
    if name == "fov_cut":  # a tight field of view: the brain's top 20 mm and all below 110 mm under it cut
        zs = np.argwhere(a > 10)[:, 1]  # LIA: axis 1 runs inferior
        top = int(zs.min())
        out = a[:, top + 20: top + 130].copy()
        new = aff.copy()
        new[:3, 3] = aff[:3, 3] + aff[:3, :3] @ np.array([0.0, top + 20.0, 0.0])
        return out, new, world
    if name == "mm2_uint8_ras":  # 2 mm voxels in RAS order, stored as 12-bit integers
        corners = np.array([aff[:3, :3] @ (np.array(c) * 255.0) + aff[:3, 3] for c in np.ndindex(2, 2, 2)])
        new = np.diag([2.0, 2.0, 2.0, 1.0])
        new[:3, 3] = corners.min(axis=0)
        out = onto(new, (128, 128, 128))
        return np.round(out * 4095.0 / max(float(out.max()), 1.0)).astype(np.int16), new, world
    raise ValueError(name)


FS_VARIANTS = ["neck", "fov_cut", pytest.param("oblique20", marks=pytest.mark.slow),
               pytest.param("mm2_uint8_ras", marks=pytest.mark.slow)]


@pytest.mark.realdata
@pytest.mark.parametrize("variant", FS_VARIANTS)
def test_fs_subject_variants_localise_near_the_labels(variant):
    """fs_subject with a neck added, a tight field of view, turned 20°, or at 2 mm in RAS integers:
    the registration puts each crop centre within 7 mm of FreeSurfer's hippocampus centroid (as
    stored: 4.1 / 3.0 mm; the locator pass re-centres from there)."""
    root = require_wholehead()
    scan = read_scan(root / SCANS["fs_subject"])
    aseg = read_scan(root / "fs_subject/aparc.a2009s+aseg.mgz", refuse_label_maps=False)
    array, affine, world = _fs_variant(scan, variant)
    reg = register_to_template(array, affine)
    for side, label in (("left", 17), ("right", 53)):
        idx = np.argwhere(aseg.array == label).mean(axis=0)
        truth = world[:3, :3] @ (aseg.affine[:3, :3] @ idx + aseg.affine[:3, 3]) + world[:3, 3]
        assert np.linalg.norm(reg.to_scan(HIPPOCAMPUS_CENTROIDS_MNI[side]) - truth) < 7.0, (side, reg.as_dict())


@pytest.mark.realdata
def test_inverted_contrast_is_flagged_by_the_quality_score(agent):
    """The fs_subject scan with its intensities inverted (a stand-in for a wrong, T2-like sequence):
    both sides' quality flagged, the scan goes to review with the side named."""
    scan = read_scan(require_wholehead() / SCANS["fs_subject"])
    result = _segment(agent, scan.array.max() - scan.array, scan.affine)
    for side in ("left", "right"):
        assert result.side(side).quality.flagged
        assert any(r.startswith(f"{side}: ") for r in result.review)


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCANS))
def test_both_sides_on_every_scan(agent, name):
    """Both hippocampi found, left of the midline on the left, within 20 % of hippodeep's volumes
    (protocols differ: ours run 3-10 % lower here), no review flag beyond coarse voxels."""
    scan = read_scan(require_wholehead() / SCANS[name])
    result = _segment(agent, scan.array, scan.affine)
    for side, ref in zip(("left", "right"), HIPPODEEP[name]):
        s = result.side(side)
        assert s.volumes.anterior_mm3 > 800 and s.volumes.posterior_mm3 > 800, side
        assert 0.8 * ref < s.volumes.total_mm3 < 1.2 * ref, (side, s.volumes.total_mm3, ref)
        assert s.edge_faces == []
    assert result.left.centroid_scan_mm[0] < result.right.centroid_scan_mm[0]
    assert result.left.centroid_mni[0] < 0 < result.right.centroid_mni[0]
    assert result.review == []


@pytest.fixture(scope="module")
def chris(agent):
    scan = read_scan(require_wholehead() / SCANS["chris"])
    return scan, _segment(agent, scan.array, scan.affine)


def _assert_within(result, reference, tolerance=0.03, swapped=False):
    for side, other in (("left", "right"), ("right", "left")):
        want = reference.side(other if swapped else side).volumes.total_mm3
        got = result.side(side).volumes.total_mm3
        assert abs(got / want - 1) < tolerance, (side, got, want)


INVARIANCE = {
    "pitch +30": (_rotation(0, 30), (0, 0, 0)),
    "pitch -30": (_rotation(0, -30), (0, 0, 0)),
    "roll 30": (_rotation(1, 30), (0, 0, 0)),
    "yaw 30": (_rotation(2, 30), (0, 0, 0)),
    "oblique 30": (_rotation(0, 20) @ _rotation(1, 15) @ _rotation(2, 15), (0, 0, 0)),
    "shifted": (np.eye(3), (7.3, -11.6, 5.2)),
}


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(INVARIANCE))
def test_turned_or_moved_head_gives_the_same_volumes(agent, chris, case):
    scan, reference = chris
    rotation, shift = INVARIANCE[case]
    moved = _move_head(scan, rotation, shift)
    _assert_within(_segment(agent, moved, scan.affine), reference)


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("mm", [0.7, 1.3])
def test_other_voxel_size_gives_the_same_volumes(agent, chris, mm):
    scan, reference = chris
    array, affine = _resample(scan, mm)
    _assert_within(_segment(agent, array, affine), reference)


@pytest.mark.realdata
@pytest.mark.slow
def test_permuted_axes_give_the_same_volumes(agent, chris, tmp_path):
    """Stored as PIR (axes permuted and flipped) in a file: read back, the same volumes."""
    scan, reference = chris
    data = np.transpose(scan.array, (1, 2, 0))[::-1, ::-1].astype(np.uint8)
    # new voxel (i, j, k) = old (ny-1-i, nz-1-j, k)
    n = scan.array.shape
    perm = np.zeros((4, 4))
    perm[1, 0], perm[2, 1], perm[0, 2], perm[3, 3] = -1, -1, 1, 1
    perm[1, 3], perm[2, 3] = n[1] - 1, n[2] - 1
    path = tmp_path / "pir.nii.gz"
    nib.save(nib.Nifti1Image(data, scan.affine @ perm), str(path))
    again = read_scan(path)
    assert nib.aff2axcodes(nib.load(str(path)).affine) == ("P", "I", "R")
    np.testing.assert_array_equal(again.array, scan.array.astype(np.uint8))
    _assert_within(_segment(agent, again.array, again.affine), reference, tolerance=0.005)


@pytest.mark.realdata
@pytest.mark.slow
def test_mirrored_scan_swaps_the_sides(agent, chris):
    scan, reference = chris
    result = _segment(agent, scan.array[::-1].copy(), scan.affine)
    _assert_within(result, reference, swapped=True)


def test_page_label_planes_and_centres_match_the_whole_volume_remap():
    """The page and thumbnail remap only the planes they draw and find each side's centre inside
    the labels' bounding box: the same as remapping and searching the whole volume."""
    from hippo.wholehead.page import LabelPlanes, label_centre

    rng = np.random.default_rng(0)
    labels = np.zeros((40, 50, 30), np.uint8)
    labels[5:12, 10:30, 8:14] = rng.integers(1, 3, (7, 20, 6))
    labels[25:33, 12:28, 9:15] = rng.integers(3, 5, (8, 16, 6))
    right = LabelPlanes(labels, {3: 1, 4: 2})
    whole = np.where((labels > 2) & (labels <= 4), labels - 2, 0)
    np.testing.assert_array_equal(right[:, 20, :], whole[:, 20, :])
    np.testing.assert_array_equal(right[28, :, :], whole[28, :, :])
    assert right.shape == labels.shape
    for values in ((1, 2), (3, 4)):
        np.testing.assert_allclose(label_centre(labels, values), np.argwhere(np.isin(labels, values)).mean(0))
    assert label_centre(np.zeros_like(labels), (1, 2)) is None
