"""Shared fixtures: one real Prefect test server per session, offline Keras, small configs."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A PREFECT_HOME of the test session's own, for it and every process it starts: none of the
# user's profiles, result storage or warm server (`ckptflow server start`) leaks in, and nothing
# is left in ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="ckptflow-tests-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)

REPO = Path(__file__).resolve().parent.parent
CKPTFLOW = str(Path(sys.executable).parent / "ckptflow")
# How Prefect names a pickle serializer in a result, a cache record or a state in its database.
PICKLE_SERIALIZER = re.compile(rb'"type"\s*:\s*"[^"]*pickle')


@pytest.fixture(autouse=True, scope="session")
def offline_keras_home(tmp_path_factory):
    """An empty Keras cache, so `data=auto` has to take its offline path in every test."""
    home = tmp_path_factory.mktemp("keras_home")
    os.environ["KERAS_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect API server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def small_config(run_dir: Path, **overrides):
    """A config that trains in about a second: 256 images, 8 batches an epoch, a checkpoint
    every 3 batches without a time budget (so tests can count them). It exports the formats
    that need no conversion; LiteRT and ONNX, whose converters take most of an export's time,
    are exported and verified by the tests of the default run and of the regression example."""
    from ckptflow.config import TrainConfig

    values = dict(run_dir=str(run_dir), data="bundled", train_samples=256, test_samples=128,
                  batch_size=32, save_every_batches=3, checkpoint_budget=0.0, epochs=2, units=64,
                  seed=7, formats=["tf_checkpoint", "weights_h5", "keras", "h5", "saved_model"])
    values.update(overrides)
    return TrainConfig(**values)


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` but the lock's holder note, to prove nothing changed."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != ".lock"}


def forget_verify(run_dir: Path) -> None:
    """Drop the manifest's record of a passed verify, so that a rerun takes the pipeline (the
    same request on a verified, intact run is answered from the manifest)."""
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    manifest.pop("verified", None)  # absent after a verify served from the cache
    (Path(run_dir) / "manifest.json").write_text(json.dumps(manifest))


def weights_digest(model) -> str:
    """SHA-256 over every variable of a model, in order (weights and seed-generator state)."""
    digest = hashlib.sha256()
    for v in model.variables:
        digest.update(v.numpy().tobytes())
    return digest.hexdigest()


def task_states(flow_state) -> dict[str, str]:
    """Task name → final state name, read back from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def pickled_results(home: Path) -> list[str]:
    """Files under a PREFECT_HOME (results, cache records, the server's database) naming pickle."""
    return [str(p) for p in sorted(Path(home).rglob("*"))
            if p.is_file() and PICKLE_SERIALIZER.search(p.read_bytes())]


def cache_records(home: Path) -> list[dict]:
    """The cache records ckptflow's cached stages left under a PREFECT_HOME."""
    import json

    return [json.loads(p.read_bytes()) for p in sorted((Path(home) / "storage" / "cache-records").glob("*"))
            if p.is_file()]


@pytest.fixture(scope="session")
def prefect_api_url(prefect_server) -> str:
    """The session's Prefect API, for subprocesses that should not start a server of their own."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """`python flows/train_pipeline.py` run as a Prefect user runs it: the defaults, no server.

    Shared by read-only tests. Returns the run directory and the process's combined output;
    Prefect's own files (PREFECT_HOME) are in `prefect_home` beside `runs`.
    """
    import subprocess
    import sys

    cwd = tmp_path_factory.mktemp("flow_file_run")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(cwd / "prefect_home")}
    env.pop("PREFECT_API_URL", None)  # ad-hoc use: Prefect's temporary local server
    result = subprocess.run([sys.executable, str(REPO / "flows" / "train_pipeline.py")],
                            capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "runs" / "default", result.stdout + result.stderr


def port_is_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def descendants(pid: int) -> set[int]:
    """Every process started by `pid` and still running, from /proc."""
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo.extend(children - found)
            found |= children
    return found


def alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists()
            and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()}


class BackgroundRun:
    """`ckptflow run` in the background, ad hoc (its own temporary Prefect server), watched:
    the processes it started, and its output."""

    def __init__(self, tmp_path: Path, name: str, args: list[str]):
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        self.log = tmp_path / f"{name}.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen([CKPTFLOW, *args], env=env, stdout=out,
                                            stderr=subprocess.STDOUT)
        self.started: set[int] = set()

    def said(self) -> str:
        return self.log.read_text()

    def wait_for(self, ready, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.started |= descendants(self.process.pid)
            assert self.process.poll() is None, f"ended before {what}: {self.said()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.05)
        self.started |= descendants(self.process.pid)

    def end(self, signal_number: int) -> tuple[int, float]:
        """Send the signal; the exit status and the seconds it took."""
        self.process.send_signal(signal_number)
        sent = time.monotonic()
        code = self.process.wait(timeout=120)
        return code, time.monotonic() - sent

    def left_behind(self) -> set[int]:
        """What it started that still runs 10 s after it ended (the kernel's SIGTERM to the
        temporary server of a SIGKILLed run, or a loader's own exit, takes a moment)."""
        deadline = time.monotonic() + 10
        while alive(self.started) and time.monotonic() < deadline:
            time.sleep(0.2)
        return alive(self.started)

    def server_port(self) -> int:
        return int(re.search(r"Starting temporary server on http://127.0.0.1:(\d+)",
                             self.said()).group(1))


# A real S3 API server for the object-storage tests: moto's server mode on 127.0.0.1.
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(**env: str) -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1 (`env`: its settings), until the block ends."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not port_is_open(port):
            assert server.poll() is None and time.monotonic() < deadline, "moto did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server for one test module."""
    with moto_server() as endpoint:
        yield endpoint


def port_is_open(port: int) -> bool:
    return not port_is_closed(port)


def s3(endpoint: str):
    """An s3fs client of the test server, with the test credentials."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, key=AWS["AWS_ACCESS_KEY_ID"],
                             secret=AWS["AWS_SECRET_ACCESS_KEY"], endpoint_url=endpoint)


def new_bucket(endpoint: str) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:10]}"
    s3(endpoint).mkdir(name)
    return name


def objects(endpoint: str, bucket: str) -> dict[str, str]:
    """Every object in the bucket and its ETag."""
    return {k.split("/", 1)[1]: v["ETag"] for k, v in s3(endpoint).find(bucket, detail=True).items()}


def machine(tmp_path: Path, name: str, endpoint: str) -> tuple[Path, dict]:
    """A working directory and environment of their own (HOME, temp, staging), as on another
    machine that shares only the store and the credentials."""
    root = tmp_path / name
    for sub in ("home", "staging", "cwd"):
        (root / sub).mkdir(parents=True)
    # Short: multiprocessing's forkserver (verify's loader) puts an AF_UNIX socket under TMPDIR,
    # and such paths end at 107 bytes on Linux.
    (root / "tmp").symlink_to(tempfile.mkdtemp(prefix=f"ckpt-{name}-"))
    env = {**os.environ, **AWS, "AWS_ENDPOINT_URL": endpoint, "HOME": str(root / "home"),
           "TMPDIR": os.readlink(root / "tmp"), "CKPTFLOW_STAGING_DIR": str(root / "staging"),
           "PREFECT_HOME": str(root / "prefect")}
    return root / "cwd", env
