"""Where training continues: the newest valid checkpoint, checked to belong to this run."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from ckptflow.core.checkpoints import Checkpoint, CheckpointStore
from ckptflow.core.errors import BadInputError, describe_difference
from ckptflow.core.run_dir import RunDir


class CheckpointRef(BaseModel):
    """A committed checkpoint as later stages and Prefect cache keys see it: where and which."""

    path: str
    commit_sha256: str
    epoch: int
    batch: int
    step: int


def find_resume_point(run_dir: str | Path, identity: dict, data_sha256: str) -> CheckpointRef | None:
    """The latest valid checkpoint of `run_dir`, or None for a run that has none yet; refused if
    made with other settings or data, or if every one is damaged (zero would discard work)."""
    run = RunDir(run_dir)
    store = CheckpointStore(run.checkpoints)
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
        changed = describe_difference(state.get("identity") or {}, identity, before="checkpoint has")
        raise BadInputError(
            f"run directory {run} was trained with other settings ({changed}). Use another "
            "--run-dir, or the settings the run was started with.")
    if state.get("data_sha256") != data_sha256:
        raise BadInputError(
            f"run directory {run} was trained on other data (sha256 "
            f"{str(state.get('data_sha256'))[:12]}, now {data_sha256[:12]}). Use another --run-dir.")
    return checkpoint_ref(run, latest)


def checkpoint_ref(run_dir: str | Path, checkpoint: Checkpoint) -> CheckpointRef:
    """The reference of `checkpoint`, its path relative to the run directory."""
    return CheckpointRef(path=RunDir(run_dir).relative(checkpoint.path),
                         commit_sha256=checkpoint.commit_sha256(), epoch=checkpoint.epoch,
                         batch=checkpoint.batch, step=checkpoint.step)
