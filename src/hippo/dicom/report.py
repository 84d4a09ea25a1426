"""The clinician-facing report page (an RGB image) and its DICOM Secondary Capture.

pillow + numpy + pydicom only (no torch, no matplotlib).

:func:`render_report` draws one portrait page: title, a "research use only" disclaimer, patient and
study identifiers, a "Review recommended" box when the result is flagged, the anterior / posterior /
total volumes with the segmentation's quality score, the statement that no verified normative
reference exists (no percentile is shown), three orthogonal slices through the segmented structure
with a semi-transparent anterior (orange) / posterior (cyan) overlay, and the model's identity.

:func:`secondary_capture` wraps the page as a Secondary Capture Image Storage instance (RGB, 8 bit,
Explicit VR Little Endian) in the source study, in a new series, ready to send to PACS.

Image conventions: ``image`` and ``mask`` are ``(X, Y, Z)`` arrays in closest-canonical RAS (array
axis 0 runs from the patient's left to right, 1 from posterior to anterior, 2 from inferior to
superior), ``spacing`` their voxel size in mm. Slices are shown the radiological way: the patient's
right on the viewer's left (coronal, axial), anterior on the left (sagittal), superior up.
"""

from __future__ import annotations

import copy
import datetime as _dt
import importlib.util
import os
import re
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from hippo import __version__
from hippo.measure import (
    NO_NORMATIVE_REFERENCE, NO_NORMATIVE_REFERENCE_DETAIL, Volumes, validate_mask, validate_spacing,
)

PAGE_SIZE = (1024, 1280)  # (width, height) in pixels
DISCLAIMER = "Research use only — not for diagnostic use"
SC_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
SC_SERIES_NUMBER = 9001
SC_SERIES_DESCRIPTION = "AI hippocampus volume report, research use"
MANUFACTURER = "HippoVolume"

ANTERIOR_RGB = (255, 140, 0)  # orange
POSTERIOR_RGB = (0, 200, 255)  # cyan
OVERLAY_ALPHA = 0.45

_NAVY = (20, 40, 80)
_RED = (170, 20, 20)
_TEXT = (20, 20, 20)
_MUTED = (90, 90, 90)
_RULE = (200, 200, 200)


# ------------------------------------------------------------------------------------------------
# Fonts and text helpers


def _font_candidates(bold: bool) -> list[str]:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    paths = [name, f"/usr/share/fonts/truetype/dejavu/{name}"]
    spec = importlib.util.find_spec("matplotlib")  # ships DejaVu; found without importing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            paths.append(os.path.join(loc, "mpl-data", "fonts", "ttf", name))
    return paths


