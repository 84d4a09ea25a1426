"""Scanner emulator: a NIfTI volume becomes a DICOM MR study; the study can be sent by C-STORE.

What it is for: end-to-end tests and demonstrations of the deployment (ingest -> volume -> model
-> results -> PACS) without a scanner. It writes

* :func:`write_series`: one volume (with its voxel->RAS affine) as a single-frame MR Image Storage
  series, or in an enhanced layout (Enhanced / Legacy Converted Enhanced MR: one multi-frame
  instance, several, or one frame per instance; functional groups shared or per frame), with exact
  geometry (ImagePositionPatient / ImageOrientationPatient / PixelSpacing /
  SliceThickness / SpacingBetweenSlices derived from the affine, in LPS), so
  :func:`hippo.dicom.volume.load_series` gives the same array (after reorientation to closest
  canonical RAS) and the same affine;
* :func:`write_study`: the "HippoCrop" input series plus distractor series ("T1 MPRAGE full
  brain", "FLAIR", "T2 TSE") of the same study, optionally in nested folders with non-DICOM junk;
* :func:`write_wholehead_study`: a brain study around a real whole-head T1 (NIfTI or MGZ): the T1
  as a 3D MPRAGE ("t1_mprage_sag" / "t1_mprage_tra"), localizers, 2D T2 and FLAIR, a reformat;
* :func:`send_study`: C-STORE of every DICOM file of a folder over one association.

Command line::

    python -m hippo.scanner write --nifti X.nii.gz --out DIR [--label L.nii.gz] [--no-distractors]
                                  [--seed N] [--nested] [--manifest M.json]
    python -m hippo.scanner write-wholehead --scan T1.nii.gz|T1.mgz --out DIR [--orientation axial]
                                            [--no-t1] [--no-distractors] [--no-localizer] [--seed N]
                                            [--t1-layout enhanced|legacy [--frames-per-instance N]
                                             [--per-frame-groups]]
    python -m hippo.scanner send --dir DIR --host H --port P [--called-ae A] [--calling-ae B]

Rooms: :mod:`~hippo.scanner.study_info` (the patient and study), :mod:`~hippo.scanner.series_writer`
(one series), :mod:`~hippo.scanner.studies` (whole studies), :mod:`~hippo.scanner.sender` (C-STORE),
:mod:`~hippo.scanner.__main__` (the command line). The names below are the package's API.

Units: positions and spacings in mm; affines map voxel indices to RAS mm (NIfTI) or LPS mm
(DICOM); ``RAS = diag(-1, -1, 1) @ LPS``.
"""

from hippo.scanner.sender import ScannerSendError, find_dicom_files, send_study
from hippo.scanner.series_writer import MANUFACTURER, write_series
from hippo.scanner.studies import DISTRACTOR_DESCRIPTIONS, write_study, write_wholehead_study
from hippo.scanner.study_info import StudyInfo

__all__ = [
    "StudyInfo",
    "ScannerSendError",
    "write_series",
    "write_study",
    "write_wholehead_study",
    "send_study",
    "find_dicom_files",
    "MANUFACTURER",
    "DISTRACTOR_DESCRIPTIONS",
]
