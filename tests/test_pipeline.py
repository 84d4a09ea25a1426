"""Deployment end to end: studies built by the scanner emulator from the real NIfTI data go through
``hippo.deploy``; results are read back (pydicom, highdicom) and sent to a Storage SCP on loopback
(tests/fakes.py), including a PACS outage that leaves the objects in the outbox and a later flush
that delivers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage

from conftest import ANY_VOLUME, ANY_VOLUME_OVERRIDES
from fakes import StorageSCP
from hippo.data.nifti import load_nifti
from hippo.dicom.volume import load_series
from hippo.deploy.pipeline import StudyProcessor, find_studies, run_batch
from hippo.scanner import StudyInfo, write_series, write_study
from hippo.network.orthanc import free_port as _free_port


@pytest.fixture(scope="module")
def studies(real_data_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("incoming")
    for i, case in enumerate(("hippocampus_001", "hippocampus_003")):
        write_study(real_data_root / "imagesTr" / f"{case}.nii.gz", root / f"study_{i}",
                    label_path=real_data_root / "labelsTr" / f"{case}.nii.gz", seed=i, nested=i == 0)
    return root


class OracleAgent:
    """Returns the true label for the volume it is given (looked up by the image's content), so the
    measured volumes must equal the NIfTI label volumes."""

    def __init__(self, label_by_key):
        self.label_by_key = label_by_key
        self.metadata = {"hippo_version": "test", "path": "oracle", "metrics": {}, "training": {}}

    def segment(self, volume):
        return self.label_by_key[volume.shape]


def _numeric_items(ds):
    """(value, UCUM unit) of every NUM content item of an SR, at any depth."""
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "NUM":
            mv = item.MeasuredValueSequence[0]
            yield mv.NumericValue, mv.MeasurementUnitsCodeSequence[0].CodeValue
        yield from _numeric_items(item)


def test_measured_volumes_equal_label_volumes_through_dicom(real_data_root, tmp_path):
    """NIfTI pair -> DICOM series (scanner) -> geometry -> known mask -> mm³, SEG and SR read back."""
    img_path = real_data_root / "imagesTr" / "hippocampus_004.nii.gz"
    lbl_path = real_data_root / "labelsTr" / "hippocampus_004.nii.gz"
    image, spacing, affine = load_nifti(img_path)
    label, _, _ = load_nifti(lbl_path)
    study = StudyInfo(seed=7)
    write_series(image, affine, tmp_path / "study" / "crop", study=study, series_description="HippoCrop")
    # The label goes through the very same DICOM geometry, then is handed to the pipeline as the mask.
    label_dir = tmp_path / "label_series"
    write_series(label.astype(np.uint8), affine, label_dir, study=study, series_description="label")
    mask = load_series(sorted(label_dir.iterdir())).array.astype(np.uint8)
    assert np.array_equal(mask, label.astype(np.uint8))  # identity geometry: same array

    processor = StudyProcessor(OracleAgent({mask.shape: mask}), tmp_path / "out")
    outcome = processor.process(tmp_path / "study")
    assert outcome.status == "ok", outcome.error
    voxel_mm3 = float(np.prod(spacing))          # counted here, not with hippo's own helpers
    expected = {"anterior_mm3": np.count_nonzero(label == 1) * voxel_mm3,
                "posterior_mm3": np.count_nonzero(label == 2) * voxel_mm3,
                "total_mm3": np.count_nonzero(label > 0) * voxel_mm3}
    for key in ("anterior_mm3", "posterior_mm3", "total_mm3"):
        assert outcome.volumes[key] == pytest.approx(expected[key])

    seg = hd.seg.segread(outcome.files["seg"])
    counts = {}
    for number in (1, 2):
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid for _, _, uid in seg.get_source_image_uids()],
            segment_numbers=[number])
        counts[number] = int(np.asarray(frames).sum())
    assert counts == {1: int((label == 1).sum()), 2: int((label == 2).sum())}

    sr = pydicom.dcmread(outcome.files["sr"])
    numbers = sorted(_numeric_items(sr), key=lambda vu: float(vu[0]))
    assert [u for _, u in numbers] == ["mm3"] * 3
    assert [float(v) for v, _ in numbers] == pytest.approx(
        sorted(expected[k] for k in ("anterior_mm3", "posterior_mm3", "total_mm3")))

    sc = pydicom.dcmread(outcome.files["report_sc"])
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.SamplesPerPixel == 3
    result = json.loads((Path(outcome.files["result_json"])).read_text())
    assert result["status"] == "ok" and result["volumes"]["total_mm3"] == pytest.approx(expected["total_mm3"])


def test_deploy_command_sends_results_and_prints_volumes(studies, model_file, tmp_path):
    scp = StorageSCP(keep_datasets=True)
    try:
        before = {p: p.stat().st_mtime_ns for p in (studies / "study_0").rglob("*") if p.is_file()}
        proc = subprocess.run(
            [sys.executable, "-m", "hippo.deploy", f"study={studies / 'study_0'}", f"model_path={model_file}",
             f"pacs.port={scp.port}", f"outbox_dir={tmp_path / 'outbox'}", f"hydra.run.dir={tmp_path / 'run'}",
             *ANY_VOLUME_OVERRIDES],
            capture_output=True, text=True, timeout=300)
    finally:
        scp.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "anterior" in proc.stdout and "mm³" in proc.stdout
    classes = sorted(str(ds.SOPClassUID) for ds in scp.datasets)
    assert classes == sorted([SecondaryCaptureImageStorage, SegmentationStorage, Comprehensive3DSRStorage])
    study_uid = {str(ds.StudyInstanceUID) for ds in scp.datasets}
    assert len(study_uid) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_ok"] == 1 and summary["studies"][0]["study_uid"] in study_uid
    assert {p: p.stat().st_mtime_ns for p in (studies / "study_0").rglob("*") if p.is_file()} == before


def test_pacs_outage_keeps_objects_in_outbox_then_flush_delivers(studies, model_file, tmp_path):
    port = _free_port()  # nothing listens yet: the PACS is down
    outbox = tmp_path / "outbox"
    common = [f"model_path={model_file}", f"pacs.port={port}", "pacs.retries=1", "pacs.backoff=0.05",
              "pacs.timeout=2", f"outbox_dir={outbox}", *ANY_VOLUME_OVERRIDES]
    proc = subprocess.run([sys.executable, "-m", "hippo.deploy", f"study={studies / 'study_1'}", *common,
                           f"hydra.run.dir={tmp_path / 'down'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]          # the study itself succeeded
    assert "queued" in proc.stdout
    assert len(list(outbox.glob("*.dcm"))) == 3

    scp = StorageSCP(port, keep_datasets=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "hippo.deploy", "outbox=flush", *common,
                               f"hydra.run.dir={tmp_path / 'flush'}"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        again = subprocess.run([sys.executable, "-m", "hippo.deploy", "outbox=flush", *common,
                                f"hydra.run.dir={tmp_path / 'flush2'}"], capture_output=True, text=True, timeout=300)
        assert again.returncode == 0
    finally:
        scp.stop()
    uids = [str(ds.SOPInstanceUID) for ds in scp.datasets]
    assert len(uids) == 3 and len(set(uids)) == 3              # each delivered exactly once
    assert not list(outbox.glob("*.dcm"))


def test_batch_continues_past_bad_studies_and_exits_nonzero(studies, model_file, tmp_path):
    root = tmp_path / "batch"
    shutil.copytree(studies / "study_1", root / "good")
    (root / "empty").mkdir(parents=True)
    (root / "junk").mkdir()
    (root / "junk" / "notes.txt").write_text("not DICOM")
    shutil.copytree(studies / "study_1", root / "no_crop")
    for f in (root / "no_crop").rglob("*"):
        if f.is_file() and pydicom.dcmread(f, stop_before_pixels=True, force=True).get("SeriesDescription") == "HippoCrop":
            f.unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "hippo.deploy", f"studies={root}", f"model_path={model_file}", "send=false",
         "workers=2", "precision=bfloat16", f"hydra.run.dir={tmp_path / 'run'}", *ANY_VOLUME_OVERRIDES],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    status = {Path(s["study"]).name: s for s in summary["studies"]}
    assert status["good"]["status"] == "ok" and status["good"]["volumes"]["total_mm3"] > 0
    # the precision setting reaches every batch worker and is recorded with the result
    results = [json.loads(p.read_text()) for p in (tmp_path / "run").rglob("result.json")]
    assert results and all(r["model"]["precision"] == "bfloat16" for r in results)
    for bad in ("empty", "junk", "no_crop"):
        assert status[bad]["status"] == "failed" and status[bad]["stage"] == "ingest"
    assert "HippoCrop" in status["no_crop"]["error"] and "T1 MPRAGE" in status["no_crop"]["error"]
    assert str(root / "empty") in status["empty"]["error"]
    assert (tmp_path / "run" / "summary.md").read_text().count("| failed |") == 3


def test_serial_and_parallel_batches_agree(studies, model_file, tmp_path, monkeypatch):
    """``workers=1`` scans the next study (``prepare``) in a thread while this one is measured
    (``finish``), as ``hippo.predict`` does for files; its results are those of two processes, and a
    folder that is no study fails at ingest in the middle of the batch without stopping it."""
    import functools
    import threading

    from hippo.deploy.pipeline import build_processor

    bad = tmp_path / "incoming" / "junk"
    bad.mkdir(parents=True)
    (bad / "notes.txt").write_text("not DICOM")
    dirs = find_studies(studies)
    prepared_in = []
    prepare = StudyProcessor.prepare

    def recorded_prepare(self, study_dir):
        prepared_in.append((Path(study_dir).name, threading.current_thread().name))
        return prepare(self, study_dir)

    monkeypatch.setattr(StudyProcessor, "prepare", recorded_prepare)
    serial = run_batch([dirs[0], bad, dirs[1]],
                       functools.partial(build_processor, model_file, tmp_path / "s", plausibility=ANY_VOLUME),
                       workers=1)
    assert [(o.status, o.stage) for o in serial] == [("ok", ""), ("failed", "ingest"), ("ok", "")]
    assert str(bad) in serial[1].error
    # each study prepared once, ahead of the study before it being finished, in the batch's thread
    assert [name for name, _ in prepared_in] == [dirs[0].name, "junk", dirs[1].name]
    assert all(thread.startswith("hippo-prepare-next") for _, thread in prepared_in)
    assert all(o.timings_s["total"] >= o.timings_s["ingest"] > 0 for o in (serial[0], serial[2]))
    parallel = run_batch(dirs, functools.partial(build_processor, model_file, tmp_path / "p", plausibility=ANY_VOLUME),
                         workers=2)
    assert [o.volumes for o in (serial[0], serial[2])] == [o.volumes for o in parallel]


def test_missing_model_and_bad_arguments_are_clear(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hippo.deploy", f"study={tmp_path}", "model_path=latest",
                           f"paths.log_dir={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path / 'r'}", "send=false"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no model.pt under" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hippo.deploy", f"study={tmp_path}",
                           f"model_path={tmp_path / 'gone.pt'}", f"hydra.run.dir={tmp_path / 'r1'}", "send=false"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "gone.pt: model file not found" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hippo.deploy", f"hydra.run.dir={tmp_path / 'r2'}", "send=false"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "exactly one of study=DIR" in proc.stderr


def test_dicom_path_gives_the_same_segmentation_as_the_nifti(real_data_root, studies, model_file, tmp_path):
    """hippocampus_001 (stored as uint8) -> scanner -> DICOM -> pipeline: same mask as on the NIfTI."""
    from hippo.infer import InferenceAgent

    agent = InferenceAgent.from_file(model_file)
    image, spacing, _ = load_nifti(real_data_root / "imagesTr" / "hippocampus_001.nii.gz")
    direct = agent.segment(image)
    assert direct.any()
    outcome = StudyProcessor(agent, tmp_path, plausibility=ANY_VOLUME).process(studies / "study_0")
    assert outcome.status == "ok", outcome.error
    voxel_mm3 = float(np.prod(spacing))          # counted here, not with hippo's own helpers
    expected = {"anterior_mm3": np.count_nonzero(direct == 1) * voxel_mm3,
                "posterior_mm3": np.count_nonzero(direct == 2) * voxel_mm3,
                "total_mm3": np.count_nonzero(direct > 0) * voxel_mm3}
    assert {k: outcome.volumes[k] for k in expected} == pytest.approx(expected)
    seg = hd.seg.segread(outcome.files["seg"])
    assert int(np.asarray(seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[u for _, _, u in seg.get_source_image_uids()], segment_numbers=[1])).sum()) \
        == int((direct == 1).sum())


def test_batch_never_takes_its_own_output_folder_for_a_study(tmp_path):
    """``studies=ROOT`` with the run's results (or outbox) under ROOT: that folder is not a study,
    whether it is the results folder itself or a parent of it (``outputs/`` when ROOT is the project)."""
    root = tmp_path / "incoming"
    for name in ("study_a", "study_b", "outputs/deploy/runs/now", "outbox"):
        (root / name).mkdir(parents=True)
    found = find_studies(root, exclude=[root / "outputs/deploy/runs/now", root / "outbox"])
    assert [p.name for p in found] == ["study_a", "study_b"]
    assert [p.name for p in find_studies(root)] == ["outbox", "outputs", "study_a", "study_b"]


def test_results_neither_delivered_nor_queued_fail_the_study(studies, model_file, tmp_path):
    """PACS down and the outbox not writable (disk full, a file in its place): the objects would be
    lost, so the study is "failed" at the send stage, naming why -- never "ok" with a result missing."""
    from hippo.deploy.pipeline import build_processor

    outbox = tmp_path / "outbox"
    processor = build_processor(model_file, tmp_path / "out", pacs={"port": _free_port(), "retries": 0, "timeout": 2},
                                outbox_dir=outbox, plausibility=ANY_VOLUME, write_png=False)
    shutil.rmtree(outbox)
    outbox.write_text("not a directory")
    outcome = processor.process(studies / "study_1")
    assert (outcome.status, outcome.stage) == ("failed", "send")
    assert "neither delivered" in outcome.error and "not queued" in outcome.error
