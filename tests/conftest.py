"""Shared fixtures: one real Prefect test server per session, offline Keras, small configs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent


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
    """A config that trains in about a second: 256 images, 8 batches an epoch."""
    from tasks.config import TrainConfig

    values = dict(run_dir=str(run_dir), data="bundled", train_samples=256, test_samples=128,
                  batch_size=32, save_every_batches=3, epochs=2, units=64, seed=7)
    values.update(overrides)
    return TrainConfig(**values)


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, to prove nothing was changed."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def weights_digest(model) -> str:
    """SHA-256 over every variable of a model, in order (weights and seed-generator state)."""
    digest = hashlib.sha256()
    for v in model.variables:
        digest.update(v.numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def finished_run(prefect_server, tmp_path_factory):
    """One pipeline run through Prefect (2 epochs, bundled data), shared by read-only tests."""
    from flows.train_pipeline import train_pipeline

    run_dir = tmp_path_factory.mktemp("finished_run")
    summary = train_pipeline(small_config(run_dir, epochs=2))
    return run_dir, summary
