"""hippo.network.orthanc: configuration, the Orthanc process, REST helpers and the Lua auto-routing.

The configuration tests need nothing installed (the Lua access filter's decisions run in the Lua
5.3 library Orthanc itself links, through ctypes, when it is there). The ``service`` tests start
Debian's ``Orthanc`` (1.10.1 + DICOMweb 1.7) as a plain child process on free ports in a temporary
directory (never the system service), with HTTP Basic authentication and the access filter on, and
a pynetdicom Storage SCP as the fake "hippoai" modality; they are skipped with the reason when
Orthanc is not installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import http.client
import io
import json
import os
import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from fakes import StorageSCP, wait_until
from hippo.data.synthetic import make_case
from hippo.network import orthanc as orth
from hippo.network.orthanc import (OrthancClient, OrthancError, OrthancSettings, build_config, ensure_credentials,
                                   find_dicomweb_plugin, find_orthanc, free_port, new_credentials, port_in_use,
                                   read_credentials, start_orthanc, stop, wait_ready, write_config)
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
    # the library default has no users (hippo.network always adds its service account)
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
    access, routing = map(Path, cfg["LuaScripts"])       # the filter first, then the routing script
    assert access == path.parent / "access.lua" and routing == path.parent / "routing.lua"
    text = routing.read_text()
    assert 'HIPPO_ROUTE_TO = "hippoai"' in text and 'HIPPO_ROUTE_SCOPE = "series"' in text
    # where the routing remembers what it sent per input series (sent again only when changed)
    assert 'HIPPO_ROUTED_METADATA = "HippoRouted"' in text and cfg["UserMetadata"] == {"HippoRouted": 4831}
    assert "function OnStableStudy(studyId, tags, metadata)" in text
    text = access.read_text()
    assert 'HIPPO_ALLOWED_HOSTS = { ["127.0.0.1:8042"] = true, ["localhost:8042"] = true }' in text
    assert 'HIPPO_OWN_ORIGINS = { ["http://127.0.0.1:8042"] = true, ["http://localhost:8042"] = true }' in text
    assert "function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)" in text


def test_config_options(tmp_path: Path, fake_plugins: Path) -> None:
    settings = OrthancSettings.from_mapping({
        "aet": "PACS1", "dicom_port": 5000, "http_port": 5001, "stable_age": 2, "plugins_dir": str(fake_plugins),
        "users": {"alice": "secret"}, "remote_access": True, "allow_unknown_aets": True,
        "modalities": {"ai": ["AI", "127.0.0.1", 5002]}, "route_to": "ai", "route_scope": "study",
        "dicomweb_host": "127.0.0.1:3000", "storage_dir": str(tmp_path / "db"),
    })
    cfg = build_config(settings, tmp_path)
    assert cfg["AuthenticationEnabled"] is True and cfg["RegisteredUsers"] == {"alice": "secret"}
    assert cfg["LuaScripts"] == [str(tmp_path.resolve() / "access.lua"), str(tmp_path.resolve() / "routing.lua")]
    assert cfg["RemoteAccessAllowed"] is True
    assert cfg["DicomAlwaysAllowStore"] is True and cfg["DicomCheckModalityHost"] is False
    assert cfg["DicomModalities"]["ai"]["Port"] == 5002
    assert cfg["DicomWeb"]["Host"] == "127.0.0.1:3000"
    assert cfg["StorageDirectory"] == str((tmp_path / "db").resolve())
    no_routing = build_config(OrthancSettings(route_to=None, dicomweb=False), tmp_path)
    assert no_routing["LuaScripts"] == [str(tmp_path.resolve() / "access.lua")]
    assert no_routing["Plugins"] == [] and "DicomWeb" not in no_routing
    bare = build_config(OrthancSettings(route_to=None, dicomweb=False, http_filter=False), tmp_path)
    assert bare["LuaScripts"] == []
    hosts = OrthancSettings(http_port=5001, allowed_hosts=["LOCALHOST:3000", "pacs.example.org:5001", "[::1]:5001"])
    assert hosts.accepted_hosts == ["127.0.0.1:5001", "[::1]:5001", "localhost:3000", "localhost:5001",
                                    "pacs.example.org:5001"]
    assert hosts.own_origins == ["http://127.0.0.1:5001", "http://localhost:5001"]


@pytest.mark.parametrize("bad", [
    {"aet": "A" * 17}, {"dicom_port": 0}, {"dicom_port": 9000, "http_port": 9000}, {"stable_age": 0},
    {"route_to": "nowhere"}, {"route_scope": "patient"}, {"modalities": {"x": ["AE", "127.0.0.1"]}},
    {"allowed_hosts": ["evil.example"]}, {"allowed_hosts": ["a b:80"]}, {"allowed_hosts": ['x"]=true}--:1']},
    {"users": {"al:ice": "pw"}}, {"users": {"alice": ""}},
])
def test_settings_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        OrthancSettings(**bad)


def test_unknown_setting_and_missing_plugin(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="OrthancSettings: unknown setting.*'colour'"):
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


def test_config_with_passwords_is_never_readable_by_others(tmp_path: Path, fake_plugins: Path, monkeypatch) -> None:
    # even the temporary file before the rename is 0600 (a umask of 0 would make 0666 files)
    modes = []
    real_replace = os.replace

    def replace(src, dst):
        modes.append((Path(dst).name, os.stat(src).st_mode & 0o777))
        return real_replace(src, dst)

    old = os.umask(0)
    try:
        monkeypatch.setattr(orth.os, "replace", replace)
        write_config(OrthancSettings(plugins_dir=fake_plugins, users={"alice": "secret"}), tmp_path)
    finally:
        os.umask(old)
    assert ("orthanc.json", 0o600) in modes
    assert (tmp_path / "orthanc.json").stat().st_mode & 0o777 == 0o600


def test_credentials_are_generated_once_private_and_reused(tmp_path: Path, caplog) -> None:
    path = tmp_path / "orthanc" / "credentials.json"
    user, password = ensure_credentials(path)
    assert user == "hippo" and len(password) >= 40              # secrets.token_urlsafe(32)
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["password"] == password
    assert ensure_credentials(path) == (user, password)          # reused, never regenerated
    assert ensure_credentials(path, candidate=("other", "pw")) == (user, password)
    assert read_credentials(path) == (user, password)
    assert new_credentials()[1] != new_credentials()[1]
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]   # no temporary left
    # created by the given candidate when absent
    assert ensure_credentials(tmp_path / "c2.json", candidate=("bob", "pw2")) == ("bob", "pw2")

    os.chmod(path, 0o644)                                        # someone loosened it: tightened, warned
    with caplog.at_level("WARNING", logger="hippo.network.orthanc"):
        assert read_credentials(path) == (user, password)
    assert path.stat().st_mode & 0o777 == 0o600 and "readable by others" in caplog.text
    assert password not in caplog.text

    bad = tmp_path / "bad.json"
    for content in ("not json", "[]", '{"username": "x"}', '{"username": "a:b", "password": "p"}'):
        bad.write_text(content)
        with pytest.raises(OrthancError):
            read_credentials(bad)
    with pytest.raises(OrthancError, match="not found"):
        read_credentials(tmp_path / "absent.json")


# -- the Lua access filter, run in Lua 5.3 (the library Orthanc links) without Orthanc


def _liblua():
    for name in ("liblua5.3.so.0", "liblua5.3.so", ctypes.util.find_library("lua5.3")):
        if name:
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                continue
            lib.luaL_newstate.restype = ctypes.c_void_p
            for fn in ("luaL_openlibs", "lua_close"):
                getattr(lib, fn).argtypes = [ctypes.c_void_p]
            lib.luaL_loadstring.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.lua_pcallk.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_void_p]
            lib.lua_getglobal.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.lua_tolstring.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
            lib.lua_tolstring.restype = ctypes.c_char_p
            return lib
    return None


def _run_lua(code: str) -> str:
    """Run ``code`` in a fresh Lua 5.3 state; return the global ``RESULT`` (or the error)."""
    lib = _liblua()
    if lib is None:
        pytest.skip("the Lua 5.3 library is not installed (it comes with Debian's orthanc)")
    state = lib.luaL_newstate()
    try:
        lib.luaL_openlibs(state)
        if lib.luaL_loadstring(state, code.encode()) != 0 or lib.lua_pcallk(state, 0, 0, 0, None, None) != 0:
            return "LUA ERROR: " + (lib.lua_tolstring(state, -1, None) or b"").decode()
        lib.lua_getglobal(state, b"RESULT")
        return (lib.lua_tolstring(state, -1, None) or b"").decode()
    finally:
        lib.lua_close(state)


ACCESS_CASES = [
    # (method, headers, allowed)
    ("GET", {"host": "127.0.0.1:8042"}, True),
    ("GET", {"host": "localhost:8042"}, True),
    ("GET", {"host": "LocalHost:8042"}, True),
    ("GET", {"host": "127.0.0.1:3000"}, True),                       # the viewer's proxy forwards its Host
    ("GET", {"host": "evil.example:8042"}, False),                   # DNS rebinding
    ("GET", {"host": "127.0.0.1"}, False),
    ("GET", {"host": "127.0.0.1:8042.evil.example"}, False),
    ("GET", {}, False),                                              # no Host at all
    ("GET", {"host": "127.0.0.1:8042", "origin": "http://evil.example"}, True),   # reads: the browser's SOP
    ("POST", {"host": "127.0.0.1:8042"}, True),                      # curl, OrthancClient
    ("POST", {"host": "127.0.0.1:8042", "origin": "http://evil.example"}, False),
    ("POST", {"host": "127.0.0.1:8042", "origin": "null"}, False),
    ("POST", {"host": "127.0.0.1:8042", "origin": "http://127.0.0.1:3000"}, False),   # not even the viewer
    ("POST", {"host": "127.0.0.1:8042", "origin": "http://127.0.0.1:8042"}, True),   # Orthanc Explorer
    ("POST", {"host": "localhost:8042", "origin": "http://localhost:8042", "sec-fetch-site": "same-origin",
              "referer": "http://localhost:8042/app/explorer.html"}, True),
    ("DELETE", {"host": "127.0.0.1:8042", "sec-fetch-site": "cross-site"}, False),  # <img src=..?_method=DELETE>
    ("DELETE", {"host": "127.0.0.1:8042", "sec-fetch-site": "same-site"}, False),   # another localhost port
    ("DELETE", {"host": "127.0.0.1:8042", "sec-fetch-site": "none"}, True),         # typed into the address bar
    ("PUT", {"host": "127.0.0.1:8042", "referer": "http://evil.example/page"}, False),
    ("PUT", {"host": "127.0.0.1:8042", "referer": "http://127.0.0.1:8042.evil.example/"}, False),
    ("PUT", {"host": "127.0.0.1:8042", "referer": "http://127.0.0.1:8042/app/explorer.html"}, True),
    ("POST", {"host": "evil.example:8042", "origin": "http://127.0.0.1:8042"}, False),
]


def test_access_filter_decisions_in_lua() -> None:
    settings = OrthancSettings(http_port=8042, allowed_hosts=["127.0.0.1:3000", "localhost:3000"])
    lines = []
    for method, headers, _ in ACCESS_CASES:
        table = "{ " + ", ".join(f"[{orth._lua_string(k)}] = {orth._lua_string(v)}" for k, v in headers.items()) + " }"
        lines.append(f"R[#R + 1] = tostring(IncomingHttpRequestFilter({orth._lua_string(method)}, '/tools/shutdown', "
                     f"'127.0.0.1', 'hippo', {table}))")
    code = (orth.access_header(settings) + orth.access_script() + "\nprint = function() end\nR = {}\n"
            + "\n".join(lines) + "\nRESULT = table.concat(R, ',')\n")
    got = _run_lua(code).split(",")
    expected = [str(allowed).lower() for _, _, allowed in ACCESS_CASES]
    wrong = [(m, h, g) for (m, h, _), g, e in zip(ACCESS_CASES, got, expected) if g != e]
    assert not wrong and len(got) == len(expected), wrong or got
    # the routing script still loads beside it in the same Lua state (Orthanc has one context)
    both = orth.access_header(settings) + orth.access_script() + "\nHIPPO_ROUTE_TO = 'hippoai'\n" + \
        orth.routing_script() + "\nRESULT = type(OnStableStudy) .. type(IncomingHttpRequestFilter)\n"
    assert _run_lua(both) == "functionfunction"


# -- the routing decision (routing.lua's pure functions), run in Lua 5.3 without Orthanc


def _lua(value) -> str:
    """A Python value (dict, list, str, int, None) as a Lua literal."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return orth._lua_string(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in value.items()) + " }"
    return "{ " + ", ".join(_lua(v) for v in value) + " }"


