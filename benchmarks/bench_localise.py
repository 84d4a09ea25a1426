"""Localisation benchmark: does the registration put each crop on the hippocampus, for any head?

    nice .venv/bin/python benchmarks/bench_localise.py [--scans ../shared/data/wholehead]
        [--hippodeep ../shared/tools/hippodeep/hippodeep.py] [--work /tmp/hippo-localise]
        [--variants stored,neck,lia256,...] [--only NAME ...] [--segment] [--out outputs/benchmarks/localise.json]

Every real head under ``--scans`` (NIfTI/MGZ; with ``--dicom`` also DICOM folders) and test
variants of it made here, each with a known world transform so the reference centroids move with it:

* ``stored``: as it is;
* ``neck``: the field of view extended 100 mm downwards with a synthetic neck and shoulders
  (tissue-like intensity with noise; an ellipse under the head that widens into shoulders);
* ``lia256``: FreeSurfer's conformed space: 256³ at 1 mm, LIA voxel order, centred on the scan's
  centre, intensities scaled to uint8 (0-255 at the 99.9th percentile);
* ``fov_cut``: the top 25 mm of the head and everything more than 120 mm below its top removed
  (a tight field of view);
* ``oblique20``: the head turned 20° about an oblique axis inside a grid padded so nothing is cut;
* ``mm2``: resampled to 2 mm; ``mm05``: resampled to 0.5 mm over the central 160 mm cube only;
* ``uint8``: stored as uint8 (0-255); ``bits12``: as 12-bit integers (0-4095);
* ``offcentre``: a 320 mm field of view with the head in one corner.

Reference hippocampus centroids: FreeSurfer's labels 17/53 for ``fs_subject``; for the other heads,
with ``--hippodeep PATH``, hippodeep's masks (run once per head on copies in ``--work``; masks kept
there between runs). A head without either is skipped for the distances.

Per head and variant: the registration's crop centre (the MNI hippocampus centroid mapped into the
scan) against the reference centroid (mm) per side, the registration's seconds, its score, and with
``--segment`` the full path (shipped model): final crop centre error, volumes, status, review reasons.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCANS = REPO.parent / "shared/data/wholehead"
DEFAULT_OUT = REPO / "outputs/benchmarks/localise.json"
VARIANTS = ("stored", "neck", "lia256", "fov_cut", "oblique20", "mm2", "mm05", "uint8", "bits12", "offcentre")


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ variants


def resample(array: np.ndarray, affine: np.ndarray, new_affine: np.ndarray, new_shape, world: np.ndarray | None = None,
             order: int = 1) -> np.ndarray:
    """``array`` seen on a new grid after the world moved by ``world`` (4x4, old mm -> new mm)."""
    from scipy import ndimage

    w = np.eye(4) if world is None else world
    m = np.linalg.inv(affine) @ np.linalg.inv(w) @ new_affine
    return ndimage.affine_transform(np.asarray(array, np.float32), m[:3, :3], m[:3, 3], output_shape=tuple(new_shape),
                                    order=order, mode="constant", cval=0.0)


def head_box(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-space (RAS mm) bounding box of the head (voxels above 10 % of the 99.5th percentile)."""
    hi = float(np.percentile(array, 99.5))
    idx = np.argwhere(array > 0.1 * hi)
    w = idx @ affine[:3, :3].T + affine[:3, 3]
    return w.min(0), w.max(0)


def _grid(lo, hi, mm: float, codes: str = "RAS") -> tuple[np.ndarray, tuple[int, int, int]]:
    """An axis-aligned grid covering [lo, hi] (RAS mm) with ``mm`` voxels."""
    shape = tuple(int(np.ceil((h - l) / mm)) + 1 for l, h in zip(lo, hi))
    a = np.diag([mm, mm, mm, 1.0])
    a[:3, 3] = lo
    return a, shape  # type: ignore[return-value]


