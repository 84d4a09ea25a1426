"""One DICOM study end to end, and a batch of studies.

``ingest -> volume -> infer -> measure -> report/SEG/SR -> send``::

    scan_study (headers) -> select_series (rules) -> load_series (pixels, geometry,
    closest-canonical RAS) -> InferenceAgent.segment -> measure_volumes (mm³) -> render_report +
    secondary_capture, make_seg, make_sr -> write under out_root/<StudyInstanceUID>/ -> deliver
    (C-STORE, one association; what fails waits in the outbox)

A study never raises out of :meth:`StudyProcessor.process`: a failure becomes a ``failed``
:class:`StudyOutcome` naming the stage and the error, and the batch goes on. The inputs are only
read, never written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import hashlib
import io
import json
import logging
import os
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from pydicom import dcmwrite
from pydicom.uid import generate_uid

from hippo.dicom.headers import clean_source_headers
from hippo.dicom.ingest import SelectionRules, scan_study
from hippo.dicom.report import patient_study_from_dataset, render_report, secondary_capture
from hippo.dicom.volume import load_series
from hippo.dicom.wholehead_select import WholeHeadRules, select_input_series
from hippo.fileio import write_bytes_atomic, write_json_atomic
from hippo.model_loading import BackgroundLoad
from hippo.measure import NO_NORMATIVE_REFERENCE, measure_volumes
from hippo.plausibility import PlausibilityRules, assess_input
from hippo.regrid import labels_to_source, to_model_grid
from hippo.prior import PriorLookup, prior_comparison
from hippo.pacs import Outbox, PacsConfig, deliver, validate_uid

log = logging.getLogger(__name__)



@dataclass
class StudyOutcome:
    """What happened to one study (one row of the batch summary)."""

    study: str
    status: str = "failed"                 # "ok" | "review" (made, but flagged: see review) | "failed"
    stage: str = ""                         # the stage that failed (ingest, volume, infer, ...)
    error: str = ""
    study_uid: str = ""
    series_uid: str = ""
    series_description: str = ""
    volumes: dict[str, Any] = field(default_factory=dict)
    #: always unavailable: no normative reference has been verified (hippo.measure)
    normative: dict[str, Any] = field(default_factory=lambda: {"available": False, "reason": NO_NORMATIVE_REFERENCE})
    #: the segmentation's quality score and flag (:meth:`hippo.quality.QualityAssessment.as_dict`; a
    #: whole head: one per side, ``{"left": ..., "right": ...}``)
    quality: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    queued: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: the source header's missing and malformed attributes (:class:`hippo.dicom.headers.HeaderReport`)
    header: dict[str, Any] = field(default_factory=dict)
    #: why a clinician should look before trusting the number (status "review"); empty when "ok"
    review: list[str] = field(default_factory=list)
    #: how the series met the model: its voxel size, whether it was resampled onto the model's grid
    input: dict[str, Any] = field(default_factory=dict)
    #: which input: "hippocrop" (a HippoCrop series) or "wholehead" (a whole-head T1: ``volumes`` then
    #: holds "left" and "right" (anterior/posterior/total mm³), "asymmetry_index_percent", "etiv_mm3")
    kind: str = ""
    #: the change since the patient's prior study (:func:`hippo.prior.prior_comparison`'s block: the
    #: change per structure, or ``reason`` saying why there is none); ``None`` for a whole-head study
    prior_comparison: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_GC_LOCK = threading.Lock()
_GC_STATE: dict[str, Any] = {"depth": 0, "threshold": None}


@contextlib.contextmanager
def _fewer_gc_passes(min_threshold: int = 20_000):
    """Fewer garbage-collector passes while DICOM files are parsed or the result objects built:
    pydicom and highdicom make hundreds of thousands of small objects, nearly all of them kept or
    freed by reference counting, and with the default threshold (700 allocations) the collector runs
    through every live object again and again (about a fifth of the time of reading a study's
    headers). The thresholds are put back when the last of any overlapping uses (studies processed
    side by side in threads) ends."""
    with _GC_LOCK:
        if _GC_STATE["depth"] == 0:
            _GC_STATE["threshold"] = gc.get_threshold()
            threshold = _GC_STATE["threshold"]
            gc.set_threshold(max(threshold[0], min_threshold), *threshold[1:])
        _GC_STATE["depth"] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_STATE["depth"] -= 1
            if _GC_STATE["depth"] == 0:
                gc.set_threshold(*_GC_STATE["threshold"])


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _png_bytes(page) -> bytes:
    """The report page (a PIL image) as PNG file content."""
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def _png_beside(page, wanted: bool) -> Iterator[Future | None]:
    """The page's PNG encoded in a thread while the caller builds the DICOM objects (PIL's encoder
    releases the GIL; the objects are Python work): a future of :func:`_png_bytes` (``None`` when
    not ``wanted``), whose ``result()`` re-raises what the encoding raised. Leaving the block waits
    for the encoding, so nothing of a study runs on after it, failed or not."""
    if not wanted:
        yield None
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="report-png") as pool:
        yield pool.submit(_png_bytes, page)


class StudyProcessor:
    """Runs the deploy pipeline on study directories with one loaded model.

    Args:
        agent: the model (:meth:`hippo.infer.InferenceAgent.from_file`), or a
            :class:`hippo.model_loading.BackgroundLoad` of it (still loading: a whole-head study is
            read and registered meanwhile; the first stage that needs the model waits).
        out_root: results go to ``out_root/<StudyInstanceUID>/``.
        rules: series-selection rules (:class:`SelectionRules` or a mapping).
        pacs: where to send the SC, SEG and SR; ``None`` writes them only.
        outbox: where undelivered objects wait (required when ``pacs`` is set).
        io_threads: how far ahead DICOM files are read while they are parsed (``4 * io_threads``
            files, by the operating system: :func:`hippo.dicom.prefetch.read_ahead`); 1: none.
        series_numbers: SeriesNumber of the SC, SEG and SR.
        write_png: also write the report page as ``report.png``.
        plausibility: what the model is trusted to measure (:class:`PlausibilityRules` or a mapping):
            inputs outside it are refused or resampled, implausible volumes and segmentations of
            doubtful quality (:mod:`hippo.quality`) flagged for review.
        wholehead: when no HippoCrop series matches, the rules for a whole-head T1
            (:class:`WholeHeadRules`); default: the ``wholehead`` entry of a ``rules`` mapping, else
            the defaults (``None`` in the mapping turns it off).
        prior: where the patient's earlier result comes from (:class:`hippo.prior.PriorLookup`: the
            PACS via DICOMweb, or a file); ``None``: none (the report says no prior was looked for).
            A whole-head study is compared with the file (an earlier scan, study folder or result),
            else with the earlier T1 series (or, failing that, our SR) found in the PACS
            (:func:`hippo.wholehead.longitudinal.pacs_prior_input`).
    """

    def __init__(
        self,
        agent: Any,
        out_root: str | os.PathLike,
        *,
        rules: SelectionRules | Mapping[str, Any] | None = None,
        pacs: PacsConfig | None = None,
        outbox: Outbox | None = None,
        io_threads: int = 8,
        series_numbers: Mapping[str, int] | None = None,
        write_png: bool = True,
        plausibility: PlausibilityRules | Mapping[str, Any] | None = None,
        wholehead: WholeHeadRules | Mapping[str, Any] | None = None,
        prior: PriorLookup | None = None,
    ):
        if pacs is not None and outbox is None:
            raise ValueError("sending to a PACS needs an outbox for what cannot be delivered")
        self._agent = agent
        self.out_root = Path(out_root)
        self.rules = rules if isinstance(rules, SelectionRules) else SelectionRules.from_mapping(rules or {})
        if wholehead is None and isinstance(rules, Mapping) and "wholehead" in rules:
            wholehead = WholeHeadRules.from_mapping(rules["wholehead"])  # None there: off
        self.wholehead_rules = wholehead if isinstance(wholehead, WholeHeadRules) else \
            WholeHeadRules.from_mapping(dict(wholehead or {}))
        self._locator = None
        self.prior = prior
        self.pacs, self.outbox = pacs, outbox
        self.io_threads = io_threads
        self.series_numbers = {"sc": 9001, "seg": 9002, "sr": 9003, **dict(series_numbers or {})}
        self.write_png = write_png
        self.plausibility = plausibility if isinstance(plausibility, PlausibilityRules) else \
            PlausibilityRules.from_mapping(plausibility)

    def _start_model_load(self) -> None:
        """Start a background model load that waits (called once the study's pixels are read: the
        reading is Python-bound, the registration and object-making after it are not, or less)."""
        if isinstance(self._agent, BackgroundLoad):
            self._agent.start()

    @property
    def agent(self) -> Any:
        """The loaded model (:class:`hippo.infer.InferenceAgent`), waiting for a background load;
        re-raises what the load raised."""
        if isinstance(self._agent, BackgroundLoad):
            self._agent = self._agent.result()
        return self._agent

    def close(self) -> None:
        """Wait for a background model load to end (before the process exits)."""
        if isinstance(self._agent, BackgroundLoad):
            self._agent.close()

    @property
    def model_info(self) -> dict[str, Any]:
        meta = self.agent.metadata
        training = meta.get("training") or {}
        metrics = meta.get("metrics") or {}
        return {
            "name": "HippoVolume UNet",
            "version": f"{meta.get('hippo_version', '?')} ({Path(str(meta.get('path', 'model'))).name}, {meta.get('created', '?')})",
            "trained_on": f"{Path(str(training.get('data_root', '?'))).name}, "
                          f"{(training.get('split_sizes') or {}).get('train', '?')} training volumes",
            "metrics": {k: metrics[k] for k in ("dice_anterior", "dice_posterior") if k in metrics},
            "precision": self.precision,
            "backend": str(getattr(self.agent, "backend", "torch")),
        }

    @property
    def precision(self) -> str:
        """How the agent runs its networks (``"float32"``, or ``"bfloat16"`` autocast)."""
        return str(getattr(self.agent, "precision", "float32"))

    def process(self, study_dir: str | os.PathLike) -> StudyOutcome:
        """Run every stage on one study; never raises for a problem of the study itself. The same as
        ``finish(prepare(study_dir))``.

        What the later stages need (scipy for the quality checks, highdicom for the SEG and SR) is
        imported where it is first used, after the study's headers and pixels are read: a background
        model load imports it meanwhile (:func:`build_processor`)."""
        return self.finish(self.prepare(study_dir))

    def prepare(self, study_dir: str | os.PathLike) -> "_PreparedStudy | StudyOutcome":
        """The first stages of :meth:`process`, which need no model: scan the study's headers and
        select its series and, for a whole-head T1, read its pixels and register it to the template.
        Returns what :meth:`finish` goes on with, or the failed outcome; never raises. A batch runs it
        for the next study in a thread while :meth:`finish` measures this one
        (:func:`hippo.batch_runner.run_each`), as ``hippo.predict`` does for files."""
        outcome = StudyOutcome(study=str(study_dir))
        timings = outcome.timings_s
        outcome.stage = "ingest"
        t_all = time.perf_counter()
        try:
            t = time.perf_counter()
            with _fewer_gc_passes():
                scan = scan_study(study_dir, workers=self.io_threads, keep_headers=True)  # each file parsed once
            # recorded before selection, so that a failed study's summary also lists them
            outcome.warnings += [f"ignored {p}: {why}" for p, why in scan.ignored]
            series, outcome.kind = select_input_series(scan, self.rules, self.wholehead_rules)
            outcome.study_uid, outcome.series_uid = series.study_uid, series.uid
            outcome.series_description = series.description
            timings["ingest"] = time.perf_counter() - t
            volume = registration = None
            if outcome.kind == "wholehead":
                volume, registration = self._prepare_wholehead(outcome, scan, series)
            outcome.stage = ""
            return _PreparedStudy(outcome, scan, series, volume, registration, time.perf_counter() - t_all)
        except Exception as exc:  # one bad study never stops a batch
            return _failed(outcome, exc, t_all, "ingest")

    def finish(self, prepared: "_PreparedStudy | StudyOutcome") -> StudyOutcome:
        """The rest of :meth:`process` after :meth:`prepare`: segment, measure, make the SC, SEG and SR,
        write and send them; never raises for a problem of the study. ``timings_s["total"]`` is the
        time spent in both halves (not any wait between them)."""
        if isinstance(prepared, StudyOutcome):
            return prepared
        outcome = prepared.outcome
        t_all = time.perf_counter() - prepared.seconds  # so that "total" counts both halves
        try:
            if outcome.kind == "wholehead":
                return self._finish_wholehead(outcome, prepared, t_all)
            return self._finish_crop(outcome, prepared.scan, prepared.series, t_all)
        except Exception as exc:  # one bad study never stops a batch
            # every stage names itself in outcome.stage; after the objects only result.json is written
            return _failed(outcome, exc, t_all, "write")

    def _finish_crop(self, outcome: StudyOutcome, scan, series, t_all: float) -> StudyOutcome:
        """The stages after selection for a HippoCrop series (pixels, plausibility, inference, the
        quality checks, the SC, SEG and SR). Raises on failure with ``outcome.stage`` naming the stage."""
        timings = outcome.timings_s
        outcome.stage, t = "volume", time.perf_counter()
        with _fewer_gc_passes():
            volume = load_series(scan.series_inputs(series), workers=self.io_threads, series_uid=series.uid)
        outcome.warnings += volume.warnings
        timings["volume"] = time.perf_counter() - t
        self._start_model_load()

        outcome.stage = "plausibility"
        check = assess_input(volume.array, volume.spacing, self.plausibility)
        outcome.input = {"spacing_mm": list(volume.spacing), "resampled": check.resample}
        check.raise_if_refused()

        outcome.stage, t = "infer", time.perf_counter()
        if check.resample:  # the model sees its own voxel size; the mask comes back onto the series' grid
            image, grid = to_model_grid(volume.array, volume.spacing, self.plausibility.model_spacing_mm)
            model_mask, members = self._segment(image)
            mask = labels_to_source(model_mask, volume.array.shape)
            outcome.input["model_grid_mm"] = list(grid)
            outcome.warnings.append(f"voxels {' x '.join(f'{v:.3g}' for v in volume.spacing)} mm resampled "
                                    f"onto the model's {' x '.join(f'{v:.3g}' for v in grid)} mm grid and back")
        else:
            grid = tuple(volume.spacing)
            model_mask, members = self._segment(volume.array)
            mask = model_mask
        timings["infer"] = time.perf_counter() - t

        outcome.stage, t = "measure", time.perf_counter()
        from hippo.quality import assess_quality

        volumes = measure_volumes(mask, volume.spacing)
        # archives drop and mangle Type 2/3 attributes: the objects are made from cleaned copies
        sources, header = clean_source_headers(volume.datasets)
        outcome.header = header.as_dict()
        if header.summary():
            outcome.warnings.append(header.summary())
        patient, study = patient_study_from_dataset(sources[0])
        outcome.volumes = volumes.as_dict()
        # the quality checks include hippo.plausibility's volume ranges (on the measured volumes)
        quality = assess_quality(
            model_mask, grid, rules=self.plausibility, volumes_mm3=outcome.volumes, **({} if members is None else {
                "member_probabilities": members.member_probabilities, "probabilities": members.probabilities,
                "unprocessed_labels": members.unprocessed_labels}))
        outcome.quality = quality.as_dict()
        outcome.review = check.review + quality.reasons
        timings["measure"] = time.perf_counter() - t

        outcome.stage, t = "prior", time.perf_counter()
        outcome.prior_comparison = self._prior_comparison(patient, study, outcome.volumes)
        timings["prior"] = time.perf_counter() - t

        outcome.stage, t = "report", time.perf_counter()
        now = _dt.datetime.now(_dt.timezone.utc)
        page = render_report(volume.array, mask, volume.spacing, prior=outcome.prior_comparison,
                             patient=patient, study=study,
                             volumes=volumes, model=self.model_info, timestamp=now,
                             review=outcome.review, quality=outcome.quality)
        uid = result_uid_maker(scan, series.uid, self.agent.metadata,
                               {"series_numbers": self.series_numbers,
                                "plausibility": asdict(self.plausibility),
                                **({"precision": self.precision} if self.precision != "float32" else {}),
                                **_prior_uid_option(outcome.prior_comparison)})
        from hippo.dicom.objects import make_seg, make_sr

        with _png_beside(page, self.write_png) as png:
            with _fewer_gc_passes():
                sc = self._report_sc(page, sources, uid, now)
                version = self._model_version
                seg = make_seg(sources, volume.to_source(mask), model_version=version,
                               series_number=self.series_numbers["seg"],
                               series_instance_uid=uid("seg-series"), sop_instance_uid=uid("seg"))
                sr = make_sr(sources, seg, volumes, model_version=version,
                             series_number=self.series_numbers["sr"],
                             series_instance_uid=uid("sr-series"), sop_instance_uid=uid("sr"),
                             prior_comparison=outcome.prior_comparison, quality=outcome.quality)
            timings["report"] = time.perf_counter() - t

            out = self._write_and_send(outcome, series.study_uid, {"report_sc": sc, "seg": seg, "sr": sr},
                                       png)
        outcome.status, outcome.stage = ("review" if outcome.review else "ok"), ""
        if outcome.review:
            log.warning("study %s: review recommended: %s", outcome.study, "; ".join(outcome.review))
        timings["total"] = time.perf_counter() - t_all
        outcome.files["result_json"] = str(out / "result.json")
        write_json_atomic(out / "result.json", _result_json(outcome, self.model_info, volume))
        return outcome

    def _prior_comparison(self, patient: Mapping[str, Any], study: Mapping[str, Any],
                          volumes_mm3: Mapping[str, Any]) -> dict[str, Any] | None:
        """The change since the patient's prior study (:func:`hippo.prior.prior_comparison`; never
        raises); without a prior source the block says so and still records this result's study date
        and algorithm, so that its ``result.json`` can be a later run's ``prior=PATH``."""
        from hippo.dicom.objects import ALGORITHM_NAME

        return prior_comparison(self.prior, patient_id=str(patient.get("id", "")), study_date=study.get("date"),
                                study_instance_uid=str(study.get("uid", "")), volumes_mm3=volumes_mm3,
                                algorithm={"name": ALGORITHM_NAME,
                                           "version": str(self.agent.metadata.get("hippo_version", "0"))})

    @property
    def _model_version(self) -> str:
        """The model's package version, as the SEG and SR record it."""
        return str(self.agent.metadata.get("hippo_version", "0"))

    def _report_sc(self, page, sources: Sequence[Any], uid: Callable[[str], str], now: _dt.datetime):
        """The report page as a Secondary Capture of the study of ``sources`` (the cleaned source
        headers), referencing each of them; ``uid``: :func:`result_uid_maker`'s UIDs."""
        return secondary_capture(page, sources[0], series_number=self.series_numbers["sc"], timestamp=now,
                                 series_instance_uid=uid("sc-series"), sop_instance_uid=uid("sc"),
                                 referenced_instances=sources)

    def _segment(self, image: np.ndarray):
        """``(labels, members)``: the agent's ``(X, Y, Z)`` labels of ``image`` and, when the agent can
        give them in the same pass, its :class:`hippo.infer.MemberSegmentation` for the quality score
        (``None`` for an agent with :meth:`segment` only: the quality checks then use the mask alone)."""
        segment_members = getattr(self.agent, "segment_members", None)
        if segment_members is None:
            return self.agent.segment(image), None
        members = segment_members(image)
        return members.labels, members

    def _write_and_send(self, outcome: StudyOutcome, study_uid: str, objects: Mapping[str, Any],
                        png: Future | None) -> Path:
        """Write ``objects`` (name -> dataset) as ``<name>.dcm`` and the report page as ``report.png``
        (``png``: the future of its bytes, :func:`_png_beside`; ``None``: no PNG) under
        ``out_root/<study_uid>/``, then send the DICOM files (what fails waits in the outbox); sets
        ``outcome.stage`` to "write" / "send" while it runs. Returns the study's result folder."""
        timings = outcome.timings_s
        outcome.stage, t = "write", time.perf_counter()
        out = self.out_root / validate_uid(study_uid)
        with _fewer_gc_passes():
            for name, ds in objects.items():
                outcome.files[name] = str(write_bytes_atomic(out / f"{name}.dcm", _dicom_bytes(ds)))
        if png is not None:
            outcome.files["report_png"] = str(write_bytes_atomic(out / "report.png", png.result()))
        timings["write"] = time.perf_counter() - t

        if self.pacs is not None:
            outcome.stage, t = "send", time.perf_counter()
            report = deliver([Path(p) for k, p in outcome.files.items() if k != "report_png"], self.pacs, self.outbox)
            outcome.sent = report.counts()
            outcome.queued = list(report.queued)
            if report.queued:
                outcome.warnings.append(f"PACS {self.pacs.destination}: {len(report.queued)} object(s) "
                                        f"wait in the outbox {self.outbox.root}")
            if report.lost:  # neither at the PACS nor in the outbox: the study is not done
                raise OSError(f"{len(report.lost)} result object(s) neither delivered to {self.pacs.destination} "
                              f"nor queued: " + "; ".join(f"{uid}: {why}" for uid, why in report.lost))
            timings["send"] = time.perf_counter() - t
        outcome.stage = ""
        return out

    # ------------------------------------------------------------------------------ whole-head T1
    def _prepare_wholehead(self, outcome: StudyOutcome, scan, series) -> tuple[Any, Any]:
        """A whole-head T1's stages before the model: its pixels (``volume``) and its registration to
        the template; starts a background model load once the pixels are read. Raises on failure with
        ``outcome.stage`` naming the stage."""
        from hippo.wholehead.register import register_to_template

        timings = outcome.timings_s
        outcome.stage, t = "volume", time.perf_counter()
        with _fewer_gc_passes():
            volume = load_series(scan.series_inputs(series), workers=self.io_threads, series_uid=series.uid)
        outcome.warnings += volume.warnings
        outcome.input = {"spacing_mm": list(volume.spacing), "resampled": False, "kind": "wholehead"}
        timings["volume"] = time.perf_counter() - t
        self._start_model_load()  # torch's import runs beside the registration

        # registered before the model is asked for: a background model load ends meanwhile
        outcome.stage, t = "register", time.perf_counter()
        registration = register_to_template(volume.array, volume.affine)
        timings["register"] = time.perf_counter() - t
        return volume, registration

    def _finish_wholehead(self, outcome: StudyOutcome, prepared: "_PreparedStudy", t_all: float) -> StudyOutcome:
        """The stages after the registration for a whole-head T1 series: both hippocampi
        (:func:`hippo.wholehead.segment.segment_wholehead`), a four-segment SEG, an SR per side with
        the asymmetry index, eTIV and each side's segmentation quality, the whole-head report page as
        SC, ``result.json``. Raises on failure with ``outcome.stage`` naming the stage."""
        timings = outcome.timings_s
        scan, series, volume, registration = prepared.scan, prepared.series, prepared.volume, prepared.registration
        outcome.stage, t = "infer", time.perf_counter()
        _ = self.agent  # waits for a background load (its time recorded on its own)
        timings["model_wait"] = time.perf_counter() - t
        t = time.perf_counter()
        from hippo.wholehead.review import ReviewRules
        from hippo.wholehead.segment import locator_agent, segment_wholehead  # scipy: imported by the model load

        if self._locator is None:
            self._locator = locator_agent(self.agent)
        plaus = asdict(self.plausibility)
        rules = ReviewRules.from_mapping({k: plaus[k] for k in ("anterior_mm3", "posterior_mm3", "total_mm3")
                                          if k in plaus})
        result = segment_wholehead(volume.array, volume.affine, self.agent, spacing=volume.spacing,
                                   registration=registration, locator=self._locator, rules=rules,
                                   quality_rules=self.plausibility)
        labels = result.labels
        timings["infer"] = time.perf_counter() - t
        timings.update({f"wholehead_{k}": v for k, v in result.timings_s.items()})

        outcome.stage, t = "measure", time.perf_counter()
        summary = result.as_dict()
        sources, header = clean_source_headers(volume.datasets)
        outcome.header = header.as_dict()
        if header.summary():
            outcome.warnings.append(header.summary())
        patient, study = patient_study_from_dataset(sources[0])
        outcome.volumes = {side: {k: summary[side][k] for k in ("anterior_mm3", "posterior_mm3", "total_mm3")}
                           for side in ("left", "right")}
        outcome.volumes["asymmetry_index_percent"] = summary["asymmetry_index_percent"]
        outcome.volumes["etiv_mm3"] = summary["etiv_mm3"]
        outcome.quality = summary["quality"]  # per side (hippo.quality); flagged sides' reasons are in review
        outcome.review = list(result.review)
        outcome.warnings += list(result.notes)
        timings["measure"] = time.perf_counter() - t
        lookup = self.prior
        if lookup is not None and (lookup.path or lookup.source is not None):
            # change since an earlier scan/result (hippo.wholehead.longitudinal): prior=PATH, else the
            # patient's earlier whole-head T1 (or, failing that, our earlier SR) found in the PACS
            from hippo.wholehead.longitudinal import change_since_prior, pacs_prior_input

            outcome.stage, t = "prior", time.perf_counter()
            prior = lookup.path or (lambda: pacs_prior_input(lookup.source, patient_id=patient.get("id"),
                                                             study_date=study.get("date"),
                                                             study_instance_uid=series.study_uid))
            summary["change"] = change_since_prior(prior, (volume.array, volume.affine), result, self.agent,
                                                   locator=self._locator, current_date=study.get("date"),
                                                   segment_options={"rules": rules, "quality_rules": self.plausibility})
            timings["prior"] = time.perf_counter() - t

        outcome.stage, t = "report", time.perf_counter()
        from hippo.dicom.objects import make_wholehead_seg, make_wholehead_sr
        from hippo.wholehead.page import render_wholehead_report

        now = _dt.datetime.now(_dt.timezone.utc)
        title = " ".join(str(x) for x in (patient.get("name"), patient.get("id"), series.description) if x)
        page = render_wholehead_report(volume.array, labels, volume.spacing, summary, title=title)
        uid = result_uid_maker(scan, series.uid, self.agent.metadata,
                               {"kind": "wholehead", "series_numbers": self.series_numbers,
                                "plausibility": plaus, "precision": self.precision,
                                **_prior_uid_option(summary.get("change"))})
        with _png_beside(page, self.write_png) as png:
            with _fewer_gc_passes():
                sc = self._report_sc(page, sources, uid, now)
                version = self._model_version
                seg = make_wholehead_seg(sources, volume.to_source(labels), model_version=version,
                                         series_number=self.series_numbers["seg"],
                                         series_instance_uid=uid("seg-series"), sop_instance_uid=uid("seg"))
                sr = make_wholehead_sr(sources, seg, {"left": result.left.volumes, "right": result.right.volumes},
                                       asymmetry_index_percent=result.asymmetry_index, etiv_mm3=result.etiv_mm3,
                                       model_version=version, series_number=self.series_numbers["sr"],
                                       series_instance_uid=uid("sr-series"), sop_instance_uid=uid("sr"),
                                       quality=outcome.quality,
                                       **({"change": summary["change"]} if summary.get("change") else {}))
            timings["report"] = time.perf_counter() - t

            out = self._write_and_send(outcome, series.study_uid, {"report_sc": sc, "seg": seg, "sr": sr}, png)
        outcome.status = "review" if outcome.review else "ok"
        if outcome.review:
            log.warning("study %s: review recommended: %s", outcome.study, "; ".join(outcome.review))
        timings["total"] = time.perf_counter() - t_all
        outcome.files["result_json"] = str(out / "result.json")
        record = _result_json(outcome, self.model_info, volume)
        record["wholehead"] = {k: summary[k] for k in ("left", "right", "registration", "labels")}
        record["study_date"] = study.get("date") or None
        if summary.get("change") is not None:
            record["change"] = summary["change"]
        write_json_atomic(out / "result.json", record)
        return outcome


