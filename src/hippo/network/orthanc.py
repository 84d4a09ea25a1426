"""Orthanc, the local PACS: configuration, a plain background process, and a tiny REST client.

* :class:`OrthancSettings` -- AE title, ports, storage, StableAge, known modalities, plugins, users,
  accepted ``Host`` values.
* :func:`write_config` -- ``<dir>/orthanc.json`` (mode 0600), ``<dir>/access.lua`` (the HTTP access
  filter, :mod:`hippo.network`'s ``access.lua`` with a generated header) and ``<dir>/routing.lua``
  (the auto-routing script, ``routing.lua`` with a generated header naming the target modality).
* :func:`ensure_credentials` / :func:`read_credentials` -- the generated service account
  (``credentials.json``, mode 0600).
* :func:`start_orthanc` / :func:`wait_ready` / :func:`stop` -- ``Orthanc <dir>/orthanc.json`` as an
  ordinary child process in its own session (never the Debian system service: no systemctl).
* :class:`OrthancClient` -- urllib-only helper for the REST API (studies, series, instances,
  lookup by StudyInstanceUID, delete), HTTP Basic when given credentials.

What binds where (Orthanc 1.10.1, Debian bookworm)
--------------------------------------------------
Orthanc 1.10.1 has **no option to choose the listening address**: ``Orthanc --help`` and the full
sample configuration (``Orthanc --config=-``) offer none (no ``HttpBindAddress``/``DicomBindAddress``),
so both servers listen on **all interfaces** (``0.0.0.0:<HttpPort>`` and ``0.0.0.0:<DicomPort>``;
check with ``ss -ltnp``). The strongest restrictions that version offers are therefore used:

* HTTP (REST, DICOMweb at ``/dicom-web/``, Orthanc Explorer): ``RemoteAccessAllowed: false`` --
  Orthanc serves only clients connecting from the loopback address; anyone else gets HTTP 401
  (checked in tests/test_orthanc.py from this machine's non-loopback address). WebDAV,
  ``/tools/execute-script`` and REST writes to the file system are off.
* DICOM: ``DicomAlwaysAllowEcho``/``DicomAlwaysAllowStore``: ``false``, ``DicomCheckModalityHost``:
  ``true``, ``DicomCheckCalledAet``: ``true`` -- only the modalities listed in ``DicomModalities``
  (by default ``HIPPOAI`` and ``HIPPOSCANNER``, both at ``127.0.0.1``) may associate, only from their
  listed host, and only when they call Orthanc by its AE title. C-FIND/GET/MOVE from unknown AEs
  stay off (Orthanc's defaults). Set ``allow_unknown_aets=True`` to accept any calling AE (a lab
  with many scanners) -- then any host that reaches the port can store.
* For stronger isolation, firewall the two ports (``nft``/``iptables``) or run Orthanc in a network
  namespace/container publishing only ``127.0.0.1:<port>``.

Security of the REST API against the machine's own web browser
---------------------------------------------------------------
"Loopback only" is not enough: any web page open in a browser on the workstation can send
requests to ``http://127.0.0.1:8042`` (a cross-origin ``POST /tools/shutdown`` with a text/plain
body needs no CORS preflight; ``GET /studies/<id>?_method=DELETE`` is a DELETE to Orthanc), and a
page whose DNS name is re-bound to 127.0.0.1 can even read the answers. Three layers:

1. **Credentials** (HTTP Basic, ``AuthenticationEnabled``): on whenever ``users`` is non-empty
   (``RegisteredUsers``). :class:`hippo.network.stack.Network` always adds a generated service
   account (:func:`ensure_credentials`: user ``hippo``, a ``secrets.token_urlsafe(32)`` password,
   stored in ``<root>/orthanc/credentials.json`` with mode 0600, created at the first ``up`` and
   reused) -- its own readiness checks, ``status``, the viewer's proxy and the tests use it;
   ``orthanc.users`` adds human users. A request without valid credentials gets 401 before
   anything else runs. ``orthanc.json`` (passwords in clear) is written with mode 0600 from the
   start. Put TLS in front (``SslEnabled``/``SslCertificate``) before ``remote_access=True``.
2. **The Host header** (DNS rebinding): the Lua ``IncomingHttpRequestFilter`` in ``access.lua``
   answers 403 unless ``Host`` is ``127.0.0.1:<HttpPort>``, ``localhost:<HttpPort>`` or one of
   ``allowed_hosts`` (the network adds the viewer's ``127.0.0.1:<port>``/``localhost:<port>``: its
   proxy forwards the browser's Host).
3. **Origin** (CSRF): the same filter answers 403 to every method but GET/HEAD/OPTIONS (after
   Orthanc's method faking) that carries an ``Origin`` other than Orthanc's own
   (``http://127.0.0.1:<HttpPort>``, ``http://localhost:<HttpPort>``), a ``Sec-Fetch-Site`` other
   than ``same-origin``/``none``, or a ``Referer`` outside Orthanc's own origin. Orthanc Explorer
   (same origin) and non-browser clients keep working.

Orthanc's internal calls (the routing script's ``RestApiGet``/``RestApiPost``) bypass HTTP
authentication and the filter (checked on Orthanc 1.10.1 in tests/test_orthanc.py). The filter
shares Orthanc's single Lua context with the routing script; it only does table lookups.
``http_filter=False`` leaves it out (and ``users={}`` leaves authentication off) -- for a
throw-away instance only.

The DICOMweb plugin's ``Host`` (the ``host:port`` it writes into the URLs of its answers, e.g.
RetrieveURL) is ``127.0.0.1:<HttpPort>`` unless ``dicomweb_host`` says otherwise; the packaged
``/etc/orthanc/dicomweb.json`` says ``localhost``, which that file (not loaded here) would impose.

Only the standard library; never imports torch, Lightning or Hydra; never logs patient names.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hippo import credentials
from hippo.config import plain, settings_fields
from hippo.fileio import write_bytes_atomic

log = logging.getLogger(__name__)

__all__ = [
    "OrthancSettings",
    "OrthancError",
    "OrthancClient",
    "build_config",
    "write_config",
    "start_orthanc",
    "wait_ready",
    "stop",
    "find_orthanc",
    "find_dicomweb_plugin",
    "routing_script",
    "access_script",
    "access_header",
    "ensure_credentials",
    "read_credentials",
    "new_credentials",
    "port_in_use",
    "pid_alive",
    "group_alive",
    "free_port",
    "tail",
    "CONFIG_NAME",
    "LOG_NAME",
    "CREDENTIALS_NAME",
    "SERVICE_USER",
]

#: Names inside the Orthanc directory given to :func:`write_config` / :func:`start_orthanc`.
CONFIG_NAME = "orthanc.json"
LUA_NAME = "routing.lua"
#: The Orthanc user metadata in which routing.lua stores, per input series, the fingerprint
#: (instance count and a hash of the instance ids) of what it last sent, and its index.
ROUTED_METADATA = "HippoRouted"
ROUTED_METADATA_INDEX = 4831
ACCESS_LUA_NAME = "access.lua"        # the HTTP access filter (IncomingHttpRequestFilter)
CREDENTIALS_NAME = "credentials.json"  # the generated service account (see ensure_credentials)
#: The user name of the generated service account.
SERVICE_USER = "hippo"
LOG_NAME = "logs/orthanc.log"           # Orthanc's own log (--logfile)
CONSOLE_LOG_NAME = "logs/orthanc.console.log"  # stdout/stderr (messages before logging starts)
#: Where Debian's orthanc-dicomweb puts the plugin (searched first), then other usual places.
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins",
               "/usr/lib/x86_64-linux-gnu/orthanc/plugins", "/usr/lib/aarch64-linux-gnu/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
_AE_MAX = 16
_HOST_PORT_RE = re.compile(r"^(?:[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?|\[[0-9a-f:.]{2,45}\]):[0-9]{1,5}$")


class OrthancError(RuntimeError):
    """Orthanc could not be configured, started, reached, or answered with an error.

    ``status`` is the HTTP status when Orthanc answered with one (401, 403, 404, ...), else ``None``.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _default_modalities() -> dict[str, dict[str, Any]]:
    return {
        "hippoai": {"aet": "HIPPOAI", "host": "127.0.0.1", "port": 11112},
        "scanner": {"aet": "HIPPOSCANNER", "host": "127.0.0.1", "port": 11113},
    }


