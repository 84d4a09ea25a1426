"""The whole-head report page (PNG): volumes per side, asymmetry, eTIV, each side's segmentation
quality score, review reasons, and views through each hippocampus with the anterior (orange) /
posterior (cyan) overlay.

pillow + numpy only. Image conventions as :mod:`hippo.dicom.report`: ``(X, Y, Z)`` arrays in
closest canonical RAS; views drawn the radiological way (the patient's right on the viewer's left
for coronal views, anterior on the left for sagittal views, superior up), with the same colours.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hippo.dicom.report import quality_text, wrap_text

__all__ = ["render_wholehead_report", "write_report_png", "LabelPlanes", "label_centre"]

PAGE_WIDTH = 1200
DISCLAIMER = "Research use only — not for diagnostic use"
#: Overlay colours (the same as the DICOM report's): anterior orange, posterior cyan.
COLOURS = {1: (255, 140, 0), 2: (0, 200, 255)}
ALPHA = 0.45
_NAVY, _RED, _TEXT, _MUTED = (20, 40, 80), (170, 20, 20), (20, 20, 20), (90, 90, 90)


def _font(size: int, bold: bool = False):
    for name in (("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"),
                 ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf" if bold
                  else "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1
        return ImageFont.load_default()


class LabelPlanes:
    """``labels`` seen through a value map (``lut[value]``), computed only for the part indexed:
    a view needs one plane of a side's labels, not the whole volume remapped (a 0.7 mm head has
    40 million voxels).

    Args:
        labels: ``(X, Y, Z)`` integer labels.
        mapping: ``{value: new value}``; every other value becomes 0.
    """

    def __init__(self, labels: np.ndarray, mapping: Mapping[int, int]):
        self.labels = labels
        self.lut = np.zeros(256, np.uint8)
        for value, new in mapping.items():
            self.lut[int(value)] = int(new)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.labels.shape

    def __getitem__(self, index) -> np.ndarray:
        return self.lut[np.asarray(self.labels[index], np.uint8)]


def label_centre(labels: np.ndarray, values: tuple[int, ...]) -> np.ndarray | None:
    """Mean voxel index ``(3,)`` of the voxels whose label is in ``values``; ``None`` when there are
    none. Looks only inside the labels' bounding box (``scipy.ndimage.find_objects``)."""
    from scipy import ndimage

    found = ndimage.find_objects(np.asarray(labels), max_label=max(values))
    boxes = [found[v - 1] for v in values if found[v - 1] is not None]
    if not boxes:
        return None
    box = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))
    idx = np.argwhere(np.isin(labels[box], values))
    return idx.mean(axis=0) + np.array([b.start for b in box], np.float64)