@dataclass
class _PreparedStudy:
    """A study scanned and its series selected and, for a whole-head T1, read and registered
    (:meth:`StudyProcessor.prepare`), waiting for :meth:`StudyProcessor.finish`."""

    outcome: StudyOutcome
    scan: Any                   # hippo.dicom.ingest.StudyScan
    series: Any                 # hippo.dicom.ingest.SeriesInfo, the selected series
    volume: Any                 # hippo.dicom.volume.SeriesVolume (whole head); None: read in finish
    registration: Any           # hippo.wholehead.register.Registration (whole head); else None
    seconds: float              # spent in prepare


def _failed(outcome: StudyOutcome, exc: Exception, t_all: float, stage: str) -> StudyOutcome:
    """``outcome`` marked failed with ``exc`` at the stage it was in (``outcome.stage``, else
    ``stage``), its total time set; logged."""
    outcome.status, outcome.stage = "failed", outcome.stage or stage
    outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.timings_s["total"] = time.perf_counter() - t_all
    log.error("study %s failed at %s: %s", outcome.study, outcome.stage, outcome.error)
    log.debug("%s", traceback.format_exc())
    return outcome


def _prior_uid_option(comparison: Mapping[str, Any] | None) -> dict[str, Any]:
    """What of the prior comparison (or a whole-head ``change`` block) goes into the result UIDs: the
    prior's identity (and a whole head's mode) when a comparison was made (the SC and SR then differ
    from a result without one), else nothing."""
    if not comparison or not comparison.get("available"):
        return {}
    prior = comparison.get("prior") or {}
    if "sides" in comparison:  # hippo.change.wholehead_change
        return {"change": [comparison.get("mode"), prior.get("source"), prior.get("study_date")]}
    return {"prior": [prior.get("sop_instance_uid") or prior.get("source"), prior.get("study_date"),
                      prior.get("volumes")]}


