"""Prefect as its users run it: the commands Prefect documents, the Makefile's shortcuts, the UI.

One real `prefect server` (`make server`, so with credentials) on a free loopback port with a
temporary PREFECT_HOME; then, as Prefect's documentation has it, `prefect work-pool create`,
`prefect deploy --all` from the checkout and `prefect worker start` from another directory,
without the Makefile; and headless Chromium on the UI. Run alone with `pytest -m server`. Every
process started here is stopped by its process group.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, cache_records, machine, new_bucket, objects, pickled_results, s3

pytestmark = [pytest.mark.server, pytest.mark.timeout(900), pytest.mark.xdist_group("server")]

PREFECT = str(REPO / ".venv" / "bin" / "prefect")
POOL = "ckptflow-process"
AUTH = f"ckptflow-test:{secrets.token_hex(12)}"  # what `make server` requires of every client
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLOW_RUN_TIMEOUT_S = 420
# A run small enough for the suite: 256 images, 8 batches an epoch, three export formats.
SMALL = {"data": "bundled", "train_samples": 256, "test_samples": 128, "units": 64, "seed": 7,
         "save_every_batches": 3, "formats": ["keras", "weights_h5", "h5"]}


@dataclass
class Stack:
    url: str  # the API, e.g. http://127.0.0.1:PORT/api
    env: dict[str, str]  # a client's environment: PREFECT_API_URL, PREFECT_API_AUTH_STRING, ...
    logs: Path  # also the PREFECT_HOME of the server, the worker and its flow runs
    worker_dir: Path  # where the worker was started: not the checkout
    nightly_runs: list = field(default_factory=list)  # what the schedule created
    make_worker_log: str = ""  # `make worker`, started and stopped before any run exists


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """Start `cmd` in its own process group, so stopping it also stops what it started."""
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _proc_stat(pid: int | str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `pid`: a worker starts flow runs in new sessions."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        if (fields := _proc_stat(entry.name)) is not None:
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += [kid for kid, _ in kids]
    return found


def _stop(proc: subprocess.Popen) -> None:
    """Stop `proc`, its process group and anything it started in sessions of their own."""
    below = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    for pid, started in below:
        if (fields := _proc_stat(pid)) is not None and fields[19] == started:  # not a reused pid
            os.kill(pid, signal.SIGKILL)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def _cli(stack: Stack, *args: str, check: bool = True, cwd: Path = REPO,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([PREFECT, "--no-prompt", *args], cwd=cwd, env=env or stack.env,
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def _client(stack: Stack):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api=stack.url, auth_string=AUTH)


def _run_deployment(stack: Stack, config: dict, name: str = "train-pipeline/train") -> str:
    """`prefect deployment run` with the config as JSON; returns the flow run id."""
    result = _cli(stack, "deployment", "run", name, "--params", json.dumps({"config": config}))
    return next(line.split("UUID:")[1].strip() for line in result.stdout.splitlines()
                if "UUID:" in line)


def _wait_final(stack: Stack, flow_run_id: str, timeout: float = FLOW_RUN_TIMEOUT_S):
    """The flow run once it reaches a final state (Completed, Failed, Crashed, Cancelled)."""
    deadline = time.monotonic() + timeout
    with _client(stack) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(1)
    pytest.fail(f"flow run {flow_run_id} not finished after {timeout} s (last state {run.state})")


def _logs(stack: Stack, flow_run_id: str) -> str:
    return _cli(stack, "flow-run", "logs", flow_run_id).stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`make server` (credentials required) on a free port, then Prefect's own commands:
    `prefect work-pool create`, `prefect deploy --all` from the checkout, and `prefect worker
    start` from another directory, with no CKPTFLOW_HOME or other hint where the checkout is.

    `make deploy` then deploys again (the shortcut, finding the pool there), and `make worker`
    is started and stopped once it polls the pool. The nightly schedule's runs are recorded for
    the schedule test, then the schedule is paused and its runs deleted, so a test run near
    02:00 UTC does not train the nightly run.
    """
    home = tmp_path_factory.mktemp("prefect_home")
    worker_dir = tmp_path_factory.mktemp("worker_started_here")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CKPTFLOW_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_API_AUTH_STRING=AUTH,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_SERVER_API_PORT=str(port))
    stack = Stack(url=url, env=env, logs=home, worker_dir=worker_dir)
    procs = []
    try:
        procs.append(_start(["make", "--no-print-directory", "server", f"PREFECT_PORT={port}"], env,
                            home / "server.log"))
        _wait_healthy(url, procs[0], home / "server.log")
        _cli(stack, "work-pool", "create", POOL, "--type", "process")
        _cli(stack, "deploy", "--all")
        again = subprocess.run(["make", "--no-print-directory", "deploy"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        stack.nightly_runs = _take_nightly_runs(stack)
        stack.make_worker_log = _make_worker_polls(stack)
        # as a user whose virtual environment is active, in some directory of theirs
        worker_env = {**env, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
        procs.append(_start([PREFECT, "worker", "start", "--pool", POOL], worker_env,
                            home / "worker.log", cwd=worker_dir))
        yield stack
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _make_worker_polls(stack: Stack) -> str:
    """Start `make worker`, wait until it has polled the pool with the credentials, stop it."""
    log = stack.logs / "make_worker.log"
    proc = _start(["make", "--no-print-directory", "worker"], stack.env, log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with _client(stack) as client:
                workers = client.read_workers_for_work_pool(POOL)
            if workers and "started!" in log.read_text():
                break
            time.sleep(1)
    finally:
        _stop(proc)
    assert workers, f"make worker never polled the pool:\n{log.read_text()[-3000:]}"
    return log.read_text()


def _take_nightly_runs(stack: Stack) -> list:
    """The runs the nightly schedule created; then pause it and delete them."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with _client(stack) as client:
        deployment = client.read_deployment_by_name("train-pipeline/nightly")
        deadline = time.monotonic() + 90
        runs = []
        while not runs and time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["nightly"])))
            time.sleep(1)
        for schedule in deployment.schedules:  # pausing also deletes the runs it scheduled
            client.update_deployment_schedule(deployment.id, schedule.id, active=False)
        left = client.read_flow_runs(deployment_filter=_by_id(deployment.id))
        for run in left:
            client.delete_flow_run(run.id)
    return runs


def test_the_schedule_creates_nightly_runs(stack):
    runs = stack.nightly_runs
    assert runs, "the nightly schedule created no runs"
    assert all(run.state.is_scheduled() for run in runs)
    times = sorted(run.expected_start_time for run in runs)
    assert all((t.hour, t.minute) == (2, 0) and t.utcoffset().total_seconds() == 0 for t in times)
    assert all((b - a).total_seconds() == 86_400 for a, b in zip(times, times[1:], strict=False))
    assert runs[0].parameters["config"]["run_dir"] == "runs/nightly"


def test_an_invalid_parameter_is_refused_by_the_server(stack):
    from prefect.exceptions import PrefectHTTPStatusError

    with _client(stack) as client:
        deployment = client.read_deployment_by_name("train-pipeline/train")
        before = len(client.read_flow_runs(deployment_filter=_by_id(deployment.id)))
        result = _cli(stack, "deployment", "run", "train-pipeline/train", "--params",
                      json.dumps({"config": {"epochs": 0}}), check=False)
        assert result.returncode != 0
        assert ("Validation failed for field 'config.epochs'. Failure reason: 0 is less than or "
                "equal to the minimum of 0") in " ".join((result.stdout + result.stderr).split())
        for config, problem in [({"epochs": "ten"}, "'ten' is not of type 'integer'"),
                                ({"epoch": 3}, "('epoch' was unexpected)")]:
            with pytest.raises(PrefectHTTPStatusError, match=re.escape(problem)):
                client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})
        assert len(client.read_flow_runs(deployment_filter=_by_id(deployment.id))) == before


def _by_id(deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))


@dataclass
class Retried:
    name: str  # the run directory as the run was given it: relative
    run_dir: Path  # where it landed
    failed: object
    failed_logs: str
    completed: object
    logs: str


@pytest.fixture(scope="module")
def failed_then_retried(stack):
    """A deployment run on a relative run directory whose injected failure outlasts the flow's
    own retry, then `prefect flow-run retry`. The run directory lands in the checkout (removed
    afterwards)."""
    name = f"runs/server-test-{secrets.token_hex(4)}"
    config = {**SMALL, "run_dir": name, "epochs": 4, "fail_after_epoch": 1, "fail_attempts": 2}
    try:
        flow_run_id = _run_deployment(stack, config)
        failed = _wait_final(stack, flow_run_id)
        failed_logs = _logs(stack, flow_run_id)
        _cli(stack, "flow-run", "retry", flow_run_id)
        completed = _wait_final(stack, flow_run_id)
        yield Retried(name, REPO / name, failed, failed_logs, completed, _logs(stack, flow_run_id))
    finally:
        shutil.rmtree(REPO / name, ignore_errors=True)


def test_deployments_run_from_the_checkout_wherever_the_worker_started(stack, failed_then_retried):
    with _client(stack) as client:
        for name in ("train-pipeline/train", "train-pipeline/nightly", "sweep/sweep"):
            steps = client.read_deployment_by_name(name).pull_steps
            assert steps == [{"prefect.deployments.steps.set_working_directory":
                              {"directory": str(REPO)}}], (name, steps)
    assert stack.worker_dir != REPO and not list(stack.worker_dir.iterdir())
    assert (failed_then_retried.run_dir / "manifest.json").is_file()  # runs/... of the checkout
    assert "FileNotFoundError" not in failed_then_retried.failed_logs + failed_then_retried.logs


def test_make_worker_polls_the_pool_with_the_credentials(stack):
    assert "started!" in stack.make_worker_log, stack.make_worker_log[-3000:]
    # a refused request says 401; the worker's random name may hold the digits ("...c8b7c2d3401a")
    assert not re.search(r"\b401\b", stack.make_worker_log), stack.make_worker_log[-3000:]


def test_a_failed_deployment_run_retried_resumes_from_its_checkpoint(failed_then_retried):
    retried = failed_then_retried
    run_dir, failed, failed_logs = retried.run_dir, retried.failed, retried.failed_logs
    completed, logs = retried.completed, retried.logs
    assert failed.state.is_failed(), f"{failed.state}\n{failed_logs[-3000:]}"
    assert "injected failure 2 of 2 after epoch 2" in failed_logs
    assert completed.state.is_completed(), f"{completed.state}\n{logs[-3000:]}"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    attempts = manifest["training"]["attempts"]
    # the retry trained epochs 3 and 4 only: 2 epochs of 8 batches, ending at optimizer step 32
    assert [(a["resumed_from"], a["start_epoch"], a["end_epoch"], a["batches_trained"])
            for a in attempts] == [("checkpoints/cp-0002", 2, 4, 16)]
    assert manifest["training"]["step"] == 32
    assert "resuming from cp-0002: epoch 2, batch 0, optimizer step 16" in logs
    assert "epoch 4/4: loss" in logs
    assert "epoch 1/4: loss" not in logs.split("resuming from cp-0002")[-1]


def _start_and_wait(stack: Stack, runs: dict[str, tuple[str, dict]]) -> dict:
    """Start each named run (deployment, parameters) through Prefect's client, as any runner
    could; each flow run once final."""
    with _client(stack) as client:
        ids = {name: client.create_flow_run_from_deployment(
            client.read_deployment_by_name(deployment).id, parameters=parameters).id
            for name, (deployment, parameters) in runs.items()}
    return {name: _wait_final(stack, flow_run_id) for name, flow_run_id in ids.items()}


def test_a_run_may_use_only_the_code_and_paths_its_deployment_allows(stack, tmp_path):
    """Runs created through Prefect's client with only their parameters changed, as anyone allowed
    to start a run could: code and paths outside what the deployment allows are refused before
    anything runs (no retry); allowed runs on the same worker, created after them, complete."""
    token = secrets.token_hex(4)
    marks = {kind: tmp_path / f"{kind}-ran" for kind in ("model", "data")}
    outside = tmp_path / "outside"
    outside.mkdir()
    link = REPO / "runs" / f"server-test-link-{token}"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(outside)
    escape = REPO.parent.parent / f"server-test-escape-{token}"
    refused = {  # name -> (deployment, parameters, the parameter named, what it received)
        "model": ("train-pipeline/train", {"config": {
            "model": "subprocess:getoutput", "model_params": {"cmd": f"touch {marks['model']}"}}},
            "model", "subprocess:getoutput"),
        "data": ("train-pipeline/train", {"config": {
            "data": "subprocess:getoutput", "data_params": {"cmd": f"touch {marks['data']}"}}},
            "data", "subprocess:getoutput"),
        "absolute": ("train-pipeline/train", {"config": {"run_dir": str(tmp_path / "elsewhere")}},
                     "run_dir", str(tmp_path / "elsewhere")),
        "dotdot": ("train-pipeline/train", {"config": {"run_dir": f"../../{escape.name}"}},
                   "run_dir", f"../../{escape.name}"),
        "symlink": ("train-pipeline/train", {"config": {"run_dir": f"runs/{link.name}/x"}},
                    "run_dir", f"runs/{link.name}/x"),
        "unlisted": ("train-pipeline/train-digits", {"config": {  # digits' data, as a model
            "model": "examples/digits_cnn/data.py:load", "data": "examples/digits_cnn/data.py:load"}},
            "model", "examples/digits_cnn/data.py:load"),
        "scheduler": ("sweep/sweep", {"sweep": {"dask_address": "tcp://127.0.0.1:9"}},
                      "dask_address", "tcp://127.0.0.1:9"),
    }
    allowed = {  # the deployment's own functions, and the one its allowlist adds (the tutorial's
        # built-in model on `train` runs in the other tests of this module)
        "digits": {"run_dir": f"runs/server-test-digits-{token}", "epochs": 1, "formats": ["keras"],
                   "model": "examples/digits_cnn/model.py:build",
                   "data": "examples/digits_cnn/data.py:load"},
        "diabetes": {"run_dir": f"runs/server-test-diabetes-{token}", "epochs": 1,
                     "formats": ["keras"], "model": "examples/diabetes_regression/model.py:build",
                     "data": "examples/diabetes_regression/data.py:load"},
    }
    try:
        runs = _start_and_wait(stack, {name: (deployment, parameters)
                                       for name, (deployment, parameters, *_) in refused.items()})
        runs |= _start_and_wait(stack, {  # after the refused runs, on the same worker
            name: ("train-pipeline/train-digits", {"config": config})
            for name, config in allowed.items()})
        for name, (deployment, _, parameter, received) in refused.items():
            run = runs[name]
            assert run.state.is_failed(), (name, run.state)
            assert run.run_count == 1 and run.empirical_policy.retries == 0, (name, run.run_count)
            what = "is not allowed by" if parameter != "run_dir" else "is outside what"
            assert f"{parameter} {received!r} {what} deployment {deployment}" in run.state.message
            assert "Traceback" not in _logs(stack, str(run.id))
        assert not any(mark.exists() for mark in marks.values())
        assert not (tmp_path / "elsewhere").exists() and not escape.exists()
        assert list(outside.iterdir()) == []
        for name, config in allowed.items():
            run = runs[name]
            assert run.state.is_completed(), f"{name}: {run.state}\n{_logs(stack, str(run.id))[-3000:]}"
            manifest = json.loads((REPO / config["run_dir"] / "manifest.json").read_text())
            assert manifest["training"]["epoch"] == 1
    finally:
        link.unlink()
        for config in allowed.values():
            shutil.rmtree(REPO / config["run_dir"], ignore_errors=True)


def test_cancel_commits_the_batch_reached_and_the_next_run_loses_none(stack):
    """Cancel, as the UI's button does it (the flow run set Cancelling): the worker sends
    SIGTERM, training commits the batch it reached, and the run ends Cancelled, not Crashed."""
    from prefect.states import Cancelling

    name = f"runs/server-test-cancel-{secrets.token_hex(4)}"
    run_dir = REPO / name
    config = {**SMALL, "run_dir": name, "epochs": 500, "save_every_batches": 0}
    try:
        flow_run_id = _run_deployment(stack, config)
        deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
        while not (run_dir / "checkpoints" / "cp-0002").exists():
            assert time.monotonic() < deadline, "no cp-0002 from the deployment run"
            time.sleep(0.2)
        with _client(stack) as client:
            client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
        cancelled = _wait_final(stack, flow_run_id)
        logs = _logs(stack, flow_run_id)
        assert cancelled.state.is_cancelled(), f"{cancelled.state}\n{logs[-3000:]}"
        attempt = json.loads((run_dir / "manifest.json").read_text())["training"]["attempts"][-1]
        stopped = attempt["stopped"]
        assert stopped["signal"] == "SIGTERM", attempt
        assert (run_dir / stopped["checkpoint"] / "COMMIT.json").is_file()
        state = json.loads((run_dir / stopped["checkpoint"] / "state.json").read_text())
        assert "stopped by SIGTERM at epoch" in logs and stopped["checkpoint"] in logs

        again = _wait_final(stack, _run_deployment(stack, {**config, "epochs": state["epoch"] + 1}))
        assert again.state.is_completed(), _logs(stack, again.id)[-3000:]
        resumed = json.loads((run_dir / "manifest.json").read_text())["training"]["attempts"][-1]
        assert resumed["resumed_from"] == stopped["checkpoint"]  # no batch lost, none repeated
        assert (resumed["start_epoch"], resumed["start_batch"]) == (state["epoch"], state["batch"])
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_deployment_run_publishes_keyed_artifacts(stack, failed_then_retried):
    name, run_dir, completed = failed_then_retried.name, failed_then_retried.run_dir, \
        failed_then_retried.completed
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from ckptflow.orchestration.artifacts import artifact_key


    with _client(stack) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[completed.id])))
    by_type = {}
    for artifact in artifacts:
        by_type.setdefault(artifact.type, []).append(artifact)
    keys = {a.key for a in artifacts}
    assert {"markdown", "table", "progress"} <= set(by_type)
    report = next(a for a in by_type["markdown"] if a.key == artifact_key(name, "report"))
    assert "## Exports" in report.data and "| keras |" in report.data
    assert "resumed from `checkpoints/cp-0002`" in report.data
    assert "data:image/png;base64," in report.data
    assert {artifact_key(name, what) for what in ("history", "progress", "exports")} <= keys
    assert max(a.data for a in by_type["progress"]) == 100.0
    assert (run_dir / "metrics" / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def _open_card(driver, key: str) -> bool:
    """Click the artifact card titled `key` until its page opens (a click while the list is
    still rendering can be lost)."""
    from selenium.webdriver.common.by import By

    if "/artifacts/artifact/" in driver.current_url:
        return True
    for card in driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{key}']"):
        card.click()
    return False


def _rendered_report(driver):
    """The artifact page's text and the curve's pixel width, once the report is shown; else False."""
    from selenium.webdriver.common.by import By

    text = " ".join(driver.find_element(By.TAG_NAME, "body").text.split())
    width = driver.execute_script(
        "const img = document.querySelector('img[src^=\"data:image/png\"]');"
        "return img && img.complete ? img.naturalWidth : 0;")
    shown = "Training curve" in text and "Per-epoch metrics" in text and "## " not in text
    return (text, width) if shown and width else False


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="no chromium/chromedriver installed (apt-get install chromium chromium-driver)")
def test_the_ui_shows_the_report_of_a_completed_run(stack, failed_then_retried, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from ckptflow.orchestration.artifacts import artifact_key

    completed = failed_then_retried.completed
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1800", f"--user-data-dir={tmp_path / 'c'}"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    ui = stack.url.removesuffix("/api")
    shot = tmp_path / "report_artifact.png"
    try:
        wait = WebDriverWait(driver, 90)
        # The UI sends a visitor without the server's credentials to its login page. (A run's
        # page opened directly before logging in shows an error page instead: Prefect's UI.)
        driver.get(f"{ui}/runs")
        login = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=password]"))
        assert "/login" in driver.current_url
        login.send_keys(AUTH, Keys.ENTER)
        wait.until(lambda d: d.current_url.endswith("/runs"))
        driver.get(f"{ui}/runs/flow-run/{completed.id}")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "li.p-tab#artifacts")).click()
        report_key = artifact_key(failed_then_retried.name, "report")
        wait.until(lambda d: _open_card(d, report_key))
        # The page may re-render while it loads: read what it shows in the same step as the check.
        text, curve_width = wait.until(_rendered_report)
        url = driver.current_url
    finally:
        driver.save_screenshot(str(shot))  # kept in the test's temporary directory
        driver.quit()
    assert "/artifacts/artifact/" in url
    assert "this run resumed from checkpoints/cp-0002" in text, text
    assert "keras exports/model.keras" in text and "h5 exports/model.h5" in text
    assert curve_width > 100, "the training curve did not render"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_client_without_the_credentials_is_refused(stack):
    def status(path: str, auth: str | None) -> int:
        request = urllib.request.Request(f"{stack.url}{path}", method="POST", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        if auth:
            request.add_header("Authorization", f"Basic {base64.b64encode(auth.encode()).decode()}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status("/deployments/filter", AUTH) == 200
    assert status("/deployments/filter", None) == 401
    assert status("/deployments/filter", "ckptflow-test:wrong") == 401
    assert status("/flow_runs/", None) == 401  # nobody without them can start a run either
    anonymous = {k: v for k, v in stack.env.items() if k != "PREFECT_API_AUTH_STRING"}
    # (parameters the server would refuse anyway, so a broken check cannot start a run)
    refused = _cli(stack, "deployment", "run", "train-pipeline/train", "--params",
                   json.dumps({"config": {"epochs": 0}}), env=anonymous, check=False)
    assert refused.returncode != 0
    assert "401 Unauthorized" in refused.stdout + refused.stderr


def test_make_server_refuses_to_start_without_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if "AUTH_STRING" not in k}
    result = subprocess.run(["make", "--no-print-directory", "server", f"PREFECT_PORT={_free_port()}"],
                            cwd=REPO, env={**env, "PREFECT_HOME": str(tmp_path)}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith(
        "make server: no credentials. Set PREFECT_API_AUTH_STRING=USER:PASSWORD")
    assert not (tmp_path / "prefect.db").exists()


def test_a_deployment_of_the_installed_package_runs_where_it_was_deployed(stack, tmp_path):
    """No checkout, no prefect.yaml: `prefect deploy` of the package's module path, whose pull
    step Prefect sets to the directory it is run in."""
    work = tmp_path / "my_work"
    work.mkdir()
    _cli(stack, "deploy", "ckptflow.flows.train_pipeline:train_pipeline", "--name", "from-package",
         "--pool", POOL, cwd=work)
    with _client(stack) as client:
        deployment = client.read_deployment_by_name("train-pipeline/from-package")
    assert deployment.entrypoint == "ckptflow.flows.train_pipeline:train_pipeline"
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                      {"directory": str(work)}}]
    assert deployment.enforce_parameter_schema
    config = {**SMALL, "run_dir": "runs/from-package", "epochs": 1, "formats": ["keras"]}
    flow_run_id = _run_deployment(stack, config, name="train-pipeline/from-package")
    run = _wait_final(stack, flow_run_id)
    assert run.state.is_completed(), f"{run.state}\n{_logs(stack, flow_run_id)[-3000:]}"
    manifest = json.loads((work / "runs" / "from-package" / "manifest.json").read_text())
    assert manifest["training"]["epoch"] == 1
    assert not (REPO / "runs" / "from-package").exists()


def test_no_deployment_run_wrote_a_pickled_result(stack, failed_then_retried):
    """Last in the module: every run above has finished. The server's database, the worker's
    and the flow runs' result storage and cache records all live in this PREFECT_HOME."""
    assert failed_then_retried.completed.state.is_completed()
    records = cache_records(stack.logs)
    assert records and {r["serializer"]["type"] for r in records} == {"ckptflow-records"}
    assert pickled_results(stack.logs) == []


def test_a_deployment_run_in_s3_resumes_on_a_new_worker_after_its_machine_died(
        stack, s3_endpoint, tmp_path):
    """A deployment whose run_dir is an s3:// URL; its worker and flow run SIGKILLed mid-training
    (the machine gone); Prefect's Crashed; a worker started elsewhere with an empty disk; `prefect
    flow-run retry` (the UI's Retry) resumes at the last batch committed in the store."""
    from prefect.states import Crashed

    bucket = new_bucket(s3_endpoint)
    url = f"s3://{bucket}/runs/deployed"
    pool = "ckptflow-s3-test"
    _cli(stack, "work-pool", "create", pool, "--type", "process")
    deployment = tmp_path / "prefect.yaml"
    deployment.write_text(json.dumps({  # JSON is YAML
        "name": "ckptflow-s3-test", "pull": [{"prefect.deployments.steps.set_working_directory":
                                              {"directory": str(REPO)}}],
        "deployments": [{
            "name": "train-s3", "entrypoint": "flows/train_pipeline.py:train_pipeline",
            "parameters": {"config": {"run_dir": url}}, "schedules": [],
            "work_pool": {"name": pool, "job_variables": {
                "ckptflow_allow": {"roots": [f"s3://{bucket}/runs"]}}}}]}))
    _cli(stack, "deploy", "--prefect-file", str(deployment), "-n", "train-s3")

    def start_worker(name: str) -> subprocess.Popen:  # credentials in the worker's environment
        cwd, env = machine(tmp_path, name, s3_endpoint)
        env = {**env, **{k: v for k, v in stack.env.items() if k.startswith("PREFECT_")},
               "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        return _start([PREFECT, "worker", "start", "--pool", pool], env, tmp_path / f"{name}.log",
                      cwd=cwd)

    config = {**SMALL, "run_dir": url, "epochs": 3, "train_samples": 1024,
              "save_every_batches": 4, "checkpoint_budget": 0, "lease_seconds": 5,
              "wait_for_lock": 60}
    worker_a = start_worker("a")
    try:
        flow_run_id = _run_deployment(stack, config, name="train-pipeline/train-s3")
        deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
        while not any(k.endswith("COMMIT.json") for k in objects(s3_endpoint, bucket)):
            assert time.monotonic() < deadline, (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.05)
        for pid in [worker_a.pid, *(p for p, _ in _descendants(worker_a.pid))]:
            os.kill(pid, signal.SIGKILL)  # machine A is gone: its worker, its flow run, its disk
        worker_a.wait(timeout=60)
        shutil.rmtree(tmp_path / "a", ignore_errors=True)
    finally:
        _stop(worker_a)
    last_by_a = max(json.loads(s3(s3_endpoint).cat_file(f"{bucket}/{k}"))["step"]
                    for k in objects(s3_endpoint, bucket) if k.endswith("COMMIT.json"))
    with _client(stack) as client:  # what Prefect records once the run's heartbeats stop
        client.set_flow_run_state(flow_run_id, Crashed(message="worker lost"), force=True)

    worker_b = start_worker("b")
    try:
        _cli(stack, "flow-run", "retry", flow_run_id)
        completed = _wait_final(stack, flow_run_id)
    finally:
        _stop(worker_b)
    logs = _logs(stack, flow_run_id)
    assert completed.state.is_completed(), f"{completed.state}\n{logs[-3000:]}"
    assert "took over run directory" in logs
    manifest = json.loads(s3(s3_endpoint).cat_file(f"{bucket}/runs/deployed/manifest.json"))
    attempt = manifest["training"]["attempts"][-1]
    assert manifest["training"]["step"] == 96
    assert attempt["batches_trained"] == 96 - last_by_a > 0  # from A's last commit, none redone
    assert f"optimizer step {last_by_a}" in logs
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from ckptflow.orchestration.artifacts import artifact_key

    with _client(stack) as client:  # keyed by the URL, not by either machine's working copy
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))}
    assert {artifact_key(url, what) for what in ("report", "history", "progress")} <= keys
