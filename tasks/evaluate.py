"""evaluate: test accuracy of the latest checkpoint beside the untrained model's, as the tutorial shows."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks.config import TrainConfig
from tasks.data import DataRecord, load_snapshot
from tasks.files import atomic_write_bytes, sha256_file
from tasks.manifest import artifact_entry, read_manifest, set_artifacts, update_manifest
from tasks.model import INITIAL_MODEL, load_keras_model
from tasks.policy import cache_while_present, retry_options
from tasks.resume import CheckpointRef, restore_model

log = logging.getLogger("ckptflow.evaluate")

EVALUATION = Path("metrics") / "evaluation.csv"


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

    run_dir = Path(run_dir)
    recorded = read_manifest(run_dir).get("evaluation")
    if (recorded and recorded["checkpoint"] == checkpoint.path
            and recorded.get("commit_sha256") == checkpoint.commit_sha256
            and recorded.get("csv_sha256") == _sha_or_none(run_dir / EVALUATION)):
        log.info("evaluation of %s already on disk: reusing it", checkpoint.path)
        return EvaluationRecord(**recorded)
    arrays = load_snapshot(run_dir / data.path, keys=("x_test", "y_test"))
    x, y = arrays["x_test"], arrays["y_test"]
    results = {}
    for name, model in (("untrained", load_keras_model(run_dir / INITIAL_MODEL)),
                        ("trained", restore_model(run_dir, checkpoint.path))):
        results[name] = model.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)
    record = EvaluationRecord(
        checkpoint=checkpoint.path, epoch=checkpoint.epoch,
        test_loss=float(results["trained"]["loss"]),
        test_accuracy=float(results["trained"]["accuracy"]),
        untrained_loss=float(results["untrained"]["loss"]),
        untrained_accuracy=float(results["untrained"]["accuracy"]),
        path=EVALUATION.as_posix())
    rows = evaluation_rows(record)
    buffer = io.StringIO()
    pd.DataFrame(rows).to_csv(buffer, index=False)
    atomic_write_bytes(run_dir / EVALUATION, buffer.getvalue().encode())
    update_manifest(run_dir, evaluation={**record.model_dump(),
                                         "commit_sha256": checkpoint.commit_sha256,
                                         "csv_sha256": sha256_file(run_dir / EVALUATION)})
    set_artifacts(run_dir, "evaluation", [artifact_entry(run_dir, run_dir / EVALUATION,
                                                         "evaluation", "csv")])
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
      cache_key_fn=cache_while_present(lambda p: [Path(p["config"].run_dir) / EVALUATION]))
def evaluate_task(config: TrainConfig, data: DataRecord, checkpoint: CheckpointRef) -> EvaluationRecord:
    """Evaluate the latest checkpoint; skipped while its evaluation is on disk for this checkpoint."""
    from tasks.reporting import publish_evaluation

    record = evaluate(config.run_dir, data, checkpoint)
    summary = (f"## {config.run_dir}: evaluation\n\n"
               f"| model | checkpoint | test accuracy |\n|---|---|---|\n"
               f"| untrained | model/initial.keras | {record.untrained_accuracy:.2%} |\n"
               f"| trained ({record.epoch} epochs) | {record.checkpoint} | "
               f"{record.test_accuracy:.2%} |\n")
    publish_evaluation(config.run_dir, evaluation_rows(record), summary)
    return record