def result_uid_maker(scan, series_uid: str, model_metadata: Mapping[str, Any],
                     options: Mapping[str, Any]) -> Callable[[str], str]:
    """``uid(role) -> UID`` for the result objects (``"sc"``, ``"seg-series"``, ...), derived only from
    what the results are computed from: every input instance of the study (SOP Instance UIDs as
    scanned), the selected series, the model (its metadata, not its path), the report options and
    this package's version.

    Processing the same inputs again -- e.g. the listener redoing a study after a crash that came
    after the results were sent -- gives the same SOP Instance UIDs, so the PACS stores one result
    set (it keeps one instance per SOPInstanceUID) and at-least-once delivery stays harmless; a
    changed study or another model gives new UIDs, i.e. a new result set.
    """
    from hippo import __version__

    key = json.dumps({
        "instances": sorted(h.sop_instance_uid for s in scan.series for h in s.instances),
        "series": str(series_uid),
        "model": {k: v for k, v in dict(model_metadata).items() if k != "path"},
        "options": dict(options),
        "hippo": __version__,
    }, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()
    return lambda role: generate_uid(entropy_srcs=[digest, str(role)])


def _result_json(outcome: StudyOutcome, model: Mapping[str, Any], volume) -> dict[str, Any]:
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in outcome.as_dict().items() if k not in ("files",)},
        "files": {k: Path(v).name for k, v in outcome.files.items()},
        "geometry": {"shape": list(volume.array.shape), "spacing_mm": list(volume.spacing),
                     "affine_ras": np.asarray(volume.affine).round(6).tolist()},
        "model": dict(model),
    }


