"""hippo.network.orthanc: configuration, the Orthanc process, REST helpers and the Lua auto-routing.

The configuration tests need nothing installed. The ``service`` tests start Debian's ``Orthanc``
(1.10.1 + DICOMweb 1.7) as a plain child process on free ports in a temporary directory (never the
system service) and a pynetdicom Storage SCP as the fake "hippoai" modality; they are skipped with
the reason when Orthanc is not installed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from hippo.data.synthetic import make_case
from hippo.network import orthanc as orth
from hippo.network.orthanc import (OrthancClient, OrthancError, OrthancSettings, build_config, find_dicomweb_plugin,
                                   find_orthanc, free_port, port_in_use, start_orthanc, stop, wait_ready,
                                   write_config)
from hippo.pacs import PacsConfig, echo
from hippo.scanner import StudyInfo, send_study, write_series, write_study
from conftest import local_non_loopback_ip

RESULT_DESCRIPTION = "AI hippocampus segmentation, research use"


# ----------------------------------------------------------------------------------------------
# Configuration (nothing installed needed)


@pytest.fixture
def fake_plugins(tmp_path: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "libOrthancDicomWeb.so").write_bytes(b"")
    return d


def test_write_config_defaults(tmp_path: Path, fake_plugins: Path) -> None:
    settings = OrthancSettings(plugins_dir=fake_plugins)
    path = write_config(settings, tmp_path / "orthanc")
    assert path == (tmp_path / "orthanc" / "orthanc.json").resolve()
    assert path.stat().st_mode & 0o077 == 0  # may hold passwords
    cfg = json.loads(path.read_text())
    assert cfg["DicomAet"] == "ORTHANC" and cfg["DicomPort"] == 4242 and cfg["HttpPort"] == 8042
    assert cfg["RemoteAccessAllowed"] is False
    assert cfg["AuthenticationEnabled"] is False and cfg["RegisteredUsers"] == {}
    assert cfg["StableAge"] == 3
    assert cfg["DicomAlwaysAllowStore"] is False and cfg["DicomAlwaysAllowEcho"] is False
    assert cfg["DicomCheckModalityHost"] is True and cfg["DicomCheckCalledAet"] is True
    assert cfg["WebDavEnabled"] is False and cfg["ExecuteLuaEnabled"] is False
    mods = cfg["DicomModalities"]
    assert (mods["hippoai"]["AET"], mods["hippoai"]["Host"], mods["hippoai"]["Port"]) == ("HIPPOAI", "127.0.0.1", 11112)
    assert (mods["scanner"]["AET"], mods["scanner"]["Port"]) == ("HIPPOSCANNER", 11113)
    assert cfg["Plugins"] == [str(fake_plugins / "libOrthancDicomWeb.so")]
    assert cfg["DicomWeb"]["Enable"] is True and cfg["DicomWeb"]["Root"] == "/dicom-web/"
    assert cfg["DicomWeb"]["EnableWado"] is True and cfg["DicomWeb"]["Host"] == "127.0.0.1:8042"
    storage = Path(cfg["StorageDirectory"])
    assert storage == path.parent / "storage" and storage.is_dir() and cfg["IndexDirectory"] == str(storage)
    lua = Path(cfg["LuaScripts"][0])
    assert lua.parent == path.parent
    text = lua.read_text()
    assert 'HIPPO_ROUTE_TO = "hippoai"' in text and 'HIPPO_ROUTE_SCOPE = "series"' in text
    assert "function OnStableStudy(studyId, tags, metadata)" in text


def test_config_options(tmp_path: Path, fake_plugins: Path) -> None:
    settings = OrthancSettings.from_mapping({
        "aet": "PACS1", "dicom_port": 5000, "http_port": 5001, "stable_age": 2, "plugins_dir": str(fake_plugins),
        "users": {"alice": "secret"}, "remote_access": True, "allow_unknown_aets": True,
        "modalities": {"ai": ["AI", "127.0.0.1", 5002]}, "route_to": "ai", "route_scope": "study",
        "dicomweb_host": "127.0.0.1:3000", "storage_dir": str(tmp_path / "db"),
    })
    cfg = build_config(settings, tmp_path)
    assert cfg["AuthenticationEnabled"] is True and cfg["RegisteredUsers"] == {"alice": "secret"}
    assert cfg["RemoteAccessAllowed"] is True
    assert cfg["DicomAlwaysAllowStore"] is True and cfg["DicomCheckModalityHost"] is False
    assert cfg["DicomModalities"]["ai"]["Port"] == 5002
    assert cfg["DicomWeb"]["Host"] == "127.0.0.1:3000"
    assert cfg["StorageDirectory"] == str((tmp_path / "db").resolve())
    no_routing = build_config(OrthancSettings(route_to=None, dicomweb=False), tmp_path)
    assert no_routing["LuaScripts"] == [] and no_routing["Plugins"] == [] and "DicomWeb" not in no_routing


@pytest.mark.parametrize("bad", [
    {"aet": "A" * 17}, {"dicom_port": 0}, {"dicom_port": 9000, "http_port": 9000}, {"stable_age": 0},
    {"route_to": "nowhere"}, {"route_scope": "patient"}, {"modalities": {"x": ["AE", "127.0.0.1"]}},
])
def test_settings_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        OrthancSettings(**bad)


def test_unknown_setting_and_missing_plugin(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="colour"):
        OrthancSettings.from_mapping({"colour": "red"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OrthancError, match="orthanc-dicomweb"):
        write_config(OrthancSettings(plugins_dir=empty), tmp_path / "o")


def test_free_port_and_port_in_use() -> None:
    port = free_port()
    assert not port_in_use(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert port_in_use(port)


# ----------------------------------------------------------------------------------------------
# A real Orthanc


class FakeAI:
    """A Storage SCP standing in for the AI listener: records (calling AE, study, series, SOP,
    SeriesDescription) of every instance it receives."""

    def __init__(self, port: int, ae_title: str = "HIPPOAI") -> None:
        self.port = port
        self.received: list[tuple[str, str, str, str, str]] = []
        self.lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = True
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event):
        ds = event.dataset
        with self.lock:
            self.received.append((str(event.assoc.requestor.ae_title).strip(), str(ds.StudyInstanceUID),
                                  str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                                  str(ds.get("SeriesDescription", ""))))
        return 0x0000

    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def shutdown(self) -> None:
        self.server.shutdown()


def _wait(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A running Orthanc (StableAge 2 s, routing to a FakeAI) -> (settings, proc, client, fake_ai, dir)."""
    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    ai = FakeAI(free_port())
    base = tmp_path_factory.mktemp("orthanc")
    settings = OrthancSettings(
        dicom_port=free_port(), http_port=free_port(), stable_age=2,
        modalities={"hippoai": {"aet": "HIPPOAI", "host": "127.0.0.1", "port": ai.port},
                    "scanner": {"aet": "HIPPOSCANNER", "host": "127.0.0.1", "port": free_port()}},
        dicomweb=find_dicomweb_plugin() is not None, name="HippoVolume test PACS",
    )
    proc = start_orthanc(settings, base)
    try:
        info = wait_ready(settings.http_url, 30, proc=proc, name=settings.name, log_file=base / orth.LOG_NAME)
        assert info["DicomAet"] == "ORTHANC" and info["DicomPort"] == settings.dicom_port
        yield settings, proc, OrthancClient(settings.http_url), ai, base
    finally:
        stop(proc)
        ai.shutdown()


