"""evaluate: test accuracy of the latest checkpoint beside the untrained model's, as the tutorial shows."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from ckptflow.config import TrainConfig
from ckptflow.core.files import atomic_write_bytes, sha256_file
from ckptflow.core.manifest import artifact_entry, read_manifest, set_artifacts, update_manifest
from ckptflow.core.resume_point import CheckpointRef
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import DataRecord, load_snapshot
from ckptflow.orchestration.caching import cache_while_present
from ckptflow.orchestration.results import result_record
from ckptflow.orchestration.retries import retry_options
from ckptflow.stages.build_model import load_initial_model
from ckptflow.stages.resume import restore_model

log = logging.getLogger("ckptflow.evaluate")


@result_record
class EvaluationRecord(BaseModel):
    """Test metrics of the trained and the untrained model."""

    checkpoint: str
    epoch: int
    test_loss: float
    test_accuracy: float
    untrained_loss: float
    untrained_accuracy: float
    path: str


def evaluate(run_dir: str | Path, data: DataRecord, checkpoint: CheckpointRef) -> EvaluationRecord:
    """Restore `checkpoint.path` into a fresh model and evaluate both it and the untrained one."""
    import pandas as pd

    run = RunDir(run_dir)
    recorded = read_manifest(run).get("evaluation")
    if (recorded and recorded["checkpoint"] == checkpoint.path
            and recorded.get("commit_sha256") == checkpoint.commit_sha256
            and recorded.get("csv_sha256") == _sha_or_none(run.evaluation)):
        log.info("evaluation of %s already on disk: reusing it", checkpoint.path)
        return EvaluationRecord(**recorded)
    arrays = load_snapshot(run.root / data.path, keys=("x_test", "y_test"))
    x, y = arrays["x_test"], arrays["y_test"]
    results = {}
    for name, model in (("untrained", load_initial_model(run)),
                        ("trained", restore_model(run, checkpoint.path))):
        results[name] = model.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)
    record = EvaluationRecord(
        checkpoint=checkpoint.path, epoch=checkpoint.epoch,
        test_loss=float(results["trained"]["loss"]),
        test_accuracy=float(results["trained"]["accuracy"]),
        untrained_loss=float(results["untrained"]["loss"]),
        untrained_accuracy=float(results["untrained"]["accuracy"]),
        path=run.relative(run.evaluation))
    rows = evaluation_rows(record)
    buffer = io.StringIO()
    pd.DataFrame(rows).to_csv(buffer, index=False)
    atomic_write_bytes(run.evaluation, buffer.getvalue().encode())
    update_manifest(run, evaluation={**record.model_dump(),
                                     "commit_sha256": checkpoint.commit_sha256,
                                     "csv_sha256": sha256_file(run.evaluation)})
    set_artifacts(run, "evaluation", [artifact_entry(run, run.evaluation, "evaluation", "csv")])
    log.info("untrained model: accuracy %.1f%%; trained (%s, epoch %d): accuracy %.1f%%",
             100 * record.untrained_accuracy, checkpoint.path, checkpoint.epoch,
             100 * record.test_accuracy)
    return record


def _sha_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def evaluation_rows(record: EvaluationRecord) -> list[dict]:
    """The evaluation as table rows (plain dicts: Prefect tables take no DataFrames)."""
    return [
        {"model": "untrained", "checkpoint": "model/initial.keras", "epoch": 0,
         "test_loss": round(record.untrained_loss, 4),
         "test_accuracy": round(record.untrained_accuracy, 4)},
        {"model": "trained", "checkpoint": record.checkpoint, "epoch": record.epoch,
         "test_loss": round(record.test_loss, 4), "test_accuracy": round(record.test_accuracy, 4)},
    ]


@task(name="evaluate", **retry_options(),
      **cache_while_present(lambda p: [RunDir(p["config"].run_dir).evaluation]))
def evaluate_task(config: TrainConfig, data: DataRecord, checkpoint: CheckpointRef) -> EvaluationRecord:
    """Evaluate the latest checkpoint; skipped while its evaluation is on disk for this checkpoint."""
    from ckptflow.orchestration.artifacts import publish_evaluation

    record = evaluate(config.run_dir, data, checkpoint)
    summary = (f"## {config.run_dir}: evaluation\n\n"
               f"| model | checkpoint | test accuracy |\n|---|---|---|\n"
               f"| untrained | model/initial.keras | {record.untrained_accuracy:.2%} |\n"
               f"| trained ({record.epoch} epochs) | {record.checkpoint} | "
               f"{record.test_accuracy:.2%} |\n")
    publish_evaluation(config.run_dir, evaluation_rows(record), summary)
    return record
