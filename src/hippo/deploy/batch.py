"""What ``python -m hippo.deploy`` does with its resolved config (a plain dict, no Hydra here).

1. flush the outbox (objects an earlier run could not deliver), unless ``send`` is off;
2. ``outbox=flush``: stop there;
3. ``study=DIR``: one study; ``studies=ROOT``: every sub-directory, with a process pool;
4. print each study's volumes in mm³, write ``summary.json`` / ``summary.md``;
5. return 1 when any study failed or was flagged for review (the batch still processed every other
   study), else 0.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from hippo.pacs import Outbox, PacsConfig
from hippo.inference_settings import InferenceSettings
from hippo.deploy.options import processor_options
from hippo.deploy.pipeline import (StudyOutcome, build_processor, describe_volumes, find_studies, run_batch,
                            summary_table, write_summary)

log = logging.getLogger(__name__)


def _print_outcome(o: StudyOutcome) -> None:
    if o.status in ("ok", "review"):
        flag = f" REVIEW RECOMMENDED: {'; '.join(o.review)}" if o.status == "review" else ""
        print(f"{o.study}: {describe_volumes(o)} ({o.timings_s.get('total', 0):.2f} s)"
              + (f"; {len(o.queued)} object(s) queued in the outbox" if o.queued else "") + flag, flush=True)
    else:
        print(f"{o.study}: FAILED at {o.stage}: {o.error}", flush=True)


def flush_outbox(cfg: Mapping[str, Any]) -> dict[str, int]:
    """Send what waits in the outbox; returns the counts (empty when nothing waited)."""
    outbox = Outbox(cfg["outbox_dir"])
    if not len(outbox):
        return {}
    report = outbox.flush(PacsConfig.from_mapping(cfg["pacs"]))
    counts = report.counts()
    print(f"outbox {outbox.root}: {len(report.delivered)} delivered, {len(outbox)} still waiting", flush=True)
    return counts


def run_deploy(cfg: Mapping[str, Any]) -> int:
    """Run the deployment described by ``cfg`` (``conf/deploy.yaml`` resolved); returns the exit code."""
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies at INFO
    send = bool(cfg["send"])
    flushed = flush_outbox(cfg) if send else {}
    if cfg.get("outbox") == "flush":
        return 0 if not len(Outbox(cfg["outbox_dir"])) else 1
    if cfg.get("outbox") not in (None, "flush"):
        raise SystemExit(f"error: outbox={cfg['outbox']!r}: the only outbox action is 'flush'")
    if bool(cfg.get("study")) == bool(cfg.get("studies")):
        raise SystemExit("error: give exactly one of study=DIR (one study) or studies=ROOT (every sub-directory)")

    settings = InferenceSettings.from_config(cfg)
    try:
        model_path = settings.resolve_model(cfg["paths"]["log_dir"])
        studies = [Path(cfg["study"])] if cfg.get("study") else \
            find_studies(cfg["studies"], exclude=[cfg["results_dir"], cfg["outbox_dir"]])
        # the same map as the listener's (hippo.deploy.options); prior=PATH must exist
        options = processor_options(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    results_dir = Path(cfg["results_dir"])
    # the model loads in a background thread while the first study is read and registered
    # (hippo.model_loading); a model file that cannot be loaded fails each study at `infer`, naming it
    factory = functools.partial(build_processor, model_path, results_dir, pacs=cfg["pacs"] if send else None,
                                outbox_dir=cfg["outbox_dir"], background_load=True, **options)
    log.info("model %s; %d study(ies); results in %s", model_path, len(studies), results_dir)
    t0 = time.perf_counter()
    outcomes = run_batch(studies, factory, workers=int(cfg["workers"]), on_done=_print_outcome)
    wall = time.perf_counter() - t0
    summary = write_summary(results_dir, outcomes, model_path=str(model_path), wall_seconds=round(wall, 3),
                            workers=int(cfg["workers"]), outbox_flushed=flushed)
    if len(outcomes) > 1:
        print(summary_table(outcomes))
    print(f"{summary['n_ok']} ok, {summary['n_review']} for review, {summary['n_failed']} failed in {wall:.1f} s; "
          f"summary: {results_dir / 'summary.json'}")
    return 1 if summary["n_failed"] or summary["n_review"] else 0