def _echo(settings: OrthancSettings, calling_ae: str, **kw) -> bool:
    return echo(PacsConfig(port=settings.dicom_port, called_ae=settings.aet, calling_ae=calling_ae,
                           timeout=5, retries=0, **kw))


@pytest.mark.service
def test_echo_and_access_rules(pacs) -> None:
    settings, proc, client, _, _ = pacs
    assert _echo(settings, "HIPPOSCANNER") and _echo(settings, "HIPPOAI")
    assert not _echo(settings, "STRANGER"), "unknown calling AEs must be rejected"
    assert not echo(PacsConfig(port=settings.dicom_port, called_ae="NOTORTHANC", calling_ae="HIPPOSCANNER",
                               timeout=5, retries=0)), "the called AE must be Orthanc's"
    assert client.system()["Name"] == settings.name
    with pytest.raises(OrthancError, match="another Orthanc"):
        wait_ready(settings.http_url, 5, name="some other PACS")
    ip = local_non_loopback_ip()
    if ip is not None:  # Orthanc 1.10 listens on all interfaces: remote HTTP is refused, DICOM by host
        with pytest.raises(OrthancError, match="HTTP 40[13]"):
            OrthancClient(f"http://{ip}:{settings.http_port}", timeout=5).system()
        ae = AE(ae_title="HIPPOSCANNER")
        ae.add_requested_context(Verification)
        assoc = ae.associate(ip, settings.dicom_port, ae_title=settings.aet, bind_address=(ip, 0))
        established = assoc.is_established
        if established:
            assoc.release()
        assert not established, "a known AE from another host must be rejected (DicomCheckModalityHost)"


