"""End-of-sweep summary: a Hydra callback that ranks the runs of a ``--multirun`` by a metric.

Each training run writes ``metrics.json`` (its final logged metrics) into its own directory; on
``on_multirun_end`` this callback reads them, writes ``sweep_summary.json`` into the sweep
directory and prints a table that names the best run. When the runs are cross-validation folds
(``data.fold=0,1,2,3,4``), it also pools their ``val_results.json`` into ``cv_summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hippo.fileio import write_json_atomic


def summarize_sweep(sweep_dir: str | Path, metric: str = "val/dice_mean_best", mode: str = "max") -> dict[str, Any]:
    """Collect ``*/metrics.json`` under ``sweep_dir`` and rank the runs by ``metric``.

    Returns:
        ``{"metric", "mode", "best": {...} | None, "runs": [{"dir", "overrides", "metrics", "value"}]}``;
        runs without the metric (failed or unfinished) are listed with ``value: None``.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    runs = []
    for metrics_file in sorted(Path(sweep_dir).glob("*/metrics.json")):
        run_dir = metrics_file.parent
        metrics = json.loads(metrics_file.read_text())
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = [l[2:].strip() for l in overrides_file.read_text().splitlines() if l.startswith("- ")] \
            if overrides_file.is_file() else []
        value = metrics.get(metric)
        runs.append({"dir": str(run_dir), "overrides": overrides, "value": value, "metrics": metrics})
    scored = [r for r in runs if isinstance(r["value"], (int, float))]
    best = (max if mode == "max" else min)(scored, key=lambda r: r["value"]) if scored else None
    return {"metric": metric, "mode": mode, "best": best, "runs": runs}


CV_KEYS = ("dice_anterior", "dice_posterior", "dice_mean", "dice_foreground",
           "jaccard_anterior", "jaccard_posterior", "jaccard_mean", "jaccard_foreground")


def summarize_cross_validation(*dirs: str | Path) -> dict[str, Any] | None:
    """Pool the 3D per-volume validation metrics of cross-validation folds.

    Each of ``dirs`` is a sweep directory (its ``*/val_results.json`` are read) or one fold's run
    directory (its own ``val_results.json``), so folds trained in separate runs pool as well.
    Results written without a ``fold`` are ignored. Each development case is validated by exactly
    one fold, so the pooled mean is over every case once (nnU-Net reports its cross-validation the
    same way).

    Returns:
        ``{"n_folds", "folds": {fold: {metric: mean}}, "pooled": {metric: {"mean", "std"}},
        "n_volumes", "sources": {fold: directory}}``, or None when no fold results are there.

    Raises:
        ValueError: two results claim the same fold, or one case is validated twice.
    """
    folds: dict[int, list[dict[str, Any]]] = {}
    sources: dict[int, str] = {}
    for d in dirs:
        d = Path(d)
        files = [d / "val_results.json"] if (d / "val_results.json").is_file() else sorted(d.glob("*/val_results.json"))
        for path in files:
            data = json.loads(path.read_text())
            if data.get("fold") is None:
                continue
            fold = int(data["fold"])
            if fold in folds:
                raise ValueError(f"fold {fold} twice: {sources[fold]} and {path.parent}")
            folds[fold], sources[fold] = data["per_volume"], str(path.parent)
    if not folds:
        return None
    rows = [r for fold_rows in folds.values() for r in fold_rows]
    names = [r["name"] for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{', '.join(map(str, dirs))}: a case was validated by more than one fold (mixed sweeps?)")
    per_fold = {f: {k: float(np.mean([r[k] for r in fr])) for k in CV_KEYS} for f, fr in sorted(folds.items())}
    pooled = {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
              for k in CV_KEYS}
    return {"n_folds": len(folds), "n_volumes": len(rows), "folds": per_fold, "pooled": pooled,
            "sources": {str(f): sources[f] for f in sorted(sources)}}


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write ``sweep_summary.json`` and log the ranking."""

    def __init__(self, metric: str = "val/dice_mean_best", mode: str = "max"):
        self.metric, self.mode = metric, mode

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = summarize_sweep(sweep_dir, self.metric, self.mode)
        write_json_atomic(sweep_dir / "sweep_summary.json", summary)
        lines = [f"sweep {sweep_dir}: {len(summary['runs'])} runs ranked by {self.metric} ({self.mode})"]
        ranked = sorted(summary["runs"], key=lambda r: (r["value"] is None, -(r["value"] or 0) if self.mode == "max" else (r["value"] or 0)))
        for r in ranked:
            v = "failed/none" if r["value"] is None else f"{r['value']:.4f}"
            mark = "  <- best" if summary["best"] is r else ""
            lines.append(f"  {v:>11}  {' '.join(r['overrides']) or '(no overrides)'}  [{Path(r['dir']).name}]{mark}")
        cv = summarize_cross_validation(sweep_dir)
        if cv is not None:
            write_json_atomic(sweep_dir / "cv_summary.json", cv)
            p = cv["pooled"]
            lines.append(f"cross-validation ({cv['n_folds']} folds, {cv['n_volumes']} volumes, 3D per volume): "
                         f"Dice anterior {p['dice_anterior']['mean']:.4f}, posterior {p['dice_posterior']['mean']:.4f}, "
                         f"mean {p['dice_mean']['mean']:.4f} -> cv_summary.json")
        print("\n".join(lines))
