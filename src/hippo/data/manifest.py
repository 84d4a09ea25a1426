"""Read a curation ``manifest.json`` (written by :mod:`hippo.curate`) into the cases training and
evaluation may use."""

from __future__ import annotations

import json
import os
from pathlib import Path


from hippo.data.nifti import CaseError, CasePaths


MANIFEST_VERSION = 1


def read_manifest(path: str | os.PathLike) -> list[CasePaths]:
    """Read the ``cases`` of a ``manifest.json`` written by :func:`curate`.

    Returns:
        The listed cases as :class:`CasePaths` (absolute paths), in manifest order.

    Raises:
        FileNotFoundError: the manifest does not exist.
        CaseError: (naming the manifest) malformed JSON or structure, duplicate or empty case list,
            or a listed image/label file that does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest file does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CaseError(path, f"manifest is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise CaseError(path, 'malformed manifest: expected an object with a "cases" list')
    base = Path(data["root"]) if isinstance(data.get("root"), str) else path.parent
    if not base.is_absolute():
        base = path.parent / base
    out, seen = [], set()
    for i, entry in enumerate(data["cases"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("image"), str) and isinstance(entry.get("label", None), (str, type(None)))):
            raise CaseError(path, f'malformed manifest: cases[{i}] must be {{"name": str, "image": str, '
                                  f'"label": str}}, got {entry!r:.200}')
        name = entry["name"]
        if name in seen:
            raise CaseError(path, f"malformed manifest: case {name!r} listed twice")
        seen.add(name)
        files = {}
        for key in ("image", "label"):
            if entry.get(key) is None:
                files[key] = None
                continue
            p = Path(entry[key])
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise CaseError(path, f"case {name!r}: {key} file {p} does not exist")
            files[key] = p
        out.append(CasePaths(name, files["image"], files["label"]))
    if not out:
        raise CaseError(path, "manifest lists no cases")
    return out
