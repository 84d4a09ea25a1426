"""Splitting by volume and HippocampusDataModule on synthetic (and, when present, the real) data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import require_real_data, tiny_pair
from hippo.data.datamodule import HippocampusDataModule, cross_validation_fold, load_cases, split_by_volume
from hippo.data.nifti import CaseError, find_pairs
from hippo.data.pairs import UNPAIRED, select_pairs
from hippo.preprocessing import pad_or_crop
from hippo.data.synthetic import generate_dataset

pytestmark = pytest.mark.usefixtures("torch_single_thread")

N_CASES = 10

# ---- split_by_volume ---------------------------------------------------------------------------

NAMES = [f"hippocampus_{i:03d}" for i in range(1, 101)]


def test_split_disjoint_and_complete() -> None:
    split = split_by_volume(NAMES, (0.7, 0.1, 0.2), seed=42)
    assert set(split) == {"train", "val", "test"}
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(NAMES)
    assert sum(len(split[k]) for k in split) == len(NAMES)      # no duplicates
    assert all(split[k] == sorted(split[k]) for k in split)


def test_split_reproducible_and_seed_dependent() -> None:
    a = split_by_volume(NAMES, (0.7, 0.1, 0.2), seed=42)
    assert split_by_volume(NAMES, (0.7, 0.1, 0.2), seed=42) == a
    assert split_by_volume(list(reversed(NAMES)), (0.7, 0.1, 0.2), seed=42) == a   # input order irrelevant
    b = split_by_volume(NAMES, (0.7, 0.1, 0.2), seed=43)
    assert b != a and set(b["test"]) != set(a["test"])


@pytest.mark.parametrize(
    "n,fractions,sizes",
    [
        (100, (0.7, 0.1, 0.2), (70, 10, 20)),
        (100, (0.5, 0.25, 0.25), (50, 25, 25)),
        (10, (0.7, 0.1, 0.2), (7, 1, 2)),
        (3, (0.7, 0.1, 0.2), (1, 1, 1)),          # every positive fraction gets a case
        (10, (1.0, 0.0, 0.0), (10, 0, 0)),
        (10, (0.8, 0.2, 0.0), (8, 2, 0)),
    ],
)
def test_split_fractions_respected(n: int, fractions, sizes) -> None:
    split = split_by_volume(NAMES[:n], fractions, seed=0)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == sizes


@pytest.mark.parametrize(
    "fractions",
    [(0.7, 0.1, 0.1), (0.7, 0.3), (0.5, 0.25, 0.25, 0.0), (1.2, -0.1, -0.1), (0.7, 0.4, -0.1)],
)
def test_split_bad_fractions(fractions) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_by_volume(NAMES, fractions, seed=0)


def test_split_too_few_cases() -> None:
    with pytest.raises(ValueError, match="too few"):
        split_by_volume(NAMES[:2], (0.0, 0.5, 0.5), seed=0)


# ---- HippocampusDataModule on synthetic data ----------------------------------------------------


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("dm") / "syn", n_cases=N_CASES, seed=1)


def _dm(root: Path, out: Path | None, **kw) -> HippocampusDataModule:
    kw.setdefault("num_load_workers", 1)
    kw.setdefault("batch_size", 8)
    return HippocampusDataModule(root=str(root), output_dir=str(out) if out else None, **kw)


def _raw(root: Path, folder: str, name: str) -> np.ndarray:
    return np.asanyarray(nib.load(str(root / folder / f"{name}.nii.gz")).dataobj)


@pytest.fixture(scope="module")
def loaded(syn: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[HippocampusDataModule, Path]:
    out = tmp_path_factory.mktemp("out")
    dm = _dm(syn, out)
    dm.setup("fit")
    return dm, out


def test_setup_splits_by_volume_without_leakage(loaded, syn: Path) -> None:
    dm, _ = loaded
    names = {f"hippocampus_{i:03d}" for i in range(1, N_CASES + 1)}
    assert set(dm.cases) == names
    train, val, test = (set(dm.split[k]) for k in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (7, 1, 2)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == names
    # the datasets hold exactly the volumes of their split
    assert len(dm._datasets["train"].images) == len(train)
    assert len(dm._datasets["val"].images) == len(val)
    assert [c["name"] for c in dm._datasets["test"]] == sorted(test)


def test_split_and_skipped_json_written(loaded) -> None:
    dm, out = loaded
    split = json.loads((out / "split.json").read_text())
    assert {k: split[k] for k in ("train", "val", "test")} == dm.split
    assert split["seed"] == 42 and split["fractions"] == [0.7, 0.1, 0.2]
    assert json.loads((out / "skipped_cases.json").read_text()) == []


def test_slices_shapes_dtypes_ranges_and_counts(loaded, syn: Path) -> None:
    dm, _ = loaded
    for part in ("train", "val"):
        ds = dm._datasets[part]
        depths = [_raw(syn, "imagesTr", n).shape[0] for n in dm.split[part]]
        assert len(ds) == sum(depths)                       # one item per slice along axis 0
        true_fg = sum(int((_raw(syn, "labelsTr", n) > 0).sum()) for n in dm.split[part])
        fg = 0
        for i in range(len(ds)):
            item = ds[i]
            img, lbl = item["image"], item["label"]
            assert tuple(img.shape) == (1, 64, 64) and str(img.dtype) == "torch.float32"
            assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
            assert tuple(lbl.shape) == (64, 64) and str(lbl.dtype) == "torch.int64"
            assert set(lbl.unique().tolist()) <= {0, 1, 2}
            fg += int((lbl > 0).sum())
        # synthetic in-plane sizes are < 64: centre padding keeps every hippocampus voxel
        assert fg == true_fg


def test_slice_content_matches_the_file(loaded, syn: Path) -> None:
    dm, _ = loaded
    ds = dm._datasets["train"]
    name = dm.split["train"][0]
    raw_img, raw_lbl = _raw(syn, "imagesTr", name).astype(np.float64), _raw(syn, "labelsTr", name)
    s = raw_img.shape[0] // 2
    item = ds[ds.index.index((0, s))]
    h, w = raw_img.shape[1:]
    top, left = (64 - h) // 2, (64 - w) // 2
    img = item["image"][0].numpy()
    expected = (raw_img[s] - raw_img.min()) / (raw_img.max() - raw_img.min())
    np.testing.assert_allclose(img[top:top + h, left:left + w], expected, atol=1e-5)
    assert not img[:top].any() and not img[top + h:].any()
    np.testing.assert_array_equal(item["label"].numpy()[top:top + h, left:left + w], raw_lbl[s])


def test_loaders(loaded, syn: Path) -> None:
    dm, _ = loaded
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["image"].shape) == (8, 1, 64, 64) and tuple(batch["label"].shape) == (8, 64, 64)
    val_batches = list(dm.val_dataloader())
    assert sum(len(b["label"]) for b in val_batches) == len(dm._datasets["val"])
    cases = list(dm.test_dataloader())
    assert [c["name"] for c in cases] == dm.split["test"]
    for c in cases:
        assert c["image"].shape == _raw(syn, "imagesTr", c["name"]).shape
        assert c["label"].dtype == np.uint8 and c["spacing"] == [1.0, 1.0, 1.0]
    assert dm.preprocessing == {"normalization": "minmax_per_volume", "slice_axis": 0, "patch_size": [64, 64],
                                "context_slices": 0}


@pytest.fixture
def broken(syn: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic set with a truncated image and an image without a label."""
    root = shutil.copytree(syn, tmp_path / "broken")
    bad = root / "imagesTr" / "hippocampus_003.nii.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    shutil.copy(root / "imagesTr" / "hippocampus_001.nii.gz", root / "imagesTr" / "hippocampus_099.nii.gz")
    return root


