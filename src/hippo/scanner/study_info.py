"""The emulated patient and study: :class:`StudyInfo` (names, IDs, dates, UIDs; deterministic from a seed)."""

from __future__ import annotations

import datetime as _dt
import random
import uuid
from dataclasses import dataclass

from pydicom.uid import (
    generate_uid,
)


_FIRST_NAMES = ("Anna", "Ben", "Clara", "David", "Eva", "Frank", "Greta", "Hans", "Ines", "Jon", "Karin", "Lars")
_LAST_NAMES = ("Hippo", "Campus", "Dentate", "Subiculum", "Fornix", "Ammon", "Entorhinal", "Parahippo")


# ----------------------------------------------------------------------------------------------
# Study information


@dataclass
class StudyInfo:
    """Patient and study attributes shared by every series of one emulated study.

    Every field left ``None`` is generated in ``__post_init__``; with ``seed`` set, the generated
    values (names, dates, UIDs, and the UIDs :func:`write_series` derives from them) are
    deterministic. ``patient_age`` is a DICOM AS string such as ``"072Y"`` consistent with
    ``patient_birth_date`` and ``study_date`` (``YYYYMMDD``).
    """

    patient_name: str | None = None
    patient_id: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    patient_age: str | None = None
    study_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_id: str | None = None
    study_description: str = "MRI BRAIN HIPPOCAMPUS"
    referring_physician_name: str = "Referrer^Rita"
    institution_name: str = "HippoVolume Test Hospital"
    station_name: str = "HIPPOSCANNER"
    magnetic_field_strength: float = 3.0
    seed: int | None = None

    def __post_init__(self) -> None:
        rng = random.Random(self.seed) if self.seed is not None else random.Random(uuid.uuid4().int)
        if self.patient_sex is None:
            self.patient_sex = rng.choice(("F", "M"))
        if self.patient_name is None:
            self.patient_name = f"{rng.choice(_LAST_NAMES)}^{rng.choice(_FIRST_NAMES)}"
        if self.patient_id is None:
            self.patient_id = f"HV{rng.randrange(10**6):06d}"
        if self.study_date is None:
            if self.seed is None:
                day = _dt.date.today()
            else:
                day = _dt.date(2024, 1, 1) + _dt.timedelta(days=rng.randrange(365))
            self.study_date = day.strftime("%Y%m%d")
        if self.study_time is None:
            self.study_time = f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
        study_day = _dt.datetime.strptime(self.study_date, "%Y%m%d").date()
        if self.patient_birth_date is None:
            years = int(self.patient_age[:3]) if self.patient_age else rng.randrange(55, 86)
            birth = _add_years(study_day, -years) - _dt.timedelta(days=rng.randrange(1, 360))
            self.patient_birth_date = birth.strftime("%Y%m%d")
        if self.patient_age is None:
            birth = _dt.datetime.strptime(self.patient_birth_date, "%Y%m%d").date()
            years = study_day.year - birth.year - ((study_day.month, study_day.day) < (birth.month, birth.day))
            self.patient_age = f"{max(0, min(years, 999)):03d}Y"
        if self.accession_number is None:
            self.accession_number = f"ACC{rng.randrange(10**8):08d}"
        if self.study_id is None:
            self.study_id = str(rng.randrange(1, 10**5))
        if self.study_instance_uid is None:
            self.study_instance_uid = self._uid("study")
        if self.frame_of_reference_uid is None:
            self.frame_of_reference_uid = self._uid("frame-of-reference")

    def _uid(self, *parts: object) -> str:
        """A new UID; deterministic from ``seed`` (and the study UID) plus ``parts`` when seeded."""
        if self.seed is None:
            return generate_uid()
        return generate_uid(entropy_srcs=["hippo.scanner", str(self.seed), str(self.study_instance_uid),
                                          *map(str, parts)])


def _add_years(day: _dt.date, years: int) -> _dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)
