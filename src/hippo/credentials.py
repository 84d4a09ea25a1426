"""The PACS service account's credentials file (``{"username": ..., "password": ...}``, mode 0600).

Written by ``python -m hippo.network up`` (:func:`hippo.network.orthanc.ensure_credentials`) and read
by everything that talks to Orthanc's REST/DICOMweb API: the network itself, the viewer proxy, and
the prior-study search of ``hippo.deploy`` and the listener. A leaf module (standard library only),
so that deploy-side code reads the file without importing :mod:`hippo.network`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = ["CredentialsError", "read_credentials"]

log = logging.getLogger(__name__)


class CredentialsError(RuntimeError):
    """The credentials file is missing, unreadable or malformed (the message names the file)."""


def read_credentials(path: str | os.PathLike) -> tuple[str, str]:
    """``(username, password)`` from a credentials file (``{"username": ..., "password": ...}``).

    A file readable by group or others is tightened to 0600 (with a warning: change the password
    by deleting the file and running ``up`` again).

    Raises:
        CredentialsError: the file is missing or malformed.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CredentialsError(f"Orthanc credentials file not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"cannot read the Orthanc credentials file {path}: {exc.__class__.__name__}") from exc
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o): set to 0600; consider a new password (delete "
                    "the file, then `python -m hippo.network down` and `up`)", path, mode & 0o777)
        os.chmod(path, 0o600)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data.get(k)
                                             for k in ("username", "password")):
        raise CredentialsError(f"{path} must hold {{\"username\": ..., \"password\": ...}}")
    if ":" in data["username"]:
        raise CredentialsError(f"{path}: the user name must not contain ':'")
    return data["username"], data["password"]
