"""The real-data downloader, tested offline: safe extraction, MD5, unreachable URL, loopback server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path
from typing import Iterator

import pytest

from hippo.data import download as dl


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _decathlon_tar(path: Path) -> Path:
    """A miniature Task04_Hippocampus.tar, with the macOS ``._`` files the real one carries."""
    with tarfile.open(path, "w") as tar:
        _add_dir(tar, "Task04_Hippocampus")
        _add(tar, "Task04_Hippocampus/dataset.json", b'{"name": "Hippocampus"}')
        _add(tar, "Task04_Hippocampus/imagesTr/hippocampus_001.nii.gz", b"image")
        _add(tar, "Task04_Hippocampus/imagesTr/._hippocampus_001.nii.gz", b"resource fork")
        _add(tar, "Task04_Hippocampus/labelsTr/hippocampus_001.nii.gz", b"label")
        _add(tar, "Task04_Hippocampus/._dataset.json", b"resource fork")
    return path


def test_safe_extract_skips_resource_forks(tmp_path: Path) -> None:
    archive = _decathlon_tar(tmp_path / "a.tar")
    files = dl.safe_extract(archive, tmp_path / "out")
    root = tmp_path / "out" / "Task04_Hippocampus"
    assert (root / "imagesTr" / "hippocampus_001.nii.gz").read_bytes() == b"image"
    assert not list((tmp_path / "out").rglob("._*"))
    assert len(files) == 3


@pytest.mark.parametrize("evil", ["../evil", "Task04_Hippocampus/../../evil", "/tmp/evil_abs"])
def test_safe_extract_rejects_escaping_members(tmp_path: Path, evil: str) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        _add(tar, "Task04_Hippocampus/dataset.json", b"{}")
        _add(tar, evil, b"pwned")
    with pytest.raises(dl.UnsafeArchiveError):
        dl.safe_extract(archive, tmp_path / "out" / "inner")
    assert not (tmp_path / "out" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not (tmp_path / "out" / "inner" / "Task04_Hippocampus").exists()  # nothing extracted


def test_safe_extract_rejects_links(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("Task04_Hippocampus/passwd")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(dl.UnsafeArchiveError):
        dl.safe_extract(archive, tmp_path / "out")


def test_md5_mismatch_raises(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    dl.verify_md5(path, hashlib.md5(b"hello").hexdigest().upper())
    with pytest.raises(dl.ChecksumError):
        dl.verify_md5(path, "0" * 32)


def test_published_md5_is_used_for_the_official_file_name() -> None:
    assert dl.KNOWN_MD5["Task04_Hippocampus.tar"] == "9d24dba78a72977dbd1d2e110310f31b"
    assert dl.DEFAULT_URL.endswith("/Task04_Hippocampus.tar")


def test_unreachable_url_exits_2_with_instructions(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = "http://127.0.0.1:9/x.tar"
    code = dl.main(["--dest", str(tmp_path / "data"), "--url", url, "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 2
    assert url in err and "data=synthetic" in err and str(tmp_path / "data") in err
    assert not list(tmp_path.rglob("*.part"))  # no partial download left behind


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server in a thread serving ``tmp_path/www``; yields (base URL, directory)."""
    www = tmp_path / "www"
    www.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", www
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_end_to_end_from_loopback_server(tmp_path: Path, http_server: tuple[str, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    base, www = http_server
    archive = _decathlon_tar(www / "Task04_Hippocampus.tar")
    md5 = dl.md5sum(archive)
    dest = tmp_path / "data"
    url = f"{base}/Task04_Hippocampus.tar"

    assert dl.main(["--dest", str(dest), "--url", url, "--md5", md5]) == 0
    root = dest / "Task04_Hippocampus"
    assert (root / "dataset.json").is_file()
    assert (root / "imagesTr" / "hippocampus_001.nii.gz").read_bytes() == b"image"
    assert not list(dest.rglob("._*"))
    assert sorted(p.name for p in dest.iterdir()) == ["Task04_Hippocampus"]  # no tar, no temp
    assert "dataset ready" in capsys.readouterr().out

    # Idempotent: a second run finds the data and does not touch the network.
    assert dl.main(["--dest", str(dest), "--url", "http://127.0.0.1:9/x.tar"]) == 0
    assert "already" in capsys.readouterr().out


def test_wrong_md5_from_server_is_an_error(tmp_path: Path, http_server: tuple[str, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    base, www = http_server
    _decathlon_tar(www / "Task04_Hippocampus.tar")
    dest = tmp_path / "data"
    # No --md5: the published MD5 of the official file name applies and does not match this tar.
    assert dl.main(["--dest", str(dest), "--url", f"{base}/Task04_Hippocampus.tar"]) == 1
    assert "MD5" in capsys.readouterr().err
    assert not (dest / "Task04_Hippocampus").exists()
    assert not list(dest.iterdir())  # partial download removed


def test_http_error_exits_2(tmp_path: Path, http_server: tuple[str, Path],
                            capsys: pytest.CaptureFixture[str]) -> None:
    base, _ = http_server
    url = f"{base}/missing.tar"
    assert dl.main(["--dest", str(tmp_path / "data"), "--url", url]) == 2
    err = capsys.readouterr().err
    assert url in err and "404" in err