# --------------------------------------------------------------------------------------- batch
def find_studies(root: str | os.PathLike, *, exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The study directories of a batch: every non-hidden sub-directory of ``root``, sorted.

    Args:
        root: the folder holding one sub-directory per study.
        exclude: folders this run writes to (results, outbox): a sub-directory that is one of them or
            holds one is never taken for a study (``studies=.`` run from the project root would
            otherwise read ``outputs/`` as a study).

    Raises:
        FileNotFoundError: ``root`` does not exist; ValueError: it holds no sub-directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: studies root does not exist")
    own = [Path(p).resolve() for p in exclude]

    def is_own(d: Path) -> bool:
        real = d.resolve()
        if any(o == real or o.is_relative_to(real) for o in own):
            log.info("%s holds this run's own output; not a study", d)
            return True
        return False

    studies = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and not is_own(p))
    if not studies:
        raise ValueError(f"{root}: no study directory below it (expected one sub-directory per study)")
    return studies


def run_batch(
    studies: Sequence[str | os.PathLike],
    factory: Callable[[], StudyProcessor],
    *,
    workers: int = 1,
    on_done: Callable[[StudyOutcome], None] | None = None,
) -> list[StudyOutcome]:
    """Process studies with ``workers`` processes, each building its own processor (model loaded
    once per worker) with the picklable ``factory``; ``workers <= 1`` runs serially here. The
    package's one batch runner (:func:`hippo.batch_runner.run_each`: spawned workers, torch and
    SimpleITK threads capped per worker, whatever goes wrong for one study becomes its ``failed``
    outcome).

    Returns:
        One outcome per study, in the order of ``studies``.
    """
    from hippo.batch_runner import run_each

    def failed(study: str, why) -> StudyOutcome:
        return StudyOutcome(study=study, stage=why.stage, error=why.error)

    return run_each([str(s) for s in studies], factory, failed=failed, workers=workers, on_done=on_done)


