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
    # half precision is timed where the CPU runs it natively, and said to be skipped where it is emulated
    assert figures["training"]["lightning"]["16-mixed"]["ran_as"] in ("bf16-mixed", "16-mixed", "skipped")
    from hippo.infer import resolve_precision

    skipped = "skipped" in figures["training"]["lightning"]["bf16-mixed"]
    assert skipped == (resolve_precision("auto", "cpu") == "float32")
    assert ("skipped" in figures["inference"]["variants"]["bfloat16 autocast"]) == skipped
    inference = figures["inference"]
    assert inference["flops_per_slice"] > 1e6 and inference["bound_slices_per_s"] > 0
    assert inference["variants"]["no_grad (before)"]["ratio_vs_before"] == pytest.approx(1.0)
    assert inference["agent_study_ms"]["members one after another (default)"]["studies"] >= 1


@pytest.mark.slow
def test_bench_model_runs_only_the_sections_asked_for(tmp_path: Path) -> None:
    """``--sections training`` (how the GPU table is made) times training alone; ``--device cuda``
    on a machine without CUDA stops with a clear message instead of timing the CPU."""
    script = str(REPO / "benchmarks/bench_model.py")
    out = tmp_path / "model.json"
    proc = subprocess.run([sys.executable, script, "--data-root", str(tmp_path / "absent"), "--sections", "training",
                           "--steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert "training" in figures and "loading" not in figures and "inference" not in figures
    assert figures["training"]["device"] == "cpu"
    bad = subprocess.run([sys.executable, script, "--sections", "loading,speed"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "speed" in bad.stderr
    import torch

    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, script, "--device", "cuda", "--out", str(tmp_path / "gpu.json")],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2 and "no CUDA device" in proc.stdout + proc.stderr
        assert not (tmp_path / "gpu.json").exists()


def test_bench_synthetic_smoke(tmp_path: Path) -> None:
    """The generation time of the synthetic dataset is measured here, not asserted in a unit test
    (``--target-s`` huge: the smoke run checks the script and its figures, not the machine)."""
    out = tmp_path / "synthetic.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/bench_synthetic.py"), "--n-cases", "2", "--repeat", "2",
         "--target-s", "1e9", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["n_cases"] == 2 and len(figures["seconds"]) == 2 and figures["met"] is True
    assert figures["best_s"] == min(figures["seconds"]) > 0
    assert "generate_dataset, 2 cases" in proc.stdout and "target <= 1000000000.0 s: met" in proc.stdout


WHOLEHEAD = REPO.parent / "shared/data/wholehead"
HIPPODEEP = REPO.parent / "shared/tools/hippodeep/hippodeep.py"


@pytest.mark.slow
def test_bench_wholehead_smoke(tmp_path: Path) -> None:
    """One real head (the small 1.75 mm one) through the table and the interleaved process timing,
    hippodeep beside us; an unknown section is refused."""
    script = str(REPO / "benchmarks/bench_wholehead.py")
    bad = subprocess.run([sys.executable, script, "--sections", "table,speed"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "speed" in bad.stderr
    head = WHOLEHEAD / "example_brain_t1.nii.gz"
    if not head.is_file() or not HIPPODEEP.is_file():
        pytest.skip(f"needs {head} and {HIPPODEEP}")
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / head.name).symlink_to(head)
    out = tmp_path / "wholehead.json"
    proc = subprocess.run([sys.executable, script, "--scans", str(scans), "--sections", "table,process",
                           "--repeat", "1", "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    (row,) = figures["table"]
    assert row["status"] in ("ok", "review") and row["left_mm3"] > 0 and row["hippodeep"]["left_mm3"] > 0
    assert row["delta_left_percent"] is not None
    assert figures["process"]["ratio"] > 0 and len(figures["process"]["ours_wall_s"]) == 1
    assert "| scan | input | status |" in proc.stdout and "ours / hippodeep" in proc.stdout
