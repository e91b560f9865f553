"""resume-from-latest: where training continues, and a trained model restored from a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task

from ckptflow.config import TrainConfig
from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.errors import BadInputError
from ckptflow.core.resume_point import CheckpointRef, find_resume_point
from ckptflow.core.run_dir import RunDir
from ckptflow.orchestration.retries import retry_options

log = logging.getLogger("ckptflow.resume")


def restore_model(run_dir: str | Path, checkpoint: str):
    """A fresh model built from the checkpoint's own settings, with its weights and optimizer."""
    from ckptflow.tutorial.model import build_from_identity  # lazy: TensorFlow only where needed

    path = RunDir(run_dir).root / checkpoint
    store = CheckpointStore(path.parent)
    found = next((c for c in store.all() if c.path == path), None)
    problem = "missing" if found is None else store.verify(found)
    if problem:
        raise BadInputError(f"checkpoint {path} is unusable ({problem}). Run training again to make a "
                            "valid one.")
    model = build_from_identity(found.read_state()["identity"])
    store.restore(found, model)
    return model


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