@dataclass
class OrthancSettings:
    """One Orthanc instance.

    Attributes:
        aet: Orthanc's DICOM AE title (``DicomAet``, 1..16 characters).
        dicom_port: DICOM listener (C-ECHO/C-STORE) port; http_port: REST/DICOMweb port.
        storage_dir: where the DICOM files and the SQLite index go; ``None`` = ``<dir>/storage``
            (``<dir>`` being the directory given to :func:`write_config`).
        stable_age: seconds without a new instance before a study counts as stable and the Lua
            ``OnStableStudy`` routing runs (Orthanc's default is 60).
        modalities: known DICOM peers, ``name -> {"aet", "host", "port"}`` (a ``[aet, host, port]``
            list is accepted too). ``name`` is used in REST paths (``/modalities/<name>/store``).
        route_to: the modality the Lua script sends HippoCrop series to (must be in ``modalities``);
            ``None`` writes no Lua script (no auto-routing). An input series is sent again when it
            has changed since it was sent (e.g. the rest of a series arriving later), never our
            results (``routing.lua``'s header has the rule).
        route_scope: ``"series"`` (default: only the HippoCrop series -- all the listener needs) or
            ``"study"`` (the whole study).
        plugins_dir: where to find ``libOrthancDicomWeb.so``; ``None`` = auto-detect
            (:func:`find_dicomweb_plugin`).
        dicomweb: load the DICOMweb plugin (``/dicom-web/``, WADO-URI at ``/wado``). Raises in
            :func:`write_config` when the plugin cannot be found.
        dicomweb_host: ``host:port`` the plugin writes into URLs it returns; ``None`` =
            ``127.0.0.1:<http_port>``. (The network stack sets it to the viewer's origin, whose
            proxy forwards ``/dicom-web/``.)
        name: ``Name`` shown by ``/system`` (also used by :func:`wait_ready` to make sure it talks to
            *this* instance, not another Orthanc on the same port).
        remote_access, users: see the module docstring (HTTP Basic authentication is on iff
            ``users``, ``{name: password}``).
        allowed_hosts: ``Host`` header values (``host:port``) accepted besides
            ``127.0.0.1:<http_port>`` and ``localhost:<http_port>`` (e.g. the viewer's origin, whose
            proxy forwards the browser's Host; a DNS name when ``remote_access``).
        http_filter: install the Lua access filter (``access.lua``: Host check, cross-origin
            writes refused); ``False`` only for throw-away instances.
        allow_unknown_aets: accept C-ECHO/C-STORE from any calling AE and host.
        binary: the Orthanc executable (``None`` = :func:`find_orthanc`).
        extra: further top-level configuration keys (override the generated ones).
    """

    aet: str = "ORTHANC"
    dicom_port: int = 4242
    http_port: int = 8042
    storage_dir: str | os.PathLike | None = None
    stable_age: int = 3
    modalities: dict[str, Any] = field(default_factory=_default_modalities)
    route_to: str | None = "hippoai"
    route_scope: str = "series"
    plugins_dir: str | os.PathLike | None = None
    dicomweb: bool = True
    dicomweb_host: str | None = None
    name: str = "HippoVolume PACS"
    remote_access: bool = False
    users: dict[str, str] = field(default_factory=dict)
    allowed_hosts: list[str] = field(default_factory=list)
    http_filter: bool = True
    allow_unknown_aets: bool = False
    binary: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.aet = _check_ae(self.aet, "aet")
        self.dicom_port = _check_port(self.dicom_port, "dicom_port")
        self.http_port = _check_port(self.http_port, "http_port")
        if self.dicom_port == self.http_port:
            raise ValueError(f"dicom_port and http_port are both {self.dicom_port}")
        self.stable_age = int(self.stable_age)
        if self.stable_age < 1:
            raise ValueError(f"stable_age must be >= 1 second, got {self.stable_age}")
        self.modalities = {str(k): _modality(k, v) for k, v in dict(self.modalities or {}).items()}
        if self.route_to is not None and self.route_to not in self.modalities:
            raise ValueError(f"route_to={self.route_to!r} is not one of the modalities {sorted(self.modalities)}")
        if self.route_scope not in ("series", "study"):
            raise ValueError(f"route_scope must be 'series' or 'study', got {self.route_scope!r}")
        self.users = {str(k): str(v) for k, v in dict(self.users or {}).items()}
        for name, password in self.users.items():
            if not name or ":" in name or not password:
                raise ValueError(f"user {name!r}: HTTP Basic needs a non-empty name without ':' and a password")
        self.allowed_hosts = [_check_host(h) for h in list(self.allowed_hosts or [])]
        self.http_filter = bool(self.http_filter)
        self.extra = dict(self.extra or {})

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "OrthancSettings":
        """From a (possibly OmegaConf) mapping; a key this class does not have raises ``ValueError``
        naming it (:func:`hippo.config.settings_fields`)."""
        return cls(**settings_fields(cls, cfg))

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:<http_port>`` (the REST root; DICOMweb under ``/dicom-web/``)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def authentication(self) -> bool:
        return bool(self.users)

    @property
    def accepted_hosts(self) -> list[str]:
        """Every ``Host`` header value the access filter accepts (lower case, sorted)."""
        own = {f"127.0.0.1:{self.http_port}", f"localhost:{self.http_port}"}
        return sorted(own | set(self.allowed_hosts))

    @property
    def own_origins(self) -> list[str]:
        """Orthanc's own origins (Orthanc Explorer's pages): the only ``Origin`` allowed to write."""
        return [f"http://127.0.0.1:{self.http_port}", f"http://localhost:{self.http_port}"]


