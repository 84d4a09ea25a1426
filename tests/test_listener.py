"""The AI listener (hippo.network.listener) on loopback, no Orthanc needed: a pynetdicom Storage SCP
(tests/fakes.py) plays Orthanc and records what comes back; the scanner emulator sends studies; a
small random UNet runs the real pipeline.

Covered: a study in -> SC, SEG, SR back to "Orthanc" and the inputs in processed/; a study arriving
while another is processed is queued, not lost; an instance re-sent while its study is processed is
kept, re-queued and skipped (nothing new); unknown calling / wrong called AE titles are rejected;
unsafe UIDs are refused (0xA900) and nothing is written; restart resumes incoming/ and work/ and
flushes the outbox; the
same study sent twice gives one set of results; our own results sent back are dropped; a study that
failed and is completed later is merged and processed; the Hydra entrypoint composes and stops on
SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage

from conftest import ANY_VOLUME, ANY_VOLUME_OVERRIDES, REAL_DATA, synthetic_crop_pair
from fakes import RESULT_CLASSES, wait_for
from hippo.network.listener import STATUS_INVALID_UID, STATUS_OUT_OF_RESOURCES, Listener
from hippo.pacs import Outbox, PacsConfig, echo
from hippo.scanner import ScannerSendError, send_study, write_study
from hippo.network.orthanc import free_port as _free_port

ROOT = Path(__file__).resolve().parents[1]
QUIET = 0.5


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def nifti_case(tmp_path_factory) -> tuple[Path, Path]:
    """(image, label) NIfTI: a real Decathlon case when ../shared/data is there, else synthetic."""
    if (REAL_DATA / "imagesTr" / "hippocampus_001.nii.gz").is_file():
        return (REAL_DATA / "imagesTr" / "hippocampus_001.nii.gz", REAL_DATA / "labelsTr" / "hippocampus_001.nii.gz")
    return synthetic_crop_pair(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def make_study(nifti_case, tmp_path_factory):
    """``make_study(seed, distractors=False) -> (folder, manifest)``: one study per seed, flat files."""
    root = tmp_path_factory.mktemp("studies")
    cache: dict[tuple[int, bool], tuple[Path, dict]] = {}

    def make(seed: int, distractors: bool = False) -> tuple[Path, dict]:
        if (seed, distractors) not in cache:
            out = root / f"study_{seed}_{int(distractors)}"
            manifest = write_study(nifti_case[0], out, label_path=nifti_case[1], seed=seed,
                                   distractors=distractors)
            cache[seed, distractors] = (out, manifest)
        return cache[seed, distractors]

    return make


@pytest.fixture
def orthanc(storage_scp):
    """The fake Orthanc: takes the results (and the key object the listener may send)."""
    return storage_scp(sop_classes=(*RESULT_CLASSES, KeyObjectSelectionDocumentStorage))


@pytest.fixture
def make_listener(tmp_path, model_file, orthanc):
    """``make_listener(**overrides) -> Listener`` (not started) on a free port, results to ``orthanc``;
    every listener made is stopped at teardown."""
    made: list[Listener] = []

    def make(**overrides) -> Listener:
        kwargs = dict(
            ae_title="HIPPOAI", host="127.0.0.1", port=_free_port(),
            allowed_calling_aets=["ORTHANC", "HIPPOSCANNER"], quiet_seconds=QUIET, workers=1,
            root=tmp_path / "listener", model_path=model_file,
            pacs={"host": "127.0.0.1", "port": orthanc.port, "called_ae": "ORTHANC", "calling_ae": "HIPPOAI",
                  "timeout": 5, "retries": 0},
            processor_options={"io_threads": 2, "plausibility": ANY_VOLUME}, stop_timeout=30,
        )
        kwargs.update(overrides)
        listener = Listener(**kwargs)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        if listener.running:
            listener.stop(timeout=30)


def _send(listener: Listener, folder: Path, calling_ae: str = "HIPPOSCANNER", called_ae: str | None = None) -> dict:
    return send_study(folder, "127.0.0.1", listener.port, called_ae=called_ae or listener.ae_title,
                      calling_ae=calling_ae, timeout_s=10)


def _sop_names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.dcm")}


def _manifest_names(manifest: dict) -> set[str]:
    return {f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm"
            for files in manifest["files"].values() for p in files}


# --------------------------------------------------------------------------------------- tests
def test_study_is_processed_and_results_reach_the_pacs(make_listener, make_study, orthanc, caplog):
    caplog.set_level(logging.INFO)
    folder, manifest = make_study(1, distractors=True)
    uid = manifest["study_instance_uid"]
    listener = make_listener().start()
    report = _send(listener, folder)
    assert report["failed"] == 0 and report["sent"] == report["total"] > 35

    wait_for(lambda: orthanc.has_results(uid), what="SC, SEG and SR at the fake Orthanc")
    assert listener.wait_idle(30)
    got = orthanc.for_study(uid)
    assert sorted(r[1] for r in got) == sorted(RESULT_CLASSES) and {r[3] for r in got} == {"HIPPOAI"}

    processed = listener.processed_dir / uid
    assert _sop_names(processed) == _manifest_names(manifest)  # every input instance, named by its UID
    record = json.loads((processed / "listener.json").read_text())
    assert record["status"] == "ok" and record["instances"] == report["total"]
    assert sorted(record["result_sop_instance_uids"]) == sorted(r[2] for r in got)
    assert record["volumes"]["total_mm3"] > 0
    assert {p.name for p in (listener.results_dir / uid).iterdir()} >= {"report_sc.dcm", "seg.dcm", "sr.dcm"}
    assert not any(listener.incoming_dir.iterdir()) and not any(listener.work_dir.iterdir())
    # the stored instance is the sent one, byte for byte after the file meta
    one = Path(manifest["files"]["HippoCrop"][0])
    sop = pydicom.dcmread(one, stop_before_pixels=True).SOPInstanceUID
    assert pydicom.dcmread(processed / f"{sop}.dcm").PixelData == pydicom.dcmread(one).PixelData

    status = listener.status()
    assert status["counts"]["studies_ok"] == 1 and status["counts"]["instances_received"] == report["total"]
    assert status["model_loaded"] and status["last"]["status"] == "ok" and status["outbox_pending"] == 0
    assert listener.stop(timeout=10) and not listener.running
    assert f"study {uid}: ok" in caplog.text
    name = manifest["patient_name"]  # the logs never name the patient
    for text in (name, name.replace("^", " "), manifest["patient_id"]):
        assert text not in caplog.text


def test_studies_arriving_during_processing_are_queued_not_lost(make_listener, make_study, orthanc, model_file):
    from hippo.deploy.pipeline import build_processor

    (fa, ma), (fb, mb) = make_study(2), make_study(3)
    ua, ub = ma["study_instance_uid"], mb["study_instance_uid"]
    entered, release, calls = threading.Event(), threading.Event(), []

    class Gated:  # holds the first study in the pipeline until the test releases it
        def __init__(self, inner):
            self.inner = inner

        def process(self, study_dir):
            calls.append(Path(study_dir).name)
            if len(calls) == 1:
                entered.set()
                assert release.wait(30)
            return self.inner.process(study_dir)

    holder: dict = {}
    built = []

    def factory():
        built.append(1)
        return Gated(build_processor(model_file, holder["listener"].results_dir,
                                     pacs={"port": orthanc.port, "retries": 0, "timeout": 5},
                                     outbox_dir=holder["listener"].outbox_dir, io_threads=2, plausibility=ANY_VOLUME))

    listener = holder["listener"] = make_listener(processor_factory=factory)
    listener.start()
    _send(listener, fa)
    assert entered.wait(30), "study A never reached the pipeline"
    assert listener.status()["processing"] == [ua]
    _send(listener, fb)   # a second study while A is processed
    again = fa.parent / "study_2_again"  # some of A's instances again, identical: kept, re-queued, skipped
    again.mkdir(exist_ok=True)
    for p in sorted(fa.glob("*.dcm"))[:4]:
        shutil.copy(p, again / p.name)
    _send(listener, again)
    wait_for(lambda: ub in listener.status()["queued"] and ua in listener.status()["receiving"], timeout=10,
          what="B queued and A's re-sent instances waiting")
    assert _sop_names(listener.incoming_dir / ua) == _sop_names(again)
    release.set()

    wait_for(lambda: orthanc.has_results(ua) and orthanc.has_results(ub), what="results of both studies")
    assert listener.wait_idle(30)
    assert calls == [ua, ub]                        # A once, B once; the re-sent A was not reprocessed
    assert len(orthanc.for_study(ua)) == 3 and len(orthanc.for_study(ub)) == 3
    counts = listener.status()["counts"]
    assert (counts["studies_ok"], counts["studies_skipped"], len(built)) == (2, 1, 1)
    assert _sop_names(listener.processed_dir / ub) == _manifest_names(mb)
    assert not any(listener.incoming_dir.iterdir())


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(make_listener, make_study):
    folder, _ = make_study(4)
    listener = make_listener(processor_factory=lambda: pytest.fail("nothing should be processed")).start()
    with pytest.raises(ScannerSendError, match="rejected"):
        _send(listener, folder, calling_ae="INTRUDER")
    with pytest.raises(ScannerSendError, match="rejected"):
        _send(listener, folder, called_ae="NOTHIPPO")
    assert echo(PacsConfig(port=listener.port, called_ae="HIPPOAI", calling_ae="ORTHANC", retries=0, timeout=5))
    assert not echo(PacsConfig(port=listener.port, called_ae="HIPPOAI", calling_ae="INTRUDER", retries=0, timeout=5))
    assert listener.wait_idle(5)
    status = listener.status()
    assert status["counts"]["associations_rejected"] == 3 and status["counts"]["instances_received"] == 0
    assert not any(p.is_file() for p in listener.root.rglob("*"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.filterwarnings("ignore:The value length")
def test_unsafe_uids_are_refused_and_nothing_escapes(make_listener, tmp_path):
    listener = make_listener(processor_factory=lambda: pytest.fail("nothing should be processed")).start()
    good = generate_uid()
    bad = [("../../evil", generate_uid()), (good, "../../../evil"), ("1.2.3/../../x", generate_uid()),
           ("", generate_uid()), ("1." * 40 + "1", generate_uid()), ("1.2.abc", generate_uid()),
           (good, "1..2"), (str(tmp_path / "abs"), generate_uid()), ("1.2.3\\4.5", generate_uid())]
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="HIPPOAI")
    assert assoc.is_established
    try:
        statuses = []
        for study_uid, sop_uid in bad:
            ds = Dataset()
            ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = MRImageStorage, sop_uid, study_uid
            ds.Modality, ds.PatientName = "MR", "Should^NotAppear"
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            statuses.append(int(assoc.send_c_store(ds).Status))
    finally:
        assoc.release()
    assert statuses == [STATUS_INVALID_UID] * len(bad)
    assert listener.wait_idle(5)
    assert listener.status()["counts"]["instances_refused"] == len(bad)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "model" not in p.parts]
    assert written == [] and not (tmp_path / "evil").exists() and not (tmp_path / "abs").exists()


def test_restart_resumes_incoming_and_interrupted_work(make_listener, make_study, orthanc):
    (fc, mc), (fd, md) = make_study(5), make_study(6)
    uc, ud = mc["study_instance_uid"], md["study_instance_uid"]
    listener = make_listener()
    # a crash left study C in incoming/ (plus a half-written temporary file) and D in work/
    (listener.incoming_dir / uc).mkdir(parents=True)
    for p in fc.glob("*.dcm"):
        shutil.copy(p, listener.incoming_dir / uc / p.name)
    (listener.incoming_dir / uc / ".half.dcm.123.tmp").write_bytes(b"partial")
    shutil.copytree(fd, listener.work_dir / ud)
    # ... and an object an earlier run could not deliver waits in the outbox
    pending = Dataset()
    pending.SOPClassUID, pending.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    pending.StudyInstanceUID, pending.Modality = generate_uid(), "OT"
    Outbox(listener.outbox_dir).put(pending, PacsConfig(port=orthanc.port, called_ae="ORTHANC", calling_ae="HIPPOAI"))
    listener.start()
    wait_for(lambda: orthanc.has_results(uc) and orthanc.has_results(ud), what="results of the resumed studies")
    assert listener.wait_idle(30)
    assert listener.status()["counts"]["studies_resumed"] == 2
    assert [r[2] for r in orthanc.for_study(pending.StudyInstanceUID)] == [pending.SOPInstanceUID]
    assert listener.status()["outbox_pending"] == 0
    assert _sop_names(listener.processed_dir / uc) == _manifest_names(mc)
    assert _sop_names(listener.processed_dir / ud) == _manifest_names(md)
    assert not any(listener.work_dir.iterdir())

    # a second restart does not redo anything
    listener.stop(timeout=10)
    listener.start()
    assert listener.wait_idle(10)
    assert listener.status()["counts"]["studies_resumed"] == 0
    assert len(orthanc.for_study(uc)) == 3 and len(orthanc.for_study(ud)) == 3


def test_same_study_twice_and_our_results_coming_back_give_one_set_of_results(make_listener, make_study, orthanc):
    folder, manifest = make_study(7)
    uid = manifest["study_instance_uid"]
    listener = make_listener().start()
    _send(listener, folder)
    wait_for(lambda: orthanc.has_results(uid), what="results")
    assert listener.wait_idle(30)
    record = (listener.processed_dir / uid / "listener.json").read_bytes()

    _send(listener, folder)  # rule: every instance already processed -> skipped, no new results
    assert listener.wait_idle(30)
    # Orthanc routing the study back with our own results in it: the results are dropped
    echo_dir = listener.root.parent / "echo"
    echo_dir.mkdir()
    for name in ("report_sc.dcm", "seg.dcm", "sr.dcm"):
        shutil.copy(listener.results_dir / uid / name, echo_dir / name)
    _send(listener, echo_dir, calling_ae="ORTHANC")
    assert listener.wait_idle(30)

    assert len(orthanc.for_study(uid)) == 3
    counts = listener.status()["counts"]
    assert (counts["studies_ok"], counts["studies_skipped"], counts["echoes_dropped"]) == (1, 1, 3)
    assert (listener.processed_dir / uid / "listener.json").read_bytes() == record
    assert _sop_names(listener.processed_dir / uid) == _manifest_names(manifest)


def test_failed_study_is_kept_and_merged_when_completed(make_listener, make_study, orthanc, tmp_path):
    folder, manifest = make_study(8, distractors=True)
    uid = manifest["study_instance_uid"]
    part1, part2 = tmp_path / "distractors", tmp_path / "crop"
    for desc, target in (("FLAIR", part1), ("HippoCrop", part2)):
        target.mkdir()
        for p in manifest["files"][desc]:
            shutil.copy(p, target / Path(p).name)
    listener = make_listener().start()
    _send(listener, part1)  # no HippoCrop series yet: the pipeline fails at ingest
    wait_for(lambda: (listener.failed_dir / uid / "error.json").is_file(), what="failed study")
    error = json.loads((listener.failed_dir / uid / "error.json").read_text())
    assert error["status"] == "failed" and error["stage"] == "ingest" and "HippoCrop" in error["error"]
    assert not orthanc.for_study(uid)

    _send(listener, part2)  # the rest arrives later: merged with the failed part, processed
    wait_for(lambda: orthanc.has_results(uid), what="results after completion")
    assert listener.wait_idle(30)
    assert _sop_names(listener.processed_dir / uid) == _sop_names(part1) | _sop_names(part2)
    assert not (listener.failed_dir / uid).exists()
    counts = listener.status()["counts"]
    assert (counts["studies_failed"], counts["studies_ok"]) == (1, 1)


def test_listen_config_composes_with_the_stack_overrides(tmp_path, model_file):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from hippo.config import config_dir

    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        cfg = compose("listen", overrides=[
            "listener.port=12345", "listener.ae_title=HIPPOTEST", "pacs.port=4343", f"paths.log_dir={tmp_path}",
            f"model_path={model_file}", "listener.quiet_seconds=0.5", "paths.output_dir=unused"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    listener = Listener.from_config(plain)
    assert (listener.ae_title, listener.port, listener.quiet_seconds) == ("HIPPOTEST", 12345, 0.5)
    assert listener.allowed_calling_aets == ["ORTHANC", "HIPPOSCANNER"] and listener.host == "127.0.0.1"
    assert listener.pacs.destination == "ORTHANC@127.0.0.1:4343" and listener.pacs.calling_ae == "HIPPOAI"
    assert listener.incoming_dir == tmp_path / "network/listener/incoming"
    assert listener.outbox_dir == tmp_path / "network/listener/outbox"
    assert listener.processor_options["rules"]["description_contains"] == "HippoCrop"
    assert listener.model_path == model_file and not listener.running


def test_listen_entrypoint_runs_until_sigterm(tmp_path, model_file):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hippo.listen", f"listener.port={port}", f"paths.log_dir={tmp_path}",
         f"model_path={model_file}", f"pacs.port={_free_port()}", "listener.quiet_seconds=0.5", *ANY_VOLUME_OVERRIDES],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cfg = PacsConfig(port=port, called_ae="HIPPOAI", calling_ae="ORTHANC", retries=0, timeout=2)
        wait_for(lambda: proc.poll() is not None or echo(cfg), timeout=60, what="the listener to answer C-ECHO")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "listening as HIPPOAI@127.0.0.1" in out and "listener stopped (clean)" in out
    assert list((tmp_path / "network/listener/runs").iterdir())
    assert (tmp_path / "network/listener/incoming").is_dir()


@pytest.mark.parametrize("limits, words", [
    ({"max_object_mb": 1}, "exceeds max_object_mb"),       # an oversized object (a huge private tag)
    ({"min_free_mb": 10 ** 9}, "free disk would fall below min_free_mb"),  # a disk about to fill up
])
def test_oversized_object_and_full_disk_are_refused_before_writing(make_listener, tmp_path, limits, words, caplog):
    """The sender gets "out of resources" (0xA700) with the reason, the listener writes nothing and
    says so in its log; nothing is processed."""
    listener = make_listener(processor_factory=lambda: pytest.fail("nothing should be processed"), **limits).start()
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="HIPPOAI")
    assert assoc.is_established
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = MRImageStorage, generate_uid(), generate_uid()
    ds.Modality = "MR"
    ds.add_new(0x00991010, "OB", b"\x00" * (2 * 2 ** 20))  # a 2 MiB private element
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        with caplog.at_level("ERROR", logger="hippo.network.listener"):
            status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert int(status.Status) == STATUS_OUT_OF_RESOURCES and words in str(status.get("ErrorComment", ""))
    assert any(words in r.getMessage() for r in caplog.records)
    assert not list(listener.incoming_dir.rglob("*.dcm"))
    assert listener.status()["counts"]["instances_refused"] == 1


def test_outbox_is_retried_on_a_timer_not_only_when_a_study_comes(make_listener, orthanc):
    """A result the PACS did not take waits in the outbox; with no further study arriving it still
    reaches the PACS within ``outbox_retry_seconds``."""
    listener = make_listener(processor_factory=lambda: pytest.fail("nothing should be processed"),
                             outbox_retry_seconds=0.5)
    pending = Dataset()
    pending.SOPClassUID, pending.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    pending.StudyInstanceUID, pending.Modality = generate_uid(), "OT"
    Outbox(listener.outbox_dir).put(pending, PacsConfig(port=orthanc.port, called_ae="ORTHANC", calling_ae="HIPPOAI"))
    listener.start()
    wait_for(lambda: listener.status()["outbox_pending"] == 0, timeout=20, what="the outbox to drain on its own")
    assert [r[2] for r in orthanc.for_study(pending.StudyInstanceUID)] == [pending.SOPInstanceUID]


def _two_bursts(files: list[Path], tmp_path: Path, at: int = 20, drop: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """The series ``files`` (slice order) split into folders ``first`` (``files[:at]``) and ``rest``,
    with the attributes ``drop`` removed from every copy."""
    parts = (tmp_path / "first", tmp_path / "rest")
    for part, chunk in zip(parts, (files[:at], files[at:])):
        part.mkdir()
        for p in chunk:
            ds = pydicom.dcmread(p)
            for keyword in drop:
                if keyword in ds:
                    delattr(ds, keyword)
            ds.save_as(part / p.name)
    return parts


def test_series_sent_in_two_bursts_gives_one_result_of_the_whole_series(make_listener, make_study, orthanc,
                                                                         tmp_path):
    """A sender pauses longer than the quiet period half-way through the HippoCrop series: the first
    part is not measured (its headers announce more images: "incomplete"), it waits in failed/, and
    the rest completes it -- the PACS ends with exactly one result set, made from every instance."""
    folder, manifest = make_study(21)
    uid = manifest["study_instance_uid"]
    files = [Path(p) for p in manifest["files"]["HippoCrop"]]  # slice order
    first, rest = _two_bursts(files, tmp_path)
    listener = make_listener().start()
    assert _send(listener, first)["failed"] == 0
    wait_for(lambda: (listener.failed_dir / uid / "error.json").exists(), what="the partial series to wait in failed/")
    error = json.loads((listener.failed_dir / uid / "error.json").read_text())
    assert f"incomplete: 20 of {len(files)} instances" in error["error"]
    assert not orthanc.for_study(uid)  # nothing measured from part of the series
    assert _send(listener, rest)["failed"] == 0
    wait_for(lambda: orthanc.has_results(uid), what="the result of the whole series")
    assert listener.wait_idle(30)
    got = orthanc.for_study(uid)
    assert sorted(r[1] for r in got) == sorted(RESULT_CLASSES)  # one result set, not two
    record = json.loads((listener.processed_dir / uid / "listener.json").read_text())
    assert record["status"] == "ok" and record["instances"] == len(files)


def test_new_result_of_a_study_rejects_the_earlier_one_the_iocm_way(make_listener, make_study, orthanc, tmp_path):
    """A series without an announced count, sent in two bursts: the first part is measured, then the
    whole series. The PACS gets the new result set and an IOCM rejection note (KOS, "Rejected for
    Quality Reasons") listing exactly the earlier SC, SEG and SR, so one current result remains."""
    folder, manifest = make_study(22)
    uid = manifest["study_instance_uid"]
    files = [Path(p) for p in manifest["files"]["HippoCrop"]]  # slice order
    first, rest = _two_bursts(files, tmp_path, drop=("ImagesInAcquisition",))  # nothing says more is coming
    listener = make_listener().start()
    assert _send(listener, first)["failed"] == 0
    wait_for(lambda: orthanc.has_results(uid), what="the result of the first part")
    assert listener.wait_idle(30)
    earlier = {r[2] for r in orthanc.for_study(uid)}
    assert _send(listener, rest)["failed"] == 0
    wait_for(lambda: any(r[1] == KeyObjectSelectionDocumentStorage for r in orthanc.for_study(uid)),
          what="the rejection note")
    assert listener.wait_idle(30)
    got = orthanc.for_study(uid)
    assert sorted(r[1] for r in got if r[2] not in earlier) == sorted([*RESULT_CLASSES, KeyObjectSelectionDocumentStorage])
    record = json.loads((listener.processed_dir / uid / "listener.json").read_text())
    assert record["instances"] == len(files) and set(record["supersedes"]) == earlier
    note = pydicom.dcmread(listener.results_dir / uid / f"rejection_{record['rejection_note']}.dcm")
    assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
    listed = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in note.ContentSequence
              if "ReferencedSOPSequence" in item}
    assert listed == earlier