def describe_volumes(o: StudyOutcome) -> str:
    """The volumes of an ``ok``/``review`` outcome in one line (mm³): anterior, posterior and total of
    a HippoCrop; per side, asymmetry and eTIV of a whole head."""
    v = o.volumes
    if o.kind == "wholehead" and "left" in v:
        ai = v.get("asymmetry_index_percent")
        return (f"whole-head T1 {o.series_description!r}: " + ", ".join(
            f"{side} anterior {v[side]['anterior_mm3']:.0f} mm³, posterior {v[side]['posterior_mm3']:.0f} mm³, "
            f"total {v[side]['total_mm3']:.0f} mm³" for side in ("left", "right"))
            + (f"; asymmetry {ai:+.1f} %" if ai is not None else "") + f"; eTIV {v['etiv_mm3'] / 1e6:.2f} L")
    return (f"anterior {v['anterior_mm3']:.0f} mm³, posterior {v['posterior_mm3']:.0f} mm³, "
            f"total {v['total_mm3']:.0f} mm³")


def summary_table(outcomes: Iterable[StudyOutcome]) -> str:
    """A Markdown table: study, status, volumes (mm³), time, error or review reason."""
    lines = ["| study | status | anterior mm³ | posterior mm³ | total mm³ | seconds | queued | error / review |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for o in outcomes:
        v = o.volumes or {}
        if o.kind == "wholehead" and "left" in v:  # both sides: "L / R" in each column
            v = {k: f"{v['left'][k]:.0f} / {v['right'][k]:.0f}" for k in ("anterior_mm3", "posterior_mm3", "total_mm3")}
        fmt = lambda k: (v[k] if isinstance(v[k], str) else f"{v[k]:.0f}") if k in v else ""  # noqa: E731
        err = f"{o.stage}: {o.error}" if o.error else "; ".join(o.review)
        lines.append(f"| {Path(o.study).name} | {o.status} | {fmt('anterior_mm3')} | {fmt('posterior_mm3')} | "
                     f"{fmt('total_mm3')} | {o.timings_s.get('total', 0):.2f} | {len(o.queued)} | {err.replace('|', '/')} |")
    return "\n".join(lines)


def write_summary(out_dir: str | os.PathLike, outcomes: Sequence[StudyOutcome], **extra: Any) -> dict[str, Any]:
    """Write ``summary.json`` and ``summary.md`` into ``out_dir``; return the JSON content."""
    out_dir = Path(out_dir)
    summary = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n_studies": len(outcomes),
        "n_ok": sum(o.status == "ok" for o in outcomes),
        "n_review": sum(o.status == "review" for o in outcomes),
        "n_failed": sum(o.status == "failed" for o in outcomes),
        **extra,
        "studies": [o.as_dict() for o in outcomes],
    }
    write_json_atomic(out_dir / "summary.json", summary)
    write_bytes_atomic(out_dir / "summary.md", (summary_table(outcomes) + "\n").encode())
    return summary