def _check_ae(value: Any, what: str) -> str:
    value = str(value).strip()
    if not 1 <= len(value) <= _AE_MAX or "\\" in value:
        raise ValueError(f"{what} must be 1..16 characters without '\\', got {value!r}")
    return value


def _check_port(value: Any, what: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"{what} must be in 1..65535, got {value!r}")
    return port


def _check_host(value: Any) -> str:
    host = str(value).strip().lower()
    if not _HOST_PORT_RE.match(host):
        raise ValueError(f"allowed_hosts entries must be host:port, got {value!r}")
    return host


def _modality(name: Any, value: Any) -> dict[str, Any]:
    value = plain(value)
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise ValueError(f"modality {name!r}: expected [aet, host, port], got {value!r}")
        value = {"aet": value[0], "host": value[1], "port": value[2]}
    if not isinstance(value, Mapping):
        raise ValueError(f"modality {name!r}: expected a mapping with aet/host/port, got {value!r}")
    out = {str(k).lower(): v for k, v in value.items()}
    missing = {"aet", "host", "port"} - set(out)
    if missing:
        raise ValueError(f"modality {name!r}: missing {', '.join(sorted(missing))}")
    return {"aet": _check_ae(out["aet"], f"modality {name!r} aet"), "host": str(out["host"]),
            "port": _check_port(out["port"], f"modality {name!r} port"),
            "allow_move": bool(out.get("allow_move", False))}


