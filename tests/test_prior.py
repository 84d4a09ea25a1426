"""hippo.prior: change since the patient's last scan -- arithmetic, reading our SR and result.json
back, the DICOMweb search (against a real HTTP server speaking QIDO-RS / WADO-RS), and end to end on
the real network (Orthanc + listener, two studies of one patient a year apart)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import http.server
import io
import json
import threading
import urllib.parse
from pathlib import Path

import pydicom
import pytest

from conftest import dciodvfy_problems
from fakes import wait_for
from hippo.dicom.objects import ALGORITHM_NAME, make_seg, make_sr
from hippo.measure import measure_volumes
from hippo.prior import (MIN_DAYS_FOR_RATE, DicomwebPriorSource, PriorError, PriorLookup, PriorResult,
                         compare_with_prior, find_prior, parse_multipart, prior_comparison, read_prior_file,
                         read_result_json, read_sr, unavailable)
from test_objects import mask_frames, mr_series

ALGO = {"name": ALGORITHM_NAME, "version": "0.1.0+test"}


def _prior(date="2024-03-11", anterior=1500.0, posterior=1300.0, version="0.1.0+test") -> PriorResult:
    return PriorResult(study_date=_dt.date.fromisoformat(date),
                       volumes_mm3={"anterior": anterior, "posterior": posterior, "total": anterior + posterior},
                       algorithm_name=ALGORITHM_NAME, algorithm_version=version, study_instance_uid="1.2.3")


# ------------------------------------------------------------------------------------------- arithmetic
def test_change_per_structure_in_mm3_percent_and_per_year():
    current = {"anterior_mm3": 1440.0, "posterior_mm3": 1300.0, "total_mm3": 2740.0}
    # 2024-03-11 -> 2026-03-11: 730 days = 1.998631 years of 365.25 days
    block = compare_with_prior(current, _dt.date(2026, 3, 11), _prior(), algorithm=ALGO)
    assert block["available"] and block["comparable"] and block["note"] == "" and block["reason"] is None
    assert block["interval_days"] == 730
    years = 730 / 365.25
    a = block["change"]["anterior"]
    assert a["prior_mm3"] == 1500.0 and a["current_mm3"] == 1440.0 and a["change_mm3"] == -60.0
    assert a["change_percent"] == pytest.approx(-4.0)
    assert a["rate_mm3_per_year"] == pytest.approx(-60.0 / years, abs=1e-3)
    assert a["rate_percent_per_year"] == pytest.approx(-4.0 / years, abs=1e-3)
    assert block["change"]["posterior"]["change_mm3"] == 0.0
    t = block["change"]["total"]
    assert t["change_mm3"] == -60.0 and t["change_percent"] == pytest.approx(-60 / 2800 * 100, abs=1e-3)
    assert block["prior"]["study_date"] == "2024-03-11"
    assert block["this_result"] == {"study_date": "2026-03-11", "algorithm": ALGO}


def test_short_interval_gives_no_rate_and_says_why_and_zero_prior_gives_no_percent():
    current = {"anterior_mm3": 10.0, "posterior_mm3": 5.0, "total_mm3": 15.0}
    prior = _prior(anterior=0.0, posterior=5.0)
    block = compare_with_prior(current, _dt.date(2024, 3, 11) + _dt.timedelta(days=MIN_DAYS_FOR_RATE - 1), prior,
                               algorithm=ALGO)
    a = block["change"]["anterior"]
    assert a["change_mm3"] == 10.0 and a["change_percent"] is None and a["rate_mm3_per_year"] is None
    assert block["change"]["total"]["rate_percent_per_year"] is None
    assert "no annualised rate" in block["note"] and f"{MIN_DAYS_FOR_RATE - 1} days" in block["note"]


def test_prior_not_before_this_study_is_refused():
    with pytest.raises(PriorError, match="not before this study"):
        compare_with_prior({"anterior": 1, "posterior": 1, "total": 2}, _dt.date(2024, 3, 11), _prior(),
                           algorithm=ALGO)


def test_other_model_version_is_shown_but_marked_not_directly_comparable():
    current = {"anterior_mm3": 1400.0, "posterior_mm3": 1250.0, "total_mm3": 2650.0}
    block = compare_with_prior(current, _dt.date(2025, 3, 11), _prior(version="0.0.9"), algorithm=ALGO)
    assert block["available"] and not block["comparable"]
    assert block["note"].startswith("not directly comparable")
    assert "0.0.9" in block["note"] and "0.1.0+test" in block["note"]
    assert block["change"]["total"]["change_mm3"] == -150.0  # still shown


# ------------------------------------------------------------------------------------------- SR round trip
@pytest.fixture(scope="module")
def sources_seg():
    sources = mr_series()
    seg = make_seg(sources, mask_frames(), model_version="0.1.0+test")
    return sources, seg


def test_sr_round_trip_reads_the_volumes_date_and_algorithm(sources_seg, tmp_path):
    sources, seg = sources_seg
    volumes = measure_volumes(mask_frames(), (1.0, 1.2, 0.9))
    sr = make_sr(sources, seg, volumes, model_version="0.1.0+test")
    sr.save_as(tmp_path / "sr.dcm")
    prior = read_prior_file(tmp_path / "sr.dcm")
    assert prior.volumes_mm3["anterior"] == pytest.approx(volumes.anterior_mm3)
    assert prior.volumes_mm3["posterior"] == pytest.approx(volumes.posterior_mm3)
    assert prior.volumes_mm3["total"] == pytest.approx(volumes.total_mm3)
    assert prior.study_date == _dt.date(2025, 3, 11)
    assert (prior.algorithm_name, prior.algorithm_version) == (ALGORITHM_NAME, "0.1.0+test")
    assert prior.sop_instance_uid == sr.SOPInstanceUID


def test_sr_with_change_groups_is_valid_and_still_reads_back_its_own_volumes(sources_seg, tmp_path):
    sources, seg = sources_seg
    volumes = measure_volumes(mask_frames(), (1.0, 1.0, 1.0))
    block = compare_with_prior(volumes.as_dict(), _dt.date(2025, 3, 11), _prior(version="0.0.9"), algorithm=ALGO)
    sr = make_sr(sources, seg, volumes, model_version="0.1.0+test", prior_comparison=block)
    path = tmp_path / "sr_change.dcm"
    sr.save_as(path)
    problems = dciodvfy_problems(path)
    assert problems["errors"] == [], problems["errors"]
    back = pydicom.dcmread(path)
    # the change items: per structure 4 NUMs, the prior date and the comparability note
    items = {}
    for group in back.ContentSequence:
        for g in group.get("ContentSequence", ()):
            label = next((str(c.TextValue) for c in g.get("ContentSequence", ())
                          if c.ValueType == "TEXT" and c.ConceptNameCodeSequence[0].CodeValue == "112039"), "")
            if label.startswith("Change since prior study"):
                items[label] = g
    assert len(items) == 3
    total = items["Change since prior study: total hippocampus"]
    nums = {c.ConceptNameCodeSequence[0].CodeValue: float(c.MeasuredValueSequence[0].NumericValue)
            for c in total.ContentSequence if c.ValueType == "NUM"}
    assert nums["VOLCHG"] == pytest.approx(block["change"]["total"]["change_mm3"])
    assert nums["VOLRATEPCT"] == pytest.approx(block["change"]["total"]["rate_percent_per_year"])
    dates = [c.Date for c in total.ContentSequence if c.ValueType == "DATE"]
    notes = [c.TextValue for c in total.ContentSequence if c.ValueType == "TEXT"
             and c.ConceptNameCodeSequence[0].CodeValue == "PRIORNOTE"]
    assert dates == ["20240311"] and notes[0].startswith("not directly comparable")
    again = read_sr(back)  # the change groups are not taken for volumes
    assert again.volumes_mm3["total"] == pytest.approx(volumes.total_mm3)


def test_result_json_round_trip_and_unreadable_priors_give_a_reason(tmp_path):
    current = {"anterior_mm3": 1400.0, "posterior_mm3": 1250.0, "total_mm3": 2650.0}
    block = prior_comparison(None, patient_id="P1", study_date="20240311", study_instance_uid="1.2",
                             volumes_mm3=current, algorithm=ALGO)
    assert not block["available"] and block["reason"].startswith("no earlier result was looked for")
    result = {"status": "ok", "study_uid": "1.2", "volumes": current, "prior_comparison": block}
    (tmp_path / "result.json").write_text(json.dumps(result))
    prior = read_result_json(tmp_path / "result.json")
    assert prior.study_date == _dt.date(2024, 3, 11) and prior.volumes_mm3["total"] == 2650.0
    assert (prior.algorithm_name, prior.algorithm_version) == (ALGORITHM_NAME, "0.1.0+test")

    later = {"anterior_mm3": 1386.0, "posterior_mm3": 1250.0, "total_mm3": 2636.0}
    ok = prior_comparison(PriorLookup(path=str(tmp_path / "result.json")), patient_id="P1", study_date="20250311",
                          study_instance_uid="1.3", volumes_mm3=later, algorithm=ALGO)
    assert ok["available"] and ok["change"]["anterior"]["change_percent"] == pytest.approx(-1.0)
    assert ok["interval_days"] == 365

    cases = {
        "missing.json": (None, "could not be opened"),
        "broken.json": ("{not json", "could not be read"),
        "failed.json": (json.dumps({**result, "status": "failed"}), "not a finished measurement"),
        "old.json": (json.dumps({"status": "ok", "volumes": current}), "does not record its study date"),
        "noise.dcm": ("this is no DICOM file", "neither a DICOM file nor a result.json"),
    }
    for name, (text, why) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        block = prior_comparison(PriorLookup(path=str(tmp_path / name)), patient_id="P1", study_date="20250311",
                                 study_instance_uid="1.3", volumes_mm3=later, algorithm=ALGO)
        assert not block["available"] and why in block["reason"] and name in block["reason"], (name, block)
        assert block["this_result"]["study_date"] == "2025-03-11"  # a later study can still use this one

    no_date = prior_comparison(PriorLookup(path=str(tmp_path / "result.json")), patient_id="P1", study_date="",
                               study_instance_uid="1.3", volumes_mm3=later, algorithm=ALGO)
    assert "no study date" in no_date["reason"]


def test_an_mr_image_is_not_taken_for_a_prior(tmp_path):
    ds = mr_series(n=1)[0]
    ds.save_as(tmp_path / "mr.dcm", enforce_file_format=True)
    with pytest.raises(PriorError, match="not a structured report"):
        read_prior_file(tmp_path / "mr.dcm")


# ------------------------------------------------------------------------------------------- DICOMweb
class _FakeDicomweb(http.server.ThreadingHTTPServer):
    """A small real HTTP server answering QIDO-RS ``/series`` and WADO-RS series retrieval from a dict
    of datasets, with HTTP Basic."""

    def __init__(self, datasets, auth=("hippo", "secret")):
        self.datasets, self.auth, self.requests = list(datasets), auth, []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        import base64

        srv = self.server
        srv.requests.append(self.path)
        token = base64.b64encode(f"{srv.auth[0]}:{srv.auth[1]}".encode()).decode()
        if self.headers.get("Authorization") != f"Basic {token}":
            self.send_response(401)
            self.end_headers()
            return
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.split("/")
        if url.path == "/dicom-web/series":
            q = urllib.parse.parse_qs(url.query)
            hits = [d for d in srv.datasets if str(d.PatientID) == q["PatientID"][0] and d.Modality == "SR"]
            body = json.dumps([{"0020000D": {"vr": "UI", "Value": [d.StudyInstanceUID]},
                                "0020000E": {"vr": "UI", "Value": [d.SeriesInstanceUID]},
                                "00080020": {"vr": "DA", "Value": [d.StudyDate]},
                                "00100020": {"vr": "LO", "Value": [d.PatientID]}} for d in hits]).encode()
            self._send(200, "application/dicom+json", body)
        elif len(parts) == 6 and parts[2] == "studies" and parts[4] == "series":
            boundary = "XBOUNDARYX"
            chunks = []
            for d in srv.datasets:
                if d.SeriesInstanceUID == parts[5]:
                    buf = io.BytesIO()
                    d.save_as(buf, enforce_file_format=True)
                    chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                                  + buf.getvalue() + b"\r\n")
            body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
            self._send(200, f'multipart/related; type="application/dicom"; boundary={boundary}', body)
        else:
            self._send(404, "text/plain", b"not found")

    def _send(self, code, ctype, body):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _sr_for(date: str, patient: str, total_scale: float, version="0.1.0+test"):
    sources = mr_series(n=12)
    for ds in sources:
        ds.StudyDate, ds.PatientID = date, patient
    seg = make_seg(sources, mask_frames(), model_version=version)
    volumes = measure_volumes(mask_frames(), (1.0, 1.0, total_scale))
    return make_sr(sources, seg, volumes, model_version=version), volumes


@pytest.fixture
def dicomweb():
    servers = []

    def start(datasets):
        srv = _FakeDicomweb(datasets)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_dicomweb_finds_the_latest_earlier_result_of_the_same_patient(dicomweb):
    old, _ = _sr_for("20220101", "P7", 0.8)
    recent, recent_vol = _sr_for("20240101", "P7", 0.9)
    other, _ = _sr_for("20240601", "P7x", 2.0)      # another patient whose ID starts the same
    same_day, _ = _sr_for("20250101", "P7", 3.0)    # this study's date: not a prior
    srv = dicomweb([old, recent, other, same_day])
    source = DicomwebPriorSource(srv.url, auth=("hippo", "secret"), timeout=5)
    prior = find_prior(source, patient_id="P7", study_date=_dt.date(2025, 1, 1), study_instance_uid="9.9")
    assert prior.study_date == _dt.date(2024, 1, 1) and prior.sop_instance_uid == recent.SOPInstanceUID
    assert prior.volumes_mm3["total"] == pytest.approx(recent_vol.total_mm3)
    assert any(p.startswith("/dicom-web/series?") and "PatientID=P7" in p for p in srv.requests)


def test_dicomweb_reasons_no_prior_wrong_credentials_unreachable(dicomweb, tmp_path):
    sr, _ = _sr_for("20240101", "P8", 1.0)
    srv = dicomweb([sr])
    vols = {"anterior_mm3": 1.0, "posterior_mm3": 1.0, "total_mm3": 2.0}

    def run(lookup, patient="P8", date="20250101"):
        return prior_comparison(lookup, patient_id=patient, study_date=date, study_instance_uid="9.9",
                                volumes_mm3=vols, algorithm=ALGO)

    good = PriorLookup.from_settings(url=srv.url, auth=("hippo", "secret"), timeout=5)
    assert run(good)["available"]
    assert "holds no earlier result for patient ID P9" in run(good, patient="P9")["reason"]
    assert "holds no earlier result" in run(good, date="20231231")["reason"]
    assert "no patient ID" in run(good, patient="")["reason"]
    refused = PriorLookup.from_settings(url=srv.url, auth=None, auth_problem="no credentials at /x/credentials.json")
    reason = run(refused)["reason"]
    assert "refused access (HTTP 401)" in reason and "/x/credentials.json" in reason and "secret" not in reason
    from hippo.network.orthanc import free_port

    down = PriorLookup.from_settings(url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout=2)
    assert "could not be reached" in run(down)["reason"]


def test_unreadable_sr_in_the_pacs_gives_a_reason(dicomweb):
    sr, _ = _sr_for("20240101", "P5", 1.0)
    # a foreign SR: our groups missing
    sr.ContentSequence = [item for item in sr.ContentSequence if item.ValueType != "CONTAINER"
                          or item.ConceptNameCodeSequence[0].CodeValue != "126010"]
    srv = dicomweb([sr])
    block = prior_comparison(PriorLookup.from_settings(url=srv.url, auth=("hippo", "secret")), patient_id="P5",
                             study_date="20250101", study_instance_uid="9.9",
                             volumes_mm3={"anterior_mm3": 1, "posterior_mm3": 1, "total_mm3": 2}, algorithm=ALGO)
    assert not block["available"] and "holds no volume for the anterior hippocampus" in block["reason"]


def test_parse_multipart_refuses_a_non_multipart_answer():
    with pytest.raises(PriorError, match="not a multipart body"):
        parse_multipart(b"{}", "application/json")
    assert parse_multipart(b"--b\r\nA: 1\r\n\r\nxy\r\n--b\r\n\r\nz\r\n--b--\r\n", "multipart/related; boundary=b") \
        == [b"xy", b"z"]


def test_report_page_draws_the_change_table_or_the_reason():
    import numpy as np
    from PIL import ImageChops

    from hippo.dicom.report import render_report

    mask = np.zeros((20, 24, 16), np.uint8)
    mask[5:10, 6:12, 4:9], mask[10:14, 6:12, 4:9] = 1, 2
    image = (mask * 50 + 20).astype(np.float32)
    volumes = measure_volumes(mask, (1.0, 1.0, 1.0))
    common = dict(patient={"id": "P1"}, study={"date": "20250311"}, volumes=volumes,
                  model={"name": ALGORITHM_NAME, "version": "0.1.0+test"}, timestamp="2025-03-11")
    block = compare_with_prior(volumes.as_dict(), _dt.date(2025, 3, 11), _prior(version="0.0.9"), algorithm=ALGO)
    none = render_report(image, mask, (1, 1, 1), **common)
    shown = render_report(image, mask, (1, 1, 1), prior=block, **common)
    why = render_report(image, mask, (1, 1, 1), prior=unavailable("the PACS could not be reached"), **common)
    assert ImageChops.difference(none, shown).getbbox() is not None
    assert ImageChops.difference(shown, why).getbbox() is not None


# ------------------------------------------------------------------------------------------- whole head
@pytest.fixture(scope="module")
def wholehead_prior(tmp_path_factory):
    """An earlier whole-head study of patient W1 (2024-03-11; a synthetic head, the T1 only) and our
    whole-head SR of it: ``(T1 datasets, SR, loaded volume, {"left": Volumes, "right": Volumes})``."""
    import numpy as np

    from hippo.dicom.objects import make_wholehead_seg, make_wholehead_sr
    from hippo.dicom.volume import load_series
    from hippo.scanner import StudyInfo, write_wholehead_study
    from test_wholehead_dicom import _labels, _synthetic_head

    root = tmp_path_factory.mktemp("wholehead_prior")
    manifest = write_wholehead_study(_synthetic_head(root), root / "study", distractors=False, localizer=False,
                                     study=StudyInfo(patient_id="W1", study_date="20240311", seed=5))
    volume = load_series(manifest["files"]["t1_mprage_sag"])
    labels = _labels(volume.array.shape)
    seg = make_wholehead_seg(volume.datasets, volume.to_source(labels), model_version="0.1.0+test")
    sides = {"left": measure_volumes(np.where(labels <= 2, labels, 0), volume.spacing),
             "right": measure_volumes(np.where(labels > 2, labels - 2, 0), volume.spacing)}
    sr = make_wholehead_sr(volume.datasets, seg, sides, asymmetry_index_percent=0.0, etiv_mm3=None,
                           model_version="0.1.0+test")
    return [pydicom.dcmread(f) for f in manifest["files"]["t1_mprage_sag"]], sr, volume, sides


def test_wholehead_sr_reads_back_both_sides_and_the_t1_series_it_measured(wholehead_prior):
    from hippo.prior import read_wholehead_sr

    t1, sr, _, sides = wholehead_prior
    prior = read_wholehead_sr(sr)
    assert prior.study_date == _dt.date(2024, 3, 11) and prior.algorithm_version == "0.1.0+test"
    for side in ("left", "right"):
        assert prior.volumes_mm3[side]["anterior"] == pytest.approx(sides[side].anterior_mm3)
        assert prior.volumes_mm3[side]["total"] == pytest.approx(sides[side].total_mm3)
    assert prior.image_series == (t1[0].SeriesInstanceUID,)  # the SEG is left out
    with pytest.raises(PriorError, match="holds no volume for the left anterior hippocampus"):
        read_wholehead_sr(_sr_for("20240101", "P1", 1.0)[0])  # a HippoCrop result is not a whole-head one


def test_wholehead_prior_from_the_pacs_is_the_earlier_t1_else_our_sr_and_never_raises(wholehead_prior, dicomweb):
    """The earlier T1 series the SR references is fetched (WADO-RS) and read as the current study is
    (paired mode); without it in the PACS the SR's volumes are used (independent mode), saying why."""
    import numpy as np
    from types import SimpleNamespace

    from hippo.wholehead.longitudinal import change_since_prior, pacs_prior_input

    t1, sr, volume, sides = wholehead_prior
    auth = ("hippo", "secret")
    full = DicomwebPriorSource(dicomweb([sr, *t1]).url, auth=auth, timeout=5)
    got = pacs_prior_input(full, patient_id="W1", study_date="20250311", study_instance_uid="9.9")
    assert got.kind == "dicom" and got.study_date == "2024-03-11"
    np.testing.assert_allclose(got.array, volume.array)
    np.testing.assert_allclose(got.affine, volume.affine, atol=1e-6)
    assert got.record["series_instance_uid"] == t1[0].SeriesInstanceUID
    assert got.record["sr_sop_instance_uid"] == sr.SOPInstanceUID and "paired" in got.record["used"]
    assert "fetched from the PACS" in got.note

    sr_only = DicomwebPriorSource(dicomweb([sr]).url, auth=auth, timeout=5)
    got = pacs_prior_input(sr_only, patient_id="W1", study_date="20250311", study_instance_uid="9.9")
    assert got.kind == "result" and got.volumes["right"]["total"] == pytest.approx(sides["right"].total_mm3)
    assert "could not be fetched from the PACS" in got.note and "returned no instance" in got.note
    # the independent change against the SR's volumes, the note saying why
    now = SimpleNamespace(side=lambda s: SimpleNamespace(volumes=SimpleNamespace(
        anterior_mm3=sides[s].anterior_mm3 * 0.95, posterior_mm3=sides[s].posterior_mm3 * 0.95,
        total_mm3=sides[s].total_mm3 * 0.95)))
    block = change_since_prior(got, (volume.array, volume.affine), now, agent=None, current_date="20250311",
                               limits=None)
    assert block["available"] and block["mode"] == "independent" and block["interval_days"] == 365
    assert block["sides"]["left"]["total"]["change_percent"] == pytest.approx(-5.0, abs=0.01)
    assert "could not be fetched" in block["note"] and block["prior"]["sr_sop_instance_uid"] == sr.SOPInstanceUID

    # no earlier result, no patient ID, the PACS down: a plain sentence, never an exception
    def change(source, patient="W1", date="20250311"):
        return change_since_prior(lambda: pacs_prior_input(source, patient_id=patient, study_date=date,
                                                           study_instance_uid="9.9"),
                                  (volume.array, volume.affine), None, agent=None, limits=None)

    assert change(full, patient="W2") == {"available": False, "reason": "the PACS holds no earlier result for "
                                                                         "patient ID W2 before 2025-03-11"}
    assert "no patient ID" in change(full, patient="")["reason"]
    assert "holds no earlier result" in change(full, date="20240311")["reason"]  # the same day is not earlier
    from hippo.network.orthanc import free_port

    down = DicomwebPriorSource(f"http://127.0.0.1:{free_port()}/dicom-web", timeout=2)
    assert "could not be reached" in change(down)["reason"]


