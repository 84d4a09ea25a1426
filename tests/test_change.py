"""Change maths, the reliable-change wording, the shipped MDC file, and the page's change block."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hippo.change import (ChangeLimits, format_percent, limits_path_for, load_change_limits,
                          reliable_change_statement, side_change, structure_change, wholehead_change)

LIMITS = ChangeLimits({"paired": {"left": 1.2, "right": 1.4}, "independent": {"left": 3.0, "right": 3.5}},
                      {"paired": {"benchmark": "test", "n": 9}, "independent": {"benchmark": "test", "n": 9}})


def test_structure_change_maths():
    c = structure_change(3000.0, 2877.0, 365)
    assert c["change_mm3"] == pytest.approx(-123.0)
    assert c["change_percent"] == pytest.approx(-4.1)
    assert c["rate_percent_per_year"] == pytest.approx(-4.1 * 365.25 / 365, abs=1e-3)
    assert c["rate_mm3_per_year"] == pytest.approx(-123.0 * 365.25 / 365, abs=0.1)
    short = structure_change(3000.0, 2970.0, 30)  # a month apart: no rate
    assert short["change_percent"] == pytest.approx(-1.0) and short["rate_percent_per_year"] is None
    assert structure_change(0.0, 10.0, 400)["change_percent"] is None
    assert structure_change(3000.0, 2970.0, None)["rate_mm3_per_year"] is None


def test_wording_reliable_and_not():
    ok, text = reliable_change_statement(-4.13, 1.2, 365)
    assert ok is True
    assert text == "\u22124.1 % in 1.0 year: larger than the \u00b11.2 % two scans of an unchanged head differ by (95 %)"
    ok, text = reliable_change_statement(-0.8, 1.2, 730)
    assert ok is False and text.startswith("\u22120.8 % in 2.0 years: within the \u00b11.2 %")
    assert text.endswith("not a reliable change")
    ok, text = reliable_change_statement(-3.0, None, 365)
    assert ok is None and "unknown" in text
    # exactly at the limit is not larger than it
    assert reliable_change_statement(-1.2, 1.2, 365)[0] is False
    assert reliable_change_statement(1.3, 1.2, 365)[0] is True  # growth counts too
    assert format_percent(2) == "+2.0 %" and format_percent(-0.04) == "0.0 %"
    assert " in 40 days" in reliable_change_statement(-2.0, 1.2, 40)[1]


def test_side_and_wholehead_change_pick_the_mode_limits():
    e = {"left": {"anterior": 1500, "posterior": 1500, "total": 3000},
         "right": {"anterior_mm3": 1600, "posterior_mm3": 1400, "total_mm3": 3000}}
    later = {"left": {"anterior": 1440, "posterior": 1440, "total": 2880},
             "right": {"anterior": 1590, "posterior": 1390, "total": 2980}}
    block = wholehead_change(e, later, earlier_date="20240101", later_date="2025-01-01", mode="paired",
                             limits=LIMITS, independent=(e, later))
    assert block["interval_days"] == 366
    left, right = block["sides"]["left"], block["sides"]["right"]
    assert left["total"]["change_percent"] == pytest.approx(-4.0)
    assert left["mdc95_percent"] == 1.2 and left["reliable"] is True
    assert right["total"]["change_percent"] == pytest.approx(-2 / 3, abs=1e-3)
    assert right["mdc95_percent"] == 1.4 and right["reliable"] is False
    # the independent figure beside it uses the independent limits
    assert block["independent"]["left"]["mdc95_percent"] == 3.0
    assert block["independent"]["left"]["reliable"] is True
    assert block["mdc"]["paired"]["provenance"]["n"] == 9
    ind = wholehead_change(e, later, earlier_date="20240101", later_date="20250101", limits=LIMITS)
    assert ind["sides"]["left"]["mdc95_percent"] == 3.0 and ind["independent"] is None
    nodates = wholehead_change(e, later, limits=None)
    assert nodates["interval_days"] is None and "no study dates" in nodates["note"]
    assert nodates["sides"]["left"]["reliable"] is None
    with pytest.raises(ValueError):
        wholehead_change(e, later, mode="guess")
    assert side_change(e["left"], later["left"], 365, None)["reliable"] is None


def test_shipped_limits_load_with_provenance():
    path = limits_path_for(None)
    assert path.name == "hippocampus_25d.change.json"
    limits = load_change_limits()
    assert limits is not None, f"{path} is missing"
    data = json.loads(path.read_text())
    for mode in ("paired", "independent"):
        for side in ("left", "right"):
            v = limits.mdc(mode, side)
            assert v is not None and 0 < v < 20
        prov = limits.provenance[mode]
        for key in ("benchmark", "date", "model", "hippo_version", "n"):
            assert key in prov, (mode, key)
    # the paired mode is the more precise one
    assert all(limits.mdc("paired", s) < limits.mdc("independent", s) for s in ("left", "right"))
    assert data["mdc95_percent"]["paired"]["left"] == limits.mdc("paired", "left")


def test_load_limits_missing_file_is_none(tmp_path):
    assert load_change_limits(tmp_path / "model.pt") is None
    (tmp_path / "model.change.json").write_text(json.dumps({"mdc95_percent": {"paired": {"left": 1.0, "right": 2.0}}}))
    lim = load_change_limits(tmp_path / "model.pt")
    assert lim.mdc("paired", "right") == 2.0 and lim.mdc("independent", "left") is None


def test_page_draws_the_change_block():
    from hippo.wholehead.page import render_wholehead_report

    rng = np.random.default_rng(0)
    image = rng.random((60, 70, 50)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[20:25, 30:40, 20:25] = 1
    labels[40:45, 30:40, 20:25] = 3
    summary = {"left": {"total_mm3": 3000}, "right": {"total_mm3": 3000}, "review": [], "notes": []}
    plain = render_wholehead_report(image, labels, (1, 1, 1), summary)
    e = {s: {"anterior": 1500, "posterior": 1500, "total": 3000} for s in ("left", "right")}
    later = {s: {"anterior": 1440, "posterior": 1440, "total": 2880} for s in ("left", "right")}
    change = wholehead_change(e, later, earlier_date="20240101", later_date="20250101", mode="paired", limits=LIMITS,
                              independent=(e, later))
    change["trajectory"] = {"points": [{"date": "2023-01-01", "left_mm3": 3050, "right_mm3": 3040},
                                       {"date": "2024-01-01", "left_mm3": 3000, "right_mm3": 3000},
                                       {"date": "2025-01-01", "left_mm3": 2880, "right_mm3": 2880}]}
    with_change = render_wholehead_report(image, labels, (1, 1, 1), dict(summary, change=change))
    assert with_change.height > plain.height + 100  # heading, two sides, the independent line, the plot
    none = render_wholehead_report(image, labels, (1, 1, 1),
                                   dict(summary, change={"available": False, "reason": "no earlier scan"}))
    assert none.height > plain.height


def test_wholehead_sr_change_groups_per_side_pass_dciodvfy(tmp_path):
    """One "Change since prior study: left/right hippocampus" group per side, finding site with
    laterality, the change, the MDC and the reliable-change sentence; dciodvfy without errors."""
    import pydicom
    from conftest import dciodvfy_problems
    from test_wholehead_dicom import LEFT, RIGHT, _codes, _labels, _sr_groups, _synthetic_head

    from hippo.dicom.objects import make_wholehead_seg, make_wholehead_sr
    from hippo.dicom.volume import load_series
    from hippo.measure import measure_volumes
    from hippo.scanner import write_wholehead_study

    manifest = write_wholehead_study(_synthetic_head(tmp_path), tmp_path / "s", seed=3)
    volume = load_series(manifest["files"]["t1_mprage_sag"])
    labels = _labels(volume.array.shape)
    seg = make_wholehead_seg(volume.datasets, volume.to_source(labels), model_version="t")
    sides = {"left": measure_volumes(np.where(labels <= 2, labels, 0), volume.spacing),
             "right": measure_volumes(np.where(labels > 2, labels - 2, 0), volume.spacing)}
    e = {s: {"anterior": 1500, "posterior": 1500, "total": 3000} for s in ("left", "right")}
    later = {"left": {"anterior": 1440, "posterior": 1440, "total": 2880},
             "right": {"anterior": 1495, "posterior": 1495, "total": 2990}}
    change = wholehead_change(e, later, earlier_date="20240101", later_date="20250101", mode="paired", limits=LIMITS)
    sr = make_wholehead_sr(volume.datasets, seg, sides, asymmetry_index_percent=1.5, etiv_mm3=1.5e6,
                           model_version="t", change=change, sop_instance_uid=pydicom.uid.generate_uid())
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_problems(path)["errors"] == []
    groups = _sr_groups(path, "Change since")
    assert set(groups) == {"Change since prior study: left hippocampus", "Change since prior study: right hippocampus"}
    for side, code, other in (("left", LEFT, RIGHT), ("right", RIGHT, LEFT)):
        items = groups[f"Change since prior study: {side} hippocampus"]
        codes = [c for i in items for c in _codes(i)]
        assert code in codes and other not in codes
        nums = {str(i.ConceptNameCodeSequence[0].CodeValue): float(i.MeasuredValueSequence[0].NumericValue)
                for i in items if i.ValueType == "NUM"}
        assert nums["VOLCHGPCT"] == pytest.approx(change["sides"][side]["total"]["change_percent"])
        assert nums["MDC95PCT"] == LIMITS.mdc("paired", side)
        text = [str(i.TextValue) for i in items if i.ValueType == "TEXT" and "unchanged head" in str(i.TextValue)]
        assert text and ("larger than" in text[0]) == (side == "left") and "paired" in text[0]
    assert "RELCHG" not in _codes(make_wholehead_sr(volume.datasets, seg, sides, asymmetry_index_percent=None,
                                                    etiv_mm3=None, model_version="t"))


def test_prior_result_json_without_its_scan_gives_the_independent_change(tmp_path):
    """prior= a result.json of ours whose scan is gone: the recorded volumes, the independent MDC."""
    from types import SimpleNamespace

    from hippo.measure import Volumes
    from hippo.wholehead.longitudinal import change_since_prior, read_prior_input

    rec = {"status": "ok", "scan": str(tmp_path / "gone.nii.gz"), "scan_date": "2024-01-01",
           "volumes_mm3": {s: {"anterior_mm3": 1500.0, "posterior_mm3": 1500.0, "total_mm3": 3000.0}
                           for s in ("left", "right")}}
    path = tmp_path / "result.json"
    path.write_text(json.dumps(rec))
    prior = read_prior_input(path)
    assert prior.kind == "result" and prior.study_date == "2024-01-01"
    vol = Volumes(anterior_voxels=1440, posterior_voxels=1440, spacing_mm=(1.0, 1.0, 1.0), voxel_volume_mm3=1.0)
    current = SimpleNamespace(side=lambda s: SimpleNamespace(volumes=vol))
    block = change_since_prior(str(path), (None, None), current, agent=None, current_date="20250101", limits=LIMITS)
    assert block["available"] and block["mode"] == "independent" and block["interval_days"] == 366
    assert block["sides"]["left"]["total"]["change_percent"] == pytest.approx(-4.0)
    assert block["sides"]["left"]["mdc95_percent"] == 3.0 and block["sides"]["left"]["reliable"] is True
    json.dumps(block)
    # what cannot be used says why, and never raises
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"status": "failed", "volumes_mm3": rec["volumes_mm3"]}))
    out = change_since_prior(str(bad), (None, None), current, agent=None)
    assert out["available"] is False and "not a finished measurement" in out["reason"]
    assert change_since_prior(str(tmp_path / "nothing.nii.gz"), (None, None), current, agent=None)["available"] is False
