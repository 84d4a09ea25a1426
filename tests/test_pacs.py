"""hippo.pacs: C-ECHO, C-STORE over one association, retries with backoff, the on-disk outbox.

A pynetdicom Storage SCP (tests/fakes.py) runs in-process on a loopback port (no Orthanc needed).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (ComprehensiveSRStorage, ExplicitVRLittleEndian, MRImageStorage,
                         SecondaryCaptureImageStorage, SegmentationStorage, generate_uid)
from pynetdicom.sop_class import Comprehensive3DSRStorage

from fakes import StorageSCP
from hippo.pacs import (Outbox, PacsConfig, SendReport, deliver, echo, send, validate_uid)
from hippo.network.orthanc import free_port

STORAGE = [SecondaryCaptureImageStorage, SegmentationStorage, Comprehensive3DSRStorage,
           MRImageStorage]


@pytest.fixture
def pacs(storage_scp):
    return storage_scp(sop_classes=STORAGE)


def cfg_for(port: int, **kw) -> PacsConfig:
    base = dict(port=port, timeout=5.0, retries=2, backoff=0.001)
    base.update(kw)
    return PacsConfig(**base)


def result_object(sop_class: str, *, rows: int = 4) -> Dataset:
    """A tiny dataset of ``sop_class`` (SC / SEG / 3D SR stand-ins: the SCP does not validate)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P001"
    ds.Modality = {SegmentationStorage: "SEG", Comprehensive3DSRStorage: "SR"}.get(sop_class, "OT")
    if sop_class != Comprehensive3DSRStorage:
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.zeros((rows, rows), np.uint8).tobytes()
    return ds


def results_batch() -> list[Dataset]:
    return [result_object(SecondaryCaptureImageStorage), result_object(SegmentationStorage),
            result_object(Comprehensive3DSRStorage)]


def uids(objs) -> list[str]:
    return [str(o.SOPInstanceUID) for o in objs]


# ------------------------------------------------------------------------------------------------
def test_config_defaults_and_validation():
    cfg = PacsConfig()
    assert (cfg.host, cfg.port, cfg.called_ae, cfg.calling_ae) == ("127.0.0.1", 4242, "ORTHANC",
                                                                   "HIPPOAI")
    assert (cfg.timeout, cfg.retries, cfg.backoff, cfg.max_pdu) == (10.0, 3, 0.5, 0)
    assert PacsConfig(**{"port": "104", "retries": "1"}).port == 104
    assert PacsConfig.from_mapping({"_target_": "hippo.pacs.PacsConfig", "port": 11112}).port == 11112
    with pytest.raises(ValueError, match="calling_ae"):
        PacsConfig(calling_ae="X" * 17)
    with pytest.raises(ValueError, match="port"):
        PacsConfig(port=0)


def test_echo(pacs):
    assert echo(cfg_for(pacs.port)) is True
    assert echo(cfg_for(free_port())) is False


def test_send_delivers_all_in_one_association(pacs, caplog):
    caplog.set_level(logging.INFO, logger="hippo.pacs")
    objs = results_batch() + [result_object(SecondaryCaptureImageStorage)]
    report = send(objs, cfg_for(pacs.port))
    assert report.ok and report.delivered_uids == uids(objs) and not report.undelivered
    assert report.attempts == 1 and report.associations == 1
    assert pacs.associations == 1
    assert sorted(pacs.stored_uids()) == sorted(uids(objs))
    assert [r.state for r in report.results] == ["success"] * 4
    assert all(r.status == 0 for r in report.results)
    assert "4/4 delivered" in caplog.text and "Doe" not in caplog.text
    assert report.counts()["success"] == 4


def test_send_paths_and_datasets_without_file_meta(pacs, tmp_path):
    on_disk = result_object(SegmentationStorage)
    path = tmp_path / "seg.dcm"
    on_disk.save_as(path, enforce_file_format=True)
    bare = result_object(SecondaryCaptureImageStorage)
    del bare.file_meta
    report = send([path, bare], cfg_for(pacs.port))
    assert report.ok, report
    assert report.results[0].source == str(path) and report.results[1].source == "<dataset>"
    assert sorted(pacs.stored_uids()) == sorted([on_disk.SOPInstanceUID, bare.SOPInstanceUID])
    assert not hasattr(bare, "file_meta") or "TransferSyntaxUID" not in bare.file_meta


