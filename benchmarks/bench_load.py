"""Load benchmark of the AI listener: a burst of studies from several scanners at once.

    .venv/bin/python benchmarks/bench_load.py [--studies 50] [--senders 4] [--workers 1] [--model PATH]
                                              [--out outputs/benchmarks/load.json]

1. writes N + 1 + R small emulated studies (``hippo.scanner.write_study``: the HippoCrop series only,
   no distractors, flat folders, one StudyInstanceUID each, ``seed`` = 5000 + index) from the real
   Task04_Hippocampus images, or from ``hippo.data.synthetic.generate_dataset`` when the real data is
   absent; they are cached in ``<tempdir>/hippo_bench_load/`` and reused by later runs;
2. starts a fake Orthanc in this process (pynetdicom Storage SCP, AE ``ORTHANC``, free loopback
   port) that records every SC / SEG / SR it receives per StudyInstanceUID, with its arrival time;
3. starts the listener as ``python -m hippo.listen`` (a subprocess, as in ``hippo.network up``) on a
   free loopback port: quiet period 1 s, calling AE ``HIPPOSCANNER`` only, ``--workers`` pipeline
   threads, results to the fake Orthanc, every directory in a temporary work folder, and
   ``listener.max_associations`` as configured (``--max-associations`` can raise it);
4. one warm-up study (not counted), then the **baseline**: R studies (default 3) sent one at a time,
   each waiting for its 3 results: latency of a study sent alone (median);
5. the **burst**: S sender threads start together, each sending its share of the N studies with
   ``hippo.scanner.send_study`` (calling AE HIPPOSCANNER) back to back; per study the time its first
   C-STORE was issued (``Association.send_c_store`` of this process is wrapped to note it) and the
   time its 3rd result reached the fake Orthanc. A study with instances left unacknowledged is sent
   again (``--send-retries``, default 1), as a modality would;
6. waits (bounded by ``--timeout``) until every study has its 3 results, lets late arrivals settle,
   and checks: exactly one SC, one SEG and one SR per study (distinct SOP Instance UIDs: none lost,
   no duplicate result set), nothing in the listener's ``failed/``, every instance sent is in
   ``processed/<StudyUID>/``;
7. prints wall time, studies/s, latency p50/p90/p99/max (first C-STORE -> 3rd result) and as ratios
   against the baseline, the burst's ingest rate (instances acknowledged by the listener per second,
   and as a ratio against one study sent alone), the listener's own per-study processing time, what
   went wrong on the way (retries, lost responses, partial studies, re-sent results), peak RSS and
   whether the machine was shared; every figure goes to ``--out`` as JSON.

Any failed check exits 1 (``BENCHMARK FAILED: ...``; the listener's log is kept next to ``--out``).
When no study finishes sending for 15 s, the senders' stacks are printed and the listener is asked
(SIGUSR1, faulthandler registered by a ``sitecustomize`` on its PYTHONPATH only) for its stacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deploy import (  # noqa: E402  (shared helpers of the benchmarks)
    SHARED_LOAD,
    SHARED_OTHERS_CORES,
    BenchmarkError,
    CpuMeter,
    ensure_model,
    log,
    pct,
    rss_mib,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "src/hippo/weights/hippocampus_25d.pt"  # the shipped default model
DEFAULT_DATA = REPO.parent / "shared/data/Task04_Hippocampus"  # ../shared/data beside the project
DEFAULT_OUT = REPO / "outputs/benchmarks/load.json"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "hippo_bench_load"
OBJECTS_PER_STUDY = 3  # SC report, SEG, SR
RESULT_CLASSES = ("Secondary Capture Image Storage", "Segmentation Storage", "Comprehensive 3D SR Storage")
CALLING_AE = "HIPPOSCANNER"
LISTENER_AE = "HIPPOAI"
PACS_AE = "ORTHANC"
SEED_BASE = 5000
CACHE_VERSION = 1
SEND_TIMEOUT_S = 30.0  # send_study's network/DIMSE timeout (its default)
STALL_S = 15.0  # no study finished sending for this long: print where the senders wait


# ------------------------------------------------------------------------------------ studies
def _images(root: Path) -> list[Path]:
    return sorted(p for p in (root / "imagesTr").glob("*.nii.gz") if not p.name.startswith("."))


def build_studies(n: int, data_root: Path, cache: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``n`` HippoCrop-only studies (reused from ``cache`` when already written), each a dict
    ``{dir, uid, case, n_instances}``, and where they came from."""
    from hippo.fileio import write_json_atomic
    from hippo.scanner import write_study

    images = _images(data_root) if (data_root / "imagesTr").is_dir() else []
    if images:
        source: dict[str, Any] = {"kind": "real", "root": str(data_root)}
        key = f"real-v{CACHE_VERSION}"
    else:
        from hippo.data.synthetic import generate_dataset

        n_syn = min(n, 40)  # cycled below: a study is the case's image with its own seed (own UIDs)
        syn_root = generate_dataset(cache / f"synthetic-data-{n_syn}", n_cases=n_syn, seed=0)
        images = _images(syn_root)
        source = {"kind": "synthetic", "root": str(syn_root),
                  "why": f"real data not found under {data_root}"}
        key = f"synthetic{n_syn}-v{CACHE_VERSION}"
    if not images:
        raise BenchmarkError(f"no images to build studies from under {source['root']}")
    studies, written = [], 0
    for i in range(n):
        image = images[i % len(images)]
        seed = SEED_BASE + i
        sdir = cache / key / f"{image.name.replace('.nii.gz', '')}_s{seed}"
        manifest_path = sdir / "bench_manifest.json"
        entry = None
        if manifest_path.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError):
                m = json.loads(manifest_path.read_text())
                files = list((sdir / "study").glob("*.dcm"))
                if m["image"] == str(image) and m["seed"] == seed and len(files) == m["n_instances"]:
                    entry = m
        if entry is None:
            shutil.rmtree(sdir, ignore_errors=True)
            manifest = write_study(image, sdir / "study", distractors=False, seed=seed, nested=False)
            n_inst = len(list((sdir / "study").glob("*.dcm")))
            entry = {"image": str(image), "seed": seed, "uid": manifest["study_instance_uid"], "n_instances": n_inst}
            write_json_atomic(manifest_path, entry)  # last: marks the cached study complete
            written += 1
        studies.append({"dir": sdir / "study", "uid": entry["uid"], "case": image.name,
                        "n_instances": int(entry["n_instances"])})
    uids = [s["uid"] for s in studies]
    if len(set(uids)) != len(uids):
        raise BenchmarkError("two generated studies share a StudyInstanceUID")
    source.update(cache=str(cache / key), written=written, reused=n - written,
                  distinct_images=len({s["case"] for s in studies}))
    return studies, source


