"""How the DICOM door reads and writes: files parsed in one thread while the operating system reads ahead
(hippo.dicom.prefetch), plain uncompressed slices taken straight from their Pixel Data
(hippo.dicom.volume), the report PNG encoded beside the DICOM objects (hippo.deploy.pipeline) --
each giving what the slower way gave, and a failure still failing the study by name."""

from __future__ import annotations

import threading

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid

import hippo.dicom.prefetch as prefetch
from conftest import ANY_VOLUME
from hippo.dicom.ingest import scan_study
from hippo.dicom.volume import _native_frame, load_series
from hippo.scanner import StudyInfo, write_series


# ------------------------------------------------------------------------------------- read ahead
def test_read_ahead_announces_the_next_files_within_the_window(tmp_path, monkeypatch):
    paths = []
    for i in range(30):
        paths.append(tmp_path / f"f{i:02d}")
        paths[-1].write_bytes(bytes([i]) * 100)
    paths[7] = None  # nothing to read for it
    announced: list[int] = []
    monkeypatch.setattr(prefetch, "_announce", lambda path, nbytes: announced.append(paths.index(path)))
    seen = []
    for i in prefetch.read_ahead(paths, 2, window=5):
        seen.append(i)
        assert announced and max(announced) <= i + 5  # never more than the window ahead of the parse
        if i + 1 < len(paths) and i + 1 != 7:
            assert i + 1 in announced, f"file {i + 1} not announced while file {i} is parsed"
    assert seen == list(range(30))
    # the first file is read by the parse itself; each other once
    assert announced == [k for k in range(1, 30) if k != 7]


def test_read_ahead_without_workers_reads_nothing_ahead(tmp_path, monkeypatch):
    announced = []
    monkeypatch.setattr(prefetch, "_announce", lambda path, nbytes: announced.append(path))
    assert list(prefetch.read_ahead([tmp_path / "a", tmp_path / "b"], 1)) == [0, 1]
    assert announced == []


def test_read_ahead_leaves_unreadable_files_to_the_parse(tmp_path):
    present = tmp_path / "present"
    present.write_bytes(b"x" * 10)
    paths = [present, tmp_path / "missing", None, present, tmp_path]  # a folder cannot be read as a file
    assert list(prefetch.read_ahead(paths, 4, nbytes=None)) == [0, 1, 2, 3, 4]


def test_scan_parses_in_the_calling_thread(tmp_path, monkeypatch):
    """pydicom's parsing holds the GIL: the scan parses every header in the caller's thread, and
    still finds the series as before."""
    uid, _ = _series(tmp_path, n=12)
    threads = set()
    real_dcmread = pydicom.dcmread

    def recording_dcmread(*args, **kwargs):
        threads.add(threading.get_ident())
        return real_dcmread(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", recording_dcmread)
    scan = scan_study(tmp_path, workers=4)
    assert threads == {threading.get_ident()}
    assert scan.get(uid).n_instances == 12


# ----------------------------------------------------------------------------------- pixel data
def _series(folder, *, n: int = 6, size: tuple[int, int] = (8, 7), spacing=(0.9, 0.8, 1.5)):
    """A HippoCrop series of ``n`` slices of ``size`` random 16-bit values, voxels of ``spacing`` mm:
    ``(SeriesInstanceUID, files)``."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 1000, size=(*size, n)).astype(np.int16)
    uid = generate_uid()
    paths = write_series(image, np.diag([*spacing, 1.0]), folder, study=StudyInfo(seed=2),
                         series_description="HippoCrop", series_instance_uid=uid)
    return uid, sorted(paths)


def _image(bits: int, stored: int, signed: int, values: np.ndarray, *, syntax=ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, signed
    ds.PixelData = values.astype(f"<{'i' if signed else 'u'}{bits // 8}").tobytes()
    return ds


@pytest.mark.parametrize("bits,signed", [(8, 0), (8, 1), (16, 0), (16, 1)])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_plain_pixel_data_read_directly_equals_pydicom(bits, signed, syntax):
    rng = np.random.default_rng(bits + signed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2 ** bits)
    ds = _image(bits, bits, signed, rng.integers(lo, hi, size=(5, 6)), syntax=syntax)
    direct = _native_frame(ds, syntax)
    expected = ds.pixel_array
    assert direct is not None and direct.dtype == expected.dtype and np.array_equal(direct, expected)


def test_unused_high_bits_are_left_to_pydicom():
    """BitsStored 12 of 16 with the top bits set: pydicom clears them; the direct read declines."""
    values = np.arange(30).reshape(5, 6) | 0xF000
    ds = _image(16, 12, 0, values)
    assert _native_frame(ds, ExplicitVRLittleEndian) is None
    assert int(ds.pixel_array.max()) < 4096


def test_short_pixel_data_is_left_to_pydicom():
    ds = _image(16, 16, 0, np.ones((5, 6)))
    ds.PixelData = ds.PixelData[:-4]
    assert _native_frame(ds, ExplicitVRLittleEndian) is None


def test_series_volume_is_the_same_from_headers_paths_and_datasets(tmp_path):
    uid, paths = _series(tmp_path / "s")
    scan = scan_study(tmp_path / "s", keep_headers=True)
    from_scan = load_series(scan.series_inputs(scan.get(uid)), series_uid=uid)
    from_paths = load_series(paths, workers=3)
    from_datasets = load_series([pydicom.dcmread(p) for p in paths], workers=1)
    assert from_scan.array.dtype == np.float32
    for volume in (from_scan, from_paths):
        assert np.array_equal(volume.array, from_datasets.array)
    # each source slice holds the stored values pydicom decodes from its file
    frames = from_paths.to_source(from_paths.array)
    for frame, ds in zip(frames, from_paths.datasets):
        assert np.array_equal(frame, pydicom.dcmread(ds.filename).pixel_array.astype(np.float32))


# ------------------------------------------------------------------------------ report PNG beside
def test_png_failure_fails_the_study_at_write_naming_it(tmp_path, monkeypatch):
    """The PNG is encoded in a thread beside the SEG/SR/SC: an error there is not lost, the study
    fails at "write" with it, and the next study of the batch is processed."""
    import hippo.deploy.pipeline as pipeline

    folder = tmp_path / "study"
    _series(folder, n=20, size=(24, 24), spacing=(1.0, 1.0, 1.0))  # a field of view the model accepts
    volume = load_series(sorted(folder.iterdir()))

    class HalfMask:
        metadata = {"hippo_version": "test", "path": "half", "metrics": {}, "training": {}}

        def segment(self, image):
            mask = np.zeros(image.shape, np.uint8)
            mask[: image.shape[0] // 2, 4:20, 4:16] = 1
            mask[image.shape[0] // 2:, 4:20, 4:16] = 2
            return mask

    def broken_png(page):
        raise OSError("disk full while encoding report.png")

    processor = pipeline.StudyProcessor(HalfMask(), tmp_path / "out", plausibility=ANY_VOLUME, io_threads=3)
    good = processor.process(folder)
    assert good.status in ("ok", "review"), good.error
    assert good.files["report_png"].endswith("report.png") and good.volumes["total_mm3"] > 0
    assert volume.array.shape == (24, 24, 20)

    monkeypatch.setattr(pipeline, "_png_bytes", broken_png)
    bad = processor.process(folder)
    assert bad.status == "failed" and bad.stage == "write"
    assert "disk full while encoding report.png" in bad.error
    assert not [t for t in threading.enumerate() if t.name.startswith("report-png")]

    monkeypatch.undo()
    again = processor.process(folder)
    assert again.status == good.status and again.volumes == good.volumes
