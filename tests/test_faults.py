"""Reliability under faults, and the security rules, with real processes where it matters.

A pynetdicom Storage SCP plays Orthanc (it can refuse, abort an association, or SIGKILL the
process talking to it at a chosen instance); the listener runs as ``python -m hippo.listen`` in a
subprocess and is killed with SIGKILL; a small random UNet runs the real pipeline.

PACS side (:mod:`hippo.pacs`; the documented contract is *at-least-once*: an object the PACS
accepted whose acknowledgement was lost is sent again, and nothing else is):

* ``test_outbox_survives_outage_and_refusal_then_delivers_each_object_once`` -- PACS down, then up
  but refusing one SOP class, then healthy: the outbox never loses an object; each SOP instance is
  stored exactly once; a final flush sends nothing.
* ``test_association_aborted_mid_send_loses_nothing`` -- an SCP aborting every association at its
  2nd C-STORE, (a) before storing, (b) after storing (answer lost): nothing is lost; (a) every
  instance stored once, (b) only the instances in flight at an abort are stored twice.
* ``test_flusher_killed_mid_flush_resends_only_the_object_in_flight`` -- a real ``Outbox.flush``
  process SIGKILLed while the PACS stores its 3rd object: the acknowledged entries are gone from
  the outbox, the rest (the one in flight included) are delivered by the next flush.

Listener (a real process, SIGKILL):

* ``test_listener_killed_while_receiving_resumes_with_one_result_set`` -- killed in the middle of
  an association after half of the slices (in acquisition order: a valid shorter series);
  restarted; the sender sends what was not acknowledged: one SC/SEG/SR set, all instances in
  ``processed/<UID>/`` (the restart waits a quiet period before taking a resumed study).
* ``test_listener_killed_while_processing_then_same_study_again`` -- killed as soon as the study
  appears in ``work/``: on restart it is processed, one result set; the same study sent again after
  completion gives no new results.
* ``test_listener_killed_after_sending_results_gives_no_second_result_set`` -- killed by the PACS
  the moment it stored the SR (results delivered, the study not yet recorded): the restart redoes
  the study and re-sends the *same* SOP instances; the PACS ends with one result set.
  ``test_result_uids_repeat_only_for_the_same_inputs_model_and_options``: why, and that a changed
  study, model or report option gives new UIDs.

Atomic writes (:mod:`hippo.fileio`): ``test_atomic_write_*`` -- a failing rename leaves neither a
target nor a temporary file; a process killed between writing and renaming leaves only a hidden
``.<name>.*.tmp`` that no ``*.dcm``/``*.json`` glob, outbox or listener takes for an object.
(Hand-made temporary files in the outbox and in ``incoming/`` are covered by
tests/test_pacs.py::test_half_written_and_foreign_files_are_never_sent and
tests/test_listener.py::test_restart_resumes_incoming_and_interrupted_work.)

Security:

* ``test_listener_process_binds_loopback_refuses_unknown_aes_and_never_logs_patients`` -- the
  entrypoint's defaults: bound to 127.0.0.1 only (a connection to this machine's non-loopback
  address is refused), unknown calling AE and wrong called AE rejected; the listener's log and stdout hold no patient
  name or ID (there is no option to log them; ``log_pynetdicom=true`` only adds pynetdicom's
  association messages, checked too).
* ``test_deploy_logs_and_summaries_name_no_patient`` -- ``hippo.deploy`` on a good and a failing
  study: stdout, stderr, ``deploy.log``, ``summary.json``/``.md`` and ``result.json`` hold no
  patient name or ID.
* ``test_network_orthanc_config_is_loopback_only_and_needs_credentials`` -- the configuration
  ``hippo.network`` generates has ``RemoteAccessAllowed: false``, HTTP Basic authentication with
  the generated service account and the Lua access filter; a real Orthanc answers 401 without or
  with wrong credentials, 200 with the service account's or an ``orthanc.users`` user's. The
  attacks from a web page (cross-origin ``POST /tools/shutdown``, ``DELETE``, ``POST /instances``,
  ``?_method=DELETE``, a foreign Host) are in tests/test_orthanc.py::
  test_http_access_needs_credentials_own_host_and_no_foreign_origin and tests/test_viewer.py
  (test_only_its_own_host_is_answered, test_proxy_refuses_method_override_other_resources_and_cross_site_requests).
* Unsafe UIDs (``../../x``) never become paths: tests/test_listener.py::
  test_unsafe_uids_are_refused_and_nothing_escapes and tests/test_pacs.py::
  test_bad_uids_never_become_paths. The generated Orthanc defaults (remote HTTP refused from a
  non-loopback address, unknown DICOM peers refused): tests/test_orthanc.py::test_write_config_defaults
  and ::test_echo_and_access_rules.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (Comprehensive3DSRStorage, MRImageStorage, SecondaryCaptureImageStorage,
                                  SegmentationStorage)

from conftest import ANY_VOLUME_OVERRIDES, REAL_DATA, synthetic_crop_pair
from fakes import StorageSCP, wait_for
from hippo.fileio import write_bytes_atomic, write_json_atomic
from hippo.network.study_folders import instances as _instances
from hippo.pacs import Outbox, PacsConfig, deliver, echo
from hippo.scanner import send_study, write_study
from hippo.network.orthanc import free_port as _free_port
from conftest import local_non_loopback_ip

ROOT = Path(__file__).resolve().parents[1]
QUIET = 1.0
SC, SEG, SR = SecondaryCaptureImageStorage, SegmentationStorage, Comprehensive3DSRStorage
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _result_object(sop_class: str, study_uid: str | None = None) -> Dataset:
    """A tiny stand-in for an SC / SEG / SR (the fake SCP does not validate content)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = "Doe^Jane", "P001"
    ds.Modality = {SEG: "SEG", SR: "SR"}.get(sop_class, "OT")
    if sop_class != SR:
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.zeros((4, 4), np.uint8).tobytes()
    return ds


