"""hippo.config: one policy for the settings classes built from config groups (an unknown key is
refused with a ValueError naming it, the class and the accepted keys; ``_target_`` is ignored), and
every shipped config composes and loads through those classes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from hippo.config import HYDRA_KEYS, config_dir, settings_fields
from hippo.dicom.ingest import SelectionRules
from hippo.dicom.wholehead_select import WholeHeadRules
from hippo.network.orthanc import OrthancSettings
from hippo.pacs import PacsConfig
from hippo.plausibility import PlausibilityRules
from hippo.wholehead.register import RegistrationSettings
from hippo.wholehead.review import ReviewRules

#: every settings class read from a config group, with one of its own keys
SETTINGS_CLASSES = [
    (SelectionRules, "min_instances"),
    (WholeHeadRules, "min_extent_mm"),
    (PlausibilityRules, "max_voxel_mm"),
    (PacsConfig, "called_ae"),
    (OrthancSettings, "dicom_port"),
    (RegistrationSettings, "samples"),
    (ReviewRules, "max_asymmetry_percent"),
]


@dataclass
class _Example:
    size_mm: float = 1.0
    names: list = field(default_factory=list)
    _cache: dict = field(default_factory=dict, init=False)


def test_settings_fields_drops_hydra_keys_and_makes_omegaconf_values_plain() -> None:
    cfg = OmegaConf.create({"_target_": "x.Example", "_recursive_": False, "size_mm": 2.5, "names": ["a", "b"]})
    values = settings_fields(_Example, cfg)
    assert values == {"size_mm": 2.5, "names": ["a", "b"]}
    assert type(values["names"]) is list  # not a ListConfig
    assert settings_fields(_Example, None) == {}
    assert {"_target_", "_partial_"} <= HYDRA_KEYS


def test_settings_fields_refuses_unknown_keys_naming_them_the_class_and_the_accepted_keys() -> None:
    with pytest.raises(ValueError) as err:
        settings_fields(_Example, {"size_mm": 1, "sise_mm": 2, "colour": "red"})
    message = str(err.value)
    assert message.startswith("_Example: unknown setting(s) 'colour', 'sise_mm'")
    assert "accepted: names, size_mm" in message
    # a non-init field is not a setting; an underscore key that is not Hydra's is not ignored either
    for key in ("_cache", "_targt_"):
        with pytest.raises(ValueError, match=repr(key)):
            settings_fields(_Example, {key: 1})
    # keys the caller reads itself are let through
    assert settings_fields(_Example, {"preset": "fast"}, handled=("preset",)) == {"preset": "fast"}


@pytest.mark.parametrize(("cls", "own_key"), SETTINGS_CLASSES, ids=[c.__name__ for c, _ in SETTINGS_CLASSES])
def test_every_settings_class_refuses_an_unknown_key_with_a_value_error(cls, own_key) -> None:
    with pytest.raises(ValueError) as err:
        cls.from_mapping({"_target_": f"hippo.{cls.__name__}", "no_such_setting": 1})
    message = str(err.value)
    assert cls.__name__ in message and "'no_such_setting'" in message and own_key in message
    # _target_ alone is ignored: the defaults
    assert isinstance(cls.from_mapping({"_target_": f"hippo.{cls.__name__}"}), cls)


def _compose(name: str, overrides: list[str] | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def _groups(name: str, groups: list[str], tmp_path: Path) -> dict:
    """The named groups of a composed config, resolved to plain Python (as the entrypoints pass them)."""
    cfg = _compose(name, [f"paths.log_dir={tmp_path}"])
    return {g: OmegaConf.to_container(cfg[g], resolve=True) for g in groups}


@pytest.mark.parametrize("name", sorted(p.stem for p in Path(config_dir()).glob("*.yaml") if p.stem != "network"))
def test_every_shipped_top_level_config_composes(name: str) -> None:
    cfg = _compose(name)
    assert cfg.task_name


@pytest.mark.parametrize("name", ["deploy", "listen"])
def test_deploy_and_listen_config_groups_load_through_their_settings_classes(name: str, tmp_path: Path) -> None:
    cfg = _groups(name, ["series", "pacs", "plausibility"], tmp_path)
    rules = SelectionRules.from_mapping(cfg["series"])
    assert rules.description_contains == "HippoCrop"
    assert WholeHeadRules.from_mapping(cfg["series"]["wholehead"]).enabled
    assert PacsConfig.from_mapping(cfg["pacs"]).called_ae == "ORTHANC"
    plausibility = PlausibilityRules.from_mapping(cfg["plausibility"])
    # the whole-head review reads the plausibility group's volume ranges (hippo.deploy.pipeline)
    review = ReviewRules.from_mapping({k: cfg["plausibility"][k] for k in ("anterior_mm3", "posterior_mm3", "total_mm3")})
    assert review.total_mm3 == plausibility.total_mm3


def test_predict_config_groups_load_through_their_settings_classes(tmp_path: Path) -> None:
    cfg = _groups("predict", ["registration", "plausibility", "review"], tmp_path)
    assert RegistrationSettings.from_mapping(cfg["registration"]) == RegistrationSettings()
    plausibility = cfg["plausibility"]
    PlausibilityRules.from_mapping(plausibility)
    # what hippo.wholehead.run.run_predict hands to ReviewRules: the volume ranges and the review block
    rules = {k: plausibility[k] for k in ("anterior_mm3", "posterior_mm3", "total_mm3")}
    review = ReviewRules.from_mapping({**rules, **cfg["review"]})
    assert review.max_outside_fraction == cfg["review"]["max_outside_fraction"]


def test_network_config_loads_through_orthanc_settings(tmp_path: Path) -> None:
    from hippo.network.stack import Network, load_config

    net = Network(load_config(None, [f"paths.log_dir={tmp_path}"]))
    assert net.orthanc.aet == "ORTHANC" and "hippoai" in net.orthanc.modalities
    with pytest.raises(ValueError, match="OrthancSettings: unknown setting.*'dicom_prot'"):
        Network(load_config(None, [f"paths.log_dir={tmp_path}", "orthanc.dicom_prot=4243"]))
