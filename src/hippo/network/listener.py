"""The AI listener: a DICOM Storage SCP that runs the deploy pipeline on every study it receives
and sends the results (SC report, SEG, SR) back to the PACS.

::

    sender (Orthanc / scanner) --C-STORE--> Listener (AE HIPPOAI)
        handler: validate UIDs, write incoming/<StudyUID>/<SOPUID>.dcm atomically, note the time
        watcher: a study quiet for ``quiet_seconds`` -> the work queue (once)
        worker : flush the outbox -> move the instances to work/<StudyUID>/ -> StudyProcessor
                 (ingest ... send to the PACS; what fails waits in the outbox)
                 -> processed/<StudyUID>/ (+ listener.json) or failed/<StudyUID>/ (+ error.json)

Directories (all below one root, default ``outputs/network/listener``):

* ``incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` -- what arrived and is not yet processed.
  Files are written under a temporary dot-name and renamed, so only complete instances carry the
  ``.dcm`` name. Names are built only from UIDs that pass :func:`hippo.pacs.validate_uid`
  (``^[0-9.]{1,64}$``, dotted numbers); an instance whose Study/SOP Instance UID does not is refused
  with status ``0xA900`` and nothing is written.
* ``work/<StudyInstanceUID>/`` -- the instances a worker is processing. The worker *moves* the
  study's instances there first, so instances that keep arriving during processing land in a fresh
  ``incoming/<StudyInstanceUID>/`` and are queued again after a new quiet period.
* ``processed/<StudyInstanceUID>/`` -- the input instances of a study that went through the
  pipeline, and ``listener.json`` (outcome, volumes, the SOP Instance UIDs of our results).
* ``failed/<StudyInstanceUID>/`` -- the inputs of a study the pipeline could not process, and
  ``error.json`` (stage, error).
* ``results/<StudyInstanceUID>/`` -- the pipeline's results (``report_sc.dcm``, ``seg.dcm``,
  ``sr.dcm``, ``report.png``, ``result.json``); ``outbox/`` -- objects the PACS did not accept yet.

Rules:

* **Study complete?** DICOM has no such signal: a study is taken when no instance of it has
  arrived for ``quiet_seconds`` (and no C-STORE of it is being written).
* **Duplicates.** When every instance of a queued study is already in ``processed/<StudyUID>/``
  (the same study sent again, e.g. re-routed), it is skipped: no new results, the re-sent copies
  are dropped. When at least one instance is new, the earlier instances (from ``processed/`` and
  ``failed/``) are merged with the new ones and the whole study is processed again, which produces
  a new set of results (the study changed), and the earlier set is rejected by an IOCM note (Orthanc's
  routing sends an input series again whenever it has changed since it was sent, e.g. the rest of a
  series that arrived in parts: docs/network.md). Instances that are our own results coming back
  (their SOP Instance UIDs are recorded in ``listener.json``) are dropped, so a routing loop
  cannot make the listener process its own output. A study in ``failed/`` is retried when it is
  sent again.
* **Restart.** On :meth:`Listener.start`, studies left in ``work/`` (a crash during processing)
  are moved back to ``incoming/``, and every study in ``incoming/`` is queued after one quiet
  period counted from the start, as if its instances had just arrived: a sender cut off by the
  crash can send the rest first, so a half-received study is not processed (and its partial
  results sent) before the rest arrives. A study that reached ``processed/`` or ``failed/`` is
  never redone on its own. A study redone after a crash that hit after its results were sent
  gives the same SOP Instance UIDs again (:class:`hippo.deploy.pipeline.StudyProcessor` derives them
  from the inputs and the model), so the PACS keeps one result set.
* **Model.** Loaded once (lazily on the first study, or at start with ``preload_model=True``). If
  it cannot be loaded the study stays in ``incoming/`` (not the study's fault) and
  :meth:`Listener.status` reports the error; the next start retries.
* **Logs** name studies by StudyInstanceUID and senders by AE title, never a patient.

torch is imported only when the model is loaded (``hippo.deploy.pipeline``), never at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, evt
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    EnhancedSRStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)

from hippo.fileio import write_bytes_atomic, write_json_atomic
from hippo.network.study_folders import (SUFFIX, instance_names, instances, link_or_copy, partial_studies,
                                        remove_trash, replace_study_dir, study_folders)
from hippo.pacs import Outbox, PacsConfig, PacsError, move_series, tcp_nodelay_handlers, validate_uid
from hippo.deploy.options import processor_options

log = logging.getLogger(__name__)

__all__ = [
    "Listener",
    "STORAGE_SOP_CLASSES",
    "STATUS_INVALID_UID",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_CANNOT_UNDERSTAND",
    "run_listener",
]

#: Storage SOP classes the listener accepts (each with every transfer syntax pynetdicom knows).
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage, CTImageStorage,
    EnhancedCTImageStorage,
    SecondaryCaptureImageStorage, SegmentationStorage,
    BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage,
)
#: C-STORE failure: "Data Set does not match SOP Class" -- used for a missing or unsafe UID.
STATUS_INVALID_UID = 0xA900
#: C-STORE failure: "Refused: Out of Resources" -- the instance could not be written.
STATUS_OUT_OF_RESOURCES = 0xA700
#: C-STORE failure: "Cannot understand" -- the data set could not be decoded.
STATUS_CANNOT_UNDERSTAND = 0xC210



def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _encode(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file (preamble, file meta) in memory."""
    import io

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _short(value: Any, n: int = 80) -> str:
    text = repr(str(value))
    return text if len(text) <= n else text[: n - 3] + "..."



