"""How long the embedded synthetic dataset takes to generate (``hippo.data.synthetic.generate_dataset``).

    .venv/bin/python benchmarks/bench_synthetic.py [--n-cases 10] [--workers 1] [--repeat 3]
                                                   [--target-s 5.0] [--out outputs/benchmarks/synthetic.json]

Generates ``--n-cases`` labelled cases (seed 0) into a fresh temporary folder ``--repeat`` times and
prints the best and median wall time, seconds per case, and whether the best run stays within
``--target-s`` (5 s for 10 cases: training without real data generates its dataset first, so this
is time a first ``python -m hippo.train`` waits). Exits 1 when the best run misses the target; the
figures go to ``--out`` as JSON. A shared machine slows every run: the output says how loaded it was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hippo.data.synthetic import generate_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cases", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--target-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/benchmarks/synthetic.json")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    times = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            generate_dataset(Path(tmp) / "ds", n_cases=args.n_cases, seed=0, workers=args.workers)
            times.append(time.perf_counter() - start)
    best, median = min(times), statistics.median(times)
    figures = {"n_cases": args.n_cases, "workers": args.workers, "seconds": times, "best_s": best,
               "median_s": median, "best_s_per_case": best / args.n_cases, "target_s": args.target_s,
               "met": best <= args.target_s, "load_average_1min": [load_before, os.getloadavg()[0]],
               "cpu_count": os.cpu_count()}
    print(f"generate_dataset, {args.n_cases} cases, {args.workers} worker(s): best {best:.2f} s, "
          f"median {median:.2f} s of {args.repeat} ({best / args.n_cases * 1000:.0f} ms per case); "
          f"target <= {args.target_s:.1f} s: {'met' if figures['met'] else 'MISSED'} "
          f"(load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
