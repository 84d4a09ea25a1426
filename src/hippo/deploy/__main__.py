"""Entrypoint: ``python -m hippo.deploy study=DIR | studies=ROOT | outbox=flush`` (``conf/deploy.yaml``).

Prints the volumes (mm³) of each study, writes the SC report, SEG, SR and ``result.json`` per study
and ``summary.json``/``summary.md`` per run, sends the objects to the PACS (what fails waits in the
outbox, flushed at the start of every run) and exits non-zero when any study failed.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from hippo.config import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="deploy")
def main(cfg: DictConfig) -> None:
    from hippo.deploy.batch import run_deploy

    code = run_deploy(OmegaConf.to_container(cfg, resolve=True))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
