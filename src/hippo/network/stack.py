"""The whole clinical network as plain background processes: ``up``, ``down``, ``status``.

:class:`Network` starts, in this order,

1. **Orthanc** (:mod:`hippo.network.orthanc`): ``Orthanc <root>/orthanc/orthanc.json`` -- waits
   for ``GET /system`` with the service account's credentials (and that it is *this* instance: its
   ``Name``);
2. **the AI listener**: ``python -m hippo.listen listener.port=.. listener.ae_title=..
   pacs.host=127.0.0.1 pacs.port=<Orthanc DICOM port> pacs.called_ae=<Orthanc AET> paths.log_dir=..
   [model_path=..] listener.quiet_seconds=..`` (``conf/listen.yaml``: results go to ``pacs``) -- waits until
   its port accepts connections, it answers a C-ECHO (called as ``listener.ae_title`` by Orthanc's
   AE title) and Orthanc's own ``POST /modalities/<route_to>/echo`` succeeds (the path routing uses);
3. **the viewer**: ``python -m hippo.network.viewer --host 127.0.0.1 --port .. --dist <ohif dist>
   --orthanc http://127.0.0.1:<http_port> --orthanc-credentials <root>/orthanc/credentials.json``
   -- waits for ``GET /`` to answer 200.

Access to Orthanc's REST API (see :mod:`hippo.network.orthanc`): unless ``orthanc.authentication``
is false, HTTP Basic authentication is on with a generated service account (user ``hippo``, a
random password) kept in ``<root>/orthanc/credentials.json`` (mode 0600), created by the first
``up`` and reused by every later one; ``orthanc.users`` adds more users. Everything here that calls
the REST API (readiness checks, ``status``, the viewer's proxy) uses that account; the viewer
reads the file at start (the password is never on a command line). Orthanc's Lua access filter
accepts the ``Host`` values ``127.0.0.1``/``localhost`` with Orthanc's port *and* with the viewer's
port (the proxy forwards the browser's Host), plus ``orthanc.allowed_hosts``.

Each process starts with ``start_new_session=True`` (its pid is its process group id), so ``down``
ends the process and anything it started. Pids, process start times, commands, ports, URLs and
log files are recorded in ``<root>/state.json`` (written atomically after each start, so a
failure half-way can still be cleaned up by ``down``); ``up`` stops what it started when a later
step fails. ``down`` is idempotent and checks that no process of the recorded groups is left.

Logs: ``<root>/logs/listener.log``, ``<root>/logs/viewer.log``; Orthanc's own log
``<root>/orthanc/logs/orthanc.log`` (its data and log live together under ``<root>/orthanc/``).

The OHIF viewer is ``@ohif/app``'s prebuilt ``dist/``: when ``ohif.dist`` has no ``index.html``,
``up`` extracts it from ``ohif.tarball`` or from ``npm pack @ohif/app@<ohif.version>`` (a plain
``npm install`` of that package fails on a missing dependency version; the packed tarball holds
the built viewer).

Only the standard library, pynetdicom and OmegaConf; never imports torch, Lightning or Hydra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from hippo.fileio import replace_dir, write_json_atomic
from hippo.network import orthanc as orth

log = logging.getLogger(__name__)

__all__ = ["Network", "NetworkError", "load_config", "default_config_path", "ensure_ohif_dist", "SERVICES"]

#: The services in start order (``down`` stops them in reverse).
SERVICES = ("orthanc", "listener", "viewer")
STATE_NAME = "state.json"
HOST = "127.0.0.1"


class NetworkError(RuntimeError):
    """A service could not be prepared, started or stopped (the message says which and why)."""


def default_config_path() -> Path:
    """``conf/network.yaml`` of the checkout (or of the installed ``hippo._conf``)."""
    from hippo.config import config_dir

    return Path(config_dir()) / "network.yaml"


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Any:
    """The network configuration (an OmegaConf ``DictConfig``) from ``path`` (default
    :func:`default_config_path`) with dotlist ``overrides`` such as ``"viewer.port=3001"``."""
    from omegaconf import OmegaConf

    path = Path(path) if path else default_config_path()
    if not path.is_file():
        raise FileNotFoundError(f"network configuration not found: {path}")
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def _plain(cfg: Any) -> dict[str, Any]:
    """A resolved plain ``dict`` from a ``DictConfig`` or a mapping (interpolations resolved)."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(dict(cfg))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# OHIF