# ------------------------------------------------------------------------------------------- end to end
def require_orthanc() -> None:
    """Skip, saying why, when Debian's Orthanc or its DICOMweb plugin is not installed."""
    from hippo.network.orthanc import find_dicomweb_plugin, find_orthanc

    if find_orthanc() is None or find_dicomweb_plugin() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")


@contextlib.contextmanager
def routed_pacs_and_listener(tmp_path: Path, model_path, *, name: str, processor_options: dict,
                             timeout: float = 10.0, **listener_options):
    """The real Orthanc (authentication on, DICOMweb, Lua routing to the AI) and the real listener,
    whose PACS search (``prior``) points at that Orthanc's DICOMweb root; yields ``(settings, auth,
    listener)`` and stops both."""
    from hippo.network.listener import Listener
    from hippo.network.orthanc import OrthancSettings, free_port, start_orthanc, stop, wait_ready

    require_orthanc()
    listener_port = free_port()
    auth = ("hippo", "prior-test-password")
    settings = OrthancSettings(
        dicom_port=free_port(), http_port=free_port(), stable_age=1, route_to="hippoai", users={auth[0]: auth[1]},
        modalities={"hippoai": {"aet": "HIPPOAI", "host": "127.0.0.1", "port": listener_port},
                    "scanner": {"aet": "HIPPOSCANNER", "host": "127.0.0.1", "port": free_port()}},
        name=name)
    proc = start_orthanc(settings, tmp_path / "orthanc")
    listener = None
    try:
        wait_ready(settings.http_url, 30, proc=proc, name=settings.name, auth=auth)
        lookup = PriorLookup.from_settings(url=f"{settings.http_url}/dicom-web", auth=auth, timeout=timeout)
        listener = Listener(port=listener_port, root=tmp_path / "listener", model_path=model_path,
                            allowed_calling_aets=["ORTHANC"], quiet_seconds=1.0,
                            pacs={"port": settings.dicom_port, "called_ae": settings.aet, "calling_ae": "HIPPOAI",
                                  "timeout": timeout, "retries": 1},
                            processor_options={**processor_options, "prior": lookup}, **listener_options)
        listener.start()
        yield settings, auth, listener
    finally:
        if listener is not None:
            listener.stop(timeout=60)
        stop(proc)


