"""Where the Hydra configs live, and how a config group becomes a settings object.

The configs are kept in the repository's ``conf/`` directory. A source checkout (or an editable
install) reads them there; a wheel ships the same files as the package ``hippo._conf``.
Entrypoints pass :func:`config_dir` to ``hydra.main(config_path=...)``.

Every settings class built from a config group (``SelectionRules``, ``PacsConfig``,
``PlausibilityRules``...) reads it through :func:`settings_fields`, so all of them treat a key they
do not know the same way: refused, naming it (a misspelt option fails at start instead of being
silently ignored). No Hydra or OmegaConf import here: the deploy side uses this too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Iterable, Mapping

#: Hydra's own keys of an instantiable node (``_target_``...): never a setting, always dropped.
HYDRA_KEYS = frozenset({"_target_", "_recursive_", "_convert_", "_partial_", "_args_"})

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


def plain(value: Any) -> Any:
    """OmegaConf containers (nested) -> plain ``dict`` / ``list``, without importing omegaconf;
    other values are returned as they are."""
    if hasattr(value, "_metadata") and hasattr(value, "items"):
        return {str(k): plain(v) for k, v in value.items()}
    if hasattr(value, "_metadata") and hasattr(value, "__iter__"):
        return [plain(v) for v in value]
    return value


def settings_fields(cls: type, cfg: Mapping[str, Any] | None, *, handled: Iterable[str] = ()) -> dict[str, Any]:
    """The entries of a config mapping that the dataclass ``cls`` accepts, as plain Python values.

    The one policy of every ``from_mapping`` classmethod: Hydra's keys (:data:`HYDRA_KEYS`, e.g.
    ``_target_``) are dropped; every other key must be an ``__init__`` field of ``cls`` or one of
    ``handled`` (keys the caller reads itself, such as a preset name), else :class:`ValueError`.

    Args:
        cls: a dataclass (its ``init=True`` fields are the accepted keys).
        cfg: a mapping (dict or OmegaConf ``DictConfig``); ``None`` = empty.
        handled: more accepted keys, returned with the fields for the caller to take out.

    Returns:
        ``{key: value}`` of the accepted keys present in ``cfg`` (OmegaConf values made plain).

    Raises:
        ValueError: a key ``cls`` does not accept; the message names the unknown key(s), the class
            and every accepted key.
    """
    accepted = {f.name for f in dataclasses.fields(cls) if f.init} | set(handled)
    values = {str(k): plain(v) for k, v in dict(cfg or {}).items() if str(k) not in HYDRA_KEYS}
    unknown = sorted(k for k in values if k not in accepted)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown setting(s) {', '.join(repr(k) for k in unknown)}; "
                         f"accepted: {', '.join(sorted(accepted))}")
    return values