def _series(sid: str, description: str, n: int = 3, modality: str = "MR", number: int = 1, **tags) -> dict:
    return {"ID": sid, "Instances": [f"{sid}-i{k:03d}" for k in range(n)],
            "MainDicomTags": {"SeriesDescription": description, "Modality": modality, "SeriesNumber": str(number),
                              **tags}}


def _route(series: list[dict], routed: dict[str, str] | None = None,
           acquisition: dict[str, str] | None = None) -> tuple[list[str], list[str], str, list[str]]:
    """Run ``HippoRoutingDecision`` on an expanded series list. ``routed``: series id -> stored
    fingerprint ("SAME": the series' current one); ``acquisition``: series id -> MRAcquisitionType
    read from an instance. Returns (sent ids, recorded ids, reason, ids whose header was read)."""
    code = (orth.routing_script() + "\nprint = function() end\n"
            f"local series = {_lua(series)}\nlocal routed = {_lua(routed or {})}\n"
            f"local acquisition = {_lua(acquisition or {})}\nlocal read = {{}}\n"
            "local byId = {}\nfor _, s in ipairs(series) do byId[s['ID']] = s end\n"
            "local function routedOf(id)\n"
            "  if routed[id] == 'SAME' then return HippoSeriesFingerprint(byId[id]) end\n"
            "  return routed[id]\nend\n"
            "local function acquisitionTypeOf(s) table.insert(read, s['ID']) return acquisition[s['ID']] end\n"
            "local send, record, reason = HippoRoutingDecision(series, routedOf, acquisitionTypeOf)\n"
            "local function ids(list) local out = {} for _, e in ipairs(list) do table.insert(out, e.id) end "
            "return table.concat(out, ',') end\n"
            "RESULT = ids(send) .. '|' .. ids(record) .. '|' .. (reason or '') .. '|' .. table.concat(read, ',')\n")
    got = _run_lua(code)
    assert not got.startswith("LUA ERROR"), got
    sent, recorded, reason, read = got.split("|")
    split = lambda s: s.split(",") if s else []  # noqa: E731
    return split(sent), split(recorded), reason, split(read)


