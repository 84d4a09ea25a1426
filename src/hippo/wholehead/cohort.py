"""A cohort in parts: shards, per-scan records, resume, and what the group level reads back.

``python -m hippo.predict`` works at two levels (the BIDS-App convention):

* **participant** (``shard=I/N``, ``participant_label=...``, or ``level=participant``): process some
  of the scans and write per-scan results only. Beside each scan's label map, ``result.json``, report
  and thumbnail, a **record** ``<output>/outcomes/<name>.json`` (:func:`record_path`) says what
  happened to it (its :class:`hippo.wholehead.run.ScanOutcome` as a dict) and for which input
  content (``input_sha256``) and which run key (:func:`run_key`: the model file's SHA-256, this
  package's version and the result-affecting settings). It is written atomically after the scan's
  other files, so it is the scan's "done" mark: a killed job loses only the scans it was on.
* **group** (``level=group``): list the input again and read every scan's record
  (:func:`collect`); a scan without a current record is ``missing``.

A rerun (any level that processes scans) skips a scan whose record has the same input content and
run key and whose result files are still there (:func:`reusable`); failed scans are redone.

Shards (:func:`select_shard`): scan ``k`` of the input's sorted listing belongs to shard ``k mod N``
(round robin: shards differ by at most one scan). The listing must not change while the shards of
one cohort run; a scan added later is reported ``missing`` by the group level until a shard runs it.

numpy-free, no torch or Hydra.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hippo import __version__
from hippo.fileio import write_json_atomic
from hippo.scan_io import ScanInput

__all__ = ["RECORDS_DIR", "parse_shard", "select_shard", "select_participants", "file_sha256", "run_key",
           "record_path", "write_record", "read_record", "reusable", "collect", "MISSING"]

#: the per-scan records' folder below the output
RECORDS_DIR = "outcomes"
#: the group level's status of a scan without a current record
MISSING = "missing"
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(value: Any) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; ``None``/``""`` -> ``None`` (no sharding).

    Raises:
        ValueError: anything else, saying what is expected.
    """
    if value is None or str(value).strip() in ("", "null", "None"):
        return None
    m = _SHARD.match(str(value))
    if not m:
        raise ValueError(f"shard={value!r}: expected I/N, the I-th of N shards counted from 0 (e.g. shard=0/4)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard={value!r}: I must be 0..N-1 and N at least 1 (shard=0/{max(n, 1)} .. "
                         f"{max(n, 1) - 1}/{max(n, 1)})")
    return i, n


def select_shard(scans: Sequence[ScanInput], index: int, count: int) -> list[ScanInput]:
    """The scans of shard ``index`` of ``count``: every ``count``-th of ``scans`` (in their order,
    which :func:`hippo.scan_io.find_inputs` sorts), starting at ``index``."""
    return [s for k, s in enumerate(scans) if k % count == index]


