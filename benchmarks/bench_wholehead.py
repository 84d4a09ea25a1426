"""Whole-head benchmark on every real head, against hippodeep in the same run: per scan our status,
left/right volumes, the difference from hippodeep, the Dice against FreeSurfer where its labels
exist and every review reason; and ``python -m hippo.predict`` on a folder against hippodeep on
the same files, as whole processes, interleaved.

    nice .venv/bin/python benchmarks/bench_wholehead.py [--scans DIR] [--hippodeep PATH] [--repeat 2]
        [--sections table,process,stages] [--out outputs/benchmarks/wholehead.json]

**Heads.** Every NIfTI/MGZ file :func:`hippo.scan_io.find_inputs` finds below ``--scans``
(default ``../shared/data/wholehead``) except label maps and atlases (told apart by content with
:func:`hippo.scan_io.label_map_reason`, as ``hippo.predict`` does; listed as skipped), and every
folder holding DICOM files (``DICM`` at byte 128) as one DICOM series/study.

**hippodeep** (``--hippodeep``, default ``../shared/tools/hippodeep/hippodeep.py``, an unchanged
copy of hippodeep_pytorch) runs as a subprocess of the same interpreter, never imported, on
symlinks in a scratch folder (it writes its outputs beside its inputs); its volumes are read from
each ``<name>_hippoLR_volumes.csv`` (sums of its soft masks, rounded to 1 mm³), its seconds per
scan from its own ``Elapsed time for subject`` lines. It sets ``torch.set_num_threads(4)`` itself;
we run with our default threads (every core). Both run under the same ``nice`` as this script.

**Rounds.** One round runs, in a fresh scratch folder: (a) ``python -m hippo.predict input=FOLDER
workers=1`` (``--workers``) once over a folder of symlinks to every NIfTI/MGZ head (one process), and (b)
hippodeep once with the same files as arguments (one process); the order alternates from round to
round (ours first in even rounds) so that a change in the machine's load hits both alike. Each run
is timed as a whole process (wall clock from start to exit: interpreter, imports, model load, the
scans, the outputs). ``process`` runs ``--repeat`` rounds; ``table`` alone runs one.

1. **table** (from round 1 of this run; nothing is copied from earlier runs): per head our status,
   left/right total volume (mm³; ``summary.json`` of ``hippo.predict``, or for a DICOM head of
   ``python -m hippo.deploy study=DIR send=false``, run once per DICOM folder), hippodeep's live
   left/right, Δ % = ours / hippodeep - 1 per side (REFERENCE.tsv's hippodeep figures give the
   same Δ when they equal the live ones; where they differ both are shown), eTIV ours / hippodeep,
   the Dice against FreeSurfer where a FreeSurfer ``*aseg*`` label map lies beside the head (our
   label map, labels 1+2 left and 3+4 right, against aseg 17 / 53, the aseg resampled nearest-
   neighbour onto our label map's grid when the grids differ; FreeSurfer's voxel-count volumes
   beside it), and every review reason. hippodeep reads no DICOM: the DICOM head is converted to
   NIfTI with our own reader (:func:`hippo.dicom.volume.load_series`, the series ``hippo.deploy``
   selected) and nibabel (qform and sform set), and hippodeep runs on that file.
2. **process**: whole-process wall time of each round, ours and hippodeep, their medians and the
   ratio ours / hippodeep (criterion: no slower, ratio <= 1); per scan the median seconds inside
   each process (our ``timings_s.total`` per scan, hippodeep's own per-subject time) and what the
   rest of the process took (start-up, imports, model load, group outputs; not separable for ours
   with ``workers=1``, which reads and registers the next scan while it measures one, so that its
   scans' times overlap and include the time they shared the cores); the fresh-interpreter
   cost of ``import torch`` and of Hydra + ``hippo.wholehead``. The DICOM head (``hippo.deploy``,
   which also writes SC/SEG/SR) against hippodeep on its converted NIfTI is shown apart, once.
3. **stages**: our per-stage seconds per scan (median over rounds, from ``summary.json``; no extra runs).
4. **variants** (not in the default ``--sections``; minutes): in this process, the model loaded
   once per variant, :class:`hippo.wholehead.run.ScanProcessor` on each NIfTI/MGZ head, ``--repeat``
   times after a warm-up, interleaved: float32 (the same as the default where the CPU has no native
   bfloat16: ``precision=auto`` resolves to float32), no refinement, the whole ensemble as locator.
   Median seconds per scan against the default and the largest volume change.

**Load.** Before each run the 1-minute load average, and during it other processes' CPU use
(``benchmarks/machine_load.py``: /proc/stat busy time minus ours and our children's): above 1.5 at
the start or above 0.3 cores in any run, the figures are flagged as taken on a shared machine.

Every figure goes to ``--out`` (JSON). Exits 1 when a head is not ``ok``/``review``, or a process
(ours or hippodeep) fails or leaves no figures; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from machine_load import CpuMeter  # benchmarks/machine_load.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCANS = REPO.parent / "shared/data/wholehead"
DEFAULT_HIPPODEEP = REPO.parent / "shared/tools/hippodeep/hippodeep.py"
DEFAULT_OUT = REPO / "outputs/benchmarks/wholehead.json"
SECTIONS = ("table", "process", "stages", "variants")
DEFAULT_SECTIONS = "table,process,stages"
# crop to map_back: summed over the two sides (which run at once); segment: their wall time
STAGES = ("read", "register", "crop", "infer", "quality", "map_back", "segment", "review", "report", "thumbnail",
          "write", "total")
FS_LEFT, FS_RIGHT = 17, 53  # FreeSurfer aseg labels of the hippocampi
SHARED_LOAD = 1.5
SHARED_OTHERS_CORES = 0.3
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def log(msg: str = "") -> None:
    print(msg, flush=True)


@dataclass
class Head:
    """One real head: a NIfTI/MGZ file or a DICOM folder."""

    name: str              # predict's name for a file (find_inputs), the folder's relative path for DICOM
    path: Path
    kind: str              # "file" | "dicom"
    rel: str               # path relative to --scans ("fs_subject/norm.mgz", "fnndsc_pediatric_dicom/")
    label: str = ""        # the display name (REFERENCE.tsv's scan column when it lists the head)
    aseg: Path | None = None
    reference: dict[str, Any] = field(default_factory=dict)

    @property
    def suffix(self) -> str:
        n = self.path.name.lower()
        return ".nii.gz" if n.endswith(".nii.gz") else self.path.suffix


# ------------------------------------------------------------------------------------------- discovery

def _is_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_folders(root: Path) -> list[Path]:
    """Folders below ``root`` holding DICOM files (one series/study each; not descended further)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files = sorted(f for f in filenames if not f.startswith("."))
        if any(_is_dicom(Path(dirpath) / f) for f in files[:5]):
            found.append(Path(dirpath))
            dirnames[:] = []
    return found


