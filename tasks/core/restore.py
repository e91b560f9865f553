"""A run's model rebuilt for the stages that read a finished checkpoint, from what the run
recorded (never the current request), so a model is restored the way it was trained."""

from __future__ import annotations

from pathlib import Path

from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.errors import BadInputError
from ckptflow.core.manifest import read_manifest
from ckptflow.core.models import ModelSource
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import TEST_SPLITS, example_rows, load_snapshot


def restore_model(run_dir: str | Path, checkpoint: str):
    """A fresh model built from the checkpoint's own settings, with its weights and optimizer."""
    run = RunDir(run_dir)
    path = run.root / checkpoint
    store = CheckpointStore(path.parent)
    found = next((c for c in store.all() if c.path == path), None)
    problem = "missing" if found is None else store.verify(found)
    if problem:
        raise BadInputError(f"checkpoint {path} is unusable ({problem}). Run training again to make a "
                            "valid one.")
    model = fresh_model_factory(run, found.read_state()["identity"])()
    store.restore(found, model)
    return model


def fresh_model_factory(run_dir: str | Path, identity: dict):
    """A function building fresh, untrained models of the run's architecture, on its test rows."""
    run = RunDir(run_dir)
    sample = load_snapshot(run.root / read_manifest(run)["data"]["path"], keys=TEST_SPLITS)
    return ModelSource.from_identity(identity).factory(*example_rows(sample))
