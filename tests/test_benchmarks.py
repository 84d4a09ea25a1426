"""The benchmark scripts run on a fresh install and write their figures (a smoke run with tiny
settings; the figures themselves are not asserted — speed targets live in the benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_model_smoke(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/bench_model.py"), "--data-root", str(tmp_path / "absent"),
         "--steps", "2", "--repeat", "1", "--skip-compile", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SYNTHETIC" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["loading"]["ratio"] > 0
    assert set(figures["training"]["lightning"]) == {"32-true", "16-mixed", "bf16-mixed"}
    assert figures["training"]["lightning"]["16-mixed"]["ran_as"] in ("bf16-mixed", "16-mixed")
    inference = figures["inference"]
    assert inference["flops_per_slice"] > 1e6 and inference["bound_slices_per_s"] > 0
    assert inference["variants"]["no_grad (before)"]["ratio_vs_before"] == pytest.approx(1.0)
    assert inference["agent_study_ms"]["members one after another (default)"]["studies"] >= 1
