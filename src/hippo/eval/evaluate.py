"""Evaluate an exported model file on every labelled pair of a directory (3D per-volume metrics).

Uses only the deploy-side pieces (:class:`hippo.infer.InferenceAgent`, :mod:`hippo.metrics`), so
it measures exactly what deployment will run. :func:`run_evaluation` is the whole job of
``python -m hippo.eval`` (whose entrypoint only turns the config into its keyword arguments).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from hippo.data.nifti import CaseError, CasePaths, load_case, load_nifti
from hippo.data.pairs import select_pairs
from hippo.infer import InferenceAgent, InferenceSettings
from hippo.metrics import case_mismatch, paired_difference, volume_metrics, write_results
from hippo.quality import assess_quality
from hippo.weights import default_split_path

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


def read_reference(path: str | os.PathLike, names: Sequence[str]) -> dict[str, Any]:
    """The ``results.json`` of an earlier evaluation to compare with (``compare_to``), checked
    against the case ``names`` about to be evaluated, so a wrong file fails before the long evaluation.

    Raises:
        ValueError: the file cannot be read, is not a ``hippo.eval`` / ``hippo.train`` results file
            (no ``per_volume`` list), or holds other cases; the message names the file.
    """
    try:
        reference = json.loads(Path(path).read_text())
        if not isinstance(reference, dict) or not isinstance(reference.get("per_volume"), list):
            raise ValueError("no per_volume list (not a hippo.eval or hippo.train results.json)")
        mismatch = case_mismatch(list(names), [r.get("name") for r in reference["per_volume"]])
        if mismatch:
            raise ValueError(f"not the cases of this evaluation ({mismatch})")
    except (OSError, ValueError) as exc:
        raise ValueError(f"compare_to={path}: {exc}") from None
    return reference


def run_evaluation(
    *,
    data_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    log_dir: str | os.PathLike = "outputs",
    model_path: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    precision: str = "float32",
    backend: str = "auto",
    manifest: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
    split_part: str = "test",
    largest_component: bool | None = None,
    compare_to: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
) -> int:
    """Evaluate a model file on labelled pairs and write ``<output_dir>/results.json``
    (per-volume Dice/Jaccard and volumes, their summary, optionally the paired difference against an
    earlier evaluation); print the summary. The job of ``python -m hippo.eval``.

    Args:
        data_root: a Decathlon-layout directory (``imagesTr/``, ``labelsTr/``) of labelled pairs.
        output_dir: where ``results.json`` is written.
        log_dir: where ``model_path="latest"`` looks for the newest ``model.pt``.
        model_path: the model file; ``None`` = the shipped default model, ``"latest"`` = the newest
            under ``log_dir`` (:func:`hippo.weights.resolve_model_path`).
        device, batch_size, precision, backend: how the model runs (:class:`hippo.infer.InferenceSettings`).
        manifest: a curation ``manifest.json`` whose cases replace the directory scan.
        split_file: a training run's ``split.json`` choosing the cases; ``None`` = the shipped
            model's split when ``model_path`` is ``None``, else every pair.
        split_part: ``train`` | ``val`` | ``test`` of the split, or ``all`` (every pair, no split).
        largest_component: ``None`` = the model file's post-processing; ``True``/``False`` overrides it.
        compare_to: an earlier ``results.json`` of the same cases (checked before the evaluation).
        config: the resolved config, stored in ``results.json``.

    Returns:
        The exit status: 0, or 1 when the model, the data or ``compare_to`` could not be read (nothing
        written), no case could be evaluated, or the comparison failed (``results.json`` is written
        without it). Each error is printed to stderr as ``error: ...``.
    """
    try:
        settings = InferenceSettings.from_config({"model_path": None if model_path is None else str(model_path),
                                                  "device": device, "batch_size": batch_size, "precision": precision,
                                                  "backend": backend})
        if split_file is None and settings.model_path is None:
            split_file = default_split_path()
        if split_part == "all":
            split_file = None
        resolved_model = settings.resolve_model(log_dir)
        agent = InferenceAgent.from_file(resolved_model, **settings.agent_options)
        if largest_component is not None:
            agent.postprocessing["largest_component"] = bool(largest_component)
        pairs, unpaired = select_pairs(data_root, manifest, split_file, split_part)
        reference = read_reference(compare_to, [p.name for p in pairs]) if compare_to else None
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows, unreadable = evaluate_model(agent, pairs)
    comparison, comparison_error = None, None
    if reference is not None and rows:
        try:
            comparison = paired_difference(rows, reference["per_volume"])
        except ValueError as exc:         # e.g. a case unreadable now: the results are still written
            comparison_error = f"compare_to={compare_to}: {exc}"
    out = Path(output_dir) / "results.json"
    results = write_results(out, rows, dict(config or {}), model=str(resolved_model),
                            split_file=str(split_file) if split_file else None,
                            model_metadata={k: agent.metadata.get(k) for k in ("hippo_version", "created", "training")},
                            skipped_cases=unpaired + unreadable,
                            **({"comparison": {"reference": str(compare_to), **comparison}} if comparison else {}))
    print(f"model {resolved_model} (largest component: {bool(agent.postprocessing.get('largest_component'))}); "
          f"{len(rows)} volumes under {data_root}"
          + (f" ({split_part} cases of {split_file})" if split_file else ""))
    print(format_summary(results["summary"]))
    if comparison:
        print(format_comparison(comparison, str(compare_to)))
    print(f"results: {out}", flush=True)
    if not rows:
        print("error: no case could be evaluated", file=sys.stderr)
        return 1
    if comparison_error:
        print(f"error: {comparison_error}", file=sys.stderr)
        return 1
    return 0
