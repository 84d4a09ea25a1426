"""Simulated atrophy with an analytic truth: how well does each mode recover a known change?

    nice .venv/bin/python benchmarks/bench_atrophy.py [--scans ../shared/data/wholehead]
        [--only fs_subject chris example] [--changes -1 -2 -5] [--rescans 3] [--seed 0]
        [--out outputs/benchmarks/atrophy.json]

Per real head (``fs_subject/norm.mgz``: the zone from FreeSurfer's labels 17 / 53 in
``aparc.a2009s+aseg.mgz``; the others: from our own segmentation of the stored scan), both
hippocampi are contracted uniformly (:func:`hippo.wholehead.atrophy.simulate_atrophy`: the image
intensities warped by a scaling about each hippocampus' centre inside an ellipsoid holding the whole
structure with 5 mm to spare, fading smoothly to the identity over 12 mm). Every volume inside
changes by exactly ``s³ - 1``: the truth is the requested change, whatever the label protocol.

Two follow-up variants per change:

* ``same_grid``: the atrophied image on the stored grid, nothing else changed;
* ``reacquired``: the atrophied head also re-acquired (``benchmarks/bench_rescan.py``'s
  ``reacquire``: moved rigidly up to 8 degrees and 8 mm, a new voxel grid, Rician noise 2 %, a
  ±10 % bias field), seeded per head and change.

Each follow-up is measured by both modes against the stored scan:

* ``independent``: two runs of :func:`hippo.wholehead.segment.segment_wholehead` (as
  ``hippo.predict`` does), volumes on each scan's own grid;
* ``paired``: :func:`hippo.wholehead.longitudinal.paired_change` (halfway-space rigid pair, one crop
  for both), the change by the Jacobian of a deformable registration of the two crops over the
  segmentation; ``paired_labels``: the same pair's label counts; ``paired_soft``: its summed class
  probabilities (``DEFAULT_METHOD`` picks which one the shipped paired mode reports).

``--rescans K`` re-acquisitions of the unchanged head (truth 0 %) give each mode's within-head
differences: ``MDC95 = 1.96 x sqrt(2) x SEM`` with ``SEM = RMS(d) / sqrt(2)`` (``d``: the change of a
re-acquisition against the stored scan, truth 0), i.e. ``1.96 x RMS(d)``, per side and mode.

Per mode and side: bias (mean of measured - truth, percentage points), slope (least squares of
measured on truth through the atrophy conditions and the unchanged pair), worst error; and whether
every side is within ±0.5 pp at -2 % and -5 %. Fixed seeds. JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCANS = REPO.parent / "shared/data/wholehead"
DEFAULT_OUT = REPO / "outputs/benchmarks/atrophy.json"
HEADS = {"fs_subject": "fs_subject/norm.mgz", "chris": "chris_t1.nii.gz", "example": "example_brain_t1.nii.gz",
         "studyforrest": "studyforrest_t1.nii.gz"}
FS_LABELS = {"left": 17, "right": 53}
MODES = ("independent", "paired", "paired_labels", "paired_soft")
SIDES = ("left", "right")


def log(msg: str = "") -> None:
    print(msg, flush=True)


def _reacquire():
    """``bench_rescan.reacquire`` and ``brain_mask`` (the same simulation as the re-acquisition
    benchmark), or this package's simpler one when that script is missing."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from bench_rescan import brain_mask, reacquire  # type: ignore

        def run(array, affine, registration, rng):
            brain = brain_mask(array, affine, registration)
            img, aff, params = reacquire(array, affine, brain, rng, max_deg=8.0, max_mm=8.0, noise=0.02, bias=0.10)
            return img, aff, dict(params, simulation="bench_rescan.reacquire")
        return run
    except ImportError:
        from hippo.wholehead.atrophy import simulate_reacquisition

        def run(array, affine, registration, rng):
            img, motion = simulate_reacquisition(array, affine, rng, max_angle_deg=4.0, max_shift_mm=4.0)
            return img, affine, {"simulation": "hippo.wholehead.atrophy.simulate_reacquisition",
                                 "motion": np.round(motion, 4).tolist()}
        return run


