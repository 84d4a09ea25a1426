"""Every enhanced layout archives send, read as the classic series would be (issue 28).

Fast part (small synthetic volumes written by the scanner emulator, no model): one multi-frame
instance, several multi-frame instances, one single-frame enhanced instance per slice, Legacy
Converted Enhanced MR; pixel measures and orientation in the shared or the per-frame functional
groups. Each is selected by the default rules, loads to the classic twin's array and affine, and
its SEG and SR reference the real instances and frames and pass dciodvfy. The real Siemens XA
enhanced image (per-frame pixel measures) makes a conformant SEG. Whole-head selection decides
"T1" and "post-contrast" from the headers (classic attributes and functional groups), names the
attribute that decided, and keeps a user override.

Slow part (``realdata`` + ``slow``): a real whole-head T1 from ``../shared/data/wholehead``
through ``hippo.deploy`` in each enhanced layout and as classic twin: the same volumes (within
0.5 %), SC / SEG / SR dciodvfy-clean.
"""

from __future__ import annotations

import glob
import logging
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from conftest import dciodvfy_problems
from hippo.dicom.headers import clean_source_headers
from hippo.dicom.ingest import SelectionRules, SeriesSelectionError, scan_study, select_series
from hippo.dicom.objects import make_seg, make_sr, make_wholehead_seg, make_wholehead_sr
from hippo.dicom.volume import SeriesGeometryError, load_series
from hippo.dicom.wholehead_select import WholeHeadRules, select_input_series
from hippo.measure import measure_volumes
from hippo.scanner import StudyInfo, write_series, write_wholehead_study

ROOT = Path(__file__).resolve().parents[1]
WHOLEHEAD = ROOT.parent / "shared/data/wholehead"
VENDOR = ROOT.parent / "shared/data/vendor_dicom"

#: name -> write_series keywords of the layout
LAYOUTS = {
    "enhanced-one-instance": dict(layout="enhanced"),
    "enhanced-one-instance-per-frame-groups": dict(layout="enhanced", functional_groups="per_frame"),
    "enhanced-several-instances": dict(layout="enhanced", frames_per_instance=4),
    "enhanced-several-instances-per-frame-groups": dict(layout="enhanced", frames_per_instance=5,
                                                        functional_groups="per_frame"),
    "enhanced-single-frame-instances": dict(layout="enhanced", frames_per_instance=1),
    "enhanced-single-frame-instances-per-frame-groups": dict(layout="enhanced", frames_per_instance=1,
                                                             functional_groups="per_frame"),
    "legacy-converted-one-instance": dict(layout="legacy"),
    "legacy-converted-several-instances-per-frame-groups": dict(layout="legacy", frames_per_instance=6,
                                                               functional_groups="per_frame"),
}

SHAPE = (14, 17, 13)


def _volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(28)
    vol = rng.normal(400, 120, SHAPE).clip(0).astype(np.float32)  # float data: slope/intercept stored
    theta = np.radians(12)
    rot = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.1, 0.9, 1.4])
    aff[:3, 3] = [-8.0, 12.0, -20.0]
    return vol, aff


def _labels(shape) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[2:5, 3:7, 2:5] = 1
    labels[2:5, 7:11, 3:6] = 2
    labels[9:12, 3:7, 2:5] = 3
    labels[9:12, 7:11, 3:6] = 4
    return labels


def _seg_frames(seg_path: Path, volume) -> np.ndarray:
    """The SEG read back onto the source frames, in ``volume.to_source`` order."""
    back = hd.seg.segread(seg_path)
    rows, cols = volume.source_shape[1:]
    out = np.zeros(volume.source_shape, np.uint8)
    for i, (index, frame) in enumerate(volume.frame_references):
        uid = str(volume.datasets[index].SOPInstanceUID)
        if frame is None:
            out[i] = back.get_pixels_by_source_instance([uid], combine_segments=True)[0]
        else:
            out[i] = back.get_pixels_by_source_frame(uid, [frame], combine_segments=True)[0]
    assert out.shape == (len(volume.frame_references), rows, cols)
    return out