def _write_case(tmp_path: Path, seed: int) -> Path:
    image, _label, affine = make_case(np.random.default_rng(seed))
    path = tmp_path / f"case{seed}.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return path


def _log_lines(base: Path, needle: str) -> list[str]:
    return [line for line in orth.tail(base / orth.LOG_NAME, 10_000).splitlines() if needle in line]


@pytest.mark.service
def test_store_and_route_hippocrop_once(pacs, tmp_path: Path) -> None:
    settings, _, client, ai, base = pacs
    manifest = write_study(_write_case(tmp_path, 0), tmp_path / "study", seed=11)
    result = send_study(tmp_path / "study", "127.0.0.1", settings.dicom_port, called_ae=settings.aet,
                        calling_ae="HIPPOSCANNER")
    n_total = sum(s["n_instances"] for s in manifest["series"].values())
    assert result["failed"] == 0 and result["sent"] == n_total

    # the study is in Orthanc, with its four series
    study_id = client.find_study(manifest["study_instance_uid"])
    assert study_id is not None and study_id in client.studies()
    assert client.study(study_id)["MainDicomTags"]["StudyInstanceUID"] == manifest["study_instance_uid"]
    series = {s["MainDicomTags"]["SeriesDescription"]: s for s in client.series(study_id)}
    assert set(series) == set(manifest["series"])
    crop = manifest["series"]["HippoCrop"]
    crop_instances = client.instances(series["HippoCrop"]["ID"])
    assert len(crop_instances) == crop["n_instances"]
    if settings.dicomweb:
        qido = json.loads(client.request("GET", f"/dicom-web/studies?StudyInstanceUID={manifest['study_instance_uid']}"))
        assert len(qido) == 1

    # after StableAge the Lua script sends the HippoCrop series (only it) to the fake AI
    assert _wait(lambda: ai.count() >= crop["n_instances"], 30), \
        f"routing did not deliver within 30 s; Orthanc log:\n{orth.tail(base / orth.LOG_NAME)}"
    time.sleep(1.0)
    with ai.lock:
        received = list(ai.received)
    assert len(received) == crop["n_instances"]
    assert {r[0] for r in received} == {settings.aet}
    assert {r[1] for r in received} == {manifest["study_instance_uid"]}
    assert {r[2] for r in received} == {crop["series_instance_uid"]}
    assert {r[3] for r in received} == {i["MainDicomTags"]["SOPInstanceUID"] for i in crop_instances}
    assert any(study_id in line and "-> hippoai (series" in line
               for line in _log_lines(base, "HippoVolume routing"))
    jobs = [j for j in client.jobs() if j.get("Type") == "DicomModalityStore"]
    assert jobs and all(j["State"] == "Success" for j in jobs)

    # a result series arriving (from the AI's AE) makes the study stable again: not routed again;
    # a study without a HippoCrop series is not routed at all
    info = StudyInfo(**manifest["study"])
    write_series(np.zeros((8, 8, 3), np.uint16), np.eye(4), tmp_path / "result", study=info,
                 series_description=RESULT_DESCRIPTION, series_number=9002)
    assert send_study(tmp_path / "result", "127.0.0.1", settings.dicom_port, called_ae=settings.aet,
                      calling_ae="HIPPOAI")["sent"] == 3
    other = StudyInfo(seed=12)
    write_series(np.ones((8, 8, 4), np.uint16), np.eye(4), tmp_path / "other", study=other,
                 series_description="T1 MPRAGE full brain", series_number=2)
    assert send_study(tmp_path / "other", "127.0.0.1", settings.dicom_port, called_ae=settings.aet,
                      calling_ae="HIPPOSCANNER")["sent"] == 4
    other_id = client.find_study(other.study_instance_uid)
    assert other_id is not None

    def decided() -> bool:
        lines = _log_lines(base, "not sent")
        return (any(study_id in line and "a result series is already there" in line for line in lines)
                and any(other_id in line and "no HippoCrop series" in line for line in lines))

    assert _wait(decided, settings.stable_age + 10), \
        f"OnStableStudy did not run for both studies; Orthanc log:\n{orth.tail(base / orth.LOG_NAME)}"
    time.sleep(settings.stable_age + 1)
    assert ai.count() == crop["n_instances"], "the study was routed a second time"
    assert len(client.series(study_id)) == 5
    assert client.study(study_id)["IsStable"] is True