def test_routing_sends_changed_inputs_once_and_never_results() -> None:
    crop = _series("crop", "HippoCrop", n=20, number=4)
    t1 = _series("t1", "T1 MPRAGE full brain", number=1, MRAcquisitionType="3D")
    results = [_series("sc", "AI hippocampus volume report, research use", 1, "OT", 9001),
               _series("seg", "AI hippocampus segmentation", 1, "SEG", 9002),
               _series("sr", "whatever", 1, "SR", 9003),
               _series("ko", "AI hippocampus results superseded, research use", 1, "KO", 9004)]
    # a new study: its HippoCrop series only (crops win over T1 candidates)
    assert _route([t1, crop]) == (["crop"], [], "", [])
    # our results arrive: the study is stable again, its input unchanged -> nothing (no loop)
    sent, recorded, reason, _ = _route([t1, crop, *results], routed={"crop": "SAME"})
    assert (sent, recorded) == ([], []) and "HippoCrop series unchanged since routed (crop: 20 instances)" in reason
    # the rest of the series arrives (35 instances now, 20 when routed): sent again, results or not
    whole = _series("crop", "HippoCrop", n=35, number=4)
    fingerprint_20 = _run_lua(orth.routing_script() + f"\nRESULT = HippoSeriesFingerprint({_lua(crop)})")
    assert fingerprint_20.startswith("20:") and len(fingerprint_20) == 3 + 16
    routed_20 = {"crop": fingerprint_20}
    assert _route([whole, *results], routed=routed_20)[:2] == (["crop"], [])
    # the same count made of other instances is a change too; the order of the ids is not
    other = dict(crop, Instances=[f"x{k}" for k in range(20)])
    assert _route([other, *results], routed=routed_20)[0] == ["crop"]
    shuffled = dict(crop, Instances=list(reversed(crop["Instances"])))
    assert _route([shuffled, *results], routed=routed_20)[0] == []
    # a study imported with its results and no routing record: recorded, not sent (measured before)
    sent, recorded, reason, _ = _route([crop, *results])
    assert (sent, recorded) == ([], ["crop"]) and "a result series is already there (series sc)" in reason
    # result series are never inputs, whatever their description
    fake = _series("res", "HippoCrop research use", 5, "MR", 9002)
    assert _route([fake]) == ([], [], "no HippoCrop or whole-head T1 series", [])


