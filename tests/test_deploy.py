"""hippo.deploy.batch and hippo.deploy.options: ``python -m hippo.deploy`` and the listener take the
pipeline's options from a config through one map, so the same config gives the same options."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import hippo.deploy.batch as batch
from hippo.config import config_dir
from hippo.deploy.options import processor_options
from hippo.network.listener import Listener
from hippo.pacs import PacsConfig
from hippo.prior import PriorLookup


def _config(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    """``conf/deploy.yaml`` resolved with one study, plus the ``listener`` block of ``conf/listen.yaml``:
    one plain config both the batch and the listener can read."""
    model = tmp_path / "model.pt"
    model.write_bytes(b"not loaded: only its path is resolved")
    study = tmp_path / "study"
    study.mkdir(exist_ok=True)
    common = [f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}", f"model_path={model}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        deploy = compose("deploy", overrides=[*common, f"study={study}", f"results_dir={tmp_path / 'results'}",
                                              "workers=1", *overrides])
        listen = compose("listen", overrides=common)
    cfg = OmegaConf.to_container(deploy, resolve=True)
    cfg["listener"] = OmegaConf.to_container(listen.listener, resolve=True)
    cfg["preload_model"] = False
    return cfg


def _batch_factory(cfg: dict[str, Any], monkeypatch: pytest.MonkeyPatch):
    """The ``functools.partial(build_processor, ...)`` that ``run_deploy`` hands to its batch runner."""
    seen = {}

    def fake_run_batch(studies, factory, **kwargs):
        seen["factory"] = factory
        return []

    monkeypatch.setattr(batch, "run_batch", fake_run_batch)
    assert batch.run_deploy(cfg) == 0
    return seen["factory"]


def _comparable(options: dict[str, Any]) -> dict[str, Any]:
    """The options with the prior lookup as plain values (its DICOMweb source has no ``==``)."""
    out = dict(options)
    prior = out.pop("prior")
    if prior is not None:
        assert isinstance(prior, PriorLookup)
        out["prior"] = (prior.path, None if prior.source is None else vars(prior.source))
    else:
        out["prior"] = None
    return out


@pytest.mark.parametrize("case", ["pacs_search", "prior_file", "no_send"])
def test_batch_and_listener_derive_identical_pipeline_options_from_one_config(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = ["io_threads=3", "batch_size=7", "precision=bfloat16", "report.write_png=false",
                 "series.min_instances=5", "plausibility.max_voxel_mm=1.5"]
    if case == "prior_file":
        prior = tmp_path / "earlier_result.json"
        prior.write_text("{}")
        overrides.append(f"prior={prior}")
    if case == "no_send":
        overrides.append("send=false")
    cfg = _config(tmp_path, *overrides)

    factory = _batch_factory(cfg, monkeypatch)
    listener = Listener.from_config(cfg)

    # where results, outbox and PACS are, and when the model loads, are each caller's own: the batch
    # loads it beside the first study, the listener at start (a bad model file stops the service there)
    assert factory.keywords["background_load"] is True
    from_batch = {k: v for k, v in factory.keywords.items() if k not in ("pacs", "outbox_dir", "background_load")}
    assert _comparable(from_batch) == _comparable(listener.processor_options)
    assert _comparable(from_batch) == _comparable(processor_options(cfg))
    # the config's values arrive (not some default of either caller)
    assert (from_batch["io_threads"], from_batch["batch_size"], from_batch["precision"]) == (3, 7, "bfloat16")
    assert from_batch["write_png"] is False and from_batch["device"] == "cpu"
    assert from_batch["rules"]["min_instances"] == 5 and from_batch["plausibility"]["max_voxel_mm"] == 1.5
    prior = from_batch["prior"]
    if case == "pacs_search":
        assert prior.path is None and prior.source.url == cfg["prior_lookup"]["url"]
        assert prior.source.auth_problem  # no network credentials file under tmp_path: the reason is kept
    elif case == "prior_file":
        assert prior.path == cfg["prior"] and prior.source is None
    else:
        assert prior is None and factory.keywords["pacs"] is None and listener.pacs is None
    if case != "no_send":
        assert PacsConfig.from_mapping(factory.keywords["pacs"]) == listener.pacs == PacsConfig.from_mapping(cfg["pacs"])


def test_a_missing_prior_file_stops_both_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no_such_result.json"
    cfg = _config(tmp_path, f"prior={missing}")
    with pytest.raises(SystemExit, match=f"prior={missing}: no such file"):
        _batch_factory(cfg, monkeypatch)
    with pytest.raises(FileNotFoundError, match=f"prior={missing}: no such file"):
        Listener.from_config(cfg)


def test_a_misspelt_series_or_plausibility_key_stops_both_at_start(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused when the config is read, naming the key and the class, not when a worker first
    builds its processor."""
    for override, message in (("+series.min_instance=5", "SelectionRules: unknown setting(s) 'min_instance'"),
                              ("+series.wholehead.min_extent=5", "WholeHeadRules: unknown setting(s) 'min_extent'"),
                              ("+plausibility.max_voxel=2", "PlausibilityRules: unknown setting(s) 'max_voxel'")):
        cfg = _config(tmp_path, override)
        with pytest.raises(SystemExit, match=re.escape(message)):
            _batch_factory(cfg, monkeypatch)
        with pytest.raises(ValueError, match=re.escape(message)):
            Listener.from_config(cfg)


def test_the_listener_entry_function_reports_a_refused_setting_and_exits_2(tmp_path: Path, caplog) -> None:
    from hippo.network.listener import run_listener

    cfg = _config(tmp_path, "+series.min_instance=5")
    assert run_listener(cfg) == 2
    assert "SelectionRules: unknown setting(s) 'min_instance'" in caplog.text


def test_a_model_loading_in_the_background_serves_the_study_and_a_broken_one_fails_it_naming_the_file(
        tmp_path: Path, model_file: Path) -> None:
    """``hippo.deploy`` loads the model beside the first study (``background_load=True``): a good
    model gives the same volumes as one loaded up front; a model file that cannot be loaded fails the
    study at ``infer`` with the file named (not a crash, not a hang), and a second study fails alike."""
    from conftest import ANY_VOLUME, synthetic_crop_pair
    from hippo.deploy.pipeline import build_processor
    from hippo.scanner import write_study

    image, _ = synthetic_crop_pair(tmp_path / "data")
    write_study(image, tmp_path / "study", seed=3)
    eager = build_processor(model_file, tmp_path / "eager", write_png=False, plausibility=ANY_VOLUME)
    background = build_processor(model_file, tmp_path / "bg", write_png=False, plausibility=ANY_VOLUME,
                                 background_load=True)
    a, b = eager.process(tmp_path / "study"), background.process(tmp_path / "study")
    background.close()
    assert a.status != "failed" and b.status == a.status, (a.error, b.error)
    assert b.volumes == a.volumes

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model file")
    processor = build_processor(broken, tmp_path / "broken_out", write_png=False, background_load=True)
    for _ in range(2):
        outcome = processor.process(tmp_path / "study")
        assert (outcome.status, outcome.stage) == ("failed", "infer")
        assert str(broken) in outcome.error or broken.name in outcome.error, outcome.error
    processor.close()
