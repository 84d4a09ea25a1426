"""Download the real Medical Segmentation Decathlon Task04_Hippocampus data.

``python -m hippo.data.download [--dest DIR] [--url URL] [--md5 HEX] [--keep-archive]``

Streams ``Task04_Hippocampus.tar`` (~27 MB) from the MONAI project's public mirror of the Decathlon
to a temporary file with progress, verifies its MD5, extracts it safely and leaves
``DEST/Task04_Hippocampus/{imagesTr,labelsTr,imagesTs,dataset.json}``. Running it again when the
data is there does nothing. Only the standard library is used (urllib, tarfile, hashlib).

Exit codes: 0 ready (downloaded now or already present), 1 a bad download (checksum mismatch,
unsafe or unusable archive), 2 the URL could not be fetched (no network, HTTP error); the message
then says how to place the data by hand. Training runs without the real data on the embedded
synthetic set (``data=synthetic``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Callable, TextIO

from hippo.fileio import replace_dir

DATASET_DIRNAME = "Task04_Hippocampus"
ARCHIVE_NAME = "Task04_Hippocampus.tar"
# The Google Drive original of the Decathlon is not script-friendly; this is the public mirror
# that MONAI's DecathlonDataset downloads from.
DEFAULT_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar"
# MD5 of Task04_Hippocampus.tar as published by MONAI (monai/apps/datasets.py,
# DecathlonDataset.md5["Task04_Hippocampus"]). A mismatch is an error: the archive is deleted
# and nothing is extracted.
KNOWN_MD5: dict[str, str] = {ARCHIVE_NAME: "9d24dba78a72977dbd1d2e110310f31b"}
DEFAULT_DEST = "data"

EXIT_OK, EXIT_BAD_DOWNLOAD, EXIT_UNREACHABLE = 0, 1, 2
_CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """The URL could not be fetched (network unreachable, DNS, timeout, HTTP error)."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(f"{url}: {reason}")


class ChecksumError(ValueError):
    """The downloaded file's MD5 differs from the expected one."""


class UnsafeArchiveError(ValueError):
    """The archive holds a member that would escape the destination or is not a plain file/dir."""


def md5sum(path: str | os.PathLike, chunk: int = _CHUNK) -> str:
    """Hex MD5 digest of a file."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: str | os.PathLike, expected: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has MD5 ``expected`` (hex, case-insensitive)."""
    actual = md5sum(path)
    if actual.lower() != expected.strip().lower():
        raise ChecksumError(f"{path}: MD5 {actual} does not match the expected {expected}; the "
                            f"download is corrupt or the file changed")


def dataset_present(dest: str | os.PathLike) -> bool:
    """True when ``dest/Task04_Hippocampus`` holds ``dataset.json`` and at least one training image."""
    root = Path(dest) / DATASET_DIRNAME
    images = root / "imagesTr"
    return (root / "dataset.json").is_file() and images.is_dir() and any(
        p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith(".") for p in images.iterdir())


def _progress_printer(stream: TextIO | None = None) -> Callable[[int, int | None], None]:
    """A progress callback ``(bytes_done, total_or_None)`` printing at most ~5 times a second."""
    out = stream if stream is not None else sys.stderr
    last = [0.0]

    def report(done: int, total: int | None) -> None:
        now = time.monotonic()
        final = total is not None and done >= total
        if now - last[0] < 0.2 and not final:
            return
        last[0] = now
        mb = done / 1e6
        text = f"\r  downloaded {mb:7.1f} MB" + (f" / {total / 1e6:.1f} MB ({100 * done / total:5.1f} %)"
                                                   if total else "")
        print(text, end="\n" if final else "", file=out, flush=True)

    return report


