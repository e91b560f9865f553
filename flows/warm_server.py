"""One warm local Prefect server for ad-hoc runs: `ckptflow server start|stop|status`.

A temporary server per `ckptflow run` costs about 10 s of CPU here; someone running many keeps
one up instead: `prefect server start` on 127.0.0.1, detached, logging to
PREFECT_HOME/ckptflow-server.log, with a random credential of its own
(PREFECT_SERVER_API_AUTH_STRING), recorded in PREFECT_HOME/ckptflow-server.json (readable by the
user alone). Runs use it while it answers with that credential (flows/local_server.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ckptflow.core.errors import BadInputError
from ckptflow.core.files import atomic_write_bytes

STATE_FILE = "ckptflow-server.json"
LOG_FILE = "ckptflow-server.log"
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 180  # a fresh PREFECT_HOME migrates its database first


@dataclass
class WarmServer:
    """Where the warm server is, as `ckptflow server start` recorded it."""

    url: str  # the API: http://127.0.0.1:PORT/api
    pid: int  # `prefect server start`, leader of its own process group
    auth: str  # the credentials it requires: USER:PASSWORD
    log: str
    started: str

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")


def prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def recorded() -> WarmServer | None:
    """The warm server recorded in PREFECT_HOME, up or not; None if there is no record."""
    try:
        return WarmServer(**json.loads((prefect_home() / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def answers(server: WarmServer, timeout: float = 2.0) -> bool:
    """True if the server answers an authenticated request with its recorded credentials."""
    token = base64.b64encode(server.auth.encode()).decode()
    request = urllib.request.Request(f"{server.url}/admin/version",
                                     headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def running() -> WarmServer | None:
    """The warm server if it is up and answers with its credentials, else None."""
    server = recorded()
    return server if server is not None and answers(server) else None


def start(port: int) -> tuple[WarmServer, bool]:
    """Start the warm server on 127.0.0.1:`port` and wait until it answers; (server, started),
    started False for one already up or still starting."""
    if (server := recorded()) is not None:
        if _is_warm_server(server.pid):  # up, or still coming up: wait for it
            if _wait_until_it_answers(server, lambda: _is_warm_server(server.pid)):
                return server, False
            raise RuntimeError(f"the warm server (pid {server.pid}) does not answer on "
                               f"{server.url}; `ckptflow server stop` stops it")
        stop()  # the record of a server that is gone
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            raise BadInputError(f"port {port} on {HOST} is in use. Choose another with "
                                "--port.") from None
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://{HOST}:{port}/api"
    auth = f"ckptflow:{secrets.token_urlsafe(24)}"
    env = {**os.environ, "PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_UI_API_URL": url}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    log = home / LOG_FILE
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port",
             str(port)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # its own process group: stopped as one, immune to Ctrl-C
    server = WarmServer(url=url, pid=process.pid, auth=auth, log=str(log),
                        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    atomic_write_bytes(home / STATE_FILE, json.dumps(asdict(server)).encode(), mode=0o600)
    if _wait_until_it_answers(server, lambda: process.poll() is None):
        return server, True
    stop()
    process.wait()
    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
    raise RuntimeError(f"the warm server did not come up within {STARTUP_TIMEOUT_S} s "
                       f"(see {log}): {' / '.join(tail)}")


def _wait_until_it_answers(server: WarmServer, alive) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while alive() and time.monotonic() < deadline:
        if answers(server):
            return True
        time.sleep(0.5)
    return answers(server)


def stop() -> WarmServer | None:
    """Stop the recorded warm server (its whole process group) and remove its record."""
    server = recorded()
    if server is None:
        return None
    if _is_warm_server(server.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _is_warm_server(server.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _is_warm_server(server.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
    (prefect_home() / STATE_FILE).unlink(missing_ok=True)
    return server


def _is_warm_server(pid: int) -> bool:
    """True while `pid` is still the `prefect server start` that was recorded (not a reused pid)."""
    try:
        if os.getpgid(pid) != pid:
            return False
        cmdline = Path(f"/proc/{pid}/cmdline")
        return not cmdline.exists() or b"server\0start" in cmdline.read_bytes()
    except (ProcessLookupError, PermissionError, OSError):
        return False
