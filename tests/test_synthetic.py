"""The synthetic dataset: loadable by the shared helpers, realistic shapes/labels, deterministic."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hippo.data import synthetic
from hippo.data.nifti import find_pairs, load_case, load_nifti
from hippo.preprocessing import label_volumes_mm3
from hippo.data.synthetic import SHAPE_MAX, SHAPE_MIN, generate_dataset, make_case

N_CASES = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("syn") / "ds", n_cases=N_CASES, seed=3, n_test=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.nii.gz"))}


def test_layout_and_dataset_json(dataset: Path) -> None:
    real_keys = {"name", "description", "reference", "licence", "relase", "tensorImageSize",
                 "modality", "labels", "numTraining", "numTest", "training", "test"}
    meta = json.loads((dataset / "dataset.json").read_text())
    assert real_keys <= set(meta)
    assert meta["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert "CC0" in meta["licence"]
    assert meta["numTraining"] == N_CASES and meta["numTest"] == 2
    assert meta["synthetic"]["seed"] == 3 and meta["synthetic"]["n_cases"] == N_CASES
    for entry in meta["training"]:
        assert (dataset / entry["image"]).is_file() and (dataset / entry["label"]).is_file()
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == \
        ["hippocampus_013.nii.gz", "hippocampus_014.nii.gz"]
    assert not list(dataset.rglob(".tmp-*"))


def test_pairs_load_with_shared_helpers(dataset: Path) -> None:
    pairs, unpaired = find_pairs(dataset)
    assert len(pairs) == N_CASES and unpaired == []
    for paths in pairs:
        case = load_case(paths)  # raises CaseError on any problem
        assert case.image.dtype == np.float32 and case.label is not None
        assert case.spacing == (1.0, 1.0, 1.0)
        assert all(lo <= n <= hi for n, lo, hi in zip(case.image.shape, SHAPE_MIN, SHAPE_MAX))
        assert set(np.unique(case.label).tolist()) == {0, 1, 2}


def test_headers_like_the_real_data(dataset: Path) -> None:
    dtypes = set()
    for path in sorted((dataset / "imagesTr").glob("*.nii.gz")):
        img = nib.load(str(path))
        lbl = nib.load(str(dataset / "labelsTr" / path.name))
        np.testing.assert_allclose(img.affine, synthetic.AFFINE)
        np.testing.assert_allclose(lbl.affine, synthetic.AFFINE)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        assert lbl.get_data_dtype() == np.uint8
        dtypes.add(str(img.get_data_dtype()))
    assert dtypes <= {"float32", "uint8"}


def test_anatomy_and_volumes() -> None:
    rng = np.random.default_rng(11)
    totals, maxima, dtypes_8bit = [], [], 0
    for _ in range(25):
        image, label, affine = make_case(rng)
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
        assert affine.shape == (4, 4) and np.isfinite(image).all() and image.min() >= 0
        assert set(np.unique(label).tolist()) == {0, 1, 2}
        # Anterior (head) at larger Y (A in RAS) than the posterior tail.
        y1 = np.argwhere(label == 1)[:, 1].mean()
        y2 = np.argwhere(label == 2)[:, 1].mean()
        assert y1 > y2 + 8
        vols = label_volumes_mm3(label, (1.0, 1.0, 1.0))
        assert 2000 <= vols["total_mm3"] <= 4600
        assert 0.3 <= vols["anterior_mm3"] / vols["total_mm3"] <= 0.7
        # The structure stays inside the crop; the hippocampus is darker than its surroundings (T1).
        fg = np.argwhere(label > 0)
        assert fg.min() >= 1 and (fg.max(0) <= np.array(label.shape) - 2).all()
        assert image[label > 0].mean() < image[label == 0].mean()
        totals.append(vols["total_mm3"])
        maxima.append(float(image.max()))
        dtypes_8bit += synthetic._is_8bit(image)
    assert np.std(totals) > 150                       # volumes vary between cases
    assert max(maxima) / min(maxima) > 50             # global intensity scale varies widely
    assert 0 < dtypes_8bit < 25                       # some, not all, cases are 8-bit


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", n_cases=3, seed=5)
    b = generate_dataset(tmp_path / "b", n_cases=3, seed=5, workers=2)
    c = generate_dataset(tmp_path / "c", n_cases=3, seed=6)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb                                   # byte-identical, whatever the worker count
    assert fa.keys() == fc.keys() and all(fa[k] != fc[k] for k in fa)
    # Case i depends on (seed, i) only, not on n_cases.
    d = generate_dataset(tmp_path / "d", n_cases=5, seed=5)
    fd = _files(d)
    assert all(fd[k] == fa[k] for k in fa)


def test_idempotent_and_regenerates_on_new_parameters(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "ds", n_cases=4, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}
    time.sleep(0.01)
    assert generate_dataset(root, n_cases=4, seed=0) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")} == stamps
    # Other parameters: regenerated, and cases from the earlier, larger run are removed.
    generate_dataset(root, n_cases=2, seed=1)
    pairs, unpaired = find_pairs(root)
    assert [p.name for p in pairs] == ["hippocampus_001", "hippocampus_002"] and unpaired == []
    assert json.loads((root / "dataset.json").read_text())["synthetic"]["seed"] == 1
    # An incomplete dataset (a file lost) is repaired.
    (root / "labelsTr" / "hippocampus_002.nii.gz").unlink()
    generate_dataset(root, n_cases=2, seed=1)
    assert len(find_pairs(root)[0]) == 2


def test_refuses_to_overwrite_foreign_data(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "imagesTr" / "real_001.nii.gz").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        generate_dataset(tmp_path, n_cases=2)
    assert (tmp_path / "imagesTr" / "real_001.nii.gz").read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagesTr"]  # nothing written there


def test_invalid_arguments(tmp_path: Path) -> None:
    for kwargs in ({"n_cases": 0}, {"seed": -1}, {"n_test": -1}, {"workers": 0}):
        with pytest.raises(ValueError):
            generate_dataset(tmp_path, **kwargs)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert synthetic.main(["--out", str(tmp_path / "cli"), "--n-cases", "2", "--seed", "4"]) == 0
    assert "synthetic dataset ready" in capsys.readouterr().out
    image, _, _ = load_nifti(tmp_path / "cli" / "imagesTr" / "hippocampus_001.nii.gz")
    assert image.ndim == 3
