"""Deployment benchmark: per-stage latency of one study, batch throughput, and the CLI wall time.

    .venv/bin/python benchmarks/bench_deploy.py [--studies N] [--workers 1,2,4] [--model PATH] [--out DIR]

1. writes N emulated DICOM studies (``hippo.scanner.write_study``, distractor series, nested
   folders) from the first N cases of the real Task04_Hippocampus data, or from
   ``hippo.data.synthetic.generate_dataset`` when the real data is absent;
2. starts an in-process pynetdicom Storage SCP on a free loopback port (SC, SEG, Comprehensive 3D
   SR) that counts what it receives;
3. stage timings: one ``build_processor`` (model load timed on its own), then every study
   serially -> median / p90 per stage (``StudyOutcome.timings_s``) and each stage's share;
4. batch throughput: ``run_batch`` end to end (model load per worker included) for each worker
   count, speed-up against workers=1 of the same run;
5. ``python -m hippo.deploy study=... send=false`` wall time for one study (what a user sees);
6. peak RSS; every figure goes to ``--out`` as JSON (default outputs/benchmarks/deploy.json).

Every study must come back ``ok`` with the "HippoCrop" series selected and the SCP must receive
3 objects per study in every run; otherwise the script exits non-zero.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from machine_load import CpuMeter  # benchmarks/machine_load.py (the script's folder is on sys.path)

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "src/hippo/weights/hippocampus_25d.pt"  # the shipped default model
DEFAULT_DATA = REPO.parent / "shared/data/Task04_Hippocampus"  # ../shared/data beside the project
DEFAULT_OUT = REPO / "outputs/benchmarks/deploy.json"
STAGES = ("ingest", "volume", "infer", "measure", "report", "write", "send", "total")
OBJECTS_PER_STUDY = 3  # SC report, SEG, SR
EXPECTED_SERIES = "HippoCrop"
SHARED_LOAD = 1.5            # 1-min load average before the benchmark starts
SHARED_OTHERS_CORES = 0.3    # other processes' average CPU use during a phase


class BenchmarkError(RuntimeError):
    """A check of the benchmark failed (a study not ok, objects missing at the SCP...)."""


# ------------------------------------------------------------------------------------------ SCP
class CountingScp:
    """Storage SCP on 127.0.0.1:<free port> accepting SC, SEG and Comprehensive 3D SR; it counts
    the instances per StudyInstanceUID and discards them."""

    def __init__(self, ae_title: str = "BENCHPACS"):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (Comprehensive3DSRStorage, SecondaryCaptureImageStorage,
                                          SegmentationStorage, Verification)

        self.ae_title = ae_title
        self.lock = threading.Lock()
        self.per_study: Counter[str] = Counter()
        self.per_class: Counter[str] = Counter()
        ae = AE(ae_title=ae_title)
        ae.maximum_associations = 16
        for uid in (SecondaryCaptureImageStorage, SegmentationStorage, Comprehensive3DSRStorage, Verification):
            ae.add_supported_context(uid)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self.server.server_address[1])

    def _on_store(self, event) -> int:
        ds = event.dataset  # decoded so that the study can be counted; then dropped
        with self.lock:
            self.per_study[str(ds.StudyInstanceUID)] += 1
            self.per_class[str(ds.SOPClassUID.name)] += 1
        return 0x0000

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.per_study.values())

    def reset(self) -> None:
        with self.lock:
            self.per_study.clear()
            self.per_class.clear()

    def pacs_config(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "called_ae": self.ae_title, "calling_ae": "HIPPOBENCH",
                "timeout": 10.0, "retries": 1, "backoff": 0.1}

    def stop(self) -> None:
        self.server.shutdown()


# ------------------------------------------------------------------------------------ helpers
def log(msg: str = "") -> None:
    print(msg, flush=True)


def cases(data_root: Path, n: int) -> list[tuple[Path, Path]]:
    images = sorted(p for p in (data_root / "imagesTr").glob("*.nii.gz") if not p.name.startswith("."))
    pairs = [(p, data_root / "labelsTr" / p.name) for p in images]
    pairs = [(i, l) for i, l in pairs if l.is_file()]
    return pairs[:n]


def build_studies(n: int, data_root: Path, work: Path) -> tuple[list[Path], dict[str, Any]]:
    """The N study directories (one per case) and a description of where they came from."""
    from hippo.scanner import write_study

    real = (data_root / "imagesTr").is_dir() and len(cases(data_root, n)) >= n
    if real:
        source = {"kind": "real", "root": str(data_root)}
        pairs = cases(data_root, n)
    else:
        from hippo.data.synthetic import generate_dataset

        syn_root = generate_dataset(work / "synthetic", n_cases=n, seed=0)
        source = {"kind": "synthetic", "root": str(syn_root),
                  "why": f"real data not found (or fewer than {n} labelled cases) under {data_root}"}
        pairs = cases(syn_root, n)
    if len(pairs) < n:
        raise BenchmarkError(f"only {len(pairs)} labelled cases available, {n} requested")
    studies, uids = [], {}
    for i, (image, label) in enumerate(pairs):
        study_dir = work / "studies" / image.name.replace(".nii.gz", "")
        manifest = write_study(image, study_dir, label_path=label, distractors=True, seed=1000 + i, nested=True)
        studies.append(study_dir)
        uids[str(study_dir)] = manifest["study_instance_uid"]
    source["cases"] = [p.name for p, _ in pairs]
    source["study_uids"] = uids
    return studies, source


def ensure_model(path: Path, work: Path) -> tuple[Path, str]:
    """``path`` when it exists; else a freshly initialised UNet saved in the work dir (never at
    ``path``: a random model.pt under outputs/train would become hippo.deploy's default)."""
    if path.is_file():
        return path, "given"
    import torch

    from hippo.infer import save_model_file
    from hippo.model.unet import UNet

    torch.manual_seed(0)
    net = UNet(initial_filters=32, num_downs=4)
    fresh = work / "random_init_model.pt"
    save_model_file(fresh, net, preprocessing={"normalization": "minmax_per_volume", "slice_axis": 0,
                                                "patch_size": [64, 64]})
    return fresh, f"random init (model file {path} not found)"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q))