def read_reference(root: Path) -> dict[str, dict[str, Any]]:
    """REFERENCE.tsv rows by their ``file`` column (trailing slash dropped)."""
    ref = root / "REFERENCE.tsv"
    if not ref.is_file():
        return {}
    with open(ref, newline="") as f:
        return {row["file"].rstrip("/"): row for row in csv.DictReader(f, delimiter="\t")}


def find_heads(root: Path) -> tuple[list[Head], list[dict[str, str]]]:
    """Every real head below ``root`` and the files skipped as label maps / not 3D (with why)."""
    import nibabel as nib
    import numpy as np

    from hippo.scan_io import find_inputs, label_map_reason

    reference = read_reference(root)
    heads: list[Head] = []
    skipped: list[dict[str, str]] = []
    label_maps: list[Path] = []
    for scan in find_inputs(root).scans:
        data = np.asanyarray(nib.load(str(scan.path)).dataobj)
        reason = label_map_reason(data) if data.ndim == 3 else f"not one 3D volume (shape {data.shape})"
        if reason:
            skipped.append({"file": str(scan.path.relative_to(root)), "why": reason})
            label_maps.append(scan.path)
            continue
        heads.append(Head(scan.name, scan.path, "file", str(scan.path.relative_to(root))))
    for folder in dicom_folders(root):
        rel = str(folder.relative_to(root))
        heads.append(Head(rel.replace(os.sep, "_"), folder, "dicom", rel + "/"))
    for h in heads:
        row = reference.get(h.rel.rstrip("/"))
        h.reference = dict(row) if row else {}
        h.label = row["scan"] if row else h.name
        if h.kind == "file":  # FreeSurfer labels: an *aseg* label map in the head's own folder
            asegs = [p for p in label_maps if p.parent == h.path.parent and "aseg" in p.name.lower()]
            h.aseg = asegs[0] if asegs else None
    return heads, skipped


# ------------------------------------------------------------------------------------------------- runs

def _link_folder(folder: Path, heads: list[Head]) -> list[Path]:
    folder.mkdir(parents=True)
    links = []
    for h in heads:
        link = folder / (h.name + h.suffix)
        os.symlink(h.path, link)
        links.append(link)
    return links


def _run(cmd: list[str], what: str) -> dict[str, Any]:
    """Run one whole process, timed, with the machine's load before and others' CPU during it."""
    load = os.getloadavg()[0]
    meter = CpuMeter()
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t
    cpu = meter.read()
    return {"what": what, "wall_s": wall, "rc": r.returncode, "load1_before": load,
            "others_cores": cpu["others_cores"], "ours_cores": cpu["ours_cores"],
            "stdout": r.stdout, "stderr": r.stderr}


