"""Sending a folder of DICOM files to a Storage SCP with C-STORE over one association."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset


# ----------------------------------------------------------------------------------------------
# Sending


class ScannerSendError(ConnectionError):
    """The study could not be sent: peer unreachable, association rejected or aborted."""


def find_dicom_files(folder: str | os.PathLike) -> tuple[list[tuple[Path, Dataset]], list[Path]]:
    """Every DICOM file under ``folder`` (recursively) with its header, and the skipped non-DICOM files.

    Returns:
        ``(dicom, skipped)``: ``(path, header without pixels)`` pairs sorted by path, and the paths of
        files that are not readable DICOM (or lack SOPClassUID/SOPInstanceUID).
    """
    dicom: list[tuple[Path, Dataset]] = []
    skipped: list[Path] = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # InvalidDicomError, truncated files, ...
            skipped.append(path)
            continue
        if "SOPClassUID" not in header or "SOPInstanceUID" not in header:
            skipped.append(path)
            continue
        dicom.append((path, header))
    return dicom, skipped


_STORE_WARNINGS = {0xB000, 0xB006, 0xB007}


def send_study(
    dir: str | os.PathLike,
    host: str,
    port: int,
    called_ae: str = "ORTHANC",
    calling_ae: str = "HIPPOSCANNER",
    *,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """C-STORE every DICOM file under ``dir`` to ``called_ae@host:port`` over one association.

    Only the SOP classes present are proposed, each with Explicit and Implicit VR Little Endian (and
    a context of its own for each other transfer syntax the files carry).

    Returns:
        ``{"total", "sent", "warnings", "failed", "skipped_non_dicom", "failures": [{"file",
        "reason"}], "host", "port", "called_ae", "calling_ae"}`` (``sent`` counts successes
        including warning statuses).

    Raises:
        FileNotFoundError: ``dir`` does not exist.
        ScannerSendError: nothing to send, the peer is unreachable, or the association is rejected
            or aborted (the message names ``AE@host:port``).
    """
    from pynetdicom import AE

    from hippo.pacs import tcp_nodelay_handlers, presentation_contexts

    folder = Path(dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    files, skipped = find_dicom_files(folder)
    peer = f"{called_ae}@{host}:{port}"
    if not files:
        raise ScannerSendError(f"no DICOM files under {folder} to send to {peer}")
    contexts, left_out = presentation_contexts(
        (str(header.SOPClassUID), str(getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "") or ""))
        for _, header in files)
    if left_out:
        raise ScannerSendError(f"the SOP classes and transfer syntaxes under {folder} need more than the 128 "
                               f"presentation contexts one association can propose")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10.0)
    for sop_class, ts_list in contexts:
        ae.add_requested_context(sop_class, ts_list)
    assoc = ae.associate(host, int(port), ae_title=called_ae, evt_handlers=tcp_nodelay_handlers())
    if not assoc.is_established:
        if assoc.is_rejected:
            raise ScannerSendError(f"association with {peer} rejected (check the called AE title "
                                   f"{called_ae!r} and that {calling_ae!r} is a known modality)")
        # Only now probe the TCP port, for a clearer message: a probe before every association
        # would hold one of the peer's association slots until its ACSE timeout.
        try:
            with socket.create_connection((host, int(port)), timeout=min(timeout_s, 10.0)):
                pass
        except OSError as exc:
            raise ScannerSendError(f"cannot reach DICOM peer {peer}: {exc.strerror or exc}") from exc
        raise ScannerSendError(f"association with {peer} failed ({'aborted' if assoc.is_aborted else 'no answer'})")

    result: dict[str, Any] = {"total": len(files), "sent": 0, "warnings": 0, "failed": 0,
                              "skipped_non_dicom": len(skipped), "failures": [], "host": host, "port": int(port),
                              "called_ae": called_ae, "calling_ae": calling_ae}
    try:
        for path, _ in files:
            if not assoc.is_established:
                result["failed"] += 1
                result["failures"].append({"file": str(path), "reason": "association lost"})
                continue
            try:
                status = assoc.send_c_store(pydicom.dcmread(path))
            except Exception as exc:  # no accepted context for it, unreadable pixels, ...
                result["failed"] += 1
                result["failures"].append({"file": str(path), "reason": f"{type(exc).__name__}: {exc}"})
                continue
            code = int(status.Status) if status is not None and "Status" in status else None
            if code == 0x0000:
                result["sent"] += 1
            elif code in _STORE_WARNINGS:
                result["sent"] += 1
                result["warnings"] += 1
            else:
                result["failed"] += 1
                reason = "no response (timeout or abort)" if code is None else f"status 0x{code:04X}"
                result["failures"].append({"file": str(path), "reason": reason})
    finally:
        if assoc.is_established:
            assoc.release()
    return result
