"""Cohort throughput: heads per minute of ``python -m hippo.predict`` over one folder of heads, three
ways, each against the plain run measured in the same invocation.

    .venv/bin/python benchmarks/bench_cohort.py [--heads 6] [--scan ../shared/data/wholehead/example_brain_t1.nii.gz]
        [--cores 2] [--precision float32] [--out outputs/benchmarks/cohort.json]

The input is ``--heads`` links to one real head (``--scan``; results are per head, the same work
each). Every mode is a fresh output folder and whole processes (interpreter, Hydra, torch import,
model load per process included), on ``--cores`` cores (the children's CPU affinity):

1. **plain**: ``workers=1`` (the reference: ratio 1.00);
2. **workers=2**: the process pool of :mod:`hippo.batch_runner` (two spawned workers, threads capped
   at ``cores / 2`` each);
3. **submitit-local**: ``--multirun 'shard=0/2,1/2' threads=<cores/2> hydra/launcher=submitit_local``
   (two submitit jobs at once) followed by ``level=group``; the time is both commands together.

Printed and written to ``--out`` (JSON): seconds, heads per minute, ratio of heads per minute to
the plain run's, and the machine's load (other processes' CPU use per mode,
``benchmarks/machine_load.py``): above 0.3 cores the figures are flagged as taken on a shared
machine. ``--precision float32`` by default: bfloat16 is only fast on CPUs with AVX-512 BF16 / AMX
(on AVX2-only CPUs torch falls back to a slow bf16 GEMM). Exits 1 when a run fails or a head is not
measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine_load import CpuMeter  # noqa: E402


def run(cmd: list[str], cores: set[int]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--scan", type=Path, default=ROOT.parent / "shared/data/wholehead/example_brain_t1.nii.gz")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs/benchmarks/cohort.json")
    args = ap.parse_args()
    if not args.scan.is_file():
        print(f"error: {args.scan}: no such scan (give --scan)", file=sys.stderr)
        return 1
    available = sorted(os.sched_getaffinity(0))
    cores = set(available[: args.cores])
    half = max(1, len(cores) // 2)
    load0 = os.getloadavg()[0]
    py = [sys.executable, "-m", "hippo.predict"]
    common = ["progress=false", f"precision={args.precision}"]
    results: dict[str, dict] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench_cohort_") as tmp:
        heads = Path(tmp) / "heads"
        heads.mkdir()
        for i in range(args.heads):
            os.symlink(args.scan.resolve(), heads / f"head{i:02d}.nii.gz")
        modes = {
            "plain (workers=1)": [py + common + [f"input={heads}", f"output={tmp}/plain", "workers=1"]],
            "workers=2": [py + common + [f"input={heads}", f"output={tmp}/pool", "workers=2"]],
            "submitit-local, 2 shards + group": [
                py + ["--multirun"] + common + [f"input={heads}", f"output={tmp}/shards", "shard=0/2,1/2",
                                                f"threads={half}", "hydra/launcher=submitit_local",
                                                f"hydra.sweep.dir={tmp}/sweep"],
                py + common + [f"input={heads}", f"output={tmp}/shards", "level=group"]],
        }
        for name, cmds in modes.items():
            meter = CpuMeter()
            t0 = time.perf_counter()
            procs = [run(c, cores) for c in cmds]
            wall = time.perf_counter() - t0
            load = meter.read()
            out = Path(cmds[-1][[a.startswith("output=") for a in cmds[-1]].index(True)].split("=", 1)[1])
            rows = (out / "volumes.tsv").read_text().splitlines()[1:] if (out / "volumes.tsv").is_file() else []
            measured = sum(r.split("\t")[2] in ("ok", "review") for r in rows)
            ok = all(p.returncode == 0 for p in procs) and measured == args.heads
            if not ok:
                failed = True
                print(f"{name}: FAILED (measured {measured}/{args.heads})\n" + "\n".join(
                    p.stdout[-2000:] + p.stderr[-2000:] for p in procs), file=sys.stderr)
            results[name] = {"seconds": round(wall, 2), "heads_per_min": round(60 * args.heads / wall, 2),
                             "measured": measured, "others_cores": None if load["others_cores"] is None
                             else round(load["others_cores"], 2)}
    base = results["plain (workers=1)"]["heads_per_min"]
    print(f"{args.heads} heads ({args.scan.name}), {len(cores)} cores, precision={args.precision}, "
          f"1-min load at start {load0:.2f}")
    print(f"{'mode':36s} {'seconds':>8s} {'heads/min':>10s} {'vs plain':>9s} {'others (cores)':>15s}")
    for name, r in results.items():
        r["ratio_vs_plain"] = round(r["heads_per_min"] / base, 2) if base else None
        shared = r["others_cores"] is not None and r["others_cores"] > 0.3
        print(f"{name:36s} {r['seconds']:8.1f} {r['heads_per_min']:10.2f} {r['ratio_vs_plain']:9.2f} "
              f"{'' if r['others_cores'] is None else r['others_cores']:>15}" + ("  (shared machine)" if shared else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"heads": args.heads, "scan": str(args.scan), "cores": len(cores),
                                    "precision": args.precision, "load_at_start": load0, "modes": results},
                                   indent=2) + "\n")
    print(f"written: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
