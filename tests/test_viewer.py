"""hippo.network.viewer: app-config.js, the same-origin DICOMweb proxy, static files, fetch_ohif.

The unit tests run a fake "Orthanc" (a tiny HTTP server on loopback) and the viewer in-process.
The ``service`` test starts a real Orthanc (Debian package, DICOMweb plugin), uploads a synthetic
study with its SC/SEG/SR, serves the real OHIF build and looks at it with headless Chromium.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from hippo.network import viewer
from hippo.network.viewer import (
    OhifFetchError,
    app_config_js,
    fetch_ohif,
    make_server,
    normalize_accept,
    normalize_query,
)
from hippo.network.orthanc import free_port as _free_port

REPO = Path(__file__).resolve().parents[1]


def _config_object(js: str) -> dict:
    """The JSON object literal assigned to ``window.config``."""
    m = re.search(r"window\.config = (\{.*\});\s*$", js, flags=re.S)
    assert m, js[:200]
    return json.loads(m.group(1))


# ----------------------------------------------------------------------------------------------
# app-config.js and the header/query rewriting


def test_app_config_points_ohif_at_the_same_origin_proxy():
    js = app_config_js()
    assert js.startswith("/** @type {AppTypes.Config} */")
    cfg = _config_object(js)
    assert cfg["showStudyList"] is True and cfg["routerBasename"] == "/"
    assert cfg["investigationalUseDialog"] == {"option": "always"}
    (source,) = cfg["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    assert cfg["defaultDataSourceName"] == source["sourceName"]
    c = source["configuration"]
    assert c["qidoRoot"] == c["wadoRoot"] == c["wadoUriRoot"] == "/dicom-web"
    expected = {
        "qidoSupportsIncludeField": False, "imageRendering": "wadors", "thumbnailRendering": "wadors",
        "supportsWildcard": True, "omitQuotationForMultipartRequest": True, "staticWado": False,
        "enableStudyLazyLoad": True, "supportsFuzzyMatching": False, "dicomUploadEnabled": False,
    }
    assert {k: c[k] for k in expected} == expected
    assert c["bulkDataURI"]["enabled"] is True
    assert app_config_js() == js                                    # deterministic


def test_app_config_options_and_bad_values():
    cfg = _config_object(app_config_js(dicomweb_root="/pacs/dicom-web/", investigational_use_dialog="never",
                                       extra={"disableConfirmationPrompts": True}))
    c = cfg["dataSources"][0]["configuration"]
    assert c["qidoRoot"] == "/pacs/dicom-web"
    assert cfg["investigationalUseDialog"] == {"option": "never"} and cfg["disableConfirmationPrompts"] is True
    with pytest.raises(ValueError, match="investigational_use_dialog"):
        app_config_js(investigational_use_dialog="sometimes")


@pytest.mark.parametrize("given, expected", [
    ("application/dicom+json", "application/dicom+json"),
    # kept: the 1.7 plugin honours transfer-syntax=* (stored syntax, e.g. JPEG 2000), and without it
    # has to transcode to Explicit VR Little Endian, which fails for syntaxes it cannot decode
    ("multipart/related; type=application/octet-stream; transfer-syntax=*",
     "multipart/related; type=application/octet-stream; transfer-syntax=*"),
    ("multipart/related;type=application/octet-stream;transfer-syntax=*",
     "multipart/related; type=application/octet-stream; transfer-syntax=*"),
    # 1.7 reads a list of ranges as one (the last type wins): keep the client's first choice
    ("multipart/related; type=application/octet-stream; transfer-syntax=*, "
     "multipart/related; type=image/jls; transfer-syntax=1.2.840.10008.1.2.4.80",
     "multipart/related; type=application/octet-stream; transfer-syntax=*"),
    ("application/dicom+json, application/json", "application/dicom+json, application/json"),
])
def test_normalize_accept(given, expected):
    assert normalize_accept(given) == expected


@pytest.mark.parametrize("given, expected", [
    ("", ""),
    ("limit=101&offset=0", "limit=101&offset=0"),
    ("includefield=00081030%2C00080060&limit=1", "includefield=00081030&includefield=00080060&limit=1"),
    ("includefield=0008103E,00080021", "includefield=0008103E&includefield=00080021"),
    ("includefield=all", "includefield=all"),
    ("PatientName=*Smith*&includefield=00081030", "PatientName=*Smith*&includefield=00081030"),
])
def test_normalize_query_splits_comma_separated_includefield(given, expected):
    assert normalize_query(given) == expected


# ----------------------------------------------------------------------------------------------
# A fake upstream ("Orthanc") and the viewer, in-process


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests: list = []
    release: threading.Event
    second_sent: threading.Event

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        type(self).requests.append((self.command, self.path, dict(self.headers.items())))
        path = self.path.split("?")[0]
        if path == "/dicom-web/studies/echo":
            body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
            self._send(200, body, "application/dicom+json",
                       {"Set-Cookie": "orthanc=secret", "X-Upstream-Secret": "1", "Content-Disposition": "inline"})
        elif path.startswith("/dicom-web/studies/status/"):
            code = int(path.rsplit("/", 1)[1])
            extra = {"WWW-Authenticate": 'Basic realm="Orthanc Secure Area"'} if code == 401 else None
            self._send(code, f"status {code}".encode(), "text/plain", extra)
        elif path == "/dicom-web/studies/big":
            self._send(200, _big_body(), "multipart/related; type=\"application/octet-stream\"; boundary=b")
        elif path == "/dicom-web/studies/stream":
            # chunked, no Content-Length; the second chunk waits until the test has read the first
            self.send_response(200)
            self.send_header("Content-Type", "multipart/related; boundary=s")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i, chunk in enumerate((b"first-part|", b"second-part")):
                if i == 1:
                    type(self).release.wait(5)
                    type(self).second_sent.set()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(404, b"no such resource", "application/json")


def _big_body() -> bytes:
    return (np.arange(3 * 2**20, dtype=np.uint32) * 2654435761 % 251).astype(np.uint8).tobytes()


@contextlib.contextmanager
def _serving(server) -> Iterator:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


@pytest.fixture
def dist(tmp_path) -> Path:
    d = tmp_path / "dist"
    (d / "assets").mkdir(parents=True)
    (d / "index.html").write_text("<!doctype html><title>OHIF index</title>")
    (d / "app-config.js").write_text("window.config = {shipped: true};")
    files = {"app.bundle.1234.js": b"console.log(1)", "main.css": b"body{}", "decoder.wasm": b"\0asm\1\0\0\0",
             "manifest.json": b"{}", "ohif-logo.svg": b"<svg/>", "font.woff2": b"wOF2", "assets/icon.png": b"\x89PNG"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    (tmp_path / "secret.txt").write_text("outside the dist")
    return d


@pytest.fixture
def upstream() -> Iterator[type]:
    handler = type("Upstream", (_Upstream,), {"requests": [], "release": threading.Event(),
                                            "second_sent": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    with _serving(server):
        handler.url = f"http://127.0.0.1:{server.server_address[1]}"
        yield handler
    handler.release.set()


@pytest.fixture
def site(dist, upstream) -> Iterator[viewer.ViewerServer]:
    server = make_server("127.0.0.1", 0, dist=dist, orthanc_url=upstream.url)
    with _serving(server):
        yield server


def _get(server, path: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    """One raw request (http.client sends the path exactly as given: no normalisation of ``..``)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=20)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------
# The proxy


