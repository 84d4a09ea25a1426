"""Per-volume 3D overlap metrics (Dice, Jaccard) and their summary over a set of volumes.

numpy only: used by the test stage of training, by ``hippo.eval`` and by deployment checks.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from hippo import __version__
from hippo.fileio import write_json_atomic
from hippo.preprocessing import LABEL_NAMES, label_volumes_mm3


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice ``2|P∩T| / (|P|+|T|)`` of two boolean masks; 1.0 when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom


def jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard ``|P∩T| / |P∪T|`` of two boolean masks; 1.0 when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    union = int(np.logical_or(p, t).sum())
    return 1.0 if union == 0 else int(np.logical_and(p, t).sum()) / union


def volume_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
    labels: Mapping[int, str] = LABEL_NAMES,
) -> dict[str, float]:
    """3D metrics of one predicted label volume against the truth.

    Args:
        pred, truth: ``(D, H, W)`` integer label volumes of equal shape.
        spacing: voxel size in mm (for the volumes).

    Returns:
        ``dice_<class>`` / ``jaccard_<class>`` per foreground class, ``dice_mean`` /
        ``jaccard_mean`` (mean over the foreground classes), ``dice_foreground`` /
        ``jaccard_foreground`` (all hippocampus labels merged), and predicted and true volumes
        in mm³ (``pred_total_mm3``, ``true_total_mm3``...).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    out: dict[str, float] = {}
    fg = [k for k in sorted(labels) if k != 0]
    for k in fg:
        out[f"dice_{labels[k]}"] = dice(pred == k, truth == k)
        out[f"jaccard_{labels[k]}"] = jaccard(pred == k, truth == k)
    out["dice_mean"] = float(np.mean([out[f"dice_{labels[k]}"] for k in fg]))
    out["jaccard_mean"] = float(np.mean([out[f"jaccard_{labels[k]}"] for k in fg]))
    out["dice_foreground"] = dice(pred > 0, truth > 0)
    out["jaccard_foreground"] = jaccard(pred > 0, truth > 0)
    for prefix, vol in (("pred", pred), ("true", truth)):
        for key, value in label_volumes_mm3(vol, spacing).items():
            out[f"{prefix}_{key}"] = value
    return out


def summarize(per_volume: Iterable[Mapping[str, float]], confidence: float = 0.95,
              resamples: int = 10_000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean, standard deviation, minimum and maximum of each metric over volumes, and a confidence
    interval of the mean.

    The interval is a percentile bootstrap over volumes (``resamples`` draws of the volumes with
    replacement, fixed ``seed``, so a summary is reproducible): how far the mean Dice of this set of
    cases could move on another set of the same size, which is what decides whether two models or a
    model and a target differ. No interval for fewer than two volumes.

    Returns:
        ``{metric: {"mean", "std", "min", "max", "ci_low", "ci_high"}}``, plus
        ``{"n_volumes": {"count": n}}``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rows = list(per_volume)
    out: dict[str, dict[str, float]] = {"n_volumes": {"count": len(rows)}}
    if not rows:
        return out
    for key in rows[0]:
        values = np.array([float(r[key]) for r in rows if isinstance(r.get(key), (int, float, np.number))])
        if values.size == 0 or not all(math.isfinite(v) for v in values):
            continue
        out[key] = {"mean": float(values.mean()), "std": float(values.std()),
                    "min": float(values.min()), "max": float(values.max())}
        if values.size >= 2 and resamples > 0:
            tail = (1 - confidence) / 2 * 100
            low, high = np.percentile(_bootstrap_means(values, resamples, seed), [tail, 100 - tail])
            out[key].update(ci_low=float(low), ci_high=float(high))
    return out


def _bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` draws with replacement of ``values``; the same draws for every metric
    of one set of volumes (same seed, same size), in chunks of at most ~4 M indices, so a summary of
    thousands of volumes stays small in memory."""
    rng = np.random.default_rng(seed)
    chunk = max(1, (1 << 22) // values.size)
    return np.concatenate([values[rng.integers(0, values.size, size=(min(chunk, resamples - start), values.size))]
                           .mean(axis=1) for start in range(0, resamples, chunk)])


# per-volume differences smaller than this are float rounding, not a win or a loss
_TIE = 1e-9


def paired_difference(per_volume: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]],
                      keys: Sequence[str] = ("dice_anterior", "dice_posterior", "dice_foreground"),
                      confidence: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> dict[str, dict[str, float]]:
    """Per-volume difference ``per_volume - reference`` of two evaluations of the same cases (matched
    by ``name``), with a paired percentile-bootstrap interval of its mean.

    Pairing removes the spread between cases that both models share, so a difference of a few
    thousandths in mean Dice can be told from noise where the two unpaired intervals overlap.

    Returns:
        ``{key: {"mean", "ci_low", "ci_high", "better", "worse"}}`` (``better``/``worse``: number of
        volumes where ``per_volume`` is above/below ``reference`` by more than float rounding),
        plus ``{"n_volumes": {"count"}}``.

    Raises:
        ValueError: the two evaluations are not of the same cases, or a key is missing.
    """
    mismatch = case_mismatch([r["name"] for r in per_volume], [r["name"] for r in reference])
    if mismatch:
        raise ValueError(f"the two evaluations are not of the same cases ({mismatch})")
    ours, theirs = {r["name"]: r for r in per_volume}, {r["name"]: r for r in reference}
    names = sorted(ours)
    diffs: dict[str, np.ndarray] = {}
    for key in keys:
        if any(key not in ours[n] or key not in theirs[n] for n in names):
            raise ValueError(f"{key!r} is not a metric of both evaluations")
        diffs[key] = np.array([ours[n][key] - theirs[n][key] for n in names], dtype=float)
    summary = summarize([{k: float(d[i]) for k, d in diffs.items()} for i in range(len(names))],
                        confidence, resamples, seed)
    out: dict[str, dict[str, float]] = {"n_volumes": {"count": len(names)}}
    for key, d in diffs.items():
        out[key] = {k: summary[key][k] for k in ("mean", "ci_low", "ci_high") if k in summary[key]}
        out[key].update(better=int((d > _TIE).sum()), worse=int((d < -_TIE).sum()))
    return out


def case_mismatch(ours: Sequence[str], theirs: Sequence[str]) -> str | None:
    """Why two lists of case names are not the same cases once each (for a paired comparison), or
    None when they are."""
    a, b = set(ours), set(theirs)
    if a == b and len(a) == len(ours) and len(b) == len(theirs):
        return None
    only = sorted(map(str, a ^ b))
    return (f"{len(ours)} and {len(theirs)} volumes; in one only: {', '.join(only[:5]) or 'duplicated names'}"
            f"{' ...' if len(only) > 5 else ''}")


def write_results(path: str | os.PathLike, per_volume: list[dict[str, Any]], config: Mapping[str, Any],
                  **extra: Any) -> dict[str, Any]:
    """Write ``results.json`` atomically: per-volume metrics, their summary, ``extra`` fields and the
    resolved ``config``. Returns what was written."""
    results = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hippo_version": __version__,
        **extra,
        "summary": summarize(per_volume),
        "per_volume": per_volume,
        "config": dict(config),
    }
    write_json_atomic(path, results)
    return results
