"""A bad-input corpus, generated here (no committed binaries), for deployment and training.

Deployment: every case is one study directory (built with the scanner emulator, then damaged) run
through :meth:`hippo.deploy.pipeline.StudyProcessor.process`, and all of them together with a good study
through ``python -m hippo.deploy studies=ROOT send=false workers=2``. Training: broken NIfTI cases
beside good ones through :meth:`HippocampusDataModule.setup` and :func:`hippo.curate.curation.curate`.

Each case asserts the expected clear error (or the correct handling), that every input file is
byte-for-byte unchanged (SHA-256 of each file, and no file added or removed), and that the batch
goes on past it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (EnhancedMRImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGLSLossless, generate_uid)

import hippo.deploy.pipeline as pipeline
from conftest import ANY_VOLUME, ANY_VOLUME_OVERRIDES, tiny_pair, write_nifti
from hippo.curate.curation import curate
from hippo.data.datamodule import HippocampusDataModule
from hippo.data.nifti import CaseError
from hippo.dicom.volume import load_series
from hippo.infer import InferenceAgent
from hippo.deploy.pipeline import StudyProcessor
from hippo.scanner import StudyInfo, write_series

# ------------------------------------------------------------------------------------ helpers

#: The HippoCrop volume: (X, Y, Z) = 32 x 32 in-plane (JPEG 2000's default 6 resolution levels need
#: >= 32 pixels), 10 slices of 1.5 mm; X flipped against RAS.
CROP_SHAPE = (32, 32, 10)
CROP_AFFINE = np.array([[-0.9, 0, 0, 20.0], [0, 0.9, 0, -12.0], [0, 0, 1.5, 4.0], [0, 0, 0, 1]])
CROP_DIR = "S005_HippoCrop"


def _crop_volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.arange(n) for n in CROP_SHAPE), indexing="ij")
    blob = np.exp(-((x - 16) ** 2 + (y - 14) ** 2) / 60.0 - (z - 5) ** 2 / 8.0)
    return (200 + 700 * blob + rng.integers(0, 60, CROP_SHAPE)).astype(np.uint16)


CROP = _crop_volume()


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (hidden ones too) and every directory, by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _crop(study_dir: Path, study: StudyInfo, *, folder: str = CROP_DIR, volume: np.ndarray = CROP,
          affine: np.ndarray = CROP_AFFINE, **kw) -> list[Path]:
    """The HippoCrop series (IM00001.dcm ... in ascending position along the slice normal)."""
    kw.setdefault("series_description", "HippoCrop")
    kw.setdefault("series_number", 5)
    return write_series(volume, affine, study_dir / folder, study=study, **kw)


def _t1(study_dir: Path, study: StudyInfo) -> list[Path]:
    """A small distractor series."""
    vol = np.random.default_rng(1).integers(0, 500, (16, 16, 4)).astype(np.uint16)
    return write_series(vol, np.diag([1.0, 1.0, 2.0, 1.0]), study_dir / "S002_T1", study=study,
                        series_description="T1 MPRAGE full brain", series_number=2)


def _edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _compress(paths: list[Path], syntax: str) -> None:
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.compress(syntax)  # lossless encoders: pylibjpeg-openjpeg (JPEG 2000), pyjpegls (JPEG-LS)
        ds.save_as(p, enforce_file_format=True)


@dataclass
class Expect:
    """What processing a study must give.

    ``error``/``warnings``: fragments that must appear in the outcome's error / in one of its warnings.
    ``same_as_good``: an ok study whose volumes must equal the good study's (lossless codecs).
    """

    status: str
    stage: str = ""
    error: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    same_as_good: bool = False


# ------------------------------------------------------------------------------ study builders
# Each builder writes one study directory and returns what processing it must give.


def build_good(d: Path, study: StudyInfo) -> Expect:
    _t1(d, study)
    _crop(d, study)
    return Expect("ok")


def build_truncated_slice(d: Path, study: StudyInfo) -> Expect:
    """A slice in the middle of the stack cut to half its size."""
    _t1(d, study)
    p = _crop(d, study)[4]
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return Expect("failed", "ingest", error=(str(p), "pixel data truncated"))


def build_truncated_edge_slice(d: Path, study: StudyInfo) -> Expect:
    """The last slice cut to half: no gap betrays it, so only the damaged file can."""
    _t1(d, study)
    p = _crop(d, study)[-1]
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return Expect("failed", "ingest", error=(str(p), "pixel data truncated"))


def build_non_dicom_files(d: Path, study: StudyInfo) -> Expect:
    _t1(d, study)
    _crop(d, study)
    rng = np.random.default_rng(3)
    junk = {
        d / "README.txt": b"Export of a study.\n" * 10,
        d / "report.pdf": b"%PDF-1.4\n" + rng.bytes(2000),
        d / ".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(64),
        d / CROP_DIR / "broken.dcm": b"this is not a DICOM file\n",
        d / CROP_DIR / "empty.dcm": b"",
        d / "S002_T1" / "Thumbs.db": bytes(128),
    }
    for p, data in junk.items():
        p.write_bytes(data)
    shutil.copy(pydicom.data.get_testdata_file("DICOMDIR"), d / "DICOMDIR")
    return Expect("ok", warnings=tuple(f"ignored {p}:" for p in [*junk, d / "DICOMDIR"]))


def build_no_hippocrop(d: Path, study: StudyInfo) -> Expect:
    _t1(d, study)
    _crop(d, study, folder="S003_FLAIR", series_description="FLAIR", series_number=3)
    return Expect("failed", "ingest", error=("no series matches", "HippoCrop", "T1 MPRAGE full brain",
                                             "'FLAIR'"))


def build_two_candidates(d: Path, study: StudyInfo) -> Expect:
    _t1(d, study)
    _crop(d, study)
    _crop(d, study, folder="S006_HippoCrop_repeat", series_description="HippoCrop repeat", series_number=6)
    return Expect("failed", "ingest", error=("2 series match", "'HippoCrop'", "'HippoCrop repeat'"))


def build_missing_slices(d: Path, study: StudyInfo) -> Expect:
    """Two slices in the middle deleted: the error names the gap and the files on either side."""
    _t1(d, study)
    paths = _crop(d, study)
    paths[4].unlink()
    paths[5].unlink()
    return Expect("failed", "ingest", error=("missing slice", str(paths[3]), str(paths[6])))


def build_duplicate_copy(d: Path, study: StudyInfo) -> Expect:
    """An exact copy of one slice under another name: one is used, the other ignored with a warning."""
    _t1(d, study)
    paths = _crop(d, study)
    copy = d / "copies" / "IM00004_copy.dcm"
    copy.parent.mkdir()
    shutil.copy2(paths[3], copy)
    return Expect("ok", warnings=(f"ignored {copy}: duplicate SOPInstanceUID",))


def build_duplicate_position(d: Path, study: StudyInfo) -> Expect:
    """A second instance (new SOPInstanceUID, other pixels) at the position of an existing slice."""
    _t1(d, study)
    paths = _crop(d, study)
    ds = pydicom.dcmread(paths[3])
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16) // 2).tobytes()
    extra = d / CROP_DIR / "IM00004b.dcm"
    ds.save_as(extra, enforce_file_format=True)
    return Expect("failed", "ingest", error=("same position", str(paths[3]), str(extra)))


def build_pixel_spacing_differs(d: Path, study: StudyInfo) -> Expect:
    _t1(d, study)
    p = _crop(d, study)[6]
    _edit(p, PixelSpacing=[0.8, 0.8])
    return Expect("failed", "ingest", error=("PixelSpacing", str(p), "0.8"))


def build_orientation_differs(d: Path, study: StudyInfo) -> Expect:
    _t1(d, study)
    p = _crop(d, study)[2]
    _edit(p, ImageOrientationPatient=[1, 0, 0, 0, 0.8, 0.6])
    return Expect("failed", "ingest", error=("ImageOrientationPatient", str(p)))


def build_jpeg2000_lossless(d: Path, study: StudyInfo) -> Expect:
    _t1(d, study)
    _compress(_crop(d, study), JPEG2000Lossless)
    return Expect("ok", same_as_good=True)


def build_jpegls_lossless(d: Path, study: StudyInfo) -> Expect:
    _t1(d, study)
    _compress(_crop(d, study), JPEGLSLossless)
    return Expect("ok", same_as_good=True)


def build_corrupt_jpeg2000(d: Path, study: StudyInfo) -> Expect:
    """A JPEG 2000 series with one undecodable codestream: refused naming file and transfer syntax."""
    _t1(d, study)
    paths = _crop(d, study)
    _compress(paths, JPEG2000Lossless)
    ds = pydicom.dcmread(paths[5])
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 4])
    ds.save_as(paths[5], enforce_file_format=True)
    return Expect("failed", "volume", error=(str(paths[5]), "JPEG 2000", "cannot decode pixel data", "corrupt"))


def build_enhanced_multiframe(d: Path, study: StudyInfo) -> Expect:
    """The crop as one Enhanced MR Image Storage object with 10 frames (functional groups)."""
    _t1(d, study)
    tmp = d.parent / f".{d.name}.tmp"
    frames = [pydicom.dcmread(p) for p in _crop(tmp, study)]
    first = frames[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedMRImageStorage, generate_uid()
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientName", "PatientID",
               "StudyDate", "StudyTime", "Modality", "SeriesDescription", "SeriesNumber", "Rows", "Columns",
               "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
               "PixelRepresentation"):
        setattr(ds, kw, first.data_element(kw).value)
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k, f in enumerate(frames):
        item, pos, content = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = f.ImagePositionPatient
        content.InStackPositionNumber = k + 1
        item.PlanePositionSequence, item.FrameContentSequence = [pos], [content]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = b"".join(f.PixelData for f in frames)
    out = d / CROP_DIR / "ENH00001.dcm"
    out.parent.mkdir(parents=True)
    ds.save_as(out, enforce_file_format=True)
    shutil.rmtree(tmp)
    # an enhanced instance is one volume: measured like the classic series it was made from
    return Expect("ok", same_as_good=True)


def build_ct_hippocrop(d: Path, study: StudyInfo) -> Expect:
    _t1(d, study)
    _crop(d, study, modality="CT")
    return Expect("failed", "ingest", error=("'HippoCrop'", "modality CT is not MR",
                                             "SOP class CT Image Storage not accepted"))


def build_empty_dir(d: Path, study: StudyInfo) -> Expect:
    d.mkdir(parents=True)
    return Expect("failed", "ingest", error=(str(d), "directory is empty"))


def build_oversized_matrix(d: Path, study: StudyInfo) -> Expect:
    """Three real 1024 x 1024 slices (6 MB): refused from the headers, before any pixel is read."""
    _t1(d, study)
    vol = np.random.default_rng(5).integers(0, 4000, (1024, 1024, 3)).astype(np.uint16)
    _crop(d, study, volume=vol, affine=np.diag([0.25, 0.25, 1.0, 1.0]))
    return Expect("failed", "ingest", error=("'HippoCrop'", "1024x1024", "max_rows_columns 512"))


#: case -> builder; the directories are numbered in this order, the good study last.
CASES: dict[str, Callable[[Path, StudyInfo], Expect]] = {
    "truncated_slice": build_truncated_slice,
    "truncated_edge_slice": build_truncated_edge_slice,
    "non_dicom_files": build_non_dicom_files,
    "no_hippocrop": build_no_hippocrop,
    "two_candidates": build_two_candidates,
    "missing_slices": build_missing_slices,
    "duplicate_copy": build_duplicate_copy,
    "duplicate_position": build_duplicate_position,
    "pixel_spacing_differs": build_pixel_spacing_differs,
    "orientation_differs": build_orientation_differs,
    "jpeg2000_lossless": build_jpeg2000_lossless,
    "jpegls_lossless": build_jpegls_lossless,
    "corrupt_jpeg2000": build_corrupt_jpeg2000,
    "enhanced_multiframe": build_enhanced_multiframe,
    "ct_hippocrop": build_ct_hippocrop,
    "empty_dir": build_empty_dir,
    "oversized_matrix": build_oversized_matrix,
    "good": build_good,
}


@dataclass
class Corpus:
    root: Path
    dirs: dict[str, Path]
    expect: dict[str, Expect]
    hashes: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    dirs, expect = {}, {}
    for i, (case, build) in enumerate(CASES.items()):
        d = root / (f"99_{case}" if case == "good" else f"{i:02d}_{case}")
        expect[case] = build(d, StudyInfo(seed=100 + i))  # one StudyInstanceUID per study
        dirs[case] = d
    return Corpus(root, dirs, expect, {c: tree_hashes(d) for c, d in dirs.items()})


@pytest.fixture(scope="module")
def processor(model_file, tmp_path_factory) -> StudyProcessor:
    return StudyProcessor(InferenceAgent.from_file(model_file), tmp_path_factory.mktemp("results"), io_threads=2,
                          plausibility=ANY_VOLUME)


# ------------------------------------------------------------------------------ deployment tests


@pytest.mark.parametrize("case", list(CASES))
def test_study_case_through_the_processor(case, corpus, processor, monkeypatch):
    exp = corpus.expect[case]
    pixel_reads = []
    if exp.stage == "ingest":  # refused from the headers: the volume stage (pixels) never runs
        real = pipeline.load_series
        monkeypatch.setattr(pipeline, "load_series", lambda *a, **k: pixel_reads.append(a) or real(*a, **k))
    outcome = processor.process(corpus.dirs[case])
    assert (outcome.status, outcome.stage) == (exp.status, exp.stage), outcome.error
    for fragment in exp.error:
        assert fragment in outcome.error, f"{fragment!r} not in the error: {outcome.error}"
    for fragment in exp.warnings:
        assert any(fragment in w for w in outcome.warnings), f"{fragment!r} not in {outcome.warnings}"
    assert not pixel_reads
    if exp.status == "ok":
        assert set(outcome.volumes) >= {"anterior_mm3", "posterior_mm3", "total_mm3"}
        for name in ("report_sc", "seg", "sr", "result_json"):
            assert Path(outcome.files[name]).is_file()
    else:
        assert not outcome.files and outcome.study == str(corpus.dirs[case])
    assert tree_hashes(corpus.dirs[case]) == corpus.hashes[case], "input files changed"


@pytest.mark.parametrize("case,syntax", [("jpeg2000_lossless", JPEG2000Lossless),
                                         ("jpegls_lossless", JPEGLSLossless)])
def test_lossless_compressed_series_gives_the_same_volume(case, syntax, corpus):
    files = sorted((corpus.dirs[case] / CROP_DIR).iterdir())
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in files} == {syntax}
    compressed = load_series(files)
    plain = load_series(sorted((corpus.dirs["good"] / CROP_DIR).iterdir()))
    assert compressed.array.dtype == plain.array.dtype
    assert np.array_equal(compressed.array, plain.array)
    assert np.allclose(compressed.affine, plain.affine) and compressed.spacing == plain.spacing


def test_transfer_syntax_without_a_decoder_is_refused_naming_file_and_syntax(tmp_path, processor):
    """JPEG XL Lossless (a syntax newer than every decoder installed here): a clear refusal naming
    the file and the syntax, with what to do about it."""
    from hippo.dicom.volume import _has_decoder

    jpeg_xl_lossless = "1.2.840.10008.1.2.4.110"
    assert not _has_decoder(jpeg_xl_lossless)
    study = tmp_path / "jpeg_xl"
    paths = _crop(study, StudyInfo(seed=8))
    for p in paths:  # the syntax pydicom cannot decode here; the codestream is never looked at
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = jpeg_xl_lossless
        ds.PixelData = encapsulate([ds.PixelData])
        ds.save_as(p, enforce_file_format=True)
    before = tree_hashes(study)
    outcome = processor.process(study)
    assert (outcome.status, outcome.stage) == ("failed", "volume"), outcome.error
    assert any(str(p) in outcome.error for p in paths)
    assert jpeg_xl_lossless in outcome.error
    assert "Install a decoder" in outcome.error
    assert tree_hashes(study) == before


def test_too_many_instances_is_refused_before_pixels_are_read(tmp_path, processor, monkeypatch):
    """2001 real (tiny, 4 x 4) slices: more than the default ``max_instances`` of 2000."""
    study = tmp_path / "many"
    [template] = write_series(np.zeros((4, 4, 1), np.uint16), np.eye(4), study / "tmp", study=StudyInfo(seed=9),
                              series_description="HippoCrop")
    ds = pydicom.dcmread(template)
    shutil.rmtree(study / "tmp")
    (study / CROP_DIR).mkdir()
    for k in range(2001):
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0, 0, float(k)]
        ds.save_as(study / CROP_DIR / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    before = tree_hashes(study)
    monkeypatch.setattr(pipeline, "load_series", lambda *a, **k: pytest.fail("pixels read"))
    outcome = processor.process(study)
    assert (outcome.status, outcome.stage) == ("failed", "ingest"), outcome.error
    assert "2001 instances" in outcome.error and "max_instances 2000" in outcome.error
    assert tree_hashes(study) == before


def test_deploy_command_over_the_whole_corpus(corpus, model_file, tmp_path):
    """All studies in one batch: each failure is recorded, the others (and the good study, last) are
    processed, the command exits 1, and no input file changed."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "hippo.deploy", f"studies={corpus.root}", f"model_path={model_file}", "send=false",
         "workers=2", f"hydra.run.dir={run}", *ANY_VOLUME_OVERRIDES], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    by_dir = {Path(s["study"]).name: s for s in summary["studies"]}
    assert set(by_dir) == {d.name for d in corpus.dirs.values()}
    good = by_dir[corpus.dirs["good"].name]
    assert good["status"] == "ok"
    # the volumes are the voxels of the written SEG, counted here, times the voxel volume of the
    # crop's own affine (0.9 x 0.9 x 1.5 mm)
    seg = pydicom.dcmread(good["files"]["seg"])
    numbers = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert numbers == {1: "Anterior hippocampus", 2: "Posterior hippocampus"}
    frame_segment = np.array([int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                              for f in seg.PerFrameFunctionalGroupsSequence])
    voxel_mm3 = abs(float(np.linalg.det(CROP_AFFINE[:3, :3])))
    counted = {k: int(np.count_nonzero(seg.pixel_array[frame_segment == k])) for k in (1, 2)}
    assert counted[1] + counted[2] > 0
    assert good["volumes"]["anterior_mm3"] == pytest.approx(counted[1] * voxel_mm3)
    assert good["volumes"]["posterior_mm3"] == pytest.approx(counted[2] * voxel_mm3)
    assert good["volumes"]["total_mm3"] == pytest.approx((counted[1] + counted[2]) * voxel_mm3)
    for case, exp in corpus.expect.items():
        s = by_dir[corpus.dirs[case].name]
        assert (s["status"], s["stage"]) == (exp.status, exp.stage), (case, s["error"])
        for fragment in exp.error:
            assert fragment in s["error"], (case, fragment, s["error"])
        if exp.same_as_good:
            assert s["volumes"] == good["volumes"], case
    n_failed = sum(e.status == "failed" for e in corpus.expect.values())
    assert summary["n_failed"] == n_failed and summary["n_ok"] == len(CASES) - n_failed
    assert (run / "summary.md").read_text().count("| failed |") == n_failed
    for case, d in corpus.dirs.items():
        assert tree_hashes(d) == corpus.hashes[case], f"{case}: input files changed"