def _window(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1.0, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _view(image: np.ndarray, labels: np.ndarray, spacing, view: str, centre_idx, half_mm: float | None,
          window: tuple[float, float], size: int) -> Image.Image:
    """One square tile: coronal (fixed y) or sagittal (fixed x) slice around ``centre_idx``."""
    c = [int(round(v)) for v in centre_idx]
    if view == "coronal":
        plane, lab = image[:, c[1], :], labels[:, c[1], :]  # (x, z)
        axes = (0, 2)
        flip_cols = True   # patient's right (high x) on the viewer's left
    else:
        plane, lab = image[c[0], :, :], labels[c[0], :, :]  # (y, z)
        axes = (1, 2)
        flip_cols = True   # anterior (high y) on the left
    if half_mm is not None:
        lo = [max(0, int(c[a] - half_mm / spacing[a])) for a in axes]
        hi = [min(image.shape[a], int(c[a] + half_mm / spacing[a]) + 1) for a in axes]
        plane, lab = plane[lo[0]:hi[0], lo[1]:hi[1]], lab[lo[0]:hi[0], lo[1]:hi[1]]
    g = np.clip((plane - window[0]) / (window[1] - window[0]), 0, 1).T[::-1]   # rows: superior first
    lab = lab.T[::-1]
    if flip_cols:
        g, lab = g[:, ::-1], lab[:, ::-1]
    rgb = np.repeat(g[..., None] * 255.0, 3, axis=2)
    for value, colour in COLOURS.items():
        sel = lab == value
        rgb[sel] = (1 - ALPHA) * rgb[sel] + ALPHA * np.asarray(colour, np.float64)
    tile_img = Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")
    h_mm, w_mm = g.shape[0] * spacing[axes[1]], g.shape[1] * spacing[axes[0]]
    scale = min(size / max(w_mm, 1e-6), size / max(h_mm, 1e-6))
    tile_img = tile_img.resize((max(1, int(w_mm * scale)), max(1, int(h_mm * scale))), Image.Resampling.BILINEAR)
    tile = Image.new("RGB", (size, size), (0, 0, 0))
    tile.paste(tile_img, ((size - tile_img.width) // 2, (size - tile_img.height) // 2))
    d = ImageDraw.Draw(tile)
    f = _font(15, bold=True)
    style = dict(font=f, fill=(255, 255, 0), stroke_width=2, stroke_fill=(0, 0, 0))
    left, right = ("R", "L") if view == "coronal" else ("A", "P")
    d.text((5, size // 2), left, anchor="lm", **style)
    d.text((size - 5, size // 2), right, anchor="rm", **style)
    d.text((size // 2, 4), "S", anchor="mt", **style)
    d.text((size // 2, size - 4), "I", anchor="mb", **style)
    return tile


def render_wholehead_report(image: np.ndarray, labels: np.ndarray, spacing, summary: Mapping[str, Any],
                            *, title: str = "") -> Image.Image:
    """Draw the page.

    Args:
        image: ``(X, Y, Z)`` scan intensities (closest canonical RAS).
        labels: ``(X, Y, Z)`` combined labels (1/2 left anterior/posterior, 3/4 right).
        spacing: voxel size (mm).
        summary: ``WholeHeadResult.as_dict()`` (volumes, asymmetry, eTIV, quality per side, review,
            notes).
        title: the scan's name.

    Returns:
        An RGB image ``PAGE_WIDTH`` wide.
    """
    spacing = tuple(float(s) for s in spacing)
    win = _window(image[::2, ::2, ::2])
    tile = 280
    margin = 30
    views = []
    for side, offset in (("right", 2), ("left", 0)):   # radiological order: right first
        side_labels = LabelPlanes(labels, {offset + 1: 1, offset + 2: 2})
        centre = label_centre(labels, (offset + 1, offset + 2))
        views.append((side, side_labels, np.asarray(image.shape) / 2.0 if centre is None else centre))
    both = LabelPlanes(labels, {1: 1, 2: 2, 3: 1, 4: 2})
    mean_centre = np.mean([v[2] for v in views], axis=0)

    page = Image.new("RGB", (PAGE_WIDTH, 2000), "white")
    d = ImageDraw.Draw(page)
    y = margin
    d.text((margin, y), "HippoVolume — hippocampus, whole-head T1", font=_font(30, True), fill=_NAVY)
    y += 42
    d.text((margin, y), DISCLAIMER, font=_font(18, True), fill=_RED)
    y += 30
    if title:
        d.text((margin, y), title, font=_font(17), fill=_MUTED)
        y += 28
    # volumes table
    cols = [margin, margin + 200, margin + 400, margin + 600, margin + 800]
    d.text((cols[0], y), "mm³", font=_font(18, True), fill=_TEXT)
    for x, head in zip(cols[1:], ("anterior", "posterior", "total")):
        d.text((x, y), head, font=_font(18, True), fill=_TEXT)
    y += 28
    for side in ("left", "right"):
        s = summary.get(side, {})
        d.text((cols[0], y), side.capitalize(), font=_font(18), fill=_TEXT)
        for x, key in zip(cols[1:], ("anterior_mm3", "posterior_mm3", "total_mm3")):
            v = s.get(key)
            d.text((x, y), "—" if v is None else f"{v:,.0f}", font=_font(18), fill=_TEXT)
        y += 26
    ai = summary.get("asymmetry_index_percent")
    etiv = summary.get("etiv_mm3")
    reg = summary.get("registration", {})
    y += 6
    d.text((margin, y), f"Asymmetry index 100·(L−R)/((L+R)/2): {'—' if ai is None else f'{ai:+.1f} %'}    "
                        f"eTIV (from the registration's scaling): {'—' if etiv is None else f'{etiv / 1e6:.2f} L'}    "
                        f"registration score: {reg.get('score_mattes_mi', float('nan')):.2f}",
           font=_font(16), fill=_TEXT)
    y += 30
    quality = summary.get("quality") or {}
    for side in ("left", "right"):  # the segmentation quality score of each side's crop (hippo.quality)
        if quality.get(side):
            for line in wrap_text(d, f"{side.capitalize()}: {quality_text(quality[side])}", _font(15),
                                  PAGE_WIDTH - 2 * margin):
                d.text((margin, y), line, font=_font(15), fill=_MUTED)
                y += 20
    if any(quality.get(side) for side in ("left", "right")):
        y += 8
    review = list(summary.get("review") or [])
    if review:
        d.text((margin, y), "REVIEW RECOMMENDED", font=_font(18, True), fill=_RED)
        y += 26
        for r in review:
            for line in wrap_text(d, "• " + r, _font(16), PAGE_WIDTH - 2 * margin):
                d.text((margin, y), line, font=_font(16), fill=_RED)
                y += 22
    else:
        d.text((margin, y), "No review flags.", font=_font(16), fill=_MUTED)
        y += 24
    for note in summary.get("notes") or []:
        for line in wrap_text(d, "Note: " + note, _font(15), PAGE_WIDTH - 2 * margin):
            d.text((margin, y), line, font=_font(15), fill=_MUTED)
            y += 20
    y = _draw_change(d, summary.get("change"), y, margin)
    y += 10
    # images: overview coronal, then per side a zoomed coronal and sagittal
    x = margin
    row = [("Coronal, both sides", _view(image, both, spacing, "coronal", mean_centre, None, win, tile))]
    for side, side_labels, centre in views:
        row.append((f"{side.capitalize()}: coronal", _view(image, side_labels, spacing, "coronal", centre, 30.0, win, tile)))
    for label, img in row:
        d.text((x, y), label, font=_font(15, True), fill=_TEXT)
        page.paste(img, (x, y + 22))
        x += tile + 20
    y += tile + 40
    x = margin + tile + 20
    for side, side_labels, centre in views:
        img = _view(image, side_labels, spacing, "sagittal", centre, 35.0, win, tile)
        d.text((x, y), f"{side.capitalize()}: sagittal", font=_font(15, True), fill=_TEXT)
        page.paste(img, (x, y + 22))
        x += tile + 20
    y += tile + 40
    legend_y = y
    for i, (value, name) in enumerate(((1, "anterior (head)"), (2, "posterior (body + tail)"))):
        d.rectangle((margin + 260 * i, legend_y, margin + 260 * i + 16, legend_y + 16), fill=COLOURS[value])
        d.text((margin + 260 * i + 24, legend_y - 1), name, font=_font(15), fill=_TEXT)
    y += 30
    for line in wrap_text(d, "Volumes are measured on the scan's own grid from a 2.5D UNet ensemble trained on the "
                         "Decathlon hippocampus labels (anterior/posterior protocol): they run lower than "
                         "FreeSurfer's. eTIV = det(affine to MNI) × 1948.106 cm³ (FreeSurfer's scale factor). "
                         "Validation plan: docs/validation-plan.md.",
                      _font(14), PAGE_WIDTH - 2 * margin):
        d.text((margin, y), line, font=_font(14), fill=_MUTED)
        y += 19
    return page.crop((0, 0, PAGE_WIDTH, y + margin))


def _draw_change(d: ImageDraw.ImageDraw, change: Mapping[str, Any] | None, y: int, margin: int) -> int:
    """The "Change since the earlier scan" block (:func:`hippo.change.wholehead_change`): per side the
    total's change in mm³ and %, %/year, and the reliable-change sentence; the independent figure
    beside a paired one; or why there is none. Returns the next ``y``."""
    if not change:
        return y
    y += 6
    if not change.get("available"):
        for line in wrap_text(d, f"Change since the earlier scan: none ({change.get('reason') or 'not available'}).",
                              _font(16), PAGE_WIDTH - 2 * margin):
            d.text((margin, y), line, font=_font(16), fill=_MUTED)
            y += 22
        return y
    mode = change.get("mode", "")
    dates = " \u2192 ".join(x for x in (change.get("earlier_date"), change.get("later_date")) if x)
    d.text((margin, y), "Change since the earlier scan" + (f" ({dates})" if dates else ""), font=_font(18, True),
           fill=_NAVY)
    y += 26
    how = ("Paired measurement: both scans registered to each other and measured through the same crops."
           if mode == "paired" else "Two independent measurements (the earlier scan itself was not available).")
    d.text((margin, y), how, font=_font(15), fill=_MUTED)
    y += 24
    for side in ("left", "right"):
        s = (change.get("sides") or {}).get(side) or {}
        tot = s.get("total") or {}
        rate = tot.get("rate_percent_per_year")
        rate_txt = "" if rate is None else f", {rate:+.1f} %/year".replace("-", "\u2212")
        mm3 = tot.get("change_mm3")
        colour = _RED if s.get("reliable") else _TEXT
        mm3_txt = "" if mm3 is None else (f"{mm3:+,.0f} mm" + "\u00b3").replace("-", "\u2212")
        text = (f"{side.capitalize()}: {tot.get('earlier_mm3', 0):,.0f} \u2192 {tot.get('later_mm3', 0):,.0f} mm\u00b3"
                f" ({mm3_txt}{rate_txt}). {s.get('statement', '')}")
        for line in wrap_text(d, text, _font(16), PAGE_WIDTH - 2 * margin):
            d.text((margin, y), line, font=_font(16), fill=colour)
            y += 22
    ind = change.get("independent")
    if ind:
        parts = []
        for side in ("left", "right"):
            t = (ind.get(side) or {}).get("total") or {}
            if t.get("change_percent") is not None:
                mdc = (ind.get(side) or {}).get("mdc95_percent")
                parts.append(f"{side} {t['change_percent']:+.1f} %".replace("-", "\u2212") +
                             ("" if mdc is None else f" (\u00b1{mdc:.1f} %)"))
        if parts:
            for line in wrap_text(d, "Two independent measurements would give: " + ", ".join(parts) + ".", _font(15),
                                  PAGE_WIDTH - 2 * margin):
                d.text((margin, y), line, font=_font(15), fill=_MUTED)
                y += 20
    if change.get("note"):
        for line in wrap_text(d, "Note: " + str(change["note"]), _font(15), PAGE_WIDTH - 2 * margin):
            d.text((margin, y), line, font=_font(15), fill=_MUTED)
            y += 20
    traj = change.get("trajectory")
    if traj and len(traj.get("points") or []) >= 3:
        y = _draw_trajectory(d, traj, y + 6, margin)
    return y


def _draw_trajectory(d: ImageDraw.ImageDraw, traj: Mapping[str, Any], y: int, margin: int) -> int:
    """Total volume per side against the study date (three or more time points), with each side's
    noise band (the first point ± the independent MDC95, dashed) when the trajectory carries it."""
    import datetime as _dt

    pts = [p for p in traj.get("points") or [] if p.get("date")]
    if len(pts) < 3:
        return y
    w, h = 560, 200
    x0, y0 = margin + 60, y + 10
    dates = [_dt.date.fromisoformat(p["date"]) for p in pts]
    vals = [v for p in pts for v in (p.get("left_mm3"), p.get("right_mm3")) if v is not None]
    if not vals:
        return y
    mdc = traj.get("mdc95_percent") or {}
    for side in ("left", "right"):  # the noise bands stay inside the plot
        first = next((p[f"{side}_mm3"] for p in pts if p.get(f"{side}_mm3") is not None), None)
        if first is not None and mdc.get(side):
            vals += [first * (1 - mdc[side] / 100), first * (1 + mdc[side] / 100)]
    lo, hi = min(vals), max(vals)
    pad = max((hi - lo) * 0.08, 25.0)
    lo, hi = lo - pad, hi + pad
    span = max((dates[-1] - dates[0]).days, 1)
    px = lambda dt: x0 + w * (dt - dates[0]).days / span  # noqa: E731
    py = lambda v: y0 + h - h * (v - lo) / (hi - lo)  # noqa: E731
    d.rectangle((x0, y0, x0 + w, y0 + h), outline=_MUTED)
    for v in (lo + pad, hi - pad):
        d.text((x0 - 6, py(v)), f"{v:,.0f}", anchor="rm", font=_font(13), fill=_MUTED)
    d.text((x0 - 55, y0 - 18), "mm\u00b3", font=_font(13), fill=_MUTED)
    for side, colour in (("left", (0, 110, 200)), ("right", (200, 90, 0))):
        first = next((p[f"{side}_mm3"] for p in pts if p.get(f"{side}_mm3") is not None), None)
        if first is not None and mdc.get(side):  # the noise band: dashes at the first point ± MDC95
            for v in (first * (1 - mdc[side] / 100), first * (1 + mdc[side] / 100)):
                yy = py(v)
                for xx in range(int(x0), int(x0 + w), 12):
                    d.line((xx, yy, min(xx + 6, x0 + w), yy), fill=colour, width=1)
        xy = [(px(dt), py(p[f"{side}_mm3"])) for dt, p in zip(dates, pts) if p.get(f"{side}_mm3") is not None]
        if len(xy) >= 2:
            d.line(xy, fill=colour, width=3)
        for cx, cy in xy:
            d.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=colour)
        d.text((x0 + w + 10, xy[-1][1] if xy else y0), side, anchor="lm", font=_font(14, True), fill=colour)
    for dt in (dates[0], dates[-1]):
        d.text((px(dt), y0 + h + 4), dt.isoformat(), anchor="mt", font=_font(13), fill=_MUTED)
    if mdc:
        d.text((x0, y0 + h + 22), "Dashed: the first measurement \u00b1 the change two scans of an unchanged head "
               "differ by (95 %)", font=_font(13), fill=_MUTED)
        return y0 + h + 44
    return y0 + h + 28


def write_report_png(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, spacing,
                     summary: Mapping[str, Any], *, title: str = "") -> Path:
    """Render the page and write it as a PNG (atomically). Returns the path."""
    import io

    from hippo.fileio import write_bytes_atomic

    page = render_wholehead_report(image, labels, spacing, summary, title=title)
    buf = io.BytesIO()
    page.save(buf, format="PNG", optimize=False, compress_level=3)
    return write_bytes_atomic(path, buf.getvalue())
