"""hippo.eval: the evaluation job is :func:`hippo.eval.evaluate.run_evaluation` (keyword arguments,
an exit status); ``python -m hippo.eval`` only turns ``conf/eval.yaml`` into those arguments."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import tiny_pair
from hippo.config import config_dir
from hippo.eval.evaluate import run_evaluation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pairs_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i in range(2):
        tiny_pair(root, name=f"hippocampus_{i:03d}", seed=i)
    return root


def test_every_key_of_the_eval_config_is_an_argument_of_run_evaluation() -> None:
    """Nothing in conf/eval.yaml is read by nobody (``data.num_load_workers`` was)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("eval")
    parameters = inspect.signature(run_evaluation).parameters
    data_keys = {"data_root" if k == "root" else k for k in cfg.data}
    assert data_keys <= set(parameters), sorted(data_keys - set(parameters))
    top = {"model_path", "device", "batch_size", "precision", "largest_component", "compare_to"}
    assert top <= set(cfg) and top <= set(parameters)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())


def test_run_evaluation_writes_results_and_refuses_a_reference_of_other_cases(
        pairs_root: Path, model_file: Path, tmp_path: Path, capsys, torch_single_thread) -> None:
    out = tmp_path / "eval"
    code = run_evaluation(data_root=pairs_root, output_dir=out, model_path=model_file, split_part="all",
                          largest_component=False, config={"task_name": "eval"})
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["per_volume"]] == ["hippocampus_000", "hippocampus_001"]
    assert results["model"] == str(model_file) and results["config"] == {"task_name": "eval"}
    assert 0.0 <= results["summary"]["dice_mean"]["mean"] <= 1.0
    assert "dice_anterior" in capsys.readouterr().out

    # compared with itself: no difference, case by case
    again = tmp_path / "again"
    assert run_evaluation(data_root=pairs_root, output_dir=again, model_path=model_file, split_part="all",
                          largest_component=False, compare_to=out / "results.json") == 0
    comparison = json.loads((again / "results.json").read_text())["comparison"]
    assert comparison["n_volumes"]["count"] == 2 and comparison["dice_anterior"]["mean"] == 0.0

    # a reference of other cases: refused before the evaluation, naming the file; nothing written
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"per_volume": results["per_volume"][:1]}))
    bad = tmp_path / "bad"
    assert run_evaluation(data_root=pairs_root, output_dir=bad, model_path=model_file, split_part="all",
                          compare_to=other) == 1
    assert f"error: compare_to={other}: not the cases" in capsys.readouterr().err
    assert not (bad / "results.json").exists()

    # a model file that is not there
    assert run_evaluation(data_root=pairs_root, output_dir=bad, model_path=tmp_path / "none.pt") == 1
    assert "none.pt" in capsys.readouterr().err


def test_eval_entrypoint_runs_the_job_and_exits_with_its_status(pairs_root: Path, model_file: Path,
                                                                tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "hippo.eval", f"model_path={model_file}", f"data.root={pairs_root}",
                           "data.split_part=all", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["per_volume"]) == 2 and results["config"]["data"]["split_part"] == "all"
    assert "num_load_workers" not in results["config"]["data"]
    proc = subprocess.run([sys.executable, "-m", "hippo.eval", f"model_path={tmp_path / 'none.pt'}",
                           f"data.root={pairs_root}", f"hydra.run.dir={tmp_path / 'run2'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "none.pt: model file not found" in proc.stderr