# ------------------------------------------------------------------------------ training side

GOOD_CASES = ("hippocampus_001", "hippocampus_002", "hippocampus_003", "hippocampus_004")


def _bad_random_bytes(root: Path) -> tuple[str, Path, str, str]:
    img, _ = tiny_pair(root, "hippocampus_010", seed=10)
    img.write_bytes(np.random.default_rng(10).bytes(3000))  # not even gzip, named .nii.gz
    return "hippocampus_010", img, "unreadable", "unreadable NIfTI"


def _bad_truncated_gzip(root: Path) -> tuple[str, Path, str, str]:
    _, lbl = tiny_pair(root, "hippocampus_011", seed=11, shape=(16, 16, 12))
    label = np.random.default_rng(11).integers(0, 3, (16, 16, 12)).astype(np.uint8)  # poorly compressible
    write_nifti(lbl, label)
    data = lbl.read_bytes()
    lbl.write_bytes(data[: len(data) // 2])
    return "hippocampus_011", lbl, "unreadable", "unreadable NIfTI"


def _bad_shape_mismatch(root: Path) -> tuple[str, Path, str, str]:
    _, lbl = tiny_pair(root, "hippocampus_012", seed=12)
    label = np.zeros((6, 8, 9), np.uint8)
    label[1:3, 2:5, 3:6], label[3:5, 2:5, 3:6] = 1, 2
    write_nifti(lbl, label)
    return "hippocampus_012", lbl, "shape_mismatch", "differs from image shape"


def _bad_nan_image(root: Path) -> tuple[str, Path, str, str]:
    img, _ = tiny_pair(root, "hippocampus_013", seed=13)
    image = np.random.default_rng(13).uniform(0, 200, (6, 8, 10)).astype(np.float32)
    image[2, 3, 4] = np.nan
    write_nifti(img, image)
    return "hippocampus_013", img, "nonfinite_image", "NaN"


def _bad_label_values(root: Path) -> tuple[str, Path, str, str]:
    _, lbl = tiny_pair(root, "hippocampus_014", seed=14)
    label = np.zeros((6, 8, 10), np.uint8)
    label[1:3, 2:5, 3:6], label[3:5, 2:5, 3:6], label[0, 0, 0] = 1, 2, 5
    write_nifti(lbl, label)
    return "hippocampus_014", lbl, "invalid_label_values", "label values [5] outside {0, 1, 2}"


BAD_NIFTI = {"random_bytes": _bad_random_bytes, "truncated_gzip": _bad_truncated_gzip,
             "shape_mismatch": _bad_shape_mismatch, "nan_image": _bad_nan_image,
             "label_values": _bad_label_values}


@dataclass
class NiftiCorpus:
    root: Path  # every bad case beside the good ones
    bad: dict[str, tuple[str, Path, str, str]]  # kind -> (case name, bad file, curation code, fragment)
    single: dict[str, Path]  # kind -> a data set with only that bad case beside the good ones
    hashes: dict[Path, dict[str, str]]


@pytest.fixture(scope="module")
def nifti_corpus(tmp_path_factory) -> NiftiCorpus:
    base = tmp_path_factory.mktemp("nifti")
    root, bad, single = base / "all", {}, {}
    for seed, name in enumerate(GOOD_CASES):
        tiny_pair(root, name, seed=seed)
    for kind, make in BAD_NIFTI.items():
        bad[kind] = make(root)
        one = base / kind
        for seed, name in enumerate(GOOD_CASES):
            tiny_pair(one, name, seed=seed)
        single[kind] = one
        make(one)
    return NiftiCorpus(root, bad, single, {d: tree_hashes(d) for d in (root, *single.values())})


def test_datamodule_skips_each_bad_case_naming_the_file(nifti_corpus, tmp_path):
    """The default process pool (num_load_workers=2) loads the cases; every bad one is skipped and
    listed in skipped_cases.json with its file, the good ones are loaded and split."""
    out = tmp_path / "out"
    dm = HippocampusDataModule(root=str(nifti_corpus.root), output_dir=str(out), num_load_workers=2, batch_size=8)
    dm.setup()
    skipped = {s["file"]: s["problem"] for s in json.loads((out / "skipped_cases.json").read_text())}
    assert set(skipped) == {str(path) for _, path, _, _ in nifti_corpus.bad.values()}
    for kind, (_, path, _, fragment) in nifti_corpus.bad.items():
        assert fragment in skipped[str(path)], (kind, skipped[str(path)])
    assert sorted(dm.cases) == list(GOOD_CASES)
    split = json.loads((out / "split.json").read_text())
    assert sorted(n for k in ("train", "val", "test") for n in split[k]) == list(GOOD_CASES)
    assert len(dm.train_dataloader().dataset) > 0
    assert tree_hashes(nifti_corpus.root) == nifti_corpus.hashes[nifti_corpus.root]


def test_case_error_survives_the_trip_back_from_a_worker_process():
    """load_cases returns CaseErrors from worker processes: they must unpickle (they did not)."""
    import pickle

    err = pickle.loads(pickle.dumps(CaseError("/data/imagesTr/x.nii.gz", "image holds NaN or infinite values")))
    assert (err.path, err.problem) == ("/data/imagesTr/x.nii.gz", "image holds NaN or infinite values")
    assert str(err) == "/data/imagesTr/x.nii.gz: image holds NaN or infinite values"


@pytest.mark.parametrize("kind", list(BAD_NIFTI))
def test_datamodule_error_mode_names_the_file(kind, nifti_corpus, tmp_path):
    _, path, _, fragment = nifti_corpus.bad[kind]
    root = nifti_corpus.single[kind]
    bad_file = root / path.relative_to(nifti_corpus.root)
    dm = HippocampusDataModule(root=str(root), output_dir=str(tmp_path), num_load_workers=2,
                               on_bad_case="error")
    with pytest.raises(CaseError) as info:
        dm.setup()
    assert info.value.path == str(bad_file) and str(bad_file) in str(info.value)
    assert fragment in str(info.value)
    assert tree_hashes(root) == nifti_corpus.hashes[root]


def test_curate_flags_each_bad_case_naming_the_file(nifti_corpus, tmp_path):
    result = curate(nifti_corpus.root, tmp_path / "curate", workers=2, plots=False)
    for kind, (name, path, code, fragment) in nifti_corpus.bad.items():
        rec = result.record(name)
        assert rec.excluded, kind
        assert any(f.code == code and f.file == str(path.resolve()) and fragment in f.message for f in rec.flags), \
            (kind, rec.flags)
    assert sorted(c.name for c in result.clean) == list(GOOD_CASES)
    manifest = json.loads((tmp_path / "curate" / "manifest.json").read_text())
    assert sorted(c["name"] for c in manifest["cases"]) == list(GOOD_CASES)
    excluded = {e["name"]: e for e in manifest["excluded"]}
    for kind, (name, path, code, _) in nifti_corpus.bad.items():
        assert code in excluded[name]["reasons"] and str(path.resolve()) in excluded[name]["files"], kind
    report = (tmp_path / "curate" / "report.md").read_text()
    assert all(f"`{code}`" in report for _, _, code, _ in nifti_corpus.bad.values())
    assert tree_hashes(nifti_corpus.root) == nifti_corpus.hashes[nifti_corpus.root]
