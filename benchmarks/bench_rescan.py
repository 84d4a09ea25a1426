"""Re-acquisition benchmark: how much do whole-head volumes move when the same head is scanned again?

    nice .venv/bin/python benchmarks/bench_rescan.py [--scans ../shared/data/wholehead] [--k 4] [--seed 0]
        [--max-deg 8] [--max-mm 8] [--noise 0.02] [--bias 0.10] [--only NAME ...] [--dicom]
        [--out outputs/benchmarks/rescan.json]

Every real head under ``--scans`` (NIfTI/MGZ found by :func:`hippo.scan_io.find_inputs`, label maps
skipped; with ``--dicom`` also every folder of ``.dcm`` files, read with
:func:`hippo.dicom.volume.load_series`) is measured as stored and ``--k`` times as a simulated
re-acquisition, each drawn from a generator seeded with ``--seed`` and the scan's name (the same
variants on every run):

* **moved**: a rigid turn about a random axis by an angle drawn uniformly up to ``--max-deg``
  degrees about the head's centre, and a shift in a random direction of length up to ``--max-mm``;
* **on a new voxel grid**: the same voxel size and shape, the grid's origin moved by a random
  fraction of a voxel along each axis, so no voxel of the new scan coincides with one of the old
  (cubic spline interpolation, clipped at 0);
* **Rician noise** of sigma ``--noise`` x the median intensity of the brain (the template's brain
  mask mapped into the stored scan by its own registration): ``sqrt((I + n1)^2 + n2^2)``;
* **smooth bias field**: ``I x (1 + b g)``, ``g`` a random second-order polynomial of the position
  scaled to ``[-1, 1]`` over the head's bounding box, ``b`` = ``--bias`` (±10 %).

Each is run through :func:`hippo.wholehead.segment.segment_wholehead` with the shipped model
(``--precision``, default ``auto`` as ``hippo.predict``: bfloat16 only where the hardware runs it
natively, else float32, see :func:`hippo.infer.resolve_precision`; the light locator, the defaults
of ``conf/predict.yaml``), exactly as ``hippo.predict`` does. Status: ``ok``, ``review`` (any review
reason) or ``failed`` (an exception). The volumes are the ones the product reports (the soft volume
on the crop grid, :class:`hippo.wholehead.segment.SideVolumes`); the label map's voxel counts on the
scan grid are kept beside them (``left_label_mm3``...) and summarised the same way (``label_map``).

Per head and side: CoV (SD / mean of the stored scan and its ``k`` re-acquisitions), the worst
difference of a re-acquisition from the stored scan (%), and how often the status differed from the
stored scan's. ``--out`` (JSON) keeps every volume, status and review reason, and the per-pair
differences (each re-acquisition minus the stored scan, and every pair of acquisitions, mm³ and %),
from which a minimal detectable change can be derived: the pooled within-head SD (the standard
error of measurement, SEM) and ``MDC95 = 1.96 x sqrt(2) x SEM`` are given per side, over the heads
whose stored scan is ``ok``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCANS = REPO.parent / "shared/data/wholehead"
DEFAULT_OUT = REPO / "outputs/benchmarks/rescan.json"


def log(msg: str = "") -> None:
    print(msg, flush=True)


def find_heads(root: Path, dicom: bool) -> dict[str, tuple[str, Path]]:
    """``{name: (kind, path)}`` of the heads under ``root`` (label maps and atlases skipped)."""
    from hippo.scan_io import NotAScanError, find_inputs, read_scan

    heads: dict[str, tuple[str, Path]] = {}
    for scan in find_inputs(root).scans:
        try:
            read_scan(scan.path)
        except NotAScanError:
            continue
        heads[scan.name] = ("file", Path(scan.path))
    if dicom:
        for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
            if any(folder.glob("*.dcm")):
                heads[folder.name] = ("dicom", folder)
    return heads


def load_head(kind: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if kind == "dicom":
        from hippo.dicom.volume import load_series

        s = load_series(sorted(path.glob("*.dcm")), workers=1)
        return np.asarray(s.array, np.float32), np.asarray(s.affine, np.float64)
    from hippo.scan_io import read_scan

    s = read_scan(path)
    return np.asarray(s.array), np.asarray(s.affine, np.float64)


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    return Rotation.from_rotvec(axis * np.radians(degrees)).as_matrix()


def brain_mask(array: np.ndarray, affine: np.ndarray, registration) -> np.ndarray:
    """The template's brain mask mapped into the scan through ``registration`` (nearest)."""
    from scipy import ndimage

    from hippo.wholehead.template import load_template

    t = load_template()
    # scan voxel -> scan mm -> MNI mm -> template voxel
    to_t = np.linalg.inv(t.affine) @ np.linalg.inv(registration.matrix) @ affine
    idx = np.indices(array.shape, dtype=np.float32).reshape(3, -1)
    coords = to_t[:3, :3].astype(np.float32) @ idx + to_t[:3, 3:4].astype(np.float32)
    inside = ndimage.map_coordinates(t.brain_mask.astype(np.float32), coords, order=0, mode="constant", cval=0.0)
    return inside.reshape(array.shape) > 0.5


