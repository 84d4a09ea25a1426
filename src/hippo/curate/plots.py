"""The curation plots (PNG): volume, shape and intensity histograms and the anterior/posterior
volume scatter with the outliers highlighted."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from hippo.fileio import write_bytes_atomic
from hippo.curate.records import CaseRecord


# ---- plots ---------------------------------------------------------------------------------


def _save_fig(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())


def write_plots(records: list[CaseRecord], out_dir: Path, outlier_info: dict) -> dict[str, Path]:
    """The report's PNGs; uses matplotlib's object API with the Agg canvas (no pyplot state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def count_axis(ax) -> None:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))

    files: dict[str, Path] = {}
    usable = [r for r in records if r.volumes_mm3 is not None and not r.has_error]
    vol_out = [r for r in usable if "volume_outlier" in r.codes()]

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, key, title, colour in zip(axes, ("total_mm3", "anterior_mm3", "posterior_mm3"),
                                      ("total", "anterior", "posterior"), ("tab:purple", "tab:blue", "tab:orange")):
        vals = [r.volumes_mm3[key] for r in usable]
        if vals:
            ax.hist(vals, bins=min(30, max(5, len(vals) // 4)), color=colour, alpha=0.8, edgecolor="white")
            ax.axvline(float(np.median(vals)), color="k", ls="--", lw=1, label=f"median {np.median(vals):.0f}")
        if key == "total_mm3" and outlier_info.get("volume") and outlier_info["volume"]["low"] is not None:
            v = outlier_info["volume"]
            for x in (v["low"], v["high"]):
                ax.axvline(x, color="tab:red", ls=":", lw=1.2)
            ax.plot([], [], color="tab:red", ls=":", label=f"|z| = {v['threshold']:g}")
        ax.set_title(f"{title} hippocampal volume (n={len(vals)})")
        ax.set_xlabel("volume [mm³]")
        ax.set_ylabel("cases")
        count_axis(ax)
        if vals:
            ax.legend(fontsize=8)
    files["volume_histograms"] = out_dir / "volume_histograms.png"
    _save_fig(fig, files["volume_histograms"])

    scanned = [r for r in records if r.image_shape is not None]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for i, ax in enumerate(axes):
        dims = [r.image_shape[i] for r in scanned]
        if dims:
            ax.hist(dims, bins=np.arange(min(dims) - 0.5, max(dims) + 1.5, 1), color="tab:green", edgecolor="white")
        ax.set_title(f"image size along voxel axis {i}")
        ax.set_xlabel("voxels")
        ax.set_ylabel("cases")
        count_axis(ax)
    files["shape_histograms"] = out_dir / "shape_histograms.png"
    _save_fig(fig, files["shape_histograms"])

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    maxima = [(r.intensity["max"], r.image_dtype or "?") for r in scanned
              if r.intensity and r.intensity.get("max") is not None and r.intensity["max"] > 0]
    if maxima:
        lo, hi = min(m for m, _ in maxima), max(m for m, _ in maxima)
        bins = np.logspace(math.log10(lo) - 0.05, math.log10(hi) + 0.05, 40)
        groups = sorted({d for _, d in maxima})
        ax.hist([[m for m, d in maxima if d == g] for g in groups], bins=bins, stacked=True,
                label=[f"stored {g} (n={sum(1 for _, d in maxima if d == g)})" for g in groups], edgecolor="white")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_title(f"image intensity maximum per case (n={len(maxima)})")
    ax.set_xlabel("maximum intensity (log scale)")
    ax.set_ylabel("cases")
    count_axis(ax)
    files["intensity_max_histogram"] = out_dir / "intensity_max_histogram.png"
    _save_fig(fig, files["intensity_max_histogram"])

    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.subplots()
    normal = [r for r in usable if r not in vol_out]
    ax.scatter([r.volumes_mm3["anterior_mm3"] for r in normal], [r.volumes_mm3["posterior_mm3"] for r in normal],
               s=14, alpha=0.7, color="tab:blue", label=f"cases (n={len(normal)})")
    if vol_out:
        ax.scatter([r.volumes_mm3["anterior_mm3"] for r in vol_out], [r.volumes_mm3["posterior_mm3"] for r in vol_out],
                   s=40, color="tab:red", marker="D", label=f"volume outliers (n={len(vol_out)})")
        for r in vol_out:
            ax.annotate(r.name, (r.volumes_mm3["anterior_mm3"], r.volumes_mm3["posterior_mm3"]),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("anterior volume [mm³]")
    ax.set_ylabel("posterior volume [mm³]")
    ax.set_title("anterior vs posterior volume (error-free cases)")
    ax.grid(alpha=0.3)
    if usable:
        ax.legend(fontsize=8)
    files["volume_scatter"] = out_dir / "volume_scatter.png"
    _save_fig(fig, files["volume_scatter"])
    return files