# ------------------------------------------------------------------------------------ fake PACS
class FakeOrthanc:
    """Storage SCP (AE ORTHANC, 127.0.0.1:<free port>) for SC, SEG and Comprehensive 3D SR: per
    StudyInstanceUID the arrival time of every object, its SOP class and SOP Instance UID."""

    def __init__(self, ae_title: str = PACS_AE):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (Comprehensive3DSRStorage, SecondaryCaptureImageStorage,
                                          SegmentationStorage, Verification)

        self.ae_title = ae_title
        self.lock = threading.Lock()
        self.arrivals: dict[str, list[tuple[float, str, str]]] = defaultdict(list)  # study -> (t, class, sop uid)
        ae = AE(ae_title=ae_title)
        ae.maximum_associations = 16
        for uid in (SecondaryCaptureImageStorage, SegmentationStorage, Comprehensive3DSRStorage, Verification):
            ae.add_supported_context(uid)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self.server.server_address[1])

    def _on_store(self, event) -> int:
        t = time.perf_counter()
        ds = event.dataset
        with self.lock:
            self.arrivals[str(ds.StudyInstanceUID)].append((t, str(ds.SOPClassUID.name), str(ds.SOPInstanceUID)))
        return 0x0000

    @staticmethod
    def _distinct(objs: list[tuple[float, str, str]]) -> list[tuple[float, str, str]]:
        """First arrival of each SOP Instance UID (a re-sent copy of the same object is not a new one)."""
        seen, out = set(), []
        for o in objs:
            if o[2] not in seen:
                seen.add(o[2])
                out.append(o)
        return out

    def count(self, uid: str) -> int:
        """Distinct objects (SOP Instance UIDs) received for the study."""
        with self.lock:
            return len({o[2] for o in self.arrivals.get(uid, ())})

    def complete_at(self, uid: str) -> float | None:
        """Arrival time of the study's 3rd distinct object (None before)."""
        with self.lock:
            got = self._distinct(self.arrivals.get(uid, []))
        return got[OBJECTS_PER_STUDY - 1][0] if len(got) >= OBJECTS_PER_STUDY else None

    def retransmissions(self) -> int:
        """Objects received again with a SOP Instance UID already received (a sender's retry)."""
        with self.lock:
            return sum(len(v) - len({o[2] for o in v}) for v in self.arrivals.values())

    def snapshot(self) -> dict[str, list[tuple[float, str, str]]]:
        with self.lock:
            return {k: list(v) for k, v in self.arrivals.items()}

    def stop(self) -> None:
        self.server.shutdown()


def check_results(pacs: FakeOrthanc, expected: list[str], label: str) -> None:
    """Exactly one SC, one SEG and one SR (distinct SOP Instance UIDs) for each expected study, and
    nothing else. The same object received twice (a retry after a lost response) counts once."""
    got = pacs.snapshot()
    problems = []
    for uid in expected:
        objs = FakeOrthanc._distinct(got.get(uid, []))
        classes = Counter(c for _, c, _ in objs)
        if len(objs) != OBJECTS_PER_STUDY or any(classes.get(c, 0) != 1 for c in RESULT_CLASSES):
            problems.append(f"{uid}: {len(objs)} object(s) {dict(classes)}")
    extra = sorted(set(got) - set(expected))
    if extra:
        problems.append(f"results for unexpected studies: {extra}")
    if problems:
        raise BenchmarkError(f"{label}: expected one SC, SEG and SR per study; "
                             + f"{len(problems)} problem(s):\n  " + "\n  ".join(problems[:20]))


