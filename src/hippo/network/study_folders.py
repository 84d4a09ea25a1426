"""The listener's study folders on disk: what counts as a received instance, which sub-folders are
studies, and which studies may be only partly here.

Layout below the listener's root (see :mod:`hippo.network.listener`):
``incoming/<StudyUID>/<SOPUID>.dcm``, ``work/``, ``processed/``, ``failed/``. Only complete
instances carry the ``.dcm`` name (they are written under a dot-name and renamed); folders are
named by a StudyInstanceUID that passed :func:`hippo.pacs.validate_uid`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import pydicom

from hippo.fileio import replace_dir
from hippo.pacs import validate_uid

__all__ = ["SUFFIX", "TRASH", "instances", "instance_names", "link_or_copy", "replace_study_dir", "study_folders",
           "partial_studies", "remove_trash"]

log = logging.getLogger(__name__)

#: The file name suffix of a complete instance.
SUFFIX = ".dcm"
#: The name prefix of a half-replaced folder (removed at start).
TRASH = ".trash-"


def instances(folder: Path) -> list[Path]:
    """Complete instances of a study folder: ``<UID>.dcm`` files (temporary dot-files skipped)."""
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return []
    return sorted(p for p in entries
                  if p.name.endswith(SUFFIX) and not p.name.startswith(".") and p.is_file())


def instance_names(folder: Path) -> set[str]:
    return {p.name for p in instances(folder)}


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def replace_study_dir(src: Path, dst: Path) -> None:
    """Put directory ``src`` at ``dst``, replacing what was there (:func:`hippo.fileio.replace_dir`)."""
    replace_dir(src, dst, trash_prefix=TRASH)


def study_folders(parent: Path) -> list[Path]:
    """The sub-folders of ``parent`` named by a valid StudyInstanceUID, sorted (others are logged)."""
    folders = []
    for p in sorted(parent.iterdir()):
        if not p.is_dir():
            continue
        try:
            validate_uid(p.name)
        except ValueError:
            log.warning("ignoring %s: not a study folder", p)
            continue
        folders.append(p)
    return folders

def partial_studies(incoming_dir: Path, failed_dir: Path) -> dict[str, set[str]]:
    """``{study UID: {series UIDs}}`` of the studies that may be only partly here: those left in
    ``incoming/`` by a crash, and those in ``failed/`` because their series was incomplete."""
    found: dict[str, set[str]] = {}
    for parent, only_incomplete in ((incoming_dir, False), (failed_dir, True)):
        for folder in study_folders(parent):
            if only_incomplete:
                with contextlib.suppress(OSError, ValueError, TypeError):
                    if "incomplete:" not in str(json.loads((folder / "error.json").read_text()).get("error")):
                        continue
                if not (folder / "error.json").exists():
                    continue
            series: set[str] = set()
            for path in instances(folder):
                with contextlib.suppress(Exception):
                    uid = str(pydicom.dcmread(path, stop_before_pixels=True,
                                             specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
                    series.add(validate_uid(uid))
            if series:
                found.setdefault(folder.name, set()).update(series)
    return found


def remove_trash(*parents: Path) -> None:
    """Remove the half-replaced folders (``TRASH`` prefix) a crash left in ``parents``."""
    for d in parents:
        for p in d.iterdir():
            if p.name.startswith(TRASH) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