def test_whole_head_prefilter_is_lenient_and_bounded() -> None:
    study = [
        _series("scout", "AAHead_Scout_32ch-head-coil", number=1),
        _series("loc", "localizer", number=2, MRAcquisitionType="2D"),
        _series("mprage", "MPRAGE_EnchancedContrast", number=3),             # a plain T1 (Siemens protocol)
        _series("post", "t1_mprage_sag_post_contrast", number=9, ProtocolName="T1 GADO"),  # the listener decides
        _series("iso", "sag iso 1mm", number=5),                             # unnamed: 3D from its header
        _series("ax2d", "ax 5mm", number=6),                                 # unnamed: 2D from its header
        _series("t2", "t2_tse_tra", number=7),
        _series("flair", "3D FLAIR sag", number=8, MRAcquisitionType="3D"),   # 3D, but another weighting
        _series("dwi", "ep2d_diff_mddw", number=10),
        _series("ct", "T1 window", modality="CT", number=11),
    ]
    sent, recorded, reason, read = _route(study, acquisition={"iso": "3D", "ax2d": "2D"})
    assert sent == ["mprage", "post", "iso"] and recorded == [] and reason == ""  # named first, by number
    assert sorted(read) == ["ax2d", "iso"]     # headers read only where the names leave it open
    # at most 4 candidates per study: named ones first, then by SeriesNumber
    many = [_series(f"s{k}", f"t1_mprage_{k}", number=20 - k) for k in range(6)] + [_series("iso", "sag iso 1mm")]
    assert _route(many, acquisition={"iso": "3D"})[0] == ["s5", "s4", "s3", "s2"]
    # a study with a HippoCrop series reads no header at all
    assert _route([*study, _series("crop", "HippoCrop")], acquisition={"iso": "3D"}) == (["crop"], [], "", [])


