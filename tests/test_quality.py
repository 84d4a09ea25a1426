"""hippo.quality: the segmentation quality score and flag, through the agent, SR, report and pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.sr.codedict import codes
from scipy import ndimage

from conftest import dciodvfy_problems, require_real_data, synthetic_crop_pair
from hippo.infer import InferenceAgent, MemberSegmentation
from hippo.model.unet import UNet
from hippo.plausibility import PlausibilityRules
from hippo.quality import assess_quality, member_agreement

SHAPE = (30, 40, 30)


def _labels(shift: int = 0) -> np.ndarray:
    """A two-part 'hippocampus' (anterior 1, posterior 2) well inside a (30, 40, 30) volume, moved
    ``shift`` voxels along axis 0; 1,000 + 1,200 voxels at 1 mm: within the believable volumes."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[10 + shift:20 + shift, 8:18, 10:20] = 2
    labels[10 + shift:20 + shift, 18:30, 10:20] = 1
    return labels


def _one_hot(labels: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    """``(3, X, Y, Z)`` probabilities: ``confidence`` on the label, the rest shared."""
    probs = np.full((3, *labels.shape), (1 - confidence) / 2, np.float32)
    np.put_along_axis(probs, labels[None].astype(np.int64), confidence, axis=0)
    return probs


def _assess(member_labels, **kw):
    parts = [_one_hot(m) for m in member_labels]
    mean = np.mean(parts, axis=0)
    return assess_quality(mean.argmax(0).astype(np.uint8), (1, 1, 1), member_probabilities=parts, **kw)


def test_members_that_disagree_score_worse_than_members_that_agree():
    agree = _assess([_labels(0)] * 5)
    slightly = _assess([_labels(s) for s in (0, 0, 1, 0, -1)])
    disagree = _assess([_labels(s) for s in (0, 3, -3, 5, -5)])
    assert agree.score == pytest.approx(1.0) and agree.volume_cv == pytest.approx(0.0)
    assert agree.score > slightly.score > disagree.score
    assert not agree.flagged and agree.reasons == [] and not slightly.flagged
    assert disagree.flagged and disagree.score < 0.85
    assert any("disagree" in r and "5 networks" in r for r in disagree.reasons)
    assert agree.n_members == 5 and len(agree.member_volumes_mm3) == 5
    assert agree.margin == pytest.approx(0.85)  # 0.9 - 0.05 everywhere inside the mask


def test_member_volume_spread_is_flagged():
    small = np.zeros(SHAPE, np.uint8)
    small[12:18, 10:16, 12:18] = 2
    small[12:18, 16:22, 12:18] = 1
    result = _assess([_labels(0), _labels(0), _labels(0), small, small], rules=PlausibilityRules(
        min_member_agreement=0.0))
    assert result.volume_cv > 0.10
    assert any("total volumes differ" in r for r in result.reasons)


def test_member_agreement_per_structure_and_input_checks():
    a, b = _labels(0), _labels(0)
    b[b == 2] = 0  # second member misses the posterior part
    d = member_agreement([a, b])
    assert d["anterior"] == pytest.approx(1.0) and d["posterior"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least two"):
        member_agreement([a])
    with pytest.raises(ValueError, match="shape"):
        member_agreement([a, a[:-1]])
    with pytest.raises(ValueError, match="do not match"):
        assess_quality(a, (1, 1, 1), member_probabilities=[_one_hot(a)[:, :-1]] * 2)


def test_member_agreement_is_the_mean_pairwise_dice_of_hippo_metrics_on_hand_made_maps():
    import hippo.quality
    from hippo.metrics import dice

    assert hippo.quality.dice is dice  # one Dice for training, evaluation and the quality score
    a, b, c = (np.zeros((2, 2, 2), np.uint8) for _ in range(3))
    a[0] = 1              # anterior: 4 voxels
    b[0, 0] = 1           # 2 voxels inside a's: Dice(a, b) = 2*2 / (4+2) = 2/3
    c[1] = 1              # 4 voxels apart from both: Dice 0 with a and b
    a[1, 1, 1] = b[1, 1, 1] = 2          # posterior: a and b agree on one voxel, c has none
    d = member_agreement([a, b, c])
    assert d["anterior"] == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert d["posterior"] == pytest.approx((1.0 + 0 + 0) / 3)
    # both maps empty of a structure: they agree (Dice 1), as hippo.metrics.dice defines
    assert member_agreement([c, c])["posterior"] == 1.0


def test_plain_checks_edge_split_islands_and_volumes():
    ok = assess_quality(_labels(), (1, 1, 1))
    assert ok.score is None and ok.agreement is None and not ok.flagged  # one network: plain checks only

    edge = _labels(-10)  # moved onto the first face of the volume
    result = assess_quality(edge, (1, 1, 1))
    assert result.edge_voxels > 0 and any("edge of the image" in r for r in result.reasons)

    split = _labels()
    split[10:20, 12:14, 10:20] = 0  # cut the posterior part in two
    result = assess_quality(split, (1, 1, 1))
    assert result.largest_piece["posterior"] < 0.9
    assert any("posterior hippocampus is split into 2 pieces" in r for r in result.reasons)

    before = _labels()
    before[1:8, 1:8, 1:8] = 1  # an island the post-processing removed (343 of 2,543 voxels)
    result = assess_quality(_labels(), (1, 1, 1), unprocessed_labels=before)
    assert result.removed_fraction == pytest.approx(343 / 2543)
    assert any("were removed" in r for r in result.reasons)

    missing = _labels()
    missing[missing == 1] = 0  # reuses hippo.plausibility's ranges: 0 mm³ is not believable
    result = assess_quality(missing, (1, 1, 1))
    assert any(r.startswith("anterior volume 0 mm³ is outside") for r in result.reasons)
    # measured volumes given (another grid) replace the count
    result = assess_quality(_labels(), (1, 1, 1), volumes_mm3={"anterior_mm3": 9000.0, "posterior_mm3": 1200.0,
                                                               "total_mm3": 10200.0})
    assert any("anterior volume 9,000 mm³" in r for r in result.reasons)
    assert json.loads(json.dumps(result.as_dict()))["flagged"] is True


def _tiny_agent(n_members: int) -> InferenceAgent:
    torch.manual_seed(0)
    pre = {"normalization": "minmax_per_volume", "slice_axis": 0, "patch_size": [32, 32]}
    nets = [(UNet(initial_filters=4, num_downs=2), {**pre, "slice_axis": i % 3}) for i in range(n_members)]
    return InferenceAgent(*nets[0], more_members=nets[1:], postprocessing={"largest_component": True})


@pytest.mark.parametrize("n_members", [1, 3])
def test_segment_members_is_segment_plus_the_members(n_members, torch_single_thread):
    agent = _tiny_agent(n_members)
    volume = np.random.default_rng(0).normal(size=(12, 20, 16)).astype(np.float32)
    labels, probs = agent.segment(volume, return_probabilities=True)
    seg = agent.segment_members(volume)
    assert isinstance(seg, MemberSegmentation)
    np.testing.assert_array_equal(seg.labels, labels)
    np.testing.assert_allclose(seg.probabilities, probs, atol=1e-6)
    assert len(seg.member_probabilities) == n_members
    np.testing.assert_allclose(np.mean(seg.member_probabilities, axis=0), probs, atol=1e-6)
    assert seg.unprocessed_labels.shape == volume.shape and seg.member_probabilities[0].shape == (3, *volume.shape)
    with pytest.raises(ValueError, match="3D"):
        agent.segment_members(volume[0])


def _sr_quality_group(sr):
    """The content items of the SR's "Segmentation quality" measurement group."""
    for item in sr.ContentSequence:
        for group in item.get("ContentSequence", []):
            for child in group.get("ContentSequence", []):
                if child.get("TextValue") == "Segmentation quality":
                    return list(group.ContentSequence)
    raise AssertionError("no Segmentation quality group")


@pytest.mark.parametrize("flagged", [False, True])
def test_sr_records_the_score_and_flag_and_passes_dciodvfy(flagged, tmp_path):
    from test_objects import mask_frames, mr_series

    from hippo.dicom.objects import make_seg, make_sr
    from hippo.measure import measure_volumes

    sources = mr_series()
    seg = make_seg(sources, mask_frames(), model_version="0.1.0+test")
    quality = {"score": 0.62 if flagged else 0.94, "flagged": flagged,
               "reasons": ["the model's 5 networks disagree on the posterior hippocampus (agreement 0.62, below 0.85)"]
               if flagged else []}
    sr = make_sr(sources, seg, measure_volumes(mask_frames(), (1, 1, 1)), model_version="0.1.0+test",
                 quality=quality)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    items = _sr_quality_group(pydicom.dcmread(path))
    num = [i for i in items if i.ValueType == "NUM"]
    assert num[0].ConceptNameCodeSequence[0].CodeValue == codes.DCM.AnalysisQualityRating.value
    assert float(num[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(quality["score"])
    evaluation = [i for i in items if i.ValueType == "CODE"
                  and i.ConceptNameCodeSequence[0].CodeValue == codes.DCM.QualityAssessment.value]
    expected = (codes.DCM.UsableDoesNotMeetTheQualityControlStandard if flagged
                else codes.DCM.UsableMeetsTheQualityControlStandard)
    assert evaluation[0].ConceptCodeSequence[0].CodeValue == expected.value
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"
             and i.ConceptNameCodeSequence[0].CodeValue == codes.DCM.QualityIssue.value]
    assert texts == quality["reasons"]
    assert dciodvfy_problems(path)["errors"] == []


def test_report_page_shows_the_review_box_for_a_flagged_study():
    from hippo.dicom.report import render_report
    from hippo.measure import measure_volumes

    image = np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32)
    labels = _labels()
    quality = _assess([_labels(s) for s in (0, 3, -3, 5, -5)]).as_dict()
    common = dict(patient={}, study={}, volumes=measure_volumes(labels, (1, 1, 1)), model={})

    def amber(page) -> int:
        a = np.asarray(page).astype(int)
        return int(((a[..., 0] == 255) & (a[..., 1] == 236) & (a[..., 2] == 179)).sum())

    flagged = render_report(image, labels, (1, 1, 1), review=quality["reasons"], quality=quality, **common)
    clean = render_report(image, labels, (1, 1, 1), quality=_assess([_labels()] * 5).as_dict(), **common)
    assert amber(flagged) > 10000 and amber(clean) == 0
    with pytest.raises(TypeError):  # no normative comparison any more: the slot states there is none
        render_report(image, labels, (1, 1, 1), norm={"band": "5th-50th"}, **common)


class _MembersAgent:
    """Stands in for the ensemble: segments the bright synthetic structure by threshold, and gives
    each of its five 'members' that mask moved by ``shifts`` voxels (one pass, as the real agent)."""

    def __init__(self, shifts):
        self.shifts = shifts
        self.metadata = {"hippo_version": "test", "path": "members", "metrics": {}, "training": {}}

    def _mask(self, volume):
        fg = ndimage.uniform_filter(volume.astype(np.float32), 3) > 100
        labels = np.zeros(volume.shape, np.uint8)
        ys = np.nonzero(fg.any(axis=(0, 2)))[0]
        mid = (ys.min() + ys.max() + 1) // 2
        labels[:, :mid][fg[:, :mid]] = 2
        labels[:, mid:][fg[:, mid:]] = 1
        return labels

    def segment(self, volume):
        return self.segment_members(volume).labels

    def segment_members(self, volume):
        base = self._mask(volume)
        parts = tuple(_one_hot(np.roll(base, s, axis=0)) for s in self.shifts)
        probs = np.mean(parts, axis=0)
        labels = probs.argmax(0).astype(np.uint8)
        return MemberSegmentation(labels=labels, probabilities=probs, member_probabilities=parts,
                                  unprocessed_labels=labels)


def test_pipeline_flags_a_study_whose_members_disagree(tmp_path):
    from hippo.deploy.pipeline import StudyProcessor
    from hippo.scanner import write_study

    image, label = synthetic_crop_pair(tmp_path / "nifti")
    write_study(image, tmp_path / "study", label_path=label, seed=3, distractors=False)
    outcomes = {}
    for name, shifts in (("agree", (0, 0, 0, 0, 0)), ("disagree", (0, 3, -3, 5, -5))):
        outcomes[name] = StudyProcessor(_MembersAgent(shifts), tmp_path / f"out_{name}", write_png=False,
                                        io_threads=2).process(tmp_path / "study")
    agree, disagree = outcomes["agree"], outcomes["disagree"]
    assert agree.status == "ok", (agree.error, agree.review)
    assert disagree.status == "review", disagree.error
    assert any("disagree" in r for r in disagree.review)
    result = json.loads(Path(disagree.files["result_json"]).read_text())
    assert result["status"] == "review" and result["quality"]["flagged"] is True
    agreed = json.loads(Path(agree.files["result_json"]).read_text())
    assert result["quality"]["score"] < 0.85 < agreed["quality"]["score"] and not agreed["quality"]["flagged"]
    assert result["normative"] == {"available": False, "reason": "No verified normative reference"}
    assert "band" not in json.dumps(result["normative"])
    sr = pydicom.dcmread(disagree.files["sr"])
    items = _sr_quality_group(sr)
    assert any(i.ValueType == "TEXT" and "disagree" in i.TextValue for i in items)
    assert dciodvfy_problems(disagree.files["sr"])["errors"] == []


@pytest.mark.realdata
def test_shipped_model_flags_an_inverted_contrast_crop_and_not_the_crop():
    import nibabel as nib

    from hippo.weights import default_model_path

    root = require_real_data()
    name = json.loads(default_model_path().with_suffix(".split.json").read_text())["test"][0]  # held out
    image = np.asarray(nib.load(root / "imagesTr" / f"{name}.nii.gz").dataobj, dtype=np.float32)
    agent = InferenceAgent.from_file(default_model_path())

    def quality(volume):
        seg = agent.segment_members(volume)
        return assess_quality(seg.labels, (1, 1, 1), member_probabilities=seg.member_probabilities,
                              probabilities=seg.probabilities, unprocessed_labels=seg.unprocessed_labels)

    clean, inverted = quality(image), quality(image.max() - image)  # a "T2-like" wrong sequence
    assert not clean.flagged, clean.reasons
    assert clean.score > 0.85 > inverted.score and inverted.flagged
