"""build-model: the run's untrained model, built once and kept as the run's starting point."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from ckptflow.config import TrainConfig
from ckptflow.core.files import publish, sha256_file
from ckptflow.core.identity import check_same_architecture, check_same_model
from ckptflow.core.manifest import artifact_entry, read_manifest, set_artifacts, update_manifest
from ckptflow.core.models import ModelSource, fingerprint, metric_names, seed_everything, weight_shapes
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import TEST_SPLITS, DataRecord, example_rows, load_snapshot
from ckptflow.orchestration.retries import retry_options

log = logging.getLogger("ckptflow.model")


class ModelRecord(BaseModel):
    """What build-model made: the untrained model file and what defines it."""

    path: str
    sha256: str
    parameters: int
    identity: dict
    fingerprint: str  # of the architecture and compile settings
    weight_shapes: list[list[int]]
    metrics: list[str]  # the compiled metrics' names (accuracy, mae, ...)


def build_model_stage(run_dir: str | Path, identity: dict, data: DataRecord) -> ModelRecord:
    """Build the model `identity` names and save it untrained: the run's starting point and
    baseline. Another model than the run directory started with (or changed code) is refused."""
    run = RunDir(run_dir)
    path = run.initial_model
    recorded = read_manifest(run).get("model")
    check_same_model(run, recorded, identity)  # whether or not the file is still there
    sample = load_snapshot(run.root / data.path, keys=TEST_SPLITS)
    source = ModelSource.from_identity(identity)
    seed_everything(source.seed, deterministic=False)  # the initial weights follow the seed
    model = source.build(*example_rows(sample))
    print_ = fingerprint(model)
    check_same_architecture(run, recorded, print_)
    if recorded and path.exists() and sha256_file(path) == recorded["sha256"]:
        return ModelRecord(**recorded)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp.keras")
        model.save(tmp)
        publish(tmp, path)
    record = ModelRecord(path=run.relative(path), sha256=sha256_file(path),
                         parameters=model.count_params(), identity=identity, fingerprint=print_,
                         weight_shapes=weight_shapes(model), metrics=metric_names(model))
    update_manifest(run, model=record.model_dump())
    set_artifacts(run, "model", [artifact_entry(run, path, "model", "keras")])
    log.info("model: %s, %d parameters, saved untrained to %s", type(model).__name__,
             record.parameters, record.path)
    return record


@task(name="build-model", persist_result=False, **retry_options())
def build_model_task(config: TrainConfig, data: DataRecord) -> ModelRecord:
    """Build and save the untrained model; a run directory keeps the model it started with."""
    return build_model_stage(config.run_dir, config.identity(), data)
