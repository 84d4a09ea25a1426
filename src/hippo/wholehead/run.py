"""What ``python -m hippo.predict input=PATH [output=DIR]`` does with its resolved config (a plain
dict; no Hydra here).

Per scan (:class:`ScanProcessor`): read (:mod:`hippo.scan_io`) -> register to MNI -> crop, segment,
refine, map back (:func:`hippo.wholehead.segment.segment_wholehead`) -> review -> report PNG ->
write the label map (NIfTI, the scan's own grid and voxel order), ``result.json``. A scan never
raises out of :meth:`ScanProcessor.process`: a failure becomes a ``failed`` :class:`ScanOutcome`
naming the file, the stage and the error; a label map or atlas met while searching a folder is
``skipped`` with the reason.

Output layout (``output``):

* a folder or one file: ``<output>/<name>/<name>_desc-hippo_dseg.nii.gz``, ``result.json``,
  ``report.png`` (``name`` from the file's path below the input folder);
* a BIDS dataset: a BIDS-derivatives dataset, ``<output>/sub-X/[ses-Y/]anat/<source
  entities>_desc-hippo_dseg.nii.gz`` with ``..._desc-hippo_result.json`` and
  ``..._desc-hippo_report.png`` beside it, and ``dataset_description.json``
  (``"DatasetType": "derivative"``, ``GeneratedBy``);
* always: ``desc-hippo_dseg.tsv`` (index, name of the labels), ``volumes.tsv`` (one row per scan),
  ``summary.json`` and ``summary.md``.

Label values (:data:`hippo.wholehead.segment.LABELS`): 1 left anterior, 2 left posterior,
3 right anterior, 4 right posterior hippocampus.

The model is loaded in a background thread while the first scan is read and registered (SimpleITK
releases the GIL), which hides most of torch's import time. Batches use a process pool
(``workers``), each worker loading the model once.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import threading
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hippo import __version__
from hippo.fileio import write_bytes_atomic, write_json_atomic
from hippo.scan_io import InputSet, NotAScanError, ScanInput, find_inputs, read_scan, save_label_map

log = logging.getLogger(__name__)

__all__ = ["ScanOutcome", "ScanProcessor", "run_predict", "run_scans", "summary_table", "output_paths",
           "DSEG_SUFFIX"]

DSEG_SUFFIX = "_desc-hippo_dseg.nii.gz"
_SIDE_KEYS = [(side, part) for side in ("left", "right") for part in ("anterior", "posterior", "total")]


@dataclass
class ScanOutcome:
    """What happened to one scan (one row of the summary).

    ``status``: ``"ok"``, ``"review"`` (results written, but see ``review``), ``"failed"`` (``stage``
    and ``error`` say where and why) or ``"skipped"`` (not a scan: a label map or atlas found while
    searching a folder). ``volumes``: ``{"left": {"anterior_mm3", "posterior_mm3", "total_mm3"},
    "right": {...}}``.
    """

    scan: str
    name: str
    status: str = "failed"
    stage: str = ""
    error: str = ""
    volumes: dict[str, dict[str, float]] = field(default_factory=dict)
    asymmetry_index_percent: float | None = None
    etiv_mm3: float | None = None
    review: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    bids_dir: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_paths(out_root: str | os.PathLike, scan: ScanInput, layout: str) -> dict[str, Path]:
    """Where one scan's files go (see the module docstring): keys ``dseg``, ``result``, ``report``."""
    out_root = Path(out_root)
    if layout == "bids":
        folder = out_root / (scan.bids_dir or "")
        return {"dseg": folder / f"{scan.name}{DSEG_SUFFIX}",
                "result": folder / f"{scan.name}_desc-hippo_result.json",
                "report": folder / f"{scan.name}_desc-hippo_report.png"}
    folder = out_root / scan.name
    return {"dseg": folder / f"{scan.name}{DSEG_SUFFIX}", "result": folder / "result.json",
            "report": folder / "report.png"}