def _labels(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else re.split(r"[\s,]+", str(value))
    return [str(v).strip().removeprefix("sub-") for v in items if str(v).strip()]


def select_participants(scans: Sequence[ScanInput], labels: Any, *, bids: bool) -> list[ScanInput]:
    """The scans of the participants ``labels`` (``"01"``, ``"sub-01"``, a list, or ``"01,02"``); all
    scans when ``labels`` is empty.

    Raises:
        ValueError: ``labels`` given for an input that is not a BIDS dataset, or a label without any
            scan (naming it).
    """
    wanted = _labels(labels)
    if not wanted:
        return list(scans)
    if not bids:
        raise ValueError("participant_label needs a BIDS dataset as input (sub-<label>/...); "
                         "use shard=I/N to split a folder")
    from hippo.scan_io import bids_entities

    chosen = [s for s in scans if bids_entities(s.name).get("sub") in wanted]
    found = {bids_entities(s.name).get("sub") for s in chosen}
    unknown = [w for w in wanted if w not in found]
    if unknown:
        raise ValueError(f"participant_label: no T1w scan for {', '.join('sub-' + u for u in unknown)}")
    return chosen


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def run_key(model_path: str | os.PathLike, settings: Mapping[str, Any]) -> dict[str, str]:
    """What a result depends on besides its input: the model file's SHA-256, this package's version
    and the SHA-256 of the result-affecting ``settings`` (canonical JSON)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return {"model_sha256": file_sha256(model_path), "hippo_version": __version__,
            "settings_sha256": hashlib.sha256(blob).hexdigest()}


def record_path(out_root: str | os.PathLike, name: str) -> Path:
    """``<out_root>/outcomes/<name>.json`` (``name``: the scan's unique, file-system-safe name)."""
    return Path(out_root) / RECORDS_DIR / f"{name}.json"


def _stat(path: str | os.PathLike) -> dict[str, int]:
    st = os.stat(path)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def write_record(out_root: str | os.PathLike, outcome: Mapping[str, Any], *, input_sha256: str,
                 key: Mapping[str, str], shard: str | None = None) -> Path:
    """Write one scan's record atomically (see the module docstring); ``outcome``: the
    :class:`~hippo.wholehead.run.ScanOutcome` as a dict."""
    try:
        stat = _stat(outcome["scan"])
    except OSError:
        stat = {}
    return write_json_atomic(record_path(out_root, outcome["name"]), {
        "name": outcome["name"], "scan": outcome["scan"], "input_sha256": input_sha256, "input_stat": stat,
        "key": dict(key), "shard": shard,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "outcome": dict(outcome),
    })


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """A record, or ``None`` when absent or unreadable (a damaged record counts as none)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("outcome"), dict) else None


def _files_there(outcome: Mapping[str, Any]) -> bool:
    files = outcome.get("files") or {}
    return all(Path(files[k]).is_file() for k in ("dseg", "result") if k in files) and \
        ("dseg" in files or outcome.get("status") == "skipped")


def reusable(out_root: str | os.PathLike, scan: ScanInput, input_sha256: str,
             key: Mapping[str, str]) -> dict[str, Any] | None:
    """The earlier outcome (a dict) of ``scan`` when it can stand: a record for the same content and
    run key, status ``ok``/``review`` with its label map and ``result.json`` still there, or
    ``skipped``; else ``None`` (failed scans are redone)."""
    record = read_record(record_path(out_root, scan.name))
    if record is None or record.get("input_sha256") != input_sha256 or record.get("key") != dict(key):
        return None
    outcome = record["outcome"]
    if outcome.get("status") not in ("ok", "review", "skipped") or not _files_there(outcome):
        return None
    return outcome


def collect(out_root: str | os.PathLike, scans: Iterable[ScanInput],
            key: Mapping[str, str]) -> list[tuple[ScanInput, dict[str, Any] | None, str]]:
    """For the group level: per scan ``(scan, outcome dict or None, why none)``. A record stands when
    it was made with ``key`` and the file is unchanged (same size and time, or else the same
    SHA-256) and its result files are there."""
    out: list[tuple[ScanInput, dict[str, Any] | None, str]] = []
    for scan in scans:
        record = read_record(record_path(out_root, scan.name))
        if record is None:
            out.append((scan, None, "no result yet: its shard has not run, is running, or was stopped"))
            continue
        if record.get("key") != dict(key):
            out.append((scan, None, "its result was made with another model, package version or settings; "
                                    "rerun its shard with this configuration"))
            continue
        try:
            same = record.get("input_stat") == _stat(scan.path) or \
                record.get("input_sha256") == file_sha256(scan.path)
        except OSError as exc:
            out.append((scan, None, f"cannot read the input: {exc}"))
            continue
        if not same:
            out.append((scan, None, "the input file changed after its result was made; rerun its shard"))
            continue
        outcome = record["outcome"]
        if outcome.get("status") in ("ok", "review") and not _files_there(outcome):
            out.append((scan, None, "its label map or result.json is gone; rerun its shard"))
            continue
        out.append((scan, outcome, ""))
    return out