def make_variant(name: str, array: np.ndarray, affine: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(array, affine, world)``: the variant and the world transform (old RAS mm -> new)."""
    from scipy.spatial.transform import Rotation

    a = np.asarray(array, np.float32)
    eye = np.eye(4)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if name == "stored":
        return np.asarray(array), affine, eye
    if name in ("uint8", "bits12"):
        top = 255.0 if name == "uint8" else 4095.0
        hi = float(np.percentile(a, 99.9))
        scaled = np.clip(np.round(a / hi * top), 0, top)
        return scaled.astype(np.uint8 if name == "uint8" else np.int16), affine, eye
    lo, hi = head_box(a, affine)
    if name == "neck":
        # extend the field of view 100 mm down; fill under the head with a neck that widens into shoulders
        new_lo = np.array([min(lo[0] - 120, -180), lo[1] - 10, lo[2] - 100])
        new_hi = np.array([max(hi[0] + 120, 180), hi[1] + 10, hi[2] + 5])
        new_aff, shape = _grid(new_lo, new_hi, float(spacing.min()))
        out = resample(a, affine, new_aff, shape)
        idx = np.indices(shape, dtype=np.float32)
        w = [new_aff[k, k] * idx[k] + new_aff[k, 3] for k in range(3)]
        cx, cy = (lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2 - 10
        depth = (lo[2] + 20) - w[2]  # mm below the head's lowest 20 mm
        rx = np.where(depth < 60, 55.0, 55.0 + (depth - 60) * 3.0).clip(max=190)
        ry = np.where(depth < 60, 60.0, 60.0 + (depth - 60) * 0.5).clip(max=85)
        neck = (depth > 0) & (((w[0] - cx) / rx) ** 2 + ((w[1] - cy) / ry) ** 2 <= 1.0)
        tissue = float(np.percentile(a[a > 0.1 * float(np.percentile(a, 99.5))], 40))
        noise = rng.normal(1.0, 0.15, size=out.shape).astype(np.float32)
        fill = neck & (out < 0.1 * float(np.percentile(a, 99.5)))
        out[fill] = tissue * noise[fill]
        return out, new_aff, eye
    if name == "lia256":
        c = affine[:3, :3] @ ((np.asarray(a.shape) - 1) / 2.0) + affine[:3, 3]
        lia = np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], float)  # voxel axes: L, I, A
        new_aff = np.eye(4)
        new_aff[:3, :3] = lia
        new_aff[:3, 3] = c - lia @ np.full(3, 127.5)
        out = resample(a, affine, new_aff, (256, 256, 256))
        top = float(np.percentile(out[out > 0], 99.9)) if (out > 0).any() else 1.0
        return np.clip(np.round(out / top * 255), 0, 255).astype(np.uint8), new_aff, eye
    if name == "fov_cut":
        new_lo = np.array([lo[0] - 5, lo[1] - 5, hi[2] - 120])
        new_hi = np.array([hi[0] + 5, hi[1] + 5, hi[2] - 25])
        new_aff, shape = _grid(new_lo, new_hi, float(spacing.min()))
        return resample(a, affine, new_aff, shape), new_aff, eye
    if name == "oblique20":
        axis = np.array([1.0, 0.6, 0.4])
        rot = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(20)).as_matrix()
        c = (lo + hi) / 2
        world = np.eye(4)
        world[:3, :3] = rot
        world[:3, 3] = c - rot @ c
        r = np.linalg.norm(hi - lo) / 2 + 5
        new_aff, shape = _grid(c - r, c + r, float(spacing.min()))
        return resample(a, affine, new_aff, shape, world), new_aff, world
    if name == "mm2":
        new_aff, shape = _grid(lo - 5, hi + 5, 2.0)
        return resample(a, affine, new_aff, shape), new_aff, eye
    if name == "mm05":
        c = (lo + hi) / 2
        new_aff, shape = _grid(c - 80, c + 80, 0.5)
        return resample(a, affine, new_aff, shape), new_aff, eye
    if name == "offcentre":
        new_lo = lo - np.array([20.0, 20.0, 20.0])
        new_aff, shape = _grid(new_lo, new_lo + 320, float(max(1.0, spacing.min())))
        return resample(a, affine, new_aff, shape), new_aff, eye
    raise ValueError(f"unknown variant {name!r}")


# ------------------------------------------------------------------------------------------------ references


def _centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
    idx = np.argwhere(mask)
    return None if idx.size == 0 else affine[:3, :3] @ idx.mean(0) + affine[:3, 3]


def references(name: str, path: Path, array, affine, hippodeep: Path | None, work: Path
               ) -> tuple[str, dict[str, np.ndarray]] | None:
    """``(source, {"left": xyz, "right": xyz})`` in the stored scan's RAS mm, or None."""
    import nibabel as nib

    from hippo.scan_io import read_scan

    aseg = path.parent / "aparc.a2009s+aseg.mgz" if path.is_file() else None
    if aseg is not None and aseg.is_file():
        lab = read_scan(aseg, refuse_label_maps=False)
        out = {s: _centroid_mm(lab.array == v, lab.affine) for s, v in (("left", 17), ("right", 53))}
        if all(v is not None for v in out.values()):
            return "FreeSurfer", out  # type: ignore[return-value]
    if hippodeep is None:
        return None
    work.mkdir(parents=True, exist_ok=True)
    copy = work / f"{name}.nii.gz"
    masks = [work / f"{name}_mask_{s}.nii.gz" for s in "LR"]
    if not all(m.is_file() for m in masks):
        img = nib.Nifti1Image(np.asarray(array, np.float32), affine)
        img.set_qform(affine, code=1)  # hippodeep reads the qform
        img.set_sform(affine, code=1)
        nib.save(img, str(copy))
        r = subprocess.run([sys.executable, str(hippodeep), str(copy)], capture_output=True, text=True)
        if r.returncode != 0 or not all(m.is_file() for m in masks):
            log(f"  hippodeep failed on {name}: {r.stderr[-500:]}")
            return None
    out = {}
    for side, m in zip(("left", "right"), masks):
        img = nib.load(str(m))
        p = np.asarray(img.dataobj, np.float32)
        out[side] = _centroid_mm(p > 0.5 * max(float(p.max()), 1e-6), img.affine)
    return "hippodeep", out


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scans", type=Path, default=DEFAULT_SCANS)
    ap.add_argument("--hippodeep", type=Path, default=None, help="hippodeep.py: its masks give reference centroids")
    ap.add_argument("--work", type=Path, default=Path("/tmp/hippo-localise"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--dicom", action="store_true")
    ap.add_argument("--segment", action="store_true", help="also run the full path with the shipped model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=("bfloat16", "float32"), default="bfloat16",
                    help="bfloat16 as hippo.predict; float32 on CPUs without native bfloat16 (no AVX-512 BF16/AMX), "
                         "where bfloat16 runs emulated and is many times slower (volumes within 0.2 %%)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_rescan import find_heads, load_head  # noqa: E402

    from hippo.wholehead.register import register_to_template
    from hippo.wholehead.template import HIPPOCAMPUS_CENTROIDS_MNI

    agent = locator = None
    if args.segment:
        import torch

        from hippo.infer import InferenceAgent
        from hippo.weights import resolve_model_path
        from hippo.wholehead.segment import locator_agent

        torch.set_num_threads(1)
        agent = InferenceAgent.from_file(resolve_model_path(None, REPO / "outputs"), precision=args.precision)
        locator = locator_agent(agent)

    heads = find_heads(args.scans, args.dicom)
    if args.only:
        heads = {k: v for k, v in heads.items() if k in set(args.only)}
    variants = [v for v in args.variants.split(",") if v]
    rows: list[dict[str, Any]] = []
    for name, (kind, path) in heads.items():
        array, affine = load_head(kind, path)
        ref = references(name, path, array, affine, args.hippodeep, args.work)
        if ref is None:
            log(f"{name}: no reference centroids (no labels; give --hippodeep), skipped")
            continue
        source, centroids = ref
        for vname in variants:
            rng = np.random.default_rng(args.seed)
            try:
                va, vaff, world = make_variant(vname, array, affine, rng)
            except Exception as exc:  # noqa: BLE001
                log(f"{name} {vname}: variant failed: {exc}")
                continue
            truth = {s: world[:3, :3] @ c + world[:3, 3] for s, c in centroids.items()}
            row: dict[str, Any] = {"head": name, "variant": vname, "reference": source,
                                   "shape": list(va.shape), "dtype": str(va.dtype)}
            t = time.perf_counter()
            try:
                reg = register_to_template(va, vaff)
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                log(f"{name:18s} {vname:10s} registration failed: {row['error']}")
                continue
            row["register_s"] = time.perf_counter() - t
            row["score"] = reg.score
            row["determinant"] = reg.determinant
            row["initial_error_mm"] = {s: float(np.linalg.norm(reg.to_scan(HIPPOCAMPUS_CENTROIDS_MNI[s]) - truth[s]))
                                       for s in ("left", "right")}
            row["timings_s"] = reg.timings_s
            extra = ""
            if agent is not None:
                from hippo.wholehead.segment import segment_wholehead

                try:
                    res = segment_wholehead(va, vaff, agent, locator=locator, registration=reg)
                    row["final_error_mm"] = {s: float(np.linalg.norm(res.side(s).centroid_scan_mm - truth[s]))
                                             if res.side(s).centroid_scan_mm is not None else None
                                             for s in ("left", "right")}
                    row["volumes_mm3"] = {s: res.side(s).volumes.total_mm3 for s in ("left", "right")}
                    row["status"] = "review" if res.review else "ok"
                    row["review"] = list(res.review)
                    fe = row["final_error_mm"]
                    extra = (f" | seg {row['status']:6s} L {row['volumes_mm3']['left']:5.0f} R "
                             f"{row['volumes_mm3']['right']:5.0f}  centroid err L "
                             f"{fe['left'] if fe['left'] is not None else float('nan'):4.1f} R "
                             f"{fe['right'] if fe['right'] is not None else float('nan'):4.1f} mm")
                except Exception as exc:  # noqa: BLE001
                    row["status"] = "failed"
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    extra = f" | seg failed: {row['error']}"
            e = row["initial_error_mm"]
            log(f"{name:18s} {vname:10s} crop-centre error L {e['left']:5.1f} R {e['right']:5.1f} mm  "
                f"score {reg.score:6.3f} det {reg.determinant:4.2f} {row['register_s']:4.1f} s{extra}")
            for rv in row.get("review", []):
                log(f"{'':30s} review: {rv}")
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                   indent=1, default=float))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
