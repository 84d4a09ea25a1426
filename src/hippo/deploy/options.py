"""The one map from a resolved deploy or listen config to the pipeline's options.

``python -m hippo.deploy`` (:mod:`hippo.deploy.batch`) and the listener
(:meth:`hippo.network.listener.Listener.from_config`) both build their
:class:`hippo.deploy.pipeline.StudyProcessor` through :func:`hippo.deploy.pipeline.build_processor`;
both take its options from :func:`processor_options`, so a config key means the same in both.
What differs stays with each caller: where the results, the outbox and the PACS are (the listener
owns its folders and re-uses its PACS settings for its own outbox and C-MOVE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from hippo.prior import lookup_from_config


def processor_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`hippo.deploy.pipeline.build_processor` that come from the
    config groups (everything except the model file, the results folder, ``pacs`` and ``outbox_dir``).

    Args:
        cfg: ``conf/deploy.yaml`` or ``conf/listen.yaml`` resolved to plain Python. Read: the
            ``inference`` group's top-level keys (``model_path``, ``device``, ``batch_size``,
            ``precision``), ``series``, ``io_threads``, ``report`` (``series_numbers``,
            ``write_png``), ``plausibility``, ``send``, ``prior`` and ``prior_lookup``.

    Returns:
        ``{"device", "batch_size", "precision", "rules", "io_threads", "series_numbers",
        "write_png", "plausibility", "prior"}``: plain values (picklable, for batch workers)
        except ``prior``, a :class:`hippo.prior.PriorLookup` or ``None``.

    Raises:
        FileNotFoundError: ``prior`` names a file that does not exist.
        ValueError: an ``inference`` value out of range (:meth:`hippo.inference_settings.InferenceSettings.from_config`),
            or a ``series`` / ``plausibility`` key or value their settings classes refuse: checked
            here, at start, not when the first study is processed.
    """
    from hippo.credentials import read_credentials
    from hippo.dicom.ingest import SelectionRules
    from hippo.dicom.wholehead_select import WholeHeadRules
    from hippo.inference_settings import InferenceSettings
    from hippo.plausibility import PlausibilityRules

    prior = cfg.get("prior")
    if prior and not Path(prior).exists():  # a folder: an earlier whole-head DICOM study (hippo.wholehead.longitudinal)
        raise FileNotFoundError(f"prior={prior}: no such file or folder (give our SR file, a result.json, or for a "
                                "whole-head study an earlier scan or study folder)")
    settings = InferenceSettings.from_config(cfg)
    SelectionRules.from_mapping(cfg["series"])
    WholeHeadRules.from_mapping(cfg["series"].get("wholehead"))
    PlausibilityRules.from_mapping(cfg["plausibility"])
    report = cfg["report"]
    return {
        **settings.agent_options,
        "rules": dict(cfg["series"]),
        "io_threads": int(cfg["io_threads"]),
        "series_numbers": report["series_numbers"],
        "write_png": bool(report["write_png"]),
        "plausibility": dict(cfg["plausibility"]),
        # the patient's earlier result: the file given, else the PACS search (DICOMweb) when sending
        "prior": lookup_from_config(cfg, send=bool(cfg["send"]), read_credentials=read_credentials),
    }