class ScanProcessor:
    """Processes scans with one loaded model.

    Args:
        model_path: the model file (:func:`hippo.weights.resolve_model_path`).
        out_root: the output folder.
        layout: ``"bids"`` or ``"folder"`` (:func:`output_paths`).
        device, batch_size, precision: passed to :meth:`hippo.infer.InferenceAgent.from_file`.
        refine_passes: re-centre on the segmentation and segment again this many times.
        fast_locate: the localisation pass uses :func:`hippo.wholehead.segment.locator_agent` (the
            lightest member per slicing axis) instead of the whole ensemble.
        settle_mm, extra_passes: see :func:`hippo.wholehead.segment.segment_wholehead`.
        registration: :class:`hippo.wholehead.register.RegistrationSettings` fields (``preset``...).
        rules: :class:`hippo.wholehead.review.ReviewRules` fields (the ``plausibility`` group's
            volume ranges fit as they are).
        quality: :class:`hippo.plausibility.PlausibilityRules` fields (the ``plausibility`` group): its
            segmentation quality limits score each side (:mod:`hippo.quality`).
        write_png: write the report page.
        background_load: load the model in a thread while the first scan is read and registered.
    """

    def __init__(self, model_path: str | os.PathLike, out_root: str | os.PathLike, *, layout: str = "folder",
                 device: str = "cpu", batch_size: int = 64, precision: str = "bfloat16", refine_passes: int = 1,
                 fast_locate: bool = True, settle_mm: float = 2.0, extra_passes: int = 2,
                 registration: Mapping[str, Any] | None = None,
                 rules: Mapping[str, Any] | None = None, write_png: bool = True, background_load: bool = True,
                 quality: Mapping[str, Any] | None = None):
        from hippo.plausibility import PlausibilityRules
        from hippo.wholehead.register import RegistrationSettings
        from hippo.wholehead.review import ReviewRules

        self.model_path = str(model_path)
        self.out_root = Path(out_root)
        self.layout = layout
        self.refine_passes = int(refine_passes)
        self.fast_locate = bool(fast_locate)
        self.settle_mm = float(settle_mm)
        self.extra_passes = int(extra_passes)
        self.settings = RegistrationSettings.from_mapping(registration)
        self.rules = ReviewRules.from_mapping(rules)
        self.quality_rules = PlausibilityRules.from_mapping(quality)
        self.write_png = bool(write_png)
        self._model_kw = dict(device=device, batch_size=int(batch_size), precision=str(precision))
        self._agents: Future | None = None
        self._loaded: tuple[Any, Any] | None = None
        self._loader: threading.Thread | None = None
        if background_load:
            self._agents = Future()
            # not a daemon: a process must not exit while torch is still being imported in it (the C++
            # runtime aborts), e.g. when its only scan failed before the model was needed
            self._loader = threading.Thread(target=self._load_into_future, name="hippo-model-load", daemon=False)
            self._loader.start()

    def close(self) -> None:
        """Wait for the background model load to end (call before the process exits)."""
        if self._loader is not None:
            self._loader.join()

    def _load(self) -> tuple[Any, Any]:
        from hippo.infer import InferenceAgent
        from hippo.wholehead.segment import locator_agent

        agent = InferenceAgent.from_file(self.model_path, **self._model_kw)
        return agent, (locator_agent(agent) if self.fast_locate else None)

    def _load_into_future(self) -> None:
        try:
            self._agents.set_result(self._load())  # type: ignore[union-attr]
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting scan
            self._agents.set_exception(exc)  # type: ignore[union-attr]

    def agents(self) -> tuple[Any, Any]:
        """``(ensemble agent, locator agent or None)``, waiting for the background load if needed."""
        if self._loaded is None:
            self._loaded = self._agents.result() if self._agents is not None else self._load()
        return self._loaded

    @property
    def model_info(self) -> dict[str, Any]:
        agent, _ = self.agents()
        return {"path": self.model_path, "n_members": len(agent.members), "precision": agent.precision,
                "hippo_version": agent.metadata.get("hippo_version"), "created": agent.metadata.get("created")}

    def process(self, scan: ScanInput | str | os.PathLike) -> ScanOutcome:
        """Run one scan end to end; never raises (see the module docstring)."""
        from hippo.wholehead.register import register_to_template
        from hippo.wholehead.page import write_report_png
        from hippo.wholehead.segment import LABELS, segment_wholehead

        if not isinstance(scan, ScanInput):
            p = Path(scan)
            scan = ScanInput(p, p.name.split(".")[0], None, True)
        out = ScanOutcome(scan=str(scan.path), name=scan.name, bids_dir=scan.bids_dir)
        timings = out.timings_s
        t_all = time.perf_counter()
        stage = "read"
        try:
            t = time.perf_counter()
            try:
                volume = read_scan(scan.path)
            except NotAScanError as exc:
                if not scan.explicit and exc.kind in ("label_map", "not_3d"):
                    out.status, out.stage, out.error = "skipped", "read", exc.problem
                    return out
                raise
            timings["read"] = time.perf_counter() - t
            stage = "register"
            t = time.perf_counter()
            from hippo.wholehead.segment import MIN_FOV_MM

            if min(volume.extent_mm) < MIN_FOV_MM:
                raise ValueError(f"field of view {' x '.join(f'{e:.0f}' for e in volume.extent_mm)} mm is too small "
                                 f"for a whole head (at least {MIN_FOV_MM:.0f} mm per axis)")
            registration = register_to_template(volume.array, volume.affine, settings=self.settings)
            timings["register"] = time.perf_counter() - t
            stage = "model"
            t = time.perf_counter()
            agent, locator = self.agents()
            timings["model_wait"] = time.perf_counter() - t
            stage = "segment"
            result = segment_wholehead(volume.array, volume.affine, agent, registration=registration,
                                       refine_passes=self.refine_passes, rules=self.rules, locator=locator,
                                       settle_mm=self.settle_mm, extra_passes=self.extra_passes,
                                       quality_rules=self.quality_rules)
            for k in ("crop", "infer", "quality", "map_back", "review"):
                timings[k] = result.timings_s.get(k, 0.0)
            summary = result.as_dict()
            labels = result.labels
            paths = output_paths(self.out_root, scan, self.layout)
            if self.write_png:
                stage = "report"
                t = time.perf_counter()
                write_report_png(paths["report"], volume.array, labels, volume.spacing, summary,
                                 title=f"{scan.name} — {scan.path}")
                timings["report"] = time.perf_counter() - t
                out.files["report"] = str(paths["report"])
            stage = "write"
            t = time.perf_counter()
            save_label_map(paths["dseg"], labels, volume)
            out.files["dseg"] = str(paths["dseg"])
            out.files["result"] = str(paths["result"])
            out.volumes = {side: {k: summary[side][k] for k in ("anterior_mm3", "posterior_mm3", "total_mm3")}
                           for side in ("left", "right")}
            out.asymmetry_index_percent = summary["asymmetry_index_percent"]
            out.etiv_mm3 = summary["etiv_mm3"]
            out.review = list(result.review)
            out.notes = list(volume.warnings) + list(result.notes)
            out.status = "review" if out.review else "ok"
            timings["write"] = time.perf_counter() - t
            timings["total"] = time.perf_counter() - t_all
            record = {
                "scan": str(scan.path), "name": scan.name, "status": out.status,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "hippo_version": __version__, "model": self.model_info,
                "scan_geometry": {"shape": list(volume.source_shape), "spacing_mm": [round(s, 5) for s in volume.spacing],
                                  "affine": np.round(volume.source_affine, 5).tolist()},
                "label_map": {"file": paths["dseg"].name, "labels": {str(k): v for k, v in LABELS.items()}},
                "volumes_mm3": out.volumes,
                "asymmetry_index_percent": out.asymmetry_index_percent,
                "etiv_mm3": out.etiv_mm3,
                "quality": summary["quality"],
                "etiv_method": ("|det| of the MNI->scan affine x 1,948,106 mm³ (FreeSurfer's eTIV scale factor for an "
                                "affine to MNI305 space, mri_segstats/MRIestimateTIV; Buckner et al. 2004)"),
                "review": out.review, "notes": out.notes,
                "timings_s": {k: round(v, 3) for k, v in timings.items()},
                "details": {k: summary[k] for k in ("left", "right", "registration", "spacing_mm")},
                "protocol": ("Decathlon Task04 anterior/posterior hippocampus labels (2.5D UNet ensemble on 1 mm crops); "
                             "volumes run lower than FreeSurfer's aseg hippocampus"),
            }
            write_json_atomic(paths["result"], record)
            return out
        except Exception as exc:  # noqa: BLE001 - one bad scan never stops the rest
            out.status, out.stage = "failed", stage
            out.error = f"{scan.path}: {type(exc).__name__}: {exc}" if str(scan.path) not in str(exc) else \
                f"{type(exc).__name__}: {exc}"
            log.debug("scan %s failed at %s:\n%s", scan.path, stage, traceback.format_exc())
            timings["total"] = time.perf_counter() - t_all
            return out


