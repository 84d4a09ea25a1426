"""Entrypoint: ``python -m hippo.predict input=PATH [output=DIR]`` (``conf/predict.yaml``).

``PATH`` is one NIfTI/MGZ whole-head T1, a folder of them, or a BIDS dataset. For each scan: a label
map on the scan's own grid (1/2 left anterior/posterior, 3/4 right), ``result.json`` (volumes in
mm³, asymmetry index, eTIV, review reasons, timings) and a report PNG; for a BIDS input a
BIDS-derivatives dataset. Exits non-zero when any scan failed (see :mod:`hippo.wholehead.run`).

A cohort in parts (``docs/cohort.md``): ``shard=I/N`` / ``participant_label=...`` process some scans
(per-scan results only), ``level=group`` merges them into ``volumes.tsv`` and ``qc_report.html``;
``--multirun 'shard=0/4,1/4,2/4,3/4' hydra/launcher=cohort_slurm`` (or ``submitit_local``) runs the
shards as scheduler jobs.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from hippo.config import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    from hippo.wholehead.run import run_predict

    code = run_predict(OmegaConf.to_container(cfg, resolve=True))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
