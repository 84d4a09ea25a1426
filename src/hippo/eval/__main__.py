"""Entrypoint: ``python -m hippo.eval [model_path=MODEL.pt] data.root=DIR [compare_to=RESULTS.json]`` —
3D Dice/Jaccard of an exported model (default: the shipped one, on its held-out test split) on the
labelled pairs in DIR, written as ``results.json`` in the run directory; with ``compare_to``, also
the paired per-volume difference against an earlier evaluation of the same cases."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hippo.config import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    from hippo.data.pairs import select_pairs
    from hippo.eval.evaluate import evaluate_model, format_comparison, format_summary
    from hippo.infer import InferenceAgent, InferenceSettings
    from hippo.metrics import paired_difference, write_results
    from hippo.weights import default_split_path

    settings = InferenceSettings.from_config(cfg)
    split_file = cfg.data.split_file
    if split_file is None and settings.model_path is None:
        split_file = default_split_path()
    if cfg.data.split_part == "all":
        split_file = None
    try:
        model_path = settings.resolve_model(cfg.paths.log_dir)
        agent = InferenceAgent.from_file(model_path, **settings.agent_options)
        if cfg.get("largest_component") is not None:
            agent.postprocessing["largest_component"] = bool(cfg.largest_component)
        pairs, unpaired = select_pairs(cfg.data.root, cfg.data.manifest, split_file, cfg.data.split_part)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    reference = _read_reference(cfg.get("compare_to"), [p.name for p in pairs])
    rows, unreadable = evaluate_model(agent, pairs)
    comparison, comparison_error = None, None
    if reference is not None and rows:
        try:
            comparison = paired_difference(rows, reference["per_volume"])
        except ValueError as exc:         # e.g. a case unreadable now: the results are still written
            comparison_error = f"error: compare_to={cfg.compare_to}: {exc}"
    out = Path(cfg.paths.output_dir) / "results.json"
    results = write_results(out, rows, OmegaConf.to_container(cfg, resolve=True), model=str(model_path),
                            split_file=str(split_file) if split_file else None,
                            model_metadata={k: agent.metadata.get(k) for k in ("hippo_version", "created", "training")},
                            skipped_cases=unpaired + unreadable,
                            **({"comparison": {"reference": str(cfg.compare_to), **comparison}} if comparison else {}))
    print(f"model {model_path} (largest component: {bool(agent.postprocessing.get('largest_component'))}); "
          f"{len(rows)} volumes under {cfg.data.root}"
          + (f" ({cfg.data.split_part} cases of {split_file})" if split_file else ""))
    print(format_summary(results["summary"]))
    if comparison:
        print(format_comparison(comparison, str(cfg.compare_to)))
    print(f"results: {out}")
    if not rows:
        sys.exit("error: no case could be evaluated")
    if comparison_error:
        sys.exit(comparison_error)


def _read_reference(path: str | None, names: list[str]) -> dict | None:
    """The ``results.json`` of an earlier evaluation to compare with (``compare_to``); checked
    against the case ``names`` about to be evaluated before the long evaluation, so a wrong file
    fails at once."""
    from hippo.metrics import case_mismatch

    if not path:
        return None
    try:
        reference = json.loads(Path(path).read_text())
        if not isinstance(reference, dict) or not isinstance(reference.get("per_volume"), list):
            raise ValueError("no per_volume list (not a hippo.eval or hippo.train results.json)")
        mismatch = case_mismatch(names, [r.get("name") for r in reference["per_volume"]])
        if mismatch:
            raise ValueError(f"not the cases of this evaluation ({mismatch})")
        return reference
    except (OSError, ValueError) as exc:
        sys.exit(f"error: compare_to={path}: {exc}")


if __name__ == "__main__":
    main()
