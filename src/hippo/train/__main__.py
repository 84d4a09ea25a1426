"""Entrypoint: ``python -m hippo.train [overrides]`` — compose ``conf/train.yaml`` and train.

Examples::

    python -m hippo.train                                   # synthetic data (embedded default)
    python -m hippo.train data=hippocampus data.root=../shared/data/Task04_Hippocampus
    python -m hippo.train trainer.precision=16-mixed trainer.max_epochs=1
    python -m hippo.train --multirun model.optimizer.lr=1e-3,3e-4,1e-4
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from hippo.config import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hippo.train.fit import run_training  # imported here so --help and --cfg stay fast

    metrics = run_training(cfg)
    value = metrics.get(cfg.optimized_metric)
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
