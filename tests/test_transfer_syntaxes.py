"""Transfer syntaxes real archives send: a HippoCrop study built from the real data is re-encoded,
instance by instance, into each of them; the files are checked to really carry that syntax (file
meta, encapsulation, the codestream's own markers), then

* :func:`hippo.dicom.volume.load_series` must give the uncompressed twin's volume: identical for the
  lossless syntaxes, within a tolerance for JPEG baseline (lossy, stored 8-bit first);
* every installed pydicom decoder plugin for the syntax must give the same pixels;
* ingest (headers only) must find and select the HippoCrop series;
* the whole pipeline (shipped model) must measure the same volumes in mm³ for the JPEG Lossless SV1
  study (and the Process 14 one) as for its uncompressed twin;
* the AI listener must accept every one of them over the network and store the instances unchanged
  (and, with Orthanc installed, Orthanc must forward them to it unchanged);
* a transfer syntax no installed decoder reads is refused with an error naming the file and the
  transfer syntax.

Encoders: python-gdcm (JPEG Lossless Process 14 and SV1, JPEG baseline, Explicit VR Big Endian),
pydicom (RLE, Deflate) with pyjpegls (JPEG-LS) and pylibjpeg-openjpeg (JPEG 2000), and dcmtk's
dcmcjpeg for a Process 14 stream with a predictor other than 1 (skipped when dcmtk is absent).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pynetdicom  # noqa: F401 - registers the JPEG XL UIDs with pydicom (hippo.pacs imports it too)
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from conftest import require_real_data
from hippo.dicom.volume import PixelDecodeError, SeriesError, load_series

CASE = "hippocampus_001"
#: JPEG XL Lossless: pynetdicom accepts it, nothing installed decodes it (pydicom 3.0 has no decoder).
UNDECODABLE = UID("1.2.840.10008.1.2.4.110")
#: JPEG baseline at this quality may differ from the 8-bit original by a few grey levels.
BASELINE_QUALITY = 95
BASELINE_MAX_ABS = 12      # grey levels of the 8-bit stored values, any voxel
BASELINE_MEAN_ABS = 2.0    # grey levels, mean over the volume


# ----------------------------------------------------------------------------------------------
# Encoders: (source file, destination file) -> None


def _gdcm(ts_name: str, *, lossy_quality: float | None = None) -> Callable[[Path, Path], None]:
    """Re-encode with python-gdcm's ImageChangeTransferSyntax (``gdcm.TransferSyntax.<ts_name>``)."""

    def encode(src: Path, dst: Path) -> None:
        import gdcm

        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        if not reader.Read():
            raise RuntimeError(f"gdcm cannot read {src}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, ts_name)))
        codec = None
        if lossy_quality is not None:
            codec = gdcm.JPEGCodec()
            codec.SetLossless(False)
            codec.SetQuality(float(lossy_quality))
            change.SetUserCodec(codec)
            # gdcm 3.2.6: without Force the lossy change of uncompressed input reports failure (and,
            # called again, "succeeds" by relabelling the raw pixels): force a real encode.
            change.SetForce(True)
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"gdcm could not change {src} to {ts_name}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError(f"gdcm could not write {dst}")
        if lossy_quality is not None:  # what an archive records after a lossy compression (PS3.3 C.7.6.1.1.5)
            ds = pydicom.dcmread(dst)
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionMethod = "ISO_10918_1"
            ratio = (int(ds.Rows) * int(ds.Columns)) / max(1, len(ds.PixelData))
            ds.LossyImageCompressionRatio = f"{ratio:.2f}"
            ds.save_as(dst, enforce_file_format=True)

    return encode


def _pydicom_compress(uid: str, plugin: str) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        ds = pydicom.dcmread(src)
        ds.compress(uid, encoding_plugin=plugin, generate_instance_uid=False)  # lossless: same instance
        ds.save_as(dst, enforce_file_format=True)

    return encode


def _deflate(src: Path, dst: Path) -> None:
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(dst, enforce_file_format=True)


def _dcmcjpeg(selection_value: int) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        subprocess.run(["dcmcjpeg", "+el", "+sv", str(selection_value), str(src), str(dst)],
                       check=True, capture_output=True, timeout=60)

    return encode


# ----------------------------------------------------------------------------------------------
# Codestream checks: (encapsulated frame bytes) -> None


def _jpeg_markers(frame: bytes) -> tuple[int, int | None]:
    """(SOF marker, predictor Ss of the first SOS for lossless) of a JPEG codestream."""
    assert frame[:2] == b"\xff\xd8", "not a JPEG codestream (no SOI)"
    i, sof, ss = 2, None, None
    while i < len(frame) - 4:
        if frame[i] != 0xFF:
            i += 1
            continue
        marker = frame[i + 1]
        length = int.from_bytes(frame[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and sof is None:
            sof = marker
        if marker == 0xDA:
            n_components = frame[i + 4]
            ss = frame[i + 5 + 2 * n_components]
            break
        i += 2 + length
    assert sof is not None, "no SOF marker"
    return sof, ss


def _lossless_jpeg(predictor: int) -> Callable[[bytes], None]:
    def check(frame: bytes) -> None:
        sof, ss = _jpeg_markers(frame)
        assert sof == 0xC3, f"SOF {sof:#x}, expected SOF3 (lossless, Process 14)"
        assert ss == predictor, f"predictor (selection value) {ss}, expected {predictor}"

    return check


def _baseline_jpeg(frame: bytes) -> None:
    sof, _ = _jpeg_markers(frame)
    assert sof == 0xC0, f"SOF {sof:#x}, expected SOF0 (baseline)"


def _jpeg_ls(frame: bytes) -> None:
    assert frame[:2] == b"\xff\xd8" and b"\xff\xf7" in frame[:64], "no JPEG-LS SOF55 marker"


def _j2k(frame: bytes) -> None:
    assert frame[:4] == b"\xff\x4f\xff\x51", "not a JPEG 2000 codestream (SOC, SIZ)"


def _rle(frame: bytes) -> None:
    n_segments = int.from_bytes(frame[:4], "little")
    assert n_segments == 2, f"{n_segments} RLE segments, expected 2 (one per byte of a 16-bit sample)"


@dataclass(frozen=True)
class Syntax:
    id: str
    uid: str
    encoder: str                       # who encodes, for messages and the report
    encode: Callable[[Path, Path], None]
    encapsulated: bool
    check_frame: Callable[[bytes], None] | None = None
    lossy: bool = False                # JPEG baseline: compare with the 8-bit twin within a tolerance
    needs_tool: str | None = None

    def __str__(self) -> str:
        return self.id


SYNTAXES = [
    Syntax("jpeg-lossless-p14", JPEGLossless, "python-gdcm", _gdcm("JPEGLosslessProcess14"), True,
           _lossless_jpeg(1)),
    Syntax("jpeg-lossless-p14-sv7", JPEGLossless, "dcmtk dcmcjpeg +el +sv 7", _dcmcjpeg(7), True,
           _lossless_jpeg(7), needs_tool="dcmcjpeg"),
    Syntax("jpeg-lossless-sv1", JPEGLosslessSV1, "python-gdcm", _gdcm("JPEGLosslessProcess14_1"), True,
           _lossless_jpeg(1)),
    Syntax("jpeg-ls-lossless", JPEGLSLossless, "pydicom + pyjpegls", _pydicom_compress(JPEGLSLossless, "pyjpegls"),
           True, _jpeg_ls),
    Syntax("jpeg-2000-lossless", JPEG2000Lossless, "pydicom + pylibjpeg-openjpeg",
           _pydicom_compress(JPEG2000Lossless, "pylibjpeg"), True, _j2k),
    Syntax("rle-lossless", RLELossless, "pydicom (native RLE)", _pydicom_compress(RLELossless, "pydicom"), True,
           _rle),
    Syntax("deflated-explicit-vr-le", DeflatedExplicitVRLittleEndian, "pydicom", _deflate, False),
    Syntax("explicit-vr-big-endian", ExplicitVRBigEndian, "python-gdcm", _gdcm("ExplicitVRBigEndian"), False),
    Syntax("jpeg-baseline-8bit", JPEGBaseline8Bit, f"python-gdcm (JPEGCodec, quality {BASELINE_QUALITY})",
           _gdcm("JPEGBaselineProcess1", lossy_quality=BASELINE_QUALITY), True, _baseline_jpeg, lossy=True),
]
BY_ID = {s.id: s for s in SYNTAXES}


def _params(syntaxes=SYNTAXES):
    return [pytest.param(s, id=s.id) for s in syntaxes]


# ----------------------------------------------------------------------------------------------
# The studies: the uncompressed one from the real data, its 8-bit twin, each re-encoded copy


def _to_8bit(src_files: list[Path], out: Path) -> None:
    """The series stored 8-bit (what JPEG baseline needs): stored values divided by one common
    integer factor (1 when they already fit), RescaleSlope multiplied by it."""
    datasets = [pydicom.dcmread(p) for p in src_files]
    top = max(int(ds.pixel_array.max()) for ds in datasets)
    factor = max(1, int(np.ceil(top / 255)))
    out.mkdir(parents=True, exist_ok=True)
    for path, ds in zip(src_files, datasets):
        stored = np.round(ds.pixel_array.astype(np.float64) / factor).clip(0, 255).astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.RescaleSlope = f"{float(ds.get('RescaleSlope', 1) or 1) * factor:g}"
        data = stored.tobytes()
        ds.PixelData = data + b"\0" * (len(data) % 2)
        ds["PixelData"].VR = "OB"
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(out / path.name, enforce_file_format=True)


class Studies:
    """Builds studies on demand (cached): ``base(seed)``, ``base8(seed)``, ``encoded(syntax, seed)``."""

    def __init__(self, root: Path, image: Path) -> None:
        self.root, self.image = root, image
        self._cache: dict[tuple[str, int], Path] = {}

    def base(self, seed: int = 1) -> Path:
        key = ("uncompressed", seed)
        if key not in self._cache:
            from hippo.scanner import write_study

            out = self.root / f"seed{seed}" / "uncompressed"
            write_study(self.image, out, seed=seed, distractors=False)
            self._cache[key] = out
        return self._cache[key]

    def base8(self, seed: int = 1) -> Path:
        key = ("uncompressed-8bit", seed)
        if key not in self._cache:
            out = self.root / f"seed{seed}" / "uncompressed-8bit"
            _to_8bit(files(self.base(seed)), out)
            self._cache[key] = out
        return self._cache[key]

    def twin(self, syntax: Syntax, seed: int = 1) -> Path:
        """The uncompressed study ``syntax``'s copy was encoded from."""
        return self.base8(seed) if syntax.lossy else self.base(seed)

    def encoded(self, syntax: Syntax, seed: int = 1) -> Path:
        if syntax.needs_tool and shutil.which(syntax.needs_tool) is None:
            pytest.skip(f"{syntax.needs_tool} not installed (Debian dcmtk; `make system-deps` installs it)")
        key = (syntax.id, seed)
        if key not in self._cache:
            src = self.twin(syntax, seed)
            out = self.root / f"seed{seed}" / syntax.id
            out.mkdir(parents=True, exist_ok=True)
            for path in files(src):
                syntax.encode(path, out / path.name)
            self._cache[key] = out
        return self._cache[key]


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Studies:
    data = require_real_data()
    return Studies(tmp_path_factory.mktemp("transfer_syntaxes"), data / "imagesTr" / f"{CASE}.nii.gz")


# ----------------------------------------------------------------------------------------------
# The files really carry the syntax


@pytest.mark.realdata
@pytest.mark.parametrize("syntax", _params())
def test_files_really_carry_the_transfer_syntax(studies, syntax):
    twin_files = files(studies.twin(syntax))
    encoded = files(studies.encoded(syntax))
    assert [p.name for p in encoded] == [p.name for p in twin_files] and len(encoded) > 1
    for path, twin_path in zip(encoded, twin_files):
        ds, twin = pydicom.dcmread(path), pydicom.dcmread(twin_path)
        assert ds.file_meta.TransferSyntaxUID == syntax.uid, path
        # same instance, same header (what an archive changes when it compresses aside)
        assert ds.SOPInstanceUID == twin.SOPInstanceUID and ds.SeriesInstanceUID == twin.SeriesInstanceUID
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                        "BitsStored", "RescaleSlope", "RescaleIntercept", "SeriesDescription"):
            assert ds.get(keyword) == twin.get(keyword), (path, keyword)
        elem = ds["PixelData"]
        if syntax.encapsulated:
            assert elem.is_undefined_length and elem.VR == "OB", f"{path}: pixel data not encapsulated"
            frames = list(generate_frames(ds.PixelData, number_of_frames=1))
            assert len(frames) == 1 and len(frames[0]) < len(twin.PixelData), path
            syntax.check_frame(frames[0])
        else:
            assert not elem.is_undefined_length, f"{path}: native pixel data expected"
    raw = encoded[0].read_bytes()
    if syntax.uid == DeflatedExplicitVRLittleEndian:  # the data set after the file meta is deflated
        assert b"HippoCrop" not in raw and len(raw) < twin_files[0].stat().st_size
    if syntax.uid == ExplicitVRBigEndian:
        ds = pydicom.dcmread(encoded[0])
        assert ds.original_encoding == (False, False)
        rows = int(ds.Rows).to_bytes(2, "big")
        assert b"\x00\x28\x00\x10US\x00\x02" + rows in raw  # (0028,0010) Rows, all big endian


# ----------------------------------------------------------------------------------------------
# Volumes


@pytest.mark.realdata
@pytest.mark.parametrize("syntax", _params())
def test_load_series_gives_the_uncompressed_twins_volume(studies, syntax):
    twin = load_series(files(studies.twin(syntax)), workers=2)
    volume = load_series(files(studies.encoded(syntax)), workers=2)
    assert volume.array.shape == twin.array.shape
    np.testing.assert_array_equal(volume.affine, twin.affine)
    assert volume.spacing == twin.spacing
    if not syntax.lossy:
        np.testing.assert_array_equal(volume.array, twin.array)
        return
    slope = float(pydicom.dcmread(files(studies.twin(syntax))[0]).RescaleSlope)
    diff = np.abs(volume.array.astype(np.float64) - twin.array) / slope  # in stored grey levels
    assert diff.max() <= BASELINE_MAX_ABS and diff.mean() <= BASELINE_MEAN_ABS, (diff.max(), diff.mean())
    assert diff.max() > 0, "JPEG baseline is lossy: identical pixels mean it was not really encoded"
    # and against the 16-bit original: the 8-bit quantisation plus the JPEG error
    original = load_series(files(studies.base()), workers=2)
    err = np.abs(volume.array.astype(np.float64) - original.array)
    assert err.max() <= slope * (BASELINE_MAX_ABS + 0.5)


@pytest.mark.realdata
@pytest.mark.parametrize("syntax", _params())
def test_every_installed_decoder_gives_the_same_pixels(studies, syntax):
    from pydicom.pixels import get_decoder, pixel_array

    decoder = get_decoder(syntax.uid)
    plugins = sorted(decoder.available_plugins)
    if not syntax.encapsulated:
        assert decoder.is_available  # native: pydicom itself
        plugins = [""]
    assert plugins, f"no installed decoder for {syntax.uid.name}"
    path = files(studies.encoded(syntax))[len(files(studies.twin(syntax))) // 2]
    expected = pydicom.dcmread(studies.twin(syntax) / path.name).pixel_array
    ds = pydicom.dcmread(path)
    for plugin in plugins:
        got = pixel_array(ds, decoding_plugin=plugin) if plugin else ds.pixel_array
        if syntax.lossy:
            assert np.abs(got.astype(int) - expected).max() <= BASELINE_MAX_ABS, plugin
        else:
            np.testing.assert_array_equal(got, expected, err_msg=f"plugin {plugin!r}")


@pytest.mark.realdata
@pytest.mark.parametrize("syntax", [pytest.param(s, id=s.id) for s in SYNTAXES])
def test_ingest_selects_the_hippocrop_series(studies, syntax):
    from hippo.dicom.ingest import scan_study, select_series

    scan = scan_study(studies.encoded(syntax), workers=2)
    series = select_series(scan)
    assert series.description == "HippoCrop"
    assert sorted(Path(p).name for p in series.files) == [p.name for p in files(studies.twin(syntax))]
    assert not scan.ignored


# ----------------------------------------------------------------------------------------------
# The whole pipeline: JPEG Lossless SV1 (the "done when") and Process 14


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from hippo.weights import resolve_model_path
    from hippo.deploy.pipeline import build_processor

    return build_processor(resolve_model_path(None, "outputs"), tmp_path_factory.mktemp("results"),
                           write_png=False, io_threads=2)


@pytest.fixture(scope="module")
def uncompressed_result(studies, processor):
    """(volumes, SEG frames) of the uncompressed study (read at once: a re-encoded copy's results have
    the same UIDs, so they are written to the same place)."""
    outcome = processor.process(studies.base())
    assert outcome.status in ("ok", "review"), f"{outcome.stage}: {outcome.error}"
    return outcome.status, outcome.volumes, pydicom.dcmread(outcome.files["seg"]).pixel_array


@pytest.mark.realdata
@pytest.mark.parametrize("syntax", _params([BY_ID["jpeg-lossless-sv1"], BY_ID["jpeg-lossless-p14"]]))
def test_pipeline_measures_the_same_volumes_as_for_the_uncompressed_twin(studies, processor,
                                                                         uncompressed_result, syntax):
    status, volumes, seg_frames = uncompressed_result
    outcome = processor.process(studies.encoded(syntax))
    assert outcome.status == status, f"{outcome.stage}: {outcome.error}"
    assert outcome.volumes == volumes
    assert volumes["total_mm3"] > 0
    print(f"\n{syntax.uid.name}: {outcome.volumes['anterior_mm3']:.0f} / {outcome.volumes['posterior_mm3']:.0f}"
          f" / {outcome.volumes['total_mm3']:.0f} mm³ (anterior / posterior / total); uncompressed "
          f"{volumes['anterior_mm3']:.0f} / {volumes['posterior_mm3']:.0f} / {volumes['total_mm3']:.0f} mm³")
    np.testing.assert_array_equal(pydicom.dcmread(outcome.files["seg"]).pixel_array, seg_frames)


# ----------------------------------------------------------------------------------------------
# What nothing decodes is refused, naming the file and the transfer syntax


def _small_series(folder: Path) -> list[Path]:
    from hippo.scanner import StudyInfo, write_series

    vol = np.arange(6 * 5 * 4, dtype=np.uint16).reshape(6, 5, 4)
    return write_series(vol, np.eye(4), folder, study=StudyInfo(seed=3))


def _relabel(path: Path, uid: str) -> None:
    """Claim ``uid`` for the file, with a (meaningless) encapsulated codestream as its pixel data."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = encapsulate([b"\xff\x0a" + bytes(30)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


def test_a_syntax_nothing_decodes_is_refused_naming_file_and_syntax(tmp_path):
    from pydicom.pixels import get_decoder

    with pytest.raises(NotImplementedError):  # no decoder at all for it in this environment
        get_decoder(UNDECODABLE)
    paths = _small_series(tmp_path)
    _relabel(paths[1], UNDECODABLE)
    with pytest.raises(PixelDecodeError) as err:
        load_series(paths)
    message = str(err.value)
    assert str(paths[1]) in message and str(UNDECODABLE) in message
    assert "Install a decoder" in message  # not mistaken for corrupt data
    assert isinstance(err.value, SeriesError)


def test_the_pipeline_reports_an_undecodable_series_at_the_volume_stage(tmp_path, model_file):
    from hippo.deploy.pipeline import build_processor

    paths = _small_series(tmp_path / "study")
    for p in paths:
        _relabel(p, UNDECODABLE)
    outcome = build_processor(model_file, tmp_path / "out", write_png=False).process(tmp_path / "study")
    assert outcome.status == "failed" and outcome.stage == "volume"
    assert str(UNDECODABLE) in outcome.error and any(str(p) in outcome.error for p in paths)


# ----------------------------------------------------------------------------------------------
# Over the network: the AI listener accepts each syntax and stores the instances as they came


class _NoProcessing:
    def process(self, study_dir):  # pragma: no cover - the quiet period never ends in these tests
        raise AssertionError("these tests only receive")


@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    from hippo.network.listener import Listener
    from hippo.network.orthanc import free_port

    lst = Listener(port=free_port(), root=tmp_path_factory.mktemp("listener"), processor_factory=_NoProcessing,
                   quiet_seconds=3600, stop_timeout=10)
    lst.start()
    yield lst
    lst.stop(timeout=10)


def _stored(listener, path: Path) -> Path:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return listener.incoming_dir / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"


@pytest.mark.realdata
@pytest.mark.parametrize("syntax", _params())
def test_listener_accepts_and_stores_each_syntax_unchanged(studies, listener, syntax):
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    from hippo.pacs import PacsConfig, send

    assert syntax.uid in ALL_TRANSFER_SYNTAXES
    sent = files(studies.encoded(syntax))
    report = send(sent, PacsConfig(port=listener.port, called_ae=listener.ae_title, calling_ae="ORTHANC",
                                   retries=0, timeout=10))
    assert report.ok, report
    for path in sent:
        stored = _stored(listener, path)
        got, original = pydicom.dcmread(stored), pydicom.dcmread(path)
        assert got.file_meta.TransferSyntaxUID == syntax.uid
        assert got.PixelData == original.PixelData  # as it came: no transcoding on the way
    volume = load_series([_stored(listener, p) for p in sent], workers=2)
    np.testing.assert_array_equal(volume.array, load_series(sent, workers=2).array)


@pytest.mark.realdata
def test_scanner_sends_a_compressed_study(studies, listener):
    from hippo.scanner import send_study

    result = send_study(studies.encoded(BY_ID["jpeg-lossless-sv1"]), "127.0.0.1", listener.port,
                        called_ae=listener.ae_title, calling_ae="HIPPOSCANNER", timeout_s=10)
    assert result["failed"] == 0 and result["sent"] == result["total"]


# ----------------------------------------------------------------------------------------------
# Orthanc (Debian package) in between: it stores what the modality sent and routes it unchanged


@pytest.mark.service
@pytest.mark.realdata
def test_orthanc_forwards_each_syntax_unchanged(studies, tmp_path):
    from hippo.network import orthanc as orth
    from hippo.network.listener import Listener
    from hippo.pacs import PacsConfig, send

    if orth.find_orthanc() is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    available = [s for s in SYNTAXES if not s.needs_tool or shutil.which(s.needs_tool)]
    # one study per syntax (Orthanc keeps one instance per SOPInstanceUID); a few slices of each are
    # enough to see what Orthanc forwards (it stores ~20 instances/s here)
    sent = {s.id: files(studies.encoded(s, seed=100 + i))[:4] for i, s in enumerate(available)}
    lst = Listener(port=orth.free_port(), root=tmp_path / "listener", processor_factory=_NoProcessing,
                   quiet_seconds=3600, stop_timeout=10)
    settings = orth.OrthancSettings(
        dicom_port=orth.free_port(), http_port=orth.free_port(), stable_age=1, dicomweb=False,
        modalities={"hippoai": {"aet": lst.ae_title, "host": "127.0.0.1", "port": lst.port},
                    "scanner": {"aet": "HIPPOSCANNER", "host": "127.0.0.1", "port": orth.free_port()}},
        name="HippoVolume transfer-syntax test PACS")
    lst.start()
    proc = orth.start_orthanc(settings, tmp_path / "orthanc")
    try:
        orth.wait_ready(settings.http_url, 30, proc=proc, name=settings.name,
                        log_file=tmp_path / "orthanc" / orth.LOG_NAME)
        report = send([p for paths in sent.values() for p in paths],
                      PacsConfig(port=settings.dicom_port, called_ae=settings.aet, calling_ae="HIPPOSCANNER",
                                 retries=0, timeout=20))
        assert report.ok, report
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(
                _stored(lst, p).is_file() for paths in sent.values() for p in paths):
            time.sleep(0.5)
        for syntax in available:
            for path in sent[syntax.id]:
                stored = _stored(lst, path)
                assert stored.is_file(), (f"{syntax.id}: {path.name} not forwarded; Orthanc log:\n"
                                          f"{orth.tail(tmp_path / 'orthanc' / orth.LOG_NAME, 40)}")
                got, original = pydicom.dcmread(stored), pydicom.dcmread(path)
                assert got.file_meta.TransferSyntaxUID == syntax.uid, syntax.id
                assert got.PixelData == original.PixelData, syntax.id
                assert got.SOPInstanceUID == original.SOPInstanceUID
    finally:
        orth.stop(proc)
        lst.stop(timeout=10)