def build_processor(
    model_path: str | os.PathLike,
    out_root: str | os.PathLike,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    precision: str = "float32",
    backend: str = "auto",
    pacs: Mapping[str, Any] | None = None,
    outbox_dir: str | os.PathLike | None = None,
    background_load: bool = False,
    **options: Any,
) -> StudyProcessor:
    """Load the model file and build a :class:`StudyProcessor` (picklable via ``functools.partial``,
    so batch workers each build their own). ``pacs=None`` disables sending; ``options`` go to
    :class:`StudyProcessor` (rules, io_threads, series_numbers, write_png, plausibility, wholehead,
    prior).

    ``background_load=False`` (the listener's choice) loads the model here, so a model file that
    cannot be loaded stops the service at start; ``True`` (``hippo.deploy``) loads it in a thread
    while the first study is read and registered (:mod:`hippo.model_loading`), and a model that
    cannot be loaded fails each study at its first model stage, naming the file."""
    def load() -> Any:
        from hippo.infer import InferenceAgent  # imports torch: in the background thread when loading there

        agent = InferenceAgent.from_file(model_path, device=device, batch_size=batch_size, precision=precision,
                                         backend=backend)
        agent.for_concurrent_calls(2)  # builds the sessions a whole head's two sides run on at once
        return agent

    def load_and_warm() -> Any:
        agent = load()
        # what the stages after inference import, imported here beside the registration instead
        import hippo.dicom.objects  # noqa: F401 - highdicom, for the SEG and SR
        import hippo.quality  # noqa: F401 - scipy.ndimage, for the quality checks
        import hippo.wholehead.segment  # noqa: F401
        from hippo.dicom.headers import header_keywords

        header_keywords()  # highdicom's tables, read once
        if pacs is not None:
            import pynetdicom  # noqa: F401 - for sending the results
        return agent

    # started by the first study once its pixels are read (StudyProcessor._start_model_load)
    agent = BackgroundLoad(load_and_warm, start=False) if background_load else load()
    pacs_cfg = PacsConfig.from_mapping(pacs) if pacs is not None else None
    outbox = Outbox(outbox_dir) if pacs_cfg is not None else None
    return StudyProcessor(agent, out_root, pacs=pacs_cfg, outbox=outbox, **options)
