"""The Prefect API of an ad-hoc run: the warm server if it is up, else a temporary one started early.

Prefect starts its temporary server only once the flow module (and TensorFlow, ~10 s here) has
loaded; both are single-threaded start-up work, so on two cores they can overlap.
`temporary_server()` starts the same server (the command Prefect's `SubprocessASGIServer` runs)
first thing, with a random credential of its own (PREFECT_SERVER_API_AUTH_STRING) so no one
else on the machine can drive it, and stops it when the run ends. If it does not come up, the
run falls back to Prefect's own temporary server.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from ckptflow.core.errors import BadInputError
from ckptflow.core.stop import raise_if_stop_requested


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(port: int, auth: str) -> subprocess.Popen:
    """Prefect's temporary server, launched as Prefect launches it (no UI, ephemeral mode), and
    requiring the credentials `auth` (USER:PASSWORD)."""
    import prefect
    from prefect.settings import get_current_settings

    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_API_AUTH_STRING": auth}
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
         "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"], env=env,
        preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None)


def _stop_with_parent() -> None:
    """In the server's process, before it starts: the kernel sends it SIGTERM when the run's
    process dies, however it dies (SIGKILL, a crash), so no server outlives its run."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def unreachable(api_url: str) -> str | None:
    """Why nothing answers at `api_url`, or None when a server answers (with any status)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=5):
            return None
    except urllib.error.HTTPError:  # a server answered, if only to refuse
        return None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):  # a server answered; Prefect's own TLS settings apply
            return None
        return str(reason)


def _drain_to_server() -> None:
    """Send the run logs and events Prefect still queues to the server before it stops (else
    each late batch retries against a closed port for a minute: "Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=10)


API_VARIABLES = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")


def _use_api(url: str | None, auth: str | None = None,
             restore: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """Point this process's Prefect settings (and its children's) at `url` with credentials
    `auth`, or, with `restore`, back to the values returned by the call that changed them."""
    from prefect.context import refresh_global_settings_context

    before = {name: os.environ.get(name) for name in API_VARIABLES}
    values = restore if restore is not None else {"PREFECT_API_URL": url,
                                                  "PREFECT_API_AUTH_STRING": auth}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    refresh_global_settings_context()
    return before


@contextlib.contextmanager
def ad_hoc_server() -> Iterator[Callable[[], None]]:
    """The Prefect API of an ad-hoc run: a configured API URL; else the warm server if it
    answers; else a temporary server, started now. Yields `wait_until_ready`, to call before the
    flow."""
    from prefect.logging import get_logger
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.settings import get_current_settings

    from ckptflow.flows import warm_server

    if get_current_settings().api.url or (warm := warm_server.running()) is None:
        with temporary_server() as wait_until_ready:
            yield wait_until_ready
        return
    ensure_logging_setup()
    get_logger().info("Using the warm server on %s (ckptflow server start)", warm.ui)
    before = _use_api(warm.url, warm.auth)
    try:
        yield lambda: None
    finally:
        _drain_to_server()
        _use_api(None, restore=before)


@contextlib.contextmanager
def temporary_server() -> Iterator[Callable[[], None]]:
    """Start Prefect's temporary server now; yield `wait_until_ready`, call it before the flow."""
    from prefect.logging import get_logger
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        problem = unreachable(settings.api.url)
        if problem:
            raise BadInputError(f"the Prefect API at {settings.api.url} is unreachable ({problem}). "
                                "Start that server, correct PREFECT_API_URL, or unset it to run "
                                "on a temporary local server.")
        yield lambda: None
        return
    ensure_logging_setup()
    log = get_logger()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    auth = f"ckptflow:{secrets.token_urlsafe(24)}"
    server = KeptUp(lambda: _launch(port, auth))
    before = _use_api(url, auth)
    log.info("Starting temporary server on http://127.0.0.1:%d (while TensorFlow loads)", port)

    def wait_until_ready() -> None:
        deadline = time.monotonic() + settings.server.ephemeral.startup_timeout_seconds
        while server.process.poll() is None and time.monotonic() < deadline:
            raise_if_stop_requested()  # a stop at start-up ends the wait (the server stops)
            if _healthy(url):
                server.keep_up(f"temporary server on port {port}")
                return
            time.sleep(0.1)
        code = server.process.returncode
        log.warning("The temporary server on port %d did not come up (%s); Prefect starts "
                    "its own instead.", port,
                    f"exit code {code}" if code is not None else "timed out")
        server.stop()
        _use_api(None, restore=before)

    try:
        yield wait_until_ready
    finally:
        if server.process.poll() is None:
            _drain_to_server()
            log.info("Stopping temporary server on http://127.0.0.1:%d", port)
        server.stop()
        _use_api(None, restore=before)


class KeptUp:
    """A server process started again (by `launch`, at most `restarts` times) when it dies while
    the run still needs it (an OOM kill, a stray `kill`). Its database is a file and Prefect's
    client retries failed requests, so the run goes on instead of failing on a lost API."""

    def __init__(self, launch: Callable[[], subprocess.Popen], restarts: int = 3):
        self.launch, self.restarts = launch, restarts
        self.process = launch()
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def keep_up(self, name: str) -> None:
        """From now on, start the process again when it dies (checked every second)."""
        from prefect.logging import get_logger

        def watch() -> None:
            while not self._stopping.wait(1.0):
                with self._lock:
                    if self._stopping.is_set() or self.process.poll() is None \
                            or self.restarts == 0:
                        continue
                    self.restarts -= 1
                    get_logger().warning("The %s exited (status %s); starting it again",
                                         name, self.process.returncode)
                    self.process = self.launch()

        # The thread that starts a process must outlive it (PR_SET_PDEATHSIG follows the
        # thread), so the watcher lives as long as this process does.
        threading.Thread(target=watch, name="ckptflow-server-keeper", daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
