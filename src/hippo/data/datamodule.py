"""``HippocampusDataModule``: NIfTI pairs in RAM, split by volume, served as 2D slices.

Stages (``setup``):
1. find the pairs (Decathlon layout, or a curation ``manifest.json``), listing unpaired files;
2. load every pair with a process pool (``num_load_workers``), normalising each image to
   ``[0, 1]`` on its own (min-max or robust percentiles); bad cases are skipped and listed (or raise, ``on_bad_case="error"``);
3. split by volume with a fixed seed (no slice of a volume crosses splits), or reuse a saved split;
4. save the split (and the skipped cases) as JSON in ``output_dir``.

Train/val loaders serve ``(1, H, W)`` slices centre-padded/cropped to ``patch_size``; the test
loader serves whole volumes for 3D evaluation.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hippo.fileio import write_json_atomic
from hippo.data.nifti import Case, CaseError, CasePaths, is_nifti, load_case
from hippo.data.pairs import select_pairs
from hippo.preprocessing import NORMALIZATIONS, pad_or_crop

log = logging.getLogger(__name__)


class SlicesDataset(Dataset):
    """2D slices along axis 0 of a list of volumes, optionally with neighbouring slices (2.5D).

    Args:
        images: ``(D_i, H, W) float32`` volumes already padded to the patch size.
        labels: matching ``(D_i, H, W) uint8`` label volumes.
        context: neighbouring slices per side given as extra channels (0: plain 2D).

    Items: ``{"image": (2 * context + 1, H, W) float32, "label": (H, W) int64, "volume": int,
    "slice": int}``; the middle channel is the labelled slice, edge slices repeat beyond the ends
    (as :func:`hippo.preprocessing.with_neighbours`).
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], context: int = 0):
        if len(images) != len(labels):
            raise ValueError("images and labels differ in number")
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        self.context = int(context)
        pad = ((self.context, self.context), (0, 0), (0, 0))
        self.images = [np.pad(img, pad, mode="edge") if self.context else img for img in images]
        self.labels = list(labels)
        self.index = [(v, s) for v, lbl in enumerate(self.labels) for s in range(lbl.shape[0])]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, s = self.index[i]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(self.images[v][s:s + 2 * self.context + 1])),
            "label": torch.from_numpy(self.labels[v][s].astype(np.int64)),
            "volume": v,
            "slice": s,
        }


class VolumesDataset(Dataset):
    """Whole cases for 3D evaluation; items are ``{"name", "image" (D,H,W), "label" (D,H,W), "spacing"}``
    as numpy arrays (use with ``batch_size=None``)."""

    def __init__(self, cases: Sequence[Case]):
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self.cases[i]
        return {"name": c.name, "image": c.image, "label": c.label, "spacing": list(c.spacing)}


def _is_synthetic(root: Path) -> bool:
    """Whether ``root/dataset.json`` was written by :mod:`hippo.data.synthetic` (its ``synthetic`` key)."""
    try:
        return "synthetic" in json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return False


def _identity(x: Any) -> Any:
    return x


def _load_one(args: tuple[CasePaths, int, str]) -> Case | CaseError:
    paths, axis, normalization = args
    try:
        return load_case(paths, slice_axis=axis, normalization=normalization)
    except CaseError as exc:
        return exc


def load_cases(pairs: Sequence[CasePaths], workers: int = 2, slice_axis: int = 0,
               normalization: str = "minmax_per_volume") -> tuple[list[Case], list[CaseError]]:
    """Load pairs with a process pool (``workers <= 1``: serially in this process).

    Returns:
        ``(cases, errors)`` in the order of ``pairs``; each error names its file and problem.
    """
    jobs = [(p, slice_axis, normalization) for p in pairs]
    if workers <= 1 or len(jobs) < 2:
        results = [_load_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_load_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    cases = [r for r in results if isinstance(r, Case)]
    errors = [r for r in results if isinstance(r, CaseError)]
    return cases, errors


def split_by_volume(names: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Shuffle case names with ``seed`` and cut them into train/val/test by ``fractions``.

    Every split that has a positive fraction gets at least one case when there are enough cases.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    names = sorted(names)
    order = np.random.default_rng(seed).permutation(len(names))
    n = len(names)
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if fractions[1] > 0 and n >= 3:
        n_val = max(n_val, 1)
    if fractions[2] > 0 and n >= 3:
        n_test = max(n_test, 1)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} cases are too few to split with fractions {list(fractions)}")
    shuffled = [names[i] for i in order]
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train:n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val:]),
    }


