"""Entrypoint: ``python -m hippo.listen [overrides]`` (``conf/listen.yaml``).

Runs the AI listener (:class:`hippo.network.listener.Listener`): a DICOM Storage SCP (AE
``HIPPOAI`` on 127.0.0.1:11112) that runs the deploy pipeline on each study once it has been quiet
for ``listener.quiet_seconds`` and sends the SC report, SEG and SR to the PACS (``pacs`` group).
Runs until SIGTERM/SIGINT, then stops gracefully (finishes the study being processed).

    python -m hippo.listen model_path=outputs/train/runs/<run>/model.pt
    python -m hippo.listen listener.port=11112 listener.ae_title=HIPPOAI pacs.port=4242 \\
        paths.log_dir=outputs listener.quiet_seconds=3
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from hippo.config import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="listen")
def main(cfg: DictConfig) -> None:
    from hippo.network.listener import run_listener

    code = run_listener(OmegaConf.to_container(cfg, resolve=True))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
