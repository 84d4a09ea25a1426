"""Does the quality score (``hippo.quality``) rank segmentations by their true Dice, and does its flag
catch the bad ones?

    .venv/bin/python benchmarks/bench_quality.py [--data ../shared/data/Task04_Hippocampus]
        [--model src/hippo/weights/hippocampus_25d.pt] [--limit N] [--out outputs/benchmarks/quality.json]

Cases: the 47 held-out test volumes of the shipped model (``test`` of
``src/hippo/weights/hippocampus_25d.split.json``; no member saw them in training or model selection),
each as it is ("clean") and under five degradations, made deterministically from the volume alone:

* ``noise``: Gaussian noise, standard deviation 20 % of the 99th intensity percentile (seed = case
  number);
* ``blur``: Gaussian smoothing, sigma 1.5 voxels (1.5 mm);
* ``inhomogeneity``: a multiplicative bias field ``exp(0.7 * (x + y) / 2)`` with ``x``, ``y`` running
  from -1 to 1 across the first two axes (a factor of 0.5 to 2 across the crop);
* ``shifted_crop``: the field of view moved 10 voxels along axis 1 (anterior-posterior), the
  anterior 10 slices cut off; the prediction is put back on the full grid, so what left the field
  of view counts as missed;
* ``inverted``: a "T2-like" wrong sequence, intensities mirrored (``max - value``).

Every case is segmented once (:meth:`hippo.infer.InferenceAgent.segment_members`) and scored
(:func:`hippo.quality.assess_quality`, default :class:`hippo.plausibility.PlausibilityRules`). True Dice =
mean of the anterior and posterior Dice against the reference labels.

Rule fixed before any result was looked at (the flag threshold and what counts as a bad case):

1. The flag is the shipped defaults of :class:`hippo.plausibility.PlausibilityRules`, unchanged:
   agreement score below 0.85, member volume spread above 10 %, or a plain check (structure split,
   mask on the edge, > 10 % removed as islands, a volume outside the believable ranges, which
   includes a missing structure).
2. A **failure** is a case with true Dice below 0.80 (about the shipped model's test mean, 0.888,
   minus 2.5 standard deviations, 0.035): the flag should catch these. Also reported: how many of
   the worst 10 % of all cases (by true Dice) are flagged, and how many clean test cases are
   flagged (false alarms on ordinary input).
3. Spearman's rank correlation between the score and the true Dice, on the clean test cases and
   on all cases together.

Prints the figures and writes them (with every case) to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
from scipy import ndimage, stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hippo.fileio import write_json_atomic  # noqa: E402
from hippo.infer import InferenceAgent  # noqa: E402
from hippo.metrics import dice as metric_dice  # noqa: E402
from hippo.plausibility import PlausibilityRules  # noqa: E402
from hippo.quality import assess_quality  # noqa: E402

FAILURE_DICE = 0.80
SHIFT = 10


def _noise(img: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return img + rng.normal(0.0, 0.20 * float(np.percentile(img, 99)), img.shape).astype(np.float32)


def _inhomogeneity(img: np.ndarray, seed: int) -> np.ndarray:
    x = np.linspace(-1, 1, img.shape[0])[:, None, None]
    y = np.linspace(-1, 1, img.shape[1])[None, :, None]
    return (img * np.exp(0.7 * (x + y) / 2)).astype(np.float32)


DEGRADATIONS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "clean": lambda img, seed: img,
    "noise": _noise,
    "blur": lambda img, seed: ndimage.gaussian_filter(img, 1.5).astype(np.float32),
    "inhomogeneity": _inhomogeneity,
    "shifted_crop": lambda img, seed: np.ascontiguousarray(img[:, :-SHIFT, :]),
    "inverted": lambda img, seed: (img.max() - img).astype(np.float32),
}


def dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Per-structure Dice (1 anterior, 2 posterior; 1.0 when both are empty) and their mean."""
    out = {name: metric_dice(pred == value, ref == value) for value, name in ((1, "anterior"), (2, "posterior"))}
    out["mean"] = (out["anterior"] + out["posterior"]) / 2
    return out