def _batch(n: int = 5) -> list[Dataset]:
    study = generate_uid()
    return [_result_object((SC, SEG, SR)[i % 3], study) for i in range(n)]


def _uids(objs) -> list[str]:
    return [str(o.SOPInstanceUID) for o in objs]


@pytest.fixture
def orthanc(storage_scp):
    return storage_scp()


# ============================================================================================ PACS
def test_outbox_survives_outage_and_refusal_then_delivers_each_object_once(tmp_path):
    objs = _batch(5)
    port = _free_port()
    cfg = PacsConfig(port=port, timeout=5, retries=1, backoff=0.01)
    outbox = Outbox(tmp_path / "outbox")

    report = deliver(objs, cfg, outbox, sleep=lambda s: None)  # the PACS is down
    assert report.delivered == [] and sorted(report.queued) == sorted(_uids(objs))
    assert sorted(e.sop_instance_uid for e in outbox.pending()) == sorted(_uids(objs))

    pacs = StorageSCP(port)  # up, but refusing every SEG (out of resources)
    try:
        pacs.script = lambda rec, n: 0xA700 if rec[1] == SEG else 0x0000
        flushed = outbox.flush(cfg, sleep=lambda s: None)
        segs = [str(o.SOPInstanceUID) for o in objs if o.SOPClassUID == SEG]
        assert sorted(flushed.undelivered_uids) == sorted(segs)
        assert sorted(e.sop_instance_uid for e in outbox.pending()) == sorted(segs)  # kept, not dropped
        assert {e.attempts for e in outbox.pending()} == {1}

        pacs.script = None  # healthy again
        assert outbox.flush(cfg).ok and outbox.pending() == []
        assert outbox.flush(cfg).results == []  # nothing left: nothing re-sent
        assert pacs.stored_sops() == Counter({u: 1 for u in _uids(objs)})  # each exactly once
        assert Counter(r[2] for r in pacs.requests) == Counter({u: 1 + (u in segs) for u in _uids(objs)})
    finally:
        pacs.stop()
    assert not list((tmp_path / "outbox").glob("*.json")) and not list((tmp_path / "outbox").glob("*.dcm"))


