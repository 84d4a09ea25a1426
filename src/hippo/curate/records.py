"""What curation records per case and for the whole data set: the flags (reason codes, severity),
one :class:`CaseRecord` per image/label pair, the :class:`CurationResult`, and the JSON/number
formatting the outputs share. The reason codes are listed in :mod:`hippo.curate.curation`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence


from hippo.data.nifti import CasePaths
from hippo.fileio import to_plain, write_bytes_atomic


ERROR, OUTLIER, WARNING = "error", "outlier", "warning"
PERCENTILES = (1, 5, 50, 95, 99)
ROBUST_Z_SCALE = 0.6745  # Iglewicz & Hoaglin: z = 0.6745 (x - median) / MAD
CleanCopy = Literal["copy", "symlink"] | None


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class Flag:
    """One problem found in a case.

    Attributes:
        code: reason code (see the module docstring).
        severity: ``"error"`` (always excluded), ``"outlier"`` (excluded when configured) or
            ``"warning"`` (kept).
        file: the offending file, or ``None`` when it concerns the case as a whole.
        message: human-readable explanation.
    """

    code: str
    severity: str
    file: str | None
    message: str


@dataclass
class CaseRecord:
    """Everything :func:`curate` learned about one case (JSON-serialisable via ``asdict``).

    Stats that could not be computed (unreadable file, unpaired case...) are ``None``.
    ``volumes_mm3`` keys are ``anterior_mm3``, ``posterior_mm3``, ``total_mm3``; ``volume_z`` has
    the robust z-scores of the same three quantities.
    """

    name: str
    image: str | None = None
    label: str | None = None
    image_shape: list[int] | None = None
    image_dtype: str | None = None
    image_spacing: list[float] | None = None
    image_affine: list[list[float]] | None = None
    intensity: dict[str, float | int | None] | None = None
    label_shape: list[int] | None = None
    label_dtype: str | None = None
    label_spacing: list[float] | None = None
    label_affine: list[list[float]] | None = None
    label_values: list[float] | None = None
    voxel_counts: dict[str, int] | None = None
    volumes_mm3: dict[str, float] | None = None
    volume_z: dict[str, float] | None = None
    intensity_z: float | None = None
    flags: list[Flag] = field(default_factory=list)
    excluded: bool = False

    @property
    def files(self) -> list[str]:
        return [p for p in (self.image, self.label) if p is not None]

    @property
    def has_error(self) -> bool:
        return any(f.severity == ERROR for f in self.flags)

    def codes(self, severity: str | None = None) -> list[str]:
        return [f.code for f in self.flags if severity is None or f.severity == severity]

    def to_json(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


@dataclass
class CurationResult:
    """What :func:`curate` returns.

    Attributes:
        root: the scanned dataset directory (absolute).
        out_dir: where the outputs were written (absolute).
        records: one :class:`CaseRecord` per case name (pairs and unpaired files), sorted by name.
        clean: the kept cases (what ``manifest.json`` lists under ``cases``).
        summary: the summary dict also stored in ``curation.json``.
        files: output name -> path (``curation``, ``report``, ``manifest``, plots, ``clean``).
    """

    root: Path
    out_dir: Path
    records: list[CaseRecord]
    clean: list[CasePaths]
    summary: dict[str, Any]
    files: dict[str, Path]

    @property
    def excluded(self) -> list[CaseRecord]:
        return [r for r in self.records if r.excluded]

    @property
    def flagged(self) -> list[CaseRecord]:
        """Every case with at least one flag (excluded or kept)."""
        return [r for r in self.records if r.flags]

    def record(self, name: str) -> CaseRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def dump_json(obj: Any) -> str:
    return json.dumps(to_plain(obj), indent=2, allow_nan=False) + "\n"


def fmt_tuple(values: Sequence[float]) -> str:
    return "×".join(f"{float(v):g}" for v in values)
