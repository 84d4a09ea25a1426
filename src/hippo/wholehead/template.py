"""The MNI ICBM152 2009 template the whole-head path registers to, and the hippocampus centroids.

Shipped package data (``hippo/wholehead/``):

* ``mni_icbm152_t1_2mm.nii.gz``: the ICBM 2009a Nonlinear Symmetric T1 template (skull-stripped,
  as nilearn ships it: ``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``,
  197 x 233 x 189 at 1 mm), averaged over 2 x 2 x 2 blocks to 99 x 117 x 95 voxels at 2 mm
  (uint8, RAS, 240 kB) by :func:`downsample_template`. Its licence asks that the copyright notice
  appear in all copies: it is in ``TEMPLATE_NOTICE.md`` beside it.
* Hippocampus centroids in MNI space: derived numbers only (the atlas itself is not shipped) from
  the Melbourne Subcortex Atlas (Tian et al. 2020), scale II, labels aHIP+pHIP per hemisphere
  (``shared/data/wholehead/README.md``). Its licence requires any publication using it to cite
  :data:`TIAN_CITATION`.

numpy + nibabel only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from hippo.regrid import block_mean

__all__ = [
    "Template", "load_template", "TEMPLATE_PATH", "HIPPOCAMPUS_CENTROIDS_MNI", "TIAN_CITATION",
    "ICBM_NOTICE", "MNI_ETIV_CONSTANT_MM3", "TEMPLATE_BRAIN_MM3", "downsample_template",
]

_HERE = Path(__file__).resolve().parent
#: The shipped 2 mm template (see the module docstring).
TEMPLATE_PATH = _HERE / "mni_icbm152_t1_2mm.nii.gz"

#: Whole-hippocampus centres of gravity (mm, MNI) of the Tian 2020 atlas, scale II (aHIP + pHIP).
HIPPOCAMPUS_CENTROIDS_MNI: dict[str, tuple[float, float, float]] = {
    "left": (-27.5, -22.3, -15.2),
    "right": (26.6, -22.1, -15.6),
}

TIAN_CITATION = (
    "Tian Y, Margulies DS, Breakspear M, Zalesky A (2020). Topographic organization of the human "
    "subcortex unveiled with functional connectivity gradients. Nature Neuroscience 23:1421-1432. "
    "doi:10.1038/s41593-020-00711-6"
)

ICBM_NOTICE = (
    "ICBM 2009a Nonlinear Symmetric template: Copyright (C) 1993-2004 Louis Collins, McConnell Brain "
    "Imaging Centre, Montreal Neurological Institute, McGill University (Fonov et al. 2009, 2011)."
)

#: Intracranial volume (mm³) that corresponds to a determinant of 1 of the affine to MNI space:
#: FreeSurfer's empirically calibrated eTIV scale factor for a 12-parameter affine to MNI305
#: (``eTIV = 1948.106 cm³ / det(talairach.xfm)``; FreeSurfer ``mri_segstats``/``MRIestimateTIV``,
#: after Buckner et al. 2004, NeuroImage 23:724-738). ICBM152 2009 lies in the same MNI space; our
#: affine goes to the skull-stripped template, not to FreeSurfer's, so the estimate is approximate.
MNI_ETIV_CONSTANT_MM3 = 1_948_106.0

#: Volume (mm³) of the non-zero (brain) voxels of the 1 mm skull-stripped template, for reference.
TEMPLATE_BRAIN_MM3 = 1_886_539.0


@dataclass(frozen=True)
class Template:
    """The registration target.

    Attributes:
        array: ``(X, Y, Z) float32`` T1 intensities (0 outside the brain), RAS voxel order.
        affine: ``(4, 4)`` voxel index -> MNI (RAS) mm.
        spacing: voxel size (mm) of the three axes.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]

    @cached_property
    def brain_mask(self) -> np.ndarray:
        """``(X, Y, Z) bool``: the template's brain (non-zero voxels); made once, read only."""
        mask = self.array > 0
        mask.flags.writeable = False
        return mask

    @cached_property
    def brain_centre_mm(self) -> np.ndarray:
        """``(3,)`` the brain's intensity-weighted centre (MNI mm); made once, read only."""
        idx = np.argwhere(self.brain_mask)
        w = self.array[self.brain_mask]
        centre = self.affine[:3, :3] @ ((idx * w[:, None]).sum(0) / w.sum()) + self.affine[:3, 3]
        centre.flags.writeable = False
        return centre

    @cached_property
    def vertex_to_centre_mm(self) -> float:
        """From the brain's top (the 99.9th percentile of its voxels' z) down to :attr:`brain_centre_mm` (mm)."""
        idx = np.argwhere(self.brain_mask)
        brain_z = (idx @ self.affine[:3, :3].T + self.affine[:3, 3])[:, 2]
        return float(np.percentile(brain_z, 99.9) - self.brain_centre_mm[2])

    def block_means(self, mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(array, affine, brain mask)`` block-averaged to about ``mm`` voxels (made once per level)."""
        levels = self._levels
        if mm not in levels:
            fa, faff = block_mean(self.array, self.affine, mm)
            fm, _ = block_mean(self.brain_mask.astype(np.float32), self.affine, mm)
            level = (fa, faff, fm > 0.5)
            for a in level:
                a.flags.writeable = False
            levels[mm] = level
        return levels[mm]

    @cached_property
    def _levels(self) -> dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return {}


@lru_cache(maxsize=2)
def load_template(path: str | os.PathLike | None = None) -> Template:
    """The shipped 2 mm ICBM152 2009 template (cached per process).

    Raises:
        FileNotFoundError: the package was installed without its data file.
    """
    import nibabel as nib

    path = Path(path) if path is not None else TEMPLATE_PATH
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the MNI template is missing from this install (reinstall the package)")
    img = nib.load(str(path))
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return Template(np.asarray(img.dataobj, dtype=np.float32), affine, spacing)  # type: ignore[arg-type]


def downsample_template(source: str | os.PathLike, destination: str | os.PathLike, factor: int = 2) -> Path:
    """Make the shipped template from nilearn's 1 mm ICBM152 2009a T1 (how the package file was made).

    Averages ``factor``³ blocks (zero-padding odd sizes), rounds to uint8 and writes a NIfTI whose
    affine places each block's centre where the 1 mm voxels' centres average.

    Args:
        source: ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` from the nilearn wheel.
        destination: the ``.nii.gz`` to write.
    """
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(source)))
    a = np.asarray(img.dataobj, dtype=np.float32)
    shape = [-(-s // factor) * factor for s in a.shape]
    padded = np.zeros(shape, np.float32)
    padded[: a.shape[0], : a.shape[1], : a.shape[2]] = a
    b = padded.reshape(shape[0] // factor, factor, shape[1] // factor, factor, shape[2] // factor, factor).mean((1, 3, 5))
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + img.affine[:3, 3]
    affine[:3, :3] = img.affine[:3, :3] * factor
    out = nib.Nifti1Image(np.round(b).astype(np.uint8), affine)
    out.header.set_xyzt_units("mm")
    out.header["descrip"] = b"ICBM152 2009a sym T1, 2mm block mean"
    destination = Path(destination)
    nib.save(out, str(destination))
    return destination