def reacquire(array: np.ndarray, affine: np.ndarray, brain: np.ndarray, rng: np.random.Generator, *,
              max_deg: float, max_mm: float, noise: float, bias: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """One simulated re-acquisition (see the module docstring): ``(array, affine, parameters)``."""
    from scipy import ndimage

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    axis = rng.normal(size=3)
    degrees = float(rng.uniform(0.0, max_deg))
    rot = _rotation(axis, degrees)
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * float(rng.uniform(0.0, max_mm))
    grid_shift = rng.uniform(-0.5, 0.5, size=3)  # voxels
    idx = np.argwhere(brain)
    centre = affine[:3, :3] @ (idx.mean(0) if idx.size else (np.asarray(array.shape) - 1) / 2.0) + affine[:3, 3]
    # the head moves: new world point q shows what the old scan had at p = R^T (q - c - s) + c
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ grid_shift
    world_new = np.eye(4)
    world_new[:3, :3] = rot.T
    world_new[:3, 3] = centre - rot.T @ (centre + shift)
    m = np.linalg.inv(affine) @ world_new @ new_affine  # new voxel -> old voxel
    src = np.asarray(array, np.float32)
    moved = ndimage.affine_transform(src, m[:3, :3], m[:3, 3], order=3, mode="constant", cval=0.0)
    moved = np.clip(moved, 0.0, None)
    # bias field over the head's bounding box (in the new grid's voxel coordinates)
    head = moved > 0.1 * float(np.percentile(moved, 99.5))
    hidx = np.argwhere(head)
    lo, hi = (hidx.min(0), hidx.max(0)) if hidx.size else (np.zeros(3), np.asarray(moved.shape) - 1)
    axes = [np.linspace(-1.0, 1.0, n) if h > l else np.zeros(n)
            for n, l, h in zip(moved.shape, lo, hi)]
    for k in range(3):  # -1..1 over the head's extent, extended linearly outside
        n = moved.shape[k]
        span = max(float(hi[k] - lo[k]), 1.0)
        axes[k] = (np.arange(n) - (lo[k] + hi[k]) / 2.0) / (span / 2.0)
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [x, y, z, x * y, x * z, y * z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3]
    coef = rng.normal(size=len(terms))
    g = sum(c * t for c, t in zip(coef, terms))
    g = np.broadcast_to(g, moved.shape)
    g_head = g[head] if head.any() else g.ravel()
    g = (g - float(g_head.mean())) / max(float(np.abs(g_head - g_head.mean()).max()), 1e-6)
    field = np.clip(1.0 + bias * g, 1.0 - 2 * bias, 1.0 + 2 * bias).astype(np.float32)
    sigma = noise * float(np.median(src[brain])) if brain.any() else noise * float(np.median(src[src > 0]))
    n1 = rng.normal(0.0, sigma, size=moved.shape).astype(np.float32)
    n2 = rng.normal(0.0, sigma, size=moved.shape).astype(np.float32)
    out = np.sqrt((moved * field + n1) ** 2 + n2 ** 2).astype(np.float32)
    params = {"rotation_deg": round(degrees, 3), "rotation_axis": np.round(axis / np.linalg.norm(axis), 4).tolist(),
              "shift_mm": np.round(shift, 3).tolist(), "grid_shift_voxels": np.round(grid_shift, 3).tolist(),
              "noise_sigma": round(sigma, 4), "bias": bias, "spacing_mm": np.round(spacing, 4).tolist()}
    return out, new_affine, params


def measure(array, affine, agent, locator, rules, quality_rules, settings) -> dict[str, Any]:
    from hippo.wholehead.segment import segment_wholehead

    t = time.perf_counter()
    try:
        r = segment_wholehead(array, affine, agent, locator=locator, rules=rules, quality_rules=quality_rules,
                              settings=settings)
    except Exception as exc:  # noqa: BLE001 - a failure is a result here
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t}
    return {"status": "review" if r.review else "ok", "review": list(r.review),
            "left_mm3": r.left.volumes.total_mm3, "right_mm3": r.right.volumes.total_mm3,
            **{f"{side}_label_mm3": r.side(side).volumes.total_voxels * r.side(side).volumes.voxel_volume_mm3
               for side in ("left", "right")},
            "registration": {"score": r.registration.score, "determinant": r.registration.determinant},
            "seconds": time.perf_counter() - t, "_registration": r.registration}