@pytest.mark.parametrize("mode", ["abort", "store+abort"])
def test_association_aborted_mid_send_loses_nothing(tmp_path, orthanc, mode):
    objs = _batch(5)
    orthanc.script = lambda rec, n: mode if n == 2 else 0x0000  # every association dies at its 2nd C-STORE
    cfg = PacsConfig(port=orthanc.port, timeout=5, retries=1, backoff=0.01)
    outbox = Outbox(tmp_path / "outbox")

    # attempt 1 delivers objs[0] and dies on objs[1]; the retry delivers objs[1] and dies on objs[2]
    report = deliver(objs, cfg, outbox, sleep=lambda s: None)
    u = _uids(objs)
    assert report.delivered_uids == u[:2] and report.queued == u[2:]
    assert sorted(e.sop_instance_uid for e in outbox.pending()) == sorted(u[2:])
    assert orthanc.aborted_at == u[1:3]

    orthanc.script = None
    assert outbox.flush(cfg).ok and outbox.pending() == []
    stored = orthanc.stored_sops()
    assert set(stored) == set(u)  # nothing lost
    in_flight = set(orthanc.aborted_at)
    # at-least-once: only an object the PACS stored but could not acknowledge is stored twice
    expected = {x: 2 if mode == "store+abort" and x in in_flight else 1 for x in u}
    assert stored == Counter(expected)


def test_flusher_killed_mid_flush_resends_only_the_object_in_flight(tmp_path, orthanc):
    objs = _batch(5)
    cfg = PacsConfig(port=orthanc.port, timeout=5, retries=0)
    outbox = Outbox(tmp_path / "outbox")
    for ds in objs:
        outbox.put(ds, cfg)
    order = [e.sop_instance_uid for e in outbox.pending()]  # the order a flush sends them in
    holder: dict = {}

    def kill_on_third(rec, n):
        if n == 3:  # stored by the PACS; the flusher dies before it hears the answer
            os.kill(holder["proc"].pid, signal.SIGKILL)
        return 0x0000

    orthanc.script = kill_on_third
    holder["proc"] = proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hippo.pacs import Outbox; Outbox(sys.argv[1]).flush()",
         str(outbox.root)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out.decode()[-2000:]
    assert list(orthanc.stored_sops()) == order[:3]

    # documented: what the PACS acknowledged is removed at once; the one in flight stays
    assert [e.sop_instance_uid for e in outbox.pending()] == order[2:]
    orthanc.script = None
    assert outbox.flush(cfg).ok and outbox.pending() == []
    assert orthanc.stored_sops() == Counter({u: 1 + (u == order[2]) for u in order})


# ======================================================================================= listener


@pytest.fixture(scope="module")
def make_study(tmp_path_factory):
    """``make_study(seed, distractors=False) -> (folder, manifest)``: flat files named by SOP UID,
    from a real Decathlon case when ../shared/data is there, else a synthetic one."""
    root = tmp_path_factory.mktemp("studies")
    if (REAL_DATA / "imagesTr" / "hippocampus_001.nii.gz").is_file():
        image, label = (REAL_DATA / "imagesTr" / "hippocampus_001.nii.gz",
                        REAL_DATA / "labelsTr" / "hippocampus_001.nii.gz")
    else:
        image, label = synthetic_crop_pair(root)

    def make(seed: int, distractors: bool = False) -> tuple[Path, dict]:
        out = root / f"study_{seed}_{int(distractors)}"
        if not out.exists():
            manifest = write_study(image, out, label_path=label, seed=seed, distractors=distractors)
            (out.parent / f"{out.name}.json").write_text(json.dumps(manifest, default=str))
        return out, json.loads((out.parent / f"{out.name}.json").read_text())

    return make


class ListenerProcess:
    """``python -m hippo.listen`` as a subprocess on a fixed port with its state under ``log_dir``;
    each start writes its stdout/stderr to ``log_dir/listener-<n>.out``."""

    def __init__(self, log_dir: Path, model_file: Path, pacs_port: int, *extra: str, quiet: float = QUIET) -> None:
        self.log_dir, self.port = log_dir, _free_port()
        self.root = log_dir / "network" / "listener"
        self.args = [sys.executable, "-m", "hippo.listen", f"listener.port={self.port}", f"paths.log_dir={log_dir}",
                     f"model_path={model_file}", f"pacs.port={pacs_port}", "pacs.retries=0", "pacs.timeout=5",
                     f"listener.quiet_seconds={quiet}", "io_threads=2", *ANY_VOLUME_OVERRIDES, *extra]
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "ListenerProcess":
        self.starts += 1
        with open(self.log_dir / f"listener-{self.starts}.out", "wb") as out:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        cfg = PacsConfig(port=self.port, called_ae="HIPPOAI", calling_ae="ORTHANC", retries=0, timeout=2)
        wait_for(lambda: self.proc.poll() is not None or echo(cfg), timeout=90, what="the listener to answer C-ECHO",
              interval=0.1)
        assert self.proc.poll() is None, self.logs()[-3000:]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM, the graceful stop; the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)

    def logs(self) -> str:
        """Everything the listener processes printed or logged (stdout/stderr and Hydra's log files)."""
        files = sorted(self.log_dir.glob("listener-*.out")) + sorted((self.root / "runs").glob("*/*.log"))
        return "\n".join(p.read_text(errors="replace") for p in files)

    def dir(self, name: str, uid: str) -> Path:
        return self.root / name / uid