class Listener:
    """A Storage SCP that queues each complete study and runs the deploy pipeline on it.

    Args:
        ae_title: our AE title (the called AE title must match it).
        host, port: where to listen (loopback by default).
        allowed_calling_aets: calling AE titles allowed to associate; any other is rejected
            (an empty list would accept any sender: pynetdicom's rule; a warning is logged).
        quiet_seconds: a study is complete when nothing of it arrived for this long.
        workers: threads running the pipeline (one study per thread at a time; the model is
            shared).
        root: the listener's directory; ``incoming``, ``work``, ``processed``, ``failed``,
            ``results`` and ``outbox`` below it unless given separately.
        model_path: the model file (required unless ``processor_factory`` is given).
        pacs: where results go (a :class:`hippo.pacs.PacsConfig` mapping); ``None`` only writes them.
        processor_options: passed to :func:`hippo.deploy.pipeline.build_processor` (``rules``,
            ``io_threads``, ``series_numbers``, ``write_png``, ``plausibility``,
            ``device``, ``batch_size``, ``precision``).
        processor_factory: ``() -> StudyProcessor``-like object with ``process(dir)`` (tests; the
            default loads ``model_path``).
        preload_model: load the model in :meth:`start` (errors then surface at start).
        stop_timeout: seconds :meth:`stop` waits for the study being processed.
        max_associations: concurrent associations.
        max_object_mb: an instance larger than this (MiB, encoded) is refused with "out of
            resources" (0xA700) before anything is written; None = no limit.
        min_free_mb: an instance that would leave less free space than this (MiB) on the incoming
            folder's file system is refused the same way (the disk never fills up with input).
        outbox_retry_seconds: how often results that could not be delivered are sent again
            (besides before every study); 0 = only before a study.
        rerequest_on_start: at start, ask the PACS (C-MOVE to this AE) for the series of studies
            a crash left half-received in ``incoming/`` or that wait in ``failed/`` as incomplete.
    """

    def __init__(
        self,
        *,
        ae_title: str = "HIPPOAI",
        host: str = "127.0.0.1",
        port: int = 11112,
        allowed_calling_aets: Sequence[str] = ("ORTHANC", "HIPPOSCANNER"),
        quiet_seconds: float = 3.0,
        workers: int = 1,
        root: str | os.PathLike = "outputs/network/listener",
        incoming_dir: str | os.PathLike | None = None,
        work_dir: str | os.PathLike | None = None,
        processed_dir: str | os.PathLike | None = None,
        failed_dir: str | os.PathLike | None = None,
        results_dir: str | os.PathLike | None = None,
        outbox_dir: str | os.PathLike | None = None,
        model_path: str | os.PathLike | None = None,
        pacs: Mapping[str, Any] | PacsConfig | None = None,
        processor_options: Mapping[str, Any] | None = None,
        processor_factory: Callable[[], Any] | None = None,
        preload_model: bool = False,
        stop_timeout: float = 120.0,
        max_associations: int = 10,
        max_object_mb: float | None = 512.0,
        min_free_mb: float = 1024.0,
        outbox_retry_seconds: float = 30.0,
        rerequest_on_start: bool = True,
    ) -> None:
        ae_title = str(ae_title).strip()
        if not 1 <= len(ae_title) <= 16:
            raise ValueError(f"ae_title must be 1..16 characters, got {ae_title!r}")
        if model_path is None and processor_factory is None:
            raise ValueError("Listener needs model_path (or a processor_factory)")
        if float(quiet_seconds) < 0 or int(workers) < 1:
            raise ValueError("quiet_seconds must be >= 0 and workers >= 1")
        self.ae_title = ae_title
        self.host, self.port = str(host), int(port)
        self.allowed_calling_aets = [str(a).strip() for a in allowed_calling_aets]
        self.quiet_seconds = float(quiet_seconds)
        self.workers = int(workers)
        root = Path(root)
        self.root = root
        self.incoming_dir = Path(incoming_dir) if incoming_dir else root / "incoming"
        self.work_dir = Path(work_dir) if work_dir else root / "work"
        self.processed_dir = Path(processed_dir) if processed_dir else root / "processed"
        self.failed_dir = Path(failed_dir) if failed_dir else root / "failed"
        self.results_dir = Path(results_dir) if results_dir else root / "results"
        self.outbox_dir = Path(outbox_dir) if outbox_dir else root / "outbox"
        self.model_path = Path(model_path) if model_path is not None else None
        if isinstance(pacs, PacsConfig):
            self.pacs: PacsConfig | None = pacs
        else:
            self.pacs = PacsConfig.from_mapping(pacs) if pacs is not None else None
        self.processor_options = dict(processor_options or {})
        self._factory = processor_factory
        self.preload_model = bool(preload_model)
        self.stop_timeout = float(stop_timeout)
        self.max_object_bytes = None if max_object_mb is None else int(float(max_object_mb) * 2 ** 20)
        self.min_free_bytes = int(float(min_free_mb) * 2 ** 20)
        self.outbox_retry_seconds = float(outbox_retry_seconds)
        self.rerequest_on_start = bool(rerequest_on_start)
        self.max_associations = int(max_associations)

        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._processor: Any = None
        self._model_error: str | None = None
        self._reset_state()

    # ------------------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._arrivals: dict[str, float] = {}      # study -> monotonic time of its last arrival
        self._inflight: Counter[str] = Counter()    # study -> C-STOREs being written
        self._queued: set[str] = set()              # in the queue or being processed
        self._processing: set[str] = set()
        self._assoc_counts: dict[int, Counter[str]] = {}
        self._result_names: set[str] = set()        # "<SOPUID>.dcm" of results we produced
        self._counts: Counter[str] = Counter()
        self._last: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._ae: AE | None = None
        self._started_at: str | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> "Listener":
        """Create the directories, recover after a crash, queue the studies left in ``incoming/``,
        start the watcher and the workers, then accept associations. Returns ``self``."""
        if self.running:
            raise RuntimeError("listener already started")
        self._reset_state()
        for d in (self.incoming_dir, self.work_dir, self.processed_dir, self.failed_dir,
                  self.results_dir, self.outbox_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._load_result_names()
        if self.preload_model:
            self._get_processor()
        resumed = self._resume()

        self._threads = [threading.Thread(target=self._watch, name="hippo-listener-watcher", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"hippo-listener-worker-{i}", daemon=True)
                          for i in range(self.workers)]
        if self.pacs is not None and self.outbox_retry_seconds > 0:
            self._threads.append(threading.Thread(target=self._retry_outbox, name="hippo-listener-outbox",
                                                  daemon=True))
        for t in self._threads:
            t.start()

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        if self.allowed_calling_aets:
            ae.require_calling_aet = list(self.allowed_calling_aets)
        else:
            log.warning("listener %s: no allowed calling AE titles configured: any sender is accepted",
                        self.ae_title)
        ae.maximum_associations = self.max_associations
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_assoc_end),
            (evt.EVT_ABORTED, self._on_assoc_end),
            *tcp_nodelay_handlers(),
        ]
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except Exception:
            self._stop.set()
            raise
        self._ae = ae
        self._started_at = _now()
        if self.pacs is not None and self.rerequest_on_start:
            threading.Thread(target=self._rerequest_partial, name="hippo-listener-rerequest", daemon=True).start()
        log.info("listener %s@%s:%d accepting %s; quiet period %.1f s; %d worker(s); %d study(ies) resumed; "
                 "dir %s", self.ae_title, self.host, self.port, self.allowed_calling_aets or "any AE",
                 self.quiet_seconds, self.workers, resumed, self.root)
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Stop gracefully: refuse new associations, let open ones finish (a few seconds, then
        abort them), let each worker finish the study it is processing (up to ``timeout``,
        default ``stop_timeout`` seconds). Studies not yet processed stay in ``incoming/`` for the
        next start. Returns True when every thread ended in time."""
        timeout = self.stop_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            # let established associations finish sending (connections that never sent an
            # A-ASSOCIATE-RQ, e.g. a TCP reachability probe, would otherwise linger for the ACSE timeout)
            assoc_deadline = time.monotonic() + min(10.0, timeout)
            while (any(a.is_established for a in server.active_associations)
                   and time.monotonic() < assoc_deadline):
                time.sleep(0.05)
            for assoc in server.active_associations:
                assoc.abort()
        self._stop.set()
        ok = True
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            ok = ok and not t.is_alive()
        if not ok:
            log.warning("listener %s: a study was still being processed after %.0f s; it is resumed on "
                        "the next start", self.ae_title, timeout)
        self._threads = []
        log.info("listener %s stopped", self.ae_title)
        return ok

    def __enter__(self) -> "Listener":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until nothing is arriving, waiting out its quiet period, queued or processed.
        Returns False when ``timeout`` seconds passed first."""
        deadline = time.monotonic() + float(timeout)
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._arrivals or self._queued or +self._inflight)
            if not busy:
                return True
            time.sleep(0.05)
        return False

    def status(self) -> dict[str, Any]:
        """A snapshot for humans and health checks (no patient data)."""
        with self._lock:
            now = time.monotonic()
            waiting = {uid: round(now - t, 2) for uid, t in self._arrivals.items()}
            queued = sorted(self._queued - self._processing)
            processing = sorted(self._processing)
            counts = dict(self._counts)
            last = dict(self._last) if self._last else None
        try:
            outbox_pending = len(Outbox(self.outbox_dir)) if self.outbox_dir.is_dir() else 0
        except OSError:
            outbox_pending = -1
        return {
            "running": self.running,
            "started": self._started_at,
            "ae_title": self.ae_title,
            "host": self.host,
            "port": self.port,
            "allowed_calling_aets": list(self.allowed_calling_aets),
            "quiet_seconds": self.quiet_seconds,
            "workers": self.workers,
            "receiving": waiting,           # StudyUID -> seconds since its last instance
            "queued": queued,
            "processing": processing,
            "counts": {k: counts.get(k, 0) for k in (
                "instances_received", "instances_refused", "associations_rejected", "studies_resumed",
                "studies_ok", "studies_failed", "studies_skipped", "echoes_dropped", "series_rerequested")},
            "last": last,
            "model_path": str(self.model_path) if self.model_path else None,
            "model_loaded": self._processor is not None,
            "model_error": self._model_error,
            "pacs": self.pacs.destination if self.pacs else None,
            "outbox_pending": outbox_pending,
            "dirs": {k: str(getattr(self, f"{k}_dir")) for k in
                     ("incoming", "work", "processed", "failed", "results", "outbox")},
        }

    # ------------------------------------------------------------------------------ network side
    def _on_store(self, event: Any) -> int | Dataset:
        """C-STORE: validate the UIDs, write the instance as it came, note the arrival."""
        try:
            ds = event.dataset
            raw_study = ds.get("StudyInstanceUID", "")
            raw_sop = ds.get("SOPInstanceUID", "")
        except Exception as exc:  # undecodable data set
            self._count("instances_refused")
            log.warning("C-STORE from %s refused: data set not decodable (%s)",
                        event.assoc.requestor.ae_title, type(exc).__name__)
            return _failure(STATUS_CANNOT_UNDERSTAND, "data set could not be decoded")
        try:
            study_uid = validate_uid(str(raw_study or ""))
            sop_uid = validate_uid(str(raw_sop or ""))
        except ValueError:
            self._count("instances_refused")
            log.warning("C-STORE from %s refused: invalid StudyInstanceUID %s or SOPInstanceUID %s",
                        event.assoc.requestor.ae_title, _short(raw_study), _short(raw_sop))
            return _failure(STATUS_INVALID_UID, "invalid StudyInstanceUID or SOPInstanceUID")

        encoded = event.encoded_dataset()
        refusal = self._resource_problem(len(encoded))
        if refusal:
            self._count("instances_refused")
            log.error("C-STORE from %s study %s instance %s refused: %s", _short(event.assoc.requestor.ae_title, 20),
                      study_uid, sop_uid, refusal)
            return _failure(STATUS_OUT_OF_RESOURCES, refusal)
        with self._lock:
            self._inflight[study_uid] += 1
            self._arrivals[study_uid] = time.monotonic()
        try:
            write_bytes_atomic(self.incoming_dir / study_uid / f"{sop_uid}{SUFFIX}", encoded)
        except Exception as exc:
            self._count("instances_refused")
            log.error("C-STORE study %s instance %s: cannot write (%s: %s)", study_uid, sop_uid,
                      type(exc).__name__, exc)
            return _failure(STATUS_OUT_OF_RESOURCES, "instance could not be stored")
        finally:
            with self._lock:
                self._inflight[study_uid] -= 1
                if self._inflight[study_uid] <= 0:
                    del self._inflight[study_uid]
                self._arrivals[study_uid] = time.monotonic()
        with self._lock:
            self._counts["instances_received"] += 1
            self._assoc_counts.setdefault(id(event.assoc), Counter())[study_uid] += 1
        return 0x0000

    def _resource_problem(self, size: int) -> str | None:
        """Why an instance of ``size`` bytes must be refused (object size, free disk), or None."""
        if self.max_object_bytes is not None and size > self.max_object_bytes:
            return f"object of {size / 2 ** 20:.0f} MiB exceeds max_object_mb {self.max_object_bytes / 2 ** 20:.0f}"
        try:
            free = shutil.disk_usage(self.incoming_dir).free
        except OSError:
            return None  # the write itself will tell
        if free - size < self.min_free_bytes:
            return (f"free disk would fall below min_free_mb {self.min_free_bytes / 2 ** 20:.0f} "
                    f"({free / 2 ** 20:.0f} MiB free on {self.incoming_dir})")
        return None

    def _on_rejected(self, event: Any) -> None:
        self._count("associations_rejected")
        req = event.assoc.requestor
        log.warning("association from %s (%s:%s) calling %s rejected (allowed calling AEs: %s)",
                    _short(req.ae_title, 20), req.address, req.port, _short(event.assoc.acceptor.ae_title, 20),
                    self.allowed_calling_aets)

    def _on_assoc_end(self, event: Any) -> None:
        with self._lock:
            per_study = self._assoc_counts.pop(id(event.assoc), None)
        if per_study:
            log.info("association from %s ended: %s", event.assoc.requestor.ae_title,
                     ", ".join(f"{n} instance(s) of study {uid}" for uid, n in per_study.items()))

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    # ------------------------------------------------------------------------------ watcher
    def _watch(self) -> None:
        interval = min(0.25, max(0.02, self.quiet_seconds / 5))
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._lock:
                ready = [uid for uid, t in self._arrivals.items()
                         if now - t >= self.quiet_seconds and uid not in self._queued
                         and not self._inflight.get(uid)]
                for uid in sorted(ready, key=self._arrivals.__getitem__):
                    del self._arrivals[uid]
                    self._enqueue_locked(uid)

    def _enqueue_locked(self, uid: str) -> None:
        self._queued.add(uid)
        self._queue.put(uid)
        log.info("study %s queued", uid)

    # ------------------------------------------------------------------------------ workers
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                uid = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if self._stop.is_set():  # stopping: leave it in incoming/ for the next start
                with self._lock:
                    self._queued.discard(uid)
                break
            with self._lock:
                self._processing.add(uid)
            try:
                self._process_study(uid)
            except Exception as exc:  # never let a worker die
                log.exception("study %s: listener error %s: %s", uid, type(exc).__name__, exc)
            finally:
                with self._lock:
                    self._processing.discard(uid)
                    self._queued.discard(uid)

    def _take_incoming(self, uid: str, work: Path) -> set[str]:
        """Move the study's complete instances from ``incoming/`` to ``work/``; their names."""
        work.mkdir(parents=True, exist_ok=True)
        inc = self.incoming_dir / uid
        names = set()
        for p in instances(inc):
            os.replace(p, work / p.name)
            names.add(p.name)
        with self._lock:  # remove the emptied folder unless a C-STORE is writing into it
            if not self._inflight.get(uid):
                with contextlib.suppress(OSError):
                    inc.rmdir()
        return names

    def _return_to_incoming(self, uid: str, work: Path, names: Iterable[str]) -> None:
        inc = self.incoming_dir / uid
        inc.mkdir(parents=True, exist_ok=True)
        for name in names:
            src = work / name
            if src.exists():
                if (inc / name).exists():  # a newer copy arrived meanwhile
                    src.unlink()
                else:
                    os.replace(src, inc / name)
        shutil.rmtree(work, ignore_errors=True)

    def _process_study(self, uid: str) -> None:
        validate_uid(uid)
        work = self.work_dir / uid
        names = self._take_incoming(uid, work) | instance_names(work)
        if not names:
            with contextlib.suppress(OSError):
                work.rmdir()
            return

        echoes = names & self._result_names
        for name in echoes:  # our own results coming back: never process them
            (work / name).unlink(missing_ok=True)
        if echoes:
            self._count("echoes_dropped", len(echoes))
            log.info("study %s: dropped %d instance(s) that are our own results", uid, len(echoes))
        names -= echoes

        done = instance_names(self.processed_dir / uid)
        if not names or (done and names <= done):
            shutil.rmtree(work, ignore_errors=True)
            if names:
                self._count("studies_skipped")
                self._set_last(uid, "skipped", instances=len(names),
                               reason="every instance was already processed: no new results")
                log.info("study %s: all %d instance(s) already processed; skipped (no duplicate results)",
                         uid, len(names))
            return

        merged = set()
        for earlier in (self.processed_dir / uid, self.failed_dir / uid):
            for p in instances(earlier):
                if p.name not in names and p.name not in merged:
                    link_or_copy(p, work / p.name)
                    merged.add(p.name)
        self._flush_outbox()
        try:
            processor = self._get_processor()
        except Exception as exc:
            for name in merged:
                (work / name).unlink(missing_ok=True)
            self._return_to_incoming(uid, work, names)
            log.error("study %s left in %s: the model could not be loaded (%s)", uid, self.incoming_dir,
                      self._model_error)
            self._set_last(uid, "waiting", reason=f"model not loaded: {type(exc).__name__}: {exc}")
            return

        n_total = len(names) + len(merged)
        unseen = names - done  # the re-measure decision: instances the earlier result was not made from
        if done:
            log.info("study %s: %d instance(s) beyond the %d measured before (e.g. the rest of a series that "
                     "arrived in parts): measuring again from all %d; the earlier result is then rejected",
                     uid, len(unseen), len(done), n_total)
        else:
            log.info("study %s: processing %d instance(s) (%d new)", uid, n_total, len(unseen))
        previous = self._current_results(uid)  # read now: the new results overwrite their files
        t0 = time.perf_counter()
        outcome = processor.process(work)
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = {
            "study_instance_uid": uid,
            "status": outcome.status,
            "finished": _now(),
            "seconds": round(seconds, 3),
            "instances": n_total,
            "new_instances": len(unseen),
        }
        if outcome.status in ("ok", "review"):  # results made (and sent); "review" flags them in the report
            result_uids = self._result_uids(outcome.files)
            record.update({
                "volumes": outcome.volumes, "series_instance_uid": outcome.series_uid,
                "sent": outcome.sent, "queued_in_outbox": list(outcome.queued),
                "results_dir": str(self.results_dir / uid), "result_sop_instance_uids": result_uids,
                "timings_s": outcome.timings_s, "review": list(outcome.review),
            })
            old = [str(ds.SOPInstanceUID) for ds in previous]
            if previous and set(old) != set(result_uids):
                record.update(self._reject(uid, previous, processor))
            write_json_atomic(work / "listener.json", record)
            replace_study_dir(work, self.processed_dir / uid)
            shutil.rmtree(self.failed_dir / uid, ignore_errors=True)
            with self._lock:
                self._result_names.update(f"{u}{SUFFIX}" for u in result_uids)
                self._counts["studies_ok"] += 1
            from hippo.deploy.pipeline import describe_volumes

            log.info("study %s: %s in %.2f s: %s; sent %d of %d, %d in the outbox", uid, outcome.status, seconds,
                     describe_volumes(outcome), outcome.sent.get("success", 0) + outcome.sent.get("warning", 0),
                     outcome.sent.get("total", 0), len(outcome.queued))
            self._set_last(uid, outcome.status, seconds=round(seconds, 3), volumes=outcome.volumes,
                           queued_in_outbox=len(outcome.queued), review=list(outcome.review))
        else:
            record.update({"stage": outcome.stage, "error": outcome.error})
            write_json_atomic(work / "error.json", record)
            replace_study_dir(work, self.failed_dir / uid)
            self._count("studies_failed")
            log.error("study %s: failed at %s: %s (inputs kept in %s)", uid, outcome.stage, outcome.error,
                      self.failed_dir / uid)
            self._set_last(uid, "failed", stage=outcome.stage, error=outcome.error)

    def _set_last(self, uid: str, status: str, **info: Any) -> None:
        with self._lock:
            self._last = {"study_instance_uid": uid, "status": status, "time": _now(), **info}

    def _current_results(self, uid: str) -> list[Dataset]:
        """The result objects (headers) this listener last sent for study ``uid``, or ``[]``."""
        import json

        try:
            record = json.loads((self.processed_dir / uid / "listener.json").read_text())
        except (OSError, ValueError):
            return []
        wanted = set(record.get("result_sop_instance_uids") or ())
        found = []
        for name in ("report_sc", "seg", "sr"):
            with contextlib.suppress(Exception):
                ds = pydicom.dcmread(self.results_dir / uid / f"{name}.dcm", stop_before_pixels=True)
                if str(ds.SOPInstanceUID) in wanted:
                    found.append(ds)
        return found

    def _reject(self, uid: str, previous: Sequence[Dataset], processor: Any) -> dict[str, Any]:
        """Send an IOCM rejection note for the result set ``previous`` that a new result of study
        ``uid`` (made from more of its instances) replaces; returns what to record about it."""
        from hippo.dicom.objects import make_rejection_note
        from hippo.pacs import deliver
        from pydicom.uid import generate_uid

        old = sorted(str(ds.SOPInstanceUID) for ds in previous)
        version = str((getattr(getattr(processor, "agent", None), "metadata", None) or {}).get("hippo_version", "0"))
        note = make_rejection_note(previous, model_version=version,
                                   series_instance_uid=generate_uid(entropy_srcs=["rejection-series", *old]),
                                   sop_instance_uid=generate_uid(entropy_srcs=["rejection", *old]))
        path = write_bytes_atomic(self.results_dir / uid / f"rejection_{note.SOPInstanceUID}.dcm", _encode(note))
        with self._lock:
            self._result_names.add(f"{note.SOPInstanceUID}{SUFFIX}")
        queued = False
        if self.pacs is not None:
            report = deliver([path], self.pacs, Outbox(self.outbox_dir))
            queued = bool(report.queued)
            if report.lost:
                log.error("study %s: rejection note %s neither delivered nor queued: %s", uid, note.SOPInstanceUID,
                          report.lost)
        log.info("study %s: the earlier result (%s) is superseded; rejection note %s %s", uid, ", ".join(old),
                 note.SOPInstanceUID, "queued in the outbox" if queued else "sent")
        return {"supersedes": old, "rejection_note": str(note.SOPInstanceUID)}

    @staticmethod
    def _result_uids(files: Mapping[str, str]) -> list[str]:
        import pydicom

        uids = []
        for key in ("report_sc", "seg", "sr"):
            if key in files:
                with contextlib.suppress(Exception):
                    uids.append(str(pydicom.dcmread(files[key], stop_before_pixels=True).SOPInstanceUID))
        return uids

    def _retry_outbox(self) -> None:
        """Flush the outbox every ``outbox_retry_seconds``, so that results wait for the PACS, not for
        the next study to arrive."""
        while not self._stop.wait(self.outbox_retry_seconds):
            self._flush_outbox()

    def _flush_outbox(self) -> None:
        """Send objects an earlier study could not deliver (before processing the next one)."""
        if self.pacs is None:
            return
        try:
            outbox = Outbox(self.outbox_dir)
            if len(outbox):
                report = outbox.flush(self.pacs)
                log.info("outbox %s: %d delivered, %d still waiting", outbox.root, len(report.delivered),
                         len(outbox))
        except Exception as exc:
            log.warning("outbox %s: flush failed (%s: %s)", self.outbox_dir, type(exc).__name__, exc)

    def _get_processor(self) -> Any:
        """The pipeline with the model loaded (once; thread-safe)."""
        with self._build_lock:
            if self._processor is None:
                try:
                    if self._factory is not None:
                        self._processor = self._factory()
                    else:
                        from hippo.deploy.pipeline import build_processor  # imports torch

                        opts = dict(self.processor_options)
                        self._processor = build_processor(
                            self.model_path, self.results_dir,
                            device=opts.pop("device", "cpu"), batch_size=int(opts.pop("batch_size", 64)),
                            precision=str(opts.pop("precision", "float32")),
                            backend=str(opts.pop("backend", "auto")),
                            pacs=None if self.pacs is None else vars(self.pacs).copy(),
                            outbox_dir=self.outbox_dir, **opts)
                    self._model_error = None
                    log.info("model loaded: %s", self.model_path or "processor factory")
                except Exception as exc:
                    self._model_error = f"{type(exc).__name__}: {exc}"
                    raise
            return self._processor

    # ------------------------------------------------------------------------------ start-up
    def _recover(self) -> None:
        """After a crash: studies in ``work/`` go back to ``incoming/``; half-replaced folders go."""
        remove_trash(self.processed_dir, self.failed_dir)
        for p in study_folders(self.work_dir):
            self._return_to_incoming(p.name, p, instance_names(p))
            log.info("study %s: interrupted while processing; back in %s", p.name, self.incoming_dir)

    def _resume(self) -> int:
        n = 0
        with self._lock:
            for p in study_folders(self.incoming_dir):
                if not instances(p):
                    with contextlib.suppress(OSError):
                        p.rmdir()
                    continue
                # not queued at once: the sender may have been cut off by the crash (see Restart)
                self._arrivals[p.name] = time.monotonic()
                log.info("study %s resumed: queued after %.1f s of quiet", p.name, self.quiet_seconds)
                n += 1
            self._counts["studies_resumed"] += n
        return n

    def _rerequest_partial(self) -> None:
        """Ask the PACS (C-MOVE to our own AE title) for the series of every study that may be only
        partly here, once per start: a crash mid-receive fails the PACS' routing job, which is not
        retried, so without this the rest of the study would never come. Instances we already hold
        arrive again under the same SOP Instance UID and change nothing."""
        studies = partial_studies(self.incoming_dir, self.failed_dir)
        if not studies:
            return
        try:
            statuses = move_series(dataclasses.replace(self.pacs, calling_ae=self.ae_title), self.ae_title, studies)
        except PacsError as exc:
            log.warning("re-request of %d partly received study(ies) failed: %s", len(studies), exc)
            return
        for (study_uid, series_uid), code in statuses.items():
            self._count("series_rerequested")
            log.info("study %s series %s re-requested from %s (C-MOVE status %s)", study_uid, series_uid,
                     self.pacs.destination, "none" if code is None else f"0x{code:04X}")

    def _load_result_names(self) -> None:
        import json

        for p in self.processed_dir.glob("*/listener.json"):
            with contextlib.suppress(OSError, ValueError, TypeError):
                record = json.loads(p.read_text())
                # the current result, the one it superseded and the rejection note are all ours
                for u in [*record.get("result_sop_instance_uids", []), *record.get("supersedes", []),
                          *([record["rejection_note"]] if record.get("rejection_note") else [])]:
                    self._result_names.add(f"{u}{SUFFIX}")

    # ------------------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> "Listener":
        """From ``conf/listen.yaml`` resolved to a plain dict. ``model_path: null`` takes the shipped
        default model, ``latest`` the newest ``<paths.log_dir>/**/model.pt`` (:mod:`hippo.weights`)."""
        from hippo.inference_settings import InferenceSettings

        lc = dict(cfg["listener"])  # every key has its default in conf/listen.yaml
        settings = InferenceSettings.from_config(cfg)
        model_path = settings.model_path
        if "processor_factory" not in overrides:
            model_path = settings.resolve_model(cfg["paths"]["log_dir"])
        options = processor_options(cfg)  # the same map as hippo.deploy's (hippo.deploy.options)
        kwargs: dict[str, Any] = dict(
            ae_title=lc["ae_title"], host=lc["host"],
            port=int(lc["port"]),
            allowed_calling_aets=list(lc["allowed_calling_aets"] or []),
            quiet_seconds=float(lc["quiet_seconds"]), workers=int(lc["workers"]),
            root=lc["dir"],
            incoming_dir=lc["incoming_dir"], work_dir=lc["work_dir"],
            processed_dir=lc["processed_dir"], failed_dir=lc["failed_dir"],
            results_dir=cfg["results_dir"], outbox_dir=cfg["outbox_dir"],
            model_path=model_path,
            pacs=cfg["pacs"] if cfg["send"] else None,
            processor_options=options,
            preload_model=bool(cfg["preload_model"]),
            stop_timeout=float(lc["stop_timeout"]),
            max_associations=int(lc["max_associations"]),
            max_object_mb=lc["max_object_mb"], min_free_mb=float(lc["min_free_mb"]),
            outbox_retry_seconds=float(lc["outbox_retry_seconds"]),
            rerequest_on_start=bool(lc["rerequest_on_start"]),
        )
        kwargs.update(overrides)
        return cls(**kwargs)