def side_stats(values: list[float | None], stored: float | None) -> dict[str, Any]:
    v = [x for x in values if x is not None]
    out: dict[str, Any] = {"n": len(v)}
    if len(v) >= 2 and statistics.mean(v) > 0:
        out["cov_percent"] = 100.0 * statistics.stdev(v) / statistics.mean(v)
        out["sd_mm3"] = statistics.stdev(v)
    if stored:
        diffs = [100.0 * (x / stored - 1.0) for x in values[1:] if x is not None]
        if diffs:
            out["worst_diff_percent"] = max(diffs, key=abs)
    return out


def report(results: dict[str, Any], k: int) -> tuple[dict[str, Any], list[str]]:
    """Pooled within-head SD (SEM) and MDC95 per side over the heads whose stored scan is ``ok``, and
    the printed table."""
    # pooled within-head SD (SEM) and MDC95 per side, over heads whose stored scan is ok
    summary: dict[str, Any] = {}
    for side in ("left", "right"):
        ss, dof = 0.0, 0
        for entry in results.values():
            if entry["runs"][0]["status"] != "ok":
                continue
            v = [x for x in entry[side]["volumes_mm3"] if x is not None]
            if len(v) >= 2:
                mu = statistics.mean(v)
                ss += sum((x - mu) ** 2 for x in v)
                dof += len(v) - 1
        if dof:
            sem = (ss / dof) ** 0.5
            summary[side] = {"sem_mm3": sem, "mdc95_mm3": 1.96 * 2 ** 0.5 * sem, "dof": dof}

    lines = ["| head | stored status | L CoV % | L worst % | R CoV % | R worst % | status changed | rescan statuses "
             "| label map L / R CoV % |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for name, e in results.items():
        def f(side, key, d=None):
            v = (d if d is not None else e[side]).get(key)
            return "—" if v is None else f"{v:+.1f}" if key == "worst_diff_percent" else f"{v:.2f}"
        lm = " / ".join(f("", "cov_percent", e[side].get("label_map", {})) for side in ("left", "right"))
        lines.append(f"| {name} | {e['runs'][0]['status']} | {f('left', 'cov_percent')} | "
                     f"{f('left', 'worst_diff_percent')} | {f('right', 'cov_percent')} | "
                     f"{f('right', 'worst_diff_percent')} | {e['status_changes']}/{k} | "
                     f"{', '.join(r['status'] for r in e['runs'][1:])} | {lm} |")
    log("\n".join(lines))
    for side, s in summary.items():
        log(f"{side}: pooled within-head SD (SEM) {s['sem_mm3']:.0f} mm³, MDC95 = 1.96 x sqrt(2) x SEM = "
            f"{s['mdc95_mm3']:.0f} mm³ (dof {s['dof']}, heads whose stored scan is ok)")
    return summary, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scans", type=Path, default=DEFAULT_SCANS)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-deg", type=float, default=8.0)
    ap.add_argument("--max-mm", type=float, default=8.0)
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--bias", type=float, default=0.10)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--dicom", action="store_true", help="also every folder of .dcm files (hippo.dicom.volume)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="auto (as hippo.predict): bfloat16 only where the hardware runs it natively "
                         "(AVX-512 BF16/AMX, CUDA), else float32; bfloat16 emulated on a CPU without it is ~40x "
                         "slower (volumes within 0.2 %% of float32)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="no runs: merge the heads of these earlier --out files (e.g. heads run in parallel) into --out")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        results = {name: e for part in parts for name, e in part["heads"].items()}
        summary, lines = report(results, int(parts[0]["settings"]["k"]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {**parts[0]["settings"], "only": sorted(results),
                    "dicom": any(p["settings"].get("dicom") for p in parts)}
        args.out.write_text(json.dumps({"settings": settings, "merged_from": [str(p) for p in args.merge],
                                        "machine": parts[0].get("machine"),
                                        "seconds": sum(p.get("seconds", 0.0) for p in parts), "heads": results,
                                        "mdc": summary, "table": lines}, indent=1, default=float))
        log(f"wrote {args.out}")
        return 0

    import torch

    from hippo.infer import InferenceAgent
    from hippo.plausibility import PlausibilityRules
    from hippo.weights import resolve_model_path
    from hippo.wholehead.register import RegistrationSettings
    from hippo.wholehead.review import ReviewRules
    from hippo.wholehead.segment import locator_agent
    import yaml

    torch.set_num_threads(1)
    cfg = yaml.safe_load((REPO / "conf/predict.yaml").read_text())
    plaus = yaml.safe_load((REPO / "conf/plausibility/default.yaml").read_text()) or {}
    rules_cfg = {k: plaus[k] for k in ("anterior_mm3", "posterior_mm3", "total_mm3") if k in plaus}
    rules_cfg.update(cfg.get("review") or {})
    rules = ReviewRules.from_mapping(rules_cfg)
    quality_rules = PlausibilityRules.from_mapping(plaus)
    settings = RegistrationSettings.from_mapping(cfg.get("registration") or {})
    model = resolve_model_path(args.model, REPO / "outputs")
    agent = InferenceAgent.from_file(model, precision=args.precision)
    locator = locator_agent(agent)

    heads = find_heads(args.scans, args.dicom)
    if args.only:
        heads = {k: v for k, v in heads.items() if k in set(args.only)}
    if not heads:
        raise SystemExit(f"no heads under {args.scans}")
    log(f"{len(heads)} head(s) from {args.scans}, k={args.k}, seed={args.seed}: up to {args.max_deg:g} deg and "
        f"{args.max_mm:g} mm, Rician noise {100 * args.noise:g} % of the brain median, bias ±{100 * args.bias:g} %")
    results: dict[str, Any] = {}
    t_all = time.perf_counter()
    for name, (kind, path) in heads.items():
        array, affine = load_head(kind, path)
        stored = measure(array, affine, agent, locator, rules, quality_rules, settings)
        reg = stored.pop("_registration", None)
        runs = [dict(stored, variant="stored")]
        if reg is None:  # no registration to find the brain: the rescans use the whole head's median
            brain = np.asarray(array) > 0.1 * float(np.percentile(array, 99.5))
        else:
            brain = brain_mask(np.asarray(array), affine, reg)
        rng = np.random.default_rng([args.seed, zlib.crc32(name.encode())])
        for k in range(args.k):
            moved, moved_affine, params = reacquire(np.asarray(array), affine, brain, rng, max_deg=args.max_deg,
                                                    max_mm=args.max_mm, noise=args.noise, bias=args.bias)
            m = measure(moved, moved_affine, agent, locator, rules, quality_rules, settings)
            m.pop("_registration", None)
            runs.append(dict(m, variant=f"rescan {k + 1}", parameters=params))
        entry: dict[str, Any] = {"path": str(path), "runs": runs}
        for side in ("left", "right"):
            vals = [r.get(f"{side}_mm3") for r in runs]
            st = side_stats(vals, vals[0])
            pairs_stored = [None if v is None or vals[0] is None else v - vals[0] for v in vals[1:]]
            pairs_all = [{"a": i, "b": j, "diff_mm3": vals[j] - vals[i],
                          "diff_percent": 100.0 * (vals[j] - vals[i]) / ((vals[i] + vals[j]) / 2.0)}
                         for i, j in itertools.combinations(range(len(vals)), 2)
                         if vals[i] is not None and vals[j] is not None and vals[i] + vals[j] > 0]
            labels = [r.get(f"{side}_label_mm3") for r in runs]
            entry[side] = {**st, "volumes_mm3": vals, "diff_from_stored_mm3": pairs_stored, "pairs": pairs_all,
                           "label_map": {**side_stats(labels, labels[0]), "volumes_mm3": labels}}
        entry["status_changes"] = sum(r["status"] != runs[0]["status"] for r in runs[1:])
        results[name] = entry
        log(f"  {name}: stored {runs[0]['status']}, "
            + ", ".join(f"{r['variant']}: {r['status']} {r.get('left_mm3', 0):.0f}/{r.get('right_mm3', 0):.0f}"
                        for r in runs) + f" ({time.perf_counter() - t_all:.0f} s)")

    summary, lines = report(results, args.k)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "precision_resolved": agent.precision},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "seconds": time.perf_counter() - t_all, "heads": results, "mdc": summary, "table": lines,
    }, indent=1, default=float))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
