"""One training run from a composed config: fit, test on whole volumes, export the model file.

Called by the thin entrypoint ``python -m hippo.train`` (:mod:`hippo.train`); importable and
callable from tests with a config composed by Hydra's ``compose``.

Writes into ``cfg.paths.output_dir``:
``split.json``, ``skipped_cases.json`` (data module), ``checkpoints/`` (Lightning), TensorBoard
events under ``tensorboard/``, ``results.json`` (3D test metrics + resolved config) and the
exported model file ``model.pt`` (:mod:`hippo.infer`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from hippo.fileio import write_json_atomic
from hippo.infer import save_model_file
from hippo.metrics import summarize, volume_metrics, write_results

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group dict that carries a ``_target_``."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def _check_input_channels(model: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """Fail before training when the network's input channels do not match the 2.5D context."""
    context = int(getattr(datamodule, "context_slices", 0))
    net_config = getattr(getattr(model, "net", None), "config", {})
    if "in_channels" in net_config and net_config["in_channels"] != 2 * context + 1:
        raise ValueError(f"model.net.in_channels={net_config['in_channels']} but data.context_slices={context} "
                         f"feeds {2 * context + 1} channels: set model.net.in_channels={2 * context + 1}")


def _write_val_volumes(path: Path, model: L.LightningModule, datamodule: Any, cfg: DictConfig,
                       training_summary: dict[str, Any]) -> None:
    """3D per-volume metrics of the (best) model on the validation cases -> ``val_results.json``.

    With ``data.fold`` set these are the cross-validation figures of that fold
    (:func:`hippo.train.sweep_summary.summarize_cross_validation` pools the folds).
    """
    model.eval()
    rows = []
    for name in datamodule.split["val"]:
        case = datamodule.cases[name]
        pred = model.segment_volume(case.image, datamodule.patch_size, getattr(datamodule, "context_slices", 0))
        rows.append({"name": name, **volume_metrics(pred, case.label, case.spacing)})
    write_results(path, rows, OmegaConf.to_container(cfg, resolve=True), part="val",
                  fold=getattr(datamodule, "fold", None), num_folds=getattr(datamodule, "num_folds", None),
                  training=training_summary)
    s = summarize(rows)
    log.info("val (%d volumes, 3D): Dice anterior %.4f, posterior %.4f", len(rows),
             s["dice_anterior"]["mean"], s["dice_posterior"]["mean"])


def _device_description(trainer: L.Trainer) -> str:
    """What the fit ran on, for the results and the model card: the GPU's name, or the CPU's cores."""
    import os
    import platform

    root = getattr(trainer.strategy, "root_device", None)
    if root is not None and root.type == "cuda":
        return f"{torch.cuda.get_device_name(root)} x{trainer.num_devices}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and export as ``cfg`` says.

    Returns:
        The logged metrics (``val/dice_mean_best``, ``test/dice_mean``...) as floats, plus
        ``output_dir`` and ``model_path``.
    """
    if cfg.seed is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", OmegaConf.to_container(cfg, resolve=True))

    log.info("data module <%s>", cfg.data._target_)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info("model <%s>", cfg.model._target_)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    _check_input_channels(model, datamodule)

    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    fit_seconds = time.perf_counter() - t0

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    if cfg.test:
        if best and not trainer.fast_dev_run:
            log.info("testing the best checkpoint %s", best)
            trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=False)
        else:
            trainer.test(model, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    if trainer.global_rank != 0:
        return metrics
    split = getattr(datamodule, "split", {})
    training_summary = {
        "data_root": str(getattr(datamodule, "root", "")),
        "split_sizes": {k: len(v) for k, v in split.items()},
        "split_seed": getattr(datamodule, "split_seed", None),
        "epochs": trainer.current_epoch,
        "precision": str(trainer.precision),
        "accelerator": type(trainer.accelerator).__name__,
        "device": _device_description(trainer),
        "fit_seconds": round(fit_seconds, 1),
        "best_checkpoint": best,
        "val_dice_mean_best": metrics.get("val/dice_mean_best"),
    }
    if cfg.val_volumes and split.get("val"):
        _write_val_volumes(out / "val_results.json", model, datamodule, cfg, training_summary)
    results = None
    if cfg.test:
        results = write_results(out / "results.json", model.test_results, OmegaConf.to_container(cfg, resolve=True), split=split,
                                skipped_cases=getattr(datamodule, "skipped", []), training=training_summary)
        s = results["summary"]
        log.info("test (%d volumes): Dice anterior %.4f, posterior %.4f, mean %.4f",
                 s["n_volumes"]["count"], s.get("dice_anterior", {}).get("mean", float("nan")),
                 s.get("dice_posterior", {}).get("mean", float("nan")), s.get("dice_mean", {}).get("mean", float("nan")))
    if cfg.export:
        test_metrics = {k: v["mean"] for k, v in (results or {}).get("summary", {}).items() if "mean" in v}
        path = save_model_file(out / "model.pt", model.net, preprocessing=datamodule.preprocessing,
                               labels=dict(enumerate(model.class_names)), metrics=test_metrics,
                               training=training_summary, postprocessing=getattr(model, "postprocessing", None))
        metrics["model_path"] = str(path)
        log.info("exported model file %s", path)
    metrics["output_dir"] = str(out)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
