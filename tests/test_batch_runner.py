"""``hippo.batch_runner.run_each``, the one batch runner of ``hippo.predict`` and ``hippo.deploy``:
input order, completion callbacks, per-item isolation (an exception, a processor that cannot be
built, a worker process that dies, a callback that raises), spawned workers with capped threads.

The processors here are tiny (no model); the pool tests start real spawned processes (about a
second each)."""

from __future__ import annotations

import functools
import os
import time

from hippo.batch_runner import ItemFailure, run_each


class Square:
    """process(n) -> ("ok", n*n, pid); raises for the items in ``bad``; ``os._exit`` for ``die``."""

    def __init__(self, bad=(), die=(), sleep=0.0, die_marker=None):
        self.bad, self.die, self.sleep, self.die_marker = set(bad), set(die), sleep, die_marker
        self.closed = False

    def process(self, n):
        time.sleep(self.sleep * (n % 3))
        if n in self.bad:
            raise RuntimeError(f"item {n} is bad")
        if n in self.die and (self.die_marker is None or not os.path.exists(self.die_marker)):
            if self.die_marker is not None:
                open(self.die_marker, "w").close()  # dies once: the retry pool then succeeds
            os._exit(3)
        return ("ok", n * n, os.getpid())

    def close(self):
        self.closed = True


class Probe:
    """Reports what a worker sees: start method, thread caps of torch/OpenMP and SimpleITK."""

    def process(self, _):
        import multiprocessing as mp

        import SimpleITK as sitk
        import torch

        return ("ok", mp.get_start_method(allow_none=True), torch.get_num_threads(),
                sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), os.environ.get("OMP_NUM_THREADS"))


def broken_factory():
    raise FileNotFoundError("model.pt: model file not found")


def as_failure(item, why: ItemFailure):
    return ("failed", item, why.stage, why.error)


def test_serial_order_callbacks_and_isolation():
    seen = []
    made = []

    def factory():
        made.append(Square(bad={2}))
        return made[-1]

    out = run_each([1, 2, 3], factory, failed=as_failure, on_done=seen.append)
    assert [o[0] for o in out] == ["ok", "failed", "ok"]
    assert out[0][1] == 1 and out[2][1] == 9
    assert out[1] == ("failed", 2, "process", "RuntimeError: item 2 is bad")
    assert seen == out  # serial: completion order is input order
    assert len(made) == 1 and made[0].closed  # one processor, closed at the end


def test_a_processor_that_cannot_be_built_fails_every_item_naming_why():
    for workers in (1, 2):
        out = run_each([1, 2], broken_factory, failed=as_failure, workers=workers)
        assert out == [("failed", i, "setup", "FileNotFoundError: model.pt: model file not found") for i in (1, 2)]


def test_a_raising_callback_does_not_stop_the_batch(caplog):
    def explode(_):
        raise TypeError("unsupported format string passed to NoneType.__format__")

    out = run_each([1, 2, 3], Square, failed=as_failure, on_done=explode)
    assert [o[1] for o in out] == [1, 4, 9]
    assert "on_done failed" in caplog.text


def test_pool_keeps_input_order_and_isolates_items():
    seen = []
    items = list(range(7))
    out = run_each(items, functools.partial(Square, bad={4}, sleep=0.05), failed=as_failure, workers=2,
                   on_done=seen.append)
    assert [o[1] if o[0] == "ok" else None for o in out] == [0, 1, 4, 9, None, 25, 36]
    assert out[4] == ("failed", 4, "process", "RuntimeError: item 4 is bad")
    assert sorted(map(str, seen)) == sorted(map(str, out))  # every result seen once, as it completed
    pids = {o[2] for o in out if o[0] == "ok"}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_pool_workers_are_spawned_with_capped_threads():
    out = run_each([0, 1], Probe, failed=as_failure, workers=2, threads_per_worker=1)
    for status, method, torch_threads, itk_threads, omp in out:
        assert status == "ok", out
        assert method == "spawn"
        assert torch_threads == 1 and itk_threads == 1 and omp == "1"


def test_a_dying_worker_costs_only_its_own_item(tmp_path):
    """Item 3 kills its worker once: the pool breaks, the unfinished items get a fresh pool and all
    finish. An item that kills its worker every time fails with stage "worker", the rest finish."""
    once = functools.partial(Square, die={3}, die_marker=str(tmp_path / "died"))
    out = run_each(list(range(6)), once, failed=as_failure, workers=2)
    assert [o[0] for o in out] == ["ok"] * 6 and (tmp_path / "died").exists()

    always = functools.partial(Square, die={3})
    out = run_each([1, 3], always, failed=as_failure, workers=2)
    assert out[0][0] in ("ok", "failed") and out[1][0] == "failed" and out[1][2] == "worker"
    assert "worker process died" in out[1][3] or "terminated abruptly" in out[1][3]


def test_deploy_and_predict_use_the_runner():
    """Both batches go through run_each (no second pool in the package)."""
    import inspect

    import hippo.deploy.pipeline as deploy
    import hippo.wholehead.run as wholehead

    for module, fn in ((deploy, deploy.run_batch), (wholehead, wholehead.run_scans)):
        assert "run_each(" in inspect.getsource(fn)
        assert "ProcessPoolExecutor" not in inspect.getsource(module)


class TwoStage:
    """prepare(n) then finish(prepared); finishing item n waits (up to 10 s) until item n + 1 is being
    prepared, so a run that does not prepare ahead is seen; raises in either stage for chosen items."""

    def __init__(self, total, bad_prepare=(), bad_finish=()):
        import threading

        self.total = total
        self.bad_prepare, self.bad_finish = set(bad_prepare), set(bad_finish)
        self.started = {}
        self.lock = threading.Lock()
        self.overlapped = []
        self.threading = threading

    def _event(self, n):
        with self.lock:
            return self.started.setdefault(n, self.threading.Event())

    def process(self, n):
        return self.finish(self.prepare(n))

    def prepare(self, n):
        self._event(n).set()
        if n in self.bad_prepare:
            raise ValueError(f"item {n} cannot be read")
        return n, self.threading.current_thread().name

    def finish(self, prepared):
        n, where = prepared
        if n + 1 < self.total:
            self.overlapped.append(self._event(n + 1).wait(10.0))
        if n in self.bad_finish:
            raise RuntimeError(f"item {n} cannot be measured")
        return ("ok", n, where)


def test_serial_two_stage_processor_prepares_the_next_item_while_finishing_this_one():
    """hippo.predict's pipelining: the next scan is read and registered while this one is measured;
    results stay in input order, and a failure in either stage is that item's alone."""
    proc = TwoStage(6, bad_prepare={2}, bad_finish={3})
    done = []
    out = run_each(list(range(6)), lambda: proc, failed=as_failure, on_done=lambda r: done.append(r[1]))
    assert [r[1] for r in out] == list(range(6)) == done
    assert out[2] == ("failed", 2, "process", "ValueError: item 2 cannot be read")
    assert out[3] == ("failed", 3, "process", "RuntimeError: item 3 cannot be measured")
    assert [r[0] for r in out] == ["ok", "ok", "failed", "failed", "ok", "ok"]
    assert all(r[2].startswith("hippo-prepare-next") for r in out if r[0] == "ok")  # prepared in the thread
    assert proc.overlapped == [True] * 4   # each finish but the last saw the next item being prepared meanwhile
