"""Evaluate an exported model file on every labelled pair of a directory (3D per-volume metrics).

Uses only the deploy-side pieces (:class:`hippo.infer.InferenceAgent`, :mod:`hippo.metrics`), so
it measures exactly what deployment will run. Called by ``python -m hippo.eval``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hippo.data.nifti import CaseError, CasePaths, load_case, load_nifti
from hippo.infer import InferenceAgent
from hippo.metrics import volume_metrics
from hippo.quality import assess_quality

log = logging.getLogger(__name__)


def evaluate_model(agent: InferenceAgent, pairs: list[CasePaths]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Segment each image with ``agent`` and compare with its label.

    Returns:
        ``(per_volume, skipped)``: metric rows (see :func:`hippo.metrics.volume_metrics`, plus
        ``name``, ``seconds``, and ``quality_score`` / ``quality_flagged`` of :mod:`hippo.quality`
        with the default limits), and the cases that could not be read, with the reason.
    """
    rows, skipped = [], []
    for pair in pairs:
        try:
            truth = load_case(pair, slice_axis=0, require_foreground=False)
            raw, spacing, _ = load_nifti(pair.image)
        except CaseError as exc:
            log.warning("skipping %s", exc)
            skipped.append({"file": exc.path, "problem": exc.problem})
            continue
        t0 = time.perf_counter()
        seg = agent.segment_members(raw)  # the same pass as segment(), members kept for the quality score
        pred = seg.labels
        quality = assess_quality(pred, spacing, member_probabilities=seg.member_probabilities,
                                 probabilities=seg.probabilities, unprocessed_labels=seg.unprocessed_labels)
        row = {"name": pair.name, **volume_metrics(pred, truth.label, spacing),
               "quality_score": quality.score, "quality_flagged": quality.flagged}
        row["seconds"] = round(time.perf_counter() - t0, 4)
        rows.append(row)
        log.info("%s: Dice anterior %.4f posterior %.4f", pair.name, row["dice_anterior"], row["dice_posterior"])
    return rows, skipped


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """A small text table of the Dice/Jaccard means (± sd, and the 95 % bootstrap interval of the
    mean where the summary has one)."""
    lines = [f"{'metric':<20} {'mean':>8} {'sd':>8}   {'95% CI of the mean':<18} "
             f"({summary['n_volumes']['count']} volumes)"]
    for key in ("dice_anterior", "dice_posterior", "dice_mean", "dice_foreground",
                "jaccard_anterior", "jaccard_posterior", "jaccard_mean", "jaccard_foreground"):
        if key in summary:
            s = summary[key]
            ci = f"{s['ci_low']:.4f}-{s['ci_high']:.4f}" if "ci_low" in s else ""
            lines.append(f"{key:<20} {s['mean']:>8.4f} {s['std']:>8.4f}   {ci}".rstrip())
    return "\n".join(lines)


def format_comparison(difference: dict[str, dict[str, float]], reference: str) -> str:
    """A small text table of :func:`hippo.metrics.paired_difference` against ``reference``."""
    lines = [f"against {reference} (the same {difference['n_volumes']['count']} volumes, paired):",
             f"{'metric':<20} {'difference':>10}   {'95% CI':<17} better/worse"]
    for key, d in difference.items():
        if key == "n_volumes":
            continue
        ci = f"{d['ci_low']:+.4f} {d['ci_high']:+.4f}" if "ci_low" in d else ""
        lines.append(f"{key:<20} {d['mean']:>+10.4f}   {ci:<17} {d['better']}/{d['worse']}")
    return "\n".join(lines)