def send_and_wait(settings, listener, folder: Path, uid: str, what: str, timeout: float = 240.0) -> dict:
    """C-STORE the study in ``folder`` to Orthanc as the scanner and wait until the listener (Orthanc
    routes it there) has processed study ``uid``; its ``listener.json`` record (ok or review)."""
    from hippo.scanner import send_study

    sent = send_study(folder, "127.0.0.1", settings.dicom_port, called_ae=settings.aet, calling_ae="HIPPOSCANNER")
    assert sent["failed"] == 0 and sent["sent"] > 0
    record, error = listener.processed_dir / uid / "listener.json", listener.failed_dir / uid / "error.json"
    wait_for(lambda: record.exists() or error.exists(), timeout, what, interval=0.3)
    assert record.exists(), error.read_text()
    out = json.loads(record.read_text())
    assert out["status"] in ("ok", "review"), out  # a random model: review flags
    assert listener.wait_idle(60)
    return out


def results_in_pacs(settings, auth, listener, uid: str) -> bytes:
    """Wait for study ``uid``'s results in Orthanc; check that its SC (the page) and SR are the
    listener's own (``report_sc.dcm``, ``sr.dcm``); the SR's bytes as Orthanc gives them back."""
    from hippo.network.orthanc import OrthancClient

    client = OrthancClient(settings.http_url, auth=auth)
    study_id = client.find_study(uid)
    wait_for(lambda: {s["MainDicomTags"].get("Modality") for s in client.series(study_id)} >= {"SR", "OT", "SEG"},
             60, "the results in the PACS", interval=0.3)
    by_modality = {s["MainDicomTags"].get("Modality"): s for s in client.series(study_id)}

    def fetch(modality: str) -> bytes:
        return client.request("GET", f"/instances/{client.instances(by_modality[modality]['ID'])[0]['ID']}/file")

    local_sc = pydicom.dcmread(listener.results_dir / uid / "report_sc.dcm")
    sc = pydicom.dcmread(io.BytesIO(fetch("OT")))
    assert sc.SOPInstanceUID == local_sc.SOPInstanceUID and sc.PixelData == local_sc.PixelData
    sr = fetch("SR")
    assert pydicom.dcmread(io.BytesIO(sr)).SOPInstanceUID == \
        pydicom.dcmread(listener.results_dir / uid / "sr.dcm").SOPInstanceUID
    return sr


