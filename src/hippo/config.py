"""Where the Hydra configs live, for a source checkout and for an installed package alike.

The configs are kept in the repository's ``conf/`` directory. A source checkout (or an editable
install) reads them there; a wheel ships the same files as the package ``hippo._conf``.
Entrypoints pass :func:`config_dir` to ``hydra.main(config_path=...)``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_CHECKOUT_CONF = Path(__file__).resolve().parents[2] / "conf"


def config_dir() -> str:
    """Absolute path of the directory holding ``train.yaml`` and the config groups."""
    if (_CHECKOUT_CONF / "train.yaml").is_file():
        return str(_CHECKOUT_CONF)
    spec = importlib.util.find_spec("hippo._conf")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "train.yaml").is_file():
                return str(Path(location))
    raise FileNotFoundError(
        "hippo's Hydra configs were not found: expected conf/train.yaml in the source checkout "
        "or the package hippo._conf in the installation"
    )