@pytest.fixture
def listener_process(tmp_path, model_file, orthanc):
    made: list[ListenerProcess] = []

    def make(*extra: str, quiet: float = QUIET) -> ListenerProcess:
        lp = ListenerProcess(tmp_path, model_file, orthanc.port, *extra, quiet=quiet)
        made.append(lp)
        return lp

    yield make
    for lp in made:
        lp.kill()


def _store(port: int, files: list[Path], *, before: Callable[[int], None] | None = None,
           calling_ae: str = "HIPPOSCANNER") -> list[Path]:
    """C-STORE ``files`` one by one over one association (calling ``before(i)`` before file i);
    returns the files the peer acknowledged with Success. Stops at the first that gets no answer."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="HIPPOAI")
    assert assoc.is_established
    acked = []
    try:
        for i, path in enumerate(files):
            if before is not None:
                before(i)
            try:
                status = assoc.send_c_store(pydicom.dcmread(path))
            except RuntimeError:  # the association is gone
                break
            if not status or int(status.get("Status", -1)) != 0x0000:
                break
            acked.append(path)
    finally:
        if assoc.is_established:
            assoc.release()
    return acked


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.dcm")}


def _assert_no_patient(text: str, manifest: dict, where: str) -> None:
    name = str(manifest["patient_name"])
    for needle in {name, name.replace("^", " "), str(manifest["patient_id"])}:
        assert needle not in text, f"{where} names the patient ({needle!r})"


def test_listener_killed_while_receiving_resumes_with_one_result_set(listener_process, make_study, orthanc):
    folder, manifest = make_study(21)
    uid = manifest["study_instance_uid"]
    # in acquisition order, as a scanner sends: the first half is a valid, shorter series
    files = sorted(folder.glob("*.dcm"), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    half = len(files) // 2
    # 2 s of quiet: the restarted listener must not take the half study before the sender (this
    # test, right after the restart) has sent the rest, even on a loaded machine
    lp = listener_process(quiet=2.0).start()

    def kill_at_half(i: int) -> None:
        if i == half:  # the association is open, half of the study is stored
            lp.kill()

    acked = _store(lp.port, files, before=kill_at_half)
    assert acked == files[:half]
    assert _names(lp.dir("incoming", uid)) == {p.name for p in acked}  # what was acknowledged is on disk
    assert not orthanc.stored

    lp.start()  # the restart waits a quiet period before taking the half study ...
    rest = [p for p in files if p not in acked]
    assert _store(lp.port, rest) == rest  # ... and the sender sends what was not acknowledged
    wait_for(lambda: orthanc.has_results(uid), what="results at the fake Orthanc")
    wait_for(lambda: (lp.dir("processed", uid) / "listener.json").is_file(), what="processed/<UID>/listener.json")
    time.sleep(2.5)  # anything else it might send would arrive now
    assert orthanc.result_classes(uid) == Counter({SC: 1, SEG: 1, SR: 1})  # exactly one result set
    assert len(orthanc.stored_sops(uid)) == 3
    assert _names(lp.dir("processed", uid)) == {p.name for p in files}
    record = json.loads((lp.dir("processed", uid) / "listener.json").read_text())
    assert record["instances"] == len(files) and sorted(record["result_sop_instance_uids"]) == sorted(
        orthanc.stored_sops(uid))
    assert not any((lp.root / "incoming").iterdir()) and not any((lp.root / "work").iterdir())
    assert lp.stop() == 0
    _assert_no_patient(lp.logs(), manifest, "the listener log")


def test_listener_killed_while_processing_then_same_study_again(listener_process, make_study, orthanc):
    folder, manifest = make_study(22, distractors=True)
    uid = manifest["study_instance_uid"]
    lp = listener_process().start()
    report = send_study(folder, "127.0.0.1", lp.port, called_ae="HIPPOAI", calling_ae="HIPPOSCANNER", timeout_s=10)
    assert report["failed"] == 0
    work = lp.dir("work", uid)
    wait_for(lambda: work.is_dir() and any(work.glob("*.dcm")), timeout=30, interval=0.002,
          what="the study in work/")
    lp.kill()  # the pipeline is running on it
    assert not orthanc.stored and not lp.dir("processed", uid).exists()

    lp.start()  # work/ -> incoming/ -> processed again
    wait_for(lambda: orthanc.has_results(uid), what="results after the restart")
    wait_for(lambda: (lp.dir("processed", uid) / "listener.json").is_file(), what="processed/<UID>/listener.json")
    all_names = {f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm"
                 for p in folder.rglob("*.dcm")}
    assert _names(lp.dir("processed", uid)) == all_names
    assert not any((lp.root / "work").iterdir()) and not any((lp.root / "incoming").iterdir())
    record = (lp.dir("processed", uid) / "listener.json").read_bytes()

    # the same study again, after completion: skipped, no new results
    send_study(folder, "127.0.0.1", lp.port, called_ae="HIPPOAI", calling_ae="ORTHANC", timeout_s=10)
    wait_for(lambda: "all {} instance(s) already processed".format(len(all_names)) in lp.logs(), timeout=30,
          what="the repeated study to be skipped")
    assert orthanc.result_classes(uid) == Counter({SC: 1, SEG: 1, SR: 1})
    assert len(orthanc.stored) == 3
    assert (lp.dir("processed", uid) / "listener.json").read_bytes() == record
    assert lp.stop() == 0
    _assert_no_patient(lp.logs(), manifest, "the listener log")


def test_listener_killed_after_sending_results_gives_no_second_result_set(listener_process, make_study, orthanc):
    folder, manifest = make_study(23)
    uid = manifest["study_instance_uid"]
    lp = listener_process().start()
    first_pid = lp.pid

    def kill_on_sr(rec, n):
        if rec[1] == SR and lp.pid == first_pid:  # the whole result set is stored; the listener dies
            os.kill(first_pid, signal.SIGKILL)
        return 0x0000

    orthanc.script = kill_on_sr
    send_study(folder, "127.0.0.1", lp.port, called_ae="HIPPOAI", calling_ae="HIPPOSCANNER", timeout_s=10)
    wait_for(lambda: lp.proc.poll() is not None, timeout=60, what="the listener killed by the PACS")
    first = orthanc.stored_sops(uid)
    assert orthanc.result_classes(uid) == Counter({SC: 1, SEG: 1, SR: 1})
    assert lp.dir("work", uid).is_dir() and not lp.dir("processed", uid).exists()  # not recorded

    lp.start()  # redoes the study (documented restart rule) and re-sends its results
    wait_for(lambda: (lp.dir("processed", uid) / "listener.json").is_file(), what="processed/<UID>/listener.json")
    wait_for(lambda: sum(orthanc.stored_sops(uid).values()) >= 6, timeout=10, what="the re-sent results")
    assert lp.stop() == 0
    # at-least-once with the same SOP instances: the PACS holds one result set
    assert orthanc.stored_sops(uid) == Counter({u: 2 for u in first})
    assert orthanc.result_classes(uid) == Counter({SC: 1, SEG: 1, SR: 1})
    record = json.loads((lp.dir("processed", uid) / "listener.json").read_text())
    assert sorted(record["result_sop_instance_uids"]) == sorted(first)


def test_result_uids_repeat_only_for_the_same_inputs_model_and_options():
    """What makes the redo above harmless, and what keeps a changed study from being ignored by the
    PACS (it keeps the first instance of a SOPInstanceUID): the result UIDs change with the inputs."""
    from types import SimpleNamespace

    from hippo.deploy.pipeline import result_uid_maker

    def scan(*sops):
        return SimpleNamespace(series=[SimpleNamespace(instances=[SimpleNamespace(sop_instance_uid=u) for u in sops])])

    model = {"format": "hippo-model/1", "created": "2026-01-01T00:00:00+00:00", "path": "/a/model.pt"}
    opts = {"precision": "float32"}
    base = result_uid_maker(scan("1.1", "1.2"), "9.9", model, opts)
    assert base("sc") == result_uid_maker(scan("1.2", "1.1"), "9.9", {**model, "path": "/b/moved.pt"}, opts)("sc")
    assert len({base(r) for r in ("sc", "sc-series", "seg", "seg-series", "sr", "sr-series")}) == 6
    for other in (result_uid_maker(scan("1.1", "1.2", "1.3"), "9.9", model, opts),  # the study changed
                  result_uid_maker(scan("1.1", "1.2"), "9.9", {**model, "created": "2026-02-01"}, opts),
                  result_uid_maker(scan("1.1", "1.2"), "9.9", model, {"precision": "bfloat16"})):  # other settings
        assert other("sc") != base("sc")


# ================================================================================== atomic writes
def test_atomic_write_failing_rename_leaves_nothing(tmp_path, monkeypatch):
    import hippo.fileio as fileio

    target = tmp_path / "out" / "1.2.3.dcm"
    write_bytes_atomic(target, b"old complete content")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        write_bytes_atomic(target, b"new content")
    with pytest.raises(OSError):
        write_json_atomic(tmp_path / "out" / "x.json", {"a": 1})
    assert target.read_bytes() == b"old complete content"  # the old file is untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1.2.3.dcm"]  # no temporary left


def test_atomic_write_crash_before_rename_leaves_only_a_hidden_temporary(tmp_path):
    """A process killed between writing the temporary file and renaming it (``os.replace`` is made
    to SIGKILL the process): the outbox entry is never complete, nothing looks like an object."""
    root = tmp_path / "outbox"
    ds = _result_object(SEG)
    ds_path = tmp_path / "seg.dcm"
    ds.save_as(ds_path, enforce_file_format=True)
    code = (
        "import os, signal, sys\n"
        "import hippo.fileio as f\n"
        "real = f.os.replace\n"
        "def replace(src, dst):\n"
        "    if str(dst).endswith('.dcm'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(src, dst)\n"
        "f.os.replace = replace\n"
        "from hippo.pacs import Outbox, PacsConfig\n"
        "Outbox(sys.argv[1]).put(sys.argv[2], PacsConfig())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(root), str(ds_path)], cwd=ROOT, env=ENV,
                          capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    uid = str(ds.SOPInstanceUID)
    leftovers = sorted(p.name for p in root.iterdir() if p.name != ".lock")
    temp = [n for n in leftovers if n.endswith(".tmp")]
    assert len(temp) == 1 and temp[0].startswith(f".{uid}.dcm.")  # hidden, complete bytes or not
    assert leftovers == sorted([f"{uid}.json", temp[0]])  # the sidecar (written first) and the temporary
    assert not (root / f"{uid}.dcm").exists()
    # the temporary name ends in .tmp (no *.dcm / *.json match) and starts with a dot (shell-style
    # globs such as glob.glob("*") skip it)
    assert list(root.glob("*.dcm")) == [] and [p.name for p in root.glob("*.json")] == [f"{uid}.json"]
    assert sorted(Path(p).name for p in glob.glob(str(root / "*"))) == [f"{uid}.json"]

    outbox = Outbox(root)
    assert outbox.pending() == [] and len(outbox) == 0
    assert _instances(root) == []  # the listener's rule for incoming/ and work/ skips it too
    pacs = StorageSCP()
    try:
        assert outbox.flush(PacsConfig(port=pacs.port, retries=0, timeout=5)).results == []
        assert pacs.requests == []
    finally:
        pacs.stop()
    assert not (root / f"{uid}.json").exists()  # the orphan sidecar is dropped by the flush


# ======================================================================================= security
def test_listener_process_binds_loopback_refuses_unknown_aes_and_never_logs_patients(
        listener_process, make_study, orthanc):
    from hydra import compose, initialize_config_dir

    from hippo.config import config_dir
    from hippo.network.listener import Listener

    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        cfg = compose("listen")
    assert cfg.listener.host == "127.0.0.1" and list(cfg.listener.allowed_calling_aets) == ["ORTHANC", "HIPPOSCANNER"]
    assert Listener(processor_factory=object).host == "127.0.0.1"

    folder, manifest = make_study(24)
    uid = manifest["study_instance_uid"]
    lp = listener_process("log_pynetdicom=true").start()  # no listener.host override: the default
    with socket.create_connection(("127.0.0.1", lp.port), timeout=5):
        pass
    ip = local_non_loopback_ip()
    if ip is not None:
        with pytest.raises(OSError):
            with socket.create_connection((ip, lp.port), timeout=5):
                pass
    assert not echo(PacsConfig(port=lp.port, called_ae="HIPPOAI", calling_ae="INTRUDER", retries=0, timeout=5))
    assert not echo(PacsConfig(port=lp.port, called_ae="NOTHIPPO", calling_ae="ORTHANC", retries=0, timeout=5))

    send_study(folder, "127.0.0.1", lp.port, called_ae="HIPPOAI", calling_ae="HIPPOSCANNER", timeout_s=10)
    wait_for(lambda: orthanc.has_results(uid), what="results")
    assert lp.stop() == 0
    logs = lp.logs()
    assert f"study {uid}: ok" in logs and "rejected" in logs
    _assert_no_patient(logs, manifest, "the listener log (with pynetdicom's messages)")


def test_deploy_logs_and_summaries_name_no_patient(model_file, make_study, tmp_path):
    good, m_good = make_study(25, distractors=True)
    bad, m_bad = make_study(26, distractors=True)
    root = tmp_path / "studies"
    shutil.copytree(good, root / "good")
    shutil.copytree(bad, root / "no_crop")
    for p in (root / "no_crop").glob("*.dcm"):  # drop the HippoCrop series: the study fails at ingest
        if pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription == "HippoCrop":
            p.unlink()
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "hippo.deploy", f"studies={root}", "workers=1", "send=false",
                           f"model_path={model_file}", "io_threads=2", f"hydra.run.dir={run}", *ANY_VOLUME_OVERRIDES],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one study failed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_ok"] == 1 and summary["n_failed"] == 1
    texts = {"stdout": proc.stdout, "stderr": proc.stderr}
    texts.update({str(p.relative_to(run)): p.read_text() for p in run.rglob("*")
                  if p.is_file() and p.suffix in (".log", ".json", ".md")})
    assert "deploy.log" in texts and "summary.md" in texts
    assert any(name.endswith("result.json") for name in texts)
    for where, text in texts.items():
        for manifest in (m_good, m_bad):
            _assert_no_patient(text, manifest, where)


@pytest.mark.service
def test_network_orthanc_config_is_loopback_only_and_needs_credentials(tmp_path):
    from hippo.network import orthanc as orth
    from hippo.network.stack import Network, load_config

    ports = [_free_port() for _ in range(4)]
    common = [f"paths.log_dir={tmp_path}", f"orthanc.dicom_port={ports[0]}", f"orthanc.http_port={ports[1]}",
              f"listener.port={ports[2]}", f"viewer.port={ports[3]}"]
    default = orth.build_config(Network(load_config(None, common)).orthanc, tmp_path / "default")
    assert default["RemoteAccessAllowed"] is False and default["AuthenticationEnabled"] is True
    assert list(default["RegisteredUsers"]) == ["hippo"] and str(tmp_path / "default" / "access.lua") in \
        default["LuaScripts"]

    if orth.find_orthanc() is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    net = Network(load_config(None, [*common, "orthanc.users.alice=a-long-password"]))
    net.up(only=["orthanc"])
    try:
        written = json.loads((tmp_path / "network/orthanc/orthanc.json").read_text())
        assert written["RemoteAccessAllowed"] is False and written["AuthenticationEnabled"] is True
        assert set(written["RegisteredUsers"]) == {"hippo", "alice"}
        url = net.orthanc.http_url
        with pytest.raises(orth.OrthancError, match="HTTP 401"):
            orth.OrthancClient(url, timeout=5).system()
        with pytest.raises(orth.OrthancError, match="HTTP 401"):
            orth.OrthancClient(url, timeout=5, auth=("alice", "wrong")).system()
        assert orth.OrthancClient(url, timeout=5, auth=("alice", "a-long-password")).system()["Name"]
        service = orth.read_credentials(tmp_path / "network/orthanc/credentials.json")
        assert orth.OrthancClient(url, timeout=5, auth=service).system()["Name"]
    finally:
        net.down()