def ensure_ohif_dist(dist: str | os.PathLike, version: str, *, tarball: str | os.PathLike | None = None,
                     log_file: str | os.PathLike | None = None, timeout: float = 900.0) -> Path:
    """Make sure ``dist`` holds OHIF's built viewer (``index.html`` and assets); return ``dist``.

    When absent, ``package/dist/`` is extracted (safely: regular files and directories only, no
    paths outside) from ``tarball`` or, without one, from ``npm pack @ohif/app@<version>`` run in
    ``dist``'s parent directory. The extraction goes to a temporary directory renamed into place.

    Raises:
        NetworkError: npm missing or failing (with the log file), a tarball without
            ``package/dist/index.html``.
    """
    dist = Path(dist).resolve()
    if (dist / "index.html").is_file():
        return dist
    parent = dist.parent
    parent.mkdir(parents=True, exist_ok=True)
    if tarball is None:
        tarball = _npm_pack(version, parent, log_file, timeout)
    tarball = Path(tarball)
    if not tarball.is_file():
        raise NetworkError(f"OHIF tarball not found: {tarball}")
    tmp = Path(tempfile.mkdtemp(prefix=".dist.", dir=parent))
    try:
        with tarfile.open(tarball, "r:*") as tar:
            members = []
            for m in tar.getmembers():
                name = m.name.lstrip("./")
                if not name.startswith("package/dist/") or not (m.isfile() or m.isdir()):
                    continue
                rel = name[len("package/dist/"):]
                if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                    continue
                m.name = rel
                members.append(m)
            if not any(m.name == "index.html" for m in members):
                raise NetworkError(f"{tarball} holds no package/dist/index.html (not an @ohif/app package?)")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
        replace_dir(tmp, dist, trash_prefix=".old-")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("OHIF %s extracted to %s", version, dist)
    return dist