def run_predict(heads: list[Head], work: Path, workers: int = 1) -> dict[str, Any]:
    folder = work / "ours_in"
    _link_folder(folder, heads)
    out = work / "ours_out"
    run = _run([sys.executable, "-m", "hippo.predict", f"input={folder}", f"output={out}", f"workers={workers}",
                "progress=false", f"hydra.run.dir={work / 'hydra_predict'}"], "hippo.predict")
    summary = out / "summary.json"
    run["summary"] = json.loads(summary.read_text()) if summary.is_file() else None
    return run


def run_deploy(head: Head, work: Path) -> dict[str, Any]:
    results = work / f"deploy_{head.name}"
    run = _run([sys.executable, "-m", "hippo.deploy", f"study={head.path}", "send=false", "workers=1",
                f"results_dir={results}", f"outbox_dir={work / 'outbox'}",
                f"hydra.run.dir={work / 'hydra_deploy'}"], "hippo.deploy")
    summary = results / "summary.json"
    run["summary"] = json.loads(summary.read_text()) if summary.is_file() else None
    return run


_ELAPSED = re.compile(r"Loading image (?P<file>.+?)\n.*?Elapsed time for subject\s+(?P<s>[0-9.]+)s", re.S)


def run_hippodeep(hippodeep: Path, files: list[Path]) -> dict[str, Any]:
    """hippodeep on ``files`` (symlinks or converted copies in a scratch folder), one process."""
    run = _run([sys.executable, str(hippodeep), *map(str, files)], "hippodeep")
    seconds = {m.group("file").strip(): float(m.group("s")) for m in _ELAPSED.finditer(run["stdout"])}
    per_file = {}
    for f in files:
        stem = f.name.replace(".mgz", ".nii").replace(".nii.gz", ".nii").replace(".nii", "")  # as hippodeep names it
        vol = f.parent / (stem + "_hippoLR_volumes.csv")
        row = next(csv.DictReader(open(vol))) if vol.is_file() else None
        per_file[f.name] = {"left_mm3": float(row["hippoL"]) if row else None,
                            "right_mm3": float(row["hippoR"]) if row else None,
                            "etiv_mm3": float(row["eTIV"]) if row else None,
                            "seconds": seconds.get(str(f))}
    run["files"] = per_file
    return run


def dicom_to_nifti(head: Head, series_uid: str | None, dest: Path) -> tuple[Path, float]:
    """Our own reader (hippo.dicom.volume.load_series) + nibabel: the NIfTI hippodeep reads."""
    import nibabel as nib
    import numpy as np

    from hippo.dicom.volume import load_series

    t = time.perf_counter()
    files = sorted(p for p in head.path.rglob("*") if p.is_file() and _is_dicom(p))
    vol = load_series(files, series_uid=series_uid or None)
    img = nib.Nifti1Image(np.asarray(vol.array, dtype=np.float32), vol.affine)
    img.set_qform(vol.affine, code=1)  # hippodeep works from the qform
    img.set_sform(vol.affine, code=1)
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(str(dest))
    return dest, time.perf_counter() - t


def _slim(run: dict[str, Any]) -> dict[str, Any]:
    """A run for the JSON: no full logs (their tails when it failed)."""
    out = {k: v for k, v in run.items() if k not in ("stdout", "stderr", "summary")}
    if run["rc"] not in (0, 1) or run.get("summary") is None and run["what"] != "hippodeep":
        out["stderr_tail"] = run["stderr"][-2000:]
    return out


# ------------------------------------------------------------------------------------------------ dice

def dice_vs_freesurfer(dseg_path: Path, aseg_path: Path) -> dict[str, Any]:
    """Our label map (1+2 left, 3+4 right) against aseg 17 / 53 on our label map's grid."""
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import affine_transform

    ours_img, aseg_img = nib.load(str(dseg_path)), nib.load(str(aseg_path))
    ours = np.asanyarray(ours_img.dataobj).astype(np.int16)
    aseg = np.asanyarray(aseg_img.dataobj)
    same = ours.shape == aseg.shape and np.allclose(ours_img.affine, aseg_img.affine, atol=1e-3)
    if not same:  # nearest-neighbour onto our grid
        m = np.linalg.inv(aseg_img.affine) @ ours_img.affine
        aseg = affine_transform(aseg, m[:3, :3], m[:3, 3], output_shape=ours.shape, order=0, mode="constant")
    voxel_mm3 = float(abs(np.linalg.det(ours_img.affine[:3, :3])))
    aseg_voxel_mm3 = float(abs(np.linalg.det(aseg_img.affine[:3, :3])))
    aseg_raw = np.asanyarray(aseg_img.dataobj)

    def dice(a, b) -> float:
        s = int(a.sum()) + int(b.sum())
        return 2.0 * int(np.logical_and(a, b).sum()) / s if s else float("nan")

    ol, orr = np.isin(ours, (1, 2)), np.isin(ours, (3, 4))
    fl, fr = aseg == FS_LEFT, aseg == FS_RIGHT
    return {"same_grid": bool(same), "left": dice(ol, fl), "right": dice(orr, fr),
            "swapped_left_vs_fs_right": dice(ol, fr), "swapped_right_vs_fs_left": dice(orr, fl),
            "freesurfer_left_mm3": float((aseg_raw == FS_LEFT).sum()) * aseg_voxel_mm3,
            "freesurfer_right_mm3": float((aseg_raw == FS_RIGHT).sum()) * aseg_voxel_mm3,
            "ours_voxel_mm3": voxel_mm3}