@pytest.mark.parametrize("slice_axis", [0, 2], ids=["sagittal", "axial"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_enhanced_layout_reads_like_its_classic_twin_and_its_seg_and_sr_conform(name, slice_axis, tmp_path):
    vol, aff = _volume()
    study = StudyInfo(seed=5)
    classic = load_series(write_series(vol, aff, tmp_path / "classic", study=study, slice_axis=slice_axis))
    paths = write_series(vol, aff, tmp_path / name, study=study, slice_axis=slice_axis, file_names="random",
                         **LAYOUTS[name])
    kw = LAYOUTS[name]
    n_slices = SHAPE[slice_axis]
    per = kw.get("frames_per_instance") or n_slices
    assert len(paths) == -(-n_slices // per)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert first.SOPClassUID == {"enhanced": pydicom.uid.EnhancedMRImageStorage,
                                 "legacy": pydicom.uid.LegacyConvertedEnhancedMRImageStorage}[kw["layout"]]
    per_frame = kw.get("functional_groups") == "per_frame"
    assert ("PixelMeasuresSequence" in first.PerFrameFunctionalGroupsSequence[0]) == per_frame
    assert ("PixelMeasuresSequence" in first.SharedFunctionalGroupsSequence[0]) != per_frame
    assert "PixelSpacing" not in first and "ImagePositionPatient" not in first

    # selection (headers only) and the volume: the classic twin's, exactly
    series = select_series(scan_study(tmp_path / name))
    assert series.n_instances == len(paths) and series.n_frames == n_slices and series.geometry_problems() == []
    volume = load_series(series.files)
    assert volume.is_multiframe and len(volume.datasets) == len(paths)
    np.testing.assert_array_equal(volume.array, classic.array)
    np.testing.assert_allclose(volume.affine, classic.affine, atol=1e-6)
    labels = _labels(volume.array.shape)
    frames = volume.to_source(labels)
    assert frames.shape == (n_slices, *classic.source_shape[1:])
    np.testing.assert_array_equal(volume.from_source(frames), labels)
    refs = volume.frame_references
    assert len(refs) == n_slices and len(set(refs)) == n_slices
    assert {i for i, _ in refs} == set(range(len(paths))) and all(f is not None and f >= 1 for _, f in refs)

    # SEG + SR (HippoCrop's two segments and the whole head's four): every source instance and
    # frame referenced, pixel-aligned, dciodvfy-clean
    sources, _ = clean_source_headers(volume.datasets)
    seg4 = make_wholehead_seg(sources, frames, model_version="t", sop_instance_uid=pydicom.uid.generate_uid())
    sides = {"left": measure_volumes(np.where(labels <= 2, labels, 0), volume.spacing),
             "right": measure_volumes(np.where(labels > 2, labels - 2, 0), volume.spacing)}
    sr4 = make_wholehead_sr(sources, seg4, sides, asymmetry_index_percent=0.0, etiv_mm3=1.4e6, model_version="t")
    two = np.where(labels <= 2, labels, 0)
    seg2 = make_seg(sources, volume.to_source(two), model_version="t")
    sr2 = make_sr(sources, seg2, measure_volumes(two, volume.spacing), model_version="t")
    written = {}
    for key, ds in (("seg4", seg4), ("sr4", sr4), ("seg2", seg2), ("sr2", sr2)):
        written[key] = tmp_path / f"{key}.dcm"
        ds.save_as(written[key], enforce_file_format=True)
        assert dciodvfy_problems(written[key])["errors"] == [], key
    np.testing.assert_array_equal(_seg_frames(written["seg4"], volume), frames)
    np.testing.assert_array_equal(_seg_frames(written["seg2"], volume), volume.to_source(two))
    seg = pydicom.dcmread(written["seg4"])
    real = {str(d.SOPInstanceUID) for d in volume.datasets}
    listed = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert listed == real and {str(i.ReferencedSOPInstanceUID) for i in seg.SourceImageSequence} == real
    derived = {(str(s.ReferencedSOPInstanceUID), int(s.ReferencedFrameNumber), str(s.ReferencedSOPClassUID))
               for item in seg.PerFrameFunctionalGroupsSequence
               for d in item.DerivationImageSequence for s in d.SourceImageSequence}
    assert {(u, f) for u, f, _ in derived} == {(str(volume.datasets[i].SOPInstanceUID), f) for i, f in refs}
    assert {c for _, _, c in derived} == {str(first.SOPClassUID)}
    # the whole-head SR's segment references name the SEG, the segment and the source series (the
    # SEG names each frame's source above); the HippoCrop SR's name the real instances; both hold
    # every instance as evidence
    sr = pydicom.dcmread(written["sr4"])
    refs = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_volumetric_roi_measurement_groups()
    assert len(refs) == 4
    for group in refs:
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert str(ref.source_series_for_segmentation.value) == str(first.SeriesInstanceUID)
    assert sorted(int(g.referenced_segment.referenced_segment_numbers[0]) for g in refs) == [1, 2, 3, 4]
    images = [e for e in pydicom.dcmread(written["sr2"]).ContentSequence[-1].iterall()
              if e.keyword == "ReferencedSOPSequence"]
    assert real <= {str(i.ReferencedSOPInstanceUID) for e in images for i in e.value}
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert real <= evidence


def test_frames_are_checked_across_instances_like_slices(tmp_path):
    """A missing instance of a several-instance series is a gap (named by file and frame); two
    instances holding the same frames are duplicates; mixed enhanced and classic files are refused."""
    vol, aff = _volume()
    study = StudyInfo(seed=6)
    paths = write_series(vol, aff, tmp_path / "all", study=study, layout="enhanced", frames_per_instance=3)
    gap = tmp_path / "gap"
    gap.mkdir()
    for p in paths[:2] + paths[3:]:
        shutil.copy(p, gap / p.name)
    with pytest.raises(SeriesSelectionError) as err:
        select_series(scan_study(gap))
    assert "missing slice" in str(err.value) and ".dcm frame 3 " in str(err.value)
    with pytest.raises(SeriesGeometryError, match=r"missing slice.*IM00002\.dcm frame 3"):
        load_series(sorted(gap.iterdir()))
    classic = write_series(vol, aff, tmp_path / "mix", study=study)
    shutil.copy(paths[0], tmp_path / "mix" / "ENH.dcm")
    with pytest.raises(SeriesGeometryError, match="enhanced instances, not both"):
        load_series([*classic, tmp_path / "mix" / "ENH.dcm"])


def test_single_frame_enhanced_instances_with_only_shared_groups_are_read(tmp_path):
    """A converter's single-frame Enhanced MR without a PerFrameFunctionalGroupsSequence (its one
    frame's position, spacing and orientation in the shared groups): the ADNI-style export of the
    issue, refused before as "PixelSpacing missing on all instances", reads as its classic twin."""
    vol, aff = _volume()
    paths = write_series(vol, aff, tmp_path / "so", study=StudyInfo(seed=7), layout="enhanced", frames_per_instance=1)
    for path in paths:
        ds = pydicom.dcmread(path)
        for elem in ds.PerFrameFunctionalGroupsSequence[0]:
            ds.SharedFunctionalGroupsSequence[0].add(elem)
        del ds.PerFrameFunctionalGroupsSequence
        ds.save_as(path, enforce_file_format=True)
    classic = load_series(write_series(vol, aff, tmp_path / "classic", study=StudyInfo(seed=7)))
    series = select_series(scan_study(tmp_path / "so"))
    assert series.n_frames == len(paths) and series.pixel_spacings != frozenset({None})
    volume = load_series(series.files)
    np.testing.assert_array_equal(volume.array, classic.array)
    np.testing.assert_allclose(volume.affine, classic.affine, atol=1e-6)
    sources, _ = clean_source_headers(volume.datasets)
    seg = make_seg(sources, volume.to_source(np.where(_labels(volume.array.shape) <= 2, _labels(volume.array.shape), 0)),
                   model_version="t")
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    assert dciodvfy_problems(tmp_path / "seg.dcm")["errors"] == []


def test_the_real_siemens_xa_enhanced_image_with_per_frame_pixel_measures_makes_a_conformant_seg(tmp_path):
    """Issue 28's AttributeError: Siemens XA keeps PixelMeasures and PlaneOrientation in the
    per-frame functional groups, which highdicom does not read from a source. The SEG and SR of a
    real XA10 instance are made, reference its frames and pass dciodvfy."""
    path = VENDOR / "siemens_xa10_enhanced/6_1.dcm"
    if not path.is_file():
        pytest.skip(f"vendor DICOM not found at {path}")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert "PixelMeasuresSequence" not in header.SharedFunctionalGroupsSequence[0]
    volume = load_series([path])
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[20:30, 20:30, 1:3], labels[20:30, 30:40, 2:4] = 1, 2
    labels[40:50, 20:30, 1:3], labels[40:50, 30:40, 2:4] = 3, 4
    sources, _ = clean_source_headers(volume.datasets)
    frames = volume.to_source(labels)
    seg = make_wholehead_seg(sources, frames, model_version="t")
    sides = {"left": measure_volumes(np.where(labels <= 2, labels, 0), volume.spacing),
             "right": measure_volumes(np.where(labels > 2, labels - 2, 0), volume.spacing)}
    sr = make_wholehead_sr(sources, seg, sides, asymmetry_index_percent=0.0, etiv_mm3=None, model_version="t")
    for key, ds in (("seg", seg), ("sr", sr)):
        ds.save_as(tmp_path / f"{key}.dcm", enforce_file_format=True)
        assert dciodvfy_problems(tmp_path / f"{key}.dcm")["errors"] == [], key
    np.testing.assert_array_equal(_seg_frames(tmp_path / "seg.dcm", volume), frames)
    back = pydicom.dcmread(tmp_path / "seg.dcm")
    ps = [float(v) for v in back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    np.testing.assert_allclose(ps, [3.375, 3.375], atol=1e-4)


# ------------------------------------------------------------------------ whole-head selection by headers


def _head_nifti(root: Path) -> Path:
    """A 120 x 140 x 120 mm synthetic head at 2 mm (a bright ellipsoid), as NIfTI."""
    import nibabel as nib

    shape = (60, 70, 60)
    idx = np.indices(shape, dtype=np.float32)
    c = (np.array(shape, np.float32) - 1) / 2
    r = sum(((idx[i] - c[i]) / (shape[i] / 2.1)) ** 2 for i in range(3))
    noise = np.random.default_rng(2).normal(0, 5, shape)
    image = (np.where(r < 1, 300.0, 0.0) + np.where(r < 0.6, 200.0, 0.0) + noise).clip(0).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-60.0, -70.0, -60.0]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "head.nii.gz"
    nib.save(nib.Nifti1Image(image, aff), str(path))
    return path


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Path:
    return _head_nifti(tmp_path_factory.mktemp("head"))


def _choose(folder: Path, rules: WholeHeadRules | None = None):
    return select_input_series(scan_study(folder), SelectionRules(), rules or WholeHeadRules())


@pytest.mark.parametrize("layout", [None, {"layout": "enhanced", "functional_groups": "per_frame"}],
                         ids=["classic", "enhanced"])
def test_contrast_is_decided_by_contrast_bolus_attributes_not_by_the_name(head, tmp_path, layout, caplog):
    """"MPRAGE_EnchancedContrast" (a Siemens protocol name, no agent) is measured, whether the
    headers say no agent (ContrastBolusAgent empty) or say nothing; a T1 with ContrastBolusAgent
    is refused naming it, however plainly named; a post-Gd name counts only when no contrast/bolus
    attribute is there. Enhanced: TR/TE/TI from the functional groups decide the weighting."""
    cases = {
        "siemens_name_no_agent": ("MPRAGE_EnchancedContrast", {"ContrastBolusAgent": ""}),
        "siemens_name_silent": ("MPRAGE_EnchancedContrast", {}),
        "plain_name_with_agent": ("t1_mprage_sag", {"ContrastBolusAgent": "Gadovist"}),
        "post_gd_name_silent": ("T1 post Gd", {}),
        "post_gd_name_no_agent": ("T1 post Gd", {"ContrastBolusAgent": "NONE"}),
    }
    outcome = {}
    for case, (description, extra) in cases.items():
        folder = tmp_path / case
        write_wholehead_study(head, folder, seed=21, localizer=False, distractors=False, t1_description=description,
                              t1_extra=extra, t1_layout=layout)
        if layout:
            ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
            assert "EchoTime" not in ds and "InversionTime" not in ds  # only in the functional groups
        try:
            with caplog.at_level(logging.INFO, logger="hippo.dicom.wholehead_select"):
                series, kind = _choose(folder)
            outcome[case] = ("selected", kind)
        except SeriesSelectionError as exc:
            outcome[case] = ("refused", str(exc))
    assert outcome["siemens_name_no_agent"] == ("selected", "wholehead")
    assert outcome["siemens_name_silent"] == ("selected", "wholehead")
    assert outcome["post_gd_name_no_agent"] == ("selected", "wholehead")
    assert outcome["plain_name_with_agent"][0] == "refused"
    assert "post-contrast: ContrastBolusAgent 'Gadovist' (a contrast agent was given)" in outcome["plain_name_with_agent"][1]
    assert outcome["post_gd_name_silent"][0] == "refused"
    assert "post-contrast by its name: 'T1 post Gd'" in outcome["post_gd_name_silent"][1]
    assert "no contrast/bolus attribute (ContrastBolusAgent, ...) says otherwise" in outcome["post_gd_name_silent"][1]
    assert "InversionTime 900 ms, EchoTime 2.98 ms: inversion-prepared T1" in caplog.text


def test_weighting_is_decided_by_timing_and_the_override_wins(head, tmp_path):
    """A 3D T1-named series whose headers say T2 (TE 120 ms) is refused naming EchoTime; a
    spoiled GRE T1 with an unhelpful name is measured (TR 20 ms, TE 4 ms); FLAIR by its
    InversionTime; headers without any timing fall back to the name; ``override_series`` takes a
    series whatever its weighting says."""
    t2 = dict(ScanningSequence=["SE"], SequenceVariant=["SK", "SP"], RepetitionTime="3200", EchoTime="120",
              InversionTime=None, FlipAngle="120", SequenceName="*spc3d1")
    gre = dict(ScanningSequence=["GR"], SequenceVariant=["SP"], RepetitionTime="20", EchoTime="4",
               InversionTime=None, FlipAngle="25", SequenceName="*fl3d1")
    flair = dict(ScanningSequence=["SE", "IR"], RepetitionTime="5000", EchoTime="8", InversionTime="1800")
    rules = WholeHeadRules()
    reasons = {}
    for case, (description, extra) in {"t2_named_t1": ("T1 3D sag", t2), "gre": ("Series 7", gre),
                                       "flair": ("3D sag", flair)}.items():
        write_wholehead_study(head, tmp_path / case, seed=22, localizer=False, distractors=False,
                              t1_description=description, t1_extra=extra)
        series = scan_study(tmp_path / case).series[0]
        reasons[case] = "; ".join(rules.rejection_reasons(series, SelectionRules()))
        if case == "t2_named_t1":
            override = WholeHeadRules(override_series="T1 3D")
            assert override.rejection_reasons(series, SelectionRules()) == []
            assert WholeHeadRules(override_series=series.uid).rejection_reasons(series, SelectionRules()) == []
    assert "not T1-weighted: EchoTime 120 ms (longer than 15 ms: T2/T2*/PD weighting)" in reasons["t2_named_t1"]
    assert reasons["gre"] == ""
    assert "not T1-weighted: InversionTime 1800 ms (longer than 1500 ms: fluid-attenuated" in reasons["flair"]
    # no timing at all (an anonymiser stripped it): the name decides, and says why
    for case, description in (("silent_t1", "t1_mprage_sag"), ("silent_other", "Series 9")):
        write_wholehead_study(head, tmp_path / case, seed=23, localizer=False, distractors=False,
                              t1_description=description,
                              t1_extra=dict(ScanningSequence=None, SequenceVariant=None, RepetitionTime=None,
                                            EchoTime=None, InversionTime=None))  # written empty
        reasons[case] = "; ".join(rules.rejection_reasons(scan_study(tmp_path / case).series[0], SelectionRules()))
    assert reasons["silent_t1"] == ""
    assert ("the headers do not say the weighting (EchoTime, RepetitionTime, InversionTime, AcquisitionContrast "
            "absent); 'Series 9' does not look like a T1 either") in reasons["silent_other"]


# ------------------------------------------------------------------------------------ real head, model

#: layouts of the twin test (write_series keywords); the classic twin is the reference
TWIN_LAYOUTS = {
    "enhanced-one-instance-per-frame-groups": dict(layout="enhanced", functional_groups="per_frame"),
    "enhanced-several-instances": dict(layout="enhanced", frames_per_instance=32),
    "enhanced-single-frame-instances": dict(layout="enhanced", frames_per_instance=1),
    "legacy-converted-several-instances-per-frame-groups": dict(layout="legacy", frames_per_instance=50,
                                                               functional_groups="per_frame"),
}


@pytest.mark.realdata
@pytest.mark.slow
def test_deploy_gives_each_enhanced_layout_the_volumes_of_its_classic_twin(tmp_path):
    """hippo.deploy on a real whole-head T1 (example_brain_t1, 1.75 mm) written in each enhanced
    layout and as a classic series: left and right volumes within 0.5 % of the classic twin's;
    SC, SEG and SR dciodvfy-clean; the SEG references every source instance (and frame). The
    Siemens-XA-like layout is described "MPRAGE_EnchancedContrast" with an empty ContrastBolusAgent
    (a vendor protocol name, no agent): it is measured."""
    from hippo.deploy.pipeline import build_processor

    scan = WHOLEHEAD / "example_brain_t1.nii.gz"
    if not scan.is_file():
        pytest.skip(f"whole-head scan not found at {scan}")
    model = sorted(glob.glob(str(ROOT / "src/hippo/weights/*.pt")))[0]
    processor = build_processor(model, tmp_path / "out")  # float32: this CPU has no native bfloat16
    results = {}
    for name, layout in {"classic": None, **TWIN_LAYOUTS}.items():
        folder = tmp_path / name
        named = {"t1_description": "MPRAGE_EnchancedContrast", "t1_extra": {"ContrastBolusAgent": ""}} \
            if name == "enhanced-one-instance-per-frame-groups" else {}
        manifest = write_wholehead_study(scan, folder, seed=28, localizer=False, distractors=False, t1_layout=layout,
                                         **named)
        outcome = processor.process(folder)
        assert outcome.status in ("ok", "review"), (name, outcome.stage, outcome.error)
        assert outcome.kind == "wholehead" and outcome.series_description == manifest["t1_description"]
        results[name] = outcome.volumes
        for key in ("report_sc", "seg", "sr"):
            problems = dciodvfy_problems(outcome.files[key])
            assert problems["errors"] == [], (name, key, problems)
        seg = pydicom.dcmread(outcome.files["seg"])
        sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in manifest["files"][manifest["t1_description"]]}
        listed = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert listed == sources, name
    base = results["classic"]
    for name in TWIN_LAYOUTS:
        for side in ("left", "right"):
            ours, twin = results[name][side]["total_mm3"], base[side]["total_mm3"]
            print(f"{name} {side}: {ours} mm3, classic twin {twin} mm3 ({100 * (ours - twin) / twin:+.3f} %)")
            assert abs(ours - twin) <= 0.005 * twin, (name, side, ours, twin)