def test_invalid_objects_are_reported_not_raised(pacs, tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_text("not dicom")
    no_uid = result_object(SecondaryCaptureImageStorage)
    del no_uid.SOPInstanceUID
    good = result_object(SecondaryCaptureImageStorage)
    report = send([junk, no_uid, good], cfg_for(pacs.port))
    assert [r.state for r in report.results] == ["invalid", "invalid", "success"]
    assert pacs.stored_uids() == [good.SOPInstanceUID]


def test_unsupported_sop_class_is_a_failure_not_a_crash(pacs):
    odd = result_object(ComprehensiveSRStorage)        # the SCP does not support plain Comprehensive SR
    good = result_object(SegmentationStorage)
    report = send([odd, good], cfg_for(pacs.port))
    assert report.results[0].state == "failure" and "context" in report.results[0].message
    assert report.results[1].state == "success"
    assert pacs.stored_uids() == [good.SOPInstanceUID] and report.attempts == 1


def test_pacs_down_reports_all_undelivered_with_backoff():
    delays: list[float] = []
    objs = results_batch()
    report = send(objs, cfg_for(free_port(), retries=3, backoff=0.01), sleep=delays.append)
    assert not report.ok and report.undelivered_uids == uids(objs)
    assert {r.state for r in report.results} == {"not_sent"}
    assert report.attempts == 4 and report.associations == 0
    assert delays == pytest.approx([0.01, 0.02, 0.04])    # doubled each retry


def test_retry_succeeds_once_pacs_comes_up():
    port = free_port()
    servers: list[StorageSCP] = []
    delays: list[float] = []

    def sleep_then_start(seconds: float) -> None:
        delays.append(seconds)
        if not servers:
            servers.append(StorageSCP(port, sop_classes=STORAGE))

    objs = results_batch()
    try:
        report = send(objs, cfg_for(port, retries=3, backoff=0.005), sleep=sleep_then_start)
        assert report.ok and report.attempts == 2 and report.associations == 1
        assert delays == [0.005]
        assert sorted(servers[0].stored_uids()) == sorted(uids(objs)) and servers[0].associations == 1
    finally:
        for s in servers:
            s.stop()


def test_rejected_association_is_retried_then_reported():
    port = free_port()
    server = StorageSCP(port, sop_classes=STORAGE, ae_title="ORTHANC", require_called_aet=True)
    try:
        delays: list[float] = []
        report = send(results_batch(), cfg_for(port, called_ae="WRONG", retries=1),
                      sleep=delays.append)
        assert report.attempts == 2 and report.associations == 0 and len(delays) == 1
        assert all(r.state == "not_sent" and "rejected" in r.message for r in report.results)
        assert server.request_uids() == []
    finally:
        server.stop()


def test_down_then_outbox_then_flush_delivers_exactly_once(tmp_path):
    port = free_port()
    cfg = cfg_for(port, retries=1)
    outbox = Outbox(tmp_path / "outbox")
    objs = results_batch()
    report = deliver(objs, cfg, outbox, sleep=lambda s: None)
    assert not report.delivered and sorted(report.queued) == sorted(uids(objs))
    pending = outbox.pending()
    assert sorted(e.sop_instance_uid for e in pending) == sorted(uids(objs))
    for e in pending:
        assert e.path == tmp_path / "outbox" / f"{e.sop_instance_uid}.dcm"
        assert e.destination["port"] == port and e.destination["called_ae"] == "ORTHANC"
        assert "Doe" not in (e.path.with_suffix(".json")).read_text()
        assert pydicom.dcmread(e.path).SOPInstanceUID == e.sop_instance_uid

    # still down: flush keeps everything and counts the attempt
    assert not outbox.flush(cfg, sleep=lambda s: None).delivered
    assert {e.attempts for e in outbox.pending()} == {1}

    server = StorageSCP(port, sop_classes=STORAGE)
    try:
        flushed = outbox.flush()            # destination from the sidecars
        assert flushed.ok and sorted(flushed.delivered_uids) == sorted(uids(objs))
        assert outbox.pending() == [] and len(outbox) == 0
        assert list((tmp_path / "outbox").glob("*.json")) == []
        again = outbox.flush(cfg)
        assert again.results == [] and again.attempts == 0
        assert Counter(server.stored_uids()) == Counter({u: 1 for u in uids(objs)})
        assert server.associations == 1
    finally:
        server.stop()


def test_deliver_with_pacs_up_queues_nothing(pacs, tmp_path):
    outbox = Outbox(tmp_path / "ob")
    report = deliver(results_batch(), cfg_for(pacs.port), outbox)
    assert report.ok and report.queued == [] and outbox.pending() == []


def test_refusing_scp_leaves_objects_in_outbox(tmp_path):
    port = free_port()
    server = StorageSCP(port, sop_classes=STORAGE, status=0xA700)
    outbox = Outbox(tmp_path / "ob")
    objs = results_batch()
    try:
        report = deliver(objs, cfg_for(port), outbox)
        assert [r.status for r in report.results] == [0xA700] * 3
        assert {r.state for r in report.results} == {"failure"}
        assert report.attempts == 1           # a failure status is not a network retry
        assert sorted(e.sop_instance_uid for e in outbox.pending()) == sorted(uids(objs))
        assert sorted(server.request_uids()) == sorted(uids(objs)) and server.stored_uids() == []

        flushed = outbox.flush(cfg_for(port))        # still refusing
        assert not flushed.delivered and len(outbox.pending()) == 3
        meta = json.loads(outbox.pending()[0].path.with_suffix(".json").read_text())
        assert meta["attempts"] == 1 and "A700" in meta["last_error"]

        server.status = 0x0000                       # recovers
        assert outbox.flush(cfg_for(port)).ok and outbox.pending() == []
        assert Counter(server.stored_uids()) == Counter({u: 1 for u in uids(objs)})
    finally:
        server.stop()


def test_half_written_and_foreign_files_are_never_sent(pacs, tmp_path):
    root = tmp_path / "ob"
    outbox = Outbox(root)
    good = result_object(SecondaryCaptureImageStorage)
    outbox.put(good, cfg_for(pacs.port))
    half = result_object(SegmentationStorage)
    # what a crash during write_bytes_atomic leaves behind: a hidden temporary file
    full = (outbox.path_for(good.SOPInstanceUID)).read_bytes()
    (root / f".{half.SOPInstanceUID}.dcm.abc123.tmp").write_bytes(full[: len(full) // 2])
    (root / "notes.dcm").write_bytes(b"junk")                 # not a UID name
    (root / f"{generate_uid()}.json").write_text("{}")        # orphan sidecar (crash before .dcm)
    assert [e.sop_instance_uid for e in outbox.pending()] == [good.SOPInstanceUID]
    report = outbox.flush(cfg_for(pacs.port))
    assert report.delivered_uids == [good.SOPInstanceUID]
    assert pacs.stored_uids() == [good.SOPInstanceUID]
    assert list(root.glob("*.json")) == []                    # orphan removed, sent one removed
    assert (root / f".{half.SOPInstanceUID}.dcm.abc123.tmp").exists()


def test_bad_uids_never_become_paths(tmp_path):
    outbox = Outbox(tmp_path / "ob")
    for bad in ["../../etc/passwd", "1.2.3/4", "", "1" * 65, "1..2", ".", "1.2.", "abc"]:
        with pytest.raises(ValueError, match="refusing UID"):
            outbox.path_for(bad)
    assert validate_uid("1.2.840.10008.5.1.4.1.1.7") == "1.2.840.10008.5.1.4.1.1.7"
    ds = result_object(SecondaryCaptureImageStorage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = "1.2/../../x"
    with pytest.raises(ValueError, match="refusing UID"):
        outbox.put(ds, PacsConfig())
    assert list((tmp_path / "ob").iterdir()) == []


def test_put_twice_keeps_one_entry_and_path_input(pacs, tmp_path):
    outbox = Outbox(tmp_path / "ob")
    ds = result_object(SegmentationStorage)
    src = tmp_path / "seg.dcm"
    ds.save_as(src, enforce_file_format=True)
    outbox.put(ds, cfg_for(pacs.port))
    outbox.put(src, cfg_for(pacs.port))
    assert len(outbox) == 1
    assert outbox.flush(cfg_for(pacs.port)).delivered_uids == [ds.SOPInstanceUID]


def test_report_str_and_merge():
    r = SendReport(destination="A@h:1")
    merged = r.merge(SendReport(destination="B@h:2", attempts=2))
    assert merged.attempts == 2 and merged.destination == "A@h:1, B@h:2" and merged.ok
    assert "0/0 delivered" in str(merged)
