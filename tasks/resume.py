"""resume-from-latest: find the newest valid checkpoint and check that it belongs to this run."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks.checkpoints import Checkpoint, CheckpointStore
from tasks.config import TrainConfig
from tasks.errors import BadInputError
from tasks.policy import retry_options

log = logging.getLogger("ckptflow.resume")

CHECKPOINTS = Path("checkpoints")


class CheckpointRef(BaseModel):
    """A committed checkpoint as later stages and Prefect cache keys see it: where and which."""

    path: str
    commit_sha256: str
    epoch: int
    batch: int
    step: int


def find_resume_point(run_dir: str | Path, identity: dict, data_sha256: str) -> CheckpointRef | None:
    """The latest valid checkpoint of `run_dir`, or None for a run that has none yet.

    Refuses (BadInputError) a checkpoint made with other model settings or other data, and a
    checkpoint directory whose commit records are all gone: restarting from zero there would
    silently discard trained work.
    """
    run_dir = Path(run_dir)
    store = CheckpointStore(run_dir / CHECKPOINTS)
    latest = store.latest()
    if latest is None:
        damaged = store.uncommitted() + [c.path for c in store.all()]
        if damaged:
            raise BadInputError(
                f"no valid checkpoint in {store.directory}: {len(damaged)} checkpoint(s) are "
                f"damaged or lack commit records (e.g. {damaged[-1].name}). Restore them from a "
                "backup, or move the checkpoints directory aside to train from zero.")
        return None
    state = latest.read_state()
    if state.get("identity") != identity:
        changed = ", ".join(f"{k}: checkpoint has {state.get('identity', {}).get(k)!r}, "
                            f"requested {identity.get(k)!r}"
                            for k in identity if state.get("identity", {}).get(k) != identity[k])
        raise BadInputError(
            f"run directory {run_dir} was trained with other settings ({changed}). Use another "
            "--run-dir, or the settings the run was started with.")
    if state.get("data_sha256") != data_sha256:
        raise BadInputError(
            f"run directory {run_dir} was trained on other data (sha256 "
            f"{str(state.get('data_sha256'))[:12]}, now {data_sha256[:12]}). Use another --run-dir.")
    return checkpoint_ref(run_dir, latest)


def checkpoint_ref(run_dir: Path, checkpoint: Checkpoint) -> CheckpointRef:
    """The reference of `checkpoint`, its path relative to the run directory."""
    return CheckpointRef(path=checkpoint.path.relative_to(run_dir).as_posix(),
                         commit_sha256=checkpoint.commit_sha256(), epoch=checkpoint.epoch,
                         batch=checkpoint.batch, step=checkpoint.step)


@task(name="resume-from-latest", **retry_options())
def resume_from_latest_task(config: TrainConfig, data_sha256: str) -> CheckpointRef | None:
    """Report where training will continue (the train task checks again on each attempt)."""
    point = find_resume_point(config.run_dir, config.identity(), data_sha256)
    if point is None:
        log.info("no checkpoint in %s: training starts from the untrained model", config.run_dir)
    else:
        log.info("latest valid checkpoint: %s (epoch %d, batch %d, step %d)", point.path,
                 point.epoch, point.batch, point.step)
    return point


def restore_model(run_dir: str | Path, checkpoint: str):
    """A fresh model built from the checkpoint's own settings, with its weights and optimizer."""
    from tasks.model import build_from_identity  # lazy: TensorFlow only where a model is needed

    run_dir = Path(run_dir)
    path = run_dir / checkpoint
    store = CheckpointStore(path.parent)
    found = next((c for c in store.all() if c.path == path), None)
    problem = "missing" if found is None else store.verify(found)
    if problem:
        raise BadInputError(f"checkpoint {path} is unusable ({problem}). Run training again to make a "
                            "valid one.")
    model = build_from_identity(found.read_state()["identity"])
    store.restore(found, model)
    return model