# ------------------------------------------------------------------------------------ sending
class FirstStoreClock:
    """Records when the first C-STORE of the study a thread is sending was issued: wraps
    ``pynetdicom.association.Association.send_c_store`` (this process only; the listener runs in
    its own process and is untouched) and notes the time of the first call per thread/study."""

    def __init__(self) -> None:
        from pynetdicom.association import Association

        self._local = threading.local()
        self._cls = Association
        self._orig = Association.send_c_store
        clock = self

        def send_c_store(assoc, *a, **kw):
            rec = getattr(clock._local, "record", None)
            if rec is not None and "first_store" not in rec:
                rec["first_store"] = time.perf_counter()
            status = clock._orig(assoc, *a, **kw)
            if rec is not None and status and int(status.get("Status", -1)) == 0:
                rec.setdefault("acks", []).append(time.perf_counter())  # acknowledged by the listener
            return status

        Association.send_c_store = send_c_store

    def send(self, study: dict[str, Any], port: int, retries: int = 0) -> dict[str, Any]:
        """``send_study`` of one study to the listener, timed; never raises (errors recorded).

        When instances were not acknowledged (a DIMSE timeout, the association lost), the whole study
        is sent again, up to ``retries`` times, as a modality would; ``first_store`` stays the first
        attempt's, ``attempts`` and ``retry_reasons`` say what happened."""
        from hippo.scanner import send_study

        rec: dict[str, Any] = {"uid": study["uid"], "call": time.perf_counter(), "attempts": 0, "retry_reasons": []}
        self._local.record = rec
        try:
            while True:
                rec["attempts"] += 1
                try:
                    res = send_study(study["dir"], "127.0.0.1", port, called_ae=LISTENER_AE, calling_ae=CALLING_AE,
                                     timeout_s=SEND_TIMEOUT_S)
                    rec.update(sent=res["sent"], failed=res["failed"], failures=res["failures"][:3])
                except Exception as exc:
                    rec.update(sent=0, failed=study["n_instances"], failures=[f"{type(exc).__name__}: {exc}"])
                if not rec["failed"] or rec["attempts"] > retries:
                    break
                rec["retry_reasons"].append(rec["failures"][0])
        finally:
            rec["done"] = time.perf_counter()
            self._local.record = None
        rec.setdefault("first_store", rec["done"])
        return rec

    def restore(self) -> None:
        self._cls.send_c_store = self._orig


def wait_results(pacs: FakeOrthanc, uids: list[str], timeout: float, label: str,
                 progress: Callable[[int], None] | None = None) -> None:
    """Until every study in ``uids`` has its 3 results; ``progress(done)`` is called on every poll
    (it may raise :class:`BenchmarkError` to give up early)."""
    deadline = time.monotonic() + timeout
    while True:
        done = sum(pacs.count(u) >= OBJECTS_PER_STUDY for u in uids)
        if progress is not None:
            progress(done)
        if done == len(uids):
            return
        if time.monotonic() > deadline:
            missing = {u: pacs.count(u) for u in uids if pacs.count(u) < OBJECTS_PER_STUDY}
            raise BenchmarkError(f"{label}: after {timeout:.0f} s, {len(missing)} of {len(uids)} studies without "
                                 f"their {OBJECTS_PER_STUDY} results: {dict(list(missing.items())[:10])}")
        time.sleep(0.05)


def send_alone(clock: FirstStoreClock, study: dict[str, Any], port: int, pacs: FakeOrthanc,
               timeout: float, label: str, retries: int) -> dict[str, Any]:
    rec = clock.send(study, port, retries)
    if rec["failed"] or rec["sent"] != study["n_instances"]:
        raise BenchmarkError(f"{label}: sending {study['uid']} failed: {rec}")
    wait_results(pacs, [study["uid"]], timeout, label)
    rec["complete"] = pacs.complete_at(study["uid"])
    rec["latency_s"] = rec["complete"] - rec["first_store"]
    rec["send_s"] = rec["acks"][-1] - rec["first_store"]
    rec["n_instances"] = study["n_instances"]
    return rec


class PynetdicomLog(logging.Handler):
    """Keeps pynetdicom's warnings and errors of this process (senders, fake Orthanc) off the console
    and counts them; ``Received unexpected C-STORE-RSP`` is pynetdicom's association reactor taking
    the response that ``send_c_store`` waits for (the sender then hits its DIMSE timeout)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        lg = logging.getLogger("pynetdicom")
        lg.setLevel(logging.WARNING)
        lg.propagate = False
        lg.handlers = [self]

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        key = ("response taken by the reactor" if msg.startswith("Received unexpected") else
               "DIMSE timeout" if "DIMSE timeout" in msg else
               "association rejected" if "Association Rejected" in msg else
               "connection refused" if "Connection refused" in msg or "unable to connect" in msg else None)
        if key:
            with self._counts_lock:
                self.messages[key] += 1

    def reset(self) -> None:
        with self._counts_lock:
            self.messages.clear()

    def counts(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self.messages)


def count_in_log(text: str) -> dict[str, int]:
    """What the listener's log says about trouble (pynetdicom WARNINGs are in it)."""
    return {"response taken by the reactor": text.count("Received unexpected C-STORE-RSP"),
            "association rejected": text.count(" rejected (allowed calling AEs"),
            "study failed": text.count(": failed at "),
            "results put in the outbox": text.count("object(s) queued in"),
            "result C-STORE retries": text.count("retrying ")}


