"""Check a run request before anything is touched: seconds, not a training attempt.

`check_request` needs neither TensorFlow nor Prefect, so `ckptflow run` calls it before Prefect's
server starts; the stages repeat each check where they act on it.
"""

from __future__ import annotations

import tempfile

from ckptflow.config import TrainConfig
from ckptflow.core.errors import BadInputError
from ckptflow.core.formats import select_formats
from ckptflow.core.identity import check_same_data, check_same_model
from ckptflow.core.manifest import read_manifest
from ckptflow.core.object_store import ObjectStore, is_url
from ckptflow.core.remote_run import check_store
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import data_digest
from ckptflow.core.user_code import check_ref
from ckptflow.tutorial.data import load_mnist

# Read by the Keras loader, which needs TensorFlow (and maybe the network): left to fetch-data.
KERAS_SOURCES = ("auto", "keras")


def check_request(config: TrainConfig) -> None:
    """Refuse, with one BadInputError, a request that cannot succeed or would damage the run.
    For a run in an object store, its run-specific checks wait until the flow has pulled it."""
    select_formats(config.formats)  # a named format whose packages are missing
    check_ref(config.model, "--model")  # found, not imported: that needs TensorFlow
    if not config.uses_tutorial_data():
        check_ref(config.data, "--data")
    if config.callbacks is not None:
        check_ref(config.callbacks, "--callbacks")
    if is_url(config.run_dir):
        check_store(ObjectStore(config.run_dir))  # scheme and package checked as it opens
        return
    run = RunDir(config.run_dir)
    check_run_dir(run)
    manifest = read_manifest(run) if run.root.is_dir() else {}
    check_same_model(run, manifest.get("model"), config.identity())
    check_data(run, config, manifest.get("data"))


def check_run_dir(run: RunDir) -> None:
    """The run directory (or, for a new one, its nearest existing parent) must take files."""
    try:
        is_file = run.root.exists() and not run.root.is_dir()
        existing = next(p for p in [run.root, *run.root.absolute().parents] if p.exists())
    except PermissionError as exc:  # a parent this user may not even look into
        raise BadInputError(f"run directory {run} cannot be reached ({exc.strerror}: "
                            f"{exc.filename}). Fix its permissions, or choose another "
                            "--run-dir.") from exc
    if is_file:
        raise BadInputError(f"run directory {run} is a file. Received: --run-dir {run}. Give a "
                            "directory (it is created if missing), or move the file aside.")
    if not existing.is_dir():
        raise BadInputError(f"run directory {run} cannot be created: {existing} is a file. "
                            "Choose another --run-dir.")
    try:  # a real write, not os.access: root passes access checks on read-only file systems
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ckptflow-write-test-"):
            pass
    except OSError as exc:
        what = "run directory" if existing == run.root else "parent directory"
        raise BadInputError(f"{what} {existing} is not writable ({exc.strerror}). Fix its "
                            "permissions, or choose another --run-dir.") from exc


def check_data(run: RunDir, config: TrainConfig, recorded: dict | None) -> None:
    """A data file (or the bundled images), read and validated, must be the data the run holds."""
    request = config.data_request()
    if recorded and recorded.get("request") == request:
        return
    if config.data in KERAS_SOURCES or not config.uses_tutorial_data():
        return  # read by fetch-data, which refuses other data before writing anything
    arrays, _, _ = load_mnist(config.data, config.train_samples, config.test_samples, config.seed)
    check_same_data(run, recorded, (recorded or {}).get("data_sha256"), request,
                    data_digest(arrays))