@pytest.mark.service
def test_port_taken_and_stop(tmp_path: Path) -> None:
    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    settings = OrthancSettings(dicom_port=free_port(), http_port=free_port(), route_to=None,
                               dicomweb=False, modalities={})
    with socket.socket() as s:  # someone else holds the DICOM port: a clear error, nothing started
        s.bind(("127.0.0.1", settings.dicom_port))
        s.listen()
        with pytest.raises(OrthancError, match="already in use"):
            start_orthanc(settings, tmp_path)
    proc = start_orthanc(settings, tmp_path)
    wait_ready(settings.http_url, 30, proc=proc, name=settings.name)
    assert port_in_use(settings.http_port) and port_in_use(settings.dicom_port)
    assert stop(proc) is not None
    assert proc.poll() is not None and not orth.group_alive(proc.pid) and not orth.pid_alive(proc.pid)
    assert not port_in_use(settings.http_port) and not port_in_use(settings.dicom_port)
    assert stop(proc) is not None  # idempotent
    assert "Orthanc has stopped" in orth.tail(tmp_path / orth.LOG_NAME)


# ----------------------------------------------------------------------------------------------
# hippo.network.stack pieces that need no listener/viewer


def _network(tmp_path: Path, *extra: str):
    from hippo.network.stack import Network, load_config

    ports = [free_port() for _ in range(4)]
    overrides = [f"paths.log_dir={tmp_path}", f"orthanc.dicom_port={ports[0]}", f"orthanc.http_port={ports[1]}",
                 f"listener.port={ports[2]}", f"viewer.port={ports[3]}", *extra]
    return Network(load_config(None, overrides), model_path=tmp_path / "my model.pt")


