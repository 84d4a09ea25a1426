"""The whole clinical network end to end (service-backed): ``Network.up()`` starts Orthanc (Debian
package, Lua auto-routing), the AI listener and the OHIF viewer on free loopback ports; the scanner
emulator sends a study built from the real data; Orthanc routes its HippoCrop series to the
listener, whose SC report, SEG and SR come back into the same study; the SR's volumes match the
listener's record; ``down()`` leaves no process behind. Orthanc's REST API needs the generated
credentials throughout (the readiness checks, this test's client and the viewer's proxy use them)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pydicom
import pytest

from conftest import ANY_VOLUME_OVERRIDES
from hippo.network.orthanc import OrthancClient, OrthancError, free_port, pid_alive, read_credentials
from hippo.network.stack import Network, load_config
from hippo.pacs import PacsConfig, echo
from hippo.scanner import send_study, write_study

pytestmark = pytest.mark.service

RESULT_DESCRIPTIONS = ("AI hippocampus volume report, research use", "AI hippocampus segmentation, research use",
                       "AI hippocampus volumes (TID 1500), research use")


def _require_services() -> None:
    for tool in ("Orthanc", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make system-deps installs the Debian packages)")


def _numeric_items(ds):
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "NUM":
            yield float(item.MeasuredValueSequence[0].NumericValue)
        yield from _numeric_items(item)


def test_scanner_to_pacs_to_ai_and_back(real_data_root, model_file, tmp_path):
    _require_services()
    ports = {k: free_port() for k in ("dicom", "http", "listener", "viewer")}
    ohif_cache = Path(__file__).resolve().parents[1] / "outputs" / "network" / "ohif" / "dist"
    cfg = load_config(overrides=[
        f"paths.log_dir={tmp_path / 'outputs'}", f"orthanc.dicom_port={ports['dicom']}",
        f"orthanc.http_port={ports['http']}", f"listener.port={ports['listener']}", f"viewer.port={ports['viewer']}",
        "orthanc.stable_age=2", "listener.quiet_seconds=1", f"ohif.dist={ohif_cache}",
    ])
    cfg.listener.overrides = ANY_VOLUME_OVERRIDES  # a random network measures anything
    net = Network(cfg, model_path=model_file)
    study_dir = tmp_path / "study"
    manifest = write_study(real_data_root / "imagesTr" / "hippocampus_001.nii.gz", study_dir,
                           label_path=real_data_root / "labelsTr" / "hippocampus_001.nii.gz", seed=11)
    study_uid = manifest["study_instance_uid"]
    try:
        status = net.up()
        assert status["up"] and all(s["running"] for s in status["services"].values()), status
        assert status["services"]["orthanc"]["rest"] == "ok"
        password = read_credentials(net.credentials_path)[1]
        assert password not in net.state_path.read_text()            # no command line holds it
        assert "--orthanc-credentials" in net.read_state()["processes"]["viewer"]["cmd"]
        sent = send_study(study_dir, "127.0.0.1", ports["dicom"], called_ae="ORTHANC", calling_ae="HIPPOSCANNER")
        assert sent["failed"] == 0 and sent["sent"] > 0

        # authentication is on: nothing without the generated credentials (stored 0600 by `up`)
        with pytest.raises(OrthancError, match="HTTP 401"):
            OrthancClient(f"http://127.0.0.1:{ports['http']}").studies()
        assert net.credentials_path.stat().st_mode & 0o777 == 0o600
        client = OrthancClient(f"http://127.0.0.1:{ports['http']}", auth=read_credentials(net.credentials_path))
        deadline, descriptions = time.monotonic() + 240, set()
        while time.monotonic() < deadline:
            study_id = client.find_study(study_uid)
            if study_id:
                descriptions = {s["MainDicomTags"].get("SeriesDescription", "") for s in client.series(study_id)}
                if set(RESULT_DESCRIPTIONS) <= descriptions:
                    break
            time.sleep(1)
        assert set(RESULT_DESCRIPTIONS) <= descriptions, f"results did not arrive; series now: {descriptions}"

        # the SR stored in Orthanc carries the volumes the listener measured
        sr_series = next(s for s in client.series(study_id)
                         if s["MainDicomTags"].get("SeriesDescription") == RESULT_DESCRIPTIONS[2])
        sr_instance = client.instances(sr_series["ID"])[0]["ID"]
        import io
        import urllib.request

        sr = pydicom.dcmread(io.BytesIO(client.request("GET", f"/instances/{sr_instance}/file")))
        # the listener records the study in processed/ just after it sent the results: wait for it
        record_file = tmp_path / "outputs" / "network" / "listener" / "processed" / study_uid / "listener.json"
        deadline = time.monotonic() + 60
        while not record_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        record = json.loads(record_file.read_text())
        volumes = record["volumes"]
        assert sorted(_numeric_items(sr)) == pytest.approx(
            sorted([volumes["anterior_mm3"], volumes["posterior_mm3"], volumes["total_mm3"]]))

        # the viewer serves OHIF and proxies DICOMweb (QIDO finds the study, results included), adding
        # the credentials itself: the browser (here urllib) holds none
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['viewer']}/dicom-web/studies/{study_uid}/series") as r:
            qido = json.loads(r.read())
        assert len(qido) >= 2 + 3  # HippoCrop + distractors + SC, SEG, SR

        # results coming back did not route the study a second time: one set only
        time.sleep(4)
        assert sum(s["MainDicomTags"].get("SeriesDescription") in RESULT_DESCRIPTIONS
                   for s in client.series(study_id)) == 3

        # the listener dies (SIGKILL) while Orthanc and the viewer run: `up` brings it back alone
        before = {n: e["pid"] for n, e in net.read_state()["processes"].items()}
        os.killpg(before["listener"], signal.SIGKILL)
        killed = net._procs.get("listener")
        if killed is not None:
            killed.wait(timeout=30)  # reaped, as a supervisor would
        else:
            deadline = time.monotonic() + 30
            while pid_alive(before["listener"]) and time.monotonic() < deadline:
                time.sleep(0.1)
        status = net.up()
        after = {n: e["pid"] for n, e in net.read_state()["processes"].items()}
        assert status["up"] and after["orthanc"] == before["orthanc"] and after["viewer"] == before["viewer"]
        assert after["listener"] != before["listener"] and pid_alive(after["listener"])
        assert echo(PacsConfig(port=ports["listener"], called_ae="HIPPOAI", calling_ae="ORTHANC", retries=0,
                               timeout=5))
    finally:
        pids = [e["pid"] for e in net.read_state().get("processes", {}).values()]
        net.down()
    assert len(pids) == 3 and not any(pid_alive(p) for p in pids)
    assert not net.status()["up"]
    assert not any(any(s["listening"].values()) for s in net.status()["services"].values())