def test_bad_and_unpaired_cases_are_skipped_and_listed(broken: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dm = _dm(broken, out)
    dm.setup()
    skipped = json.loads((out / "skipped_cases.json").read_text())
    by_file = {Path(s["file"]).name: s["problem"] for s in skipped}
    assert set(by_file) == {"hippocampus_003.nii.gz", "hippocampus_099.nii.gz"}
    assert "unreadable" in by_file["hippocampus_003.nii.gz"]
    assert "partner" in by_file["hippocampus_099.nii.gz"]
    assert str(broken / "imagesTr" / "hippocampus_003.nii.gz") in {s["file"] for s in skipped}
    assert len(dm.cases) == N_CASES - 1
    in_splits = set(sum(dm.split.values(), []))
    assert "hippocampus_003" not in in_splits and "hippocampus_099" not in in_splits
    assert len(in_splits) == N_CASES - 1


def test_bad_case_error_mode_names_the_file(broken: Path, tmp_path: Path) -> None:
    dm = _dm(broken, tmp_path / "out", on_bad_case="error")
    with pytest.raises(CaseError, match="hippocampus_003.nii.gz") as info:
        dm.setup()
    assert info.value.path == str(broken / "imagesTr" / "hippocampus_003.nii.gz")
    with pytest.raises(ValueError, match="on_bad_case"):
        _dm(broken, None, on_bad_case="ignore")


def test_split_file_round_trip(loaded, syn: Path, tmp_path: Path) -> None:
    dm1, out1 = loaded
    other_seed = _dm(syn, None, split_seed=7)
    other_seed.setup()
    assert other_seed.split != dm1.split                    # a different seed draws another split...
    dm2 = _dm(syn, tmp_path / "out2", split_seed=7, split_file=str(out1 / "split.json"))
    dm2.setup()
    assert dm2.split == dm1.split                           # ...but the split file wins
    saved = json.loads((tmp_path / "out2" / "split.json").read_text())
    assert {k: saved[k] for k in ("train", "val", "test")} == dm1.split


def test_split_file_naming_unknown_case(syn: Path, tmp_path: Path) -> None:
    split_file = tmp_path / "split.json"
    names = [f"hippocampus_{i:03d}" for i in range(1, N_CASES + 1)]
    split_file.write_text(json.dumps({"train": names[:8] + ["hippocampus_777"], "val": names[8:9],
                                      "test": names[9:]}))
    dm = _dm(syn, None, split_file=str(split_file), max_cases=N_CASES)
    dm.setup()
    assert dm.split == {"train": names[:8], "val": names[8:9], "test": names[9:]}


def test_max_cases(syn: Path) -> None:
    dm = _dm(syn, None, max_cases=4)
    dm.setup()
    assert sorted(dm.cases) == [f"hippocampus_{i:03d}" for i in range(1, 5)]



def test_slice_axis_1(syn: Path) -> None:
    dm = _dm(syn, None, slice_axis=1)
    dm.setup()
    assert dm.preprocessing["slice_axis"] == 1
    depths = [_raw(syn, "imagesTr", n).shape[1] for n in dm.split["train"]]
    assert len(dm._datasets["train"]) == sum(depths)

# ---- select_pairs (shared by the data module and hippo.eval) ------------------------------------


@pytest.fixture
def paired_root(tmp_path: Path) -> Path:
    """Three pairs, an image without a label and a label without an image."""
    root = tmp_path / "pairs"
    for i in (1, 2, 3, 4):
        tiny_pair(root, name=f"hippocampus_{i:03d}", seed=i)
    (root / "labelsTr" / "hippocampus_004.nii.gz").rename(root / "labelsTr" / "hippocampus_009.nii.gz")
    return root


def test_select_pairs_scans_and_reports_unpaired_files(paired_root: Path, caplog) -> None:
    pairs, skipped = select_pairs(paired_root)
    assert [p.name for p in pairs] == ["hippocampus_001", "hippocampus_002", "hippocampus_003"]
    assert pairs[0].image == paired_root / "imagesTr" / "hippocampus_001.nii.gz"
    assert pairs[0].label == paired_root / "labelsTr" / "hippocampus_001.nii.gz"
    assert skipped == [{"file": str(paired_root / "imagesTr" / "hippocampus_004.nii.gz"), "problem": UNPAIRED},
                       {"file": str(paired_root / "labelsTr" / "hippocampus_009.nii.gz"), "problem": UNPAIRED}]
    assert sum("skipping unpaired file" in r.getMessage() for r in caplog.records) == 2
    dm = _dm(paired_root, None)             # the data module skips (and lists) the same files
    dm.setup()
    assert sorted(dm.cases) == [p.name for p in pairs] and dm.skipped == skipped


def test_select_pairs_with_a_manifest_and_a_split_file(paired_root: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"root": str(paired_root), "cases": [
        {"name": n, "image": f"imagesTr/{n}.nii.gz", "label": f"labelsTr/{n}.nii.gz"}
        for n in ("hippocampus_003", "hippocampus_001")]}))
    pairs, skipped = select_pairs(tmp_path / "elsewhere", manifest=manifest)    # root is not scanned
    assert [p.name for p in pairs] == ["hippocampus_003", "hippocampus_001"] and skipped == []
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["hippocampus_001", "hippocampus_002"], "val": [],
                                 "test": ["hippocampus_003", "hippocampus_077"]}))
    pairs, skipped = select_pairs(paired_root, split_file=split)                # split_part="test"
    assert [p.name for p in pairs] == ["hippocampus_003"] and len(skipped) == 2
    pairs, _ = select_pairs(paired_root, split_file=split, split_part="train")
    assert [p.name for p in pairs] == ["hippocampus_001", "hippocampus_002"]
    pairs, _ = select_pairs(paired_root, manifest=manifest, split_file=split, split_part="train")
    assert [p.name for p in pairs] == ["hippocampus_001"]
    with pytest.raises(ValueError, match=r"split.json: has no 'holdout' list \(keys: \['test', 'train', 'val'\]\)"):
        select_pairs(paired_root, split_file=split, split_part="holdout")
    with pytest.raises(ValueError, match=r"split.json: none of its 'val' cases are under"):
        select_pairs(paired_root, split_file=split, split_part="val")
    with pytest.raises(FileNotFoundError, match="data directory does not exist"):
        select_pairs(tmp_path / "nowhere")


