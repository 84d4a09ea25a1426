"""Entrypoint: ``python -m hippo.eval ckpt_path=MODEL.pt data.root=DIR`` — 3D Dice/Jaccard of an
exported model on every labelled pair in DIR, written as ``results.json`` in the run directory."""

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

    try:
        agent = InferenceAgent.from_file(cfg.ckpt_path, device=cfg.device, batch_size=cfg.batch_size)
        pairs, unpaired = select_pairs(cfg.data.root, cfg.data.manifest, cfg.data.split_file, cfg.data.split_part)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    rows, unreadable = evaluate_model(agent, pairs)
    out = Path(cfg.paths.output_dir) / "results.json"
    results = write_results(out, rows, OmegaConf.to_container(cfg, resolve=True), model=str(cfg.ckpt_path),
                            model_metadata={k: agent.metadata.get(k) for k in ("hippo_version", "created", "training")},
                            skipped_cases=unpaired + unreadable)
    print(format_summary(results["summary"]))
    print(f"results: {out}")
    if not rows:
        sys.exit("error: no case could be evaluated")


if __name__ == "__main__":
    main()
