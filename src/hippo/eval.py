"""Entrypoint: ``python -m hippo.eval [ckpt_path=MODEL.pt] data.root=DIR`` — 3D Dice/Jaccard of an
exported model (default: the shipped one, on its held-out test split) on the labelled pairs in
DIR, written as ``results.json`` in the run directory."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hippo.config import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    from hippo.evaluation import evaluate_model, format_summary, select_pairs
    from hippo.infer import InferenceAgent
    from hippo.metrics import write_results
    from hippo.models import default_split_path, resolve_model_path

    split_file = cfg.data.split_file
    if split_file is None and cfg.ckpt_path is None:
        split_file = default_split_path()
    if cfg.data.split_part == "all":
        split_file = None
    try:
        model_path = resolve_model_path(cfg.ckpt_path, cfg.paths.log_dir)
        agent = InferenceAgent.from_file(model_path, device=cfg.device, batch_size=cfg.batch_size,
                                         precision=cfg.get("precision", "float32"))
        if cfg.get("largest_component") is not None:
            agent.postprocessing["largest_component"] = bool(cfg.largest_component)
        pairs, unpaired = select_pairs(cfg.data.root, cfg.data.manifest, split_file, cfg.data.split_part)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    rows, unreadable = evaluate_model(agent, pairs)
    out = Path(cfg.paths.output_dir) / "results.json"
    results = write_results(out, rows, OmegaConf.to_container(cfg, resolve=True), model=str(model_path),
                            split_file=str(split_file) if split_file else None,
                            model_metadata={k: agent.metadata.get(k) for k in ("hippo_version", "created", "training")},
                            skipped_cases=unpaired + unreadable)
    print(f"model {model_path} (largest component: {bool(agent.postprocessing.get('largest_component'))}); "
          f"{len(rows)} volumes under {cfg.data.root}"
          + (f" ({cfg.data.split_part} cases of {split_file})" if split_file else ""))
    print(format_summary(results["summary"]))
    print(f"results: {out}")
    if not rows:
        sys.exit("error: no case could be evaluated")


if __name__ == "__main__":
    main()