# ----------------------------------------------------------------------------------------------
# Finding the installation


def find_orthanc(binary: str | None = None) -> str | None:
    """Path of the Orthanc executable (``binary``, else ``Orthanc`` on PATH, else ``/usr/sbin``)."""
    for candidate in ([binary] if binary else []) + ["Orthanc", "/usr/sbin/Orthanc", "/usr/bin/Orthanc",
                                                      "/usr/local/bin/Orthanc"]:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def find_dicomweb_plugin(plugins_dir: str | os.PathLike | None = None) -> Path | None:
    """``libOrthancDicomWeb.so`` in ``plugins_dir`` or the usual Debian/Ubuntu places (first match,
    versioned names such as ``libOrthancDicomWeb.so.1.7`` included), else ``None``."""
    dirs = [str(plugins_dir)] if plugins_dir else list(PLUGIN_DIRS)
    for d in dirs:
        for pattern in (DICOMWEB_PLUGIN, DICOMWEB_PLUGIN + ".*"):
            hits = sorted(glob.glob(os.path.join(d, pattern)))
            if hits:
                return Path(hits[0])
    if plugins_dir is None:
        for root in ("/usr/lib", "/usr/local/lib", "/usr/local/share"):
            hits = sorted(glob.glob(f"{root}/**/{DICOMWEB_PLUGIN}*", recursive=True))
            if hits:
                return Path(hits[0])
    return None