@lru_cache(maxsize=32)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at ``size`` px (system copy or matplotlib's), else Pillow's scalable default."""
    for path in _font_candidates(bold):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines no wider than ``width`` pixels."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        words, line = paragraph.split(), ""
        for word in words:
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=font) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def _text_block(draw, xy, text, font, width, fill=_TEXT, spacing=4) -> int:
    """Draw wrapped text at ``xy``; return the y just below it."""
    x, y = xy
    line_h = font.size + spacing if hasattr(font, "size") else 14
    for line in wrap_text(draw, text, font, width):
        draw.text((x, y), line, font=font, fill=fill)
        y += line_h
    return y


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    text = _CONTROL_CHARS.sub(" ", text)  # one line, whatever the header held
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _fmt_int(value: float) -> str:
    return f"{value:,.0f}"


#: What the page prints for a header value the source did not give (absent, empty or malformed).
NOT_GIVEN = "not given"


def _fmt_date(value: Any) -> str:
    """DICOM ``YYYYMMDD`` -> ``YYYY-MM-DD``; other values as text; empty -> "not given"."""
    if value is None or str(value).strip() == "":
        return NOT_GIVEN
    text = str(value).strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


def _fmt_name(value: Any) -> str:
    """DICOM person name ``Family^Given^Middle`` -> ``Family, Given Middle``; empty -> "not given"."""
    if value is None or str(value).strip() == "":
        return NOT_GIVEN
    parts = [p for p in str(value).split("^") if p]
    if len(parts) >= 2:
        return f"{parts[0]}, {' '.join(parts[1:])}"
    return parts[0] if parts else NOT_GIVEN


def _fmt_sex(value: Any) -> str:
    return {"M": "Male", "F": "Female", "O": "Other"}.get(str(value or "").strip().upper(), NOT_GIVEN)


def _fmt_age(value: Any) -> str:
    if value is None or str(value).strip() == "":
        return NOT_GIVEN
    if isinstance(value, (int, float, np.integer, np.floating)):
        return f"{float(value):g} years"
    text = str(value).strip()
    units = {"Y": "years", "M": "months", "W": "weeks", "D": "days"}
    if len(text) >= 2 and text[:-1].isdigit() and text[-1].upper() in units:
        return f"{int(text[:-1])} {units[text[-1].upper()]}"
    return text


def _get(mapping: Mapping[str, Any] | None, *keys: str, default: Any = None) -> Any:
    """First present, non-empty value of ``keys`` in ``mapping``."""
    for key in keys:
        if mapping and mapping.get(key) not in (None, ""):
            return mapping[key]
    return default


# ------------------------------------------------------------------------------------------------
# Slices


def _window(image: np.ndarray) -> tuple[float, float]:
    """Display window of ``image``: its 1st to 99.5th percentile (finite values)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1.0, 99.5])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def centroid(mask: np.ndarray) -> tuple[int, int, int]:
    """Integer centroid ``(x, y, z)`` of the labelled voxels, or the array centre when empty."""
    idx = np.argwhere(mask > 0)
    if idx.size == 0:
        return tuple(int(s // 2) for s in mask.shape)  # type: ignore[return-value]
    return tuple(int(round(v)) for v in idx.mean(axis=0))  # type: ignore[return-value]


# view name -> (fixed axis, in-plane (row spacing axis, column spacing axis), edge letters L, R, T, B)
_VIEWS = {
    "Sagittal": (0, (2, 1), ("A", "P", "S", "I")),
    "Coronal": (1, (2, 0), ("R", "L", "S", "I")),
    "Axial": (2, (1, 0), ("R", "L", "A", "P")),
}


def _slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """2D display slice (rows top->bottom, columns left->right) of an ``(X, Y, Z)`` RAS volume.

    The plane's two remaining axes (a, b) are transposed so that b runs down the rows and a across
    the columns, and both reversed: superior/anterior up, anterior (sagittal) or the patient's
    right (coronal, axial) on the left.
    """
    axis = _VIEWS[view][0]
    plane = np.take(volume, index, axis=axis)
    return plane.T[::-1, ::-1]


def _overlay_rgb(gray: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 grey + ``(H, W)`` labels -> ``(H, W, 3)`` uint8 with coloured overlay."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for value, colour in ((1, ANTERIOR_RGB), (2, POSTERIOR_RGB)):
        sel = labels == value
        rgb[sel] = (1 - OVERLAY_ALPHA) * rgb[sel] + OVERLAY_ALPHA * np.asarray(colour, np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _panel(image, mask, spacing, view, index, box, window, overlay=True) -> Image.Image:
    """One view as an RGB tile of size ``box`` (black background), physically proportioned."""
    lo, hi = window
    img2d = _slice(image, view, index)
    lab2d = _slice(mask, view, index)
    gray = np.clip((np.nan_to_num(img2d, nan=lo) - lo) / (hi - lo), 0, 1)
    gray = np.round(gray * 255).astype(np.uint8)
    rgb = _overlay_rgb(gray, lab2d if overlay else np.zeros_like(lab2d))
    row_ax, col_ax = _VIEWS[view][1]
    h_mm, w_mm = rgb.shape[0] * spacing[row_ax], rgb.shape[1] * spacing[col_ax]
    scale = min((box[0] - 8) / w_mm, (box[1] - 8) / h_mm)
    size = (max(1, int(round(w_mm * scale))), max(1, int(round(h_mm * scale))))
    tile = Image.new("RGB", box, (0, 0, 0))
    tile.paste(Image.fromarray(rgb, "RGB").resize(size, Image.Resampling.NEAREST),
               ((box[0] - size[0]) // 2, (box[1] - size[1]) // 2))
    draw = ImageDraw.Draw(tile)
    f = _font(16, bold=True)
    left, right, top, bottom = _VIEWS[view][2]
    w, h = box
    style = dict(font=f, fill=(255, 255, 0), stroke_width=2, stroke_fill=(0, 0, 0))
    draw.text((6, h // 2), left, anchor="lm", **style)
    draw.text((w - 6, h // 2), right, anchor="rm", **style)
    draw.text((w // 2, 4), top, anchor="mt", **style)
    draw.text((w // 2, h - 4), bottom, anchor="mb", **style)
    return tile


# ------------------------------------------------------------------------------------------------
# The page


def _section(draw, y: int, title: str, margin: int, width: int) -> int:
    draw.text((margin, y), title, font=_font(22, bold=True), fill=_NAVY)
    y += 30
    draw.line((margin, y, width - margin, y), fill=_RULE, width=2)
    return y + 10


def _swatch(draw, x, y, colour, size=16):
    draw.rectangle((x, y, x + size, y + size), fill=colour, outline=(60, 60, 60))


def quality_text(quality: Mapping[str, Any]) -> str:
    """The segmentation quality score (:meth:`hippo.quality.QualityAssessment.as_dict`) in one
    sentence for the report pages, e.g. "Segmentation quality score 0.93 (agreement of the model's 5
    networks, 1 = identical masks). No quality flag."
    """
    score, n = quality.get("score"), int(quality.get("n_members") or 1)
    if score is None:
        text = "Segmentation quality: no agreement score (a single network); plain checks of the mask only."
    else:
        text = (f"Segmentation quality score {float(score):.2f} (agreement of the model's {n} networks, "
                "1 = identical masks).")
    return text + (" Flagged for review." if quality.get("flagged") else " No quality flag.")


def _quality_line(draw, y: int, quality: Mapping[str, Any] | None, margin: int, width: int) -> int:
    """One muted line with the segmentation quality score (:func:`quality_text`); nothing when
    ``quality`` is ``None``. Returns the next free ``y``."""
    if not quality:
        return y
    return _text_block(draw, (margin, y - 4), quality_text(quality), _font(14), width, fill=_MUTED) + 6


def _metrics_text(metrics: Any) -> str:
    if not metrics:
        return "not recorded"
    if not isinstance(metrics, Mapping):
        return str(metrics)
    parts = []
    for key, value in list(metrics.items())[:6]:
        if isinstance(value, (int, float, np.integer, np.floating)):
            parts.append(f"{key} {float(value):.3f}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def render_report(
    image: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    *,
    patient: Mapping[str, Any],
    study: Mapping[str, Any],
    volumes: Volumes,
    model: Mapping[str, Any],
    timestamp: _dt.datetime | str | None = None,
    size: tuple[int, int] = PAGE_SIZE,
    review: Sequence[str] = (),
    quality: Mapping[str, Any] | None = None,
    prior: Mapping[str, Any] | None = None,
) -> Image.Image:
    """Draw the report page.

    Args:
        image: ``(X, Y, Z)`` float MR volume (RAS, as given to the model), any intensity scale.
        mask: ``(X, Y, Z)`` labels in ``{0, 1 anterior, 2 posterior}``, same shape as ``image``.
        spacing: voxel size in mm of the three axes.
        patient: ``name`` (DICOM PN), ``id``, ``birth_date`` (YYYYMMDD), ``sex`` (M/F/O), ``age``
            (DICOM AS or years); missing or empty ones print as "not given".
        study: ``date`` (YYYYMMDD), ``accession``, ``description``, ``uid``.
        volumes: the measured volumes (:func:`hippo.measure.measure_volumes`).
        model: ``name``, ``version``, ``trained_on`` (a short note), ``metrics`` (dict name -> value).
        timestamp: when the report was made (defaults to now, UTC).
        size: page ``(width, height)`` in pixels.
        review: reasons to look before trusting the numbers (:mod:`hippo.plausibility`,
            :mod:`hippo.quality`); when given, an amber box above the volumes says "Review
            recommended: <reasons>" in plain words.
        quality: :meth:`hippo.quality.QualityAssessment.as_dict` (``score``, ``n_members``...), or
            ``None``: a line under the volumes gives the score (the reasons belong in ``review``).
        prior: :func:`hippo.prior.prior_comparison`'s block, or ``None`` (no section): a "Change
            since the prior study" table (mm³, %, per year) or the sentence saying why there is none.

    Returns:
        An RGB :class:`PIL.Image.Image` of ``size``.

    Raises:
        ValueError: shapes differ, invalid mask or spacing.
    """
    image = np.asarray(image, dtype=np.float32)
    mask = validate_mask(mask)
    spacing = validate_spacing(spacing)
    if image.ndim != 3 or image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be the same 3D shape")
    if timestamp is None:
        timestamp = _dt.datetime.now(_dt.timezone.utc)
    stamp = timestamp.strftime("%Y-%m-%d %H:%M %Z").strip() if isinstance(timestamp, _dt.datetime) else str(timestamp)

    W, H = size
    margin = 40
    footer_h = 150
    page = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(page)
    _draw_header(draw, W, margin, stamp)
    y = _draw_patient_study(draw, patient, study, margin, W)
    y = draw_review_box(draw, y, review, margin, W)
    y = _draw_volumes(draw, y, volumes, margin, W)
    y = _quality_line(draw, y, quality, margin, W - 2 * margin)
    y = _draw_no_norms(draw, y, margin, W)
    y = draw_prior_comparison(draw, y, prior, margin, W)
    _draw_slices(page, draw, y, image, mask, spacing, volumes, margin, footer_h)
    _draw_footer(draw, model, stamp, margin, W, H, footer_h)
    return page


def _draw_header(draw: ImageDraw.ImageDraw, W: int, margin: int, stamp: str) -> None:
    """The navy title bar with the time stamp, and the red research-use band (y 0-132)."""
    draw.rectangle((0, 0, W, 92), fill=_NAVY)
    draw.text((margin, 16), "Hippocampal volume report", font=_font(34, bold=True), fill=(255, 255, 255))
    draw.text((margin, 60), "Automated MRI segmentation of one hippocampus (anterior / posterior)",
              font=_font(17), fill=(210, 220, 240))
    draw.text((W - margin, 22), stamp, font=_font(16), fill=(210, 220, 240), anchor="ra")
    draw.rectangle((0, 92, W, 132), fill=_RED)
    draw.text((W // 2, 112), DISCLAIMER, font=_font(22, bold=True), fill=(255, 255, 255), anchor="mm")


def _draw_patient_study(draw: ImageDraw.ImageDraw, patient: Mapping[str, Any], study: Mapping[str, Any],
                        margin: int, W: int) -> int:
    """The patient and study identifiers ("not given" for what the headers lack); returns the y below."""
    inner = W - 2 * margin
    y = _section(draw, 146, "Patient and study", margin, W)
    label_f, value_f = _font(16), _font(18, bold=True)
    col_w = inner // 2
    left_rows = [
        ("Patient", _fmt_name(_get(patient, "name"))),
        ("Patient ID", str(_get(patient, "id", default=NOT_GIVEN))),
        ("Birth date", _fmt_date(_get(patient, "birth_date", "birthdate"))),
        ("Sex / age", f"{_fmt_sex(_get(patient, 'sex'))} / {_fmt_age(_get(patient, 'age'))}"),
    ]
    right_rows = [
        ("Study date", _fmt_date(_get(study, "date"))),
        ("Accession", str(_get(study, "accession", default=NOT_GIVEN))),
        ("Description", str(_get(study, "description", default=NOT_GIVEN))),
        ("Series", str(_get(study, "series_description", default=NOT_GIVEN))),
    ]
    for i, ((l1, v1), (l2, v2)) in enumerate(zip(left_rows, right_rows)):
        yy = y + i * 27
        draw.text((margin, yy + 2), l1, font=label_f, fill=_MUTED)
        draw.text((margin + 120, yy), _fit(draw, v1, value_f, col_w - 130), font=value_f, fill=_TEXT)
        draw.text((margin + col_w, yy + 2), l2, font=label_f, fill=_MUTED)
        draw.text((margin + col_w + 115, yy), _fit(draw, v2, value_f, col_w - 115), font=value_f, fill=_TEXT)
    y += 4 * 27
    draw.text((margin, y + 2), "Study UID", font=label_f, fill=_MUTED)
    draw.text((margin + 120, y + 2), _fit(draw, str(_get(study, "uid", default=NOT_GIVEN)), _font(15), inner - 120),
              font=_font(15), fill=_TEXT)
    y += 34
    return y


def draw_review_box(draw: ImageDraw.ImageDraw, y: int, review: Sequence[str], margin: int, W: int) -> int:
    """The amber "Review recommended: <reasons>." box (nothing when ``review`` is empty); returns the y below."""
    inner = W - 2 * margin
    if review:
        text = "Review recommended: " + "; ".join(review) + "."
        lines = wrap_text(draw, _CONTROL_CHARS.sub(" ", text), _font(17, bold=True), inner - 24)
        box_h = 16 + 23 * len(lines)
        draw.rectangle((margin, y, W - margin, y + box_h), fill=(255, 236, 179), outline=(200, 120, 0), width=3)
        for i, line in enumerate(lines):
            draw.text((margin + 12, y + 8 + 23 * i), line, font=_font(17, bold=True), fill=(120, 60, 0))
        y += box_h + 12
    return y


def _draw_volumes(draw: ImageDraw.ImageDraw, y: int, volumes: Volumes, margin: int, W: int) -> int:
    """The volume table (voxels, mm³, mL per structure) and how the volume is computed; returns the y below."""
    y = _section(draw, y, "Hippocampal volumes (this hemisphere)", margin, W)
    cols = (margin + 10, margin + 330, margin + 560, margin + 790)  # structure | voxels | mm³ | mL
    head_f, cell_f, bold_f = _font(16, bold=True), _font(19), _font(19, bold=True)
    draw.text((cols[0], y), "Structure", font=head_f, fill=_MUTED)
    for x, text in zip(cols[1:], ("Voxels", "Volume (mm³)", "Volume (mL)")):
        draw.text((x + 150, y), text, font=head_f, fill=_MUTED, anchor="ra")
    y += 28
    rows = [
        ("Anterior hippocampus", ANTERIOR_RGB, volumes.anterior_voxels, volumes.anterior_mm3, cell_f),
        ("Posterior hippocampus", POSTERIOR_RGB, volumes.posterior_voxels, volumes.posterior_mm3, cell_f),
        ("Total hippocampus", None, volumes.total_voxels, volumes.total_mm3, bold_f),
    ]
    for name, colour, voxels, mm3, f in rows:
        if colour is None:
            draw.line((margin, y - 3, W - margin, y - 3), fill=_RULE, width=1)
        else:
            _swatch(draw, cols[0], y + 3, colour)
        draw.text((cols[0] + (26 if colour else 0), y), name, font=f, fill=_TEXT)
        draw.text((cols[1] + 150, y), _fmt_int(voxels), font=f, fill=_TEXT, anchor="ra")
        draw.text((cols[2] + 150, y), _fmt_int(mm3), font=f, fill=_TEXT, anchor="ra")
        draw.text((cols[3] + 150, y), f"{mm3 / 1000.0:.2f}", font=f, fill=_TEXT, anchor="ra")
        y += 30
    sx, sy, sz = volumes.spacing_mm
    draw.text((cols[0], y + 2), f"Voxel size {sx:.2f} × {sy:.2f} × {sz:.2f} mm = {volumes.voxel_volume_mm3:.3f} mm³"
              "; volume = labelled voxels × voxel volume.", font=_font(14), fill=_MUTED)
    y += 32
    return y


def _draw_no_norms(draw: ImageDraw.ImageDraw, y: int, margin: int, W: int) -> int:
    """The normative-comparison slot: no verified reference, said in words; returns the y below."""
    inner = W - 2 * margin
    y = _section(draw, y, "Comparison with age- and sex-matched norms", margin, W)
    y = _text_block(draw, (margin, y), NO_NORMATIVE_REFERENCE + ".", _font(18, bold=True), inner)
    y = _text_block(draw, (margin, y + 4), NO_NORMATIVE_REFERENCE_DETAIL, _font(14), inner, fill=_MUTED)
    y += 10
    return y


def _draw_slices(page: Image.Image, draw: ImageDraw.ImageDraw, y: int, image: np.ndarray, mask: np.ndarray,
                 spacing: Sequence[float], volumes: Volumes, margin: int, footer_h: int) -> None:
    """The legend and the sagittal/coronal/axial panels through the mask's centre, down to
    ``footer_h`` pixels above the page's bottom."""
    W, H = page.size
    inner = W - 2 * margin
    y = _section(draw, y, "Segmentation through the structure's centre", margin, W)
    lx = margin
    for colour, text in ((ANTERIOR_RGB, "Anterior hippocampus"), (POSTERIOR_RGB, "Posterior hippocampus")):
        _swatch(draw, lx, y + 2, colour, size=18)
        draw.text((lx + 26, y), text, font=_font(17), fill=_TEXT)
        lx += 26 + int(draw.textlength(text, font=_font(17))) + 30
    draw.text((W - margin, y + 2), f"overlay opacity {int(OVERLAY_ALPHA * 100)}%", font=_font(14),
              fill=_MUTED, anchor="ra")
    y += 30
    gap = 16
    box_w = (inner - 2 * gap) // 3
    box_h = max(120, min(box_w, H - footer_h - y - 34))
    c = centroid(mask)
    window = _window(image)
    for i, view in enumerate(_VIEWS):
        axis = _VIEWS[view][0]
        tile = _panel(image, mask, spacing, view, c[axis], (box_w, box_h), window)
        x = margin + i * (box_w + gap)
        page.paste(tile, (x, y))
        caption = f"{view} (slice {c[axis] + 1} of {image.shape[axis]})"
        draw.text((x + box_w // 2, y + box_h + 6), caption, font=_font(15), fill=_TEXT, anchor="mt")
    if volumes.total_voxels == 0:
        draw.text((W // 2, y + box_h // 2), "No hippocampus voxel segmented", font=_font(22, bold=True),
                  fill=(255, 80, 80), anchor="mm")


def _draw_footer(draw: ImageDraw.ImageDraw, model: Mapping[str, Any], stamp: str, margin: int, W: int, H: int,
                 footer_h: int) -> None:
    """The model, its test metrics, the generator's version and the research-use band."""
    inner = W - 2 * margin
    fy = H - footer_h
    draw.line((margin, fy, W - margin, fy), fill=_RULE, width=2)
    name = _get(model, "name", default="HippoVolume UNet")
    version = _get(model, "version", default="unknown")
    trained = _get(model, "trained_on", "trained-on", "training", default="not recorded")
    fy = _text_block(draw, (margin, fy + 8), f"Model: {name}, version {version}. Trained on: {trained}.",
                     _font(14), inner, fill=_TEXT, spacing=3)
    fy = _text_block(draw, (margin, fy), f"Held-out test metrics of the model: {_metrics_text(_get(model, 'metrics'))}.",
                     _font(14), inner, fill=_TEXT, spacing=3)
    fy = _text_block(draw, (margin, fy), (
        f"Generated {stamp} by HippoVolume {__version__}. Volumes depend on image quality and on the "
        "segmentation protocol; check the overlay before using any number. Validation plan: docs/validation-plan.md."), _font(14), inner, fill=_MUTED,
        spacing=3)
    draw.rectangle((0, H - 30, W, H), fill=_RED)
    draw.text((W // 2, H - 15), DISCLAIMER, font=_font(16, bold=True), fill=(255, 255, 255), anchor="mm")


# ------------------------------------------------------------------------------------------------
# Change since the prior study (hippo.prior)


def _signed(value: float | None, fmt: str, unit: str) -> str:
    return "–" if value is None else f"{value:+{fmt}}{unit}".replace("-", "−")


def draw_prior_comparison(draw: ImageDraw.ImageDraw, y: int, prior: Mapping[str, Any] | None, margin: int,
                          width: int) -> int:
    """The "Change since the prior study" section at ``y`` (pixels); returns the next free ``y``.

    ``prior`` is :func:`hippo.prior.prior_comparison`'s block: a table per structure (prior and
    current volume in mm³, change in mm³ and %, annualised %/year) with the prior study's date, and
    an amber "not directly comparable" line when another algorithm version made the prior; when
    unavailable, the plain sentence saying why. ``None`` draws nothing.
    """
    if prior is None:
        return y
    inner = width - 2 * margin
    y = _section(draw, y, "Change since the prior study", margin, width)
    if not prior.get("available"):
        reason = str(prior.get("reason") or "no earlier result was found")
        return _text_block(draw, (margin, y), f"No comparison with an earlier scan: {reason}.", _font(16, bold=True),
                           inner) + 8
    before = prior.get("prior") or {}
    years = float(prior.get("interval_years") or 0.0)
    y = _text_block(draw, (margin, y), (
        f"Prior study {before.get('study_date', '?')} ({prior.get('interval_days', '?')} days, {years:.2f} years "
        f"earlier), {before.get('algorithm', {}).get('name', '?')} version {before.get('algorithm', {}).get('version', '?')}."),
        _font(15), inner, fill=_TEXT, spacing=3)
    cols = (margin + 10, margin + 300, margin + 420, margin + 540, margin + 660, margin + 800)
    head_f, cell_f = _font(14, bold=True), _font(16)
    for x, text in zip(cols[1:], ("Prior mm³", "Now mm³", "Change mm³", "Change", "Per year")):
        draw.text((x + 110, y), text, font=head_f, fill=_MUTED, anchor="ra")
    y += 22
    for key, name in (("anterior", "Anterior hippocampus"), ("posterior", "Posterior hippocampus"),
                      ("total", "Total hippocampus")):
        c = (prior.get("change") or {}).get(key) or {}
        draw.text((cols[0], y), name, font=_font(16, bold=key == "total"), fill=_TEXT)
        cells = (_fmt_int(c.get("prior_mm3", 0.0)), _fmt_int(c.get("current_mm3", 0.0)),
                 _signed(c.get("change_mm3"), ".0f", ""), _signed(c.get("change_percent"), ".1f", " %"),
                 _signed(c.get("rate_percent_per_year"), ".1f", " %/yr"))
        for x, text in zip(cols[1:], cells):
            draw.text((x + 110, y), text, font=cell_f, fill=_TEXT, anchor="ra")
        y += 22
    note = str(prior.get("note") or "")
    if note:
        colour = (160, 80, 0) if not prior.get("comparable") else _MUTED
        y = _text_block(draw, (margin, y + 2), note[:1].upper() + note[1:] + ".", _font(15, bold=True), inner,
                        fill=colour, spacing=3)
    return y + 8


# ------------------------------------------------------------------------------------------------
# Secondary Capture

# Patient and study attributes copied from the source instance (Type 2 ones are written empty
# when the source lacks them).
_PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                        "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_PATIENT_STUDY_OPTIONAL = ("IssuerOfPatientID", "OtherPatientIDsSequence", "PatientAge", "PatientSize",
                           "PatientWeight", "StudyDescription", "IssuerOfAccessionNumberSequence",
                           "InstitutionName")


def secondary_capture(
    img: Image.Image,
    source: Dataset,
    *,
    series_number: int = SC_SERIES_NUMBER,
    series_description: str = SC_SERIES_DESCRIPTION,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    timestamp: _dt.datetime | None = None,
    referenced_instances: Sequence[Dataset] = (),
) -> Dataset:
    """The report page as a Secondary Capture Image Storage instance in the source's study.

    Args:
        img: the page (any PIL mode; stored as 8-bit RGB, PlanarConfiguration 0).
        source: one instance of the source series: its patient and study modules are copied
            (StudyInstanceUID, PatientID, names, dates, accession...), as they are: give a cleaned
            header (:func:`hippo.dicom.headers.clean_source_headers`) for real archive input.
            Its Laterality (R or L) is copied; otherwise Laterality (Type 2C: the hippocampus is a
            paired structure) is written empty.
        referenced_instances: the source images the report was made from (SOPClassUID and
            SOPInstanceUID of each), listed in the Common Instance Reference module; none given:
            no reference.
        series_number, series_description: of the new series (defaults per the deploy contract).
        series_instance_uid, sop_instance_uid: new UIDs are generated when not given.
        timestamp: content / series date-time (defaults to now, local time).

    Returns:
        A :class:`pydicom.Dataset` with file meta (Explicit VR Little Endian), ConversionType
        "WSD", BurnedInAnnotation "YES" (the page shows patient identifiers); write it with
        ``ds.save_as(path, enforce_file_format=True)`` or ``pydicom.dcmwrite``.

    Raises:
        ValueError: ``source`` has no StudyInstanceUID.
    """
    if not getattr(source, "StudyInstanceUID", None):
        raise ValueError("source dataset has no StudyInstanceUID: cannot place the report in its study")
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    rows, cols = rgb.shape[:2]
    now = timestamp or _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sop_uid = sop_instance_uid or generate_uid()

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SC_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient and General Study modules: copied from the source
    for keyword in _PATIENT_STUDY_TYPE2:
        setattr(ds, keyword, copy.deepcopy(source[keyword].value) if keyword in source else "")
    for keyword in _PATIENT_STUDY_OPTIONAL:
        if keyword in source and source[keyword].value not in (None, ""):
            setattr(ds, keyword, copy.deepcopy(source[keyword].value))
    ds.StudyInstanceUID = source.StudyInstanceUID
    # General Series + SC Equipment + General Equipment
    ds.Modality = "OT"
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ConversionType = "WSD"
    ds.Manufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = "HippoVolume report"
    ds.SecondaryCaptureDeviceSoftwareVersions = __version__
    ds.SoftwareVersions = __version__
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
    # General Image + SC Image
    ds.InstanceNumber = int(instance_number)
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = date, time
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "Hippocampal volume report rendered by HippoVolume (research use)"
    ds.BurnedInAnnotation = "YES"
    ds.LossyImageCompression = "00"
    laterality = str(source.get("Laterality", "") or "").strip().upper()
    ds.Laterality = laterality if laterality in ("R", "L") else ""
    references = _instance_references(referenced_instances)
    if references:
        # General Image: the images the page was derived from; Common Instance Reference: their series
        ds.SourceImageSequence = [ref for item in references for ref in item.ReferencedInstanceSequence]
        ds.ReferencedSeriesSequence = references
    # Image Pixel module
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    pixels = rgb.tobytes()
    if len(pixels) % 2:
        pixels += b"\x00"
    ds.add_new(0x7FE00010, "OB", pixels)

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = SC_SOP_CLASS_UID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"HIPPO_{__version__}"[:16]
    ds.file_meta = meta
    return ds


def _instance_references(instances: Sequence[Dataset]) -> list[Dataset]:
    """ReferencedSeriesSequence items (one per series, each listing its instances) for ``instances``."""
    by_series: dict[str, list[Dataset]] = {}
    for inst in instances:
        series_uid = str(inst.get("SeriesInstanceUID", "") or "")
        if not series_uid or not inst.get("SOPInstanceUID") or not inst.get("SOPClassUID"):
            continue
        ref = Dataset()
        ref.ReferencedSOPClassUID = inst.SOPClassUID
        ref.ReferencedSOPInstanceUID = inst.SOPInstanceUID
        by_series.setdefault(series_uid, []).append(ref)
    items = []
    for series_uid, refs in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedInstanceSequence = refs
        items.append(item)
    return items


def patient_study_from_dataset(ds: Dataset) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(patient, study)`` dicts for :func:`render_report` from a source instance's header."""
    patient = {
        "name": str(ds.get("PatientName", "") or ""),
        "id": str(ds.get("PatientID", "") or ""),
        "birth_date": str(ds.get("PatientBirthDate", "") or ""),
        "sex": str(ds.get("PatientSex", "") or ""),
        "age": str(ds.get("PatientAge", "") or ""),
    }
    study = {
        "date": str(ds.get("StudyDate", "") or ""),
        "accession": str(ds.get("AccessionNumber", "") or ""),
        "description": str(ds.get("StudyDescription", "") or ""),
        "uid": str(ds.get("StudyInstanceUID", "") or ""),
        "series_description": str(ds.get("SeriesDescription", "") or ""),
    }
    return patient, study