def test_proxy_passes_only_accept_and_content_type(site, upstream):
    status, headers, body = _get(site, "/dicom-web/studies/echo?limit=5&includefield=00081030,00080060", {
        "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*, "
                  "multipart/related; type=image/jls",
        "Cookie": "session=abc", "Authorization": "Bearer xyz", "User-Agent": "test-agent",
        "X-Forwarded-For": "10.0.0.1", "Accept-Encoding": "gzip", "Origin": "http://evil.example",
        "Referer": "http://127.0.0.1/viewer?PatientName=Doe"})
    assert status == 200
    assert headers["content-type"] == "application/dicom+json"
    for name in ("set-cookie", "x-upstream-secret", "content-disposition"):
        assert name not in headers
    echo = json.loads(body)
    received = {k.lower(): v for k, v in echo["headers"].items()}
    assert set(received) == {"host", "accept"}
    assert received["accept"] == "multipart/related; type=application/octet-stream; transfer-syntax=*"
    # the viewer's own origin: Orthanc then writes BulkDataURIs that point back at the proxy
    assert received["host"] == f"127.0.0.1:{site.server_address[1]}"
    assert echo["path"] == "/dicom-web/studies/echo?limit=5&includefield=00081030&includefield=00080060"


def test_proxy_relays_status_codes_and_bodies(site):
    for code in (400, 401, 404, 500, 503):
        status, headers, body = _get(site, f"/dicom-web/studies/status/{code}")
        assert (status, body) == (code, f"status {code}".encode())
        assert headers["content-type"] == "text/plain"
    status, _, body = _get(site, "/dicom-web/studies/nothing-here")
    assert status == 404 and body == b"no such resource"


