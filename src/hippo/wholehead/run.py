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
* per scan also a thumbnail (``thumbnail.png`` / ``..._desc-hippo_thumbnail.png``) and its record
  ``<output>/outcomes/<name>.json`` (:mod:`hippo.wholehead.cohort`: the outcome, the input's SHA-256,
  the model and settings it was made with; written last, atomically: the scan's "done" mark);
* the group level: ``desc-hippo_dseg.tsv`` (index, name of the labels), ``volumes.tsv`` (one row per
  scan, failed and missing ones with ``stage`` and ``error``), ``summary.json``, ``summary.md`` and
  ``qc_report.html`` (:mod:`hippo.wholehead.cohort_report`).

Levels (``docs/cohort.md``): a plain run processes every scan, then merges; ``shard=I/N``,
``participant_label=...`` or ``level=participant`` only process (so shards can run as separate jobs,
e.g. through Hydra's submitit launcher); ``level=group`` only merges. Any run skips the scans whose
record already holds a result for the same file content, model and settings.

Label values (:data:`hippo.wholehead.segment.LABELS`): 1 left anterior, 2 left posterior,
3 right anterior, 4 right posterior hippocampus.

The model is loaded in a background thread while the first scan is read and registered
(:class:`hippo.model_loading.BackgroundLoad`, as the DICOM door does), which hides most of torch's
import time. Batches use the package's one batch
runner (:func:`hippo.batch_runner.run_each`, ``workers`` spawned processes, each loading the model
once).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hippo import __version__
from hippo.fileio import write_bytes_atomic, write_json_atomic
from hippo.model_loading import BackgroundLoad
from hippo.scan_io import InputSet, NotAScanError, ScanInput, find_inputs, read_scan, save_label_map
from hippo.wholehead.cohort import (MISSING, RECORDS_DIR, collect, file_sha256, parse_shard, record_path, reusable,
                                    run_key, select_participants, select_shard, write_record)

log = logging.getLogger(__name__)

__all__ = ["ScanOutcome", "ScanProcessor", "run_predict", "run_scans", "run_participant", "run_group",
           "summary_table", "write_tables", "output_paths", "DSEG_SUFFIX", "QC_REPORT"]

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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScanOutcome":
        """The inverse of :meth:`as_dict` (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def output_paths(out_root: str | os.PathLike, scan: ScanInput, layout: str) -> dict[str, Path]:
    """Where one scan's files go (see the module docstring): keys ``dseg``, ``result``, ``report``,
    ``thumbnail`` (the group QC report's picture of the scan)."""
    out_root = Path(out_root)
    if layout == "bids":
        folder = out_root / (scan.bids_dir or "")
        return {"dseg": folder / f"{scan.name}{DSEG_SUFFIX}",
                "result": folder / f"{scan.name}_desc-hippo_result.json",
                "report": folder / f"{scan.name}_desc-hippo_report.png",
                "thumbnail": folder / f"{scan.name}_desc-hippo_thumbnail.png"}
    folder = out_root / scan.name
    return {"dseg": folder / f"{scan.name}{DSEG_SUFFIX}", "result": folder / "result.json",
            "report": folder / "report.png", "thumbnail": folder / "thumbnail.png"}


class ScanProcessor:
    """Processes scans with one loaded model.

    Args:
        model_path: the model file (:func:`hippo.weights.resolve_model_path`).
        out_root: the output folder.
        layout: ``"bids"`` or ``"folder"`` (:func:`output_paths`).
        device, batch_size, precision, backend: passed to :meth:`hippo.infer.InferenceAgent.from_file`.
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
                 device: str = "cpu", batch_size: int = 64, precision: str = "auto", backend: str = "auto",
                 refine_passes: int = 1,
                 fast_locate: bool = True, settle_mm: float = 2.0, extra_passes: int = 2,
                 registration: Mapping[str, Any] | None = None,
                 rules: Mapping[str, Any] | None = None, write_png: bool = True, background_load: bool = True,
                 quality: Mapping[str, Any] | None = None, prior: Mapping[str, Any] | None = None):
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
        #: ``{"path", "date", "scan_date"}``: change since an earlier scan or result (hippo.wholehead.longitudinal)
        self.prior = dict(prior) if prior else None
        self._model_kw = dict(device=device, batch_size=int(batch_size), precision=str(precision), backend=str(backend))
        self._loaded: tuple[Any, Any] | None = None
        self._background = BackgroundLoad(self._load) if background_load else None

    def close(self) -> None:
        """Wait for the background model load to end (call before the process exits)."""
        if self._background is not None:
            self._background.close()

    def _load(self) -> tuple[Any, Any]:
        from hippo.infer import InferenceAgent
        from hippo.wholehead.segment import locator_agent

        agent = InferenceAgent.from_file(self.model_path, **self._model_kw)
        agent.for_concurrent_calls(2)  # builds the sessions both sides of a head run on at once
        return agent, (locator_agent(agent) if self.fast_locate else None)

    def agents(self) -> tuple[Any, Any]:
        """``(ensemble agent, locator agent or None)``, waiting for the background load if needed."""
        if self._loaded is None:
            self._loaded = self._background.result() if self._background is not None else self._load()
        return self._loaded

    @property
    def model_info(self) -> dict[str, Any]:
        agent, _ = self.agents()
        return {"path": self.model_path, "n_members": len(agent.members), "precision": agent.precision,
                "backend": agent.backend,
                "hippo_version": agent.metadata.get("hippo_version"), "created": agent.metadata.get("created")}

    def process(self, scan: ScanInput | str | os.PathLike) -> ScanOutcome:
        """Run one scan end to end; never raises (see the module docstring). The same as
        ``finish(prepare(scan))``."""
        return self.finish(self.prepare(scan))

    def prepare(self, scan: ScanInput | str | os.PathLike) -> "_Registered | ScanOutcome":
        """The first stages of :meth:`process`: read the scan and register it to the template (no model
        needed). Returns what :meth:`finish` goes on with, or the outcome when the scan ends here
        (failed, or skipped as not a scan); never raises. A batch runs it for the next scan in a thread
        while :meth:`finish` measures this one (:func:`hippo.batch_runner.run_each`)."""
        from hippo.wholehead.register import register_to_template

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
            return _Registered(scan, out, volume, registration, time.perf_counter() - t_all)
        except Exception as exc:  # noqa: BLE001 - one bad scan never stops the rest
            return _failed(out, scan, stage, exc, t_all)

    def finish(self, prepared: "_Registered | ScanOutcome") -> ScanOutcome:
        """The rest of :meth:`process` after :meth:`prepare`: segment, review, write the outputs;
        never raises. ``timings_s["total"]`` is the time spent in both (not any wait between them)."""
        from hippo.wholehead.cohort_report import render_thumbnail
        from hippo.wholehead.page import write_report_png
        from hippo.wholehead.segment import LABELS, segment_wholehead

        if isinstance(prepared, ScanOutcome):
            return prepared
        scan, out, volume, registration = prepared.scan, prepared.outcome, prepared.volume, prepared.registration
        timings = out.timings_s
        t_all = time.perf_counter() - prepared.seconds  # so that "total" counts both halves
        stage = "model"
        try:
            t = time.perf_counter()
            agent, locator = self.agents()
            timings["model_wait"] = time.perf_counter() - t
            stage = "segment"
            result = segment_wholehead(volume.array, volume.affine, agent, registration=registration,
                                       refine_passes=self.refine_passes, rules=self.rules, locator=locator,
                                       settle_mm=self.settle_mm, extra_passes=self.extra_passes,
                                       quality_rules=self.quality_rules)
            for k in ("crop", "infer", "quality", "map_back", "segment", "review"):
                timings[k] = result.timings_s.get(k, 0.0)
            summary = result.as_dict()
            if self.prior and self.prior.get("path"):  # change since an earlier scan/result: paired when readable
                from hippo.wholehead.longitudinal import change_since_prior

                stage, t = "prior", time.perf_counter()
                summary["change"] = change_since_prior(
                    self.prior["path"], (volume.array, volume.affine), result, agent, locator=locator,
                    segment_options=dict(settings=self.settings, refine_passes=self.refine_passes, rules=self.rules,
                                         settle_mm=self.settle_mm, extra_passes=self.extra_passes),
                    current_date=self.prior.get("scan_date"), prior_date=self.prior.get("date"))
                timings["prior"] = time.perf_counter() - t
            labels = result.labels
            paths = output_paths(self.out_root, scan, self.layout)
            if self.write_png:
                stage = "report"
                t = time.perf_counter()
                write_report_png(paths["report"], volume.array, labels, volume.spacing, summary,
                                 title=f"{scan.name} — {scan.path}")
                timings["report"] = time.perf_counter() - t
                out.files["report"] = str(paths["report"])
            stage = "thumbnail"
            t = time.perf_counter()
            write_bytes_atomic(paths["thumbnail"], render_thumbnail(volume.array, labels, volume.spacing))
            out.files["thumbnail"] = str(paths["thumbnail"])
            timings["thumbnail"] = time.perf_counter() - t
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
                # scan_date: so that this result can be a later run's prior=, the first of a trajectory
                **({"scan_date": self.prior.get("scan_date")} if self.prior and self.prior.get("scan_date") else {}),
                **({"change": summary["change"]} if "change" in summary else {}),
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
            return _failed(out, scan, stage, exc, t_all)


@dataclass
class _Registered:
    """A scan read and registered (:meth:`ScanProcessor.prepare`), waiting to be measured."""

    scan: ScanInput
    outcome: ScanOutcome
    volume: Any                 # hippo.scan_io.ScanVolume
    registration: Any           # hippo.wholehead.register.Registration
    seconds: float              # spent reading and registering


def _failed(out: ScanOutcome, scan: ScanInput, stage: str, exc: Exception, t_all: float) -> ScanOutcome:
    """``out`` marked failed at ``stage`` with ``exc`` (naming the file), its total time set."""
    out.status, out.stage = "failed", stage
    out.error = f"{scan.path}: {type(exc).__name__}: {exc}" if str(scan.path) not in str(exc) else \
        f"{type(exc).__name__}: {exc}"
    log.debug("scan %s failed at %s:\n%s", scan.path, stage, traceback.format_exc())
    out.timings_s["total"] = time.perf_counter() - t_all
    return out


# ------------------------------------------------------------------------------------------------ batch

def run_scans(scans: Sequence[ScanInput], factory: Callable[[], ScanProcessor], *, workers: int = 1,
              on_done: Callable[[ScanOutcome], None] | None = None,
              threads_per_worker: int | None = None) -> list[ScanOutcome]:
    """Process ``scans`` with ``workers`` processes (each builds its processor with the picklable
    ``factory``; :func:`hippo.batch_runner.run_each`: spawned workers, torch and SimpleITK threads
    capped); ``workers <= 1`` or one scan runs here. Whatever goes wrong for one scan -- an exception
    anywhere, a worker that dies -- becomes its ``failed`` outcome naming the stage. Returns outcomes
    in the order of ``scans``; ``on_done`` sees each as it completes."""
    from hippo.batch_runner import run_each

    def failed(scan: ScanInput, why) -> ScanOutcome:
        return ScanOutcome(scan=str(scan.path), name=scan.name, stage=why.stage, error=f"{scan.path}: {why.error}",
                           bids_dir=scan.bids_dir)

    return run_each(list(scans), factory, failed=failed, workers=workers, on_done=on_done,
                    threads_per_worker=threads_per_worker)


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "" if v is None else format(v, spec)


def summary_table(outcomes: Sequence[ScanOutcome]) -> str:
    """A Markdown table: scan, status, left/right volumes (mm³), asymmetry, eTIV, seconds, reasons."""
    lines = ["| scan | status | L ant | L post | L total | R ant | R post | R total | AI % | eTIV L | seconds | error / review |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for o in outcomes:
        v = o.volumes
        cells = [_fmt(v.get(side, {}).get(f"{part}_mm3")) for side, part in _SIDE_KEYS]
        ai = "" if o.asymmetry_index_percent is None else f"{o.asymmetry_index_percent:+.1f}"
        etiv = "" if o.etiv_mm3 is None else f"{o.etiv_mm3 / 1e6:.2f}"
        why = (f"{o.stage}: " if o.stage else "") + o.error if o.error else "; ".join(o.review)
        lines.append(f"| {o.name} | {o.status} | {' | '.join(cells)} | {ai} | {etiv} | "
                     f"{o.timings_s.get('total', 0):.2f} | {why.replace('|', '/')} |")
    return "\n".join(lines)


def _tsv_cell(v: Any) -> str:
    if v is None or v == "":
        return "n/a"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v).replace("\t", " ").replace("\n", " ")


def write_tables(out_root: str | os.PathLike, inputs: InputSet, outcomes: Sequence[ScanOutcome],
                 **extra: Any) -> dict[str, Any]:
    """Write ``desc-hippo_dseg.tsv``, ``volumes.tsv``, ``summary.json``, ``summary.md`` (and for a BIDS
    input ``dataset_description.json``) into ``out_root``; return the summary.

    ``volumes.tsv`` has one row per scan that is not ``skipped``: failed and missing scans too, with
    ``stage`` and ``error`` saying where and why (``n/a`` for the others)."""
    from hippo.scan_io import bids_entities
    from hippo.wholehead.segment import LABELS

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    dseg = "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in LABELS.items())
    write_bytes_atomic(out_root / "desc-hippo_dseg.tsv", dseg.encode())
    bids = inputs.kind == "bids"
    head = (["participant_id", "session_id"] if bids else []) + ["scan", "source", "status"] + \
        [f"{side}_{part}_mm3" for side, part in _SIDE_KEYS] + ["asymmetry_index_percent", "etiv_mm3", "review",
                                                               "stage", "error"]
    rows = ["\t".join(head)]
    for o in outcomes:
        if o.status == "skipped":
            continue
        ent = bids_entities(o.name) if bids else {}
        failed = o.status not in ("ok", "review")
        cells = ([f"sub-{ent.get('sub', '')}", f"ses-{ent['ses']}" if "ses" in ent else "n/a"] if bids else []) + \
            [o.name, os.path.relpath(o.scan, inputs.root) if o.scan.startswith(str(inputs.root)) else o.scan, o.status] + \
            [o.volumes.get(side, {}).get(f"{part}_mm3") for side, part in _SIDE_KEYS] + \
            [o.asymmetry_index_percent, o.etiv_mm3, "; ".join(o.review),
             o.stage if failed else None, o.error if failed else None]
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
        # the per-scan records and the QC page are this tool's, not BIDS files
        write_bytes_atomic(out_root / ".bidsignore", f"{RECORDS_DIR}/\n{QC_REPORT}\n".encode())
    summary = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": str(inputs.root), "input_kind": inputs.kind,
        "n_scans": sum(o.status != "skipped" for o in outcomes),
        "n_ok": sum(o.status == "ok" for o in outcomes),
        "n_review": sum(o.status == "review" for o in outcomes),
        "n_failed": sum(o.status == "failed" for o in outcomes),
        "n_missing": sum(o.status == MISSING for o in outcomes),
        "n_skipped": sum(o.status == "skipped" for o in outcomes),
        **extra,
        "scans": [o.as_dict() for o in outcomes],
    }
    write_json_atomic(out_root / "summary.json", summary)
    write_bytes_atomic(out_root / "summary.md", (summary_table([o for o in outcomes if o.status != "skipped"]) + "\n").encode())
    return summary


def _line(o: ScanOutcome) -> str:
    """One scan's progress line; any field may be missing (a side without volume, no eTIV)."""
    if o.status in ("ok", "review"):
        side = lambda s: (f"{s} {_fmt(o.volumes.get(s, {}).get('total_mm3')) or '-'} mm³ (ant "  # noqa: E731
                          f"{_fmt(o.volumes.get(s, {}).get('anterior_mm3')) or '-'}, post "
                          f"{_fmt(o.volumes.get(s, {}).get('posterior_mm3')) or '-'})")
        flag = f" REVIEW: {'; '.join(o.review)}" if o.review else ""
        etiv = "-" if o.etiv_mm3 is None else f"{o.etiv_mm3 / 1e6:.2f}"
        return (f"{o.name}: {side('left')}, {side('right')}, AI {_fmt(o.asymmetry_index_percent, '+.1f') or '-'} %, "
                f"eTIV {etiv} L ({o.timings_s.get('total', 0):.2f} s){flag}")
    if o.status == "skipped":
        return f"{o.scan}: skipped ({o.error})"
    if o.status == MISSING:
        return f"{o.name}: MISSING: {o.error}"
    return f"{o.name}: FAILED at {o.stage}: {o.error}"


#: the group QC report's file name (in the output folder)
QC_REPORT = "qc_report.html"


def _levels(cfg: Mapping[str, Any]) -> tuple[bool, bool, tuple[int, int] | None]:
    """``(participant, group, shard)`` from ``level`` and ``shard`` (see ``conf/predict.yaml``)."""
    shard = parse_shard(cfg.get("shard"))
    level = str(cfg.get("level") or "all")
    if level not in ("all", "participant", "group"):
        raise ValueError(f"level={level!r}: choose participant, group, or leave it out (both)")
    if shard and level == "group":
        raise ValueError("shard=I/N selects scans of the participant level; the group level reads every scan")
    if shard or cfg.get("participant_label") not in (None, "", []):
        if level == "all":
            level = "participant"
    return level in ("all", "participant"), level in ("all", "group"), shard


def run_predict(cfg: Mapping[str, Any]) -> int:
    """Run ``conf/predict.yaml`` resolved: returns the exit code. A run that writes the group files:
    1 when any scan failed or has no result, or when any was flagged for review and
    ``fail_on_review`` is set; 2 when the input names nothing usable. The participant level alone
    (a shard): 1 only when a scan of it has no record (a failed scan's record is its result).

    Levels (:mod:`hippo.wholehead.cohort`): a plain run processes every scan (reusing what an earlier
    run into the same output already made) and writes the group files; ``shard=I/N`` /
    ``participant_label=...`` / ``level=participant`` only processes (per-scan results and records);
    ``level=group`` only merges the records into ``volumes.tsv``, the summaries and the QC report."""
    import functools

    from hippo.weights import resolve_model_path

    if not cfg.get("input"):
        raise SystemExit("error: give input=PATH (a NIfTI/MGZ file, a folder of them, or a BIDS dataset)")
    out_root = Path(cfg.get("output") or ".").resolve()
    try:
        participant, group, shard = _levels(cfg)
        model_path = resolve_model_path(cfg["model_path"], cfg["paths"]["log_dir"])
        inputs = find_inputs(cfg["input"], exclude=[out_root])
        scans = select_participants(inputs.scans, cfg.get("participant_label"), bids=inputs.kind == "bids")
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    layout = "bids" if inputs.kind == "bids" else "folder"
    # only the believable volume ranges come from the plausibility group (its voxel-size limits are the
    # crop path's); the review group holds the whole-head limits
    plausibility = dict(cfg["plausibility"])
    rules = {k: plausibility[k] for k in ("anterior_mm3", "posterior_mm3", "total_mm3") if k in plausibility}
    rules.update(cfg["review"] or {})
    # the `inference` group's keys (defaults in conf/inference/default.yaml and conf/predict.yaml), checked by
    # the torch-free hippo.inference_settings: this process imports torch only in the background model load
    from hippo.inference_settings import InferenceSettings

    try:
        inference = InferenceSettings.from_config(cfg)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    # what a result depends on besides the scan and the model file (a rerun reuses a result only when
    # these are the same)
    settings = dict(precision=inference.precision, backend=inference.backend, refine_passes=int(cfg["refine_passes"]),
                    fast_locate=bool(cfg["fast_locate"]),
                    settle_mm=float(cfg["settle_mm"]), extra_passes=int(cfg["extra_passes"]),
                    registration=dict(cfg["registration"] or {}), rules=rules, quality=plausibility)
    if cfg.get("prior") and len(scans) > 1:
        raise SystemExit(f"error: prior= compares one scan with an earlier scan of the same head; input holds "
                         f"{len(scans)} scans")
    if cfg.get("prior") or cfg.get("scan_date"):  # change since an earlier scan or result.json (docs/longitudinal.md)
        settings["prior"] = {"path": str(Path(str(cfg["prior"])).resolve()) if cfg.get("prior") else None,
                             "date": cfg.get("prior_date"), "scan_date": cfg.get("scan_date")}
    key = run_key(model_path, settings)
    workers = max(1, int(cfg["workers"]))
    threads = int(cfg["threads"]) if cfg.get("threads") else None
    t0 = time.perf_counter()
    if participant:
        factory = functools.partial(
            ScanProcessor, model_path, out_root, layout=layout, device=str(cfg["device"]),
            batch_size=int(cfg["batch_size"]), write_png=bool(cfg["report"]["write_png"]), **settings)
        mine = select_shard(scans, *shard) if shard else scans
        where = f"shard {shard[0]}/{shard[1]}: " if shard else ""
        print(f"{where}{len(mine)} of {len(inputs.scans)} file(s) from {inputs.root} ({inputs.kind}); results in "
              f"{out_root}", flush=True)
        outcomes = run_participant(mine, factory, out_root, key=key, workers=workers, threads=threads,
                                   resume=bool(cfg.get("resume", True)), show_progress=bool(cfg["progress"]),
                                   shard=None if not shard else f"{shard[0]}/{shard[1]}")
        if not group:
            wall = time.perf_counter() - t0
            counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "review", "failed", "skipped")}
            unrecorded = [s.name for s in mine if not record_path(out_root, s.name).is_file()]
            print(f"{where}{counts['ok']} ok, {counts['review']} for review, {counts['failed']} failed, "
                  f"{counts['skipped']} skipped (not scans) in {wall:.1f} s; per-scan records in "
                  f"{out_root / RECORDS_DIR}; merge with level=group", flush=True)
            # the participant level's status says whether every scan of it has its record (a failed
            # scan's included: the group level reports it and exits 1), so one bad scan does not fail
            # a scheduler's array task
            if unrecorded:
                print(f"{where}no record written for {', '.join(unrecorded)}", flush=True)
                return 1
            return 0
    summary = run_group(out_root, inputs, scans, key, asym_limit=rules.get("max_asymmetry_percent"),
                        model_path=str(model_path), workers=workers,
                        wall_seconds=round(time.perf_counter() - t0, 3))
    wall = time.perf_counter() - t0
    done = [ScanOutcome.from_dict(d) for d in summary["scans"] if d["status"] != "skipped"]
    if len(done) > 1 or summary["n_failed"] or summary["n_missing"]:
        print(summary_table(done))
    n = summary["n_scans"]
    print(f"{summary['n_ok']} ok, {summary['n_review']} for review, {summary['n_failed']} failed, "
          f"{summary['n_skipped']} skipped (not scans)"
          + (f", {summary['n_missing']} missing (no result)" if summary["n_missing"] else "")
          + f" in {wall:.1f} s" + (f" ({wall / n:.2f} s per scan)" if n and participant else "")
          + f"; summary: {out_root / 'summary.json'}; QC report: {out_root / QC_REPORT}", flush=True)
    if not n:
        return 2
    if summary["n_failed"] or summary["n_missing"] or (cfg.get("fail_on_review") and summary["n_review"]):
        return 1
    return 0


def run_participant(scans: Sequence[ScanInput], factory: Callable[[], ScanProcessor], out_root: str | os.PathLike,
                    *, key: Mapping[str, str], workers: int = 1, threads: int | None = None, resume: bool = True,
                    show_progress: bool = False, shard: str | None = None) -> list[ScanOutcome]:
    """The participant level: process ``scans`` except those an earlier run already measured
    (:func:`hippo.wholehead.cohort.reusable`, when ``resume``), writing each one's record
    (:func:`hippo.wholehead.cohort.write_record`) as soon as it is done. Returns the outcomes in the
    order of ``scans`` (the reused ones included)."""
    hashes: dict[str, str] = {}
    reused: dict[str, ScanOutcome] = {}
    todo: list[ScanInput] = []
    for scan in scans:
        try:
            hashes[scan.name] = file_sha256(scan.path)
        except OSError:  # unreadable: processing fails at "read" and says why
            hashes[scan.name] = ""
        earlier = reusable(out_root, scan, hashes[scan.name], key) if resume and hashes[scan.name] else None
        if earlier is not None:
            reused[scan.name] = ScanOutcome.from_dict(earlier)
        else:
            todo.append(scan)
    if reused:
        print(f"{len(reused)} scan(s) already measured with this model and settings (reused), {len(todo)} to process",
              flush=True)

    def record(o: ScanOutcome) -> None:
        write_record(out_root, o.as_dict(), input_sha256=hashes.get(o.name, ""), key=key, shard=shard)

    outcomes = _with_progress(todo, factory, workers, show_progress, record, threads) if todo else []
    by_name = {**reused, **{o.name: o for o in outcomes}}
    return [by_name[s.name] for s in scans]


def run_group(out_root: str | os.PathLike, inputs: InputSet, scans: Sequence[ScanInput], key: Mapping[str, str],
              *, asym_limit: float | None = None, **extra: Any) -> dict[str, Any]:
    """The group level: read every scan's record (:func:`hippo.wholehead.cohort.collect`; a scan
    without a current one is ``missing``, saying why), write ``volumes.tsv``, the summaries (and a
    BIDS input's derivative files, :func:`write_tables`) and the QC report; return the summary."""
    from hippo.wholehead.cohort_report import write_group_report

    out_root = Path(out_root)
    outcomes = []
    for scan, outcome, why in collect(out_root, scans, key):
        outcomes.append(ScanOutcome.from_dict(outcome) if outcome is not None else
                        ScanOutcome(scan=str(scan.path), name=scan.name, status=MISSING, error=why,
                                    bids_dir=scan.bids_dir))
    summary = write_tables(out_root, inputs, outcomes, **extra)
    write_group_report(out_root / QC_REPORT, [o.as_dict() for o in outcomes if o.status != "skipped"],
                       title=f"HippoVolume cohort QC: {inputs.root}", out_root=out_root, asym_limit=asym_limit)
    return summary


def _with_progress(scans: Sequence[ScanInput], factory, workers: int, show: bool,
                   record: Callable[[ScanOutcome], None], threads: int | None = None) -> list[ScanOutcome]:
    def line(o: ScanOutcome) -> None:
        try:
            record(o)  # first: the record is the scan's "done" mark
        finally:
            print(_line(o), flush=True)

    if not show:
        return run_scans(scans, factory, workers=workers, on_done=line, threads_per_worker=threads)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]hippo.predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=False) as progress:
        task = progress.add_task("", total=len(scans))

        def done(o: ScanOutcome) -> None:
            try:
                line(o)  # stdout; rich keeps the bar (stderr) below it on a terminal
            finally:
                progress.update(task, advance=1, description=o.name)

        return run_scans(scans, factory, workers=workers, on_done=done, threads_per_worker=threads)