# ----------------------------------------------------------------------------------------------- table

def _f(v: float | None, spec: str = ".0f") -> str:
    return "—" if v is None else format(v, spec)


def _delta(ours: float | None, ref: float | None) -> float | None:
    return None if ours is None or not ref else 100.0 * (ours / ref - 1.0)


def _ref_float(row: dict[str, Any], key: str) -> float | None:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return None


def build_table(heads: list[Head], predict: dict[str, Any], hd_files: dict[str, Any],
                deploys: dict[str, dict[str, Any]], dicom_hd: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    by_name = {s["name"]: s for s in (predict.get("summary") or {}).get("scans", [])}
    for h in heads:
        row: dict[str, Any] = {"scan": h.label, "name": h.name, "file": h.rel, "kind": h.kind}
        if h.kind == "file":
            s = by_name.get(h.name)
            hd = hd_files.get(h.name + h.suffix, {})
            row["input"] = "NIfTI/MGZ via hippo.predict"
            row["hippodeep_input"] = "the same file"
            if s is None:
                row.update(status="missing", error="not in hippo.predict's summary.json")
            else:
                vols = s.get("volumes") or {}
                row.update(status=s["status"], error=s.get("error", ""), review=list(s.get("review", [])),
                           notes=list(s.get("notes", [])), etiv_mm3=s.get("etiv_mm3"),
                           seconds=(s.get("timings_s") or {}).get("total"),
                           left_mm3=(vols.get("left") or {}).get("total_mm3"),
                           right_mm3=(vols.get("right") or {}).get("total_mm3"))
                dseg = (s.get("files") or {}).get("dseg")
                if h.aseg is not None and dseg and Path(dseg).is_file():
                    row["freesurfer"] = {"aseg": str(h.aseg), **dice_vs_freesurfer(Path(dseg), h.aseg)}
        else:
            run = deploys.get(h.name, {})
            studies = (run.get("summary") or {}).get("studies", [])
            s = studies[0] if studies else None
            hd = dicom_hd.get("files", {}).get(h.name + ".nii.gz", {})
            row["input"] = "DICOM via hippo.deploy send=false"
            row["hippodeep_input"] = "NIfTI converted with hippo.dicom.volume.load_series + nibabel"
            if s is None:
                row.update(status="missing", error=f"hippo.deploy left no summary.json (exit {run.get('rc')})")
            else:
                vols = s.get("volumes") or {}
                row.update(status=s["status"], error=s.get("error", ""), review=list(s.get("review", [])),
                           notes=list(s.get("warnings", [])), etiv_mm3=vols.get("etiv_mm3"),
                           seconds=(s.get("timings_s") or {}).get("total"),
                           series=s.get("series_description"), series_uid=s.get("series_uid"),
                           left_mm3=(vols.get("left") or {}).get("total_mm3"),
                           right_mm3=(vols.get("right") or {}).get("total_mm3"))
        row["hippodeep"] = hd
        for side in ("left", "right"):
            row[f"delta_{side}_percent"] = _delta(row.get(f"{side}_mm3"), hd.get(f"{side}_mm3"))
            ref = _ref_float(h.reference, f"hippodeep_{side}_mm3")
            row[f"reference_hippodeep_{side}_mm3"] = ref
            row[f"delta_{side}_percent_vs_reference"] = _delta(row.get(f"{side}_mm3"), ref)
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    log("| scan | input | status | ours L | ours R | hippodeep L | hippodeep R | Δ L % | Δ R % | eTIV ours / hippodeep (L) "
        "| FreeSurfer L / R | Dice vs FreeSurfer L / R | review: cause |")
    log("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        hd = r.get("hippodeep") or {}
        deltas = []
        for side in ("left", "right"):
            d, dref = r.get(f"delta_{side}_percent"), r.get(f"delta_{side}_percent_vs_reference")
            text = _f(d, "+.1f")
            if dref is not None and (d is None or abs(dref - d) >= 0.05):
                text += f" (REFERENCE.tsv {dref:+.1f})"
            deltas.append(text)
        fs = r.get("freesurfer")
        fs_vol = f"{fs['freesurfer_left_mm3']:.0f} / {fs['freesurfer_right_mm3']:.0f}" if fs else "—"
        fs_dice = f"{fs['left']:.3f} / {fs['right']:.3f}" if fs else "—"
        etiv = f"{_f(r.get('etiv_mm3') and r['etiv_mm3'] / 1e6, '.2f')} / {_f(hd.get('etiv_mm3') and hd['etiv_mm3'] / 1e6, '.2f')}"
        why = "; ".join(r.get("review") or []) or (r.get("error") or "")
        inp = "DICOM (`hippo.deploy`)" if r["kind"] == "dicom" else \
            ("MGZ" if r["file"].lower().endswith((".mgz", ".mgh")) else "NIfTI")
        log(f"| {r['scan']} | {inp} | {r['status']} | {_f(r.get('left_mm3'))} | {_f(r.get('right_mm3'))} | "
            f"{_f(hd.get('left_mm3'))} | {_f(hd.get('right_mm3'))} | {deltas[0]} | {deltas[1]} | {etiv} | "
            f"{fs_vol} | {fs_dice} | {why} |")


# -------------------------------------------------------------------------------------------- variants

def variants_section(heads: list[Head], repeat: int, work: Path) -> dict[str, Any]:
    from hippo.scan_io import ScanInput
    from hippo.weights import resolve_model_path
    from hippo.wholehead.run import ScanProcessor

    model = resolve_model_path(None, REPO / "outputs")
    variants = {
        "default (precision auto, refine 1, light locator)": {},
        "float32": {"precision": "float32"},
        "no refinement": {"refine_passes": 0, "extra_passes": 0},
        "ensemble locator": {"fast_locate": False},
    }
    procs, load_s = {}, {}
    for i, (vname, kw) in enumerate(variants.items()):
        t = time.perf_counter()
        procs[vname] = ScanProcessor(model, work / f"v{i}", **kw)
        procs[vname].agents()
        load_s[vname] = time.perf_counter() - t
    scans = {h.name: ScanInput(h.path, h.name, None, True) for h in heads if h.kind == "file"}
    for proc in procs.values():  # warm-up (lazy imports, caches, first-call allocations)
        proc.process(scans[next(iter(scans))])
    runs: dict[str, dict[str, list]] = {v: {s: [] for s in scans} for v in variants}
    last: dict[tuple[str, str], Any] = {}
    for _ in range(repeat):
        for sname, scan in scans.items():
            for vname, proc in procs.items():
                outcome = proc.process(scan)
                if outcome.status not in ("ok", "review"):
                    raise SystemExit(f"{sname}: {outcome.status} at {outcome.stage}: {outcome.error}")
                runs[vname][sname].append(outcome.timings_s.get("total", 0.0))
                last[vname, sname] = (outcome.volumes["left"]["total_mm3"], outcome.volumes["right"]["total_mm3"])
    return {v: {"model_load_s": load_s[v], "scans": {s: {"total_s": statistics.median(runs[v][s]),
                                                         "volumes_mm3": last[v, s]} for s in scans}}
            for v in variants}


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scans", type=Path, default=DEFAULT_SCANS, help="folder of real heads (default %(default)s)")
    ap.add_argument("--hippodeep", type=Path, default=DEFAULT_HIPPODEEP, help="hippodeep.py (run, never imported)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of the process section (and variants)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--workers", type=int, default=1,
                    help="hippo.predict's workers (processes over the scans, threads split among them)")
    ap.add_argument("--sections", default=DEFAULT_SECTIONS, help=f"any of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        ap.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if not args.scans.is_dir():
        log(f"whole-head scans not found: {args.scans}")
        return 1
    needs_runs = bool({"table", "process", "stages"} & set(sections))
    if needs_runs and not args.hippodeep.is_file():
        log(f"hippodeep not found: {args.hippodeep} (give --hippodeep PATH/hippodeep.py)")
        return 1
    heads, skipped = find_heads(args.scans)
    files = [h for h in heads if h.kind == "file"]
    dicoms = [h for h in heads if h.kind == "dicom"]
    if not heads:
        log(f"no head below {args.scans}")
        return 1
    load_start = os.getloadavg()
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_start": load_start, "nice": os.nice(0)},
        "args": {"scans": str(args.scans), "hippodeep": str(args.hippodeep), "repeat": args.repeat,
                 "sections": sections, "workers": args.workers},
        "heads": [{"scan": h.label, "name": h.name, "file": h.rel, "kind": h.kind,
                   "freesurfer_labels": str(h.aseg) if h.aseg else None} for h in heads],
        "skipped": skipped,
    }
    log(f"{len(heads)} head(s) below {args.scans}: {len(files)} NIfTI/MGZ "
        f"({', '.join(h.rel for h in files)}), {len(dicoms)} DICOM ({', '.join(h.rel for h in dicoms)}); "
        f"skipped {len(skipped)} label map(s)/atlas(es): {', '.join(s['file'] for s in skipped)}")
    failures: list[str] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_wholehead_") as tmp:
        work = Path(tmp)
        rounds: list[dict[str, Any]] = []
        n_rounds = args.repeat if "process" in sections else (1 if needs_runs else 0)
        deploys: dict[str, dict[str, Any]] = {}
        dicom_hd: dict[str, Any] = {}
        conversions: dict[str, float] = {}
        for i in range(n_rounds):
            rwork = work / f"round{i}"
            order = ("ours", "hippodeep") if i % 2 == 0 else ("hippodeep", "ours")
            rnd: dict[str, Any] = {"order": list(order)}
            for who in order:
                if not files:
                    break
                log(f"round {i + 1}/{n_rounds}: {who} on {len(files)} NIfTI/MGZ head(s) ...")
                if who == "ours":
                    rnd["ours"] = run_predict(files, rwork, args.workers)
                else:
                    links = _link_folder(rwork / "hd_in", files)
                    rnd["hippodeep"] = run_hippodeep(args.hippodeep, links)
            rounds.append(rnd)
            if i == 0 and "table" in sections:  # the DICOM heads: once
                for h in dicoms:
                    log(f"DICOM {h.rel}: hippo.deploy ...")
                    deploys[h.name] = run_deploy(h, work)
                    studies = (deploys[h.name].get("summary") or {}).get("studies") or [{}]
                    nifti, conversions[h.name] = dicom_to_nifti(h, studies[0].get("series_uid"),
                                                                work / "dicom_nifti" / f"{h.name}.nii.gz")
                    log(f"DICOM {h.rel}: hippodeep on the NIfTI converted by our reader ...")
                    run = run_hippodeep(args.hippodeep, [nifti])
                    dicom_hd.setdefault("runs", {})[h.name] = run
                    dicom_hd.setdefault("files", {}).update(run["files"])
        # ---- failures
        for i, rnd in enumerate(rounds):
            for who in ("ours", "hippodeep"):
                run = rnd.get(who)
                if run is None:
                    continue
                if who == "ours" and run.get("summary") is None:
                    failures.append(f"round {i + 1}: hippo.predict exited {run['rc']} without summary.json:\n"
                                    f"{run['stderr'][-2000:]}")
                for s in (run.get("summary") or {}).get("scans", []) if who == "ours" else []:
                    if s["status"] not in ("ok", "review"):
                        failures.append(f"round {i + 1}: {s['name']}: {s['status']} at {s.get('stage')}: {s.get('error')}")
                if who == "hippodeep" and (run["rc"] != 0 or any(f["left_mm3"] is None for f in run["files"].values())):
                    failures.append(f"round {i + 1}: hippodeep exited {run['rc']} or wrote no volumes:\n"
                                    f"{run['stdout'][-1000:]}{run['stderr'][-1000:]}")
        for name, run in dicom_hd.get("runs", {}).items():
            if run["rc"] != 0 or any(f["left_mm3"] is None for f in run["files"].values()):
                failures.append(f"hippodeep on the converted {name}: exit {run['rc']}: {run['stderr'][-1000:]}")

        # ---- table
        if "table" in sections and rounds:
            rows = build_table(heads, rounds[0].get("ours", {}), (rounds[0].get("hippodeep") or {}).get("files", {}),
                               deploys, dicom_hd)
            result["table"] = rows
            result["dicom_conversion_s"] = conversions
            for r in rows:
                if r["status"] not in ("ok", "review"):
                    failures.append(f"{r['scan']}: {r['status']} {r.get('error', '')}")
            log("\n== every real head: ours (this run) against hippodeep (this run) and FreeSurfer")
            log("Volumes: total hippocampus per side, mm³. Δ % = ours / hippodeep - 1. eTIV in litres. "
                "FreeSurfer: aseg 17 / 53 voxel counts; Dice of our label map (1+2 left, 3+4 right) against them.")
            print_table(rows)
            if any(r["kind"] == "dicom" for r in rows):
                log("DICOM: hippodeep reads no DICOM; it ran on a NIfTI converted with our reader "
                    "(hippo.dicom.volume.load_series, the series hippo.deploy selected) and nibabel.")
            for r in rows:
                fs = r.get("freesurfer")
                if fs:
                    log(f"{r['scan']}: Dice with the sides swapped {fs['swapped_left_vs_fs_right']:.3f} / "
                        f"{fs['swapped_right_vs_fs_left']:.3f}; aseg {'on the same grid' if fs['same_grid'] else 'resampled onto ours'}")
                for n in r.get("notes") or []:
                    log(f"{r['scan']} note: {n}")
            reviews = sum(r["status"] == "review" for r in rows)
            log(f"{len(rows)} head(s): {sum(r['status'] == 'ok' for r in rows)} ok, {reviews} review, "
                f"{sum(r['status'] not in ('ok', 'review') for r in rows)} other")

        # ---- process
        if "process" in sections and files:
            ours_w = [r["ours"]["wall_s"] for r in rounds if "ours" in r]
            hd_w = [r["hippodeep"]["wall_s"] for r in rounds if "hippodeep" in r]
            med_o, med_h = statistics.median(ours_w), statistics.median(hd_w)
            per_scan: dict[str, Any] = {}
            for h in files:
                o = [s["timings_s"].get("total") for r in rounds for s in (r["ours"].get("summary") or {}).get("scans", [])
                     if s["name"] == h.name and s.get("timings_s")]
                d = [r["hippodeep"]["files"].get(h.name + h.suffix, {}).get("seconds") for r in rounds]
                o, d = [x for x in o if x is not None], [x for x in d if x is not None]
                per_scan[h.label] = {"ours_s": statistics.median(o) if o else None,
                                     "hippodeep_s": statistics.median(d) if d else None}
            sum_o = sum(v["ours_s"] or 0.0 for v in per_scan.values())
            sum_h = sum(v["hippodeep_s"] or 0.0 for v in per_scan.values())
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch"], check=True, env=ENV)
            imports = {"import_torch_s": time.perf_counter() - t}
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import hydra, omegaconf, hippo.wholehead.run"], check=True, env=ENV)
            imports["import_hydra_and_wholehead_s"] = time.perf_counter() - t
            proc = {"n_scans": len(files), "rounds": [{"order": r["order"], **{w: _slim(r[w]) for w in ("ours", "hippodeep") if w in r}}
                                                      for r in rounds],
                    "ours_wall_s": ours_w, "hippodeep_wall_s": hd_w, "ours_median_s": med_o, "hippodeep_median_s": med_h,
                    "ratio": med_o / med_h, "ratio_per_round": [o / d for o, d in zip(ours_w, hd_w)],
                    "met": med_o <= med_h, "per_scan_median_s": per_scan,
                    "ours_outside_scans_s": med_o - sum_o if sum_o <= med_o else None,
                    "ours_scans_overlap": sum_o > med_o, "hippodeep_outside_scans_s": med_h - sum_h,
                    "imports": imports}
            result["process"] = proc
            log(f"\n== whole process over the folder of {len(files)} NIfTI/MGZ heads, {len(rounds)} round(s) interleaved: "
                f"`python -m hippo.predict input=FOLDER workers={args.workers}` against `hippodeep.py FILE ...`")
            log("| round | order | ours s | hippodeep s | ours / hippodeep | load (1 min) before ours / hd | "
                "others' CPU (cores) during ours / hd |")
            log("|---:|---|---:|---:|---:|---:|---:|")
            for i, r in enumerate(rounds):
                o, d = r["ours"], r["hippodeep"]
                log(f"| {i + 1} | {' then '.join(r['order'])} | {o['wall_s']:.1f} | {d['wall_s']:.1f} | "
                    f"{o['wall_s'] / d['wall_s']:.2f} | {o['load1_before']:.2f} / {d['load1_before']:.2f} | "
                    f"{_f(o['others_cores'], '.2f')} / {_f(d['others_cores'], '.2f')} |")
            log(f"median: ours {med_o:.1f} s ({med_o / len(files):.1f} s per scan), hippodeep {med_h:.1f} s "
                f"({med_h / len(files):.1f} s per scan): ours / hippodeep = {med_o / med_h:.2f} -> criterion "
                f"'no slower than hippodeep' {'MET' if med_o <= med_h else 'NOT MET'}")
            if args.workers <= 1 and sum_o > med_o:
                log("(ours prepares the next scan -- read, register -- while it measures one, so the scans' own "
                    "times overlap: each includes the time it shared the cores with its neighbour, and their sum "
                    "exceeds the whole run)")
            log("| scan | ours, the scan inside the process (s) | hippodeep, its per-subject time (s) | ratio |")
            log("|---|---:|---:|---:|")
            for sname, v in per_scan.items():
                ratio = v["ours_s"] / v["hippodeep_s"] if v["ours_s"] and v["hippodeep_s"] else None
                log(f"| {sname} | {_f(v['ours_s'], '.1f')} | {_f(v['hippodeep_s'], '.1f')} | {_f(ratio, '.2f')} |")
            outside = (f"ours {med_o - sum_o:.1f} s, " if sum_o <= med_o else
                       "ours not separable (the scans overlap), ")
            log(f"outside the scans (start-up, imports, model load, group outputs): {outside}"
                f"hippodeep {med_h - sum_h:.1f} s; fresh interpreter: import torch {imports['import_torch_s']:.1f} s, "
                f"hydra + hippo.wholehead {imports['import_hydra_and_wholehead_s']:.1f} s")
            for name, run in dicom_hd.get("runs", {}).items():
                dep = deploys[name]
                dp = {"deploy_wall_s": dep["wall_s"], "hippodeep_wall_s": run["wall_s"],
                      "ratio": dep["wall_s"] / run["wall_s"], "conversion_s": conversions.get(name),
                      "deploy": _slim(dep), "hippodeep": _slim(run)}
                proc.setdefault("dicom", {})[name] = dp
                log(f"DICOM {name} (once; deploy also decodes the DICOM and writes SC/SEG/SR): hippo.deploy "
                    f"{dep['wall_s']:.1f} s, hippodeep on the converted NIfTI {run['wall_s']:.1f} s "
                    f"(ratio {dp['ratio']:.2f}; our conversion {conversions.get(name, 0):.1f} s not counted); "
                    f"load before {dep['load1_before']:.2f} / {run['load1_before']:.2f}, others' CPU "
                    f"{_f(dep['others_cores'], '.2f')} / {_f(run['others_cores'], '.2f')} cores")
        elif rounds:
            result["rounds"] = [{"order": r["order"], **{w: _slim(r[w]) for w in ("ours", "hippodeep") if w in r}}
                                for r in rounds]

        # ---- stages
        if "stages" in sections and rounds and files:
            stages: dict[str, dict[str, float]] = {}
            for h in files:
                runs = [s["timings_s"] for r in rounds for s in (r.get("ours", {}).get("summary") or {}).get("scans", [])
                        if s["name"] == h.name and s.get("timings_s")]
                if runs:
                    stages[h.label] = {k: statistics.median(t.get(k, 0.0) for t in runs) for k in STAGES
                                       if any(k in t for t in runs)}
            result["stages"] = stages
            cols = [k for k in STAGES if any(k in v for v in stages.values())]
            log(f"\n== our stages per scan, seconds (median of {len(rounds)} round(s), inside hippo.predict)")
            log("| scan | " + " | ".join(cols) + " |")
            log("|---|" + "---:|" * len(cols))
            for sname, st in stages.items():
                log(f"| {sname} | " + " | ".join(f"{st.get(k, 0.0):.2f}" for k in cols) + " |")

        # ---- variants
        if "variants" in sections and files:
            log(f"\n== variants in-process (median of {args.repeat} after a warm-up; model loaded once per variant)")
            meter = CpuMeter()
            var = variants_section(files, args.repeat, work)
            result["variants"] = var
            result["variants_cpu"] = meter.read()
            base = next(iter(var.values()))["scans"]
            base_t = statistics.mean(s["total_s"] for s in base.values())
            for vname, v in var.items():
                mean_t = statistics.mean(s["total_s"] for s in v["scans"].values())
                dv = max(abs(a / b - 1) for sname, s in v["scans"].items()
                         for a, b in zip(s["volumes_mm3"], base[sname]["volumes_mm3"]))
                log(f"  {vname}: {mean_t:.2f} s per scan = {mean_t / base_t:.2f}x the default; "
                    f"largest volume change {100 * dv:.1f} %")

    # ---- load
    others = [r[w]["others_cores"] for r in rounds for w in ("ours", "hippodeep") if w in r and r[w]["others_cores"] is not None]
    others += [run["others_cores"] for run in list(deploys.values()) + list(dicom_hd.get("runs", {}).values())
               if run.get("others_cores") is not None]
    loads = [r[w]["load1_before"] for r in rounds for w in ("ours", "hippodeep") if w in r]
    shared = load_start[0] > SHARED_LOAD or max(others, default=0.0) > SHARED_OTHERS_CORES
    result["load"] = {"loadavg_start": load_start, "load1_before_runs": loads, "others_cores_runs": others,
                      "others_cores_max": max(others, default=None), "shared_machine": shared}
    result["runtime_s"] = time.perf_counter() - t_start
    result["failures"] = failures
    log(f"\nload average (1 min) at start {load_start[0]:.2f} on {os.cpu_count()} cores"
        + (f", before each run {min(loads):.2f}-{max(loads):.2f}" if loads else "")
        + (f"; other processes' CPU use during the runs {min(others):.2f}-{max(others):.2f} cores" if others else ""))
    if shared:
        log("SHARED MACHINE: other jobs ran meanwhile; the times above are inflated and noisy "
            "(the interleaving spreads the load over both tools alike)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for f in failures:
        log(f"FAILED: {f}")
    log(f"written {args.out} ({result['runtime_s']:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
