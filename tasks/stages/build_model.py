"""build-model: the run's untrained model, built once and kept as the run's starting point."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from ckptflow.config import TrainConfig
from ckptflow.core.files import publish, sha256_file
from ckptflow.core.formats import load_keras_model
from ckptflow.core.identity import check_same_model
from ckptflow.core.manifest import artifact_entry, read_manifest, set_artifacts, update_manifest
from ckptflow.core.run_dir import RunDir
from ckptflow.orchestration.retries import retry_options
from ckptflow.tutorial.model import build_from_identity

log = logging.getLogger("ckptflow.model")


class ModelRecord(BaseModel):
    """What build-model made: the untrained model file and what defines it."""

    path: str
    sha256: str
    parameters: int
    identity: dict


def build_model_stage(run_dir: str | Path, identity: dict) -> ModelRecord:
    """Build the model from `identity` (units, dropout, learning_rate, seed, ...) and save it.

    The untrained model is the run's starting point and the "untrained accuracy" baseline. A run
    directory keeps the model it was started with: a different request is refused.
    """
    run = RunDir(run_dir)
    path = run.initial_model
    recorded = read_manifest(run).get("model")
    check_same_model(run, recorded, identity)  # whether or not the file is still there
    if recorded and path.exists() and sha256_file(path) == recorded["sha256"]:
        return ModelRecord(**recorded)
    model = build_from_identity(identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.keras")
    model.save(tmp)
    publish(tmp, path)
    record = ModelRecord(path=run.relative(path), sha256=sha256_file(path),
                         parameters=model.count_params(), identity=identity)
    update_manifest(run, model=record.model_dump())
    set_artifacts(run, "model", [artifact_entry(run, path, "model", "keras")])
    log.info("model: %d parameters, saved untrained to %s", record.parameters, record.path)
    return record


def load_initial_model(run_dir: str | Path):
    """The run's untrained model, loaded from its file (this module registers its layers)."""
    return load_keras_model(RunDir(run_dir).initial_model)


@task(name="build-model", persist_result=False, **retry_options())
def build_model_task(config: TrainConfig) -> ModelRecord:
    """Build and save the untrained model; a run directory keeps the model it started with."""
    return build_model_stage(config.run_dir, config.identity())