def _pynetdicom_version() -> str:
    import pynetdicom

    return str(pynetdicom.__version__)


# ------------------------------------------------------------------------------------ listener
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _override(value: Any) -> str:
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9_./:+-]+", text) else "'" + text.replace("'", "\\'") + "'"


class ListenerProcess:
    """``python -m hippo.listen`` with every directory under ``work``; stdout/stderr to a log file."""

    def __init__(self, model: Path, work: Path, port: int, pacs_port: int, quiet_s: float, workers: int,
                 max_associations: int | None = None):
        self.port, self.work = port, work
        self.root = work / "network" / "listener"
        self.log_path = work / "listener.log"
        self.cmd = [sys.executable, "-m", "hippo.listen", f"model_path={_override(model)}",
                    f"paths.log_dir={_override(work)}", f"listener.port={port}",
                    f"listener.ae_title={LISTENER_AE}", f"listener.allowed_calling_aets=[{CALLING_AE}]",
                    f"listener.quiet_seconds={quiet_s}", f"listener.workers={workers}",
                    "pacs.host=127.0.0.1", f"pacs.port={pacs_port}", f"pacs.called_ae={PACS_AE}"]
        if max_associations is not None:
            self.cmd.append(f"listener.max_associations={int(max_associations)}")
        # sitecustomize (only on this process's PYTHONPATH) registers faulthandler on SIGUSR1, so that
        # a stalled listener can be asked for every thread's stack (into its log)
        diag = work / "listener_diag"
        diag.mkdir(parents=True, exist_ok=True)
        (diag / "sitecustomize.py").write_text(
            "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1, all_threads=True)\n")
        pythonpath = os.pathsep.join(p for p in (str(diag), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HIPPO_ROOT": str(work), "PYTHONPATH": pythonpath}
        self._log = open(self.log_path, "w")
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Until the listener answers C-ECHO (model preloaded before it listens); seconds taken."""
        import logging

        from hippo.pacs import PacsConfig, echo

        cfg = PacsConfig(port=self.port, called_ae=LISTENER_AE, calling_ae=CALLING_AE, retries=0, timeout=2)
        deadline = time.monotonic() + timeout
        quiet = logging.getLogger("hippo.pacs")
        level, quiet.level = quiet.level, logging.ERROR
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchmarkError(f"the listener exited with {self.proc.returncode}:\n{self.log_tail()}")
                if echo(cfg):
                    return time.perf_counter() - self.t_spawn
                time.sleep(0.25)
        finally:
            quiet.level = level
        raise BenchmarkError(f"the listener did not answer C-ECHO within {timeout:.0f} s:\n{self.log_tail()}")

    def proc_status(self) -> dict[str, float]:
        """Peak and current RSS (MiB) and CPU seconds of the listener process, from /proc."""
        out: dict[str, float] = {}
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
        return out

    def cpu_s(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            return 0.0

    def dump_stacks(self) -> None:
        """Every thread's stack of the listener into its log (faulthandler, see above)."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGUSR1)

    def rejected_associations(self) -> int:
        """Associations the listener rejected so far (its log: one WARNING per rejection)."""
        return self.log_tail(10**8).count(" rejected (allowed calling AEs")

    def stop(self, timeout: float = 120.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


class LoadCpuMeter(CpuMeter):
    """:class:`CpuMeter` that also counts the (not yet waited-for) listener process as ours."""

    def __init__(self, listener: ListenerProcess) -> None:
        self.listener = listener
        super().__init__()

    def _ours(self) -> float:  # type: ignore[override]
        return CpuMeter._ours() + self.listener.cpu_s()


def listener_records(root: Path, uids: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for uid in uids:
        with contextlib.suppress(OSError, ValueError):
            out[uid] = json.loads((root / "processed" / uid / "listener.json").read_text())
    return out


# ------------------------------------------------------------------------------------ phases
def burst(clock: FirstStoreClock, studies: list[dict[str, Any]], senders: int, port: int, pacs: FakeOrthanc,
          timeout: float, listener: ListenerProcess, retries: int) -> tuple[list[dict[str, Any]], float, float]:
    """S threads, each sending its share (study i -> thread i % S) back to back; returns the
    per-study records, the burst's start and the time the last result arrived."""
    shares = [studies[k::senders] for k in range(senders)]
    records: list[dict[str, Any]] = []
    rec_lock = threading.Lock()

    def run(k: int, share: list[dict[str, Any]]) -> None:
        start.wait()
        for s in share:
            rec = clock.send(s, port, retries)
            rec["n_instances"], rec["sender"] = s["n_instances"], k
            with rec_lock:
                records.append(rec)

    threads = [threading.Thread(target=run, args=(k, sh), name=f"sender-{k}", daemon=True)
               for k, sh in enumerate(shares) if sh]
    start = threading.Barrier(len(threads) + 1)
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    uids = [s["uid"] for s in studies]
    n = len(uids)
    state = {"next": time.monotonic() + 10.0, "last_done": -1, "sent": 0, "sent_at": time.monotonic(),
             "dumped": False}

    def progress(done: int) -> None:
        if not any(t.is_alive() for t in threads):  # every study sent (or tried): a failed send gives up now
            with rec_lock:
                bad = [r for r in records if r["failed"]]
            if bad:
                reasons = Counter(str(f) for r in bad for f in r["failures"][:1])
                raise BenchmarkError(
                    f"burst: {len(bad)} of {n} studies not (fully) sent; the listener rejected "
                    f"{listener.rejected_associations()} association(s) so far. Reasons: {dict(reasons)}")
        now = time.monotonic()
        with rec_lock:
            n_sent = len(records)
        if n_sent != state["sent"]:
            state["sent"], state["sent_at"] = n_sent, now
        elif n_sent < n and now - state["sent_at"] > STALL_S and not state["dumped"]:
            state["dumped"] = True  # every sender waited STALL_S s: show where (this process only)
            frames = sys._current_frames()
            log(f"  STALL: no study finished sending for {STALL_S:.0f} s; the sender threads are at:")
            for t in threads:
                if t.is_alive() and t.ident in frames:
                    stack = traceback.format_stack(frames[t.ident])[-4:]
                    log(f"    {t.name}:\n" + "".join("      " + ln.strip().replace("\n", "\n      ") + "\n"
                                                   for ln in stack).rstrip())
            import faulthandler

            with open(listener.work / "bench_stacks.txt", "w") as fh:
                faulthandler.dump_traceback(fh, all_threads=True)
            listener.dump_stacks()
            log(f"  the listener's thread stacks: in its log {listener.log_path} (kept next to --out on failure)")
        if done != n and now < state["next"]:
            return
        with rec_lock:
            sent = len(records)
        if done != state["last_done"] or done == n:
            log(f"  t={time.perf_counter() - t0:6.1f} s: {sent}/{n} studies sent, {done}/{n} with their "
                f"{OBJECTS_PER_STUDY} results")
        state["next"], state["last_done"] = now + 10.0, done

    wait_results(pacs, uids, timeout, "burst", progress)
    for t in threads:
        t.join(timeout=60)
    t_end = max(pacs.complete_at(u) for u in uids)
    return records, t0, t_end


def stats(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99), "max": float(max(values)),
            "min": float(min(values)), "mean": float(np.mean(values))}


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=50, help="studies in the burst (default 50)")
    p.add_argument("--senders", type=int, default=4, help="concurrent sender threads (default 4)")
    p.add_argument("--workers", type=int, default=1, help="the listener's pipeline threads (default 1)")
    p.add_argument("--baseline", type=int, default=3,
                   help="studies sent alone, one at a time, for the baseline latency (default 3)")
    p.add_argument("--quiet-seconds", type=float, default=1.0, help="the listener's quiet period (default 1)")
    p.add_argument("--max-associations", default="config",
                   help="the listener's listener.max_associations: 'config' (default: its configured value, 10), "
                        "'auto' (studies + baseline + senders + 9), or a number")
    p.add_argument("--send-retries", type=int, default=1,
                   help="times a sender sends a study again when instances were not acknowledged (default 1)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds to wait for the burst's results (default 900)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help=f"model file (default {DEFAULT_MODEL.relative_to(REPO)}; missing: a random-init UNet)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"JSON result file, or a directory to write load.json into (default "
                        f"{DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA,
                   help=f"Decathlon Task04 root (default {DEFAULT_DATA})")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"where generated studies are kept between runs (default {DEFAULT_CACHE})")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory (listener dirs, log)")
    args = p.parse_args(argv)
    if args.send_retries < 0:
        p.error("--send-retries must be >= 0")
    if min(args.studies, args.senders, args.workers, args.baseline) < 1:
        p.error("--studies, --senders, --workers and --baseline must be >= 1")
    if args.quiet_seconds < 0 or args.timeout <= 0:
        p.error("--quiet-seconds must be >= 0 and --timeout > 0")
    if args.max_associations == "auto":
        # every send_study leaves a TCP reachability probe that holds a slot for the listener's ACSE
        # timeout (30 s); room for all of them, the C-ECHO readiness polls and the real associations
        args.max_associations = args.studies + args.baseline + 1 + args.senders + 8
    elif args.max_associations == "config":
        args.max_associations = None
    else:
        try:
            args.max_associations = int(args.max_associations)
        except ValueError:
            p.error(f"--max-associations: 'auto', 'config' or a number, got {args.max_associations!r}")
        if args.max_associations < 1:
            p.error("--max-associations must be >= 1")
    if args.out.suffix != ".json":
        args.out = args.out / "load.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # refused connections while the listener starts, rejections, lost responses: counted and reported
    net_log = PynetdicomLog()
    t_start = time.perf_counter()
    cpus = os.cpu_count() or 1
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_load_"))
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpu_count": cpus, "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": load_start},
    }
    pacs = listener = clock = None
    try:
        import hippo

        result["machine"]["hippo"] = getattr(hippo, "__version__", "?")
        log(f"== hippo listener load benchmark: burst of {args.studies} studies from {args.senders} senders, "
            f"listener workers {args.workers}, quiet period {args.quiet_seconds:g} s, {cpus} CPU cores")
        if load_start[0] > SHARED_LOAD:
            log(f"NOTE: 1-min load average {load_start[0]:.2f} > {SHARED_LOAD} before starting (1/5/15 min: "
                f"{load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}): other jobs are running, "
                "figures are from a shared machine")
        model, model_kind = ensure_model(args.model, work)
        result["model"] = {"path": str(model), "kind": model_kind}
        log(f"model: {model} ({model_kind})")

        t = time.perf_counter()
        all_studies, source = build_studies(args.studies + 1 + args.baseline, args.data_root, args.cache)
        warmup, base_studies, burst_studies = (all_studies[0], all_studies[1:1 + args.baseline],
                                               all_studies[1 + args.baseline:])
        result["data"] = {**source, "build_s": time.perf_counter() - t,
                          "instances_per_study": stats([s["n_instances"] for s in all_studies])}
        n_inst = [s["n_instances"] for s in burst_studies]
        what = (f"the real data {source['root']}" if source["kind"] == "real"
                else f"SYNTHETIC data ({source['why']})")
        log(f"data: {len(all_studies)} HippoCrop-only studies from {what} (1 warm-up + {args.baseline} baseline + "
            f"{args.studies} burst; {source['distinct_images']} distinct images; {min(n_inst)}-{max(n_inst)} "
            f"instances each, {sum(n_inst)} in the burst); cache {source['cache']}: {source['written']} written, "
            f"{source['reused']} reused ({result['data']['build_s']:.1f} s)")

        pacs = FakeOrthanc()
        port = free_port()
        listener = ListenerProcess(model, work, port, pacs.port, args.quiet_seconds, args.workers,
                                   args.max_associations)
        log(f"fake Orthanc: {pacs.ae_title}@127.0.0.1:{pacs.port} (SC, SEG, Comprehensive 3D SR)")
        log(f"listener: {' '.join(['python'] + listener.cmd[1:3])} ... ({LISTENER_AE}@127.0.0.1:{port}, "
            f"calling AE {CALLING_AE} only, log {listener.log_path})")
        if args.max_associations is not None:
            log(f"NOTE: listener.max_associations={args.max_associations} (configured: 10). Each send_study opens "
                "a TCP reachability probe first, and the listener counts that connection as an association until "
                "its 30 s ACSE timeout; with 10 slots a burst of more than a few studies is rejected "
                "('Local limit exceeded'). --max-associations config reproduces that")
        ready_s = listener.wait_ready()
        result["listener_start_s"] = ready_s
        log(f"listener answered C-ECHO {ready_s:.1f} s after spawn (interpreter, imports, Hydra, model load)")
        clock = FirstStoreClock()
        net_log.reset()  # the refused connections while the listener started are not trouble
        cpu: dict[str, Any] = {}

        log("\n== 1. baseline: one study at a time (after one warm-up study)")
        meter = LoadCpuMeter(listener)
        w = send_alone(clock, warmup, port, pacs, 120.0, "warm-up", args.send_retries)
        base = [send_alone(clock, s, port, pacs, 120.0, "baseline", args.send_retries) for s in base_studies]
        cpu["baseline"] = meter.read()
        check_results(pacs, [warmup["uid"]] + [s["uid"] for s in base_studies], "baseline")
        base_lat = [r["latency_s"] for r in base]
        base_ingest = [r["n_instances"] / r["send_s"] for r in base if r["send_s"] > 0]
        base_latency = pct(base_lat, 50)
        base_ingest_rate = pct(base_ingest, 50)
        recs = listener_records(listener.root, [s["uid"] for s in base_studies])
        base_proc = [r["seconds"] for r in recs.values()]
        result["baseline"] = {"warmup_latency_s": w["latency_s"], "latencies_s": base_lat,
                              "latency_s": base_latency, "ingest_instances_per_s": base_ingest_rate,
                              "listener_processing_s": base_proc}
        log(f"warm-up study: {w['latency_s']:.2f} s (not counted)")
        log(f"study sent alone: latency median {base_latency:.2f} s over {len(base)} "
            f"({', '.join(f'{x:.2f}' for x in base_lat)}); = quiet period {args.quiet_seconds:g} s + listener "
            f"pipeline median {pct(base_proc, 50):.2f} s + send/queue/transfer; "
            f"ingest of one sender alone {base_ingest_rate:.0f} instances/s")

        log(f"\n== 2. burst: {args.studies} studies from {args.senders} sender threads at once "
            f"(listener workers {args.workers})")
        meter = LoadCpuMeter(listener)
        records, t0, t_end = burst(clock, burst_studies, args.senders, port, pacs, args.timeout, listener,
                                   args.send_retries)
        settle = max(3.0, 2 * args.quiet_seconds + 1.0)
        time.sleep(settle)  # a late duplicate result set would show up here
        cpu["burst"] = meter.read()
        check_results(pacs, [warmup["uid"]] + [s["uid"] for s in base_studies + burst_studies], "burst")
        failed = sorted(p.name for p in (listener.root / "failed").iterdir()) \
            if (listener.root / "failed").is_dir() else []
        if failed:
            raise BenchmarkError(f"burst: {len(failed)} studies in the listener's failed/: {failed[:5]}")
        sent_by_uid = {r["uid"]: r["sent"] for r in records}
        lost_inputs = {}
        for s in burst_studies:
            n_in = len(list((listener.root / "processed" / s["uid"]).glob("*.dcm")))
            if n_in != s["n_instances"] or sent_by_uid.get(s["uid"]) != s["n_instances"]:
                lost_inputs[s["uid"]] = {"files": s["n_instances"], "sent": sent_by_uid.get(s["uid"]),
                                         "in_processed": n_in}
        if lost_inputs:
            raise BenchmarkError(f"burst: instances lost between sender and listener: {lost_inputs}")
        recs = listener_records(listener.root, [s["uid"] for s in burst_studies])
        if len(recs) != len(burst_studies):
            raise BenchmarkError(f"burst: listener.json missing for {len(burst_studies) - len(recs)} studies")
        # taken before complete (a sender paused longer than the quiet period): the listener processed a
        # part (which fails: missing slices), then the rest merged with it (a resent study counts as new)
        split = sorted(u for u, r in recs.items() if r.get("new_instances") != r.get("instances"))
        retried = sorted(r["uid"] for r in records if r["attempts"] > 1)

        for r in records:
            r["complete"] = pacs.complete_at(r["uid"])
            r["latency_s"] = r["complete"] - r["first_store"]
        lat = [r["latency_s"] for r in records]
        first = min(r["first_store"] for r in records)
        send_end = max(r["done"] for r in records)
        wall = t_end - first
        acks = sorted(t for r in records for t in r.get("acks", []))
        instances = sum(r["sent"] for r in records)
        ingest_window = acks[-1] - first
        ingest = len(acks) / ingest_window
        # while every sender still had studies to send (until the first one finished its share)
        all_busy_end = min(max(r["done"] for r in records if r["sender"] == k) for k in {r["sender"] for r in records})
        n_busy = sum(t <= all_busy_end for t in acks)
        ingest_busy = n_busy / (all_busy_end - first) if all_busy_end > first else ingest
        proc = [r["seconds"] for r in recs.values()]
        setup = [r["first_store"] - r["call"] for r in records]
        lstat = stats(lat)
        ratios = {k: lstat[k] / base_latency for k in ("p50", "p90", "p99", "max")}
        result["burst"] = {
            "studies": len(records), "senders": args.senders, "workers": args.workers,
            "wall_s": wall, "studies_per_s": len(records) / wall,
            "latency_s": lstat, "latency_vs_baseline": ratios,
            "instances": instances, "acknowledged": len(acks), "send_window_s": ingest_window,
            "senders_done_s": send_end - first, "ingest_instances_per_s": ingest,
            "ingest_all_senders_busy_instances_per_s": ingest_busy, "all_senders_busy_s": all_busy_end - first,
            "ingest_vs_one_sender_alone": ingest / base_ingest_rate,
            "listener_processing_s": stats(proc),
            "listener_processing_vs_baseline": pct(proc, 50) / pct(base_proc, 50),
            "send_setup_s": stats(setup),
            "results_received": sum(len(v) for v in pacs.snapshot().values()),
            "per_study": [{k: r[k] for k in ("uid", "n_instances", "sent", "attempts", "latency_s")}
                          | {"send_start_s": r["first_store"] - first, "results_s": r["complete"] - first}
                          for r in sorted(records, key=lambda r: r["first_store"])],
        }
        log(f"all {len(records)} studies: exactly 1 SC + 1 SEG + 1 SR each at the fake Orthanc (none lost, no "
            f"duplicates after {settle:.0f} s of settling); every sent instance in processed/; none in failed/")
        log(f"total wall time {wall:.1f} s (first C-STORE -> last study's 3rd result): "
            f"{len(records) / wall:.2f} studies/s")
        log(f"{'latency':<9}{'s':>8}{'x alone':>10}   (first C-STORE of the study -> its 3rd result at the PACS)")
        for k in ("p50", "p90", "p99", "max"):
            log(f"{k:<9}{lstat[k]:>8.2f}{ratios[k]:>9.1f}x")
        log(f"alone    {base_latency:>8.2f}{1.0:>9.1f}x   (baseline: median of {len(base)} studies sent one at a time "
            "to the same listener)")
        log(f"ingest: {len(acks)} instances acknowledged by the listener in {ingest_window:.2f} s = {ingest:.0f} "
            f"instances/s ({ingest / base_ingest_rate:.2f}x one sender alone, {base_ingest_rate:.0f}/s); "
            f"{ingest_busy:.0f}/s ({ingest_busy / base_ingest_rate:.2f}x) in the first {all_busy_end - first:.1f} s, "
            f"while all {len({r['sender'] for r in records})} senders were sending")
        log(f"listener pipeline per study (listener.json 'seconds'): median {pct(proc, 50):.2f} s, p90 "
            f"{pct(proc, 90):.2f} s ({pct(proc, 50) / pct(base_proc, 50):.2f}x alone); the rest of the latency is "
            f"waiting in the queue behind {args.workers} worker(s)")

        trouble_listener = count_in_log(listener.log_tail(10**8))
        trouble_senders = net_log.counts()
        result["burst"].update(
            retransmitted_results=pacs.retransmissions(), sender_retries=retried,
            processed_in_parts=split, pynetdicom_senders=trouble_senders, listener_log=trouble_listener,
            retry_reasons=[x for r in records for x in r["retry_reasons"]])
        result["listener"] = {"max_associations": args.max_associations or "config (10)", "cmd": listener.cmd}
        log("trouble (whole run): " + "; ".join([
            f"studies sent again by their sender {len(retried)}",
            f"studies the listener completed from parts (merged with earlier instances) {len(split)}",
            f"results received twice by the PACS {pacs.retransmissions()}",
            "senders' pynetdicom: " + (", ".join(f"{k} {v}" for k, v in sorted(trouble_senders.items()))
                                       or "nothing"),
            "listener log: " + ", ".join(f"{k} {v}" for k, v in trouble_listener.items())]))
        if retried:
            reasons = Counter(str(x.get("reason", x) if isinstance(x, dict) else x)
                              for r in records for x in r["retry_reasons"])
            log(f"NOTE: {len(retried)} studies were sent a second time ({dict(reasons)}): their latency includes "
                f"the {SEND_TIMEOUT_S:.0f} s DIMSE timeout. 'response taken by the reactor' is a race in pynetdicom "
                f"{_pynetdicom_version()}'s SCU (Association._run_reactor takes the C-STORE-RSP that send_c_store "
                "waits for); it shows under CPU contention")

        listener_mem = listener.proc_status()
        rc = listener.stop()
        log_text = listener.log_tail(10**7)
        if rc != 0 or "listener stopped (clean)" not in log_text:
            raise BenchmarkError(f"the listener did not stop cleanly (exit {rc}):\n{log_text[-3000:]}")
        load_end = os.getloadavg()
        result["machine"]["loadavg_end"] = load_end
        result["cpu_use"] = cpu
        result["peak_rss"] = {**rss_mib(), "listener_mib": listener_mem.get("VmHWM")}
        result["runtime_s"] = time.perf_counter() - t_start
        log("\n== peak RSS and load")
        log(f"listener process {result['peak_rss']['listener_mib'] or float('nan'):.0f} MiB (VmHWM); this process "
            f"(senders + fake Orthanc) {result['peak_rss']['self_mib']:.0f} MiB")
        log(f"load average (1 min) {load_start[0]:.2f} at start, {load_end[0]:.2f} at end (the latter includes this "
            f"benchmark) on {cpus} cores")
        log("CPU use (cores, average): " + "; ".join(
            f"{k}: ours {v['ours_cores']:.2f}" + (f", other processes {v['others_cores']:.2f}"
                                                   if v.get("others_cores") is not None else "")
            for k, v in cpu.items()))
        others = {k: v["others_cores"] for k, v in cpu.items() if v.get("others_cores") is not None}
        shared = load_start[0] > SHARED_LOAD or max(others.values(), default=0.0) > SHARED_OTHERS_CORES
        result["machine"]["shared"] = shared
        if shared:
            log(f"NOTE: figures are from a shared machine (1-min load average {load_start[0]:.2f} at start, "
                f"threshold {SHARED_LOAD}; other processes used up to {max(others.values(), default=0.0):.2f} of "
                f"{cpus} cores during a phase, threshold {SHARED_OTHERS_CORES}): expect them slower and noisier "
                "than on an idle machine")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"\nwrote {args.out} (benchmark took {result['runtime_s']:.0f} s)")
        return 0
    except BenchmarkError as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr, flush=True)
        if listener is not None:
            if listener.proc.poll() is None:
                listener.stop()
            kept = args.out.with_name(args.out.stem + "_listener.log")
            with contextlib.suppress(OSError):
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(listener.log_path, kept)
                print(f"the listener's log: {kept}", file=sys.stderr, flush=True)
        return 1
    finally:
        if clock is not None:
            clock.restore()
        if listener is not None and listener.proc.poll() is None:
            listener.stop()
        if pacs is not None:
            pacs.stop()
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
