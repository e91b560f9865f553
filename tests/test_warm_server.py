"""`ckptflow server start|stop|status`: one warm local Prefect server that ad-hoc runs use.

Real processes throughout: the warm server is `prefect server start` in the background, in a
PREFECT_HOME of the test's own; `ckptflow run` is the console script. The server is stopped by
its process group when the test ends, whatever happened.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CKPTFLOW = str(Path(sys.executable).parent / "ckptflow")
SMALL = ["--data", "bundled", "--train-samples", "256", "--test-samples", "128", "--units", "64",
         "--epochs", "1", "--save-every-batches", "3", "--formats", "keras"]

pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ckptflow(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([CKPTFLOW, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def api(url: str, path: str, auth: str | None, body: dict | None = None) -> tuple[int, object]:
    request = urllib.request.Request(f"{url}{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", f"Basic {base64.b64encode(auth.encode()).decode()}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def port_is_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_runs_use_the_warm_server_while_it_is_up_and_a_temporary_one_otherwise(tmp_path):
    home, port = tmp_path / "prefect_home", free_port()
    state = home / "ckptflow-server.json"
    pid = None
    try:
        started = ckptflow(home, "server", "start", "--port", str(port))
        assert started.returncode == 0, started.stderr[-3000:]
        assert f"warm server started on http://127.0.0.1:{port}" in started.stdout
        record = json.loads(state.read_text())
        pid, url, auth = record["pid"], record["url"], record["auth"]
        assert stat.S_IMODE(state.stat().st_mode) == 0o600  # the credentials are the user's alone
        assert f"UI login: {auth}" in started.stdout
        assert api(url, "/flow_runs/filter", None, {})[0] == 401  # nobody else can drive it
        assert ckptflow(home, "server", "status").returncode == 0
        again = ckptflow(home, "server", "start", "--port", str(port))
        assert again.returncode == 0 and "already up" in again.stdout
        assert json.loads(state.read_text())["pid"] == pid

        run_dir = tmp_path / "run"
        warm = ckptflow(home, "run", "--run-dir", str(run_dir), *SMALL)
        assert warm.returncode == 0, warm.stderr[-3000:]
        assert f"Using the warm server on http://127.0.0.1:{port}" in warm.stderr
        assert "Starting temporary server" not in warm.stderr
        status, runs = api(url, "/flow_runs/filter", auth,
                           {"flow_runs": {"name": {"any_": [f"train {run_dir}"]}}})
        assert status == 200 and [r["state_type"] for r in runs] == ["COMPLETED"]  # recorded there
        assert (run_dir / "manifest.json").is_file()

        kill_group(pid)  # a warm server that died: its record stays, and is not trusted
        deadline = time.monotonic() + 30
        while not port_is_closed(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        down = ckptflow(home, "server", "status")
        assert down.returncode == 1 and "not answering" in down.stdout
        # another setting, so that the flow runs (the same request is answered without it)
        fallback = ckptflow(home, "run", "--run-dir", str(run_dir), *SMALL,
                            "--stop-grace-seconds", "21")
        assert fallback.returncode == 0, fallback.stderr[-3000:]
        assert "Starting temporary server" in fallback.stderr
        assert "already complete at 1 epochs" in fallback.stdout
        stopped = ckptflow(home, "server", "stop")
        assert stopped.returncode == 0 and not state.exists()
        assert ckptflow(home, "server", "status").returncode == 1
    finally:
        if pid is not None:
            kill_group(pid)
    assert port_is_closed(port)


def test_server_start_on_a_busy_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = ckptflow(tmp_path / "prefect_home", "server", "start", "--port", str(port),
                          timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"ckptflow: error: port {port} on 127.0.0.1 is in use. Choose another with --port."]
    assert not (tmp_path / "prefect_home" / "ckptflow-server.json").exists()
    stopped = ckptflow(tmp_path / "prefect_home", "server", "stop", timeout=120)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "no warm server recorded"
