"""evaluate: the latest checkpoint's test loss and metrics beside the untrained model's, as the
tutorial shows (its accuracy; a user's model reports its own metrics, `mae` for a regression)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from ckptflow.config import TrainConfig
from ckptflow.core.files import atomic_write_bytes, sha256_file
from ckptflow.core.manifest import (
    artifact_entry,
    checkpoint_cost,
    read_manifest,
    set_artifacts,
    update_manifest,
)
from ckptflow.core.mirror import location_of
from ckptflow.core.models import describe_metrics, evaluation_batch_size
from ckptflow.core.restore import fresh_model_factory, restore_model
from ckptflow.core.resume_point import CheckpointRef
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import TEST_SPLITS, DataRecord, load_snapshot
from ckptflow.orchestration.caching import cache_while_present
from ckptflow.orchestration.results import result_record
from ckptflow.orchestration.retries import retry_options

log = logging.getLogger("ckptflow.evaluate")


@result_record
class EvaluationRecord(BaseModel):
    """Test loss and metrics of the trained and the untrained model."""

    checkpoint: str
    epoch: int
    test_loss: float
    test_accuracy: float | None = None  # where the model has an accuracy metric
    untrained_loss: float
    untrained_accuracy: float | None = None
    test_metrics: dict[str, float] = {}  # every compiled metric, loss included
    untrained_metrics: dict[str, float] = {}
    path: str


def evaluate(run_dir: str | Path, data: DataRecord, checkpoint: CheckpointRef) -> EvaluationRecord:
    """Restore `checkpoint.path` into a fresh model and evaluate both it and the untrained one."""
    import pandas as pd

    run = RunDir(run_dir)
    recorded = read_manifest(run).get("evaluation")
    if (recorded and recorded["checkpoint"] == checkpoint.path
            and recorded.get("commit_sha256") == checkpoint.commit_sha256
            and run.evaluation.is_file()
            and recorded.get("csv_sha256") == sha256_file(run.evaluation)):
        log.info("evaluation of %s already on disk: reusing it", checkpoint.path)
        return EvaluationRecord(**recorded)
    arrays = load_snapshot(run.root / data.path, keys=TEST_SPLITS)
    x, y = arrays["x_test"], arrays["y_test"]
    untrained = fresh_model_factory(run, read_manifest(run)["model"]["identity"])()
    untrained.load_weights(run.initial_model)
    results = {}
    for name, model in (("untrained", untrained), ("trained", restore_model(run, checkpoint.path))):
        results[name] = {k: float(v) for k, v in model.evaluate(
            x, y, batch_size=evaluation_batch_size(), verbose=0, return_dict=True).items()}
    trained, baseline = results["trained"], results["untrained"]
    record = EvaluationRecord(
        checkpoint=checkpoint.path, epoch=checkpoint.epoch, test_loss=trained["loss"],
        test_accuracy=trained.get("accuracy"), untrained_loss=baseline["loss"],
        untrained_accuracy=baseline.get("accuracy"), test_metrics=trained,
        untrained_metrics=baseline, path=run.relative(run.evaluation))
    rows = evaluation_rows(record)
    buffer = io.StringIO()
    pd.DataFrame(rows).to_csv(buffer, index=False)
    atomic_write_bytes(run.evaluation, buffer.getvalue().encode())
    # The evaluation section last: a rerun reuses the CSV only once it is recorded, and a kill
    # between the two writes must not leave a reused CSV without its (or with an old) entry.
    set_artifacts(run, "evaluation", [artifact_entry(run, run.evaluation, "evaluation", "csv")])
    update_manifest(run, evaluation={**record.model_dump(),
                                     "commit_sha256": checkpoint.commit_sha256,
                                     "csv_sha256": sha256_file(run.evaluation)})
    log.info("untrained model: %s; trained (%s, epoch %d): %s",
             describe_metrics(record.untrained_metrics), checkpoint.path, checkpoint.epoch,
             describe_metrics(record.test_metrics))
    return record


def evaluation_rows(record: EvaluationRecord) -> list[dict]:
    """The evaluation as table rows, a `test_` column per metric (plain dicts: Prefect tables
    take no DataFrames)."""
    return [
        {"model": "untrained", "checkpoint": "model/initial.keras", "epoch": 0,
         **{f"test_{k}": round(v, 4) for k, v in record.untrained_metrics.items()}},
        {"model": "trained", "checkpoint": record.checkpoint, "epoch": record.epoch,
         **{f"test_{k}": round(v, 4) for k, v in record.test_metrics.items()}},
    ]


@task(name="evaluate", **retry_options(),
      **cache_while_present(lambda p: [RunDir(p["config"].run_dir).evaluation]))
def evaluate_task(config: TrainConfig, data: DataRecord, checkpoint: CheckpointRef) -> EvaluationRecord:
    """Evaluate the latest checkpoint; skipped while its evaluation is on disk for this checkpoint."""
    from ckptflow.orchestration.artifacts import publish_evaluation

    record = evaluate(config.run_dir, data, checkpoint)
    summary = (f"## {location_of(config.run_dir)}: evaluation\n\n"
               f"| model | checkpoint | test metrics |\n|---|---|---|\n"
               f"| untrained | model/initial.keras | {describe_metrics(record.untrained_metrics)} |\n"
               f"| trained ({record.epoch} epochs) | {record.checkpoint} | "
               f"{describe_metrics(record.test_metrics)} |\n")
    if cost := checkpoint_cost(read_manifest(config.run_dir).get("training", {})):
        summary += f"\nTraining: {cost}.\n"
    publish_evaluation(config.run_dir, evaluation_rows(record), summary)
    return record