def check_outcomes(outcomes, label: str) -> None:
    bad = [o for o in outcomes if o.status != "ok"]
    if bad:
        lines = "\n  ".join(f"{o.study}: {o.stage}: {o.error}" for o in bad)
        raise BenchmarkError(f"{label}: {len(bad)} of {len(outcomes)} studies failed:\n  {lines}")
    wrong = [o for o in outcomes if o.series_description != EXPECTED_SERIES]
    if wrong:
        raise BenchmarkError(f"{label}: wrong series selected: "
                             + ", ".join(f"{o.study} -> {o.series_description!r}" for o in wrong))
    queued = [o for o in outcomes
              if o.queued or o.sent.get("success", 0) + o.sent.get("warning", 0) != OBJECTS_PER_STUDY]
    if queued:
        raise BenchmarkError(f"{label}: objects not delivered: "
                             + ", ".join(f"{o.study}: sent={o.sent} queued={len(o.queued)}" for o in queued))


def check_scp(scp: CountingScp, study_uids: list[str], label: str, settle_s: float = 5.0) -> None:
    expected = {u: OBJECTS_PER_STUDY for u in study_uids}
    deadline = time.monotonic() + settle_s
    while True:
        with scp.lock:
            got = dict(scp.per_study)
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if got != expected:
        missing = {u: got.get(u, 0) for u in study_uids if got.get(u, 0) != OBJECTS_PER_STUDY}
        extra = {u: c for u, c in got.items() if u not in expected}
        raise BenchmarkError(f"{label}: SCP expected {OBJECTS_PER_STUDY} objects for each of {len(study_uids)} "
                             f"studies ({len(study_uids) * OBJECTS_PER_STUDY}), got {sum(got.values())}; "
                             f"wrong counts {missing}, unexpected studies {extra}")


