"""Change you can trust, through the network: two whole-head studies of one patient a year apart.

The real Orthanc (Debian package: authentication, DICOMweb plugin, Lua auto-routing) routes each
study's whole-head T1 to the real listener (the shipped model, float32), whose results go back into
the PACS. The second study is the first head with both hippocampi contracted by a known 5 %
(:func:`hippo.wholehead.atrophy.simulate_atrophy`); the listener finds the first study's SR in the
PACS (QIDO-RS), fetches the T1 series it measured (WADO-RS) and measures the pair in the paired
mode. Checked on the second study: ``result.json``'s change per side (mm³, %, %/year, the
reliable-change statement), the SR read back from Orthanc (a change group per side, ``dciodvfy``
clean) and the report page (PNG and the SC in the PACS).

``service`` + ``slow``: about 2 minutes on two idle CPU cores (4 on a busy machine); skipped, saying
why, without Orthanc or ``../shared/data/wholehead/example_brain_t1.nii.gz``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import dciodvfy_problems
from test_prior import change_groups, require_orthanc, results_in_pacs, routed_pacs_and_listener, send_and_wait

pytestmark = [pytest.mark.service, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "shared/data/wholehead/example_brain_t1.nii.gz"
PATIENT = "WH-CHANGE-1"
DATES = ("20240311", "20250311")
ATROPHY = -0.05


def _atrophied_copy(out: Path) -> Path:
    """The example head with both hippocampi contracted by :data:`ATROPHY` (zones from the shipped
    model's segmentation of the head), saved as NIfTI at ``out``."""
    from hippo.infer import InferenceAgent
    from hippo.scan_io import read_scan
    from hippo.weights import default_model_path
    from hippo.wholehead.atrophy import atrophy_zone, simulate_atrophy
    from hippo.wholehead.segment import locator_agent, segment_wholehead

    scan = read_scan(EXAMPLE)
    agent = InferenceAgent.from_file(default_model_path(), precision="auto")
    base = segment_wholehead(scan.array, scan.affine, agent, locator=locator_agent(agent))
    zones = [atrophy_zone(base.side(side).labels > 0, scan.affine) for side in ("left", "right")]
    later = simulate_atrophy(np.asarray(scan.array, np.float32), scan.affine, zones, ATROPHY)
    nib.save(nib.Nifti1Image(np.asarray(later, np.float32), scan.affine), str(out))
    return out


def test_whole_head_follow_up_through_the_network_shows_paired_change_per_side(tmp_path):
    from hippo.scanner import StudyInfo, write_wholehead_study
    from hippo.weights import default_model_path

    require_orthanc()
    if not EXAMPLE.is_file():
        pytest.skip(f"{EXAMPLE} not present (../shared/data absent)")
    scans = (EXAMPLE, _atrophied_copy(tmp_path / "later.nii.gz"))
    with routed_pacs_and_listener(tmp_path, default_model_path(), name="HippoVolume whole-head change test PACS",
                                  processor_options={"io_threads": 2, "precision": "float32"}, timeout=30.0,
                                  preload_model=True, stop_timeout=120) as (settings, auth, listener):
        uids = []
        for n, (scan, date) in enumerate(zip(scans, DATES)):
            info = StudyInfo(patient_id=PATIENT, patient_name="Change^Whole", patient_birth_date="19500101",
                             patient_sex="F", study_date=date, seed=60 + n)
            manifest = write_wholehead_study(scan, tmp_path / f"study{n}", study=info, distractors=False,
                                             localizer=False)
            uids.append(manifest["study_instance_uid"])
            send_and_wait(settings, listener, tmp_path / f"study{n}", uids[-1],
                          f"whole-head study {n + 1} to be processed", timeout=420)

        first, second = (json.loads((listener.results_dir / uid / "result.json").read_text()) for uid in uids)
        assert first["kind"] == second["kind"] == "wholehead"
        assert first["change"] == {"available": False, "reason": f"the PACS holds no earlier result for patient ID "
                                                                 f"{PATIENT} before 2024-03-11"}

        change = second["change"]
        assert change["available"] and change["mode"] == "paired", change
        assert change["interval_days"] == 365 and change["earlier_date"] == "2024-03-11"
        prior = change["prior"]
        assert prior["kind"] == "dicom" and prior["study_instance_uid"] == uids[0]
        assert prior["found_in"] == f"PACS {settings.http_url}/dicom-web" and "paired" in prior["used"]
        assert "fetched from the PACS" in change["note"]
        for side in ("left", "right"):
            s = change["sides"][side]
            total = s["total"]
            for key in ("change_mm3", "change_percent", "rate_mm3_per_year", "rate_percent_per_year"):
                assert total[key] is not None, (side, key)
            # a known 5 % contraction; the paired Jacobian read -4.8 / -4.9 % on this head's grid
            assert -7.0 < total["change_percent"] < -3.0, (side, total)
            assert total["rate_percent_per_year"] == pytest.approx(total["change_percent"] * 365.25 / 365, abs=0.01)
            assert s["mdc95_percent"] is not None and s["reliable"] is True, s
            assert "in 1.0 year: larger than the" in s["statement"], s["statement"]
        assert change["independent"]["left"]["total"]["change_percent"] is not None  # shown beside it

        # the SR and the page (SC) in the PACS are the listener's; the SR holds a change group per side
        sr_bytes = results_in_pacs(settings, auth, listener, uids[1])
        groups = change_groups(pydicom.dcmread(io.BytesIO(sr_bytes)))
        assert set(groups) == {f"Change since prior study: {side} hippocampus" for side in ("left", "right")}
        for side in ("left", "right"):
            total, group = change["sides"][side]["total"], groups[f"Change since prior study: {side} hippocampus"]
            assert group["VOLCHG"] == pytest.approx(total["change_mm3"], abs=0.05)
            assert group["VOLCHGPCT"] == pytest.approx(total["change_percent"], abs=1e-3)
            assert group["VOLRATEPCT"] == pytest.approx(total["rate_percent_per_year"], abs=1e-3)
            assert group["PRIORDATE"] == "20240311"
            assert any("larger than the" in str(v) and "(paired measurement)" in str(v) for v in group.values())
        (tmp_path / "sr_from_pacs.dcm").write_bytes(sr_bytes)
        problems = dciodvfy_problems(tmp_path / "sr_from_pacs.dcm")
        assert problems["errors"] == [], problems["errors"]
        assert (listener.results_dir / uids[1] / "report.png").stat().st_size > 10_000  # the page
        print("whole-head change through the network:", json.dumps(
            {side: {k: change["sides"][side]["total"][k] for k in ("change_mm3", "change_percent",
                                                                 "rate_percent_per_year")}
             | {"statement": change["sides"][side]["statement"],
                "independent_percent": change["independent"][side]["total"]["change_percent"]}
             for side in ("left", "right")}), "dciodvfy warnings:", problems["warnings"],
              "timings:", json.dumps(second["timings_s"]))
