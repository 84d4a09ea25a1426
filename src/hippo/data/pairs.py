"""Which labelled (image, label) pairs a run uses: the one selection training (the data module) and
evaluation (``hippo.eval``, the model publisher) share."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hippo.data.manifest import read_manifest
from hippo.data.nifti import CasePaths, find_pairs

log = logging.getLogger(__name__)

UNPAIRED = "no matching image/label partner"


def select_pairs(root: str | os.PathLike, manifest: str | os.PathLike | None = None,
                 split_file: str | os.PathLike | None = None,
                 split_part: str = "test") -> tuple[list[CasePaths], list[dict[str, str]]]:
    """The labelled pairs to use, and the files skipped as unpaired.

    Args:
        root: a Decathlon-layout directory (``imagesTr/``, ``labelsTr/``), paired by file name.
        manifest: a curation ``manifest.json`` (:mod:`hippo.curate`); its cases replace the
            directory scan (nothing is then unpaired).
        split_file: a training run's ``split.json``; only the cases of its ``split_part`` list
            (``train``, ``val`` or ``test``) are kept. None keeps every pair.

    Returns:
        ``(pairs, skipped)``: the pairs (sorted by name after a scan, in manifest order with a
        manifest) and ``{"file", "problem"}`` for each file without a partner (logged as warnings).

    Raises:
        FileNotFoundError: ``root``, its image directory or the manifest does not exist.
        CaseError (a ValueError): no NIfTI image under ``root``, or a malformed manifest.
        ValueError: the split file has no ``split_part`` list, or none of its cases are there.
    """
    if manifest:
        pairs, unpaired = read_manifest(manifest), []
    else:
        pairs, unpaired = find_pairs(root)
    for path in unpaired:
        log.warning("skipping unpaired file %s", path)
    skipped = [{"file": path, "problem": UNPAIRED} for path in unpaired]
    if split_file:
        split = json.loads(Path(split_file).read_text())
        if split_part not in split:
            raise ValueError(f"{split_file}: has no {split_part!r} list (keys: {sorted(split)})")
        wanted = set(split[split_part])
        pairs = [p for p in pairs if p.name in wanted]
        if not pairs:
            raise ValueError(f"{split_file}: none of its {split_part!r} cases are under {root}")
    return pairs, skipped
