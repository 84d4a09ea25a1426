"""The curation report as Markdown (``report.md``): summary, counts, volume statistics, every
flagged or excluded case with file and reason, the embedded plots."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any


from hippo.fileio import to_plain
from hippo.curate.records import CaseRecord


# ---- report --------------------------------------------------------------------------------


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(x: Any, fmt: str = ".0f") -> str:
    return "–" if x is None else format(x, fmt)


def render_report_md(records: list[CaseRecord], summary: dict, parameters: dict, files: dict[str, Path],
            out_dir: Path) -> str:
    s = summary
    lines = [
        "# Hippocampus dataset curation report",
        "",
        f"- dataset: `{parameters['root']}`",
        f"- generated: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "- outputs: `curation.json` (all per-case statistics), `manifest.json` (clean cases for training)"
        + (", `clean/` (clean copy, " + str(parameters["clean_copy"]) + ")" if "clean" in files else ""),
        "",
        "## Summary",
        "",
        "| | count |",
        "|---|---:|",
        f"| cases (names in imagesTr ∪ labelsTr) | {s['n_cases']} |",
        f"| image/label pairs scanned | {s['n_pairs_scanned']} |",
        f"| unpaired files | {s['n_unpaired']} |",
        f"| **clean cases (in manifest)** | **{s['n_clean']}** |",
        f"| excluded cases | {s['n_excluded']} |",
        f"| flagged but kept | {s['n_flagged_kept']} |",
        f"| unlabelled test images (imagesTs, not scanned) | {s['n_test_images']} |",
        "",
    ]
    if s["reason_counts"]:
        lines += ["Flags by reason: " + ", ".join(f"`{k}` {v}" for k, v in s["reason_counts"].items()), ""]
    else:
        lines += ["No case was flagged.", ""]

    lines += ["## Files", "", "| | counts |", "|---|---|",
              "| image stored dtype | " + ", ".join(f"{k}: {v}" for k, v in s["image_dtypes"].items()) + " |",
              "| label stored dtype | " + ", ".join(f"{k}: {v}" for k, v in s["label_dtypes"].items()) + " |",
              "| voxel spacing [mm] | " + ", ".join(f"{k}: {v}" for k, v in s["spacings"].items()) + " |",
              f"| image shape | {s['n_distinct_shapes']} distinct; per axis min {s['shape_min']}, max {s['shape_max']} |",
              "| most common shapes | " + ", ".join(f"{'×'.join(map(str, c['shape']))}: {c['count']}"
                                                  for c in s["common_shapes"][:5]) + " |",
              f"| image maximum | min {_num(s['intensity_max']['min'], '.4g')}, median "
              f"{_num(s['intensity_max']['median'], '.4g')}, max {_num(s['intensity_max']['max'], '.4g')} |",
              f"| image minimum | min {_num(s['intensity_min']['min'], '.4g')}, max {_num(s['intensity_min']['max'], '.4g')} |",
              ""]
    float_labels = [r for r in records if r.label_dtype and not r.label_dtype.startswith(("uint", "int"))]
    if float_labels:
        ok = [r.name for r in float_labels if "invalid_label_values" not in r.codes()]
        bad = [r.name for r in float_labels if "invalid_label_values" in r.codes()]
        lines += [f"Labels stored as floating point: {len(float_labels)}"
                  + (f"; integer-valued and accepted: {', '.join(ok)}" if ok else "")
                  + (f"; rejected: {', '.join(bad)}" if bad else "") + ".", ""]

    v = s["volumes_clean_mm3"]
    lines += [f"## Hippocampal volume, clean cases (n={v['total_mm3']['n']})", "",
              "| structure | mean ± sd [mm³] | median | min | max |", "|---|---:|---:|---:|---:|"]
    for key, title in (("anterior_mm3", "anterior (1)"), ("posterior_mm3", "posterior (2)"), ("total_mm3", "total")):
        d = v[key]
        lines.append(f"| {title} | {_num(d['mean'])} ± {_num(d['sd'])} | {_num(d['median'])} | "
                     f"{_num(d['min'])} | {_num(d['max'])} |")
    o = s["outliers"]
    if o.get("volume"):
        ov = o["volume"]
        lines += ["", f"Volume outliers: robust z-score of the total volume over the {o['n_eligible']} error-free "
                      f"cases (median {ov['median']:.0f} mm³, robust sd {ov['scale']:.0f} mm³)"
                  + (f"; flagged when |z| > {ov['threshold']:g}, i.e. outside "
                     f"[{ov['low']:.0f}, {ov['high']:.0f}] mm³" if ov["threshold"] is not None else "; disabled")
                  + ("; excluded." if parameters["exclude_volume_outliers"] else "; kept (flag only).")]
    elif o.get("skipped"):
        lines += ["", f"Volume outliers: {o['skipped']}."]
    lines.append("")

    flagged = [r for r in records if r.flags]
    lines += ["## Excluded and flagged cases", ""]
    if not flagged:
        lines += ["None.", ""]
    else:
        lines += ["| case | status | reason | file | detail |", "|---|---|---|---|---|"]
        for r in flagged:
            status = "excluded" if r.excluded else "kept"
            for f in r.flags:
                shown = os.path.relpath(f.file, parameters["root"]) if f.file else "–"
                lines.append(f"| {_md(r.name)} | {status} | `{f.code}` ({f.severity}) | `{_md(shown)}` | {_md(f.message)} |")
        lines.append("")

    plots = [("volume_histograms", "Volume histograms"), ("volume_scatter", "Anterior vs posterior volume"),
             ("shape_histograms", "Image dimensions"), ("intensity_max_histogram", "Image intensity maxima")]
    if any(k in files for k, _ in plots):
        lines += ["## Plots", ""]
        for key, title in plots:
            if key in files:
                lines += [f"### {title}", "", f"![{title}]({os.path.relpath(files[key], out_dir)})", ""]

    lines += ["## Parameters", "", "```json", json.dumps(to_plain(parameters), indent=2), "```", ""]
    return "\n".join(lines)
