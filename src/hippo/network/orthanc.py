"""Orthanc, the local PACS: configuration, a plain background process, and a tiny REST client.

* :class:`OrthancSettings` -- AE title, ports, storage, StableAge, known modalities, plugins.
* :func:`write_config` -- ``<dir>/orthanc.json`` plus ``<dir>/routing.lua`` (the auto-routing script,
  :mod:`hippo.network`'s ``routing.lua`` with a generated header naming the target modality).
* :func:`start_orthanc` / :func:`wait_ready` / :func:`stop` -- ``Orthanc <dir>/orthanc.json`` as an
  ordinary child process in its own session (never the Debian system service: no systemctl).
* :class:`OrthancClient` -- urllib-only helper for the REST API (studies, series, instances,
  lookup by StudyInstanceUID, delete).

What binds where (Orthanc 1.10.1, Debian bookworm)
--------------------------------------------------
Orthanc 1.10.1 has **no option to choose the listening address**: ``Orthanc --help`` and the full
sample configuration (``Orthanc --config=-``) offer none (no ``HttpBindAddress``/``DicomBindAddress``),
so both servers listen on **all interfaces** (``0.0.0.0:<HttpPort>`` and ``0.0.0.0:<DicomPort>``;
check with ``ss -ltnp``). The strongest restrictions that version offers are therefore used:

* HTTP (REST, DICOMweb at ``/dicom-web/``, Orthanc Explorer): ``RemoteAccessAllowed: false`` --
  Orthanc serves only clients connecting from the loopback address; anyone else gets HTTP 401
  (checked in tests/test_orthanc.py from this machine's non-loopback address).
  ``AuthenticationEnabled: false`` with no ``RegisteredUsers`` (safe only because of the line
  above). WebDAV, ``/tools/execute-script`` and REST writes to the file system are off.
* DICOM: ``DicomAlwaysAllowEcho``/``DicomAlwaysAllowStore``: ``false``, ``DicomCheckModalityHost``:
  ``true``, ``DicomCheckCalledAet``: ``true`` -- only the modalities listed in ``DicomModalities``
  (by default ``HIPPOAI`` and ``HIPPOSCANNER``, both at ``127.0.0.1``) may associate, only from their
  listed host, and only when they call Orthanc by its AE title. C-FIND/GET/MOVE from unknown AEs
  stay off (Orthanc's defaults). Set ``allow_unknown_aets=True`` to accept any calling AE (a lab
  with many scanners) -- then any host that reaches the port can store.
* For stronger isolation, firewall the two ports (``nft``/``iptables``) or run Orthanc in a network
  namespace/container publishing only ``127.0.0.1:<port>``.

Switching authentication on (e.g. before allowing remote access)::

    OrthancSettings(remote_access=True, users={"alice": "a-long-password"})

writes ``"RemoteAccessAllowed": true, "AuthenticationEnabled": true, "RegisteredUsers":
{"alice": ...}`` (HTTP Basic; passwords in clear in ``orthanc.json``, which is written with mode
0600 -- put TLS in front, ``SslEnabled``/``SslCertificate``). Clients then pass ``auth=("alice",
...)`` to :class:`OrthancClient`; the viewer's proxy needs the same credentials.

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
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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
    "port_in_use",
    "pid_alive",
    "group_alive",
    "free_port",
    "tail",
    "CONFIG_NAME",
    "LOG_NAME",
]

#: Names inside the Orthanc directory given to :func:`write_config` / :func:`start_orthanc`.
CONFIG_NAME = "orthanc.json"
LUA_NAME = "routing.lua"
LOG_NAME = "logs/orthanc.log"           # Orthanc's own log (--logfile)
CONSOLE_LOG_NAME = "logs/orthanc.console.log"  # stdout/stderr (messages before logging starts)
#: Where Debian's orthanc-dicomweb puts the plugin (searched first), then other usual places.
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins",
               "/usr/lib/x86_64-linux-gnu/orthanc/plugins", "/usr/lib/aarch64-linux-gnu/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
_AE_MAX = 16


class OrthancError(RuntimeError):
    """Orthanc could not be configured, started, reached, or answered with an error."""


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
            ``None`` writes no Lua script (no auto-routing).
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
        remote_access, users: see the module docstring (authentication is on iff ``users``).
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
        self.extra = dict(self.extra or {})

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "OrthancSettings":
        """From a (possibly OmegaConf) mapping; unknown keys raise ``TypeError``."""
        cfg = {k: _plain(v) for k, v in dict(cfg or {}).items()}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(k for k in cfg if k not in known and not str(k).startswith("_"))
        if unknown:
            raise TypeError(f"unknown Orthanc setting(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in cfg.items() if k in known})

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:<http_port>`` (the REST root; DICOMweb under ``/dicom-web/``)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def authentication(self) -> bool:
        return bool(self.users)


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (without importing omegaconf)."""
    if hasattr(value, "_metadata") and hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "_metadata") and hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return value


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


def _modality(name: Any, value: Any) -> dict[str, Any]:
    value = _plain(value)
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
            "port": _check_port(out["port"], f"modality {name!r} port")}


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


# ----------------------------------------------------------------------------------------------
# Configuration


def _lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_config(settings: OrthancSettings, dir: str | os.PathLike) -> dict[str, Any]:
    """The configuration dictionary :func:`write_config` writes (paths absolute)."""
    dir = Path(dir).resolve()
    storage = Path(settings.storage_dir).resolve() if settings.storage_dir else dir / "storage"
    closed = not settings.allow_unknown_aets
    modalities = {
        name: {"AET": m["aet"], "Host": m["host"], "Port": m["port"], "AllowEcho": True, "AllowStore": True,
               "AllowFind": False, "AllowFindWorklist": False, "AllowGet": False, "AllowMove": False,
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
        # Off on loopback; switched on by giving users (see the module docstring).
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
        "LuaScripts": [],
        "Plugins": [],
    }
    if settings.route_to is not None:
        cfg["LuaScripts"] = [str(dir / LUA_NAME)]
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
    cfg.update(settings.extra)
    return cfg


def write_config(settings: OrthancSettings, dir: str | os.PathLike) -> Path:
    """Write ``<dir>/orthanc.json`` (mode 0600: it may hold passwords) and ``<dir>/routing.lua``.

    The Lua file is the packaged ``routing.lua`` preceded by a generated header that sets
    ``HIPPO_ROUTE_TO`` (the modality name) and ``HIPPO_ROUTE_SCOPE`` (``"series"``/``"study"``).
    Creates ``dir``, ``<dir>/logs`` and the storage directory.

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
                  f"HIPPO_ROUTE_SCOPE = {_lua_string(settings.route_scope)}\n\n")
        write_bytes_atomic(dir / LUA_NAME, (header + routing_script()).encode("utf-8"))
    path = dir / CONFIG_NAME
    write_bytes_atomic(path, (json.dumps(cfg, indent=2) + "\n").encode("utf-8"))
    os.chmod(path, 0o600)
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
        log_file: included in error messages (its tail).

    Raises:
        OrthancError: timeout, the process died, or another instance answered.
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
        except (OrthancError, OSError) as exc:
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
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {detail}".strip()) from exc
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