# ------------------------------------------------------------------------------------------------ batch

_WORKER: ScanProcessor | None = None


def _init_worker(factory: Callable[[], ScanProcessor]) -> None:
    global _WORKER
    import torch

    torch.set_num_threads(1)  # processes, not threads, give the parallelism of a batch
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:  # pragma: no cover
        pass
    _WORKER = factory()


def _run_in_worker(scan: ScanInput) -> ScanOutcome:
    assert _WORKER is not None
    return _WORKER.process(scan)


def run_scans(scans: Sequence[ScanInput], factory: Callable[[], ScanProcessor], *, workers: int = 1,
              on_done: Callable[[ScanOutcome], None] | None = None) -> list[ScanOutcome]:
    """Process ``scans`` with ``workers`` processes (each builds its processor with the picklable
    ``factory``); ``workers <= 1`` or one scan runs here. Returns outcomes in the order of ``scans``."""
    results: dict[int, ScanOutcome] = {}
    if workers <= 1 or len(scans) <= 1:
        processor = factory()
        try:
            for i, s in enumerate(scans):
                results[i] = processor.process(s)
                if on_done:
                    on_done(results[i])
        finally:
            processor.close()
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # torch/SimpleITK threads do not survive fork cleanly
        with ProcessPoolExecutor(max_workers=min(workers, len(scans)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(factory,)) as pool:
            futures = {pool.submit(_run_in_worker, s): i for i, s in enumerate(scans)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except Exception as exc:  # a crashed worker process
                    results[i] = ScanOutcome(scan=str(scans[i].path), name=scans[i].name, stage="worker",
                                             error=f"{scans[i].path}: {type(exc).__name__}: {exc}",
                                             bids_dir=scans[i].bids_dir)
                if on_done:
                    on_done(results[i])
    return [results[i] for i in range(len(scans))]


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.0f}"


def summary_table(outcomes: Sequence[ScanOutcome]) -> str:
    """A Markdown table: scan, status, left/right volumes (mm³), asymmetry, eTIV, seconds, reasons."""
    lines = ["| scan | status | L ant | L post | L total | R ant | R post | R total | AI % | eTIV L | seconds | error / review |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for o in outcomes:
        v = o.volumes
        cells = [_fmt(v.get(side, {}).get(f"{part}_mm3")) for side, part in _SIDE_KEYS]
        ai = "" if o.asymmetry_index_percent is None else f"{o.asymmetry_index_percent:+.1f}"
        etiv = "" if o.etiv_mm3 is None else f"{o.etiv_mm3 / 1e6:.2f}"
        why = f"{o.stage}: {o.error}" if o.error else "; ".join(o.review)
        lines.append(f"| {o.name} | {o.status} | {' | '.join(cells)} | {ai} | {etiv} | "
                     f"{o.timings_s.get('total', 0):.2f} | {why.replace('|', '/')} |")
    return "\n".join(lines)


def _tsv_cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v).replace("\t", " ").replace("\n", " ")


def write_tables(out_root: str | os.PathLike, inputs: InputSet, outcomes: Sequence[ScanOutcome],
                 **extra: Any) -> dict[str, Any]:
    """Write ``desc-hippo_dseg.tsv``, ``volumes.tsv``, ``summary.json``, ``summary.md`` (and for a BIDS
    input ``dataset_description.json``) into ``out_root``; return the summary."""
    from hippo.scan_io import bids_entities
    from hippo.wholehead.segment import LABELS

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    dseg = "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in LABELS.items())
    write_bytes_atomic(out_root / "desc-hippo_dseg.tsv", dseg.encode())
    bids = inputs.kind == "bids"
    head = (["participant_id", "session_id"] if bids else []) + ["scan", "source", "status"] + \
        [f"{side}_{part}_mm3" for side, part in _SIDE_KEYS] + ["asymmetry_index_percent", "etiv_mm3", "review"]
    rows = ["\t".join(head)]
    for o in outcomes:
        if o.status == "skipped":
            continue
        ent = bids_entities(o.name) if bids else {}
        cells = ([f"sub-{ent.get('sub', '')}", f"ses-{ent['ses']}" if "ses" in ent else "n/a"] if bids else []) + \
            [o.name, os.path.relpath(o.scan, inputs.root) if o.scan.startswith(str(inputs.root)) else o.scan, o.status] + \
            [o.volumes.get(side, {}).get(f"{part}_mm3") for side, part in _SIDE_KEYS] + \
            [o.asymmetry_index_percent, o.etiv_mm3, "; ".join(o.review) or (o.error if o.error else "n/a")]
        rows.append("\t".join(_tsv_cell(c) for c in cells))
    write_bytes_atomic(out_root / "volumes.tsv", ("\n".join(rows) + "\n").encode())
    if bids:
        write_json_atomic(out_root / "dataset_description.json", {
            "Name": "HippoVolume hippocampus segmentation (anterior/posterior, left/right)",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "hippo", "Version": __version__,
                             "Description": "python -m hippo.predict: MNI affine localisation, 2.5D UNet ensemble "
                                            "on 1 mm hippocampus crops, labels mapped back to each T1w's grid"}],
            "SourceDatasets": [{"URL": Path(inputs.root).resolve().as_uri()}],
        })
    summary = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": str(inputs.root), "input_kind": inputs.kind,
        "n_scans": sum(o.status != "skipped" for o in outcomes),
        "n_ok": sum(o.status == "ok" for o in outcomes),
        "n_review": sum(o.status == "review" for o in outcomes),
        "n_failed": sum(o.status == "failed" for o in outcomes),
        "n_skipped": sum(o.status == "skipped" for o in outcomes),
        **extra,
        "scans": [o.as_dict() for o in outcomes],
    }
    write_json_atomic(out_root / "summary.json", summary)
    write_bytes_atomic(out_root / "summary.md", (summary_table([o for o in outcomes if o.status != "skipped"]) + "\n").encode())
    return summary


