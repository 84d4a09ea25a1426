"""Recovery on the real PACS: a listener that crashed while receiving asks Orthanc for the rest.

Orthanc routes a stable study to the listener as one job; when the listener dies half-way, the job
fails and Orthanc never retries it. On its next start the listener asks Orthanc (C-MOVE to its own
AE title) for the series of every study it holds only in part, so the study is completed and
measured once, from every instance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest

from conftest import ANY_VOLUME, require_real_data
from fakes import wait_for
from hippo.network.listener import Listener
from hippo.network.orthanc import (OrthancClient, OrthancSettings, find_dicomweb_plugin, find_orthanc, free_port,
                                   start_orthanc, stop, wait_ready)
from hippo.scanner import send_study, write_study

pytestmark = pytest.mark.service


def test_listener_restarted_after_a_crash_mid_receive_fetches_the_rest_and_measures_once(model_file, tmp_path):
    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    root = require_real_data()
    listener_port = free_port()
    settings = OrthancSettings(
        dicom_port=free_port(), http_port=free_port(), stable_age=2, route_to=None,
        # no auto-routing here (the listener is "down" while the study arrives); the AI may C-MOVE
        modalities={"hippoai": {"aet": "HIPPOAI", "host": "127.0.0.1", "port": listener_port, "allow_move": True},
                    "scanner": {"aet": "HIPPOSCANNER", "host": "127.0.0.1", "port": free_port()}},
        dicomweb=find_dicomweb_plugin() is not None, name="HippoVolume recovery test PACS",
    )
    base = tmp_path / "orthanc"
    proc = start_orthanc(settings, base)
    listener = None
    try:
        wait_ready(settings.http_url, 30, proc=proc, name=settings.name)
        study = tmp_path / "study"
        manifest = write_study(root / "imagesTr/hippocampus_001.nii.gz", study, seed=31, distractors=False)
        uid = manifest["study_instance_uid"]
        sent = send_study(study, "127.0.0.1", settings.dicom_port, called_ae=settings.aet, calling_ae="HIPPOSCANNER")
        assert sent["failed"] == 0
        files = [Path(p) for p in manifest["files"]["HippoCrop"]]  # slice order

        # the crash: 20 of the series' instances reached the listener's incoming/ before it died
        listener = Listener(port=listener_port, root=tmp_path / "listener", model_path=model_file,
                            allowed_calling_aets=["ORTHANC", "HIPPOSCANNER"], quiet_seconds=1.0,
                            pacs={"port": settings.dicom_port, "called_ae": settings.aet, "calling_ae": "HIPPOAI",
                                  "timeout": 10, "retries": 0},
                            processor_options={"io_threads": 2, "plausibility": ANY_VOLUME}, stop_timeout=30)
        held = listener.incoming_dir / uid
        held.mkdir(parents=True)
        for p in files[:20]:
            shutil.copy(p, held / f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm")

        listener.start()
        record = listener.processed_dir / uid / "listener.json"
        wait_for(record.exists, timeout=60, what="the study to be completed from the PACS and measured")
        assert listener.wait_idle(30)
        done = json.loads(record.read_text())
        assert done["status"] == "ok" and done["instances"] == len(files)
        assert listener.status()["counts"]["series_rerequested"] == 1

        client = OrthancClient(settings.http_url)
        orthanc_id = client.post_json("/tools/lookup", uid)[0]["ID"]
        series = client.get_json(f"/studies/{orthanc_id}/series")
        modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
        assert modalities == ["MR", "OT", "SEG", "SR"]  # the input and exactly one result set
        assert all(len(s["Instances"]) == 1 for s in series if s["MainDicomTags"].get("Modality") != "MR")
    finally:
        if listener is not None:
            listener.stop(timeout=10)
        stop(proc)