def download(url: str, target: str | os.PathLike, md5: str | None = None, timeout: float = 60.0,
             progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Stream ``url`` to ``target`` via a temporary file in the same directory, then verify it.

    Args:
        url: http(s) or file URL.
        target: final file path; written only once the download is complete and verified.
        md5: expected hex MD5, or None to skip the check.
        timeout: socket timeout in seconds.
        progress: callback ``(bytes_done, total_bytes_or_None)``.

    Returns:
        ``target`` as a Path.

    Raises:
        DownloadError: the URL cannot be fetched or the transfer breaks off.
        ChecksumError: MD5 mismatch (the partial file is deleted).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5()
    done, total = 0, None
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "hippo-download/1"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    while block := response.read(_CHUNK):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
            except urllib.error.HTTPError as exc:
                raise DownloadError(url, f"HTTP {exc.code} {exc.reason}") from exc
            except urllib.error.URLError as exc:
                raise DownloadError(url, f"{type(exc.reason).__name__}: {exc.reason}") from exc
            except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
                raise DownloadError(url, f"{type(exc).__name__}: {exc}") from exc
        if total is not None and done != total:
            raise DownloadError(url, f"transfer incomplete: {done} of {total} bytes")
        if md5 is not None and digest.hexdigest() != md5.strip().lower():
            raise ChecksumError(f"{url}: MD5 {digest.hexdigest()} does not match the expected "
                                f"{md5}; the download is corrupt or the file changed")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target


def _is_resource_fork(name: str) -> bool:
    """macOS metadata: ``._*`` AppleDouble files and ``__MACOSX/`` folders."""
    parts = PurePosixPath(name).parts
    return any(p.startswith("._") for p in parts) or "__MACOSX" in parts


def _check_member(member: tarfile.TarInfo) -> None:
    """Raise :class:`UnsafeArchiveError` for absolute paths, ``..``, links and special files."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or PurePosixPath(name).is_absolute():
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise UnsafeArchiveError(f"archive member {name!r} points outside the destination ('..')")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {name!r} is a link or special file")


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Extract a tar archive into ``dest``, refusing anything that could escape it.

    Every member is checked before anything is written: absolute paths, ``..`` components, links
    and device/fifo entries make the whole archive rejected. macOS ``._*`` files and ``__MACOSX/``
    folders are skipped. Where the standard library has it (Python >= 3.10.12 / 3.11.4), the
    tarfile ``"data"`` filter additionally strips unsafe permissions and ownership.

    Returns:
        The extracted regular files.

    Raises:
        UnsafeArchiveError: a member failed the checks (nothing was extracted).
        tarfile.TarError: the file is not a readable tar archive.
    """
    dest = Path(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            _check_member(member)
        keep = [m for m in members if not _is_resource_fork(m.name)]
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for member in keep:
            path = (root / member.name).resolve()
            if path != root and root not in path.parents:   # belt and braces
                raise UnsafeArchiveError(f"archive member {member.name!r} resolves outside {root}")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, members=keep, **kwargs)  # noqa: S202 - members checked above
    return [dest / m.name for m in keep if m.isfile()]


def _find_dataset_root(extracted: Path) -> Path:
    """The directory holding ``imagesTr`` in an extracted archive (itself or one level down)."""
    if (extracted / "imagesTr").is_dir():
        return extracted
    candidates = [p for p in extracted.iterdir() if p.is_dir() and (p / "imagesTr").is_dir()]
    if len(candidates) != 1:
        raise UnsafeArchiveError(f"the archive does not hold one Decathlon dataset folder with "
                                 f"imagesTr/ (found {[p.name for p in extracted.iterdir()]})")
    return candidates[0]


def fetch_dataset(dest: str | os.PathLike = DEFAULT_DEST, url: str = DEFAULT_URL,
                  md5: str | None = None, keep_archive: bool = False, timeout: float = 60.0,
                  progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Make sure ``dest/Task04_Hippocampus`` holds the dataset; download and extract it if not.

    Args:
        dest: parent directory of the dataset folder.
        url: where to download the tar archive from.
        md5: expected MD5; None uses the published one when the URL's file name is known
            (``Task04_Hippocampus.tar``), otherwise skips the check.
        keep_archive: keep ``dest/Task04_Hippocampus.tar`` after extraction.

    Returns:
        The dataset folder ``dest/Task04_Hippocampus``.

    Raises:
        DownloadError, ChecksumError, UnsafeArchiveError, tarfile.TarError.
    """
    dest = Path(dest)
    final = dest / DATASET_DIRNAME
    if dataset_present(dest):
        return final
    if final.exists():
        raise FileExistsError(f"{final} exists but holds no complete dataset (no dataset.json or "
                              f"no imagesTr/*.nii.gz); move it away and run again")
    if md5 is None:
        md5 = KNOWN_MD5.get(PurePosixPath(urllib.parse.urlparse(url).path).name)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / ARCHIVE_NAME
    if archive.is_file() and (md5 is None or md5sum(archive) == md5.lower()):
        print(f"using the archive already at {archive}", file=sys.stderr)
    else:
        download(url, archive, md5=md5, timeout=timeout, progress=progress)
    staging = Path(tempfile.mkdtemp(prefix=f".{DATASET_DIRNAME}.", suffix=".partial", dir=dest))
    try:
        safe_extract(archive, staging)
        replace_dir(_find_dataset_root(staging), final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_archive:
        archive.unlink()
    return final


def unreachable_message(url: str, reason: str, dest: str | os.PathLike) -> str:
    """The one-paragraph explanation printed when the download cannot be fetched."""
    dest = Path(dest)
    return (f"Could not download the Decathlon hippocampus data from {url} ({reason}). This machine "
            f"may have no internet access. To place the data by hand, download {ARCHIVE_NAME} on a "
            f"machine that has access (from {url}, or from http://medicaldecathlon.com), copy it "
            f"here and extract it into {dest} (e.g. `tar -xf {ARCHIVE_NAME} -C {dest}`), so that "
            f"{dest / DATASET_DIRNAME}/imagesTr, labelsTr and dataset.json exist; running this "
            f"command again then finds it. Without the real data, everything runs on the embedded "
            f"synthetic dataset: data=synthetic.")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code (0 ready, 1 bad download, 2 unreachable)."""
    parser = argparse.ArgumentParser(prog="python -m hippo.data.download",
                                     description="Download and extract the Decathlon "
                                                 "Task04_Hippocampus data.")
    parser.add_argument("--dest", default=DEFAULT_DEST,
                        help=f"parent directory of {DATASET_DIRNAME}/ (default ./{DEFAULT_DEST})")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"archive URL (default {DEFAULT_URL})")
    parser.add_argument("--md5", default=None,
                        help="expected MD5 of the archive (default: the published one for "
                             f"{ARCHIVE_NAME}; none for other file names)")
    parser.add_argument("--keep-archive", action="store_true", help="keep the .tar after extraction")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    args = parser.parse_args(argv)

    dest = Path(args.dest)
    if dataset_present(dest):
        print(f"{dest / DATASET_DIRNAME} already holds the dataset; nothing to do.")
        return EXIT_OK
    print(f"downloading {args.url} -> {dest / DATASET_DIRNAME}", file=sys.stderr)
    try:
        root = fetch_dataset(dest, args.url, md5=args.md5, keep_archive=args.keep_archive,
                             timeout=args.timeout, progress=_progress_printer())
    except DownloadError as exc:
        print(unreachable_message(exc.url, exc.reason, dest), file=sys.stderr)
        return EXIT_UNREACHABLE
    except (ChecksumError, UnsafeArchiveError, tarfile.TarError, FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_DOWNLOAD
    n_images = sum(1 for p in (root / "imagesTr").iterdir() if p.name.endswith(".nii.gz")
                   and not p.name.startswith("."))
    print(f"dataset ready at {root} ({n_images} training images)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
