"""One process-pool batch runner for every batch of the package (``hippo.predict``'s scans,
``hippo.deploy``'s studies).

:func:`run_each` calls ``processor.process(item)`` for every item, where ``processor = factory()`` is
built once per process (so the model is loaded once per worker), and returns one result per item
in the order of ``items``; ``on_done(result)`` is called in this process as each item finishes.

* ``workers <= 1`` (or one item): everything runs here, with the threads torch and SimpleITK chose;
  a two-stage processor (``prepare``/``finish``, e.g. :class:`hippo.wholehead.run.ScanProcessor`)
  has the next item prepared in a thread while the current one is finished.
* ``workers > 1``: a :class:`~concurrent.futures.ProcessPoolExecutor` with the **spawn** start
  method (torch's OpenMP pool and SimpleITK's threads do not survive ``fork``). Each worker's
  initialiser caps torch/OpenMP and SimpleITK at ``threads_per_worker`` threads (default: the
  usable cores divided among the workers) before building its processor; ``factory`` must be
  picklable (a module-level function or class, or a ``functools.partial`` of one).
* Per-item isolation: whatever goes wrong for one item -- ``process`` raising any exception, the
  processor failing to build (stage ``"setup"``), the worker process dying (stage ``"worker"``) --
  becomes that item's result through ``failed(item, ItemFailure)``, and the batch goes on. A dead
  worker breaks a process pool; the items it had not finished are given one more try in a fresh
  pool, so one crash costs the others nothing. An ``on_done`` callback that raises is logged and
  does not stop the batch either.

No Hydra, torch or Lightning at import time.
"""

from __future__ import annotations

import logging
import os
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)

__all__ = ["ItemFailure", "run_each", "usable_cores", "cap_threads"]

T = TypeVar("T")
R = TypeVar("R")

#: environment variables that set the size of the thread pools of the numerical libraries at start-up
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