def test_network_commands(tmp_path: Path) -> None:
    net = _network(tmp_path, "orthanc.stable_age=2")
    lcmd = net.listener_command()
    assert lcmd[1:3] == ["-m", "hippo.listen"]
    assert f"listener.port={net.listener['port']}" in lcmd and "listener.ae_title=HIPPOAI" in lcmd
    assert f"pacs.port={net.orthanc.dicom_port}" in lcmd and "pacs.called_ae=ORTHANC" in lcmd
    assert f"paths.log_dir={tmp_path.resolve()}" in lcmd and "listener.quiet_seconds=3" in lcmd
    assert f"model_path='{(tmp_path / 'my model.pt').resolve()}'" in lcmd  # quoted for Hydra
    vcmd = net.viewer_command()
    assert vcmd[1:3] == ["-m", "hippo.network.viewer"]
    assert vcmd[3:] == ["--host", "127.0.0.1", "--port", str(net.viewer["port"]), "--dist",
                        str(tmp_path.resolve() / "network/ohif/dist"), "--orthanc", net.orthanc.http_url]
    # Orthanc routes to the listener's port and AE; DICOMweb links point at the viewer's origin
    assert net.orthanc.modalities["hippoai"] == {"aet": "HIPPOAI", "host": "127.0.0.1", "port": net.listener["port"]}
    assert net.orthanc.dicomweb_host == f"127.0.0.1:{net.viewer['port']}" and net.orthanc.stable_age == 2


def _tarball(path: Path, files: dict[str, bytes]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_ensure_ohif_dist(tmp_path: Path, monkeypatch) -> None:
    from hippo.network import stack

    tgz = _tarball(tmp_path / "ohif-app-9.9.9.tgz", {
        "package/dist/index.html": b"<html></html>", "package/dist/app-config.js": b"window.config={}",
        "package/dist/assets/a.js": b"1", "package/package.json": b"{}", "package/dist/../../evil.txt": b"x",
    })
    dist = stack.ensure_ohif_dist(tmp_path / "ohif" / "dist", "9.9.9", tarball=tgz)
    assert sorted(str(p.relative_to(dist)) for p in dist.rglob("*") if p.is_file()) == \
        ["app-config.js", "assets/a.js", "index.html"]
    assert not (tmp_path / "evil.txt").exists() and not list((tmp_path / "ohif").glob(".dist.*"))
    assert stack.ensure_ohif_dist(dist, "9.9.9", tarball=tmp_path / "absent.tgz") == dist  # already there
    bad = _tarball(tmp_path / "bad.tgz", {"package/README.md": b"no viewer"})
    with pytest.raises(stack.NetworkError, match="index.html"):
        stack.ensure_ohif_dist(tmp_path / "other" / "dist", "9.9.9", tarball=bad)
    monkeypatch.setattr(stack.shutil, "which", lambda name: None)
    with pytest.raises(stack.NetworkError, match="npm is not installed"):
        stack.ensure_ohif_dist(tmp_path / "third" / "dist", "9.9.9")


@pytest.mark.service
def test_network_up_status_down_orthanc_only(tmp_path: Path) -> None:
    from hippo.network.stack import NetworkError

    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    net = _network(tmp_path)
    assert net.down() == {"orthanc": "not running", "listener": "not running", "viewer": "not running"}
    status = net.up(only=["orthanc"])
    try:
        assert status["up"] is True and status["services"]["orthanc"]["running"] is True
        assert all(status["services"]["orthanc"]["listening"].values())
        assert status["services"]["listener"]["running"] is False
        state = json.loads(net.state_path.read_text())
        pid = state["processes"]["orthanc"]["pid"]
        assert state["processes"]["orthanc"]["ports"] == [net.orthanc.dicom_port, net.orthanc.http_port]
        assert OrthancClient(net.orthanc.http_url).system()["Name"] == net.orthanc.name
        assert (tmp_path / "network/orthanc/orthanc.json").is_file()
        with pytest.raises(NetworkError, match="already"):
            net.up(only=["orthanc"])
    finally:
        result = net.down()
    assert result["orthanc"] == "stopped"
    assert not orth.pid_alive(pid) and not orth.group_alive(pid) and not net.state_path.exists()
    assert not port_in_use(net.orthanc.http_port) and not port_in_use(net.orthanc.dicom_port)
    assert net.down()["orthanc"] == "not running"  # idempotent
    assert net.status()["up"] is False
