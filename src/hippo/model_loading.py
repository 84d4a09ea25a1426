"""Loading the model in a background thread while the first input is read and registered.

Importing torch and reading the model file take 2-3 s on a small CPU; reading a scan or a DICOM
series and registering it to the template take about as long and mostly run outside the GIL
(SimpleITK, numpy, file reads). Both doors (``hippo.predict``: :class:`hippo.wholehead.run.ScanProcessor`;
``hippo.deploy``: :class:`hippo.deploy.pipeline.StudyProcessor`) overlap the two with
:class:`BackgroundLoad`, so that a one-scan run costs about the slower of them rather than their sum.

This module imports nothing heavy: the ``load`` callable does (e.g. ``hippo.infer``, torch).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class BackgroundLoad(Generic[T]):
    """Runs ``load()`` once in a thread, started at construction or, with ``start=False``, by
    :meth:`start` (or by the first :meth:`result`); :meth:`result` waits for it.

    When to start: as early as possible when the caller's next work runs outside the GIL (reading a
    NIfTI file, registering); after it when that work is Python-bound (parsing DICOM headers with
    pydicom), which would otherwise share one core with torch's import and both end late.

    The thread is not a daemon: a process must not exit while torch is still being imported in it
    (its C++ runtime aborts), e.g. when its only input failed before the model was needed.

    Args:
        load: builds the object (e.g. ``lambda: InferenceAgent.from_file(path)``).
        name: the thread's name (seen in stack dumps).
        start: start the thread now.
    """

    def __init__(self, load: Callable[[], T], *, name: str = "hippo-model-load", start: bool = True):
        self._load = load
        self._future: Future[T] = Future()
        self._thread = threading.Thread(target=self._run, name=name, daemon=False)
        self._started = False
        self._start_lock = threading.Lock()  # a batch's next study may start it from another thread
        if start:
            self.start()

    def start(self) -> None:
        """Start the thread (once; later calls, from any thread, do nothing)."""
        with self._start_lock:
            if not self._started:
                self._started = True
                self._thread.start()

    def _run(self) -> None:
        try:
            self._future.set_result(self._load())
        except BaseException as exc:  # noqa: BLE001 - re-raised in whoever waits for the result
            self._future.set_exception(exc)

    def result(self) -> T:
        """The loaded object (starting the thread if needed); re-raises what ``load()`` raised (each
        time it is asked)."""
        self.start()
        return self._future.result()

    def done(self) -> bool:
        """Whether ``load()`` has returned or raised."""
        return self._future.done()

    def close(self) -> None:
        """Wait for the thread to end, if it was started (call before the process exits)."""
        if self._started:
            self._thread.join()