# ---- prepare_data -----------------------------------------------------------------------------


def test_prepare_data_generates_synthetic_set_into_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "gen"
    root.mkdir()
    dm = _dm(root, tmp_path / "out", synthetic={"n_cases": 3, "seed": 0})
    dm.prepare_data()
    pairs, unpaired = find_pairs(root)
    assert [p.name for p in pairs] == ["hippocampus_001", "hippocampus_002", "hippocampus_003"]
    assert unpaired == []
    assert json.loads((root / "dataset.json").read_text())["synthetic"]["n_cases"] == 3
    dm.setup()
    assert len(dm.cases) == 3


def test_prepare_data_without_synthetic_config_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "nothing"
    root.mkdir()
    _dm(root, None).prepare_data()
    assert list(root.iterdir()) == []


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def test_prepare_data_leaves_a_real_dataset_untouched(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    for i in (1, 2, 3):
        tiny_pair(root, name=f"hippocampus_{i:03d}", seed=i)          # by hand, no dataset.json
    before = _snapshot(root)
    dm = _dm(root, tmp_path / "out", synthetic={"n_cases": 3, "seed": 0})
    dm.prepare_data()
    assert _snapshot(root) == before
    assert not (root / "dataset.json").exists() and not (root / ".synthetic.lock").exists()
    dm.setup()                                               # and it is the data that gets used
    assert sorted(dm.cases) == ["hippocampus_001", "hippocampus_002", "hippocampus_003"]
    assert dm.cases["hippocampus_001"].image.shape == (6, 8, 10)
    assert _snapshot(root) == before


# ---- the real data ----------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_data_loads_with_a_process_pool(tmp_path: Path) -> None:
    root = require_real_data()
    dm = HippocampusDataModule(root=str(root), output_dir=str(tmp_path / "out"), num_load_workers=2)
    dm.setup()
    assert dm.skipped == [], dm.skipped
    assert len(dm.cases) == 234
    assert sum(len(v) for v in dm.split.values()) == 234
    for name, case in dm.cases.items():
        assert case.image.dtype == np.float32, name
        assert case.image.min() >= 0.0 and case.image.max() <= 1.0, name
        assert case.image.max() == 1.0, name
        assert case.label.dtype == np.uint8 and case.label.shape == case.image.shape, name
        assert set(np.unique(case.label).tolist()) == {0, 1, 2}, name
    # the process pool gives exactly what a serial load in this process gives
    pairs, _ = find_pairs(root)
    subset = pairs[:: len(pairs) // 10][:10]
    serial, errors = load_cases(subset, workers=1)
    pooled, pool_errors = load_cases(subset, workers=2)
    assert errors == [] and pool_errors == [] and len(serial) == len(pooled) == 10
    for s, p in zip(serial, pooled):
        assert s.name == p.name and s.spacing == p.spacing
        np.testing.assert_array_equal(s.image, p.image)
        np.testing.assert_array_equal(s.label, p.label)
        np.testing.assert_array_equal(s.image, dm.cases[s.name].image)
        np.testing.assert_array_equal(s.label, dm.cases[s.name].label)
    assert os.listdir(tmp_path / "out") and (tmp_path / "out" / "split.json").is_file()


# ---- 2.5D context and cross-validation folds ---------------------------------------------------


def test_context_slices_feed_neighbours_as_channels(syn: Path) -> None:
    dm = _dm(syn, None, context_slices=2)
    dm.setup("fit")
    assert dm.preprocessing["context_slices"] == 2
    ds = dm._datasets["train"]
    name = dm.split["train"][0]
    volume = pad_or_crop(dm.cases[name].image, (64, 64))[0]
    depth = volume.shape[0]
    for s in (0, 1, depth // 2, depth - 1):          # edges repeat the first / last slice
        item = ds[s]
        assert tuple(item["image"].shape) == (5, 64, 64)
        for c, offset in enumerate(range(-2, 3)):
            np.testing.assert_array_equal(item["image"][c].numpy(), volume[min(max(s + offset, 0), depth - 1)])
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["image"].shape) == (8, 5, 64, 64)
    with pytest.raises(ValueError, match="context_slices"):
        _dm(syn, None, context_slices=-1)


def test_cross_validation_folds_partition_the_development_cases() -> None:
    names = [f"case_{i:03d}" for i in range(53)]
    base = split_by_volume(names, (0.7, 0.1, 0.2), seed=42)
    folds = [cross_validation_fold(base, 5, f, seed=42) for f in range(5)]
    development = set(base["train"]) | set(base["val"])
    vals = [set(f["val"]) for f in folds]
    assert set().union(*vals) == development and sum(len(v) for v in vals) == len(development)
    assert max(len(v) for v in vals) - min(len(v) for v in vals) <= 1
    for f, val in zip(folds, vals):
        assert f["test"] == base["test"]                       # the test split is never touched
        assert set(f["train"]) == development - val and not set(f["train"]) & set(f["test"])
    assert folds[0] == cross_validation_fold(base, 5, 0, seed=42)
    with pytest.raises(ValueError, match="fold must be in 0..4"):
        cross_validation_fold(base, 5, 5, seed=42)


def test_datamodule_fold_records_it_in_split_json(syn: Path, tmp_path: Path) -> None:
    plain = _dm(syn, None)
    plain.setup("fit")
    dm = _dm(syn, tmp_path, fold=1, num_folds=3)
    dm.setup("fit")
    assert dm.split["test"] == plain.split["test"]
    assert set(dm.split["train"]) | set(dm.split["val"]) == set(plain.split["train"]) | set(plain.split["val"])
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["fold"] == 1 and saved["num_folds"] == 3 and saved["val"] == dm.split["val"]