def run_case(agent: InferenceAgent, name: str, image: np.ndarray, label: np.ndarray, spacing: tuple,
             degradation: str, seed: int) -> dict[str, Any]:
    degraded = DEGRADATIONS[degradation](image, seed)
    t = time.perf_counter()
    seg = agent.segment_members(degraded)
    q = assess_quality(seg.labels, spacing, member_probabilities=seg.member_probabilities,
                       probabilities=seg.probabilities, unprocessed_labels=seg.unprocessed_labels)
    pred = seg.labels
    if degradation == "shifted_crop":  # back onto the full grid: what left the view is missed
        full = np.zeros_like(label, dtype=np.uint8)
        full[:, :-SHIFT, :] = pred
        pred = full
    return {"case": name, "degradation": degradation, "dice": dice(pred, label), "seconds": time.perf_counter() - t,
            **{k: v for k, v in q.as_dict().items()}}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Spearman correlations, failures caught, worst 10 % caught, false alarms (see the docstring)."""
    def rho(sub: list[dict[str, Any]], key: str = "score", sign: float = 1.0) -> float | None:
        pairs = [(sign * r[key], r["dice"]["mean"]) for r in sub if r[key] is not None]
        if len(pairs) < 3:
            return None
        return float(stats.spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)

    clean = [r for r in rows if r["degradation"] == "clean"]
    failures = [r for r in rows if r["dice"]["mean"] < FAILURE_DICE]
    n_worst = max(1, round(0.10 * len(rows)))
    worst = sorted(rows, key=lambda r: r["dice"]["mean"])[:n_worst]
    by_deg = {}
    for deg in DEGRADATIONS:
        sub = [r for r in rows if r["degradation"] == deg]
        if sub:
            by_deg[deg] = {"n": len(sub), "dice_mean": float(np.mean([r["dice"]["mean"] for r in sub])),
                           "score_mean": float(np.mean([r["score"] for r in sub])),
                           "n_failures": sum(r["dice"]["mean"] < FAILURE_DICE for r in sub),
                           "n_flagged": sum(r["flagged"] for r in sub)}
    return {
        "n_cases": len(rows),
        "spearman_score_dice_clean": rho(clean),
        "spearman_score_dice_all": rho(rows),
        # the other indicators, for comparison (volume spread: larger = worse, hence the sign)
        "spearman_margin_dice_all": rho(rows, "margin"),
        "spearman_neg_volume_cv_dice_all": rho(rows, "volume_cv", -1.0),
        "n_failures": len(failures), "n_failures_flagged": sum(r["flagged"] for r in failures),
        "n_worst_10pct": n_worst, "worst_10pct_max_dice": worst[-1]["dice"]["mean"],
        "n_worst_10pct_flagged": sum(r["flagged"] for r in worst),
        "n_clean": len(clean), "n_clean_flagged": sum(r["flagged"] for r in clean),
        "n_flagged_not_failure": sum(r["flagged"] and r["dice"]["mean"] >= FAILURE_DICE for r in rows),
        "by_degradation": by_deg,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "Task04_Hippocampus"))
    ap.add_argument("--model", default=str(ROOT / "src" / "hippo" / "weights" / "hippocampus_25d.pt"))
    ap.add_argument("--split", default=str(ROOT / "src" / "hippo" / "weights" / "hippocampus_25d.split.json"))
    ap.add_argument("--limit", type=int, default=None, help="only the first N test volumes")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "quality.json"))
    args = ap.parse_args(argv)

    data = Path(args.data)
    names = json.loads(Path(args.split).read_text())["test"][: args.limit]
    agent = InferenceAgent.from_file(args.model)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        img_nii = nib.load(data / "imagesTr" / f"{name}.nii.gz")
        image = np.asarray(img_nii.dataobj, dtype=np.float32)
        label = np.asarray(nib.load(data / "labelsTr" / f"{name}.nii.gz").dataobj).round().astype(np.uint8)
        spacing = tuple(float(z) for z in img_nii.header.get_zooms()[:3])
        seed = int(name.rsplit("_", 1)[-1])
        for deg in DEGRADATIONS:
            row = run_case(agent, name, image, label, spacing, deg, seed)
            rows.append(row)
        print(f"[{i + 1}/{len(names)}] {name}: " + ", ".join(
            f"{r['degradation']} dice {r['dice']['mean']:.3f} score {r['score']:.3f}{' FLAG' if r['flagged'] else ''}"
            for r in rows[-len(DEGRADATIONS):]), flush=True)
    summary = summarize(rows)
    result = {"model": str(Path(args.model).name), "rules": PlausibilityRules().__dict__, "failure_dice": FAILURE_DICE,
              "seconds": time.perf_counter() - t0, "summary": summary, "cases": rows}
    write_json_atomic(args.out, result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