def routing_script() -> str:
    """The text of the packaged ``routing.lua``."""
    return (Path(__file__).parent / LUA_NAME).read_text(encoding="utf-8")


def access_script() -> str:
    """The text of the packaged ``access.lua`` (the HTTP access filter)."""
    return (Path(__file__).parent / ACCESS_LUA_NAME).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Credentials


def new_credentials(username: str = SERVICE_USER) -> tuple[str, str]:
    """``(username, password)`` with a fresh random password (``secrets.token_urlsafe(32)``)."""
    return str(username), secrets.token_urlsafe(32)


def read_credentials(path: str | os.PathLike) -> tuple[str, str]:
    """``(username, password)`` from a credentials file (:func:`hippo.credentials.read_credentials`).

    Raises:
        OrthancError: the file is missing or malformed.
    """
    try:
        return credentials.read_credentials(path)
    except credentials.CredentialsError as exc:
        raise OrthancError(str(exc)) from exc


def ensure_credentials(path: str | os.PathLike, username: str = SERVICE_USER,
                       candidate: tuple[str, str] | None = None) -> tuple[str, str]:
    """The credentials stored in ``path``, created first when absent.

    Creation is atomic and never overwrites: a temporary 0600 file is hard-linked to ``path``
    (fails when another process created it meanwhile: then that one's content is used).

    Args:
        path: e.g. ``<root>/orthanc/credentials.json``.
        username: the user name for new credentials.
        candidate: the credentials to store when the file is absent (default: :func:`new_credentials`).

    Returns:
        ``(username, password)``.
    """
    path = Path(path)
    if path.exists():
        return read_credentials(path)
    user, password = candidate or new_credentials(username)
    body = json.dumps({"username": user, "password": password,
                       "note": "HTTP Basic credentials of hippo.network's service account for Orthanc's "
                               "REST API; generated, keep private (mode 0600)"}, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return read_credentials(path)
        log.info("generated Orthanc credentials for user %r in %s (mode 0600)", user, path)
        return user, password
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------
# Configuration


def _lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'


def _lua_set(values: list[str]) -> str:
    return "{ " + ", ".join(f"[{_lua_string(v)}] = true" for v in values) + " }"


def access_header(settings: OrthancSettings) -> str:
    """The generated lines put above ``access.lua`` (the accepted hosts and Orthanc's own origins)."""
    return ("-- generated by hippo.network.orthanc.write_config: who may reach this Orthanc over HTTP\n"
            f"HIPPO_ALLOWED_HOSTS = {_lua_set(settings.accepted_hosts)}\n"
            f"HIPPO_OWN_ORIGINS = {_lua_set(settings.own_origins)}\n\n")


def build_config(settings: OrthancSettings, dir: str | os.PathLike) -> dict[str, Any]:
    """The configuration dictionary :func:`write_config` writes (paths absolute)."""
    dir = Path(dir).resolve()
    storage = Path(settings.storage_dir).resolve() if settings.storage_dir else dir / "storage"
    closed = not settings.allow_unknown_aets
    modalities = {
        name: {"AET": m["aet"], "Host": m["host"], "Port": m["port"], "AllowEcho": True, "AllowStore": True,
               "AllowFind": False, "AllowFindWorklist": False, "AllowGet": False,
               # only the AI listener may ask for a series again (C-MOVE to itself) after a crash
               "AllowMove": name == settings.route_to or bool(m.get("allow_move", False)),
               "AllowStorageCommitment": False}
        for name, m in settings.modalities.items()
    }
    cfg: dict[str, Any] = {
        "Name": settings.name,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpServerEnabled": True,
        "HttpPort": settings.http_port,
        "RemoteAccessAllowed": bool(settings.remote_access),
        # HTTP Basic, on iff users (the network always adds its service account; module docstring)
        "AuthenticationEnabled": settings.authentication,
        "RegisteredUsers": dict(settings.users),
        "WebDavEnabled": False,
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": settings.aet,
        "DicomPort": settings.dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": not closed,
        "DicomAlwaysAllowStore": not closed,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowFindWorklist": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": closed,
        "DicomModalities": modalities,
        "DicomModalitiesInDatabase": False,
        "StableAge": settings.stable_age,
        "DeidentifyLogs": True,
        "OverwriteInstances": False,
        # the routing script stores, per input series, the fingerprint of what it last sent (routing.lua)
        "UserMetadata": {ROUTED_METADATA: ROUTED_METADATA_INDEX},
        "LuaScripts": [],
        "Plugins": [],
    }
    if settings.http_filter:
        cfg["LuaScripts"].append(str(dir / ACCESS_LUA_NAME))
    if settings.route_to is not None:
        cfg["LuaScripts"].append(str(dir / LUA_NAME))
    if settings.dicomweb:
        plugin = find_dicomweb_plugin(settings.plugins_dir)
        if plugin is None:
            where = settings.plugins_dir or ", ".join(PLUGIN_DIRS)
            raise OrthancError(f"the Orthanc DICOMweb plugin ({DICOMWEB_PLUGIN}) was not found in {where}: "
                               f"install it (Debian: apt-get install orthanc-dicomweb) or set dicomweb=false")
        cfg["Plugins"] = [str(plugin)]
        cfg["DicomWeb"] = {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Host": settings.dicomweb_host or f"127.0.0.1:{settings.http_port}",
            "Ssl": False,
        }
    user_metadata = {**cfg["UserMetadata"], **dict(settings.extra.get("UserMetadata") or {})}
    cfg.update(settings.extra)
    cfg["UserMetadata"] = user_metadata  # extra may add names, never drop the routing's
    return cfg


def write_config(settings: OrthancSettings, dir: str | os.PathLike) -> Path:
    """Write ``<dir>/orthanc.json`` (mode 0600 from the start: it may hold passwords),
    ``<dir>/access.lua`` and ``<dir>/routing.lua``.

    ``access.lua`` is the packaged access filter preceded by :func:`access_header` (accepted Host
    values, Orthanc's own origins); ``routing.lua`` is the packaged routing script preceded by a
    generated header that sets ``HIPPO_ROUTE_TO`` (the modality name) and ``HIPPO_ROUTE_SCOPE``
    (``"series"``/``"study"``). Creates ``dir``, ``<dir>/logs`` and the storage directory.

    Returns:
        The path of ``orthanc.json`` (pass it to ``Orthanc``; passing the directory would make
        Orthanc merge *every* ``*.json`` there).

    Raises:
        OrthancError: the DICOMweb plugin is wanted but not found.
    """
    dir = Path(dir).resolve()
    cfg = build_config(settings, dir)
    (dir / "logs").mkdir(parents=True, exist_ok=True)
    Path(cfg["StorageDirectory"]).mkdir(parents=True, exist_ok=True)
    if settings.route_to is not None:
        header = ("-- generated by hippo.network.orthanc.write_config: the routing target\n"
                  f"HIPPO_ROUTE_TO = {_lua_string(settings.route_to)}\n"
                  f"HIPPO_ROUTE_SCOPE = {_lua_string(settings.route_scope)}\n"
                  f"HIPPO_ROUTED_METADATA = {_lua_string(ROUTED_METADATA)}\n\n")
        write_bytes_atomic(dir / LUA_NAME, (header + routing_script()).encode("utf-8"))
    if settings.http_filter:
        write_bytes_atomic(dir / ACCESS_LUA_NAME, (access_header(settings) + access_script()).encode("utf-8"))
    path = dir / CONFIG_NAME
    write_bytes_atomic(path, (json.dumps(cfg, indent=2) + "\n").encode("utf-8"), mode=0o600)
    return path


# ----------------------------------------------------------------------------------------------
# Ports


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port`` or the port cannot be bound on
    all interfaces (Orthanc binds ``0.0.0.0``)."""
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", int(port)))
        except OSError:
            return True
    return False


def free_port() -> int:
    """A TCP port free right now on all interfaces (for tests; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------
# Process


def tail(path: str | os.PathLike, n: int = 20) -> str:
    """The last ``n`` lines of a text file ('' when absent)."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def start_orthanc(settings: OrthancSettings, dir: str | os.PathLike, *, check_ports: bool = True,
                  verbose: bool = False) -> subprocess.Popen:
    """Write the configuration (:func:`write_config`) and start ``Orthanc <dir>/orthanc.json``.

    A plain child process in its own session (``start_new_session=True``: its pid is its process
    group id, so :func:`stop` can end the whole group). Orthanc's log goes to ``<dir>/logs/orthanc.log``
    (``--logfile``), anything printed before logging starts to ``<dir>/logs/orthanc.console.log``.
    Returns at once: call :func:`wait_ready`.

    Raises:
        OrthancError: Orthanc is not installed, a port is taken (another Orthanc, e.g. Debian's
            system service on 4242/8042? -- choose other ports; it is never stopped from here), or
            the configuration cannot be written.
    """
    binary = find_orthanc(settings.binary)
    if binary is None:
        raise OrthancError("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    if check_ports:
        taken = [f"{what} {p}" for what, p in (("DICOM port", settings.dicom_port), ("HTTP port", settings.http_port))
                 if port_in_use(p)]
        if taken:
            raise OrthancError(f"cannot start Orthanc: {' and '.join(taken)} already in use (another Orthanc, "
                               f"e.g. the system service? see `ss -ltnp`); configure other ports")
    dir = Path(dir).resolve()
    config = write_config(settings, dir)
    cmd = [binary, f"--logfile={dir / LOG_NAME}"] + (["--verbose"] if verbose else []) + [str(config)]
    console = open(dir / CONSOLE_LOG_NAME, "ab")
    try:
        proc = subprocess.Popen(cmd, cwd=str(dir), stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        console.close()
    log.info("started Orthanc pid %d (DICOM %s:%d, HTTP %s), config %s", proc.pid, settings.aet,
             settings.dicom_port, settings.http_url, config)
    return proc


def wait_ready(http_url: str, timeout: float = 30.0, *, proc: subprocess.Popen | None = None,
               name: str | None = None, auth: tuple[str, str] | None = None,
               log_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Poll ``GET <http_url>/system`` until Orthanc answers; return that JSON.

    Args:
        http_url: e.g. ``http://127.0.0.1:8042``.
        timeout: seconds.
        proc: when given, fail at once if that process exits (with the log's last lines).
        name: when given, ``/system``'s ``Name`` must equal it (guards against another Orthanc
            answering on the same port).
        auth: ``(user, password)`` when authentication is on.
        log_file: included in error messages (its tail).

    Raises:
        OrthancError: timeout, the process died, another instance answered, or Orthanc refused
            the credentials (401) or the request (403: the access filter) -- raised at once.
    """
    client = OrthancClient(http_url, timeout=2.0, auth=auth)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if proc is not None and proc.poll() is not None:
            raise OrthancError(f"Orthanc exited with code {proc.returncode} while starting"
                               + (f"; last log lines:\n{tail(log_file)}" if log_file else ""))
        try:
            info = client.get_json("/system")
        except OrthancError as exc:
            if exc.status in (401, 403):
                what = "the credentials" if exc.status == 401 else "the request (access filter)"
                raise OrthancError(f"Orthanc at {http_url} refused {what}: HTTP {exc.status}"
                                   + ("" if auth or exc.status != 401 else " (no credentials given)"),
                                   exc.status) from exc
            last = str(exc)
        except OSError as exc:
            last = str(exc)
        else:
            if name is not None and info.get("Name") != name:
                raise OrthancError(f"another Orthanc answers at {http_url} (Name {info.get('Name')!r}, "
                                   f"expected {name!r})")
            return info
        if time.monotonic() > deadline:
            raise OrthancError(f"Orthanc at {http_url} not ready after {timeout:.0f} s ({last})"
                               + (f"; last log lines:\n{tail(log_file)}" if log_file else ""))
        time.sleep(0.2)


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def group_alive(pgid: int) -> bool:
    """True when a (non-zombie) process of process group ``pgid`` is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def stop(proc: subprocess.Popen | int, timeout: float = 15.0, *, group: bool = True) -> int | None:
    """Stop a process started here: SIGTERM (to its process group when it leads one), wait up to
    ``timeout`` s, then SIGKILL. Idempotent.

    Args:
        proc: a :class:`subprocess.Popen`, or a pid (a process that is not our child: polled).
        group: also signal the process group (``start_new_session=True`` made pid == pgid).

    Returns:
        The exit code when known (a ``Popen``), else ``None``.
    """
    pid = proc.pid if isinstance(proc, subprocess.Popen) else int(proc)
    pgid = pid if group and _leads_group(pid) else None

    def alive() -> bool:
        if isinstance(proc, subprocess.Popen) and proc.poll() is None:
            return True
        return (pgid is not None and group_alive(pgid)) or (not isinstance(proc, subprocess.Popen) and pid_alive(pid))

    def signal_all(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pgid is not None:
                os.killpg(pgid, sig)
            else:
                os.kill(pid, sig)

    if alive():
        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive():
            log.warning("pid %d did not stop within %.0f s: SIGKILL", pid, timeout)
            signal_all(signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while alive() and time.monotonic() < deadline:
                time.sleep(0.1)
    if isinstance(proc, subprocess.Popen):
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=5.0)
    return None


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except (ProcessLookupError, PermissionError):
        # already gone: its group may still hold children
        return True


# ----------------------------------------------------------------------------------------------
# REST


class OrthancClient:
    """A tiny client for Orthanc's REST API (urllib only).

    Args:
        url: e.g. ``http://127.0.0.1:8042``.
        timeout: seconds per request.
        auth: ``(user, password)`` for HTTP Basic when authentication is on.

    Every method raises :class:`OrthancError` for HTTP errors (with the status and Orthanc's
    message) and for connection failures.
    """

    def __init__(self, url: str, timeout: float = 10.0, auth: tuple[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self._headers: dict[str, str] = {}
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"

    def request(self, method: str, path: str, body: bytes | str | None = None,
                content_type: str = "application/json") -> bytes:
        """One request; returns the body bytes."""
        data = body.encode() if isinstance(body, str) else body
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {detail}".strip(), exc.code) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise OrthancError(f"{method} {self.url}{path}: {reason}") from exc

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path) or b"null")

    def post_json(self, path: str, payload: Any) -> Any:
        body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        out = self.request("POST", path, body)
        return json.loads(out) if out.strip() else None

    def delete(self, path: str) -> None:
        """``DELETE path`` (e.g. ``/studies/<id>``)."""
        self.request("DELETE", path)

    # -- resources
    def system(self) -> dict[str, Any]:
        return self.get_json("/system")

    def studies(self) -> list[str]:
        """Orthanc ids of every study."""
        return list(self.get_json("/studies"))

    def study(self, study_id: str) -> dict[str, Any]:
        """``/studies/<id>``: MainDicomTags, PatientMainDicomTags, Series (ids), IsStable, ..."""
        return self.get_json(f"/studies/{_quote(study_id)}")

    def series(self, study_id: str) -> list[dict[str, Any]]:
        """The series of a study, expanded (``ID``, ``MainDicomTags`` with SeriesDescription,
        SeriesNumber, Modality, ..., ``Instances``)."""
        return list(self.get_json(f"/studies/{_quote(study_id)}/series"))

    def instances(self, series_id: str) -> list[dict[str, Any]]:
        """The instances of a series, expanded (``ID``, ``MainDicomTags`` with SOPInstanceUID...)."""
        return list(self.get_json(f"/series/{_quote(series_id)}/instances"))

    def find_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc id of the study with this StudyInstanceUID (``/tools/lookup``), or ``None``."""
        for hit in self.post_json("/tools/lookup", str(study_instance_uid)) or []:
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def delete_study(self, study_id: str) -> None:
        self.delete(f"/studies/{_quote(study_id)}")

    def echo_modality(self, name: str) -> bool:
        """Ask Orthanc to C-ECHO a configured modality (``POST /modalities/<name>/echo``)."""
        try:
            self.post_json(f"/modalities/{_quote(name)}/echo", {})
            return True
        except OrthancError:
            return False

    def jobs(self, expand: bool = True) -> list[Any]:
        return list(self.get_json("/jobs?expand" if expand else "/jobs"))


def _quote(s: str) -> str:
    return urllib.parse.quote(str(s), safe="")