def measure_pair(base_arr, base_aff, base_res, arr, aff, agent, locator, seg_kw) -> dict[str, Any]:
    from hippo.wholehead.longitudinal import paired_change
    from hippo.wholehead.segment import segment_wholehead

    t = time.perf_counter()
    fol = segment_wholehead(arr, aff, agent, locator=locator, **seg_kw)
    t_ind = time.perf_counter() - t
    t = time.perf_counter()
    pr = paired_change((base_arr, base_aff), (arr, aff), agent, earlier_result=base_res, later_result=fol)
    t_pair = time.perf_counter() - t
    out: dict[str, Any] = {"seconds": {"independent_followup": round(t_ind, 2), "paired": round(t_pair, 2)},
                           "followup_review": list(fol.review), "paired_detail": pr.as_dict()}
    for side in SIDES:
        out[side] = {"independent": pr.independent_change_percent(side),
                     "paired": pr.side(side).change_percent("total", method="jacobian"),
                     "paired_labels": pr.side(side).change_percent("total", method="labels"),
                     "paired_soft": pr.side(side).change_percent("total", method="soft"),
                     "centre_gap_mm": pr.side(side).centre_gap_mm}
    return out, fol


def summarise(conditions: list[dict[str, Any]], rescans: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        out[mode] = {}
        for side in SIDES:
            rows = [(c["truth_percent"], c[side][mode]) for c in conditions if c[side][mode] is not None]
            zero = [r[side][mode] for r in rescans if r[side][mode] is not None]
            entry: dict[str, Any] = {"n": len(rows)}
            if rows:
                err = np.array([m - t for t, m in rows])
                entry["bias_pp"] = round(float(err.mean()), 3)
                entry["worst_error_pp"] = round(float(err[np.argmax(np.abs(err))]), 3)
                by = {}
                for t, m in rows:
                    by.setdefault(t, []).append(m - t)
                entry["error_pp_by_truth"] = {f"{t:g}": [round(e, 3) for e in v] for t, v in sorted(by.items())}
                xs = [t for t, _ in rows] + [0.0] * len(zero)
                ys = [m for _, m in rows] + zero
                if len(set(xs)) >= 2:
                    slope, icept = np.polyfit(xs, ys, 1)
                    entry["slope"] = round(float(slope), 4)
                    entry["intercept_pp"] = round(float(icept), 3)
                within = [abs(m - t) <= 0.5 for t, m in rows if t in (-2.0, -5.0)]
                entry["within_0.5pp_at_-2_and_-5"] = bool(within) and all(within)
            if zero:
                d = np.asarray(zero)
                rms = float(np.sqrt((d ** 2).mean()))
                entry["rescan"] = {"n": len(zero), "mean_pp": round(float(d.mean()), 3),
                                   "sd_pp": round(float(d.std(ddof=1)), 3) if len(zero) > 1 else None,
                                   "rms_pp": round(rms, 3), "sem_percent": round(rms / np.sqrt(2), 3),
                                   "mdc95_percent": round(1.96 * rms, 3), "worst_pp": round(float(d[np.argmax(np.abs(d))]), 3)}
            out[mode][side] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scans", type=Path, default=DEFAULT_SCANS)
    ap.add_argument("--only", nargs="*", default=["fs_subject", "chris", "example"])
    ap.add_argument("--changes", nargs="*", type=float, default=[-5.0, -2.0],
                    help="volume changes (%%) simulated on the stored grid")
    ap.add_argument("--late-changes", nargs="*", type=float, default=[-1.0],
                    help="more such changes, run after the re-acquisitions")
    ap.add_argument("--reacquired", nargs="*", type=float, default=[-5.0, -2.0],
                    help="volume changes (%%) simulated and then re-acquired")
    ap.add_argument("--precision", default="float32", help="float32 (bfloat16 is emulated, ~35x slower, on CPUs "
                                                            "without AVX512-BF16)")
    ap.add_argument("--merge", nargs="*", type=Path, default=None,
                    help="only merge these per-head JSON files (from --only runs) into --out")
    ap.add_argument("--write-limits", type=Path, default=None,
                    help="also write the MDC figures with their provenance (src/hippo/weights/<model>.change.json)")
    ap.add_argument("--rescans", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.merge:
        report = merge(args.merge, args.out)
        if args.write_limits:
            write_limits(report, args.write_limits)
        return 0

    import torch
    import yaml

    from hippo import __version__
    from hippo.infer import InferenceAgent
    from hippo.scan_io import read_scan
    from hippo.weights import resolve_model_path
    from hippo.wholehead.atrophy import atrophy_zone, simulate_atrophy
    from hippo.wholehead.register import RegistrationSettings
    from hippo.wholehead.segment import locator_agent, segment_wholehead

    torch.set_num_threads(1)
    cfg = yaml.safe_load((REPO / "conf/predict.yaml").read_text())
    seg_kw = {"settings": RegistrationSettings.from_mapping(cfg.get("registration") or {}),
              "refine_passes": cfg.get("refine_passes", 1), "settle_mm": cfg.get("settle_mm", 2.0),
              "extra_passes": cfg.get("extra_passes", 2)}
    model = resolve_model_path(args.model, REPO / "outputs")
    agent = InferenceAgent.from_file(model, precision=args.precision)
    locator = locator_agent(agent)
    reacq = _reacquire()
    report: dict[str, Any] = {
        "benchmark": "bench_atrophy", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hippo_version": __version__, "model": str(model), "model_created": agent.metadata.get("created"),
        "precision": args.precision, "seed": args.seed, "machine": platform.node(),
        "zone": {"margin_mm": 5.0, "fade_mm": 12.0, "interpolation": "cubic B-spline"}, "heads": {}}
    conditions: list[dict[str, Any]] = []
    rescans: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for name in args.only:
        path = args.scans / HEADS[name]
        if not path.exists():
            log(f"{name}: {path} missing, skipped")
            continue
        scan = read_scan(path)
        arr, aff = np.asarray(scan.array, np.float32), np.asarray(scan.affine, np.float64)
        t = time.perf_counter()
        base = segment_wholehead(arr, aff, agent, locator=locator, **seg_kw)
        head: dict[str, Any] = {"path": str(path), "stored": {s: base.side(s).volumes.total_mm3 for s in SIDES},
                                "stored_review": list(base.review), "conditions": [], "rescans": []}
        if name == "fs_subject":
            lab = read_scan(path.parent / "aparc.a2009s+aseg.mgz", refuse_label_maps=False)
            masks = {s: np.rint(lab.array) == v for s, v in FS_LABELS.items()}
            head["zone_from"] = "FreeSurfer aseg labels 17 / 53"
        else:
            masks = {s: base.side(s).labels > 0 for s in SIDES}
            head["zone_from"] = "our segmentation of the stored scan"
        # the widest zone whose two fade bands do not meet (FreeSurfer's labels give fat ellipsoids);
        # failing all, the same with our own masks
        sources = [(head["zone_from"], masks)]
        if name == "fs_subject":
            sources.append(("our segmentation of the stored scan", {s: base.side(s).labels > 0 for s in SIDES}))
        zones, tried = None, []
        if not (args.changes or args.reacquired or args.late_changes):  # re-acquisitions only: no zones
            sources = []
            zones = []
            head["zone_from"] = None
        for label, mk in sources:
            for margin, fade in ((5.0, 12.0), (3.0, 8.0), (2.0, 6.0)):
                cand = [atrophy_zone(mk[s], aff, margin_mm=margin, fade_mm=fade) for s in SIDES]
                try:
                    simulate_atrophy(arr, aff, cand, -0.01)
                except ValueError:
                    tried.append(f"{label}, margin {margin:g} mm, fade {fade:g} mm: the zones overlap")
                    continue
                zones = cand
                head["zone_from"], head["zone_margin_fade_mm"] = label, [margin, fade]
                break
            if zones is not None:
                break
        head["zones_refused"] = tried
        if zones is None:
            log(f"{name}: no non-overlapping atrophy zones ({'; '.join(tried)}), skipped")
            continue
        if tried:
            log(f"  zones: {head['zone_from']}, margin/fade {head['zone_margin_fade_mm']} mm ({len(tried)} wider refused)")
        head["zones"] = {s: z.as_dict() for s, z in zip(SIDES, zones)}
        log(f"{name}: stored L {base.left.volumes.total_mm3:.0f} R {base.right.volumes.total_mm3:.0f} mm³ "
            f"({time.perf_counter() - t:.1f} s){' REVIEW' if base.review else ''}")
        def rescan(k: int) -> None:
            rng = np.random.default_rng([args.seed, zlib.crc32(name.encode()), 0, k + 2])
            img, img_aff, params = reacq(arr, aff, base.registration, rng)
            t = time.perf_counter()
            res, _ = measure_pair(arr, aff, base, img, img_aff, agent, locator, seg_kw)
            r = {"head": name, "truth_percent": 0.0, "variant": f"rescan {k + 1}", "parameters": params, **res}
            rescans.append(r)
            head["rescans"].append(r)
            log(f"  rescan {k + 1}: " + "  ".join(
                f"{s[0].upper()} ind {res[s]['independent']:+.2f} jac {res[s]['paired']:+.2f} "
                f"lab {res[s]['paired_labels']:+.2f} soft {res[s]['paired_soft']:+.2f}" for s in SIDES) + f"  ({time.perf_counter() - t:.1f} s)")
        plan = [(c, "same_grid") for c in args.changes] + [(c, "reacquired") for c in args.reacquired] + \
            [(None, k) for k in range(args.rescans)] + [(c, "same_grid") for c in args.late_changes]
        cache: dict[float, np.ndarray] = {}
        for change, variant in plan:
            if change is None:
                rescan(variant)
                continue
            if change not in cache:
                cache[change] = simulate_atrophy(arr, aff, zones, change / 100.0)
            atrophied = cache[change]
            rng = np.random.default_rng([args.seed, zlib.crc32(name.encode()), int(round(-change * 100)), 1])
            params: dict[str, Any] = {}
            img, img_aff = atrophied, aff
            if variant == "reacquired":
                img, img_aff, params = reacq(atrophied, aff, base.registration, rng)
            t = time.perf_counter()
            res, _ = measure_pair(arr, aff, base, img, img_aff, agent, locator, seg_kw)
            cond = {"head": name, "truth_percent": change, "variant": variant, "parameters": params, **res}
            conditions.append(cond)
            head["conditions"].append(cond)
            log(f"  {change:+g} % {variant:10s}: " + "  ".join(
                f"{s[0].upper()} ind {res[s]['independent']:+.2f} jac {res[s]['paired']:+.2f} "
                f"lab {res[s]['paired_labels']:+.2f} soft {res[s]['paired_soft']:+.2f}" for s in SIDES) + f"  ({time.perf_counter() - t:.1f} s)")
        report["heads"][name] = head
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    finish(report, args.out)
    if args.write_limits:
        write_limits(report, args.write_limits)
    return 0


def finish(report: dict[str, Any], out: Path) -> None:
    """Summaries over every head (all conditions, and per variant), written to ``out``, printed."""
    conditions = [c for h in report["heads"].values() for c in h["conditions"]]
    rescans = [r for h in report["heads"].values() for r in h["rescans"]]
    report["summary"] = {"all": summarise(conditions, rescans)}
    for variant in sorted({c["variant"] for c in conditions}):
        report["summary"][variant] = summarise([c for c in conditions if c["variant"] == variant], rescans)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    log("")
    for mode in MODES:
        for side in SIDES:
            e = report["summary"]["all"][mode][side]
            rs = e.get("rescan", {})
            log(f"{mode:12s} {side:5s}: bias {e.get('bias_pp', float('nan')):+.2f} pp, slope {e.get('slope', float('nan')):.3f}, "
                f"worst {e.get('worst_error_pp', float('nan')):+.2f} pp, within ±0.5 pp at -2/-5: "
                f"{e.get('within_0.5pp_at_-2_and_-5')}, MDC95 {rs.get('mdc95_percent', float('nan')):.2f} % (n={rs.get('n', 0)})")
    log(f"-> {out} ({report.get('seconds', 0):.0f} s)")


_LINE = re.compile(r"^\s+(?:(?P<change>[+-][\d.]+) % (?P<variant>same_grid|reacquired)\s*|rescan (?P<k>\d+)):\s+"
                   r"L ind (?P<Li>\S+) jac (?P<Lj>\S+) lab (?P<Ll>\S+) soft (?P<Ls>\S+)\s+"
                   r"R ind (?P<Ri>\S+) jac (?P<Rj>\S+) lab (?P<Rl>\S+) soft (?P<Rs>\S+)")


def parse_log(path: Path) -> dict[str, Any]:
    """A per-head report rebuilt from a run's printed lines (a run stopped before writing its JSON:
    the figures per condition and side, without the details)."""
    lines = Path(path).read_text().splitlines()
    name = lines[0].split(":")[0]
    head: dict[str, Any] = {"path": None, "from_log": str(path), "conditions": [], "rescans": []}
    for ln in lines[1:]:
        m = _LINE.match(ln)
        if not m:
            continue
        entry: dict[str, Any] = {"head": name}
        for side, c in (("left", "L"), ("right", "R")):
            entry[side] = {"independent": float(m[c + "i"]), "paired": float(m[c + "j"]),
                           "paired_labels": float(m[c + "l"]), "paired_soft": float(m[c + "s"])}
        if m["k"]:
            entry.update(truth_percent=0.0, variant=f"rescan {m['k']}")
            head["rescans"].append(entry)
        else:
            entry.update(truth_percent=float(m["change"]), variant=m["variant"])
            head["conditions"].append(entry)
    return {"heads": {name: head}}


def merge(files: list[Path], out: Path) -> int:
    """One report from per-head runs (``--only NAME --out FILE`` each, same seed and model; a ``.log``
    file of a run stopped early is read with :func:`parse_log`)."""
    parts = []
    for f in files:  # FILE.log:rescans takes only a log's re-acquisitions (its atrophy runs superseded)
        name, sep, only = str(f).partition(".log:")
        if not sep:
            name = str(f).removesuffix(".log")
        if str(f).endswith(".log") or sep:
            part = parse_log(Path(name + ".log"))
            if only == "rescans":
                for h in part["heads"].values():
                    h["conditions"] = []
            parts.append(part)
        else:
            parts.append(json.loads(Path(f).read_text()))
    # the same head from several files: conditions and rescans pooled
    heads: dict[str, Any] = {}
    for p in parts:
        for k, v in p["heads"].items():
            if k in heads:
                heads[k] = dict(heads[k], conditions=heads[k]["conditions"] + v["conditions"],
                                rescans=heads[k]["rescans"] + v["rescans"])
            else:
                heads[k] = v
    parts.sort(key=lambda p: "created" not in p)  # a full report first: its settings head the merge
    report = {k: v for k, v in parts[0].items() if k not in ("heads", "summary", "seconds")}
    report["heads"] = heads
    report["seconds"] = round(sum(p.get("seconds", 0) for p in parts), 1)
    report["merged_from"] = [str(f) for f in files]
    finish(report, out)
    return report


def write_limits(report: dict[str, Any], path: Path) -> None:
    """The MDC95 per mode and side from the re-acquisitions (``hippo.change.load_change_limits`` reads
    it), with provenance, and the atrophy accuracy beside it."""
    summary = report["summary"]["all"]
    heads = sorted(report["heads"])
    sim = {r.get("parameters", {}).get("simulation") for h in report["heads"].values() for r in h["rescans"]} - {None}
    out: dict[str, Any] = {
        "what": ("Minimal detectable change at 95 % (MDC95) of the hippocampal total volume change, per side, for the "
                 "paired longitudinal mode (hippo.wholehead.longitudinal) and for two independent whole-head runs"),
        "definition": ("MDC95 = 1.96 x sqrt(2) x SEM; SEM = RMS(d) / sqrt(2), d = the change (% of the earlier volume) "
                       "measured between a real head and a simulated re-acquisition of it (truth 0 %)"),
        "mdc95_percent": {}, "provenance": {}, "accuracy_on_simulated_atrophy": {}}
    from hippo.wholehead.longitudinal import DEFAULT_METHOD

    paired_mode = {"soft": "paired_soft", "labels": "paired_labels", "jacobian": "paired"}[DEFAULT_METHOD]
    out["paired_method"] = DEFAULT_METHOD
    for key, mode in (("paired", paired_mode), ("independent", "independent")):
        out["mdc95_percent"][key] = {s: summary[mode][s]["rescan"]["mdc95_percent"] for s in SIDES}
        out["provenance"][key] = {
            "benchmark": "benchmarks/bench_atrophy.py --rescans (re-acquisitions: " + ", ".join(sorted(str(x) for x in sim))
                         + ": rigid move up to 8 deg / 8 mm, new voxel grid, Rician noise 2 %, bias field 10 %)",
            "date": report["created"][:10], "model": Path(report["model"]).name,
            "model_created": report.get("model_created"), "hippo_version": report["hippo_version"],
            "precision": report["precision"], "n": {s: summary[mode][s]["rescan"]["n"] for s in SIDES},
            "heads": heads, "seed": report["seed"], "benchmark_mode": mode}
        out["accuracy_on_simulated_atrophy"][key] = {
            s: {k: summary[mode][s].get(k) for k in ("n", "bias_pp", "slope", "worst_error_pp")} for s in SIDES}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    log(f"-> {path}")


if __name__ == "__main__":
    raise SystemExit(main())