def test_proxy_streams_large_and_chunked_bodies(site, upstream):
    status, headers, body = _get(site, "/dicom-web/studies/big")
    assert status == 200 and body == _big_body()
    assert headers["content-length"] == str(len(body))
    assert headers["content-type"].startswith("multipart/related")

    # the first chunk reaches the client while the upstream still holds back the second one
    conn = http.client.HTTPConnection(*site.server_address[:2], timeout=10)
    try:
        conn.request("GET", "/dicom-web/studies/stream")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.read(len(b"first-part|")) == b"first-part|"
        assert not upstream.second_sent.is_set()     # not buffered until the upstream finished
        upstream.release.set()
        assert resp.read() == b"second-part"
    finally:
        conn.close()


def test_proxy_head_read_only_and_unreachable_upstream(site, dist):
    status, headers, body = _get(site, "/dicom-web/studies/big", method="HEAD")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(_big_body()))
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = _get(site, "/dicom-web/studies", method=method)
        assert status == 405 and headers["allow"] == "GET, HEAD"
    closed = make_server("127.0.0.1", 0, dist=dist, orthanc_url=f"http://127.0.0.1:{_free_port()}")
    with _serving(closed):
        status, _, body = _get(closed, "/dicom-web/studies")
    assert status == 502 and b"unreachable" in body


@pytest.mark.parametrize("path", [
    "/dicom-web/../system", "/dicom-web/%2e%2e/tools/find", "/dicom-web/%2E%2E%2Fsystem",
    "/dicom-web/studies/..%2f..%2finstances", "/dicom-web/studies/a%5cb", "/dicom-web/studies/%00",
])
def test_proxy_refuses_to_leave_dicom_web(site, upstream, path):
    status, _, _ = _get(site, path)
    assert status == 400
    assert upstream.requests == []


# ----------------------------------------------------------------------------------------------
# Access: the Host header, credentials added by the proxy, nothing that writes or leaves DICOMweb


def test_only_its_own_host_is_answered(site, upstream):
    port = site.server_address[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", f"localhost:{port}.evil.example",
                 f"127.0.0.1.evil.example:{port}", ""):
        for path in ("/", "/viewer?StudyInstanceUIDs=1.2", "/app-config.js", "/index.html",
                     "/dicom-web/studies/echo", "/dicom-web/studies?limit=1"):
            status, _, body = _get(site, path, {"Host": host})
            assert status == 421 and b"Host" in body, (host, path, status)
        assert _get(site, "/dicom-web/studies", {"Host": host}, method="POST")[0] == 421
    assert upstream.requests == []                       # nothing reached Orthanc
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}"):
        assert _get(site, "/", {"Host": host})[0] == 200
        status, _, body = _get(site, "/dicom-web/studies/echo", {"Host": host})
        assert status == 200
        # the Host forwarded to Orthanc is the accepted one (so Orthanc's filter must accept it too)
        assert json.loads(body)["headers"]["Host"] == host.lower()


