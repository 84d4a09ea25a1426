"""hippo.plausibility and hippo.regrid: "ok" only for a number that can be shown to a clinician.

The cases are the ones that once gave a confident wrong number: PixelSpacing ten times too large
(309,000 mm³ "ok"), the series re-sliced at 4 mm (0 mm³), 0.5 x 0.5 x 3 mm (0 mm³), 0.5 mm isotropic
(-48 %), a constant image (130 mm³).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import zoom

from conftest import require_real_data
from hippo.plausibility import ImplausibleInputError, PlausibilityRules, assess_input, assess_volumes
from hippo.regrid import labels_to_source, model_grid_shape, to_model_grid


def _image(shape=(35, 50, 36), seed=0):
    return np.random.default_rng(seed).uniform(0, 100, shape).astype(np.float32)


def test_model_sized_voxels_go_in_as_they_are():
    check = assess_input(_image(), (1.0, 1.0, 1.02))
    assert not check.refused and not check.review and not check.resample


@pytest.mark.parametrize("spacing, words", [
    ((9.375, 9.375, 1.0), "voxel size"),          # PixelSpacing ten times too large
    ((1.0, 1.0, 4.0), "voxel size"),              # re-sliced at 4 mm
    ((0.5, 0.5, 3.0), "voxel size"),              # thick slices
    ((0.1, 0.1, 0.1), "voxel size"),              # finer than any MR acquisition
    ((0.3, 0.3, 1.5), "anisotropic"),
])
def test_coarse_or_odd_voxels_are_refused_with_the_reason(spacing, words):
    check = assess_input(_image(), spacing)
    assert check.refused and words in check.refused[0]
    with pytest.raises(ImplausibleInputError, match=words):
        check.raise_if_refused()


def test_fine_voxels_are_resampled_not_refused():
    check = assess_input(_image((70, 100, 72)), (0.5, 0.5, 0.5))
    assert check.resample and not check.refused


def test_constant_image_and_field_of_view_are_refused():
    assert "constant image" in assess_input(np.full((35, 50, 36), 7.0, np.float32), (1, 1, 1)).refused[0]
    assert "field of view" in assess_input(_image((8, 8, 8)), (1, 1, 1)).refused[0]


def test_clipped_image_is_flagged_for_review():
    image = _image()
    image[:, :10, :] = image.max()  # a fifth of the voxels at the ceiling
    check = assess_input(image, (1, 1, 1))
    assert not check.refused and check.review and "maximum intensity" in check.review[0]


def test_implausible_volumes_are_flagged_and_plausible_ones_not():
    assert assess_volumes({"anterior_mm3": 1700, "posterior_mm3": 1600, "total_mm3": 3300}) == []
    reasons = assess_volumes({"anterior_mm3": 150000, "posterior_mm3": 159000, "total_mm3": 309000})
    assert len(reasons) == 3 and "309,000 mm³" in reasons[2]
    assert "posterior volume 0 mm³" in assess_volumes({"anterior_mm3": 1700, "posterior_mm3": 0,
                                                       "total_mm3": 1700})[0]


def test_rules_from_config_refuse_unknown_keys():
    rules = PlausibilityRules.from_mapping({"total_mm3": [1, 2], "max_voxel_mm": 2})
    assert rules.total_mm3 == (1.0, 2.0) and rules.max_voxel_mm == 2
    with pytest.raises(ValueError, match="PlausibilityRules: unknown setting.*'max_voxels'"):
        PlausibilityRules.from_mapping({"max_voxels": 3})


def test_the_shipped_config_matches_the_defaults():
    """conf/plausibility/default.yaml is what deploy and listen use; the class defaults (library use)
    say the same."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/plausibility/default.yaml"))
    assert PlausibilityRules.from_mapping(cfg) == PlausibilityRules()


@pytest.mark.parametrize("factor", [2.0, 0.8])
def test_regrid_round_trip_keeps_labelled_volume(factor):
    """Labels on a 1 mm grid, resampled to the series' finer/coarser grid and back: mm³ kept (to the
    boundary's partial voxels), field of view identical."""
    source_shape = tuple(int(round(n * factor)) for n in (35, 50, 36))
    spacing = tuple(1.0 / factor for _ in range(3))
    assert model_grid_shape(source_shape, spacing, (1, 1, 1)) == (35, 50, 36)
    labels = np.zeros((35, 50, 36), np.uint8)
    labels[10:25, 10:25, 10:26] = 1
    labels[10:25, 25:40, 10:26] = 2
    back = labels_to_source(labels, source_shape)
    assert back.shape == source_shape and back.dtype == np.uint8
    for value in (1, 2):
        mm3 = (back == value).sum() * np.prod(spacing)
        assert mm3 == pytest.approx((labels == value).sum(), rel=0.04)
    image, grid = to_model_grid(np.ones(source_shape, np.float32), spacing, (1, 1, 1))
    assert image.shape == (35, 50, 36) and np.allclose(np.asarray(grid) * image.shape, np.asarray(spacing) * source_shape)