def cross_validation_fold(split: dict[str, list[str]], num_folds: int, fold: int, seed: int) -> dict[str, list[str]]:
    """Re-cut the train+val cases of ``split`` into ``num_folds`` folds; fold ``fold`` becomes val.

    The test cases stay untouched (held out from every fold), so a cross-validation never sees
    the test split and its folds partition the same development cases for any ``fold``.
    """
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1}, got {fold}")
    pool = sorted(split["train"] + split["val"])
    if len(pool) < num_folds:
        raise ValueError(f"{len(pool)} development cases are too few for {num_folds} folds")
    order = np.random.default_rng(seed).permutation(len(pool))
    parts = np.array_split(order, num_folds)
    val = sorted(pool[i] for i in parts[fold])
    return {"train": sorted(set(pool) - set(val)), "val": val, "test": list(split["test"])}


class HippocampusDataModule(L.LightningDataModule):
    """Decathlon-layout hippocampus data for slice-wise training.

    Args:
        root: dataset directory (``imagesTr/``, ``labelsTr/``).
        manifest: optional curation ``manifest.json``; when given, only its cases are used.
        patch_size: in-plane training size ``(H, W)`` (centre pad/crop).
        slice_axis: voxel axis to slice along.
        normalization: per-volume intensity normalisation (``minmax_per_volume`` or
            ``percentile_per_volume``, see :mod:`hippo.data.nifti`).
        context_slices: neighbouring slices per side fed as extra channels (2.5D); the network
            then needs ``in_channels = 2 * context_slices + 1``.
        split: fractions ``[train, val, test]`` by volume.
        split_seed: seed of the split.
        split_file: a saved ``split.json`` to reuse instead of drawing a split.
        fold: cross-validation fold (``0..num_folds-1``) or None: the train+val cases are cut
            into ``num_folds`` folds and this one is validated on; the test split is unchanged.
        num_folds: number of cross-validation folds.
        output_dir: where ``split.json`` and ``skipped_cases.json`` are written (None: nowhere).
        batch_size: slices per batch.
        num_workers: DataLoader workers.
        num_load_workers: processes that read and preprocess the NIfTI files.
        on_bad_case: ``"skip"`` (log and list them) or ``"error"``.
        max_cases: use at most this many cases (quick experiments), None for all.
        synthetic: when set (``{n_cases, seed}``), generate a synthetic dataset at ``root`` if
            none is there (the embedded default, see :mod:`hippo.data.synthetic`).
    """

    def __init__(
        self,
        root: str,
        manifest: str | None = None,
        patch_size: Sequence[int] = (64, 64),
        slice_axis: int = 0,
        normalization: str = "minmax_per_volume",
        context_slices: int = 0,
        split: Sequence[float] = (0.7, 0.1, 0.2),
        split_seed: int = 42,
        split_file: str | None = None,
        fold: int | None = None,
        num_folds: int = 5,
        output_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        num_load_workers: int = 2,
        on_bad_case: str = "skip",
        max_cases: int | None = None,
        synthetic: dict | None = None,
        pin_memory: bool = False,
    ):
        super().__init__()
        if on_bad_case not in ("skip", "error"):
            raise ValueError(f"on_bad_case must be 'skip' or 'error', got {on_bad_case!r}")
        self.root = Path(root)
        self.manifest = manifest
        self.patch_size = tuple(int(s) for s in patch_size)
        self.slice_axis = int(slice_axis)
        self.context_slices = int(context_slices)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; known: {sorted(NORMALIZATIONS)}")
        self.normalization = normalization
        if self.context_slices < 0:
            raise ValueError(f"context_slices must be >= 0, got {context_slices}")
        self.split_fractions = tuple(float(f) for f in split)
        self.split_seed = int(split_seed)
        self.split_file = split_file
        self.fold = None if fold is None else int(fold)
        self.num_folds = int(num_folds)
        self.output_dir = Path(output_dir) if output_dir else None
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.num_load_workers = int(num_load_workers)
        self.on_bad_case = on_bad_case
        self.max_cases = max_cases
        self.synthetic = dict(synthetic) if synthetic else None
        self.pin_memory = pin_memory
        self.cases: dict[str, Case] = {}
        self.split: dict[str, list[str]] = {}
        self.skipped: list[dict[str, str]] = []
        self._datasets: dict[str, Dataset] = {}

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What inference must repeat; stored in the exported model file."""
        return {"normalization": self.normalization, "slice_axis": self.slice_axis,
                "patch_size": list(self.patch_size), "context_slices": self.context_slices}

    def prepare_data(self) -> None:
        """Generate the synthetic data set when configured and ``root`` holds no data set yet.

        A ``root`` that already holds images (a real data set given as ``data.root=...``) is used
        as it is and never written to.
        """
        if self.synthetic is None or self.manifest:
            return
        from hippo.data.synthetic import generate_dataset

        images = self.root / "imagesTr"
        holds_data = images.is_dir() and any(is_nifti(p) for p in images.iterdir())
        if holds_data and not _is_synthetic(self.root):
            log.info("data.root %s already holds a data set: using it as it is", self.root)
            return
        log.info("synthetic data set %s in %s (generated unless already complete)", self.synthetic, self.root)
        generate_dataset(self.root, **self.synthetic)

    def _pairs(self) -> list[CasePaths]:
        pairs, unpaired = select_pairs(self.root, self.manifest)
        self.skipped.extend(unpaired)
        if self.max_cases:
            pairs = pairs[: int(self.max_cases)]
        return pairs

    def setup(self, stage: str | None = None) -> None:
        if self.cases:
            return
        self.skipped = []
        pairs = self._pairs()
        cases, errors = load_cases(pairs, self.num_load_workers, self.slice_axis, self.normalization)
        for err in errors:
            self.skipped.append({"file": err.path, "problem": err.problem})
            log.warning("skipping bad case: %s", err)
        if errors and self.on_bad_case == "error":
            raise CaseError(errors[0].path, f"{errors[0].problem} (and {len(errors) - 1} more bad cases)")
        if not cases:
            raise CaseError(self.root, "no usable labelled case (see the skipped files above)")
        self.cases = {c.name: c for c in cases}
        log.info("loaded %d cases from %s (%d skipped)", len(cases), self.manifest or self.root, len(self.skipped))
        self.split = self._make_split()
        self._save_json("split.json", {"seed": self.split_seed, "fractions": list(self.split_fractions),
                                       "fold": self.fold, "num_folds": self.num_folds if self.fold is not None else None,
                                       "root": str(self.root), **self.split})
        self._save_json("skipped_cases.json", self.skipped)
        self._datasets = {}
        for part in ("train", "val"):
            imgs, lbls = [], []
            for name in self.split[part]:
                c = self.cases[name]
                imgs.append(pad_or_crop(c.image, self.patch_size)[0])
                lbls.append(pad_or_crop(c.label, self.patch_size)[0])
            self._datasets[part] = SlicesDataset(imgs, lbls, self.context_slices)
        self._datasets["test"] = VolumesDataset([self.cases[n] for n in self.split["test"]])

    def _make_split(self) -> dict[str, list[str]]:
        split = self._base_split()
        if self.fold is not None:
            split = cross_validation_fold(split, self.num_folds, self.fold, self.split_seed)
        return split

    def _base_split(self) -> dict[str, list[str]]:
        if self.split_file:
            data = json.loads(Path(self.split_file).read_text())
            split = {k: [n for n in data.get(k, []) if n in self.cases] for k in ("train", "val", "test")}
            missing = sorted(set(sum((data.get(k, []) for k in ("train", "val", "test")), [])) - set(self.cases))
            if missing:
                log.warning("split file %s names %d cases not loaded: %s", self.split_file, len(missing), missing[:5])
            return split
        return split_by_volume(list(self.cases), self.split_fractions, self.split_seed)

    def _save_json(self, name: str, obj: Any) -> None:
        if self.output_dir is not None:
            write_json_atomic(self.output_dir / name, obj)

    def _loader(self, part: str, shuffle: bool) -> DataLoader:
        return DataLoader(self._datasets[part], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._datasets["test"], batch_size=None, shuffle=False, collate_fn=_identity)