def change_groups(sr) -> dict[str, dict[str, object]]:
    """The SR's "Change since prior study: ..." groups: {identifier: {code value: NUM value (float),
    DATE (YYYYMMDD) or TEXT}}."""
    out = {}
    for container in sr.ContentSequence:
        for group in container.get("ContentSequence", ()):
            items = list(group.get("ContentSequence", ()))
            ident = next((str(i.TextValue) for i in items if i.ValueType == "TEXT"
                          and i.ConceptNameCodeSequence[0].CodeValue == "112039"), "")
            if ident.startswith("Change since prior study"):
                out[ident] = {i.ConceptNameCodeSequence[0].CodeValue:
                              float(i.MeasuredValueSequence[0].NumericValue) if i.ValueType == "NUM"
                              else str(i.Date) if i.ValueType == "DATE" else str(i.get("TextValue", ""))
                              for i in items if i.ValueType in ("NUM", "DATE", "TEXT")}
    return out


@pytest.mark.service
def test_second_study_a_year_later_shows_the_change_against_the_first(model_file, tmp_path):
    """Orthanc (authentication on, DICOMweb, Lua routing) + the listener: the scanner emulator sends
    two studies of one patient a year apart; the second one's result.json, SR (read back from the
    PACS) and report page carry the change against the first result's volumes."""
    from conftest import ANY_VOLUME, require_real_data
    from hippo.scanner import StudyInfo, write_study

    require_orthanc()
    root = require_real_data()
    with routed_pacs_and_listener(tmp_path, model_file, name="HippoVolume prior test PACS", stop_timeout=60,
                                  processor_options={"io_threads": 2, "plausibility": ANY_VOLUME}) \
            as (settings, auth, listener):
        records = []
        for n, (case, date) in enumerate((("hippocampus_001", "20240311"), ("hippocampus_003", "20250311"))):
            info = StudyInfo(patient_id="PRIOR-PATIENT-1", patient_name="Prior^Pat", study_date=date, seed=40 + n)
            manifest = write_study(root / "imagesTr" / f"{case}.nii.gz", tmp_path / f"study{n}", study=info,
                                   distractors=False, seed=40 + n)
            uid = manifest["study_instance_uid"]
            records.append((uid, send_and_wait(settings, listener, tmp_path / f"study{n}", uid,
                                               f"study {n + 1} to be processed")))

        (uid1, first), (uid2, second) = records
        r1 = json.loads((listener.results_dir / uid1 / "result.json").read_text())
        assert not r1["prior_comparison"]["available"]
        assert "holds no earlier result for patient ID PRIOR-PATIENT-1" in r1["prior_comparison"]["reason"]

        block = json.loads((listener.results_dir / uid2 / "result.json").read_text())["prior_comparison"]
        assert block["available"] and block["comparable"] and block["interval_days"] == 365
        assert block["prior"]["study_date"] == "2024-03-11" and block["prior"]["study_instance_uid"] == uid1
        for key in ("anterior", "posterior", "total"):
            before, now = first["volumes"][f"{key}_mm3"], second["volumes"][f"{key}_mm3"]
            c = block["change"][key]
            assert c["prior_mm3"] == pytest.approx(before, abs=1e-3)
            assert c["change_mm3"] == pytest.approx(now - before, abs=1e-2)
            assert c["change_percent"] == pytest.approx(100 * (now - before) / before, abs=1e-2)
            assert c["rate_percent_per_year"] == pytest.approx(c["change_percent"] * 365.25 / 365, abs=1e-2)

        # the SR and the SC in the PACS are the ones made with the comparison
        sr = pydicom.dcmread(io.BytesIO(results_in_pacs(settings, auth, listener, uid2)))
        change = change_groups(sr)["Change since prior study: total hippocampus"]
        assert change["VOLCHG"] == pytest.approx(block["change"]["total"]["change_mm3"], abs=1e-2)
        assert change["PRIORDATE"] == "20240311"
        assert dciodvfy_problems(listener.results_dir / uid2 / "sr.dcm")["errors"] == []
