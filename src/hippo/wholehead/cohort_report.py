"""The group QC report of a cohort: one self-contained HTML file (images embedded as data URIs,
no script, no network), and the per-scan thumbnail it shows.

* :func:`render_thumbnail` (per scan, written by the participant level beside the scan's results):
  a coronal and a sagittal view through each hippocampus with the anterior (orange) / posterior
  (cyan) overlay, the page's conventions (:mod:`hippo.wholehead.page`).
* :func:`write_group_report` (group level): counts; total volume per side against eTIV with a
  least-squares line and outliers marked (robust z of the residual beyond :data:`OUTLIER_Z`, from 5
  measured scans on); the asymmetry distribution with the review limit; then one card per scan --
  thumbnail, status, reasons, volumes -- failed and missing first, then flagged for review, then
  volume outliers, then the rest.

pillow, numpy and matplotlib (Agg); no torch or Hydra.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hippo.fileio import write_bytes_atomic

__all__ = ["render_thumbnail", "volume_outliers", "write_group_report", "render_group_report", "OUTLIER_Z"]

#: |robust z| of a side's total volume residual (against eTIV) above which a scan is an outlier
OUTLIER_Z = 3.0
#: fewer measured scans than this: no line is fitted and no outlier marked
MIN_FOR_OUTLIERS = 5
TILE = 128
_ORDER = {"failed": 0, "missing": 1, "review": 2, "outlier": 3, "ok": 4, "skipped": 5}


# ------------------------------------------------------------------------------------- thumbnail
def render_thumbnail(image: np.ndarray, labels: np.ndarray, spacing, *, tile: int = TILE,
                     half_mm: float = 28.0) -> bytes:
    """PNG bytes, ``4 tile x tile`` pixels: coronal and sagittal views through the left, then the
    right hippocampus (labels 1/2 left, 3/4 right) with the anterior/posterior overlay; a side
    without labels shows a grey tile saying so.

    Args:
        image: ``(X, Y, Z)`` intensities in closest canonical RAS.
        labels: ``(X, Y, Z)`` uint8 on the same grid.
        spacing: voxel size in mm per axis.
    """
    from PIL import Image, ImageDraw

    from hippo.wholehead.page import LabelPlanes, _font, _view, _window, label_centre

    sub = image[::2, ::2, ::2]
    window = _window(sub[sub > np.percentile(sub, 5)] if sub.size else sub)
    out = Image.new("RGB", (4 * tile, tile), (0, 0, 0))
    for k, (side, values) in enumerate((("left", (1, 2)), ("right", (3, 4)))):
        centre = label_centre(labels, values)
        if centre is None:
            blank = Image.new("RGB", (2 * tile, tile), (60, 60, 60))
            ImageDraw.Draw(blank).text((tile, tile // 2), f"{side}: not found", anchor="mm", font=_font(14, True),
                                       fill=(255, 255, 255))
            out.paste(blank, (2 * k * tile, 0))
            continue
        side_labels = LabelPlanes(labels, {values[0]: 1, values[1]: 2})  # 1 anterior, 2 posterior
        for j, view in enumerate(("coronal", "sagittal")):
            t = _view(image, side_labels, spacing, view, centre, half_mm, window, tile)
            ImageDraw.Draw(t).text((4, tile - 4), f"{side[0].upper()} {view[:3]}", anchor="lb", font=_font(11),
                                   fill=(255, 255, 255))
            out.paste(t, ((2 * k + j) * tile, 0))
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- statistics
def _total(o: Mapping[str, Any], side: str) -> float | None:
    v = (o.get("volumes") or {}).get(side) or {}
    x = v.get("total_mm3")
    return None if x is None or not np.isfinite(x) or x <= 0 else float(x)


def volume_outliers(outcomes: Sequence[Mapping[str, Any]], z_limit: float = OUTLIER_Z
                    ) -> tuple[dict[str, list[str]], dict[str, tuple[float, float]]]:
    """Scans whose total volume of a side lies far from the cohort's line against eTIV.

    Per side, over the measured scans (``ok``/``review`` with a volume and eTIV): least squares
    ``total = a + b eTIV``, residuals scored as robust z (median, 1.4826 x MAD); ``|z| > z_limit``
    marks the scan. Fewer than :data:`MIN_FOR_OUTLIERS` such scans: nothing is fitted.

    Returns:
        ``({name: [reason, ...]}, {side: (a, b)})``.
    """
    reasons: dict[str, list[str]] = {}
    fits: dict[str, tuple[float, float]] = {}
    for side in ("left", "right"):
        pts = [(o["name"], o["etiv_mm3"], _total(o, side)) for o in outcomes
               if o.get("status") in ("ok", "review") and o.get("etiv_mm3") and _total(o, side) is not None]
        if len(pts) < MIN_FOR_OUTLIERS:
            continue
        x = np.array([p[1] for p in pts], float)
        y = np.array([p[2] for p in pts], float)
        b, a = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(np.mean(y)))
        fits[side] = (float(a), float(b))
        r = y - (a + b * x)
        mad = 1.4826 * float(np.median(np.abs(r - np.median(r))))
        scale = mad if mad > 0 else float(np.std(r)) or 1.0
        z = (r - np.median(r)) / scale
        for (name, _, vol), zi in zip(pts, z):
            if abs(zi) > z_limit:
                reasons.setdefault(name, []).append(
                    f"{side} volume {vol:.0f} mm³ is an outlier against eTIV (robust z {zi:+.1f})")
    return reasons, fits


# ------------------------------------------------------------------------------------- plots
def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return _png_data_uri(buf.getvalue())


def _plots(outcomes: Sequence[Mapping[str, Any]], outliers: Mapping[str, list[str]],
           fits: Mapping[str, tuple[float, float]], asym_limit: float | None) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    measured = [o for o in outcomes if o.get("status") in ("ok", "review") and o.get("etiv_mm3")]
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for side, colour, marker in (("left", "#d9480f", "o"), ("right", "#1971c2", "s")):
        pts = [(o["etiv_mm3"] / 1e6, _total(o, side), o["name"]) for o in measured if _total(o, side) is not None]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=colour, marker=marker, s=28, label=side, alpha=0.8)
        for x, y, name in pts:
            if any(r.startswith(side) for r in outliers.get(name, [])):
                ax.scatter([x], [y], s=150, facecolors="none", edgecolors="red", linewidths=2)
                ax.annotate(name, (x, y), xytext=(5, 5), textcoords="offset points", fontsize=7, color="red")
        if side in fits:
            a, b = fits[side]
            xs = np.linspace(min(p[0] for p in pts), max(p[0] for p in pts), 2)
            ax.plot(xs, a + b * xs * 1e6, c=colour, lw=1, ls="--")
    ax.set_xlabel("eTIV (L)")
    ax.set_ylabel("hippocampus total (mm³)")
    ax.set_title("Volume against eTIV (red rings: outliers)" if fits else
                 f"Volume against eTIV (outliers from {MIN_FOR_OUTLIERS} measured scans on)", fontsize=10)
    if measured:
        ax.legend(fontsize=8)
    fig.tight_layout()
    scatter = _figure_uri(fig)

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ai = [o["asymmetry_index_percent"] for o in measured if o.get("asymmetry_index_percent") is not None]
    if ai:
        ax.hist(ai, bins=max(5, min(30, len(ai))), color="#495057")
    if asym_limit:
        for x in (-asym_limit, asym_limit):
            ax.axvline(x, color="red", ls="--", lw=1)
    ax.set_xlabel("asymmetry index 100 (L - R) / mean (%)")
    ax.set_ylabel("scans")
    ax.set_title("Asymmetry" + (f" (red: the review limit ±{asym_limit:g} %)" if asym_limit else ""), fontsize=10)
    fig.tight_layout()
    return scatter, _figure_uri(fig)


# ------------------------------------------------------------------------------------- the page
_CSS = """
body{font-family:DejaVu Sans,Arial,sans-serif;margin:16px;color:#212529;background:#fff}
h1{font-size:20px;margin:0 0 4px}.muted{color:#6c757d;font-size:12px}
.counts span{display:inline-block;margin:6px 8px 6px 0;padding:4px 10px;border-radius:4px;font-weight:bold}
.plots img{width:48%;min-width:360px;border:1px solid #dee2e6;margin:4px 1% 4px 0}
.card{display:flex;gap:10px;border:1px solid #dee2e6;border-left:8px solid #adb5bd;margin:6px 0;padding:6px}
.card img{width:512px;height:128px;background:#000;flex:none}
.noimg{width:512px;height:128px;flex:none;background:#343a40;color:#fff;display:flex;align-items:center;justify-content:center}
.failed,.missing{border-left-color:#c92a2a}.review{border-left-color:#f08c00}.outlier{border-left-color:#9c36b5}
.ok{border-left-color:#2f9e44}
.st{font-weight:bold;text-transform:uppercase}.why{color:#c92a2a;font-size:13px}
td,th{font-size:12px;padding:0 6px 0 0;text-align:right}th{text-align:left}
"""
_BADGE = {"failed": "#ffe3e3", "missing": "#ffe3e3", "review": "#fff3bf", "outlier": "#f3d9fa", "ok": "#d3f9d8",
          "skipped": "#e9ecef"}


def _thumb_uri(o: Mapping[str, Any], out_root: Path | None) -> str | None:
    path = (o.get("files") or {}).get("thumbnail")
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute() and out_root is not None:
        p = out_root / p
    try:
        return _png_data_uri(p.read_bytes())
    except OSError:
        return None


def _vol(o: Mapping[str, Any], side: str, part: str) -> str:
    x = ((o.get("volumes") or {}).get(side) or {}).get(f"{part}_mm3")
    return "–" if x is None else f"{x:.0f}"


def render_group_report(outcomes: Sequence[Mapping[str, Any]], *, title: str = "HippoVolume cohort QC",
                        out_root: str | os.PathLike | None = None, asym_limit: float | None = 20.0) -> str:
    """The report's HTML text (see the module docstring); ``outcomes``: the scans'
    :class:`~hippo.wholehead.run.ScanOutcome` dicts (``skipped`` ones are left out)."""
    outcomes = [o for o in outcomes if o.get("status") != "skipped"]
    root = Path(out_root) if out_root is not None else None
    outliers, fits = volume_outliers(outcomes)

    def group(o: Mapping[str, Any]) -> str:
        s = str(o.get("status"))
        return "outlier" if s == "ok" and o["name"] in outliers else s

    ordered = sorted(outcomes, key=lambda o: (_ORDER.get(group(o), 9), str(o.get("name"))))
    counts = {k: sum(group(o) == k for o in outcomes) for k in ("failed", "missing", "review", "outlier", "ok")}
    scatter, hist = _plots(outcomes, outliers, fits, asym_limit)
    esc = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1><div class='muted'>{len(outcomes)} scans; made "
             f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; research use only. "
             "Overlay: anterior orange, posterior cyan; coronal views with the patient's right on the left.</div>",
             "<div class='counts'>" + "".join(
                 f"<span style='background:{_BADGE[k]}'>{n} {label}</span>" for k, n, label in (
                     ("failed", counts["failed"], "failed"), ("missing", counts["missing"], "missing"),
                     ("review", counts["review"], "for review"), ("outlier", counts["outlier"], "volume outliers"),
                     ("ok", counts["ok"], "ok"))) + "</div>",
             f"<div class='plots'><img alt='volume against eTIV' src='{scatter}'>"
             f"<img alt='asymmetry distribution' src='{hist}'></div>"]
    for o in ordered:
        g = group(o)
        thumb = _thumb_uri(o, root)
        reasons = []
        if o.get("status") in ("failed", "missing"):
            reasons.append((f"{o.get('stage')}: " if o.get("stage") else "") + str(o.get("error", "")))
        reasons += list(o.get("review") or []) + outliers.get(o["name"], [])
        ai, etiv = o.get("asymmetry_index_percent"), o.get("etiv_mm3")
        table = ("<table><tr><th></th><th>anterior</th><th>posterior</th><th>total mm³</th></tr>" + "".join(
            f"<tr><th>{side}</th><td>{_vol(o, side, 'anterior')}</td><td>{_vol(o, side, 'posterior')}</td>"
            f"<td>{_vol(o, side, 'total')}</td></tr>" for side in ("left", "right")) + "</table>"
            f"<div class='muted'>AI {'–' if ai is None else f'{ai:+.1f} %'} · eTIV "
            f"{'–' if not etiv else f'{etiv / 1e6:.2f} L'}</div>") if o.get("status") in ("ok", "review") else ""
        parts.append(
            f"<div class='card {g}' id='scan-{esc(str(o['name']))}'>"
            + (f"<img alt='{esc(str(o['name']))}' src='{thumb}'>" if thumb else "<div class='noimg'>no image</div>")
            + f"<div><div><b class='name'>{esc(str(o['name']))}</b> <span class='st'>{esc(g)}</span></div>"
            f"<div class='muted'>{esc(str(o.get('scan', '')))}</div>"
            + "".join(f"<div class='why'>{esc(r)}</div>" for r in reasons if r) + table + "</div></div>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_group_report(path: str | os.PathLike, outcomes: Sequence[Mapping[str, Any]], **kwargs: Any) -> Path:
    """Write :func:`render_group_report` to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, render_group_report(outcomes, **kwargs).encode("utf-8"))
