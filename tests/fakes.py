"""In-process stand-ins the tests share: one pynetdicom Storage SCP on loopback (the PACS, Orthanc
or the AI listener, as a test needs) and the polling waits around it.

Use ``StorageSCP(...)`` directly (``with StorageSCP() as scp:`` stops it) or the ``storage_scp``
factory fixture of conftest.py, which stops every server it made at teardown.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable, Iterable, NamedTuple

from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

#: what the product sends for one study: the report (SC), the SEG and the SR
RESULT_CLASSES = frozenset({SecondaryCaptureImageStorage, SegmentationStorage, Comprehensive3DSRStorage})


class Stored(NamedTuple):
    """One C-STORE request as the SCP saw it (UIDs as strings; "" where the dataset lacks one)."""

    study: str
    sop_class: str
    sop_instance: str
    calling_ae: str
    series: str
    series_description: str


#: ``script(record, n)`` -> a status code (0 = store), ``"abort"`` (abort the association before
#: storing) or ``"store+abort"`` (store, then abort: the sender never gets the answer); ``n`` is the
#: 1-based index of the C-STORE in its association. It may also have side effects (kill the sender).
Script = Callable[[Stored, int], "int | str"]


class StorageSCP:
    """A pynetdicom Storage SCP on 127.0.0.1 that records what it is sent.

    ``port``: 0 (default) lets the OS choose; ``self.port`` is the bound one. ``sop_classes`` are
    accepted with ``transfer_syntaxes`` (None: pynetdicom's default uncompressed ones);
    ``all_storage=True`` accepts every storage SOP class instead. Verification is always accepted.
    ``status`` is what a C-STORE answers unless ``script`` (see :data:`Script`) decides.

    Records: ``requests`` every C-STORE seen, ``stored`` the ones kept (answered success),
    ``aborted_at`` the SOP Instance UIDs at which it aborted, ``datasets`` the kept datasets with
    their file meta (``keep_datasets=True``), ``associations`` the number accepted and
    ``association_requests`` what each A-ASSOCIATE-RQ proposed (contexts, implementation UID and
    version name, maximum PDU length).
    """

    def __init__(self, port: int = 0, *, ae_title: str = "ORTHANC",
                 sop_classes: Iterable[str] = RESULT_CLASSES, transfer_syntaxes: list[str] | None = None,
                 all_storage: bool = False, require_called_aet: bool = False, status: int = 0x0000,
                 keep_datasets: bool = False) -> None:
        self.status = status
        self.script: Script | None = None
        self.keep_datasets = keep_datasets
        self.requests: list[Stored] = []
        self.stored: list[Stored] = []
        self.aborted_at: list[str] = []
        self.datasets: list = []
        self.associations = 0
        self.association_requests: list[dict] = []
        self.lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        if all_storage:
            ae.supported_contexts = StoragePresentationContexts
        for uid in sorted(sop_classes):
            ae.add_supported_context(uid, transfer_syntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_REQUESTED, self._on_request)]
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    # ------------------------------------------------------------------------------ event handlers
    def _on_request(self, event) -> None:
        rq = event.assoc.requestor
        with self.lock:
            self.association_requests.append({
                "contexts": [(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
                             for cx in rq.requested_contexts],
                "implementation_class_uid": rq.implementation_class_uid,
                "implementation_version_name": rq.implementation_version_name,
                "maximum_length": rq.maximum_length,
            })

    def _on_accepted(self, event) -> None:
        with self.lock:
            self.associations += 1

    def _on_store(self, event):
        ds = event.dataset
        record = Stored(str(ds.get("StudyInstanceUID", "")), str(event.request.AffectedSOPClassUID),
                        str(event.request.AffectedSOPInstanceUID), str(event.assoc.requestor.ae_title).strip(),
                        str(ds.get("SeriesInstanceUID", "")), str(ds.get("SeriesDescription", "")))
        n = getattr(event.assoc, "_fake_n", 0) + 1
        event.assoc._fake_n = n
        action = self.script(record, n) if self.script else self.status
        with self.lock:
            self.requests.append(record)
            if action in (0x0000, "store+abort"):
                self.stored.append(record)
                if self.keep_datasets:
                    ds.file_meta = event.file_meta
                    self.datasets.append(ds)
            if action in ("abort", "store+abort"):
                self.aborted_at.append(record.sop_instance)
        if action in ("abort", "store+abort"):
            event.assoc.abort()
            return 0xA700
        return action

    # ------------------------------------------------------------------------------------- queries
    def stored_uids(self) -> list[str]:
        """SOP Instance UIDs kept, in arrival order (repeats included)."""
        with self.lock:
            return [r.sop_instance for r in self.stored]

    def request_uids(self) -> list[str]:
        """SOP Instance UIDs of every C-STORE seen, in arrival order (repeats included)."""
        with self.lock:
            return [r.sop_instance for r in self.requests]

    def for_study(self, study_uid: str) -> list[Stored]:
        """What was kept of one study, in arrival order."""
        with self.lock:
            return [r for r in self.stored if r.study == study_uid]

    def count(self) -> int:
        with self.lock:
            return len(self.stored)

    def stored_sops(self, study_uid: str | None = None) -> Counter:
        """SOP Instance UID -> times kept (of one study, or of all)."""
        with self.lock:
            return Counter(r.sop_instance for r in self.stored if study_uid is None or r.study == study_uid)

    def result_classes(self, study_uid: str) -> Counter:
        """SOP class -> number of *distinct* SOP instances of it kept for the study."""
        with self.lock:
            return Counter(cls for cls, _ in {(r.sop_class, r.sop_instance) for r in self.stored
                                              if r.study == study_uid})

    def has_results(self, study_uid: str) -> bool:
        """Whether an SC, a SEG and an SR of the study were kept."""
        return set(self.result_classes(study_uid)) >= RESULT_CLASSES

    # ---------------------------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def __enter__(self) -> "StorageSCP":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` every ``interval`` s for up to ``timeout`` s; its last answer as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05) -> None:
    """:func:`wait_until`, failing the test (AssertionError naming ``what``) on a timeout."""
    if not wait_until(predicate, timeout, interval):
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
