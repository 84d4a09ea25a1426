"""The shipped default model and how a configured ``model_path`` is resolved.

Files in this package (installed with the wheel):

- ``hippocampus_25d.pt``: the default model file (format ``hippo-model/1``, see :mod:`hippo.infer`),
  trained by ``python -m hippo.train experiment=hippocampus_25d`` on the Decathlon hippocampus data;
- ``hippocampus_25d.split.json``: the train/val/test split it was trained with (the test cases
  were held out from training and model selection);
- ``hippocampus_25d.cv.json``: the pooled cross-validation figures of its configuration;
- ``MODEL_CARD.md``: data, configuration, metrics, training time and hardware, licence.

``model_path`` values accepted by deploy, listen and eval:

- ``null`` (the default): the shipped model;
- ``latest``: the newest ``model.pt`` under the training runs (``outputs/**/model.pt``);
- a path to any exported model file.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "hippocampus_25d"
_HERE = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """The shipped default model file.

    Raises:
        FileNotFoundError: the package was installed without its weights.
    """
    path = _HERE / f"{DEFAULT_MODEL_NAME}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shipped default model is missing from this install; reinstall "
                                "the package or pass model_path=/path/to/model.pt")
    return path


def default_split_path() -> Path:
    """The split (train/val/test case names) the shipped default model was trained with."""
    return _HERE / f"{DEFAULT_MODEL_NAME}.split.json"


def find_latest_model(search_root: str | os.PathLike) -> Path:
    """The newest ``model.pt`` below ``search_root`` (the runs of ``python -m hippo.train``).

    Raises:
        FileNotFoundError: none there, with how to get one.
    """
    candidates = sorted(Path(search_root).glob("**/model.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no model.pt under {search_root}: train one (make demo, or python -m hippo.train) "
                                "or pass model_path=/path/to/model.pt")
    return candidates[-1]


def resolve_model_path(model_path: str | os.PathLike | None, runs_root: str | os.PathLike = "outputs") -> Path:
    """Turn a configured ``model_path`` into a file path (see the module docstring).

    Raises:
        FileNotFoundError: the named file, the latest run's model or the shipped model is missing.
    """
    if model_path is None or str(model_path) in ("", "default"):
        return default_model_path()
    if str(model_path) == "latest":
        return find_latest_model(runs_root)
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    return path
