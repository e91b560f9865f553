"""resume-from-latest: where training continues, and a trained model restored from a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task

from ckptflow.config import TrainConfig
from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.errors import BadInputError
from ckptflow.core.manifest import read_manifest
from ckptflow.core.models import ModelSource
from ckptflow.core.resume_point import CheckpointRef, find_resume_point
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import TEST_SPLITS, example_rows, load_snapshot
from ckptflow.orchestration.retries import retry_options

log = logging.getLogger("ckptflow.resume")


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


@task(name="resume-from-latest", persist_result=False, **retry_options())
def resume_from_latest_task(config: TrainConfig, data_sha256: str) -> CheckpointRef | None:
    """Report where training will continue (the train task checks again on each attempt)."""
    point = find_resume_point(config.run_dir, config.identity(), data_sha256)
    if point is None:
        log.info("no checkpoint in %s: training starts from the untrained model", config.run_dir)
    else:
        log.info("latest valid checkpoint: %s (epoch %d, batch %d, step %d)", point.path,
                 point.epoch, point.batch, point.step)
    return point
