"""The temporary Prefect server an ad-hoc run starts early: used by the flow, stopped, or skipped.

Each case runs in its own Python process: the test session's own Prefect settings (its test
server) must not leak in, since the point is what happens when no API URL is configured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import REPO, port_is_closed


def run_script(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    environment.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=REPO, env=environment, timeout=240)


def test_a_flow_runs_on_the_early_server_which_stops_afterwards():
    result = run_script("""
        from ckptflow.flows.process_defaults import apply_process_defaults; apply_process_defaults()
        import asyncio, os
        from prefect import flow, task
        from prefect.client.orchestration import get_client
        from ckptflow.flows.local_server import temporary_server

        @task
        def double(x):
            return 2 * x

        @flow
        def tiny():
            return double(21)

        async def states(flow_run_id):
            async with get_client() as client:
                run = await client.read_flow_run(flow_run_id)
                return run.state.name

        with temporary_server() as wait_until_ready:
            url = os.environ["PREFECT_API_URL"]
            wait_until_ready()
            state = tiny(return_state=True)
            print("RESULT", url, state.result(), asyncio.run(states(state.state_details.flow_run_id)))
        print("AFTER", os.environ.get("PREFECT_API_URL"))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    _, url, value, server_state = next(line for line in result.stdout.splitlines()
                                       if line.startswith("RESULT")).split()
    assert value == "42" and server_state == "Completed"  # the run is recorded on that server
    assert "AFTER None" in result.stdout  # the process's settings are as they were
    port = int(url.removesuffix("/api").rsplit(":", 1)[1])
    assert f"Starting temporary server on http://127.0.0.1:{port}" in result.stderr
    assert f"Stopping temporary server on http://127.0.0.1:{port}" in result.stderr
    assert result.stderr.count("Starting temporary server") == 1  # Prefect started none of its own
    assert "Error logging to API" not in result.stderr
    assert port_is_closed(port)


def test_a_server_that_does_not_come_up_hands_over_to_prefects_own():
    result = run_script("""
        from ckptflow.flows.process_defaults import apply_process_defaults; apply_process_defaults()
        import subprocess, sys
        import ckptflow.flows.local_server as local_server
        from prefect.settings import get_current_settings

        # a real process that exits at once, as uvicorn does when it cannot start
        local_server._launch = lambda *_: subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        with local_server.temporary_server() as wait_until_ready:
            wait_until_ready()
            print("URL", get_current_settings().api.url)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "URL None" in result.stdout  # so Prefect starts its own temporary server on demand
    assert "did not come up (exit code 3); Prefect starts its own instead" in result.stderr


def test_a_configured_api_url_is_left_alone(prefect_api_url):
    result = run_script("""
        from ckptflow.flows.process_defaults import apply_process_defaults; apply_process_defaults()
        import os
        from ckptflow.flows.local_server import temporary_server

        with temporary_server() as wait_until_ready:
            wait_until_ready()
            print("URL", os.environ["PREFECT_API_URL"])
    """, PREFECT_API_URL=prefect_api_url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"URL {prefect_api_url}" in result.stdout
    assert "Starting temporary server" not in result.stderr