# ----------------------------------------------------------------------------------------------
# A real Orthanc


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A running Orthanc (StableAge 2 s, routing to a fake AI listener: a ``fakes.StorageSCP``)
    -> (settings, proc, client, fake_ai, dir)."""
    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    ai = StorageSCP(ae_title="HIPPOAI", sop_classes=(), all_storage=True, require_called_aet=True)
    base = tmp_path_factory.mktemp("orthanc")
    settings = OrthancSettings(
        dicom_port=free_port(), http_port=free_port(), stable_age=2,
        modalities={"hippoai": {"aet": "HIPPOAI", "host": "127.0.0.1", "port": ai.port},
                    "scanner": {"aet": "HIPPOSCANNER", "host": "127.0.0.1", "port": free_port()}},
        dicomweb=find_dicomweb_plugin() is not None, name="HippoVolume test PACS",
        users=dict([new_credentials()]),         # as hippo.network runs it: credentials + the access filter
    )
    proc = start_orthanc(settings, base)
    auth = next(iter(settings.users.items()))
    try:
        info = wait_ready(settings.http_url, 30, proc=proc, name=settings.name, log_file=base / orth.LOG_NAME,
                          auth=auth)
        assert info["DicomAet"] == "ORTHANC" and info["DicomPort"] == settings.dicom_port
        yield settings, proc, OrthancClient(settings.http_url, auth=auth), ai, base
    finally:
        stop(proc)
        ai.stop()


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
    auth = next(iter(settings.users.items()))
    with pytest.raises(OrthancError, match="another Orthanc"):
        wait_ready(settings.http_url, 5, name="some other PACS", auth=auth)
    # refused at once, not retried until the deadline: with a 120 s deadline, a wait that retried
    # would take the whole 120 s, one that stops on the first 401 takes one request
    t0 = time.monotonic()
    with pytest.raises(OrthancError, match="refused the credentials: HTTP 401"):
        wait_ready(settings.http_url, 120, auth=(auth[0], "wrong"))
    assert time.monotonic() - t0 < 60
    ip = local_non_loopback_ip()
    if ip is not None:  # Orthanc 1.10 listens on all interfaces: remote HTTP is refused, DICOM by host
        with pytest.raises(OrthancError, match="HTTP 40[13]"):
            OrthancClient(f"http://{ip}:{settings.http_port}", timeout=5, auth=auth).system()
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
    assert wait_until(lambda: ai.count() >= crop["n_instances"], 30), \
        f"routing did not deliver within 30 s; Orthanc log:\n{orth.tail(base / orth.LOG_NAME)}"
    time.sleep(1.0)
    with ai.lock:
        received = list(ai.stored)
    assert len(received) == crop["n_instances"]
    assert {r.calling_ae for r in received} == {settings.aet}
    assert {r.study for r in received} == {manifest["study_instance_uid"]}
    assert {r.series for r in received} == {crop["series_instance_uid"]}
    assert {r.sop_instance for r in received} == {i["MainDicomTags"]["SOPInstanceUID"] for i in crop_instances}
    assert any(study_id in line and "-> hippoai (series" in line
               for line in _log_lines(base, "HippoVolume routing"))
    jobs = [j for j in client.jobs() if j.get("Type") == "DicomModalityStore"]
    assert jobs and all(j["State"] == "Success" for j in jobs)

    # a result series arriving (from the AI's AE) makes the study stable again: its input series is
    # unchanged, so it is not routed again; a study without a HippoCrop series is not routed at all
    info = StudyInfo(**manifest["study"])
    write_series(np.zeros((8, 8, 3), np.uint16), np.eye(4), tmp_path / "result", study=info,
                 series_description=RESULT_DESCRIPTION, series_number=9002)
    assert send_study(tmp_path / "result", "127.0.0.1", settings.dicom_port, called_ae=settings.aet,
                      calling_ae="HIPPOAI")["sent"] == 3
    other = StudyInfo(seed=12)
    write_series(np.ones((8, 8, 4), np.uint16), np.eye(4), tmp_path / "other", study=other,
                 series_description="FLAIR axial full brain", series_number=2)
    assert send_study(tmp_path / "other", "127.0.0.1", settings.dicom_port, called_ae=settings.aet,
                      calling_ae="HIPPOSCANNER")["sent"] == 4
    other_id = client.find_study(other.study_instance_uid)
    assert other_id is not None

    def decided() -> bool:
        lines = _log_lines(base, "not sent")
        return (any(study_id in line and "HippoCrop series unchanged since routed" in line for line in lines)
                and any(other_id in line and "no HippoCrop or whole-head T1 series" in line for line in lines))

    assert wait_until(decided, settings.stable_age + 10), \
        f"OnStableStudy did not run for both studies; Orthanc log:\n{orth.tail(base / orth.LOG_NAME)}"
    time.sleep(settings.stable_age + 1)
    assert ai.count() == crop["n_instances"], "the study was routed a second time"
    assert len(client.series(study_id)) == 5
    assert client.study(study_id)["IsStable"] is True


@pytest.mark.service
def test_whole_head_candidates_routed_by_name_or_3d_header_not_refused_for_contrast(pacs, tmp_path: Path) -> None:
    """A study without HippoCrop: Orthanc sends the T1-named series (a Siemens "EnchancedContrast"
    protocol included) and an unnamed series whose instances say MRAcquisitionType 3D (Orthanc 1.10
    does not index that tag: the script reads it from one instance), and nothing else."""
    settings, _, client, ai, base = pacs
    info = StudyInfo(seed=13)
    plans = [  # description, MRAcquisitionType, routed?
        ("AAHead_Scout_32ch-head-coil", "2D", False), ("MPRAGE_EnchancedContrast", None, True),
        ("sag iso 1mm", "3D", True), ("ax 5mm", "2D", False), ("t2_tse_tra", "2D", False),
        ("3D FLAIR sag", "3D", False),
    ]
    expected = set()
    for number, (description, kind, routed) in enumerate(plans, start=1):
        folder = tmp_path / f"s{number}"
        extra = {} if kind is None else {"MRAcquisitionType": kind}
        write_series(np.ones((8, 8, 3), np.uint16), np.eye(4), folder, study=info, series_description=description,
                     series_number=number, extra=extra)
        assert send_study(folder, "127.0.0.1", settings.dicom_port, called_ae=settings.aet,
                          calling_ae="HIPPOSCANNER")["sent"] == 3
        if routed:
            expected.add(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
    study_id = client.find_study(info.study_instance_uid)
    assert wait_until(lambda: any(study_id in line and "-> hippoai" in line
                                  for line in _log_lines(base, "HippoVolume routing")), settings.stable_age + 15), \
        f"the study was not routed; Orthanc log:\n{orth.tail(base / orth.LOG_NAME)}"
    assert wait_until(lambda: len(ai.for_study(info.study_instance_uid)) >= 6, 15)
    time.sleep(1.0)
    assert {r.series for r in ai.for_study(info.study_instance_uid)} == expected
    assert len(ai.for_study(info.study_instance_uid)) == 6


def _two_parts(files: list[Path], out: Path, at: int = 20) -> tuple[Path, Path]:
    """``files`` (one series, slice order) copied into ``out/first`` (``files[:at]``) and ``out/rest``
    without ImagesInAcquisition: nothing in the first part says that more is coming."""
    parts = (out / "first", out / "rest")
    for part, chunk in zip(parts, (files[:at], files[at:])):
        part.mkdir(parents=True)
        for p in chunk:
            ds = pydicom.dcmread(p)
            del ds.ImagesInAcquisition
            ds.save_as(part / p.name)
    return parts


def _referenced_uids(ds) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in ``ds`` (nested sequences included)."""
    found = set()
    for element in ds:
        if element.keyword == "ReferencedSOPInstanceUID":
            found.add(str(element.value))
        elif element.VR == "SQ":
            for item in element.value:
                found |= _referenced_uids(item)
    return found


