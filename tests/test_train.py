"""The training entrypoint end to end: composed configs, a short 16-mixed run on synthetic data,
the exported model re-evaluated by ``hippo.eval``, a learning-rate sweep, and the real data."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from hippo.config import config_dir
from hippo.data.synthetic import generate_dataset
from hippo.infer import InferenceAgent
from hippo.train.fit import run_training
from truths import overlap, read_pair

GROUPS = ["data", "model", "trainer", "callbacks", "logger", "debug", "hparams_search", "experiment"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("syn") / "data", n_cases=10, seed=3)


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _fast(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"paths.output_dir={out}", "data.synthetic=null", "data.num_load_workers=1",
            "model.net.initial_filters=8", "model.net.num_downs=3", "trainer.accelerator=cpu",
            "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", *extra]


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_option_composes(group):
    options = sorted(Path(config_dir(), group).glob("*.yaml"))
    assert options, f"config group {group} is empty"
    for option in options:
        cfg = _compose([f"{group}={option.stem}", "paths.output_dir=/tmp/unused"])
        assert cfg.model.net._target_ == "hippo.model.unet.UNet"


def test_short_16_mixed_run_writes_results_events_and_model(synthetic_root, tmp_path):
    out = tmp_path / "run"
    cfg = _compose(_fast(synthetic_root, out, "trainer.max_epochs=2", "trainer.precision=16-mixed"))
    metrics = run_training(cfg)

    results = json.loads((out / "results.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert [r["name"] for r in results["per_volume"]] == split["test"]
    assert results["summary"]["n_volumes"]["count"] == len(split["test"]) >= 1
    for row in results["per_volume"]:
        assert 0.0 <= row["dice_anterior"] <= 1.0 and 0.0 <= row["jaccard_posterior"] <= 1.0
    assert results["config"]["trainer"]["precision"] == "16-mixed"
    assert "val/dice_mean_best" in metrics and (out / "metrics.json").is_file()

    # TensorBoard: scalars and the image grid
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"scalars": set(), "images": set()}
    for f in glob.glob(str(out / "tensorboard" / "events.*")):
        acc = EventAccumulator(f)
        acc.Reload()
        for k in tags:
            tags[k] |= set(acc.Tags()[k])
    assert {"train/loss_epoch", "val/dice_anterior", "val/dice_posterior", "val/jaccard_mean"} <= tags["scalars"]
    assert "val/examples" in tags["images"]

    # The exported model is self-describing and reproduces the test metrics through hippo.eval.
    agent = InferenceAgent.from_file(out / "model.pt")
    assert agent.metadata["labels"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert agent.metadata["training"]["split_sizes"]["test"] == len(split["test"])
    assert agent.metadata["metrics"]["dice_mean"] == pytest.approx(results["summary"]["dice_mean"]["mean"])
    eval_dir = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "hippo.eval", f"model_path={out / 'model.pt'}", f"data.root={synthetic_root}",
         f"data.split_file={out / 'split.json'}", f"hydra.run.dir={eval_dir}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads((eval_dir / "results.json").read_text())
    assert [r["name"] for r in evaluated["per_volume"]] == split["test"]
    for key in ("dice_anterior", "dice_posterior", "jaccard_mean"):
        assert evaluated["summary"][key]["mean"] == pytest.approx(results["summary"][key]["mean"], abs=1e-6)
    # each per-volume figure is the Dice/Jaccard counted here from the model's masks (set arithmetic)
    for row in evaluated["per_volume"]:
        image, label = read_pair(synthetic_root, row["name"])
        truth = overlap(agent.segment(image), label)
        for key in ("dice_anterior", "dice_posterior", "dice_foreground", "jaccard_mean"):
            assert row[key] == pytest.approx(truth[key], abs=1e-9), (row["name"], key)
    assert "dice_anterior" in proc.stdout
    # compare_to: the same model against its training run's test figures differs by nothing, case by case
    proc = subprocess.run(
        [sys.executable, "-m", "hippo.eval", f"model_path={out / 'model.pt'}", f"data.root={synthetic_root}",
         f"data.split_file={out / 'split.json'}", f"compare_to={out / 'results.json'}",
         f"hydra.run.dir={tmp_path / 'eval_compare'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    comparison = json.loads((tmp_path / "eval_compare" / "results.json").read_text())["comparison"]
    assert comparison["n_volumes"]["count"] == len(split["test"])
    for key in ("dice_anterior", "dice_posterior", "dice_foreground"):
        assert abs(comparison[key]["mean"]) < 1e-6 and comparison[key]["better"] == comparison[key]["worse"] == 0
    assert "paired" in proc.stdout
    # a reference of other cases is refused before the evaluation, naming the file
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"per_volume": results["per_volume"][1:]}))
    proc = subprocess.run(
        [sys.executable, "-m", "hippo.eval", f"model_path={out / 'model.pt'}", f"data.root={synthetic_root}",
         f"data.split_file={out / 'split.json'}", f"compare_to={other}", f"hydra.run.dir={tmp_path / 'eval_bad'}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and str(other) in proc.stderr and results["per_volume"][0]["name"] in proc.stderr
    assert not (tmp_path / "eval_bad" / "results.json").exists()


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fast_dev_run(synthetic_root, tmp_path, precision):
    cfg = _compose(_fast(synthetic_root, tmp_path, "debug=fdr", f"trainer.precision={precision}"))
    metrics = run_training(cfg)
    assert (tmp_path / "model.pt").is_file() and "test/dice_mean" in metrics


def test_deep_supervision_run_exports_a_plain_network(synthetic_root, tmp_path):
    """``model.deep_supervision=2`` trains through the config; the exported file loads into the
    deploy-side agent like any other (the training-only heads are not in it)."""
    cfg = _compose(_fast(synthetic_root, tmp_path, "debug=fdr", "model.deep_supervision=2"))
    metrics = run_training(cfg)
    assert "test/dice_mean" in metrics
    agent = InferenceAgent.from_file(tmp_path / "model.pt")
    assert agent.metadata["training"]
    labels = agent.segment(np.zeros((20, 24, 20), np.float32) + np.linspace(0, 1, 20)[:, None, None])
    assert labels.shape == (20, 24, 20)


def test_overfit_one_batch_learns(synthetic_root, tmp_path):
    cfg = _compose(_fast(synthetic_root, tmp_path, "debug=overfit", "trainer.max_epochs=40", "export=false",
                         "test=false", "logger=[]", "callbacks.lr_monitor=null", "model.optimizer.lr=3e-3",
                         "model.net.initial_filters=16", "model.net.num_downs=4"))
    metrics = run_training(cfg)
    # CE (ln 3 ~ 1.10) + soft Dice (~1.0) at initialisation: ~2.1; a model that learns the batch
    # gets well below (about 0.9 after 40 steps on one CPU, 1.31 on an AVX2-only one: the summation
    # order differs); one that does not stays near 2. 1.5 separates the two on both.
    assert metrics["train/loss_epoch"] < 1.5, metrics


def test_empty_data_directory_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "hippo.train", f"data.root={tmp_path / 'empty'}",
                           "data.synthetic=null", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert str(tmp_path / "empty") in proc.stderr and "does not exist" in proc.stderr


def test_lr_sweep_names_best_run(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "hippo.train", "--multirun", "model.optimizer.lr=1e-2,1e-3",
         *[o for o in _fast(synthetic_root, sweep, "trainer.max_epochs=1", "test=false", "export=false")
           if not o.startswith("paths.output_dir")],
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(summary["runs"]) == 2
    values = [r["value"] for r in summary["runs"]]
    assert all(isinstance(v, float) for v in values)
    assert summary["best"]["value"] == max(values)
    lrs = {o for r in summary["runs"] for o in r["overrides"] if o.startswith("model.optimizer.lr=")}
    assert lrs == {"model.optimizer.lr=0.01", "model.optimizer.lr=0.001"}
    assert "<- best" in proc.stdout


def test_context_channels_mismatch_is_a_clear_error(synthetic_root, tmp_path):
    cfg = _compose(_fast(synthetic_root, tmp_path, "data.context_slices=2"))
    with pytest.raises(ValueError, match="model.net.in_channels=1 but data.context_slices=2 feeds 5"):
        run_training(cfg)


def test_experiment_elastic_augmentation_is_an_override():
    """The shipped experiment keeps elastic deformation off (the runs behind the model had none) and
    ``model.augmentation.p_elastic=...`` turns it on without a ``+``."""
    from hydra.utils import instantiate

    from hippo.data.augment import SliceAugmentation

    base = instantiate(_compose(["experiment=hippocampus_25d", "paths.output_dir=/tmp/unused"]).model.augmentation)
    assert base.p_elastic == 0.0
    cfg = _compose(["experiment=hippocampus_25d", "paths.output_dir=/tmp/unused", "model.augmentation.p_elastic=0.5",
                    "model.augmentation.elastic_alpha=2"])
    aug = instantiate(cfg.model.augmentation)
    assert (aug.p_elastic, aug.elastic_alpha, aug.elastic_sigma) == (0.5, 2.0, 6.0)
    assert (base.elastic_alpha, base.elastic_sigma) == (SliceAugmentation().elastic_alpha, SliceAugmentation().elastic_sigma)


def test_cross_validation_sweep_pools_folds_and_publishes_a_model(synthetic_root, tmp_path):
    """experiment=hippocampus_25d with data.fold=0,1: each fold validates its own cases in 3D, the
    sweep pools them into cv_summary.json; publishing a fold gives a model file, split and card
    that hippo.eval reproduces exactly (2.5D input and largest-component post-processing included)."""
    sweep = tmp_path / "cv"
    proc = subprocess.run(
        [sys.executable, "-m", "hippo.train", "--multirun", "experiment=hippocampus_25d", "data.fold=0,1",
         "data.num_folds=2", "trainer.max_epochs=1", "model.net.initial_filters=8", "model.net.num_downs=3",
         *[o for o in _fast(synthetic_root, sweep)
           if not o.startswith(("paths.output_dir", "model.net"))], f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cv = json.loads((sweep / "cv_summary.json").read_text())
    splits = [json.loads((sweep / str(f) / "split.json").read_text()) for f in (0, 1)]
    development = set(splits[0]["train"]) | set(splits[0]["val"])
    assert cv["n_folds"] == 2 and cv["n_volumes"] == len(development)
    assert set(splits[0]["val"]) | set(splits[1]["val"]) == development and splits[0]["test"] == splits[1]["test"]
    assert 0.0 <= cv["pooled"]["dice_anterior"]["mean"] <= 1.0 and "cross-validation (2 folds" in proc.stdout

    from hippo.weights.publish import publish

    dest = tmp_path / "shipped"
    out = publish([sweep / "0"], dest, cv_dirs=[sweep], ablations=[sweep / "0", sweep / "1"])
    card = out["card"].read_text()
    assert "## Ablations (fold 0; each run against the first)" in card
    # test cells carry the 95 % interval of the mean that the run recorded
    test_summary = json.loads((sweep / "0" / "results.json").read_text())["summary"]["dice_anterior"]
    assert f"{test_summary['mean']:.4f} ± {test_summary['std']:.4f} ({test_summary['ci_low']:.4f}–" in card
    assert "| cv/0 | (the reference) |" in card and "| cv/1 | (the same configuration) |" in card
    # the folds given one by one pool to the same figures; one fold twice is refused
    from hippo.train.sweep_summary import summarize_cross_validation

    assert summarize_cross_validation(sweep / "0", sweep / "1")["pooled"] == cv["pooled"]
    with pytest.raises(ValueError, match="fold 0 twice"):
        summarize_cross_validation(sweep, sweep / "0")
    # the card re-trains each run it names (fold overrides included) and re-publishes them
    trains = [line for line in card.splitlines() if line.startswith("python -m hippo.train ")]
    assert len(trains) == 2 and all(f"data.fold={f} " in trains[f] and trains[f].endswith(f"hydra.run.dir={sweep / str(f)}")
                                    for f in (0, 1))
    assert f"python -m hippo.weights.publish {sweep / '0'} --cv {sweep / '0'} {sweep / '1'}" in card
    assert "2-fold cross-validation" in card and "CC-BY-SA 4.0" in card and "member: fold 0, slicing axis 0, alone, test (held out)" in card
    # where and how long each member was fitted, as recorded by the run
    device = json.loads((sweep / "0" / "results.json").read_text())["training"]["device"]
    assert "CPU" in device and "- fold 0, slicing axis 0, 8 filters: " in card and device in card
    agent = InferenceAgent.from_file(out["model"])
    assert agent.context_slices == 2 and agent.postprocessing == {"largest_component": True}
    eval_dir = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "hippo.eval", f"model_path={out['model']}", f"data.root={synthetic_root}",
         f"data.split_file={out['split']}", f"hydra.run.dir={eval_dir}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads((eval_dir / "results.json").read_text())["summary"]
    trained = json.loads((sweep / "0" / "results.json").read_text())["summary"]
    for key in ("dice_anterior", "dice_posterior"):
        assert evaluated[key]["mean"] == pytest.approx(trained[key]["mean"], abs=1e-6)

    # the two folds as one ensemble: float16 members, evaluated on the common test split at publication
    ens = publish([sweep / "0", sweep / "1"], tmp_path / "ensemble", cv_dirs=[sweep])
    agent = InferenceAgent.from_file(ens["model"])
    assert agent.metadata["n_members"] == 2
    shipped_split = json.loads(ens["split"].read_text())
    assert shipped_split["test"] == splits[0]["test"] and set(shipped_split["train"]) == development
    # the figures stored at publication are the ensemble's own Dice on those test cases, recomputed
    # here from its segmentations with set arithmetic (not hippo.metrics)
    recomputed = [overlap(agent.segment(image), label)
                  for image, label in (read_pair(synthetic_root, n) for n in shipped_split["test"])]
    for key in ("dice_anterior", "dice_posterior", "dice_foreground", "jaccard_mean"):
        assert agent.metadata["metrics"][key] == pytest.approx(np.mean([r[key] for r in recomputed]), abs=1e-9), key
    assert "**shipped ensemble, test (held out)**" in ens["card"].read_text()


def test_model_card_reproduces_trainer_settings_of_a_member():
    """A member fitted elsewhere (a GPU, a time limit) is re-trained with those settings: the card's
    command carries the trainer keys that differ, ``+key`` where today's configuration lacks the key,
    and never the per-run paths."""
    from hippo.weights.publish import _config_diff, _where

    reference = {"data": {"fold": 1, "root": "a"}, "model": {"net": {"initial_filters": 16}},
                 "trainer": {"accelerator": "cpu", "max_epochs": 30, "default_root_dir": "runs/1"}}
    gpu_member = {"data": {"fold": 0, "root": "b"}, "model": {"net": {"initial_filters": 24}},
                  "trainer": {"accelerator": "gpu", "max_epochs": 30, "default_root_dir": "runs/0",
                              "max_time": "00:00:02:05"}}
    assert _config_diff(reference, gpu_member) == ["model.net.initial_filters=24", "trainer.accelerator=gpu",
                                                   "+trainer.max_time=00:00:02:05"]
    assert _config_diff(reference, reference) == []
    # a key added after the reference run was made compares against its default, not as a new key
    deep = {**reference, "model": {**reference["model"], "deep_supervision": 2}}
    assert _config_diff(reference, deep) == ["model.deep_supervision=2"]
    assert _config_diff(reference, {**reference, "model": {**reference["model"], "deep_supervision": 0}}) == []
    # elastic augmentation: off in runs made before it existed; no augmentation keys where augmentation is off
    augmented = {**reference, "model": {**reference["model"], "augmentation": {"p_spatial": 0.5}}}
    elastic = {**reference, "model": {**reference["model"], "augmentation": {"p_spatial": 0.5, "p_elastic": 0.5}}}
    assert _config_diff(augmented, elastic) == ["model.augmentation.p_elastic=0.5"]
    today = {"p_spatial": 0.5, "p_elastic": 0.0, "elastic_alpha": 3.0, "elastic_sigma": 6.0}
    assert _config_diff(augmented, {**reference, "model": {**reference["model"], "augmentation": today}}) == []
    assert _config_diff(augmented, {**reference, "model": {**reference["model"], "augmentation": None}}) == [
        "model.augmentation=null"]
    assert _where({"device": "NVIDIA H200 x1", "accelerator": "CUDAAccelerator"}) == "NVIDIA H200 x1"
    assert "GPU" in _where({"accelerator": "CUDAAccelerator"}) and "CPU" in _where({"accelerator": "CPUAccelerator"})


@pytest.mark.slow
@pytest.mark.realdata
def test_real_data_short_training(real_data_root, tmp_path):
    out = tmp_path / "real"
    cfg = _compose([f"data.root={real_data_root}", f"paths.output_dir={out}", "data.max_cases=40",
                    "trainer.max_epochs=2", "trainer.precision=16-mixed", "trainer.accelerator=cpu",
                    "model.net.initial_filters=16", "callbacks.rich_progress_bar=null",
                    "trainer.enable_progress_bar=false"])
    run_training(cfg)
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["n_volumes"]["count"] == 8
    # two epochs on 28 training volumes already segment the hippocampus
    assert results["summary"]["dice_foreground"]["mean"] > 0.6, results["summary"]


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import zipfile

    wheel = next(tmp_path.glob("hippo-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in ("train.yaml", "eval.yaml", "curate.yaml", "data/synthetic.yaml", "model/unet.yaml",
                "trainer/default.yaml", "hydra/default.yaml"):
        assert f"hippo/_conf/{cfg}" in names, f"{cfg} missing from {wheel.name}"
    for shipped in ("hippocampus_25d.pt", "hippocampus_25d.split.json", "MODEL_CARD.md"):
        assert f"hippo/weights/{shipped}" in names, f"{shipped} missing from {wheel.name}"


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_tests_every_volume(synthetic_root, tmp_path):
    """trainer=ddp: Lightning re-launches the Hydra command per rank; results.json must still hold
    every test volume (each rank tests a share; rank 0 gathers them)."""
    run = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "hippo.train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.max_epochs=1", *[o for o in _fast(synthetic_root, run) if not o.startswith("paths.output_dir")],
         f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert [r["name"] for r in results["per_volume"]] == split["test"] and len(split["test"]) >= 2
    assert (run / "model.pt").is_file()
