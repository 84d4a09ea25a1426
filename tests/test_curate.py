"""Curation: every bad-case kind is flagged and excluded, outputs are written, the input untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hippo.curate.curation import curate
from hippo.curate.outliers import robust_z
from hippo.curate.records import CaseRecord
from hippo.data.manifest import read_manifest
from hippo.data.nifti import CaseError, CasePaths

SHAPE = (10, 12, 8)
AFFINE = np.array([[1.0, 0, 0, 1], [0, 1.0, 0, 1], [0, 0, 1.0, 1], [0, 0, 0, 1]])
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/Task04_Hippocampus"
PNGS = ("volume_histograms.png", "shape_histograms.png", "intensity_max_histogram.png", "volume_scatter.png")


# ---- fake data sets --------------------------------------------------------------------------


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _image(seed: int, shape=SHAPE, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 200, size=shape)
    return img.astype(dtype)


def _label(depth_a: int = 4, depth_p: int = 4, shape=SHAPE, dtype=np.uint8) -> np.ndarray:
    lbl = np.zeros(shape, dtype=dtype)
    lbl[2:5, 2:6, 1:1 + depth_a] = 1   # 12 voxels per slice of depth
    lbl[5:8, 6:10, 1:1 + depth_p] = 2
    return lbl


def _pair(root: Path, name: str, image: np.ndarray, label: np.ndarray | None,
          img_affine: np.ndarray = AFFINE, lbl_affine: np.ndarray | None = None) -> None:
    _save(root / "imagesTr" / f"{name}.nii.gz", image, img_affine)
    if label is not None:
        _save(root / "labelsTr" / f"{name}.nii.gz", label, img_affine if lbl_affine is None else lbl_affine)


GOOD_DEPTHS = [(4, 4), (5, 4), (4, 5), (3, 4), (4, 3), (5, 5), (4, 4), (3, 5), (5, 3), (4, 4)]
GOOD = [f"good_{i:02d}" for i in range(len(GOOD_DEPTHS))] + ["good_float_label", "good_uint8_image"]

# case -> (reason code, the file the flag names: "image" / "label")
BAD = {
    "bad_unpaired_image": ("unpaired_image", "image"),
    "bad_unpaired_label": ("unpaired_label", "label"),
    "bad_truncated": ("unreadable", "image"),
    "bad_truncated_data": ("unreadable", "label"),
    "bad_shape": ("shape_mismatch", "label"),
    "bad_value5": ("invalid_label_values", "label"),
    "bad_fraction": ("invalid_label_values", "label"),
    "bad_empty": ("empty_label", "label"),
    "bad_one_class": ("missing_class", "label"),
    "bad_spacing2mm": ("unexpected_spacing", "image"),
    "bad_nan": ("nonfinite_image", "image"),
    "bad_affine": ("affine_mismatch", "label"),
}


def make_dataset(root: Path) -> Path:
    for i, (a, p) in enumerate(GOOD_DEPTHS):
        _pair(root, f"good_{i:02d}", _image(i), _label(a, p))
    _pair(root, "good_float_label", _image(50), _label(4, 4, dtype=np.float32))   # like 2 real files
    _pair(root, "good_uint8_image", _image(51, dtype=np.uint8), _label(5, 4))

    _save(root / "imagesTr" / "bad_unpaired_image.nii.gz", _image(60))
    _save(root / "labelsTr" / "bad_unpaired_label.nii.gz", _label())
    _pair(root, "bad_truncated", _image(61), _label())
    trunc = root / "imagesTr" / "bad_truncated.nii.gz"
    trunc.write_bytes(trunc.read_bytes()[:100])
    _pair(root, "bad_truncated_data", _image(70), _label())            # header intact, data cut
    trunc = root / "labelsTr" / "bad_truncated_data.nii.gz"
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    _pair(root, "bad_shape", _image(62), _label(shape=(10, 12, 9)))
    lbl = _label()
    lbl[0, 0, 0] = 5
    _pair(root, "bad_value5", _image(63), lbl)
    lbl = _label(dtype=np.float32)
    lbl[0, 0, 0] = 0.5
    _pair(root, "bad_fraction", _image(64), lbl)
    _pair(root, "bad_empty", _image(65), np.zeros(SHAPE, np.uint8))
    lbl = _label()
    lbl[lbl == 2] = 0
    _pair(root, "bad_one_class", _image(66), lbl)
    two_mm = np.diag([2.0, 2.0, 2.0, 1.0])
    _pair(root, "bad_spacing2mm", _image(67), _label(), img_affine=two_mm)
    img = _image(68)
    img[3, 3, 3] = np.nan
    _pair(root, "bad_nan", img, _label())
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    _pair(root, "bad_affine", _image(69), _label(), lbl_affine=shifted)
    (root / "dataset.json").write_text(json.dumps({"name": "Fake", "labels": {"0": "background", "1": "Anterior",
                                                                             "2": "Posterior"}}))
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root with size, mtime and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if p.is_file() else None, st.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("fake") / "Task04_fake")
    before = snapshot(root)
    out = tmp_path_factory.mktemp("out") / "curation"
    result = curate(root, out, workers=2, clean_copy="copy")
    return root, out, result, before


# ---- the fake data set -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_case_flagged_and_excluded(curated, name):
    root, out, result, _ = curated
    code, kind = BAD[name]
    rec = result.record(name)
    assert rec.excluded
    flags = [f for f in rec.flags if f.code == code]
    assert flags, f"{name}: expected {code}, got {rec.codes()}"
    sub = "imagesTr" if kind == "image" else "labelsTr"
    assert flags[0].file == str(root / sub / f"{name}.nii.gz")
    assert flags[0].severity == "error"
    manifest = json.loads((out / "manifest.json").read_text())
    assert name not in {c["name"] for c in manifest["cases"]}
    entry = next(e for e in manifest["excluded"] if e["name"] == name)
    assert code in entry["reasons"]
    assert flags[0].file in entry["files"]


def test_only_the_expected_flags(curated):
    _, _, result, _ = curated
    for name, (code, _) in BAD.items():
        assert result.record(name).codes() == [code], name   # one precise reason per bad case
    for name in GOOD:
        assert result.record(name).flags == [], name


def test_good_cases_kept(curated):
    root, out, result, _ = curated
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(c["name"] for c in manifest["cases"]) == sorted(GOOD)
    assert manifest["root"] == str(root.resolve())
    for c in manifest["cases"]:
        assert Path(c["image"]).is_absolute() and Path(c["image"]).is_file()
        assert c["label"] == str(root.resolve() / "labelsTr" / f"{c['name']}.nii.gz")
    assert [c.name for c in result.clean] == sorted(GOOD)
    assert result.summary["n_clean"] == len(GOOD)
    assert result.summary["n_excluded"] == len(BAD)
    assert result.summary["n_unpaired"] == 2


def test_good_case_statistics(curated):
    _, _, result, _ = curated
    rec = result.record("good_00")
    assert rec.image_shape == list(SHAPE) and rec.label_shape == list(SHAPE)
    assert rec.image_dtype == "float32" and rec.label_dtype == "uint8"
    assert rec.image_spacing == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(rec.image_affine, AFFINE)
    assert rec.label_values == [0, 1, 2]
    assert rec.voxel_counts == {"0": 960 - 96, "1": 48, "2": 48}
    assert rec.volumes_mm3 == {"anterior_mm3": 48.0, "posterior_mm3": 48.0, "total_mm3": 96.0}
    assert 0 <= rec.intensity["min"] <= rec.intensity["p1"] <= rec.intensity["p50"] <= rec.intensity["max"] <= 200
    assert rec.intensity["nonfinite"] == 0
    assert set(rec.volume_z) == {"total_mm3", "anterior_mm3", "posterior_mm3"}
    flt = result.record("good_float_label")
    assert flt.label_dtype == "float32" and not flt.excluded
    assert result.record("good_uint8_image").image_dtype == "uint8"
    # the 2 mm case: volumes counted with its own voxel size (8 mm³)
    assert result.record("bad_spacing2mm").volumes_mm3["total_mm3"] == 96 * 8.0


def test_input_unchanged(curated):
    root, _, _, before = curated
    assert snapshot(root) == before


def test_outputs_written(curated):
    root, out, result, _ = curated
    for name in ("curation.json", "manifest.json", "report.md", *PNGS):
        assert (out / name).is_file(), name
        assert not list(out.glob(f".{name}.*")), "temporary files left behind"
    for png in PNGS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "curation.json").read_text())
    assert {"parameters", "summary", "cases"} <= set(data)
    assert len(data["cases"]) == len(GOOD) + len(BAD)
    assert data["parameters"]["workers"] == 2
    nan_case = next(c for c in data["cases"] if c["name"] == "bad_nan")
    assert nan_case["intensity"]["nonfinite"] == 1
    report = (out / "report.md").read_text()
    for name, (code, _) in BAD.items():
        assert name in report and code in report
    for png in PNGS:
        assert f"]({png})" in report
    assert "mean ± sd" in report and "float32" in report


def test_clean_copy(curated):
    root, out, result, _ = curated
    clean = out / "clean"
    assert sorted(p.name for p in (clean / "imagesTr").iterdir()) == sorted(f"{n}.nii.gz" for n in GOOD)
    assert sorted(p.name for p in (clean / "labelsTr").iterdir()) == sorted(f"{n}.nii.gz" for n in GOOD)
    meta = json.loads((clean / "dataset.json").read_text())
    assert meta["name"] == "Fake" and meta["numTraining"] == len(GOOD)
    assert {e["image"] for e in meta["training"]} == {f"./imagesTr/{n}.nii.gz" for n in GOOD}
    assert not (clean / "imagesTr" / "good_00.nii.gz").is_symlink()
    # the clean copy is itself a clean data set
    again = curate(clean, out.parent / "recurated", workers=1, plots=False)
    assert again.summary["n_clean"] == len(GOOD) and not again.flagged


def test_clean_symlink_and_rerun(tmp_path):
    root = tmp_path / "data"
    for i, (a, p) in enumerate(GOOD_DEPTHS[:3]):
        _pair(root, f"c{i}", _image(i), _label(a, p))
    _pair(root, "broken", _image(9), np.zeros(SHAPE, np.uint8))
    out = tmp_path / "out"
    curate(root, out, workers=1, clean_copy="copy", plots=False)
    curate(root, out, workers=1, clean_copy="symlink", plots=False)   # replaces the copy
    link = out / "clean" / "imagesTr" / "c0.nii.gz"
    assert link.is_symlink() and link.resolve() == (root / "imagesTr" / "c0.nii.gz").resolve()
    assert sorted(p.name for p in (out / "clean" / "labelsTr").iterdir()) == ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_serial_matches_parallel(curated, tmp_path):
    root, _, parallel, _ = curated
    serial = curate(root, tmp_path / "serial", workers=1, plots=False)
    assert [(r.name, r.codes(), r.volumes_mm3) for r in serial.records] == \
           [(r.name, r.codes(), r.volumes_mm3) for r in parallel.records]


# ---- manifest ----------------------------------------------------------------------------------


def test_read_manifest_round_trip(curated):
    root, out, result, _ = curated
    cases = read_manifest(out / "manifest.json")
    assert all(isinstance(c, CasePaths) for c in cases)
    assert cases == result.clean
    assert cases[0].image == root.resolve() / "imagesTr" / f"{cases[0].name}.nii.gz"


def test_read_manifest_errors(curated, tmp_path):
    _, out, _, _ = curated
    data = json.loads((out / "manifest.json").read_text())
    data["cases"][1]["label"] = str(tmp_path / "gone.nii.gz")
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(CaseError, match="gone.nii.gz") as info:
        read_manifest(bad)
    assert str(bad) in str(info.value) and data["cases"][1]["name"] in str(info.value)

    bad.write_text("{not json")
    with pytest.raises(CaseError, match="not valid JSON") as info:
        read_manifest(bad)
    assert str(bad) in str(info.value)
    bad.write_text(json.dumps({"cases": [{"name": "x"}]}))
    with pytest.raises(CaseError, match="malformed manifest"):
        read_manifest(bad)
    bad.write_text(json.dumps({"root": "/", "cases": []}))
    with pytest.raises(CaseError, match="no cases"):
        read_manifest(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        read_manifest(tmp_path / "nowhere.json")


def test_read_manifest_relative_paths(tmp_path):
    root = tmp_path / "data"
    _pair(root, "a", _image(0), _label())
    (tmp_path / "m.json").write_text(json.dumps(
        {"root": "data", "cases": [{"name": "a", "image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]}))
    assert read_manifest(tmp_path / "m.json") == [
        CasePaths("a", root / "imagesTr" / "a.nii.gz", root / "labelsTr" / "a.nii.gz")]


# ---- outliers ----------------------------------------------------------------------------------


def _outlier_dataset(root: Path) -> Path:
    for i in range(12):
        _pair(root, f"n{i:02d}", _image(i), _label(3 + i % 3, 3 + (i // 3) % 3))   # 72..120 mm³
    big = np.zeros(SHAPE, np.uint8)
    big[1:9, 1:6, :] = 1
    big[1:9, 6:11, :] = 2                                                       # 640 mm³
    _pair(root, "huge", _image(99), big)
    return root


def test_volume_outlier_excluded(tmp_path):
    root = _outlier_dataset(tmp_path / "data")
    result = curate(root, tmp_path / "out", workers=1)
    huge = result.record("huge")
    assert huge.codes() == ["volume_outlier"] and huge.flags[0].severity == "outlier"
    assert huge.excluded and huge.volume_z["total_mm3"] > 3.5
    assert [r.name for r in result.flagged] == ["huge"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [e["name"] for e in manifest["excluded"]] == ["huge"]
    assert manifest["excluded"][0]["reasons"] == ["volume_outlier"]
    assert "huge" in (tmp_path / "out" / "report.md").read_text()


def test_volume_outlier_kept_when_configured(tmp_path):
    root = _outlier_dataset(tmp_path / "data")
    result = curate(root, tmp_path / "out", workers=1, exclude_volume_outliers=False, plots=False)
    assert not result.record("huge").excluded and result.record("huge").codes() == ["volume_outlier"]
    assert result.summary["n_clean"] == 13 and result.summary["n_flagged_kept"] == 1
    off = curate(root, tmp_path / "off", workers=1, volume_outlier_z=None, plots=False)
    assert not off.flagged


def test_intensity_outlier_opt_in(tmp_path):
    root = tmp_path / "data"
    for i in range(10):
        _pair(root, f"n{i}", _image(i) * (1 + 0.1 * i), _label())
    _pair(root, "bright", _image(20) * 1e5, _label())
    assert not curate(root, tmp_path / "a", workers=1, plots=False).flagged
    result = curate(root, tmp_path / "b", workers=1, plots=False, intensity_outlier_z=3.5)
    assert result.record("bright").codes() == ["intensity_outlier"]
    assert not result.record("bright").excluded     # flag only unless exclude_intensity_outliers


def test_too_few_cases_skip_outliers(tmp_path):
    root = tmp_path / "data"
    _pair(root, "a", _image(0), _label(3, 3))
    _pair(root, "b", _image(1), _label(5, 5))
    result = curate(root, tmp_path / "out", workers=2)
    assert result.summary["n_clean"] == 2 and "skipped" in result.summary["outliers"]


def test_robust_z():
    z, med, scale = robust_z([10, 11, 9, 10, 12, 8, 10, 100])
    assert med == 10 and z[-1] > 3.5 and abs(z[0]) < 1
    z, _, _ = robust_z([5, 5, 5, 5, 5, 9])       # MAD 0: mean-absolute-deviation fallback
    assert np.isfinite(z).all() and z[-1] > 3.5
    z, _, scale = robust_z([3, 3, 3])
    assert scale == 0 and not z.any()


# ---- errors ------------------------------------------------------------------------------------


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        curate(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / "imagesTr").mkdir(parents=True)
    with pytest.raises(CaseError, match="no NIfTI images"):
        curate(tmp_path / "empty", tmp_path / "out")


def test_out_dir_inside_dataset_refused(tmp_path):
    root = tmp_path / "data"
    _pair(root, "a", _image(0), _label())
    with pytest.raises(ValueError, match="inside the dataset"):
        curate(root, root / "curation")
    with pytest.raises(ValueError, match="clean_copy"):
        curate(root, tmp_path / "out", clean_copy="hardlink")
    assert sorted(p.name for p in root.iterdir()) == ["imagesTr", "labelsTr"]


def test_record_json_is_strict(curated):
    _, _, result, _ = curated
    for rec in result.records:
        json.dumps(rec.to_json(), allow_nan=False)
    assert isinstance(result.records[0], CaseRecord)


# ---- Hydra entrypoint --------------------------------------------------------------------------


def _run_entrypoint(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "-m", "hippo.curate", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_entrypoint(tmp_path):
    root = make_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = _run_entrypoint(tmp_path, f"data.root={root}", f"hydra.run.dir={run_dir}", "workers=2",
                           "clean_copy=symlink")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(GOOD)} clean, {len(BAD)} excluded" in proc.stdout
    assert str(run_dir / "report.md") in proc.stdout
    for name in ("curation.json", "manifest.json", "report.md", *PNGS):
        assert (run_dir / name).is_file(), name
    assert sorted(c.name for c in read_manifest(run_dir / "manifest.json")) == sorted(GOOD)
    assert (run_dir / "clean" / "imagesTr" / "good_00.nii.gz").is_symlink()
    params = json.loads((run_dir / "curation.json").read_text())["parameters"]
    assert params["workers"] == 2 and params["volume_outlier_z"] == 3.5 and params["expected_spacing"] == [1, 1, 1]


def test_entrypoint_missing_data_dir(tmp_path):
    proc = _run_entrypoint(tmp_path, f"data.root={tmp_path / 'absent'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and str(tmp_path / "absent") in err[-1]
    assert "Traceback" not in proc.stderr


# ---- real data ---------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_data(tmp_path):
    if not (REAL_DATA / "imagesTr").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    result = curate(REAL_DATA, tmp_path / "out", workers=2)
    s = result.summary
    assert s["n_pairs_scanned"] == 234 and s["n_cases"] == 234 and s["n_unpaired"] == 0
    assert s["n_excluded"] < 0.05 * 234
    float_labels = [r for r in result.records if r.label_dtype == "float32"]
    assert len(float_labels) == 2 and not any(r.excluded for r in float_labels)
    assert s["image_dtypes"] == {"float32": 183, "uint8": 51}
    assert s["spacings"] == {"1×1×1": 234}
    for key, (lo, hi) in {"total_mm3": (1500, 6000), "anterior_mm3": (600, 3500),
                          "posterior_mm3": (600, 3500)}.items():
        d = s["volumes_clean_mm3"][key]
        assert lo < d["min"] <= d["mean"] <= d["max"] < hi, (key, d)
    assert 2500 < s["volumes_clean_mm3"]["total_mm3"]["mean"] < 4000
    assert len(read_manifest(tmp_path / "out" / "manifest.json")) == s["n_clean"]
    for png in PNGS:
        assert (tmp_path / "out" / png).is_file()