@pytest.mark.service
def test_series_in_two_parts_is_routed_again_measured_whole_and_the_partial_result_rejected(model_file, tmp_path):
    """Issue 23: a scanner sends a HippoCrop series as 20 instances, then (after the partial result
    is back in the PACS) the other 15, without ImagesInAcquisition. The real Orthanc routes the
    series again because it changed since it was routed (not refused because results are there),
    the listener measures the whole series and rejects the partial result with an IOCM note; our
    results arriving never route anything (two routing jobs in all)."""
    from conftest import ANY_VOLUME, REAL_DATA, synthetic_crop_pair
    from fakes import wait_for
    from hippo.network.listener import Listener

    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    t_start = time.monotonic()
    if (REAL_DATA / "imagesTr" / "hippocampus_001.nii.gz").is_file():
        image, label = REAL_DATA / "imagesTr/hippocampus_001.nii.gz", REAL_DATA / "labelsTr/hippocampus_001.nii.gz"
    else:
        image, label = synthetic_crop_pair(tmp_path / "synthetic")
    listener_port = free_port()
    auth = new_credentials()
    settings = OrthancSettings(
        dicom_port=free_port(), http_port=free_port(), stable_age=1, users=dict([auth]), dicomweb=False,
        modalities={"hippoai": {"aet": "HIPPOAI", "host": "127.0.0.1", "port": listener_port},
                    "scanner": {"aet": "HIPPOSCANNER", "host": "127.0.0.1", "port": free_port()}},
        name="HippoVolume two-part test PACS")
    base = tmp_path / "orthanc"
    proc = start_orthanc(settings, base)
    listener = None
    try:
        wait_ready(settings.http_url, 30, proc=proc, name=settings.name, auth=auth, log_file=base / orth.LOG_NAME)
        client = OrthancClient(settings.http_url, auth=auth)
        manifest = write_study(image, tmp_path / "study", label_path=label, seed=23, distractors=False)
        uid = manifest["study_instance_uid"]
        files = [Path(p) for p in manifest["files"]["HippoCrop"]]  # slice order
        inputs = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        first, rest = _two_parts(files, tmp_path / "parts")
        listener = Listener(port=listener_port, root=tmp_path / "listener", model_path=model_file,
                            allowed_calling_aets=["ORTHANC"], quiet_seconds=1.0,
                            pacs={"port": settings.dicom_port, "called_ae": settings.aet, "calling_ae": "HIPPOAI",
                                  "timeout": 10, "retries": 1},
                            processor_options={"io_threads": 2, "plausibility": ANY_VOLUME}, stop_timeout=60)
        listener.start()
        record_path = listener.processed_dir / uid / "listener.json"

        def in_pacs() -> dict[str, str]:
            """SOPInstanceUID -> Modality of every instance of the study in Orthanc."""
            study_id = client.find_study(uid)
            return {} if study_id is None else {
                i["MainDicomTags"]["SOPInstanceUID"]: s["MainDicomTags"].get("Modality", "")
                for s in client.series(study_id) for i in client.instances(s["ID"])}

        def routing_lines() -> list[str]:
            study_id = client.find_study(uid)
            return [line for line in _log_lines(base, "HippoVolume routing") if study_id and study_id in line]

        # part 1: routed, measured from 20 instances, the result stored in the PACS
        assert send_study(first, "127.0.0.1", settings.dicom_port, called_ae=settings.aet,
                          calling_ae="HIPPOSCANNER")["sent"] == 20
        wait_for(record_path.exists, 120, "the first part to be measured", interval=0.2)
        partial = json.loads(record_path.read_text())
        assert partial["instances"] == 20 and partial["status"] in ("ok", "review"), partial
        partial_uids = set(partial["result_sop_instance_uids"])
        assert len(partial_uids) == 3
        wait_for(lambda: partial_uids <= set(in_pacs()), 60, "the partial result in the PACS", interval=0.2)
        # ...which makes the study unstable, then stable again: the routing runs (a second log line)
        wait_for(lambda: len(routing_lines()) >= 2, 30, "the routing to run again after the results", interval=0.2)

        # part 2, after the partial result is in the PACS: the series is routed again, whole
        assert send_study(rest, "127.0.0.1", settings.dicom_port, called_ae=settings.aet,
                          calling_ae="HIPPOSCANNER")["sent"] == len(files) - 20
        wait_for(lambda: json.loads(record_path.read_text()).get("instances") == len(files), 120,
                 "the whole series to be measured", interval=0.2)
        whole = json.loads(record_path.read_text())
        current = set(whole["result_sop_instance_uids"])
        assert whole["status"] in ("ok", "review") and len(current) == 3 and not current & partial_uids
        assert set(whole["supersedes"]) == partial_uids
        wait_for(lambda: current | {whole["rejection_note"]} <= set(in_pacs()), 60,
                 "the new result and the rejection note in the PACS", interval=0.2)
        assert listener.wait_idle(30)

        # the PACS: the whole input series, the partial result (rejected by the note), the current one
        stored = in_pacs()
        assert {u for u, m in stored.items() if m == "MR"} == inputs
        note_id = client.post_json("/tools/lookup", whole["rejection_note"])[0]["ID"]
        note = pydicom.dcmread(io.BytesIO(client.request("GET", f"/instances/{note_id}/file")))
        assert note.Modality == "KO" and note.ConceptNameCodeSequence[0].CodeValue == "113001"  # Rejected for QR
        rejected = _referenced_uids(note) - inputs
        assert rejected == partial_uids
        assert set(stored) - inputs - rejected - {whole["rejection_note"]} == current   # one current result
        assert sorted(stored[u] for u in current) == ["OT", "SEG", "SR"]
        seg_uid = next(u for u in current if stored[u] == "SEG")
        seg = pydicom.dcmread(io.BytesIO(client.request(
            "GET", f"/instances/{client.post_json('/tools/lookup', seg_uid)[0]['ID']}/file")))
        assert _referenced_uids(seg) & inputs == inputs       # made from every instance of the series

        # no loop: our results and the note made the study stable again, and nothing more was routed
        wait_for(lambda: any("HippoCrop series unchanged since routed" in line and f": {len(files)} instances" in line
                             for line in routing_lines()), 30, "the routing to see the new results", interval=0.2)
        time.sleep(settings.stable_age + 1.5)
        lines = routing_lines()
        sent_lines = [line for line in lines if "-> hippoai" in line]
        assert len(sent_lines) == 2, lines
        assert "(20 instances)" in sent_lines[0]
        assert f"({len(files)} instances, changed since routed with 20)" in sent_lines[1]
        assert any("unchanged since routed" in line and ": 20 instances" in line for line in lines), lines
        assert len([j for j in client.jobs() if j.get("Type") == "DicomModalityStore"]) == 2
        assert listener.status()["counts"]["studies_ok"] == 2
        assert whole["new_instances"] == len(files) - 20
        print(f"two-part routing test: {time.monotonic() - t_start:.1f} s (measuring {partial['seconds']:.1f} + "
              f"{whole['seconds']:.1f} s); total {partial['volumes']['total_mm3']:.0f} mm3 from 20 instances, "
              f"{whole['volumes']['total_mm3']:.0f} mm3 from {len(files)}")
    finally:
        if listener is not None:
            listener.stop(timeout=30)
        stop(proc)