def run_listener(cfg: Mapping[str, Any], *, ready: Callable[[Listener], None] | None = None) -> int:
    """Run the listener described by ``cfg`` (``conf/listen.yaml`` resolved) until SIGTERM/SIGINT,
    then stop gracefully. Returns the exit code (0 clean, 1 a study outlived the stop timeout,
    2 it could not start: no model, a missing prior file, a config setting refused, port in use)."""
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies at INFO
    if not cfg.get("log_pynetdicom", False):
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        listener = Listener.from_config(cfg)
    except (FileNotFoundError, ValueError) as exc:  # no model or prior file; a setting refused
        log.error("error: %s", exc)
        return 2
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        try:
            listener.start()
        except Exception as exc:  # port in use, model not loadable, ...
            log.error("error: listener %s@%s:%d did not start: %s: %s", listener.ae_title, listener.host,
                      listener.port, type(exc).__name__, exc)
            return 2
        print(f"listening as {listener.ae_title}@{listener.host}:{listener.port} (model {listener.model_path}); "
              f"results to {listener.pacs.destination if listener.pacs else 'disk only'}", flush=True)
        if ready is not None:
            ready(listener)
        while not stop.wait(0.5):
            pass
    finally:
        ok = listener.stop() if listener.running or listener._threads else True
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"listener stopped ({'clean' if ok else 'a study was still running'})", flush=True)
    return 0 if ok else 1