def _npm_pack(version: str, dest: Path, log_file: str | os.PathLike | None, timeout: float) -> Path:
    npm = shutil.which("npm")
    spec = f"@ohif/app@{version}"
    if npm is None:
        raise NetworkError(f"the OHIF viewer is not there and npm is not installed to fetch it: install npm "
                           f"(Debian: apt-get install npm) or run `npm pack {spec}` elsewhere and set "
                           f"ohif.tarball to the .tgz")
    expected = dest / f"ohif-app-{version}.tgz"
    if expected.is_file():
        return expected
    log_path = Path(log_file) if log_file else dest / "npm-pack.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s with npm pack (tens of MB) ...", spec)
    with open(log_path, "ab") as out:
        try:
            proc = subprocess.run([npm, "pack", spec], cwd=dest, stdout=subprocess.PIPE, stderr=out,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise NetworkError(f"`npm pack {spec}` took longer than {timeout:.0f} s (log: {log_path})") from exc
        out.write(proc.stdout)
    names = [line.strip() for line in proc.stdout.decode("utf-8", "replace").splitlines() if line.strip()]
    if proc.returncode != 0 or not names or not (dest / names[-1]).is_file():
        raise NetworkError(f"`npm pack {spec}` failed (exit {proc.returncode}); see {log_path}:\n"
                           f"{orth.tail(log_path, 8)}")
    return dest / names[-1]


# ----------------------------------------------------------------------------------------------
# Processes


def _start_ticks(pid: int) -> int | None:
    """The process' start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), to tell a
    recorded process from a later one that reuses its pid; ``None`` when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _same_process(entry: Mapping[str, Any]) -> bool:
    """True when the recorded process is still running (same pid *and* start time)."""
    pid = int(entry["pid"])
    if not orth.pid_alive(pid):
        return False
    recorded, now = entry.get("start_ticks"), _start_ticks(pid)
    return recorded is None or now is None or int(recorded) == now


def _listening(port: int, host: str = HOST) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
        return True
    return False


_SAFE_OVERRIDE = re.compile(r"^[A-Za-z0-9_./:+-]*$")


def _hydra_value(value: Any) -> str:
    """A value for a Hydra command-line override, quoted when it holds special characters."""
    if value is None:
        return "null"
    text = str(value)
    if _SAFE_OVERRIDE.fullmatch(text) and text:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _c_echo(port: int, called_ae: str, calling_ae: str, timeout: float = 5.0) -> bool:
    """One C-ECHO (pynetdicom), quiet: association failures are expected while a service starts."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    pn_log = logging.getLogger("pynetdicom")
    level = pn_log.level
    pn_log.setLevel(logging.CRITICAL)
    try:
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        ae.add_requested_context(Verification)
        assoc = ae.associate(HOST, int(port), ae_title=called_ae)
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and int(status.get("Status", -1)) == 0x0000
        finally:
            if assoc.is_established:
                assoc.release()
    except Exception:  # noqa: BLE001 - any failure means "not (yet) answering"
        return False
    finally:
        pn_log.setLevel(level)


class Network:
    """The local clinical network described by a configuration (``conf/network.yaml``).

    Args:
        cfg: the configuration (OmegaConf ``DictConfig`` or a mapping of the same shape; see
            ``conf/network.yaml``), e.g. from :func:`load_config`.
        model_path: overrides ``cfg.model_path`` (the listener's model file).

    Relative paths resolve against the current directory at construction.
    """

    def __init__(self, cfg: Any, *, model_path: str | os.PathLike | None = None) -> None:
        self.cfg = _plain(cfg)
        c = self.cfg
        self.log_dir = Path(c.get("paths", {}).get("log_dir", "outputs")).resolve()
        self.root = Path(c.get("root") or self.log_dir / "network").resolve()
        self.state_path = self.root / STATE_NAME
        self.logs = self.root / "logs"
        self.orthanc_dir = self.root / "orthanc"
        model = model_path if model_path is not None else c.get("model_path")
        self.model_path = Path(model).resolve() if model else None
        self.listener = dict(c.get("listener", {}))
        self.viewer = dict(c.get("viewer", {}))
        self.ohif = dict(c.get("ohif", {}))
        self.timeouts = {"orthanc": 30.0, "listener": 120.0, "viewer": 30.0, "stop": 15.0, "npm": 900.0}
        self.timeouts.update({k: float(v) for k, v in dict(c.get("timeouts") or {}).items()})
        ocfg = dict(c.get("orthanc", {}))
        vport = int(self.viewer.get("port", 3000))
        ocfg.setdefault("dicomweb_host", f"{HOST}:{vport}")
        # the viewer's proxy forwards the browser's Host (its own origin): Orthanc must accept it
        ocfg["allowed_hosts"] = [*(ocfg.get("allowed_hosts") or []), f"{HOST}:{vport}", f"localhost:{vport}",
                                 *(self.viewer.get("allowed_hosts") or [])]
        self.authentication = bool(ocfg.pop("authentication", True))
        self.credentials_path = self.orthanc_dir / orth.CREDENTIALS_NAME
        self._credentials: tuple[str, str] | None = None
        if self.authentication:
            # the stored service account, or (before the first `up` writes it) a fresh one
            try:
                self._credentials = (orth.read_credentials(self.credentials_path) if self.credentials_path.exists()
                                     else orth.new_credentials())
            except orth.OrthancError as exc:
                # `down` and `status` must still work; `up` reports the broken file (_save_credentials)
                log.warning("%s", exc)
                self._credentials = orth.new_credentials()
            users = dict(ocfg.get("users") or {})
            if self._credentials[0] in users:
                raise ValueError(f"orthanc.users must not define {self._credentials[0]!r}: that is the network's "
                                 f"generated service account ({self.credentials_path})")
            ocfg["users"] = {**users, self._credentials[0]: self._credentials[1]}
        elif ocfg.get("users"):
            raise ValueError("orthanc.users is set but orthanc.authentication is false: the network's own "
                             "services would have no credentials; remove one of the two")
        self.orthanc = orth.OrthancSettings.from_mapping(ocfg)
        self._procs: dict[str, subprocess.Popen] = {}
        self._log_offsets: dict[str, int] = {}

    # -- commands ---------------------------------------------------------------------------
    def listener_command(self) -> list[str]:
        """``python -m hippo.listen`` with the Hydra overrides for ports, AEs, paths and model (the
        listener sends its results to its ``pacs`` group: Orthanc's DICOM port and AE title)."""
        cmd = [sys.executable, "-m", "hippo.listen",
               f"listener.port={int(self.listener.get('port', 11112))}",
               f"listener.ae_title={_hydra_value(self.listener.get('ae_title', 'HIPPOAI'))}",
               f"pacs.host={HOST}", f"pacs.port={self.orthanc.dicom_port}",
               f"pacs.called_ae={_hydra_value(self.orthanc.aet)}",
               f"paths.log_dir={_hydra_value(self.log_dir)}"]
        if self.model_path is not None:
            cmd.append(f"model_path={_hydra_value(self.model_path)}")
        if self.listener.get("quiet_seconds") is not None:
            cmd.append(f"listener.quiet_seconds={_hydra_value(self.listener['quiet_seconds'])}")
        # the prior-study search reads this network's Orthanc over DICOMweb with the service account
        cmd.append(f"prior_lookup.url={_hydra_value(self.orthanc.http_url + '/dicom-web')}" if self.orthanc.dicomweb
                   else "prior_lookup.url=null")
        cmd.append(f"prior_lookup.credentials={_hydra_value(self.credentials_path)}" if self.authentication
                   else "prior_lookup.credentials=null")
        cmd.extend(str(o) for o in self.listener.get("overrides") or ())  # e.g. plausibility.* settings
        return cmd

    def viewer_command(self) -> list[str]:
        """``python -m hippo.network.viewer --host 127.0.0.1 --port P --dist DIR --orthanc URL
        [--orthanc-credentials FILE] [--allow-host HOST:PORT ...]`` (the file, not the password: a
        command line is visible to every user in ``ps``)."""
        cmd = [sys.executable, "-m", "hippo.network.viewer", "--host", HOST,
               "--port", str(int(self.viewer.get("port", 3000))), "--dist", str(self.ohif_dist),
               "--orthanc", self.orthanc.http_url]
        if self.authentication:
            cmd += ["--orthanc-credentials", str(self.credentials_path)]
        for host in self.viewer.get("allowed_hosts") or ():
            cmd += ["--allow-host", str(host)]
        return cmd

    @property
    def ohif_dist(self) -> Path:
        return Path(self.ohif.get("dist") or self.root / "ohif" / "dist").resolve()

    def urls(self) -> dict[str, str]:
        lport = int(self.listener.get("port", 11112))
        return {
            "orthanc": self.orthanc.http_url,
            "orthanc_dicom": f"{self.orthanc.aet}@{HOST}:{self.orthanc.dicom_port}",
            "dicomweb": f"{self.orthanc.http_url}/dicom-web/",
            "listener": f"{self.listener.get('ae_title', 'HIPPOAI')}@{HOST}:{lport}",
            "viewer": f"http://{HOST}:{int(self.viewer.get('port', 3000))}/",
        }

    def _ports(self) -> dict[str, list[int]]:
        return {"orthanc": [self.orthanc.dicom_port, self.orthanc.http_port],
                "listener": [int(self.listener.get("port", 11112))],
                "viewer": [int(self.viewer.get("port", 3000))]}

    # -- state --------------------------------------------------------------------------------
    def read_state(self) -> dict[str, Any]:
        """``state.json`` (``{"processes": {}}`` when absent or unreadable)."""
        import json

        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"processes": {}}
        state.setdefault("processes", {})
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        state["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json_atomic(self.state_path, state)

    def _record(self, state: dict[str, Any], name: str, proc: subprocess.Popen, cmd: Sequence[str],
                log_file: Path) -> None:
        self._procs[name] = proc
        state["processes"][name] = {
            "pid": proc.pid, "pgid": proc.pid, "start_ticks": _start_ticks(proc.pid), "cmd": list(cmd),
            "log": str(log_file), "ports": self._ports()[name], "url": self.urls()[name],
        }
        self._write_state(state)

    # -- up -----------------------------------------------------------------------------------
    def up(self, only: Sequence[str] | None = None) -> dict[str, Any]:
        """Start the services (all, or those named in ``only``, in start order) that are not running
        and wait until each answers; services an earlier ``up`` started and that still run are kept
        (so ``up`` brings back a listener that died while Orthanc and the viewer run). Returns
        :meth:`status`.

        Raises:
            NetworkError: a port is taken, the OHIF viewer cannot be fetched, or a service does not
                come up in time (what this call started is stopped again; the message holds the
                service's last log lines).
        """
        wanted = [s for s in SERVICES if only is None or s in only]
        unknown = sorted(set(only or ()) - set(SERVICES))
        if unknown:
            raise NetworkError(f"unknown service(s) {unknown}; choose from {list(SERVICES)}")
        running = {n: e for n, e in self.read_state()["processes"].items() if _same_process(e)}
        wanted = [s for s in wanted if s not in running]
        if not wanted:
            log.info("already up: %s", ", ".join(f"{n} (pid {e['pid']})" for n, e in running.items()))
            return self.status()
        if running:
            log.warning("restarting %s while %s keep(s) running", ", ".join(wanted), ", ".join(running))
        def taken_ports() -> list[str]:
            return [f"{name} port {p}" for name in wanted for p in self._ports()[name] if orth.port_in_use(p)]

        taken = taken_ports()
        deadline = time.monotonic() + (self.timeouts["stop"] if running else 0)
        while taken and time.monotonic() < deadline:  # a service that just died may still hold its port
            time.sleep(0.2)
            taken = taken_ports()
        if taken:
            raise NetworkError(f"port(s) already in use: {', '.join(taken)} (another instance? a system Orthanc "
                               f"on 4242/8042? see `ss -ltnp`); change them in conf/network.yaml")
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.authentication:
            self._save_credentials()
        if "viewer" in wanted:
            ensure_ohif_dist(self.ohif_dist, str(self.ohif.get("version", "3.13.2")), tarball=self.ohif.get("tarball"),
                             log_file=self.logs / "npm.log", timeout=self.timeouts["npm"])

        state: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "root": str(self.root), "urls": self.urls(), "processes": dict(running)}
        self._write_state(state)
        try:
            if "orthanc" in wanted:
                self._up_orthanc(state)
            if "listener" in wanted:
                self._up_listener(state)
            if "viewer" in wanted:
                self._up_viewer(state)
        except BaseException:
            with contextlib.suppress(Exception):
                if running:  # stop only what this call started; the others were fine before it
                    for name in [n for n in state["processes"] if n not in running]:
                        proc = self._procs.pop(name, None)
                        orth.stop(proc if proc is not None else int(state["processes"][name]["pid"]),
                                  timeout=self.timeouts["stop"])
                        del state["processes"][name]
                    self._write_state(state)
                else:
                    self.down()
            raise
        return self.status()

    def _up_orthanc(self, state: dict[str, Any]) -> None:
        try:
            proc = orth.start_orthanc(self.orthanc, self.orthanc_dir)
        except orth.OrthancError as exc:
            raise NetworkError(str(exc)) from exc
        log_file = self.orthanc_dir / orth.LOG_NAME
        self._record(state, "orthanc", proc, proc.args, log_file)
        try:
            orth.wait_ready(self.orthanc.http_url, self.timeouts["orthanc"], proc=proc, name=self.orthanc.name,
                            log_file=log_file, auth=self._orthanc_auth())
        except orth.OrthancError as exc:
            raise NetworkError(str(exc)) from exc
        log.info("Orthanc up: %s, DICOM %s", self.orthanc.http_url, self.urls()["orthanc_dicom"])

    def _orthanc_auth(self) -> tuple[str, str] | None:
        """The service account's ``(user, password)`` (``None`` when authentication is off)."""
        return self._credentials

    def _save_credentials(self) -> None:
        """Store the service account in ``credentials.json`` (0600) unless it is there already (then
        use the stored one: another ``up`` may have written it since this object was made)."""
        try:
            stored = orth.ensure_credentials(self.credentials_path, candidate=self._credentials)
        except orth.OrthancError as exc:
            raise NetworkError(f"{exc}; fix or delete it (a new password is then generated)") from exc
        if stored != self._credentials:
            assert self._credentials is not None
            self.orthanc.users.pop(self._credentials[0], None)
            if stored[0] in self.orthanc.users:
                raise NetworkError(f"orthanc.users must not define {stored[0]!r} (the service account in "
                                   f"{self.credentials_path})")
            self.orthanc.users[stored[0]] = stored[1]
            self._credentials = stored

    def orthanc_client(self, timeout: float = 10.0) -> orth.OrthancClient:
        """A REST client for this network's Orthanc, with the service account's credentials."""
        return orth.OrthancClient(self.orthanc.http_url, timeout=timeout, auth=self._orthanc_auth())

    def _spawn(self, state: dict[str, Any], name: str, cmd: list[str]) -> subprocess.Popen:
        log_file = self.logs / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_file, "ab") as out:
            self._log_offsets[name] = out.tell()
            out.write(f"\n---- {datetime.now(timezone.utc).isoformat(timespec='seconds')} "
                      f"{' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        self._record(state, name, proc, cmd, log_file)
        return proc

    def _log_tail(self, name: str, n: int = 20) -> str:
        """The last ``n`` lines that this start of ``name`` wrote to its log."""
        log_file = self.logs / f"{name}.log"
        try:
            with open(log_file, "rb") as f:
                f.seek(self._log_offsets.get(name, 0))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _wait(self, name: str, proc: subprocess.Popen, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        log_file = self.logs / f"{name}.log"
        while True:
            if proc.poll() is not None:
                raise NetworkError(f"{name} exited with code {proc.returncode} while starting; its log "
                                   f"{log_file} ends:\n{self._log_tail(name)}")
            if check():
                return
            if time.monotonic() > deadline:
                raise NetworkError(f"{name} did not {what} within {timeout:.0f} s; its log {log_file} ends:\n"
                                   f"{self._log_tail(name)}")
            time.sleep(0.3)

    def _up_listener(self, state: dict[str, Any]) -> None:
        port = int(self.listener.get("port", 11112))
        aet = str(self.listener.get("ae_title", "HIPPOAI"))
        proc = self._spawn(state, "listener", self.listener_command())
        self._wait("listener", proc, lambda: _listening(port), self.timeouts["listener"], f"listen on port {port}")
        self._wait("listener", proc, lambda: _c_echo(port, aet, self.orthanc.aet), 15.0,
                   f"answer a C-ECHO as {aet} from {self.orthanc.aet}")
        route_to = self.orthanc.route_to
        if route_to is not None and "orthanc" in state["processes"]:
            client = self.orthanc_client()
            self._wait("listener", proc, lambda: client.echo_modality(route_to), 15.0,
                       f"answer Orthanc's C-ECHO (POST /modalities/{route_to}/echo)")
        log.info("listener up: %s", self.urls()["listener"])

    def _up_viewer(self, state: dict[str, Any]) -> None:
        url = self.urls()["viewer"]
        proc = self._spawn(state, "viewer", self.viewer_command())

        def answers() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2.0) as resp:
                    return resp.status == 200
            except (urllib.error.URLError, OSError, ValueError):
                return False

        self._wait("viewer", proc, answers, self.timeouts["viewer"], f"answer GET {url}")
        log.info("viewer up: %s", url)

    # -- down ---------------------------------------------------------------------------------
    def down(self) -> dict[str, str]:
        """Stop every recorded process (viewer, listener, then Orthanc), their process groups too:
        SIGTERM, wait ``timeouts.stop`` s, SIGKILL. Idempotent.

        Returns:
            ``{service: "stopped" | "not running"}``.

        Raises:
            NetworkError: a process (group) survived SIGKILL; ``state.json`` is kept then.
        """
        state = self.read_state()
        result: dict[str, str] = {}
        left: list[str] = []
        order = [n for n in reversed(SERVICES) if n in state["processes"]]
        order += [n for n in state["processes"] if n not in order]
        for name in order:
            entry = state["processes"][name]
            pid, pgid = int(entry["pid"]), int(entry.get("pgid", entry["pid"]))
            proc = self._procs.pop(name, None)
            if proc is not None and proc.pid == pid:
                alive = proc.poll() is None or orth.group_alive(pgid)
                target: subprocess.Popen | int = proc
            else:
                same = _same_process(entry)
                # a reused pid means the old group is empty (Linux keeps a pgid's number in use)
                alive = same or (not orth.pid_alive(pid) and orth.group_alive(pgid))
                target = pid
            if alive:
                orth.stop(target, timeout=self.timeouts["stop"])
                result[name] = "stopped"
            else:
                if isinstance(target, subprocess.Popen):
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        target.wait(timeout=1.0)
                result[name] = "not running"
            if orth.group_alive(pgid) and (orth.pid_alive(pid) is False or _same_process(entry)):
                left.append(f"{name} (process group {pgid})")
        if left:
            raise NetworkError(f"still running after SIGKILL: {', '.join(left)}; state kept in {self.state_path}")
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        for name in SERVICES:
            result.setdefault(name, "not running")
        return result

    # -- status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``{"up": all recorded services alive, "state": path, "credentials": path or None,
        "services": {name: {"running", "pid", "ports", "listening", "url", "log"}}}`` (services never
        started: running False). A running Orthanc also gets ``"rest"``: ``"ok"`` when ``GET /system``
        answers with the service account's credentials, else the error (e.g. ``HTTP 401``)."""
        state = self.read_state()
        services: dict[str, Any] = {}
        for name in SERVICES:
            entry = state["processes"].get(name)
            ports = entry["ports"] if entry else self._ports()[name]
            services[name] = {
                "running": bool(entry) and _same_process(entry),
                "pid": entry["pid"] if entry else None,
                "ports": ports,
                "listening": {str(p): _listening(p) for p in ports},
                "url": entry["url"] if entry else self.urls()[name],
                "log": entry["log"] if entry else None,
            }
        if services["orthanc"]["running"]:
            try:
                self.orthanc_client(timeout=3.0).system()
                services["orthanc"]["rest"] = "ok"
            except orth.OrthancError as exc:
                services["orthanc"]["rest"] = str(exc)
        recorded = [services[n]["running"] for n in state["processes"] if n in services]
        return {"up": bool(recorded) and all(recorded), "state": str(self.state_path),
                "credentials": str(self.credentials_path) if self.authentication else None, "services": services}
