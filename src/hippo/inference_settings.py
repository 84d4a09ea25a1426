"""How a model file runs (``conf/inference/default.yaml``), readable without importing torch.

:class:`InferenceSettings` is read where a run starts (``hippo.deploy``, the listener, ``hippo.eval``),
before the model is loaded, possibly in a background thread (:mod:`hippo.model_loading`):
importing this module costs nothing; :mod:`hippo.infer`, which imports torch, re-exports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

#: ``"auto"``: bfloat16 where the device runs it natively, else float32 (:func:`hippo.infer.resolve_precision`).
PRECISIONS = ("auto", "float32", "bfloat16")
#: ``"auto"``: ONNX Runtime on a CPU in float32 when installed, else torch (:func:`hippo.infer.resolve_backend`).
BACKENDS = ("auto", "torch", "onnxruntime")


@dataclass(frozen=True)
class InferenceSettings:
    """How a model file runs: ``conf/inference/default.yaml``, the one group deploy, listen and eval
    compose (its keys sit at the top level of their configs). Read once with :meth:`from_config`;
    the defaults live in that YAML file only.

    Attributes:
        model_path: the model file; ``None`` = the shipped default model, ``"latest"`` = the newest
            ``<log_dir>/**/model.pt`` (:func:`hippo.weights.resolve_model_path`).
        device: ``"cpu"``, ``"cuda"``, ...
        batch_size: slices per forward pass.
        precision: ``"auto"`` (:func:`hippo.infer.resolve_precision`), ``"float32"`` or ``"bfloat16"`` (autocast).
        backend: ``"auto"`` (:func:`hippo.infer.resolve_backend`), ``"torch"`` or ``"onnxruntime"``.
    """

    model_path: str | None
    device: str
    batch_size: int
    precision: str
    backend: str

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "InferenceSettings":
        """From a resolved config (a mapping holding the inference group's keys).

        Raises:
            KeyError: a key is missing (the config does not compose the ``inference`` group).
            ValueError: an unknown precision or backend, or a batch size below 1.
        """
        missing = [k for k in ("model_path", "device", "batch_size", "precision", "backend") if k not in cfg]
        if missing:
            raise KeyError(f"inference settings {missing} missing: compose the `inference` config group")
        settings = cls(model_path=None if cfg["model_path"] in (None, "") else str(cfg["model_path"]),
                       device=str(cfg["device"]), batch_size=int(cfg["batch_size"]), precision=str(cfg["precision"]),
                       backend=str(cfg["backend"]))
        if settings.precision not in PRECISIONS:
            raise ValueError(f"precision {settings.precision!r}: choose one of {list(PRECISIONS)}")
        if settings.backend not in BACKENDS:
            raise ValueError(f"backend {settings.backend!r}: choose one of {list(BACKENDS)}")
        if settings.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {settings.batch_size}")
        return settings

    @property
    def agent_options(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`InferenceAgent.from_file` (device, batch_size, precision, backend)."""
        return {"device": self.device, "batch_size": self.batch_size, "precision": self.precision,
                "backend": self.backend}

    def resolve_model(self, log_dir: str | os.PathLike) -> Path:
        """The model file to load (:func:`hippo.weights.resolve_model_path`)."""
        from hippo.weights import resolve_model_path

        return resolve_model_path(self.model_path, log_dir)
