"""Shared test fixtures: the real-data location and a writer of tiny NIfTI files."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

#: The real Decathlon Task04 data, next to the repository (``../shared/data/Task04_Hippocampus``).
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/Task04_Hippocampus"


def require_real_data() -> Path:
    """The real data directory, or ``pytest.skip`` naming the path when it is absent."""
    if not (REAL_DATA / "imagesTr").is_dir() or not (REAL_DATA / "labelsTr").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (needs imagesTr/ and labelsTr/)")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """Fixture form of :func:`require_real_data` (skips, naming the path, when the data is absent)."""
    return require_real_data()


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    """Save ``array`` as a NIfTI file (``.nii`` or ``.nii.gz`` by suffix) with diagonal ``spacing``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([float(s) for s in spacing] + [1.0])
    array = np.asarray(array)
    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms(tuple(float(s) for s in spacing) + (1.0,) * (array.ndim - 3))
    nib.save(img, str(path))
    return path


@pytest.fixture
def nifti_writer() -> Callable[..., Path]:
    """``nifti_writer(path, array, spacing=(1, 1, 1)) -> path``."""
    return write_nifti


def tiny_pair(root: Path, name: str = "hippocampus_001", shape=(6, 8, 10), seed: int = 0,
              image_dtype=np.float32, label_dtype=np.uint8, spacing=(1.0, 1.0, 1.0)) -> tuple[Path, Path]:
    """Write a small valid image/label pair in the Decathlon layout under ``root``."""
    rng = np.random.default_rng(seed)
    image = (rng.uniform(0, 200, size=shape)).astype(image_dtype)
    label = np.zeros(shape, dtype=label_dtype)
    label[1:3, 2:5, 3:6] = 1
    label[3:5, 2:5, 3:6] = 2
    img = write_nifti(root / "imagesTr" / f"{name}.nii.gz", image, spacing)
    lbl = write_nifti(root / "labelsTr" / f"{name}.nii.gz", label, spacing)
    return img, lbl


@pytest.fixture
def pair_writer() -> Callable[..., tuple[Path, Path]]:
    """``pair_writer(root, name=..., shape=..., ...) -> (image_path, label_path)``."""
    return tiny_pair


@pytest.fixture
def torch_single_thread():
    """Run a test with one intra-op torch thread (much faster for tiny networks on a busy machine:
    no thread oversubscription), restoring the previous setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    """A small randomly initialised model (seeded) saved as a real model file: exercises the file
    format and the whole inference path without training first."""
    import torch

    from hippo.infer import save_model_file
    from hippo.model.unet import UNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_model_file(path, UNet(initial_filters=8, num_downs=3),
                           preprocessing={"normalization": "minmax_per_volume", "slice_axis": 0, "patch_size": [64, 64]},
                           training={"data_root": "test", "split_sizes": {"train": 0}})


def local_non_loopback_ip() -> str | None:
    """An address of this machine other than 127.x (None when there is none), for tests that check
    a service refuses non-loopback peers."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def dciodvfy_problems(path) -> dict[str, list[str]]:
    """``{"errors": [...], "warnings": [...]}`` from ``dciodvfy`` (Debian ``dicom3tools``, the reference
    IOD validator) for one DICOM file; skips the test, saying so, when the tool is not installed."""
    import shutil
    import subprocess

    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; `make system-deps` installs it)")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return {"errors": [ln for ln in lines if ln.startswith("Error")],
            "warnings": [ln for ln in lines if ln.startswith("Warning")]}


#: A random network measures anything: tests that run one (``model_file``) widen the believable
#: volume ranges of :mod:`hippo.plausibility` and switch off the mask checks of :mod:`hippo.quality`
#: so that its studies can end "ok" (the input checks stay as configured). As keyword / mapping, and
#: as Hydra overrides for the command-line tools.
ANY_VOLUME = {"anterior_mm3": [0.0, 1e12], "posterior_mm3": [0.0, 1e12], "total_mm3": [0.0, 1e12],
              "min_member_agreement": 0.0, "max_member_volume_cv": 1e12, "min_largest_piece": 0.0,
              "max_removed_fraction": 1.0, "max_edge_voxels": 1e12}
ANY_VOLUME_OVERRIDES = [f"plausibility.{key}={'[' + ','.join(map(str, v)) + ']' if isinstance(v, list) else v}"
                        for key, v in ANY_VOLUME.items()]


def synthetic_crop_pair(root: Path) -> tuple[Path, Path]:
    """A HippoCrop-sized (35 x 51 x 35) synthetic image and its label (anterior and posterior boxes,
    brighter than the background) as NIfTI files under ``root``: a study for tests that need no real
    anatomy."""
    rng = np.random.default_rng(0)
    shape = (35, 51, 35)
    label = np.zeros(shape, np.uint8)
    label[12:22, 15:25, 12:22] = 1
    label[12:22, 25:38, 12:22] = 2
    image = (rng.normal(60, 10, shape) + 80 * (label > 0)).clip(0).astype(np.float32)
    return write_nifti(root / "image.nii.gz", image), write_nifti(root / "label.nii.gz", label)


@pytest.fixture
def storage_scp():
    """A factory of ``fakes.StorageSCP`` (same keywords) on loopback; stops each one at teardown."""
    from fakes import StorageSCP

    made: list[StorageSCP] = []

    def make(*args, **kwargs) -> StorageSCP:
        made.append(StorageSCP(*args, **kwargs))
        return made[-1]

    yield make
    for scp in made:
        scp.stop()
