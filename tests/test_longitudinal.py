"""Paired longitudinal mode: halfway transform, rigid registration between scans, the simulated
atrophy's analytic truth, and (real head) a known 5 % atrophy recovered within 1 percentage point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hippo.wholehead.atrophy import (atrophy_zone, linear_scale, rigid_matrix, simulate_atrophy,
                                     simulate_reacquisition)
from hippo.wholehead.longitudinal import halfway

SHARED = Path(__file__).resolve().parents[2] / "shared/data/wholehead"
EXAMPLE = SHARED / "example_brain_t1.nii.gz"
needs_example = pytest.mark.skipif(not EXAMPLE.exists(), reason=f"{EXAMPLE} not present (../shared data absent)")


def test_halfway_is_the_rigid_square_root():
    rng = np.random.default_rng(1)
    for _ in range(5):
        t = rigid_matrix(rng.uniform(-20, 20, 3), rng.uniform(-15, 15, 3), rng.uniform(-50, 50, 3))
        s = halfway(t)
        assert np.allclose(s @ s, t, atol=1e-9)
        assert np.allclose(s[:3, :3] @ s[:3, :3].T, np.eye(3), atol=1e-12) and np.linalg.det(s[:3, :3]) > 0
        ang = lambda m: np.degrees(np.arccos(np.clip((np.trace(m[:3, :3]) - 1) / 2, -1, 1)))  # noqa: E731
        assert ang(s) == pytest.approx(ang(t) / 2, abs=1e-6)
    assert np.allclose(halfway(np.eye(4)), np.eye(4))


def _blob(shape=(64, 72, 60), spacing=1.2):
    """A smooth ellipsoidal blob (Gaussian-edged) in a noise-free image, and its affine."""
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = (-30, -40, -35)
    idx = np.indices(shape, dtype=np.float64)
    pts = np.einsum("ij,j...->i...", aff[:3, :3], idx) + aff[:3, 3][:, None, None, None]
    c = np.array([8.0, 2.0, -1.0])
    r = np.sqrt(((pts[0] - c[0]) / 9) ** 2 + ((pts[1] - c[1]) / 16) ** 2 + ((pts[2] - c[2]) / 7) ** 2)
    img = (1.0 / (1.0 + np.exp((r - 1.0) / 0.08))).astype(np.float32)
    return img, aff, img > 0.5


def test_simulated_atrophy_changes_volume_by_s_cubed():
    img, aff, mask = _blob()
    zone = atrophy_zone(mask, aff, margin_mm=4.0, fade_mm=10.0)
    # the zone holds every voxel of the structure
    idx = np.argwhere(mask)
    assert zone.rho(idx @ aff[:3, :3].T + aff[:3, 3]).max() < 1.0
    voxel = float(np.prod(np.diag(aff)[:3]))
    base = float(img.sum()) * voxel  # the blob's "soft volume" (intensity integral), mm³
    for change in (-0.02, -0.05):
        out = simulate_atrophy(img, aff, zone, change)
        got = float(out.sum()) * voxel
        assert got / base - 1 == pytest.approx(change, abs=0.0015), change
        # voxels outside the fade band are untouched
        pts = np.indices(img.shape).reshape(3, -1).T @ aff[:3, :3].T + aff[:3, 3]
        far = (zone.rho(pts) > zone.outer_rho + 0.05).reshape(img.shape)
        assert np.array_equal(out[far], img[far])
    assert linear_scale(-0.05) ** 3 == pytest.approx(0.95)
    with pytest.raises(ValueError):
        atrophy_zone(np.zeros((4, 4, 4), bool), aff)
    # two zones whose fade bands meet would break the truth: refused
    with pytest.raises(ValueError, match="overlap"):
        simulate_atrophy(img, aff, [zone, zone], -0.02)


def test_thresholded_label_would_hide_the_change():
    """Why the truth is analytic: the hard mask of the warped image hardly moves at -2 %."""
    img, aff, mask = _blob()
    zone = atrophy_zone(mask, aff)
    out = simulate_atrophy(img, aff, zone, -0.02)
    assert abs((out > 0.5).sum() / mask.sum() - 0.98) < 0.01  # it moves, but only by whole voxels


def _textured_phantom(margin: int):
    """A hippocampus-sized ellipsoid (semi-axes 8 / 14 / 6 voxels, 100 on 40) with a smooth texture
    (12 plane waves of 4-8 voxel wavelength, ±20) filling the segmentation crop (35 x 50 x 36) plus
    ``margin`` voxels on every face, 1 mm voxels. Returns ``(image, ellipsoidal radius, offsets)``."""
    shape = tuple(n + 2 * margin for n in (35, 50, 36))
    idx = np.indices(shape, dtype=np.float64)
    p = idx - ((np.asarray(shape, np.float64) - 1) / 2)[:, None, None, None]
    r = np.sqrt((p[0] / 8) ** 2 + (p[1] / 14) ** 2 + (p[2] / 6) ** 2)
    img = 40.0 + 60.0 / (1.0 + np.exp((r - 1.0) / 0.03))
    rng = np.random.default_rng(123)
    for _ in range(12):
        w = rng.normal(size=3)
        w *= 2 * np.pi / rng.uniform(4, 8) / np.linalg.norm(w)
        img += 20 / 3 * np.cos(np.einsum("i,i...->...", w, p) + rng.uniform(0, 2 * np.pi))
    return img.astype(np.float32), r, p


@pytest.mark.parametrize("change", [-5.0, 0.0])
def test_jacobian_change_recovers_a_known_atrophy_through_a_bias_field(change):
    """A known contraction (``simulate_atrophy``: exact scaling inside a zone round the structure) of a
    textured phantom, the later crop also under a smooth differential bias field (about ±20 %) and
    both with noise (2 % of the contrast): the Jacobian change is within 0.5 pp of the truth per
    structure, and 0 stays 0 within 0.5 pp."""
    from hippo.wholehead.longitudinal import JACOBIAN_MARGIN_VOXELS, jacobian_change

    m = JACOBIAN_MARGIN_VOXELS
    img, r, p = _textured_phantom(m)
    aff = np.eye(4)
    zone = atrophy_zone(r < 1, aff)
    later = simulate_atrophy(img, aff, zone, change / 100.0) if change else img
    s = linear_scale(change / 100.0)

    def labels(radius):  # 1 anterior, 2 posterior, on the segmentation crop (the margin cut off)
        lab = np.where(radius < 1, np.where(p[1] < 0, 1, 2), 0).astype(np.uint8)
        return lab[m:-m, m:-m, m:-m]

    u = p / np.abs(p).max(axis=(1, 2, 3))[:, None, None, None]
    bias = np.exp(0.2 * (0.6 * u[0] - 0.5 * u[1] ** 2 + 0.4 * u[1] * u[2]))
    a = img + np.random.default_rng(1).normal(0.0, 2.0, img.shape)
    b = later * bias + np.random.default_rng(2).normal(0.0, 2.0, img.shape)
    out = jacobian_change(a, b, labels(r), labels(r / s))
    for key in ("anterior", "posterior", "total"):
        assert out[key] == pytest.approx(change, abs=0.5), (key, out)
    assert out["total"] == pytest.approx((out["forward_total"] + out["backward_total"]) / 2)
    with pytest.raises(ValueError, match="margin"):
        jacobian_change(a, b, labels(r)[:-1], labels(r / s)[:-1])


def test_with_margin_keeps_the_crop_grid():
    from hippo.wholehead.crops import crop_geometry
    from hippo.wholehead.longitudinal import with_margin

    geo = crop_geometry(np.eye(3), np.array([-25.0, -20.0, -15.0]), "right")
    wide = with_margin(geo, 8)
    assert wide.shape == tuple(n + 16 for n in geo.shape)
    assert np.allclose(wide.to_scan(np.array([8.0, 8.0, 8.0])), geo.to_scan(np.zeros(3)))
    assert np.allclose(wide.to_scan(np.array([10.0, 20.0, 30.0])), geo.to_scan(np.array([2.0, 12.0, 22.0])))


@needs_example
def test_rigid_between_recovers_a_known_motion():
    from hippo.scan_io import read_scan
    from hippo.wholehead.longitudinal import rigid_between

    s = read_scan(EXAMPLE)
    rng = np.random.default_rng(3)
    moved, motion = simulate_reacquisition(s.array, s.affine, rng, max_angle_deg=5.0, max_shift_mm=4.0)
    # points about where the hippocampi are in this head (from the grid's centre), and the centre
    centre = s.affine[:3, :3] @ ((np.asarray(s.array.shape) - 1) / 2) + s.affine[:3, 3]
    pts = np.array([[-27.0, -22.0, -15.0], [27.0, -22.0, -15.0], [0.0, 0.0, 0.0]]) + centre
    r = rigid_between(s.array, s.affine, moved, s.affine, local_centres_mm={"left": pts[0], "right": pts[1]})
    truth = pts @ motion[:3, :3].T + motion[:3, 3]
    err = np.linalg.norm((pts @ r.matrix[:3, :3].T + r.matrix[:3, 3]) - truth, axis=1)
    assert err.max() < 0.6, err  # the whole-head map (mm)
    for i, side in enumerate(("left", "right")):  # each side's local refinement
        m = r.for_side(side)
        assert np.linalg.norm(m[:3, :3] @ pts[i] + m[:3, 3] - truth[i]) < 0.6, side


@pytest.mark.slow
@needs_example
def test_paired_mode_recovers_five_percent_atrophy_on_a_real_head(tmp_path):
    from hippo.infer import InferenceAgent
    from hippo.scan_io import read_scan
    from hippo.weights import default_model_path
    from hippo.wholehead.longitudinal import change_since_prior, paired_change
    from hippo.wholehead.segment import locator_agent, segment_wholehead

    s = read_scan(EXAMPLE)
    agent = InferenceAgent.from_file(default_model_path(), precision="auto")
    locator = locator_agent(agent)
    base = segment_wholehead(s.array, s.affine, agent, locator=locator)
    zones = [atrophy_zone(base.side(side).labels > 0, s.affine) for side in ("left", "right")]
    later = simulate_atrophy(s.array, s.affine, zones, -0.05)
    fol = segment_wholehead(later, s.affine, agent, locator=locator)
    pr = paired_change((s.array, s.affine), (later, s.affine), agent, earlier_result=base, later_result=fol)
    for side in ("left", "right"):
        got = pr.side(side).change_percent("total")
        assert got == pytest.approx(-5.0, abs=1.0), (side, got, pr.independent_change_percent(side))
    # the same through the door used by hippo.predict prior=: the earlier scan's file
    import nibabel as nib

    f = tmp_path / "earlier.nii.gz"
    nib.save(nib.Nifti1Image(s.array, s.affine), str(f))
    block = change_since_prior(str(f), (later, s.affine), fol, agent, locator=locator, current_date="2025-03-01",
                               prior_date="2024-03-01")
    assert block["available"] and block["mode"] == "paired" and block["interval_days"] == 365
    for side in ("left", "right"):
        assert block["sides"][side]["total"]["change_percent"] == pytest.approx(-5.0, abs=1.0)
        assert "year" in block["sides"][side]["statement"]
    json.dumps(block)  # JSON-able for result.json


def _fake_result(left: float, right: float):
    """Stands in for a WholeHeadResult where only the volumes are read (independent change)."""
    from types import SimpleNamespace

    def side(total):
        return SimpleNamespace(volumes=SimpleNamespace(anterior_mm3=total / 2, posterior_mm3=total / 2, total_mm3=total))

    sides = {"left": side(left), "right": side(right)}
    return SimpleNamespace(side=lambda s: sides[s])


def _result_json(path: Path, date: str, left: float, right: float, change: dict | None = None) -> Path:
    vols = {s: {"anterior_mm3": v / 2, "posterior_mm3": v / 2, "total_mm3": v} for s, v in (("left", left), ("right", right))}
    path.write_text(json.dumps({"status": "ok", "scan_date": date, "volumes_mm3": vols,
                                **({"change": change} if change else {})}))
    return path


def test_three_visits_chained_by_result_json_give_a_trajectory_with_its_noise_band(tmp_path):
    """Visit 3 with ``prior=`` visit 2's result.json (which was compared with visit 1's): the change
    block carries all three time points, oldest first, each visit's own volumes, and the independent
    MDC95 per side; the page draws the trajectory (taller than with two points)."""
    from hippo.change import load_change_limits
    from hippo.wholehead.longitudinal import change_since_prior
    from hippo.wholehead.page import render_wholehead_report

    limits = load_change_limits()
    v1 = _result_json(tmp_path / "v1.json", "2023-01-10", 3100.0, 3200.0)
    c2 = change_since_prior(v1, (None, None), _fake_result(3040.0, 3150.0), None, current_date="2024-01-12")
    assert c2["available"], c2
    assert [p["date"] for p in c2["trajectory"]["points"]] == ["2023-01-10", "2024-01-12"]
    v2 = _result_json(tmp_path / "v2.json", "2024-01-12", 3040.0, 3150.0, change=c2)
    c3 = change_since_prior(v2, (None, None), _fake_result(2950.0, 3110.0), None, current_date="2025-01-15")
    traj = c3["trajectory"]
    assert [(p["date"], p["left_mm3"], p["right_mm3"]) for p in traj["points"]] == [
        ("2023-01-10", 3100.0, 3200.0), ("2024-01-12", 3040.0, 3150.0), ("2025-01-15", 2950.0, 3110.0)]
    assert traj["mdc95_percent"] == {s: limits.mdc("independent", s) for s in ("left", "right")}
    # the change itself is still against the latest prior only
    assert c3["earlier_date"] == "2024-01-12" and c3["sides"]["left"]["total"]["change_mm3"] == pytest.approx(-90.0)

    image = np.random.default_rng(0).random((60, 70, 50)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[20:25, 30:40, 20:25], labels[40:45, 30:40, 20:25] = 1, 3
    summary = {"left": {"total_mm3": 2950}, "right": {"total_mm3": 3110}, "review": [], "notes": []}
    two = render_wholehead_report(image, labels, (1, 1, 1), dict(summary, change=c2))
    three = render_wholehead_report(image, labels, (1, 1, 1), dict(summary, change=c3))
    assert three.height >= two.height + 200  # the plot, its axis dates and the band's legend