def _raw(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
         auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    """One request with exactly these headers (``Host`` included when given: http.client then
    sends no other), as a browser or an attacker's page would send it."""
    import base64

    headers = dict(headers or {})
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.service
def test_http_access_needs_credentials_own_host_and_no_foreign_origin(pacs, tmp_path: Path) -> None:
    settings, proc, client, _, base = pacs
    port, auth = settings.http_port, next(iter(settings.users.items()))
    # a study of our own to attack (a single series, no HippoCrop: never routed)
    write_series(np.ones((8, 8, 2), np.uint16), np.eye(4), tmp_path / "victim", study=StudyInfo(seed=31),
                 series_description="T1 victim", series_number=2)
    files = sorted((tmp_path / "victim").rglob("*.dcm"))
    study_id = client.post_json("/instances", files[0].read_bytes())["ParentStudy"]
    dicom = files[1].read_bytes()

    # 1. without (or with wrong) credentials: 401 for everything, before any other rule
    for method, path, body in (("GET", "/system", None), ("DELETE", f"/studies/{study_id}", None),
                               ("POST", "/instances", dicom), ("POST", "/tools/shutdown", b""),
                               ("GET", "/dicom-web/studies", None)):
        assert _raw(port, method, path, body=body)[0] == 401, (method, path)
        assert _raw(port, method, path, body=body, auth=(auth[0], "wrong"))[0] == 401, (method, path)
    assert study_id in client.studies() and len(client.study(study_id)["Series"]) == 1
    assert len(client.instances(client.study(study_id)["Series"][0])) == 1      # the POST stored nothing

    # 2. with credentials, a page of another origin still cannot change anything (403), Orthanc keeps running
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    assert _raw(port, "POST", "/tools/shutdown", evil, b"", auth=auth)[0] == 403
    assert _raw(port, "DELETE", f"/studies/{study_id}", {"Origin": "http://evil.example"}, auth=auth)[0] == 403
    assert _raw(port, "POST", "/instances", evil, dicom, auth=auth)[0] == 403
    assert _raw(port, "POST", "/instances", {"Origin": "null"}, dicom, auth=auth)[0] == 403
    # Orthanc's method faking: a cross-site <img src=".../studies/ID?_method=DELETE"> is a DELETE
    assert _raw(port, "GET", f"/studies/{study_id}?_method=DELETE", {"Sec-Fetch-Site": "cross-site"}, auth=auth)[0] == 403
    assert _raw(port, "GET", f"/studies/{study_id}?_method=DELETE", {"Referer": "http://evil.example/x"},
                auth=auth)[0] == 403
    assert _raw(port, "POST", f"/studies/{study_id}", {"X-HTTP-Method-Override": "DELETE",
                                                       "Origin": "http://evil.example"}, b"", auth=auth)[0] == 403
    time.sleep(0.5)
    assert proc.poll() is None and client.system()["Name"] == settings.name
    assert study_id in client.studies() and len(client.instances(client.study(study_id)["Series"][0])) == 1
    # reading is allowed (the browser's same-origin policy keeps the answer from the page)
    assert _raw(port, "GET", "/system", {"Origin": "http://evil.example"}, auth=auth)[0] == 200

    # 3. DNS rebinding: any Host but Orthanc's own (and the viewer's, here none) is refused, even for GET
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", f"localhost.evil.example:{port}"):
        assert _raw(port, "GET", "/system", {"Host": host}, auth=auth)[0] == 403, host
        assert _raw(port, "GET", "/dicom-web/studies", {"Host": host}, auth=auth)[0] == 403, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        assert _raw(port, "GET", "/system", {"Host": host}, auth=auth)[0] == 200, host

    # 4. what stays allowed: Orthanc Explorer (its own origin) and non-browser clients
    own = {"Origin": f"http://localhost:{port}", "Sec-Fetch-Site": "same-origin", "Content-Type": "text/plain",
           "Referer": f"http://localhost:{port}/app/explorer.html", "Host": f"localhost:{port}"}
    status, body = _raw(port, "POST", "/tools/lookup", own, b"1.2.3.4.5.6.7.8.9", auth=auth)
    assert status == 200 and json.loads(body) == []
    assert _raw(port, "POST", "/instances", {"Content-Type": "application/dicom"}, dicom, auth=auth)[0] == 200
    assert _raw(port, "DELETE", f"/studies/{study_id}", auth=auth)[0] == 200
    assert study_id not in client.studies()
    refused = _log_lines(base, "HippoVolume access: refused")
    assert any("unexpected Host header" in line for line in refused)
    assert any("POST /tools/shutdown: cross-origin POST (Origin)" in line for line in refused)
    assert any("(Sec-Fetch-Site)" in line for line in refused) and any("(Referer)" in line for line in refused)
    assert not any(auth[1] in line for line in orth.tail(base / orth.LOG_NAME, 100_000).splitlines())
    assert proc.poll() is None


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
    creds = tmp_path.resolve() / "network/orthanc/credentials.json"
    assert vcmd[3:] == ["--host", "127.0.0.1", "--port", str(net.viewer["port"]), "--dist",
                        str(tmp_path.resolve() / "network/ohif/dist"), "--orthanc", net.orthanc.http_url,
                        "--orthanc-credentials", str(creds)]
    # Orthanc routes to the listener's port and AE; DICOMweb links point at the viewer's origin
    assert net.orthanc.modalities["hippoai"] == {"aet": "HIPPOAI", "host": "127.0.0.1", "port": net.listener["port"], "allow_move": False}
    assert net.orthanc.dicomweb_host == f"127.0.0.1:{net.viewer['port']}" and net.orthanc.stable_age == 2
    # credentials by default (a service account; nothing written before `up`); the proxy's Host accepted
    assert net.authentication and list(net.orthanc.users) == ["hippo"] and not creds.exists()
    assert password_not_in(net.orthanc.users["hippo"], lcmd + vcmd)
    vport = net.viewer["port"]
    assert net.orthanc.accepted_hosts == sorted({f"127.0.0.1:{net.orthanc.http_port}", f"localhost:{net.orthanc.http_port}",
                                                 f"127.0.0.1:{vport}", f"localhost:{vport}"})
    more = _network(tmp_path, "orthanc.users.alice=pw", "orthanc.allowed_hosts=[pacs.example.org:8042]",
                    "viewer.allowed_hosts=[viewer.example.org:3000]")
    assert set(more.orthanc.users) == {"hippo", "alice"}
    assert {"pacs.example.org:8042", "viewer.example.org:3000"} <= set(more.orthanc.accepted_hosts)
    assert more.viewer_command()[-2:] == ["--allow-host", "viewer.example.org:3000"]
    off = _network(tmp_path, "orthanc.authentication=false")
    assert off.orthanc.users == {} and "--orthanc-credentials" not in off.viewer_command()
    with pytest.raises(ValueError, match="authentication is false"):
        _network(tmp_path, "orthanc.authentication=false", "orthanc.users.alice=pw")
    with pytest.raises(ValueError, match="service account"):
        _network(tmp_path, "orthanc.users.hippo=pw")
    # a broken credentials file: `down`/`status` still work, `up` says what is wrong
    from hippo.network.stack import NetworkError

    creds.parent.mkdir(parents=True)
    creds.write_text("{broken")
    broken = _network(tmp_path)
    assert broken.down()["orthanc"] == "not running" and broken.status()["up"] is False
    with pytest.raises(NetworkError, match="credentials file"):
        broken.up(only=["orthanc"])
    assert not broken.state_path.exists() or not broken.read_state()["processes"]


def password_not_in(password: str, argv: list[str]) -> bool:
    return not any(password in a for a in argv)


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
        # the REST API needs the generated credentials (stored 0600), which `status` uses
        creds_file = tmp_path / "network/orthanc/credentials.json"
        assert status["credentials"] == str(creds_file) and creds_file.stat().st_mode & 0o777 == 0o600
        assert status["services"]["orthanc"]["rest"] == "ok"
        user, password = read_credentials(creds_file)
        assert OrthancClient(net.orthanc.http_url, auth=(user, password)).system()["Name"] == net.orthanc.name
        assert net.orthanc_client().system()["Name"] == net.orthanc.name
        with pytest.raises(OrthancError, match="HTTP 401"):
            OrthancClient(net.orthanc.http_url).system()
        assert (tmp_path / "network/orthanc/orthanc.json").stat().st_mode & 0o777 == 0o600
        assert password not in json.dumps(state)                    # not in any recorded command line
        # `up` again starts only what is not running: the same Orthanc process is kept
        again = net.up(only=["orthanc"])
        assert again["services"]["orthanc"]["running"] and net.read_state()["processes"]["orthanc"]["pid"] == pid
    finally:
        result = net.down()
    assert result["orthanc"] == "stopped"
    assert not orth.pid_alive(pid) and not orth.group_alive(pid) and not net.state_path.exists()
    assert not port_in_use(net.orthanc.http_port) and not port_in_use(net.orthanc.dicom_port)
    assert net.down()["orthanc"] == "not running"  # idempotent
    assert net.status()["up"] is False and "rest" not in net.status()["services"]["orthanc"]

    # a later `up` (a new process: a new Network object) reuses the stored credentials
    again = _network(tmp_path)
    assert again.orthanc.users == {user: password}
    again.up(only=["orthanc"])
    try:
        assert read_credentials(creds_file) == (user, password)
        assert OrthancClient(again.orthanc.http_url, auth=(user, password)).system()["Name"] == again.orthanc.name
        from hippo.network.__main__ import main as network_main

        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = network_main(["status", "--set", f"paths.log_dir={tmp_path}",
                               "--set", f"orthanc.dicom_port={again.orthanc.dicom_port}",
                               "--set", f"orthanc.http_port={again.orthanc.http_port}"])
        assert rc == 0 and "REST API: ok" in out.getvalue() and str(creds_file) in out.getvalue()
        assert password not in out.getvalue()
    finally:
        again.down()
