"""The two doors on the same head: a whole-head T1 as a NIfTI file through ``hippo.predict`` and as a
DICOM study through ``hippo.deploy``, in one run, per stage and as whole processes, as ratios.

    .venv/bin/python benchmarks/bench_doors.py [--scan T1.nii.gz] [--repeat 3] [--real-study DIR]
        [--batch-heads DIR] [--batch-repeat N]
        [--out outputs/benchmarks/doors.json]

1. **Study**: the scanner emulator writes the scan as a brain study (:func:`hippo.scanner.write_wholehead_study`:
   the T1 as a classic sagittal 3D MPRAGE series, uncompressed, beside localizers, T2, FLAIR and a
   reformat), so that the DICOM door also pays for finding its series among others.
2. **Stages** (in this process, one loaded model per door, ``precision=auto`` for both): after one
   warm-up each, ``--repeat`` rounds, the doors interleaved (a change in the machine's load hits
   both alike); the median per stage of :class:`hippo.wholehead.run.ScanProcessor` (file door: read
   -> register -> segment -> report PNG, thumbnail, label map) and of
   :class:`hippo.deploy.pipeline.StudyProcessor` (DICOM door: ingest -> volume -> register ->
   segment -> SC, SEG, SR, report PNG); grouped as input / register / segment / outputs, with the
   DICOM door's figure as a ratio of the file door's and the difference in seconds.
3. **Whole process**: ``python -m hippo.predict input=<scan>`` and ``python -m hippo.deploy
   study=<study> send=false`` as subprocesses, interleaved, ``--repeat`` times each; median,
   ratio, difference; and the same without the registration and segmentation both doors run (from
   each run's own timings): interpreter, imports, model load, input and outputs, the doors' own cost.
4. **Own stages alone** (``--own-repeat``, default 5): both doors again, registration and
   segmentation replaced by their result for the same input (computed once per door): the wall
   seconds of each door's own stages and the CPU seconds of each ``process`` call (all threads of
   this process), median of the interleaved rounds. Cheap (seconds a round), so more rounds; and CPU
   seconds do not grow when other processes share the cores, as wall seconds do (on a loaded
   2-core machine the wall seconds of Python-bound stages come out 2-3x the CPU seconds).
5. **A batch** (``--batch-heads``, default ``../shared/data/wholehead``; ``--batch-repeat`` rounds):
   every NIfTI/MGZ head there as a file in one folder and, written by the scanner emulator, as one
   DICOM study each under one root; ``python -m hippo.predict input=FOLDER`` and ``python -m
   hippo.deploy studies=ROOT send=false`` (each with its default ``workers``), interleaved; the
   wall seconds per head (a whole process over the batch, divided by the heads), the ratio and the
   difference per head. This is what a site sees for a day's studies: the interpreter, imports and
   model load are paid once per batch, and each door overlaps a study's reading and registration
   with the segmentation of the one before (``prepare``/``finish``, :mod:`hippo.batch_runner`).
6. ``--real-study``: a real DICOM series (e.g. ``../shared/data/wholehead/fnndsc_pediatric_dicom``,
   JPEG-LS): the DICOM door's stages on it, the volume stage (reading and decoding every slice)
   reported on its own.

The 1-minute load average and other processes' CPU use (benchmarks/machine_load.py) go with the
figures: above 0.3 cores of others the run is flagged as taken on a shared machine. Every figure
goes to ``--out`` (JSON). Exits 1 when a scan or study fails.
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
DEFAULT_SCAN = REPO.parent / "shared/data/wholehead/chris_t1.nii.gz"
DEFAULT_OUT = REPO / "outputs/benchmarks/doors.json"
DEFAULT_BATCH_HEADS = REPO.parent / "shared/data/wholehead"
SHARED_OTHERS_CORES = 0.3

#: comparable groups: (file door stages, DICOM door stages)
GROUPS = {
    "input (read / ingest + volume)": (("read",), ("ingest", "volume")),
    "register": (("register",), ("register",)),
    "model wait": (("model_wait",), ("model_wait",)),
    # the wall time of both sides (their crop, infer, quality and map_back are summed over two sides
    # that run at once)
    "segment (crop, infer, quality, map back)": (("segment", "review"), ("wholehead_segment", "wholehead_review")),
    "outputs (file: PNG, thumbnail, NIfTI; DICOM: headers, SC, SEG, SR, PNG)": (
        ("report", "thumbnail", "write"), ("measure", "report", "write")),
    "total": (("total",), ("total",)),
}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in runs for k in r})
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def grouped(file_s: dict[str, float], dicom_s: dict[str, float]) -> dict[str, dict[str, float]]:
    out = {}
    for name, (fkeys, dkeys) in GROUPS.items():
        f = sum(file_s.get(k, 0.0) for k in fkeys)
        d = sum(dicom_s.get(k, 0.0) for k in dkeys)
        out[name] = {"file_s": f, "dicom_s": d, "ratio": d / f if f > 0 else None, "difference_s": d - f}
    return out


def print_table(title: str, rows: dict[str, dict[str, float]]) -> None:
    log(f"\n{title}")
    log(f"{'':<75} {'file s':>8} {'DICOM s':>8} {'ratio':>6} {'diff s':>7}")
    for name, r in rows.items():
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        log(f"{name:<75} {r['file_s']:8.2f} {r['dicom_s']:8.2f} {ratio:>6} {r['difference_s']:+7.2f}")


def stage_section(scan: Path, study: Path, repeat: int, work: Path) -> dict[str, Any]:
    from hippo.deploy.pipeline import build_processor
    from hippo.scan_io import ScanInput
    from hippo.weights import resolve_model_path
    from hippo.wholehead.run import ScanProcessor

    model = resolve_model_path(None, REPO / "outputs")
    file_door = ScanProcessor(model, work / "file", precision="auto")
    file_door.agents()
    dicom_door = build_processor(model, work / "dicom", precision="auto")
    item = ScanInput(scan, scan.name.split(".")[0], None, True)
    for _ in range(1):  # warm-up: lazy imports, caches, first-call allocations
        file_door.process(item)
        dicom_door.process(study)
    runs: dict[str, list[dict[str, float]]] = {"file": [], "dicom": []}
    volumes: dict[str, Any] = {}
    for _ in range(repeat):
        o = file_door.process(item)
        if o.status not in ("ok", "review"):
            raise SystemExit(f"file door: {o.status} at {o.stage}: {o.error}")
        runs["file"].append(dict(o.timings_s))
        volumes["file"] = {s: o.volumes[s]["total_mm3"] for s in ("left", "right")}
        d = dicom_door.process(study)
        if d.status not in ("ok", "review"):
            raise SystemExit(f"DICOM door: {d.status} at {d.stage}: {d.error}")
        runs["dicom"].append(dict(d.timings_s))
        volumes["dicom"] = {s: d.volumes[s]["total_mm3"] for s in ("left", "right")}
    file_door.close()
    file_s, dicom_s = median_of(runs["file"]), median_of(runs["dicom"])
    return {"file_stages_s": file_s, "dicom_stages_s": dicom_s, "groups": grouped(file_s, dicom_s),
            "volumes_total_mm3": volumes, "runs": runs}


OWN_STAGES = {"file": ("read", "report", "thumbnail", "write"),
              "dicom": ("ingest", "volume", "measure", "report", "write")}


def own_section(scan: Path, study: Path, repeat: int, work: Path) -> dict[str, Any]:
    """The doors' own stages alone: registration and segmentation replaced by their result for the
    same input array (computed once per door, then reused: ``hippo.wholehead.register.register_to_template``
    and ``hippo.wholehead.segment.segment_wholehead`` are what both doors call), so that a round is
    a few seconds and ``repeat`` rounds, interleaved, are cheap. Per door: the wall seconds of its own
    stages, and the CPU seconds of the whole ``process`` call (this process, all threads: with
    registration and segmentation reused that is the door's own work, and it does not grow when
    other processes share the cores, as wall seconds do)."""
    import hashlib

    import hippo.wholehead.register as register_mod
    import hippo.wholehead.segment as segment_mod
    from hippo.deploy.pipeline import build_processor
    from hippo.scan_io import ScanInput
    from hippo.weights import resolve_model_path
    from hippo.wholehead.run import ScanProcessor

    real_register, real_segment = register_mod.register_to_template, segment_mod.segment_wholehead
    cache: dict[tuple, Any] = {}

    def key(what: str, array, affine) -> tuple:
        import numpy as np

        return what, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest(), np.asarray(affine).tobytes()

    def register(array, affine, *args, **kwargs):
        k = key("register", array, affine)
        if k not in cache:
            cache[k] = real_register(array, affine, *args, **kwargs)
        return cache[k]

    def segment(array, affine, *args, **kwargs):
        k = key("segment", array, affine)
        if k not in cache:
            cache[k] = real_segment(array, affine, *args, **kwargs)
        return cache[k]

    model = resolve_model_path(None, REPO / "outputs")
    file_door = ScanProcessor(model, work / "own_file", precision="auto")
    file_door.agents()
    dicom_door = build_processor(model, work / "own_dicom", precision="auto")
    item = ScanInput(scan, scan.name.split(".")[0], None, True)
    register_mod.register_to_template, segment_mod.segment_wholehead = register, segment
    try:
        file_door.process(item)  # computes the registration and segmentation once per door
        dicom_door.process(study)
        runs: dict[str, list[dict[str, float]]] = {"file": [], "dicom": []}
        for _ in range(repeat):
            for door in ("file", "dicom"):
                cpu = time.process_time()
                o = file_door.process(item) if door == "file" else dicom_door.process(study)
                cpu = time.process_time() - cpu
                if o.status not in ("ok", "review"):
                    raise SystemExit(f"{door} door (own stages): {o.status} at {o.stage}: {o.error}")
                t = o.timings_s
                runs[door].append({"own_wall_s": sum(t.get(k, 0.0) for k in OWN_STAGES[door]), "cpu_s": cpu,
                                   **{k: t.get(k, 0.0) for k in OWN_STAGES[door]}})
    finally:
        register_mod.register_to_template, segment_mod.segment_wholehead = real_register, real_segment
        file_door.close()
    med = {door: median_of(r) for door, r in runs.items()}
    return {"stages": OWN_STAGES, "median": med, "runs": runs,
            "own_wall_difference_s": med["dicom"]["own_wall_s"] - med["file"]["own_wall_s"],
            "cpu_difference_s": med["dicom"]["cpu_s"] - med["file"]["cpu_s"]}


def real_study_section(study: Path, repeat: int, work: Path) -> dict[str, Any]:
    from hippo.deploy.pipeline import build_processor
    from hippo.weights import resolve_model_path

    proc = build_processor(resolve_model_path(None, REPO / "outputs"), work / "real", precision="auto")
    proc.process(study)  # warm-up
    runs = []
    for _ in range(repeat):
        o = proc.process(study)
        if o.status not in ("ok", "review"):
            raise SystemExit(f"{study}: {o.status} at {o.stage}: {o.error}")
        runs.append(dict(o.timings_s))
    return {"study": str(study), "stages_s": median_of(runs), "runs": runs}


def process_section(scan: Path, study: Path, repeat: int, work: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    commands = {
        "file": [sys.executable, "-m", "hippo.predict", f"input={scan}", "progress=false", "resume=false"],
        "dicom": [sys.executable, "-m", "hippo.deploy", f"study={study}", "send=false"],
    }
    walls: dict[str, list[float]] = {"file": [], "dicom": []}
    shared: dict[str, list[float]] = {"file": [], "dicom": []}  # register + segment: the same work in both doors
    for i in range(repeat):
        for door, cmd in commands.items():
            out = work / f"proc_{door}_{i}"
            extra = [f"output={out}"] if door == "file" else [f"results_dir={out}", f"outbox_dir={out}/outbox"]
            t = time.perf_counter()
            r = subprocess.run(cmd + extra + [f"hydra.run.dir={work / f'hydra_{door}_{i}'}"], cwd=REPO, env=env,
                               capture_output=True, text=True)
            walls[door].append(time.perf_counter() - t)
            failed = r.returncode != 0 if door == "file" else \
                r.returncode not in (0, 1) or json.loads((out / "summary.json").read_text())["n_failed"]
            if failed:
                raise SystemExit(f"{door} door exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            if door == "file":
                t_s = json.loads(next(out.rglob("result.json")).read_text())["timings_s"]
                shared[door].append(sum(t_s.get(k, 0.0) for k in ("register", "segment", "review")))
            else:
                t_s = json.loads((out / "summary.json").read_text())["studies"][0]["timings_s"]
                shared[door].append(t_s.get("register", 0.0) + t_s.get("wholehead_total", 0.0))
    f, d = statistics.median(walls["file"]), statistics.median(walls["dicom"])
    # the doors' own cost: the wall minus the registration and segmentation both run (whose time on a
    # shared machine varies by more than the doors differ)
    own = {k: [w - x for w, x in zip(walls[k], shared[k])] for k in walls}
    of, od = statistics.median(own["file"]), statistics.median(own["dicom"])
    return {"commands": {k: " ".join(v[1:]) for k, v in commands.items()}, "wall_s": walls,
            "median_s": {"file": f, "dicom": d}, "ratio": d / f, "difference_s": d - f,
            "register_and_segment_s": shared, "door_own_s": own,
            "door_own_median_s": {"file": of, "dicom": od}, "door_own_ratio": od / of, "door_own_difference_s": od - of}


def batch_section(root: Path, repeat: int, work: Path) -> dict[str, Any]:
    """Every NIfTI/MGZ head under ``root`` through both doors as one batch each (whole processes,
    default workers), interleaved ``repeat`` times: wall and CPU seconds per head."""
    from bench_wholehead import find_heads  # benchmarks/bench_wholehead.py (the same folder)

    from hippo.scanner.studies import write_wholehead_study

    heads = [h for h in find_heads(root)[0] if h.kind == "file"]
    if not heads:
        raise SystemExit(f"no NIfTI/MGZ head under {root}")
    folder, studies = work / "batch_files", work / "batch_studies"
    folder.mkdir()
    for i, h in enumerate(heads):
        os.symlink(h.path, folder / (h.name + h.suffix))
        write_wholehead_study(h.path, studies / f"study_{i}", seed=i + 1)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    commands = {
        "file": [sys.executable, "-m", "hippo.predict", f"input={folder}", "progress=false", "resume=false"],
        "dicom": [sys.executable, "-m", "hippo.deploy", f"studies={studies}", "send=false"],
    }
    runs: dict[str, list[dict[str, float]]] = {"file": [], "dicom": []}
    for i in range(repeat):
        for door, cmd in commands.items():
            out = work / f"batch_{door}_{i}"
            extra = [f"output={out}"] if door == "file" else [f"results_dir={out}", f"outbox_dir={out}/outbox"]
            before = os.times()
            t = time.perf_counter()
            r = subprocess.run(cmd + extra + [f"hydra.run.dir={work / f'batch_hydra_{door}_{i}'}"], cwd=REPO,
                               env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            after = os.times()
            summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
            failed = summary.get("n_failed", 1) if door == "dicom" else r.returncode != 0
            if failed:
                raise SystemExit(f"{door} door over the batch failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                                 f"{r.stderr[-3000:]}")
            cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
            runs[door].append({"wall_s": wall, "cpu_s": cpu, "per_head_s": wall / len(heads),
                               "cpu_per_head_s": cpu / len(heads)})
            log(f"  batch round {i + 1}, {door}: {wall:.1f} s for {len(heads)} heads ({wall / len(heads):.2f} s a head)")
    med = {door: median_of(r) for door, r in runs.items()}
    # each round's two runs were taken back to back: their difference is the fairer pairing on a
    # machine whose speed drifts between rounds
    paired = [d["per_head_s"] - f["per_head_s"] for f, d in zip(runs["file"], runs["dicom"])]
    return {"heads": [h.rel for h in heads], "commands": {k: " ".join(v[1:]) for k, v in commands.items()},
            "runs": runs, "median": med, "round_differences_s": paired,
            "median_round_difference_s": statistics.median(paired),
            "per_head_ratio": med["dicom"]["per_head_s"] / med["file"]["per_head_s"],
            "per_head_difference_s": med["dicom"]["per_head_s"] - med["file"]["per_head_s"],
            "cpu_per_head_difference_s": med["dicom"]["cpu_per_head_s"] - med["file"]["cpu_per_head_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scan", type=Path, default=DEFAULT_SCAN, help="whole-head T1 (NIfTI/MGZ)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per section (median)")
    ap.add_argument("--real-study", type=Path, default=None, help="a real whole-head DICOM study folder")
    ap.add_argument("--no-process", action="store_true", help="skip the whole-process section")
    ap.add_argument("--own-repeat", type=int, default=5,
                    help="rounds of the doors' own stages alone (registration and segmentation reused; 0: skip)")
    ap.add_argument("--batch-heads", type=Path, default=DEFAULT_BATCH_HEADS,
                    help="folder of real NIfTI/MGZ heads for the batch section (default %(default)s)")
    ap.add_argument("--batch-repeat", type=int, default=None, help="rounds of the batch section (default --repeat; 0: skip)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    from hippo.scanner.studies import write_wholehead_study

    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                          "load_1min_start": os.getloadavg()[0]},
                              "scan": str(args.scan), "repeat": args.repeat, "precision": "auto"}
    with tempfile.TemporaryDirectory(prefix="bench_doors_") as tmp:
        work = Path(tmp)
        study = work / "study"
        write_wholehead_study(args.scan, study, seed=1)
        log(f"scan {args.scan}; DICOM study written by the scanner emulator to {study}; "
            f"load average {result['machine']['load_1min_start']:.1f} on {os.cpu_count()} CPUs")
        meter = CpuMeter()
        result["stages"] = stage_section(args.scan, study, args.repeat, work)
        result["stages"]["load"] = meter.read()
        print_table(f"per stage, in one process, median of {args.repeat} (seconds)", result["stages"]["groups"])
        g = result["stages"]["groups"]
        own_f = sum(g[k]["file_s"] for k in g if k.startswith(("input", "outputs")))
        own_d = sum(g[k]["dicom_s"] for k in g if k.startswith(("input", "outputs")))
        result["stages"]["door_own_s"] = {"file": own_f, "dicom": own_d, "difference_s": own_d - own_f}
        log(f"the doors' own stages (input + outputs): file {own_f:.2f} s, DICOM {own_d:.2f} s, "
            f"difference {own_d - own_f:+.2f} s")
        if args.own_repeat:
            meter = CpuMeter()
            result["own"] = own = own_section(args.scan, study, args.own_repeat, work)
            own["load"] = meter.read()
            m = own["median"]
            log(f"\nthe doors' own stages alone (registration and segmentation reused), median of {args.own_repeat}: "
                f"wall file {m['file']['own_wall_s']:.2f} s, DICOM {m['dicom']['own_wall_s']:.2f} s "
                f"(difference {own['own_wall_difference_s']:+.2f} s); CPU file {m['file']['cpu_s']:.2f} s, "
                f"DICOM {m['dicom']['cpu_s']:.2f} s (difference {own['cpu_difference_s']:+.2f} s)")
        if not args.no_process:
            meter = CpuMeter()
            result["process"] = proc = process_section(args.scan, study, args.repeat, work)
            result["process"]["load"] = meter.read()
            log(f"\nwhole process, median of {args.repeat}: predict {proc['median_s']['file']:.2f} s, "
                f"deploy {proc['median_s']['dicom']:.2f} s: ratio {proc['ratio']:.2f}, "
                f"difference {proc['difference_s']:+.2f} s")
            own = proc["door_own_median_s"]
            log(f"  without registration and segmentation (interpreter, imports, model load, input, outputs): "
                f"predict {own['file']:.2f} s, deploy {own['dicom']:.2f} s: ratio {proc['door_own_ratio']:.2f}, "
                f"difference {proc['door_own_difference_s']:+.2f} s")
        batch_repeat = args.repeat if args.batch_repeat is None else args.batch_repeat
        if batch_repeat and args.batch_heads.is_dir():
            meter = CpuMeter()
            log(f"\nbatch: every NIfTI/MGZ head under {args.batch_heads} through both doors, {batch_repeat} round(s)")
            result["batch"] = batch = batch_section(args.batch_heads, batch_repeat, work)
            batch["load"] = meter.read()
            m = batch["median"]
            log(f"batch of {len(batch['heads'])} heads, median of {batch_repeat}: predict {m['file']['per_head_s']:.2f} s "
                f"a head, deploy {m['dicom']['per_head_s']:.2f} s a head: ratio {batch['per_head_ratio']:.2f}, "
                f"difference {batch['per_head_difference_s']:+.2f} s a head (CPU {batch['cpu_per_head_difference_s']:+.2f} s); "
                f"per round " + ", ".join(f"{d:+.2f}" for d in batch["round_differences_s"]) +
                f" s a head (median {batch['median_round_difference_s']:+.2f} s)")
        elif batch_repeat:
            log(f"\nbatch section skipped: {args.batch_heads} not found")
        if args.real_study:
            meter = CpuMeter()
            result["real_study"] = real = real_study_section(args.real_study, args.repeat, work)
            real["load"] = meter.read()
            s = real["stages_s"]
            log(f"\nreal study {args.real_study.name}: " + ", ".join(
                f"{k} {s[k]:.2f}" for k in ("ingest", "volume", "infer", "measure", "report", "write", "total")
                if k in s) + " s (volume: reading and decoding every slice)")
    others = [v["load"].get("others_cores") for v in (result.get("stages"), result.get("own"), result.get("process"),
                                                         result.get("batch"), result.get("real_study")) if v]
    result["shared_machine"] = any(o is not None and o > SHARED_OTHERS_CORES for o in others)
    if result["shared_machine"]:
        log(f"\nNOTE: other processes used {max(o for o in others if o is not None):.1f} cores meanwhile: a shared "
            "machine; compare the ratios, not the absolute seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    log(f"\nfigures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