def _line(o: ScanOutcome) -> str:
    if o.status in ("ok", "review"):
        v = o.volumes
        flag = f" REVIEW: {'; '.join(o.review)}" if o.review else ""
        return (f"{o.name}: left {v['left']['total_mm3']:.0f} mm³ (ant {v['left']['anterior_mm3']:.0f}, post "
                f"{v['left']['posterior_mm3']:.0f}), right {v['right']['total_mm3']:.0f} mm³ (ant "
                f"{v['right']['anterior_mm3']:.0f}, post {v['right']['posterior_mm3']:.0f}), "
                f"AI {o.asymmetry_index_percent:+.1f} %, eTIV {o.etiv_mm3 / 1e6:.2f} L "
                f"({o.timings_s.get('total', 0):.2f} s){flag}")
    if o.status == "skipped":
        return f"{o.scan}: skipped ({o.error})"
    return f"{o.name}: FAILED at {o.stage}: {o.error}"


def run_predict(cfg: Mapping[str, Any]) -> int:
    """Run ``conf/predict.yaml`` resolved: returns the exit code (1 when any scan failed, or when any
    was flagged for review and ``fail_on_review`` is set; 2 when the input names nothing usable)."""
    import functools

    from hippo.weights import resolve_model_path

    if not cfg.get("input"):
        raise SystemExit("error: give input=PATH (a NIfTI/MGZ file, a folder of them, or a BIDS dataset)")
    out_root = Path(cfg.get("output") or ".")
    try:
        model_path = resolve_model_path(cfg["model_path"], cfg["paths"]["log_dir"])
        inputs = find_inputs(cfg["input"], exclude=[out_root])
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    layout = "bids" if inputs.kind == "bids" else "folder"
    # only the believable volume ranges come from the plausibility group (its voxel-size limits are the
    # crop path's); the review group holds the whole-head limits
    plausibility = dict(cfg["plausibility"])
    rules = {k: plausibility[k] for k in ("anterior_mm3", "posterior_mm3", "total_mm3") if k in plausibility}
    rules.update(cfg["review"] or {})
    # the `inference` group's keys (defaults in conf/inference/default.yaml and conf/predict.yaml), read here
    # rather than with hippo.infer.InferenceSettings: importing hippo.infer imports torch, which this
    # process should only do in the background model load
    precision = str(cfg["precision"])
    if precision not in ("float32", "bfloat16"):
        raise SystemExit(f"error: precision={precision!r}: choose float32 or bfloat16")
    factory = functools.partial(
        ScanProcessor, model_path, out_root, layout=layout, device=str(cfg["device"]),
        batch_size=int(cfg["batch_size"]), precision=precision,
        refine_passes=int(cfg["refine_passes"]), fast_locate=bool(cfg["fast_locate"]),
        settle_mm=float(cfg["settle_mm"]), extra_passes=int(cfg["extra_passes"]),
        registration=dict(cfg["registration"] or {}), rules=rules, quality=plausibility,
        write_png=bool(cfg["report"]["write_png"]),
    )
    workers = max(1, int(cfg["workers"]))
    print(f"{len(inputs.scans)} file(s) from {inputs.root} ({inputs.kind}); results in {out_root}", flush=True)
    t0 = time.perf_counter()
    outcomes = _with_progress(inputs.scans, factory, workers, bool(cfg["progress"]))
    wall = time.perf_counter() - t0
    summary = write_tables(out_root, inputs, outcomes, model_path=str(model_path), workers=workers,
                           wall_seconds=round(wall, 3))
    done = [o for o in outcomes if o.status != "skipped"]
    if len(done) > 1 or summary["n_failed"]:
        print(summary_table(done))
    n = summary["n_scans"]
    print(f"{summary['n_ok']} ok, {summary['n_review']} for review, {summary['n_failed']} failed, "
          f"{summary['n_skipped']} skipped (not scans) in {wall:.1f} s"
          + (f" ({wall / n:.2f} s per scan)" if n else "") + f"; summary: {out_root / 'summary.json'}", flush=True)
    if not n:
        return 2
    if summary["n_failed"] or (cfg.get("fail_on_review") and summary["n_review"]):
        return 1
    return 0


def _with_progress(scans: Sequence[ScanInput], factory, workers: int, show: bool) -> list[ScanOutcome]:
    if not show:
        return run_scans(scans, factory, workers=workers, on_done=lambda o: print(_line(o), flush=True))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]hippo.predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=False) as progress:
        task = progress.add_task("", total=len(scans))

        def done(o: ScanOutcome) -> None:
            print(_line(o), flush=True)  # stdout; rich keeps the bar (stderr) below it on a terminal
            progress.update(task, advance=1, description=o.name)

        return run_scans(scans, factory, workers=workers, on_done=done)