@dataclass(frozen=True)
class ItemFailure(Generic[T]):
    """Why one item has no result of its own: ``stage`` (``"process"``: ``process`` raised;
    ``"setup"``: the processor could not be built; ``"worker"``: the worker process died), the
    exception's type name and message, and the traceback text (empty for a dead worker)."""

    stage: str
    error_type: str
    message: str
    traceback: str = ""

    @property
    def error(self) -> str:
        """``"<ExceptionType>: <message>"``."""
        return f"{self.error_type}: {self.message}"

    @classmethod
    def from_exception(cls, stage: str, exc: BaseException) -> "ItemFailure":
        return cls(stage, type(exc).__name__, str(exc),
                   "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def cap_threads(n: int) -> None:
    """Cap the thread pools of torch/OpenMP/BLAS and SimpleITK of this process at ``n``: through the
    environment (read when those libraries start) and, for torch and SimpleITK when already
    imported or importable, through their own calls. Does not import torch (slow) when it is not
    imported yet: the environment then sizes its pool when it is."""
    import sys

    n = max(1, int(n))
    for name in THREAD_ENV:
        os.environ[name] = str(n)
    set_torch_threads = getattr(sys.modules.get("torch"), "set_num_threads", None)  # None while half-imported
    if set_torch_threads is not None:
        set_torch_threads(n)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    except ImportError:  # pragma: no cover - SimpleITK is a dependency
        pass


# ------------------------------------------------------------------------------- in a worker process
_PROCESSOR: Any = None
_SETUP_FAILURE: ItemFailure | None = None


def _init_worker(factory: Callable[[], Any], threads: int) -> None:
    """A worker's initialiser: cap the threads, then build the processor (model loaded once). A
    processor that cannot be built is remembered and becomes every item's ``"setup"`` failure
    (an initialiser that raises would only break the pool with no word of why)."""
    global _PROCESSOR, _SETUP_FAILURE
    cap_threads(threads)
    try:
        _PROCESSOR = factory()  # torch, imported by it (maybe in a thread), sizes its pool from the environment
    except Exception as exc:  # noqa: BLE001 - reported per item
        _SETUP_FAILURE = ItemFailure.from_exception("setup", exc)


def _guarded(stage: Callable[[Any], Any], arg: Any, item: Any) -> Any:
    """``stage(arg)``, or the :class:`ItemFailure` of ``item`` when it raises."""
    try:
        return stage(arg)
    except Exception as exc:  # noqa: BLE001 - one item never ends the batch
        log.debug("item %s failed:\n%s", item, traceback.format_exc())
        return ItemFailure.from_exception("process", exc)


def _process_one(processor: Any, item: Any) -> Any:
    return _guarded(processor.process, item, item)


def _serially(processor: Any, items: Sequence[Any]):
    """Yield ``(index, processor.process(item) or its ItemFailure)`` for each item in order, here.

    A two-stage processor -- one with ``prepare(item)`` and ``finish(prepared)`` whose composition is
    ``process`` -- has the next item's ``prepare`` run in a thread while this item is finished: for
    a whole-head scan, reading and registering the next one (file reads, SimpleITK: mostly outside
    the GIL) fill the cores the segmentation and the outputs leave idle. At most one item is
    prepared ahead (two scans in memory)."""
    prepare, finish = getattr(processor, "prepare", None), getattr(processor, "finish", None)
    if len(items) < 2 or not (callable(prepare) and callable(finish)):
        for i, item in enumerate(items):
            yield i, _process_one(processor, item)
        return

    pool = ThreadPoolExecutor(1, thread_name_prefix="hippo-prepare-next")
    try:
        ahead = pool.submit(_guarded, prepare, items[0], items[0])
        for i, item in enumerate(items):
            prepared = ahead.result()
            if i + 1 < len(items):
                ahead = pool.submit(_guarded, prepare, items[i + 1], items[i + 1])
            yield i, prepared if isinstance(prepared, ItemFailure) else _guarded(finish, prepared, item)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_in_worker(item: Any) -> Any:
    if _SETUP_FAILURE is not None:
        return _SETUP_FAILURE
    return _process_one(_PROCESSOR, item)


# ------------------------------------------------------------------------------------------- the runner
def run_each(
    items: Sequence[T],
    factory: Callable[[], Any],
    *,
    failed: Callable[[T, ItemFailure], R],
    workers: int = 1,
    on_done: Callable[[R], None] | None = None,
    threads_per_worker: int | None = None,
) -> list[R]:
    """``[processor.process(item) for item in items]`` with ``workers`` processes, isolated per item.

    Args:
        items: what to process (picklable when ``workers > 1``).
        factory: builds the processor, an object with ``process(item) -> result`` (and optionally
            ``close()``, called when a serial run ends); called once per process.
        failed: turns an item and its :class:`ItemFailure` into that item's result (a ``failed``
            record); called in this process.
        workers: processes; ``<= 1`` runs here.
        on_done: called here with each result as it completes (any order); its exceptions are
            logged, never raised.
        threads_per_worker: torch/SimpleITK threads per worker process; default
            ``usable_cores() // workers`` (at least 1). Serially: this process is capped only when given.

    Returns:
        One result per item, in the order of ``items``.
    """
    n = len(items)
    results: dict[int, R] = {}

    def finish(i: int, value: Any) -> None:
        if isinstance(value, ItemFailure):
            if value.traceback:
                log.debug("item %s failed at %s:\n%s", items[i], value.stage, value.traceback)
            value = failed(items[i], value)
        results[i] = value
        if on_done is not None:
            try:
                on_done(value)
            except Exception:  # noqa: BLE001 - a progress line must not end a batch
                log.exception("on_done failed for item %s (the batch goes on)", items[i])

    if workers <= 1 or n <= 1:
        if threads_per_worker:
            cap_threads(threads_per_worker)
        try:
            processor = factory()
        except Exception as exc:  # noqa: BLE001 - every item fails, naming why
            failure = ItemFailure.from_exception("setup", exc)
            for i in range(n):
                finish(i, failure)
            return [results[i] for i in range(n)]
        try:
            for i, value in _serially(processor, items):
                finish(i, value)
        finally:
            close = getattr(processor, "close", None)
            if callable(close):
                close()
        return [results[i] for i in range(n)]

    import multiprocessing as mp

    workers = min(int(workers), n)
    threads = int(threads_per_worker) if threads_per_worker else max(1, usable_cores() // workers)
    todo = list(range(n))
    for attempt in (1, 2):  # a second, fresh pool for what a dead worker left unfinished
        broken: list[int] = []
        broken_exc: BaseException | None = None
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(factory, threads)) as pool:
            futures = {pool.submit(_run_in_worker, items[i]): i for i in todo}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    value = fut.result()
                except BrokenProcessPool as exc:
                    broken.append(i)
                    broken_exc = exc
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be pickled
                    value = ItemFailure.from_exception("worker", exc)
                finish(i, value)
        if not broken:
            break
        if attempt == 1:
            log.warning("a worker process died (%s); %d unfinished item(s) get one more try in a fresh pool",
                        broken_exc, len(broken))
            todo = sorted(broken)
        else:
            for i in sorted(broken):
                finish(i, ItemFailure("worker", type(broken_exc).__name__,
                                      f"the worker process died while this item was running or waiting "
                                      f"(twice): {broken_exc}"))
    return [results[i] for i in range(n)]
