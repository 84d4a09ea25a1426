"""Entrypoint: ``python -m hippo.eval [model_path=MODEL.pt] data.root=DIR [compare_to=RESULTS.json]`` —
3D Dice/Jaccard of an exported model (default: the shipped one, on its held-out test split) on the
labelled pairs in DIR, written as ``results.json`` in the run directory; with ``compare_to``, also
the paired per-volume difference against an earlier evaluation of the same cases.

Composes ``conf/eval.yaml`` and calls :func:`hippo.eval.evaluate.run_evaluation`; exits with its
status (non-zero: nothing could be evaluated, or an input could not be read).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from hippo.config import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    from hippo.eval.evaluate import run_evaluation  # imported here so --help and --cfg stay fast

    c = OmegaConf.to_container(cfg, resolve=True)
    code = run_evaluation(
        data_root=c["data"]["root"], manifest=c["data"]["manifest"], split_file=c["data"]["split_file"],
        split_part=c["data"]["split_part"], model_path=c["model_path"], device=c["device"],
        batch_size=c["batch_size"], precision=c["precision"], backend=c["backend"],
        largest_component=c["largest_component"],
        compare_to=c["compare_to"], output_dir=c["paths"]["output_dir"], log_dir=c["paths"]["log_dir"], config=c)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
