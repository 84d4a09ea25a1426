"""Whole-head benchmark: per-stage time per real scan, variants against the default, the whole
``python -m hippo.predict`` process against hippodeep's 3.5-5 s per scan.

    .venv/bin/python benchmarks/bench_wholehead.py [--scans DIR] [--repeat 2] [--out outputs/benchmarks/wholehead.json]

1. **Stages** (in this process, the shipped model loaded once per variant): for each scan of
   ``../shared/data/wholehead`` (``chris_t1``, ``example_brain_t1``, ``fs_subject/norm.mgz``),
   :class:`hippo.wholehead.run.ScanProcessor` end to end (read, register, crop, infer, map back,
   review, report PNG, write the label map and ``result.json``), ``--repeat`` times after one
   warm-up, the variants interleaved (so that a change in the machine's load hits them alike); the
   median per stage.
2. **Variants, same run** (median seconds per scan and ratio against the default, plus the change
   in volumes): ``float32`` instead of ``bfloat16``; no refinement (one ensemble crop per side where
   the registration puts it); the whole ensemble for the localisation pass instead of the light
   locator (one 16-filter network per slicing axis).
3. **Whole process**: ``python -m hippo.predict input=<scan>`` in a subprocess per scan (interpreter
   start, Hydra, torch import, model load, the scan, outputs), best of ``--repeat``; and one run
   over a folder of the three scans with ``workers=1`` and ``workers=2`` (seconds per scan).
   Ratios against hippodeep's 3.5 s per scan (the shared field notes: hippodeep_pytorch as a process
   on this kind of machine; its REFERENCE.tsv says 4-5 s).
4. **Load**: the 1-minute load average at the start and other processes' CPU use per phase
   (/proc/stat minus ours): above 0.3 cores the figures are flagged as taken on a shared machine.

Every figure goes to ``--out`` (JSON). Exits 1 when any scan is not ``ok``/``review`` or a process
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine_load import CpuMeter  # benchmarks/machine_load.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCANS = REPO.parent / "shared/data/wholehead"
DEFAULT_OUT = REPO / "outputs/benchmarks/wholehead.json"
SCANS = {"chris": "chris_t1.nii.gz", "example": "example_brain_t1.nii.gz", "fs_subject": "fs_subject/norm.mgz"}
HIPPODEEP_S = 3.5
STAGES = ("read", "register", "model_wait", "crop", "infer", "map_back", "review", "report", "write", "total")
SHARED_LOAD = 1.5
SHARED_OTHERS_CORES = 0.3


def log(msg: str = "") -> None:
    print(msg, flush=True)


def median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in STAGES if any(k in r for r in runs)]
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def volumes(outcome) -> tuple[float, float]:
    return outcome.volumes["left"]["total_mm3"], outcome.volumes["right"]["total_mm3"]


def stage_section(scan_paths: dict[str, Path], repeat: int, work: Path) -> dict[str, Any]:
    from hippo.weights import resolve_model_path
    from hippo.scan_io import ScanInput
    from hippo.wholehead.run import ScanProcessor

    model = resolve_model_path(None, REPO / "outputs")
    variants = {
        "default (bfloat16, refine 1, light locator)": {},
        "float32": {"precision": "float32"},
        "no refinement": {"refine_passes": 0, "extra_passes": 0},
        "ensemble locator": {"fast_locate": False},
    }
    procs, load_s = {}, {}
    for i, (vname, kw) in enumerate(variants.items()):
        t = time.perf_counter()
        procs[vname] = ScanProcessor(model, work / f"v{i}", **kw)
        procs[vname].agents()
        load_s[vname] = time.perf_counter() - t
    scans = {sname: ScanInput(path, sname, None, True) for sname, path in scan_paths.items()}
    for proc in procs.values():  # warm-up (lazy imports, caches, first-call allocations)
        proc.process(scans[next(iter(scans))])
    # interleaved (repeat x scan x variant) so that a change in the machine's load hits every variant alike
    runs: dict[str, dict[str, list]] = {v: {s: [] for s in scans} for v in variants}
    last: dict[tuple[str, str], Any] = {}
    for _ in range(repeat):
        for sname, scan in scans.items():
            for vname, proc in procs.items():
                outcome = proc.process(scan)
                if outcome.status not in ("ok", "review"):
                    raise SystemExit(f"{sname}: {outcome.status} at {outcome.stage}: {outcome.error}")
                runs[vname][sname].append(dict(outcome.timings_s))
                last[vname, sname] = outcome
    out: dict[str, Any] = {}
    for vname in variants:
        out[vname] = {"model_load_s": load_s[vname],
                      "scans": {sname: {"stages_s": median_stages(runs[vname][sname]),
                                        "volumes_mm3": volumes(last[vname, sname])} for sname in scans}}
    return out


def process_section(scan_paths: dict[str, Path], repeat: int, work: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    single: dict[str, Any] = {}
    for sname, path in scan_paths.items():
        walls = []
        for i in range(repeat):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "hippo.predict", f"input={path}", f"output={work / f'p_{sname}_{i}'}",
                                "progress=false", f"hydra.run.dir={work / f'hydra_{sname}_{i}'}"],
                               cwd=REPO, env=env, capture_output=True, text=True)
            walls.append(time.perf_counter() - t)
            if r.returncode != 0:
                raise SystemExit(f"predict on {path} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        single[sname] = {"wall_s": walls, "best_s": min(walls)}
    folder = work / "folder"
    folder.mkdir()
    for sname, path in scan_paths.items():
        os.symlink(path, folder / (sname + ("".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix)))
    batch = {}
    for workers in (1, 2):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "hippo.predict", f"input={folder}", f"output={work / f'b{workers}'}",
                            "progress=false", f"workers={workers}", f"hydra.run.dir={work / f'hydra_b{workers}'}"],
                           cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(f"predict on {folder} workers={workers} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        batch[f"workers={workers}"] = {"wall_s": wall, "per_scan_s": wall / len(scan_paths)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    imports = {"import_torch_s": time.perf_counter() - t}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import hydra, omegaconf, hippo.wholehead.run"], check=True)
    imports["import_hydra_and_wholehead_s"] = time.perf_counter() - t
    return {"single": single, "batch": batch, "imports": imports}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scans", type=Path, default=DEFAULT_SCANS)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--sections", default="stages,process")
    args = ap.parse_args(argv)
    scan_paths = {k: args.scans / v for k, v in SCANS.items()}
    missing = [str(p) for p in scan_paths.values() if not p.is_file()]
    if missing:
        log(f"whole-head scans not found: {', '.join(missing)}")
        return 1
    load_start = os.getloadavg()
    result: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                          "python": platform.python_version(), "loadavg_start": load_start},
                              "hippodeep_s_per_scan": HIPPODEEP_S, "args": {"repeat": args.repeat}}
    sections = set(args.sections.split(","))
    cpu: dict[str, Any] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_wholehead_") as tmp:
        work = Path(tmp)
        if "stages" in sections:
            log(f"== per-stage seconds per scan (median of {args.repeat} after a warm-up; in-process, model loaded)")
            meter = CpuMeter()
            stages = stage_section(scan_paths, args.repeat, work)
            cpu["stages"] = meter.read()
            result["stages"] = stages
            default = next(iter(stages))
            cols = [k for k in STAGES if k != "model_wait"]
            log("| variant | scan | " + " | ".join(cols) + " | L mm³ | R mm³ |")
            log("|---|---|" + "---:|" * (len(cols) + 2))
            for vname, v in stages.items():
                for sname, s in v["scans"].items():
                    st = s["stages_s"]
                    log(f"| {vname} | {sname} | " + " | ".join(f"{st.get(k, 0):.2f}" for k in cols)
                        + f" | {s['volumes_mm3'][0]:.0f} | {s['volumes_mm3'][1]:.0f} |")
            log("\nvariants against the default (total seconds per scan, mean over scans; volume change):")
            base = stages[default]["scans"]
            for vname, v in stages.items():
                mean_t = statistics.mean(s["stages_s"]["total"] for s in v["scans"].values())
                base_t = statistics.mean(s["stages_s"]["total"] for s in base.values())
                dv = max(abs(a / b - 1) for sname, s in v["scans"].items()
                         for a, b in zip(s["volumes_mm3"], base[sname]["volumes_mm3"]))
                log(f"  {vname}: {mean_t:.2f} s per scan = {mean_t / base_t:.2f}x the default "
                    f"({base_t:.2f} s); in-process {mean_t / HIPPODEEP_S:.2f}x hippodeep's {HIPPODEEP_S} s; "
                    f"largest volume change {100 * dv:.1f} %")
        if "process" in sections:
            log("\n== whole process: python -m hippo.predict (interpreter, Hydra, torch, model, scan, outputs)")
            meter = CpuMeter()
            proc = process_section(scan_paths, args.repeat, work)
            cpu["process"] = meter.read()
            result["process"] = proc
            for sname, s in proc["single"].items():
                log(f"  {sname}: best {s['best_s']:.2f} s (runs {', '.join(f'{w:.2f}' for w in s['wall_s'])}) = "
                    f"{s['best_s'] / HIPPODEEP_S:.2f}x hippodeep's {HIPPODEEP_S} s")
            for k, b in proc["batch"].items():
                log(f"  folder of {len(scan_paths)}, {k}: {b['wall_s']:.2f} s = {b['per_scan_s']:.2f} s per scan = "
                    f"{b['per_scan_s'] / HIPPODEEP_S:.2f}x hippodeep's {HIPPODEEP_S} s")
            log(f"  import torch {proc['imports']['import_torch_s']:.2f} s, hydra + hippo.wholehead "
                f"{proc['imports']['import_hydra_and_wholehead_s']:.2f} s (each a fresh interpreter)")
    result["cpu"] = cpu
    result["runtime_s"] = time.perf_counter() - t_start
    others = {k: v["others_cores"] for k, v in cpu.items() if v.get("others_cores") is not None}
    shared = load_start[0] > SHARED_LOAD or max(others.values(), default=0.0) > SHARED_OTHERS_CORES
    result["shared_machine"] = shared
    log(f"\nload average (1 min) at start {load_start[0]:.2f} on {os.cpu_count()} cores; other processes' CPU use: "
        + ", ".join(f"{k} {v:.2f} cores" for k, v in others.items()))
    if shared:
        log("SHARED MACHINE: other jobs ran meanwhile; the times above are inflated and noisy")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"written {args.out} ({result['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
