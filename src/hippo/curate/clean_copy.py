"""The clean copy of a curated data set: the kept cases in the Decathlon layout with a regenerated
``dataset.json``, built beside the old copy and swapped in atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


from hippo.data.nifti import CasePaths
from hippo.preprocessing import LABEL_NAMES
from hippo.fileio import replace_dir
from hippo.curate.records import dump_json


def write_clean_copy(root: Path, clean_dir: Path, clean: list[CasePaths], mode: str,
                      images_dir: str, labels_dir: str) -> Path:
    """Build ``clean_dir`` next to itself, then swap it in (a rerun replaces the old copy)."""
    tmp = Path(tempfile.mkdtemp(prefix=".clean.", dir=clean_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        training = []
        for sub, key in ((images_dir, "image"), (labels_dir, "label")):
            (tmp / sub).mkdir()
        for c in clean:
            entry = {}
            for sub, key, src in ((images_dir, "image", c.image), (labels_dir, "label", c.label)):
                dst = tmp / sub / Path(src).name
                if mode == "symlink":
                    os.symlink(Path(src).resolve(), dst)
                else:
                    shutil.copy2(src, dst)
                entry[key] = f"./{sub}/{dst.name}"
            training.append(entry)
        meta: dict[str, Any] = {}
        src_json = root / "dataset.json"
        if src_json.is_file():
            try:
                meta = json.loads(src_json.read_text(encoding="utf-8"))
                if not isinstance(meta, dict):
                    meta = {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
        meta.setdefault("name", "Hippocampus")
        meta.setdefault("labels", {str(k): v for k, v in LABEL_NAMES.items()})
        meta.update(numTraining=len(training), training=training, numTest=0, test=[],
                    curation={"source": str(root), "mode": mode,
                              "note": "only the cases kept by hippo.curate.curation; see ../manifest.json"})
        (tmp / "dataset.json").write_text(dump_json(meta), encoding="utf-8")
        replace_dir(tmp, clean_dir, trash_prefix=".clean.old.")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return clean_dir