def test_proxy_refuses_method_override_other_resources_and_cross_site_requests(site, upstream):
    for query in ("_method=DELETE", "limit=1&_method=delete", "%5Fmethod=DELETE", "_METHOD=POST", "_method",
                  "a=1&%5f%6d%65%74%68%6f%64=PUT"):
        status, _, body = _get(site, f"/dicom-web/studies/echo?{query}")
        assert status == 400 and b"_method" in body, query
    for path in ("/dicom-web", "/dicom-web/", "/dicom-web/servers", "/dicom-web/servers/remote/stow",
                 "/dicom-web/info", "/dicom-web/studiesx"):
        assert _get(site, path)[0] == 404, path
    for site_value in ("cross-site", "same-site", "Cross-Site"):
        status, _, body = _get(site, "/dicom-web/studies/echo", {"Sec-Fetch-Site": site_value})
        assert status == 403 and b"cross-site" in body, site_value
    assert upstream.requests == []
    # OHIF's own fetches (same-origin) and a typed-in address (none) go through; so does a deep link
    # opened from another site (navigation: only /dicom-web/ is guarded)
    for site_value in ("same-origin", "none"):
        assert _get(site, "/dicom-web/studies/echo", {"Sec-Fetch-Site": site_value})[0] == 200
    assert _get(site, "/viewer?StudyInstanceUIDs=1.2", {"Sec-Fetch-Site": "cross-site"})[0] == 200
    assert len(upstream.requests) == 2


def test_proxy_adds_its_own_credentials_and_never_forwards_the_browsers(dist, upstream):
    server = make_server("127.0.0.1", 0, dist=dist, orthanc_url=upstream.url, orthanc_auth=("hippo", "s3cret"))
    with _serving(server):
        status, headers, body = _get(server, "/dicom-web/studies/echo", {
            "Accept": "application/dicom+json", "Authorization": "Basic ZXZpbDpldmls", "Cookie": "a=b"})
        assert status == 200
        received = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
        assert set(received) == {"host", "accept", "authorization"}
        assert received["authorization"] == "Basic " + base64.b64encode(b"hippo:s3cret").decode()
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cross-origin-resource-policy"] == "same-origin"
        assert b"s3cret" not in body.replace(received["authorization"].encode(), b"")
        # Orthanc refusing the proxy's credentials: the status, but no browser login prompt
        status, headers, _ = _get(server, "/dicom-web/studies/status/401")
        assert status == 401 and "www-authenticate" not in headers
        # static files and app-config.js never carry the credentials
        for path in ("/", "/app-config.js"):
            assert b"s3cret" not in _get(server, path)[2]


