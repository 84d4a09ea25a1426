"""Change per structure since an earlier scan, and whether it is a reliable change.

A change is *reliable* (at 95 %) when it is larger than the minimal detectable change,
``MDC95 = 1.96 x sqrt(2) x SEM``, where ``SEM`` is the within-head standard deviation of repeated
measurements of an unchanged head: two scans of an unchanged head differ by less than MDC95 in 95 %
of cases. The MDC depends on how the change is measured: the **paired** mode
(:mod:`hippo.wholehead.longitudinal`: both scans through the same crop) and two **independent**
runs each have their own, per side. Both come from re-acquisition benchmarks and ship beside the
model (``src/hippo/weights/<model>.change.json``, :func:`load_change_limits`), with their provenance
(benchmark, date, model version, number of pairs).

Wording (one sentence per side)::

    −4.1 % in 1.0 year: larger than the ±1.2 % two scans of an unchanged head differ by (95 %)
    −0.6 % in 1.0 year: within the ±1.2 % two scans of an unchanged head differ by (95 %): not a reliable change

Volumes in mm³; changes in % of the earlier volume; rates per 365.25-day year, given only when the
scans are at least :data:`MIN_DAYS_FOR_RATE` days apart. numpy-free, no torch.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ChangeLimits", "load_change_limits", "limits_path_for", "structure_change", "format_percent",
           "reliable_change_statement", "side_change", "wholehead_change", "STRUCTURES", "SIDES",
           "MIN_DAYS_FOR_RATE", "DAYS_PER_YEAR", "MODES"]

STRUCTURES = ("anterior", "posterior", "total")
SIDES = ("left", "right")
MODES = ("paired", "independent")
MIN_DAYS_FOR_RATE = 90
DAYS_PER_YEAR = 365.25
MINUS = "\u2212"


@dataclass(frozen=True)
class ChangeLimits:
    """Minimal detectable change (95 %) per measurement mode and side, in % of the earlier volume.

    Attributes:
        mdc95_percent: ``{"paired": {"left": %, "right": %}, "independent": {...}}``.
        provenance: per mode ``{"benchmark", "date", "model", "hippo_version", "n", ...}``.
        source: the file read ("" when built by hand).
    """

    mdc95_percent: Mapping[str, Mapping[str, float]]
    provenance: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = ""

    def mdc(self, mode: str, side: str) -> float | None:
        v = (self.mdc95_percent.get(mode) or {}).get(side)
        return None if v is None else float(v)

    def as_dict(self) -> dict[str, Any]:
        return {"mdc95_percent": {m: dict(v) for m, v in self.mdc95_percent.items()},
                "provenance": {m: dict(v) for m, v in self.provenance.items()}, "source": self.source}


def limits_path_for(model_path: str | os.PathLike | None = None) -> Path:
    """``<model stem>.change.json`` beside the model file (default: the shipped model's)."""
    if model_path is None:
        from hippo.weights import default_model_path

        model_path = default_model_path()
    p = Path(model_path)
    return p.with_name(p.name.split(".")[0] + ".change.json")


def load_change_limits(path_or_model: str | os.PathLike | None = None) -> ChangeLimits | None:
    """The MDC figures shipped beside a model (a ``.change.json`` path, a model path, or ``None`` for
    the shipped model). ``None`` when there is no such file: then no change is called reliable."""
    p = Path(path_or_model) if path_or_model is not None else limits_path_for(None)
    if not p.name.endswith(".change.json"):
        p = limits_path_for(p)
    if not p.is_file():
        return None
    data = json.loads(p.read_text(encoding="utf-8"))
    mdc = {m: {s: float(v) for s, v in (data.get("mdc95_percent", {}).get(m) or {}).items() if v is not None}
           for m in MODES}
    return ChangeLimits(mdc, {m: dict((data.get("provenance") or {}).get(m) or {}) for m in MODES}, str(p))


def format_percent(value: float, digits: int = 1) -> str:
    """``-4.13`` -> ``"−4.1 %"`` (a real minus sign), ``2`` -> ``"+2.0 %"``."""
    text = f"{value:+.{digits}f}"
    if float(text) == 0:
        text = f"{0:.{digits}f}"
    return text.replace("-", MINUS) + " %"


def structure_change(earlier_mm3: float, later_mm3: float, interval_days: int | None) -> dict[str, float | None]:
    """Change of one structure: mm³, % of the earlier volume, and per year (``None`` when the
    interval is unknown or shorter than :data:`MIN_DAYS_FOR_RATE` days, or the earlier volume 0)."""
    delta = float(later_mm3) - float(earlier_mm3)
    pct = 100.0 * delta / float(earlier_mm3) if earlier_mm3 > 0 else None
    rate_ok = interval_days is not None and interval_days >= MIN_DAYS_FOR_RATE
    years = interval_days / DAYS_PER_YEAR if interval_days else None
    return {"earlier_mm3": round(float(earlier_mm3), 1), "later_mm3": round(float(later_mm3), 1),
            "change_mm3": round(delta, 1), "change_percent": None if pct is None else round(pct, 3),
            "rate_mm3_per_year": round(delta / years, 1) if rate_ok and years else None,
            "rate_percent_per_year": round(pct / years, 3) if rate_ok and years and pct is not None else None}


def _interval_text(interval_days: int | None) -> str:
    if interval_days is None:
        return ""
    years = interval_days / DAYS_PER_YEAR
    if interval_days < MIN_DAYS_FOR_RATE:
        return f" in {interval_days} day{'s' if interval_days != 1 else ''}"
    return f" in {years:.1f} year{'' if round(years, 1) == 1.0 else 's'}"


def reliable_change_statement(change_percent: float | None, mdc95_percent: float | None,
                              interval_days: int | None) -> tuple[bool | None, str]:
    """``(reliable, sentence)``: whether ``|change| > MDC95`` and the sentence for the page / SR.

    ``reliable`` is ``None`` (and the sentence says so) when no MDC is known or no change could be
    computed."""
    if change_percent is None:
        return None, "no change computed (no earlier volume)"
    head = f"{format_percent(change_percent)}{_interval_text(interval_days)}"
    if mdc95_percent is None or not math.isfinite(mdc95_percent):
        return None, f"{head}: no re-acquisition figure for this model, reliability unknown"
    bound = f"\u00b1{mdc95_percent:.1f} %"
    if abs(change_percent) > mdc95_percent:
        return True, f"{head}: larger than the {bound} two scans of an unchanged head differ by (95 %)"
    return False, f"{head}: within the {bound} two scans of an unchanged head differ by (95 %): not a reliable change"


def side_change(earlier: Mapping[str, float], later: Mapping[str, float], interval_days: int | None,
                mdc95_percent: float | None) -> dict[str, Any]:
    """One side: per structure :func:`structure_change` (``earlier``/``later``: ``{"anterior",
    "posterior", "total"}`` mm³, or with ``_mm3`` suffixes), and the reliable-change verdict of the
    total."""
    def get(d, k):
        return float(d[k] if k in d else d[f"{k}_mm3"])
    out: dict[str, Any] = {k: structure_change(get(earlier, k), get(later, k), interval_days) for k in STRUCTURES}
    reliable, sentence = reliable_change_statement(out["total"]["change_percent"], mdc95_percent, interval_days)
    out.update(mdc95_percent=mdc95_percent, reliable=reliable, statement=sentence)
    return out


def parse_date(value: Any) -> _dt.date | None:
    """A DICOM DA (``YYYYMMDD``), an ISO date or date-time (``YYYY-MM-DD[THH:MM...]``) or a
    :class:`datetime.date`; ``None`` when empty or not a date."""
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return value
    text = str(value or "").strip()
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return _dt.datetime.strptime(text[:10] if "-" in text else text, fmt).date()
        except ValueError:
            continue
    return None


def wholehead_change(
    earlier: Mapping[str, Mapping[str, float]],
    later: Mapping[str, Mapping[str, float]],
    *,
    earlier_date: Any = None,
    later_date: Any = None,
    mode: str = "independent",
    limits: ChangeLimits | None = None,
    independent: tuple[Mapping[str, Mapping[str, float]], Mapping[str, Mapping[str, float]]] | None = None,
    prior: Mapping[str, Any] | None = None,
    note: str = "",
) -> dict[str, Any]:
    """The ``change`` block of a whole-head result.

    Args:
        earlier, later: ``{"left": {"anterior", "posterior", "total"}, "right": ...}`` mm³ measured by
            ``mode``.
        earlier_date, later_date: the study dates (``YYYYMMDD``, ISO or :class:`datetime.date`);
            without both there is no interval and no rate.
        mode: ``"paired"`` or ``"independent"``: which MDC applies.
        limits: :func:`load_change_limits`; ``None``: reliability unknown.
        independent: when ``mode`` is paired, the two scans' own volumes (earlier, later) for the
            independent figure beside it.
        prior: what the earlier result or scan was (source, date, algorithm), for the record.

    Returns:
        ``{"available": True, "mode", "interval_days", "interval_years", "earlier_date",
        "later_date", "sides": {"left": side_change(...), "right": ...}, "independent": {...} | None,
        "mdc": {mode: {"left", "right", "provenance"}}, "prior", "note"}``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    d0, d1 = parse_date(earlier_date), parse_date(later_date)
    days = (d1 - d0).days if d0 and d1 else None
    notes = [note] if note else []
    if days is not None and days < 0:
        notes.append(f"the earlier scan is dated after this one ({d0.isoformat()} > {d1.isoformat()})")
    if days is None:
        notes.append("no study dates: no interval and no rate per year")
    elif 0 <= days < MIN_DAYS_FOR_RATE:
        notes.append(f"no rate per year: the scans are only {days} days apart (at least {MIN_DAYS_FOR_RATE} needed)")
    mdc = (lambda m, s: None if limits is None else limits.mdc(m, s))
    sides = {s: side_change(earlier[s], later[s], days, mdc(mode, s)) for s in SIDES}
    ind = None
    if independent is not None and mode == "paired":
        ind = {s: side_change(independent[0][s], independent[1][s], days, mdc("independent", s)) for s in SIDES}
    return {
        "available": True, "mode": mode,
        "interval_days": days, "interval_years": None if days is None else round(days / DAYS_PER_YEAR, 4),
        "earlier_date": d0.isoformat() if d0 else None, "later_date": d1.isoformat() if d1 else None,
        "sides": sides, "independent": ind,
        "mdc": None if limits is None else {m: {**{s: limits.mdc(m, s) for s in SIDES},
                                                "provenance": dict(limits.provenance.get(m) or {})} for m in MODES},
        "mdc_source": None if limits is None else limits.source,
        "prior": dict(prior or {}), "note": "; ".join(n for n in notes if n),
    }