# ---------------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def shipped_processor(tmp_path_factory):
    from hippo.weights import resolve_model_path
    from hippo.deploy.pipeline import build_processor

    return build_processor(resolve_model_path(None, "outputs"), tmp_path_factory.mktemp("plaus_out"), write_png=False)


def _study(tmp_path: Path, image: np.ndarray, spacing) -> Path:
    from hippo.scanner import write_study

    tmp_path.mkdir(parents=True, exist_ok=True)
    nifti = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([*map(float, spacing), 1.0])), str(nifti))
    write_study(nifti, tmp_path / "study", seed=3, distractors=False)
    return tmp_path / "study"


@pytest.fixture(scope="module")
def real_crop():
    root = require_real_data()
    return np.asarray(nib.load(str(root / "imagesTr/hippocampus_001.nii.gz")).dataobj).astype(np.float32)


@pytest.mark.realdata
def test_half_millimetre_series_measures_like_the_one_millimetre_one(real_crop, shipped_processor, tmp_path):
    """The same crop upsampled to 0.5 mm isotropic (once -48 %): resampled onto the model's grid,
    the volume is within 2 % of the 1 mm series', the SEG on the series' own 0.5 mm grid."""
    ref = shipped_processor.process(_study(tmp_path / "ref", real_crop, (1, 1, 1)))
    fine = shipped_processor.process(_study(tmp_path / "fine", zoom(real_crop, 2, order=1, grid_mode=True,
                                                                    mode="nearest"), (0.5, 0.5, 0.5)))
    assert ref.status == fine.status == "ok", (ref.error, fine.error)
    assert fine.input["resampled"] and not ref.input["resampled"]
    for key in ("anterior_mm3", "posterior_mm3", "total_mm3"):
        assert fine.volumes[key] == pytest.approx(ref.volumes[key], rel=0.02)


@pytest.mark.realdata
@pytest.mark.parametrize("name, spacing, resample", [
    ("pixel spacing x10", (9.375, 9.375, 1.0), None),
    ("re-sliced at 4 mm", (1.0, 1.0, 4.0), (1, 1, 0.25)),
    ("0.5 x 0.5 x 3 mm", (0.5, 0.5, 3.0), (2, 2, 1 / 3)),
])
def test_coarse_series_are_refused_not_measured(real_crop, shipped_processor, tmp_path, name, spacing, resample):
    image = real_crop if resample is None else zoom(real_crop, resample, order=1, grid_mode=True, mode="nearest")
    outcome = shipped_processor.process(_study(tmp_path, image, spacing))
    assert (outcome.status, outcome.stage) == ("failed", "plausibility"), name
    assert "voxel size" in outcome.error and not outcome.volumes and not outcome.files


@pytest.mark.realdata
def test_constant_series_is_refused(shipped_processor, tmp_path):
    outcome = shipped_processor.process(_study(tmp_path, np.full((35, 50, 36), 100.0, np.float32), (1, 1, 1)))
    assert (outcome.status, outcome.stage) == ("failed", "plausibility") and "constant image" in outcome.error


@pytest.mark.realdata
def test_implausible_volume_is_made_but_marked_review(real_crop, tmp_path):
    """A segmentation far outside the believable range: objects written (the clinician can look), the
    study's status is "review" with the reason, never "ok"."""
    import json

    from hippo.deploy.pipeline import StudyProcessor

    class Everything:  # labels the whole crop anterior: 60,000 mm³
        metadata = {"hippo_version": "test", "path": "x", "metrics": {}, "training": {}}

        def segment(self, volume):
            return np.ones(volume.shape, np.uint8)

    outcome = StudyProcessor(Everything(), tmp_path / "out").process(_study(tmp_path, real_crop, (1, 1, 1)))
    assert outcome.status == "review" and any("anterior volume" in r for r in outcome.review)
    result = json.loads(Path(outcome.files["result_json"]).read_text())
    assert result["status"] == "review" and result["review"] == outcome.review
    assert {"report_sc", "seg", "sr"} <= set(outcome.files)