def test_command_line_reads_the_credentials_from_a_file(dist, upstream, tmp_path):
    from hippo.network.orthanc import ensure_credentials

    creds = tmp_path / "orthanc" / "credentials.json"
    user, password = ensure_credentials(creds)
    port = _free_port()
    cmd = [sys.executable, "-m", "hippo.network.viewer", "--port", str(port), "--dist", str(dist),
           "--orthanc", upstream.url, "--orthanc-credentials", str(creds), "--allow-host", f"viewer.example:{port}"]
    assert not any(password in a for a in cmd)             # never on the command line (`ps` shows it)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        site = type("S", (), {"server_address": ("127.0.0.1", port)})()
        status = None
        for _ in range(100):
            try:
                status, _, body = _get(site, "/dicom-web/studies/echo", {"Host": f"viewer.example:{port}"})
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else status
        auth = json.loads(body)["headers"]["Authorization"]
        assert base64.b64decode(auth.split()[1]).decode() == f"{user}:{password}"
        assert _get(site, "/", {"Host": f"other.example:{port}"})[0] == 421
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and password not in out
    bad = subprocess.run([sys.executable, "-m", "hippo.network.viewer", "--port", "0", "--dist", str(dist),
                          "--orthanc-credentials", str(tmp_path / "absent.json")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "credentials file not found" in bad.stderr


# ----------------------------------------------------------------------------------------------
# Static files, the generated config and the single-page-app fallback


@pytest.mark.parametrize("path, ctype", [
    ("/app.bundle.1234.js", "application/javascript"), ("/main.css", "text/css"), ("/decoder.wasm", "application/wasm"),
    ("/manifest.json", "application/json"), ("/ohif-logo.svg", "image/svg+xml"), ("/font.woff2", "font/woff2"),
    ("/assets/icon.png", "image/png"), ("/index.html", "text/html"),
])
def test_static_files_have_their_mime_types(site, dist, path, ctype):
    status, headers, body = _get(site, path)
    assert status == 200
    assert headers["content-type"].split(";")[0] == ctype
    assert body == (dist / path.lstrip("/")).read_bytes()
    assert headers["content-length"] == str(len(body))


def test_generated_app_config_replaces_the_shipped_one(site):
    status, headers, body = _get(site, "/app-config.js")
    assert status == 200 and headers["content-type"].startswith("application/javascript")
    assert b"shipped" not in body and body.decode() == app_config_js()
    assert headers["cache-control"] == "no-cache"


@pytest.mark.parametrize("path", ["/", "/viewer?StudyInstanceUIDs=1.2.3", "/viewer/dicomweb?StudyInstanceUIDs=1.2.3",
                                  "/segmentation", "/assets", "/local/"])
def test_deep_links_fall_back_to_index_html(site, path):
    status, headers, body = _get(site, path)
    assert status == 200 and b"OHIF index" in body
    assert headers["content-type"].startswith("text/html")


def test_missing_files_are_404_not_index(site):
    for path in ("/missing.js", "/assets/nothing.png", "/1234.bundle.abc.js"):
        status, _, body = _get(site, path)
        assert status == 404 and b"OHIF index" not in body


@pytest.mark.parametrize("path", [
    "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/assets/%2e%2e/%2e%2e/secret.txt", "/..%2fsecret.txt",
    "/%2E%2E/secret.txt", "/assets/..\\..\\secret.txt", "/assets/%5c..%5csecret.txt", "/./index.html", "/%00",
    "/%ff%fe",
])
def test_path_traversal_is_refused(site, path):
    status, _, body = _get(site, path)
    assert status == 400
    assert b"outside the dist" not in body and b"root:" not in body


def test_symlink_out_of_dist_is_refused(site, dist, tmp_path):
    (dist / "escape.txt").symlink_to(tmp_path / "secret.txt")
    status, _, body = _get(site, "/escape.txt")
    assert status == 400 and b"outside the dist" not in body


def test_request_log_never_contains_the_query(site, caplog):
    caplog.set_level(logging.DEBUG, logger="hippo.network.viewer")
    _get(site, "/dicom-web/studies/echo?PatientName=Doe^Jane")
    _get(site, "/viewer?PatientName=Doe^Jane")
    assert "/dicom-web/studies/echo" in caplog.text and "Doe" not in caplog.text


def test_make_server_needs_a_dist(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.html"):
        make_server("127.0.0.1", 0, dist=tmp_path)
    (tmp_path / "index.html").write_text("x")
    with pytest.raises(ValueError, match="orthanc_url"):
        make_server("127.0.0.1", 0, dist=tmp_path, orthanc_url="ftp://pacs")


def test_command_line_serves_and_stops_on_sigterm(dist, tmp_path):
    port = _free_port()
    written = tmp_path / "written-config.js"
    proc = subprocess.Popen([sys.executable, "-m", "hippo.network.viewer", "--port", str(port), "--dist", str(dist),
                             "--orthanc", "http://127.0.0.1:9", "--investigational-dialog", "never",
                             "--write-config", str(written)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = None
        for _ in range(100):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/app-config.js", timeout=2).read().decode()
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
        assert body is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert _config_object(body)["investigationalUseDialog"] == {"option": "never"}
        assert written.read_text() == body
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out


def test_command_line_reports_a_missing_dist(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hippo.network.viewer", "--port", "0", "--dist", str(tmp_path / "no")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no OHIF viewer" in proc.stderr


# ----------------------------------------------------------------------------------------------
# fetch_ohif


def _npm_tarball(path: Path, *, evil: bool = False) -> Path:
    def add(tar, name, data=b""):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz") as tar:
        add(tar, "package/package.json", b'{"name": "@ohif/app"}')
        add(tar, "package/dist/index.html", b"<html>ohif</html>")
        add(tar, "package/dist/app.bundle.js", b"js")
        add(tar, "package/dist/assets/logo.svg", b"<svg/>")
        add(tar, "package/src/ignored.ts", b"ts")
        if evil:
            add(tar, "package/dist/../../escaped.txt", b"bad")
    return path


def test_fetch_ohif_extracts_dist_from_a_tarball_and_reuses_it(tmp_path):
    tgz = _npm_tarball(tmp_path / "ohif-app-9.9.9.tgz")
    dest = tmp_path / "ohif" / "dist"
    assert fetch_ohif("9.9.9", dest, tarball=tgz) == dest
    assert (dest / "index.html").read_bytes() == b"<html>ohif</html>"
    assert (dest / "assets" / "logo.svg").is_file() and not (dest / "package.json").exists()
    assert not (dest / "src").exists()
    (dest / "index.html").write_text("kept")                       # reused, not re-extracted
    fetch_ohif("9.9.9", dest, tarball=tgz, npm="no-such-npm-here")
    assert (dest / "index.html").read_text() == "kept"
    fetch_ohif("9.9.10", dest, tarball=tgz)                         # another version replaces it
    assert (dest / "index.html").read_bytes() == b"<html>ohif</html>"
    assert [p.name for p in dest.parent.iterdir()] == ["dist"]      # no staging leftovers


def test_fetch_ohif_refuses_unsafe_tarballs_and_foreign_dirs(tmp_path):
    with pytest.raises(OhifFetchError, match="unsafe path"):
        fetch_ohif("1.0.0", tmp_path / "a", tarball=_npm_tarball(tmp_path / "evil.tgz", evil=True))
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "a").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OhifFetchError, match="not made by fetch_ohif"):
        fetch_ohif("1.0.0", foreign, tarball=_npm_tarball(tmp_path / "ok.tgz"))
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not an npm version"):
        fetch_ohif("1.0; rm -rf /", tmp_path / "b")


def test_fetch_ohif_without_npm_says_so(tmp_path):
    with pytest.raises(OhifFetchError, match="npm not found"):
        fetch_ohif("3.13.2", tmp_path / "dist", npm="no-such-npm-here")


# ----------------------------------------------------------------------------------------------
# The real thing: Orthanc + OHIF + headless Chromium

OHIF_DIST = Path(os.environ.get("HIPPO_OHIF_DIST", REPO / "outputs" / "network" / "ohif" / "dist"))
DICOMWEB_PLUGIN_CANDIDATES = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                              "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                              "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so"]


def _dicomweb_plugin() -> str | None:
    import glob

    for pattern in DICOMWEB_PLUGIN_CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class _Orthanc:
    """A throw-away Orthanc configured as ``hippo.network`` runs it (:mod:`hippo.network.orthanc`):
    HTTP Basic authentication with generated credentials (``root/credentials.json``), the Lua access
    filter accepting its own Host and the viewer's (``viewer_port``), DICOMweb links at the viewer."""

    def __init__(self, root: Path, plugin: str, viewer_port: int):
        from hippo.network import orthanc as orth

        self.orth = orth
        self.root = root
        self.credentials = root / "credentials.json"
        auth = orth.ensure_credentials(self.credentials)
        self.settings = orth.OrthancSettings(
            dicom_port=_free_port(), http_port=_free_port(), route_to=None, modalities={}, name="HIPPOTEST",
            plugins_dir=Path(plugin).parent, dicomweb_host=f"127.0.0.1:{viewer_port}",
            allowed_hosts=[f"127.0.0.1:{viewer_port}", f"localhost:{viewer_port}"], users=dict([auth]))
        self.url = self.settings.http_url
        self.proc = orth.start_orthanc(self.settings, root)
        try:
            orth.wait_ready(self.url, 30, proc=self.proc, name="HIPPOTEST", auth=auth, log_file=root / orth.LOG_NAME)
        except orth.OrthancError:
            self.stop()
            raise
        self.client = orth.OrthancClient(self.url, timeout=30, auth=auth)

    def upload(self, path: Path) -> dict:
        return json.loads(self.client.request("POST", "/instances", Path(path).read_bytes(), "application/dicom"))

    def stop(self) -> None:
        self.orth.stop(self.proc)


class _OracleAgent:
    """Stands in for the model: returns the true label, so the SC/SEG/SR are made without torch weights."""

    def __init__(self, label: np.ndarray):
        self.label = label
        self.metadata = {"hippo_version": "test", "path": "oracle", "created": "test", "metrics": {}, "training": {}}

    def segment(self, volume):
        assert volume.shape == self.label.shape
        return self.label


def _orthanc_with_host(orthanc: "_Orthanc", host: str) -> None:
    """GET /system on Orthanc with the right credentials but a foreign Host header."""
    user, password = orthanc.orth.read_credentials(orthanc.credentials)
    conn = http.client.HTTPConnection("127.0.0.1", orthanc.settings.http_port, timeout=10)
    try:
        conn.request("GET", "/system", headers={
            "Host": host, "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
        status = conn.getresponse().status
    finally:
        conn.close()
    if status != 200:
        raise orthanc.orth.OrthancError(f"GET /system with Host {host}: HTTP {status}", status)


def _chrome(browser: str, profile: Path, url: str, *, screenshot: Path | None = None, timeout: float = 180,
            budget_ms: int = 40000) -> str:
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1400,900", f"--virtual-time-budget={budget_ms}"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    proc = subprocess.run(args + [url], capture_output=True, text=True, timeout=timeout)
    if screenshot:
        assert screenshot.is_file(), proc.stderr[-2000:]
    return proc.stdout


def _gray(png: Path) -> np.ndarray:
    from PIL import Image

    img = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert img.shape == (900, 1400)
    return img


def _viewport_stats(png: Path) -> tuple[float, float]:
    """Mean and standard deviation of the grey levels inside the image viewport area."""
    region = _gray(png)[200:780, 420:1250]      # below the toolbar and tour tips, above the banner
    return float(region.mean()), float(region.std())


@pytest.mark.service
@pytest.mark.timeout(600)
def test_ohif_shows_the_study_list_and_images_from_orthanc(tmp_path):
    plugin = _dicomweb_plugin()
    browser = _chromium()
    missing = [name for name, ok in (("Orthanc", shutil.which("Orthanc")), ("chromium", browser),
                                     ("Orthanc DICOMweb plugin (orthanc-dicomweb)", plugin)) if not ok]
    if not (OHIF_DIST / "index.html").is_file() and not shutil.which("npm"):
        missing.append(f"npm (no OHIF build cached at {OHIF_DIST})")
    if missing:
        pytest.skip("needs " + ", ".join(missing))
    dist = fetch_ohif(viewer.DEFAULT_OHIF_VERSION, OHIF_DIST)

    import pydicom

    from hippo.data.nifti import load_nifti
    from hippo.data.synthetic import generate_dataset
    from hippo.deploy.pipeline import StudyProcessor
    from hippo.scanner import write_study

    data = generate_dataset(tmp_path / "data", n_cases=1)
    image = sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    label_path = data / "labelsTr" / image.name
    manifest = write_study(image, tmp_path / "study", label_path=label_path, seed=3)
    label, _, _ = load_nifti(label_path)
    outcome = StudyProcessor(_OracleAgent(label.astype(np.uint8)), tmp_path / "results").process(tmp_path / "study")
    assert outcome.status == "ok", outcome.error

    viewer_port = _free_port()
    orthanc = _Orthanc(tmp_path / "orthanc", plugin, viewer_port)
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())   # type: ignore[method-assign]
    vlog = logging.getLogger("hippo.network.viewer")
    old_level = vlog.level
    vlog.addHandler(handler)
    vlog.setLevel(logging.DEBUG)
    try:
        files = [Path(p) for paths in manifest["files"].values() for p in paths]
        files += [Path(outcome.files[k]) for k in ("report_sc", "seg", "sr")]
        for f in files:
            assert orthanc.upload(f)["Status"] == "Success"
        seg_uid = pydicom.dcmread(outcome.files["seg"], stop_before_pixels=True).SeriesInstanceUID

        # authentication on: Orthanc refuses the browser's direct calls; the proxy adds the
        # credentials it read from the file (the browser never sees them)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{orthanc.url}/dicom-web/studies", timeout=10)
        assert refused.value.code == 401
        server = make_server("127.0.0.1", viewer_port, dist=dist, orthanc_url=orthanc.url,
                             orthanc_auth=viewer.read_orthanc_credentials(orthanc.credentials))
        with _serving(server):
            base = server.url
            study_uid = manifest["study_instance_uid"]
            with urllib.request.urlopen(f"{base}/dicom-web/studies?StudyInstanceUID={study_uid}", timeout=30) as r:
                assert len(json.loads(r.read())) == 1
            # a foreign Host (DNS rebinding) is refused by the viewer and, direct, by Orthanc
            conn = http.client.HTTPConnection("127.0.0.1", viewer_port, timeout=10)
            conn.request("GET", "/dicom-web/studies", headers={"Host": f"evil.example:{viewer_port}"})
            assert conn.getresponse().status == 421
            conn.close()
            with pytest.raises(orthanc.orth.OrthancError, match="HTTP 403"):
                _orthanc_with_host(orthanc, "evil.example")
            _orthanc_with_host(orthanc, f"localhost:{viewer_port}")     # the proxy's Host is accepted
            records.clear()                                    # from here on every proxied request must succeed
            shots = tmp_path / "shots"
            shots.mkdir()

            # 1. the study list (the Debian plugin's QIDO, through the proxy) renders our study's row
            # (booleans first: a failing `x in dom` would print the page, patient name included)
            dom = _chrome(browser, tmp_path / "p1", base + "/")
            has_row = manifest["accession_number"] in dom
            has_description = "MRI BRAIN HIPPOCAMPUS" in dom
            has_banner = "investigational use" in dom                      # OHIF's first-visit banner
            assert has_row, "study row missing from the study list"
            assert has_description, "study description missing (includefield rewriting)"
            assert has_banner, "no investigational-use banner"
            _chrome(browser, tmp_path / "p2", base + "/", screenshot=shots / "list.png")
            assert _gray(shots / "list.png").std() > 5.0                   # not a blank page

            # 2. the viewer (an SPA deep link) shows the series and draws pixels fetched as frames
            viewer_url = f"{base}/viewer?StudyInstanceUIDs={study_uid}"
            dom = _chrome(browser, tmp_path / "p3", viewer_url)
            missing = [d for d in ("HippoCrop", "T1 MPRAGE full brain", "AI hippocampus segmentation, research use")
                       if d not in dom]
            assert not missing, f"series missing from the viewer: {missing}"
            _chrome(browser, tmp_path / "p3", viewer_url, screenshot=shots / "viewer.png")
            mean, std = _viewport_stats(shots / "viewer.png")
            assert std > 10.0 and mean > 5.0, f"viewport looks empty (mean {mean:.1f}, std {std:.1f})"
            assert any("/frames/" in r and r.endswith(" 200") for r in records), "no pixel frame went through the proxy"

            # 3. opening the SEG fetches it whole through the proxy (OHIF then offers to overlay it)
            _chrome(browser, tmp_path / "p3", f"{viewer_url}&initialSeriesInstanceUID={seg_uid}",
                    screenshot=shots / "seg.png")
            assert any(f"/series/{seg_uid}/instances/" in r and r.endswith(" 200") for r in records), \
                "the SEG instance was not retrieved"

        proxied = [r for r in records if " /dicom-web/" in r]
        failed = [r for r in proxied if not r.endswith(" 200")]
        assert proxied and not failed, failed[:5]
    finally:
        vlog.removeHandler(handler)
        vlog.setLevel(old_level)
        orthanc.stop()