def rss_mib() -> dict[str, float]:
    # Linux: ru_maxrss in KiB. RUSAGE_CHILDREN: the largest terminated (waited-for) child, not a sum.
    scale = 1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0
    return {"self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale,
            "children_max_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale}


# -------------------------------------------------------------------------------------- phases
def stage_timings(model: Path, studies: list[Path], work: Path, scp: CountingScp, uids: dict[str, str]) -> dict:
    from hippo.deploy.pipeline import build_processor

    t = time.perf_counter()
    processor = build_processor(model, work / "stages" / "results", pacs=scp.pacs_config(),
                                outbox_dir=work / "stages" / "outbox")
    model_load = time.perf_counter() - t
    scp.reset()
    outcomes = [processor.process(s) for s in studies]
    check_outcomes(outcomes, "stage timings")
    check_scp(scp, [uids[str(s)] for s in studies], "stage timings")
    per_stage = {k: [o.timings_s.get(k, 0.0) for o in outcomes] for k in STAGES}
    mean_total = float(np.mean(per_stage["total"]))
    stats = {k: {"median_ms": 1000 * pct(v, 50), "p90_ms": 1000 * pct(v, 90), "mean_ms": 1000 * float(np.mean(v)),
                 "share": float(np.mean(v)) / mean_total if mean_total else 0.0}
             for k, v in per_stage.items()}
    other = [o.timings_s["total"] - sum(o.timings_s.get(k, 0.0) for k in STAGES[:-1]) for o in outcomes]
    stats["(untimed)"] = {"median_ms": 1000 * pct(other, 50), "p90_ms": 1000 * pct(other, 90),
                          "mean_ms": 1000 * float(np.mean(other)), "share": float(np.mean(other)) / mean_total}

    log(f"model load (build_processor, once): {1000 * model_load:.0f} ms")
    log(f"{'stage':<11}{'median ms':>11}{'p90 ms':>10}{'share':>8}")
    for k in (*STAGES[:-1], "(untimed)", "total"):
        s = stats[k]
        log(f"{k:<11}{s['median_ms']:>11.1f}{s['p90_ms']:>10.1f}{100 * s['share']:>7.1f}%")
    log(f"first study total {1000 * outcomes[0].timings_s['total']:.0f} ms (cold caches) vs median "
        f"{stats['total']['median_ms']:.0f} ms; share = mean(stage) / mean(total)")
    log(f"all {len(outcomes)} studies ok ({EXPECTED_SERIES} selected); SCP received {scp.total} objects "
        f"({OBJECTS_PER_STUDY} per study: {dict(scp.per_class)})")
    return {"model_load_s": model_load, "stages": stats,
            "per_study_s": [{"study": Path(o.study).name, **o.timings_s} for o in outcomes],
            "scp_received": scp.total}


def batch_throughput(model: Path, studies: list[Path], workers: list[int], work: Path, scp: CountingScp,
                     uids: dict[str, str]) -> list[dict]:
    from hippo.deploy.pipeline import build_processor, run_batch

    rows = []
    for w in workers:
        run_dir = work / f"batch_w{w}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        factory = functools.partial(build_processor, model, run_dir / "results", pacs=scp.pacs_config(),
                                    outbox_dir=run_dir / "outbox")
        scp.reset()
        t = time.perf_counter()
        outcomes = run_batch(studies, factory, workers=w)
        wall = time.perf_counter() - t
        check_outcomes(outcomes, f"batch workers={w}")
        check_scp(scp, [uids[str(s)] for s in studies], f"batch workers={w}")
        rows.append({"workers": w, "wall_s": wall, "studies_per_s": len(studies) / wall,
                     "scp_received": scp.total})
    base = next((r for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["speedup_vs_workers_1"] = (r["studies_per_s"] / base["studies_per_s"]) if base else None
    log(f"{'workers':>7}{'wall s':>9}{'studies/s':>11}{'speed-up':>10}")
    for r in rows:
        sp = f"{r['speedup_vs_workers_1']:.2f}x" if r["speedup_vs_workers_1"] is not None else "n/a"
        log(f"{r['workers']:>7}{r['wall_s']:>9.2f}{r['studies_per_s']:>11.2f}{sp:>10}")
    log("speed-up = studies/s over studies/s at workers=1 measured in this run"
        + ("" if base else " (workers=1 not in --workers: no baseline, no ratio)"))
    log("workers=1 runs in this process with torch's default intra-op threads; workers>1 are processes "
        "with torch.set_num_threads(1) each; wall time includes each worker's model load")
    log(f"every run: all studies ok, SCP received {OBJECTS_PER_STUDY} objects per study")
    return rows


def deploy_cli(model: Path, study: Path, work: Path) -> dict:
    run_dir = work / "cli_run"
    cmd = [sys.executable, "-m", "hippo.deploy", f"study={study}", f"model_path={model}", "send=false",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HIPPO_ROOT": str(work / "cli_root")}  # keep outputs/ of the checkout clean
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise BenchmarkError(f"hippo.deploy exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    pipeline_total = float(summary["studies"][0]["timings_s"]["total"])
    if summary["n_ok"] != 1:
        raise BenchmarkError(f"hippo.deploy: study not ok: {summary['studies'][0]}")
    log("$ python " + " ".join(cmd[1:]))
    log(f"wall {wall:.2f} s (interpreter start, imports, Hydra, model load, the study); pipeline total "
        f"{pipeline_total:.2f} s, so {wall - pipeline_total:.2f} s is start-up + model load")
    return {"command": cmd, "wall_s": wall, "pipeline_total_s": pipeline_total, "overhead_s": wall - pipeline_total}


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=8, help="number of studies (default 8)")
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (default 1,2,4)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help=f"model file (default {DEFAULT_MODEL.relative_to(REPO)}; missing: a random-init UNet)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="JSON result file, or a directory to write deploy.json into "
                        f"(default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help=f"Decathlon Task04 root (default {DEFAULT_DATA})")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory (studies, results)")
    args = p.parse_args(argv)
    try:
        args.workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    except ValueError:
        p.error(f"--workers: expected e.g. 1,2,4, got {args.workers!r}")
    if args.studies < 1 or not args.workers or min(args.workers) < 1:
        p.error("--studies and every --workers value must be >= 1")
    if args.out.suffix != ".json":
        args.out = args.out / "deploy.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    cpus = os.cpu_count() or 1
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_deploy_"))
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {"studies": args.studies, "workers": args.workers, "model": str(args.model), "out": str(args.out)},
        "machine": {"cpu_count": cpus, "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": load_start},
    }
    scp = None
    try:
        import torch

        import hippo

        result["machine"].update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                                 hippo=getattr(hippo, "__version__", "?"))
        log(f"== hippo deploy benchmark: {args.studies} studies, workers {args.workers}, "
            f"{cpus} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
        if load_start[0] > SHARED_LOAD:
            log(f"NOTE: 1-min load average {load_start[0]:.2f} > {SHARED_LOAD} before starting (1/5/15 min: "
                f"{load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}): other jobs are running, "
                "figures are from a shared machine")

        model, model_kind = ensure_model(args.model, work)
        result["model"] = {"path": str(model), "kind": model_kind}
        log(f"model: {model} ({model_kind})")

        t = time.perf_counter()
        studies, source = build_studies(args.studies, args.data_root, work)
        result["data"] = {**source, "build_s": time.perf_counter() - t}
        uids = source["study_uids"]
        if source["kind"] == "real":
            log(f"data: {len(studies)} studies written from the real data {source['root']} "
                f"({source['cases'][0]}..{source['cases'][-1]}), 3 distractor series each, nested folders "
                f"+ junk ({result['data']['build_s']:.1f} s)")
        else:
            log(f"data: SYNTHETIC — {source['why']}; {len(studies)} studies from generate_dataset "
                f"({result['data']['build_s']:.1f} s)")

        scp = CountingScp()
        log(f"PACS: in-process Storage SCP {scp.ae_title}@127.0.0.1:{scp.port} (SC, SEG, Comprehensive 3D SR)")

        cpu: dict[str, Any] = {}
        log("\n== 1. per-study stage timings (one processor, studies in series)")
        meter_all = meter = CpuMeter()
        result["stage_timings"] = stage_timings(model, studies, work, scp, uids)
        cpu["stage_timings"] = meter.read()

        log("\n== 2. batch throughput (run_batch end to end, fresh output dir per run)")
        log(f"this machine has os.cpu_count() = {cpus} cores: more than {cpus} workers cannot scale further")
        meter = CpuMeter()
        result["batch"] = batch_throughput(model, studies, args.workers, work, scp, uids)
        cpu["batch"] = meter.read()

        log("\n== 3. one study through the command line (send=false)")
        meter = CpuMeter()
        result["deploy_cli"] = deploy_cli(model, studies[0], work)
        cpu["deploy_cli"] = meter.read()
        cpu["all_measured"] = meter_all.read()
        result["cpu_use"] = cpu

        load_end = os.getloadavg()
        result["machine"]["loadavg_end"] = load_end
        result["peak_rss"] = rss_mib()
        result["runtime_s"] = time.perf_counter() - t_start
        log("\n== peak RSS and load")
        log(f"self {result['peak_rss']['self_mib']:.0f} MiB; largest child process "
            f"{result['peak_rss']['children_max_mib']:.0f} MiB (batch workers, the CLI run)")
        # the load at the start is other jobs'; at the end it includes this benchmark's own workers,
        # so other jobs' CPU use during the phases is measured directly (/proc/stat minus ours)
        log(f"load average (1 min) {load_start[0]:.2f} at start, {load_end[0]:.2f} at end (the latter includes "
            f"this benchmark's workers) on {cpus} cores")
        others = {k: v["others_cores"] for k, v in cpu.items() if v.get("others_cores") is not None}
        if others:
            log("CPU used by other processes meanwhile (cores, average): "
                + ", ".join(f"{k} {v:.2f}" for k, v in others.items()))
        busy_others = max(others.values(), default=0.0) > SHARED_OTHERS_CORES
        shared = load_start[0] > SHARED_LOAD or busy_others
        result["machine"]["shared"] = shared
        if shared:
            log(f"NOTE: figures are from a shared machine (1-min load average {load_start[0]:.2f} at start, "
                f"threshold {SHARED_LOAD}; other processes used up to {max(others.values(), default=0.0):.2f} of "
                f"{cpus} cores during a phase): expect them slower and noisier than on an idle machine")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"\nwrote {args.out} (benchmark took {result['runtime_s']:.0f} s)")
        return 0
    except BenchmarkError as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if scp is not None:
            scp.stop()
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
