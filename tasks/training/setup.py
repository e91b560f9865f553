"""What every training attempt shares: start a run (fresh or resumed), close epochs, finish with a record."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from ckptflow.config import TrainConfig
from ckptflow.core.checkpoints import Checkpoint, CheckpointStore
from ckptflow.core.datasets import training_pipeline
from ckptflow.core.errors import BadInputError
from ckptflow.core.files import atomic_write_bytes
from ckptflow.core.manifest import artifact_entry, read_manifest, set_artifacts, update_manifest
from ckptflow.core.mirror import location_of
from ckptflow.core.models import ModelSource, seed_everything
from ckptflow.core.resume_point import CheckpointRef, find_resume_point
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import TRAIN_WEIGHTS, Arrays, DataRecord, example_rows, load_verified
from ckptflow.training.batches import ArrayBatches, PipelineBatches
from ckptflow.training.callbacks import Callbacks
from ckptflow.training.faults import maybe_fail_after_epoch
from ckptflow.training.state import TrainState

log = logging.getLogger("ckptflow.train")

EpochCallback = Callable[[dict[str, Any], TrainState], None]
BatchCallback = Callable[[TrainState], None]


class TrainRecord(BaseModel):
    """What train-with-checkpoints left: the final checkpoint and how this attempt got there."""

    checkpoint: str
    commit_sha256: str
    epoch: int
    batch: int
    step: int
    resumed_from: str | None
    start_epoch: int
    start_batch: int
    batches_trained: int
    best_val_accuracy: float | None
    history_path: str
    stopped_early: dict[str, Any] | None = None  # {"epoch", "by"}: a callback ended training

    def checkpoint_ref(self) -> CheckpointRef:
        """The final checkpoint alone: what evaluation and export depend on."""
        return CheckpointRef(path=self.checkpoint, commit_sha256=self.commit_sha256,
                             epoch=self.epoch, batch=self.batch, step=self.step)


@dataclass
class TrainingStart:
    """A training attempt as it begins: its model, batches, callbacks and test arrays, its
    state, and the checkpoint it resumed from."""

    model: object
    batches: ArrayBatches | PipelineBatches
    callbacks: Callbacks
    arrays: Arrays
    state: TrainState
    resumed: Checkpoint | None
    resumed_from: str | None
    start_epoch: int
    start_batch: int
    start_step: int


def optimizer_step(model) -> int:
    """The optimizer's iteration count (`.numpy()`: int() alone refuses a MirroredVariable)."""
    return int(model.optimizer.iterations.numpy())


def start_training(run: RunDir, config: TrainConfig, data: DataRecord, strategy=None,
                   announce: bool = True) -> TrainingStart:
    """Seed (the one place training does), build the run's model (in `strategy`'s scope, if
    given) and batches, and load the untrained weights or the latest valid checkpoint."""
    arrays = load_verified(run.root / data.path, data)
    seed_everything(config.seed, config.deterministic)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = ModelSource.from_identity(config.identity()).build(*example_rows(arrays))
    batches = batch_source(config, data, arrays)
    point = find_resume_point(run, config.identity(), data.data_sha256)
    if point is None:
        model.load_weights(run.initial_model)
        state = TrainState.fresh(config.identity(), data.data_sha256, config.model_dump())
        resumed = None
    else:  # every worker of a strategy restores from the chief's committed checkpoint
        resumed = Checkpoint(run.root / point.path, point.epoch, point.batch, point.step)
        store = CheckpointStore(run.checkpoints)
        state = TrainState.from_json(resumed.read_state())
        store.restore(resumed, model, training_trackables(
            model, batches.resumed_at(state.step, state.pipeline_replay)))
        state.config = config.model_dump()
    state.pipeline_replay = isinstance(batches, PipelineBatches) and batches.replay  # its saves
    if optimizer_step(model) != state.step:
        raise RuntimeError(f"{resumed.path if resumed else run.initial_model}: optimizer restored "
                           f"at step {optimizer_step(model)}, state says {state.step}")
    if announce and resumed is not None:
        log.info("resuming from %s: epoch %d, batch %d, optimizer step %d", resumed.name,
                 state.epoch, state.batch, state.step)
    if announce and state.stopped_early is not None:
        log.info("run was stopped early by %s after epoch %d: nothing to train",
                 state.stopped_early["by"], state.stopped_early["epoch"])
    elif announce and state.epoch >= config.epochs:
        log.info("run already has %d epochs (asked for %d): nothing to train", state.epoch,
                 config.epochs)
    callbacks = Callbacks.build(config.callbacks, config.callbacks_params, config.seed, model,
                                config.epochs, batches.steps)
    return TrainingStart(model=model, batches=batches, callbacks=callbacks, arrays=arrays,
                         state=state,
                         resumed=resumed, resumed_from=point.path if point else None,
                         start_epoch=state.epoch, start_batch=state.batch, start_step=state.step)


def batch_source(config: TrainConfig, data: DataRecord, arrays: Arrays
                 ) -> ArrayBatches | PipelineBatches:
    """The snapshot's training arrays, or the data function's pipeline rebuilt."""
    if data.kind != "pipeline":
        weights = arrays.pop(TRAIN_WEIGHTS, None)
        if weights is not None and config.class_weight is not None:
            raise BadInputError(f"--data {data.source} gives {TRAIN_WEIGHTS} and class_weight is "
                                "given too. Give one of them.")
        return ArrayBatches(arrays.pop("x_train"), arrays.pop("y_train"), config.seed,
                            config.batch_size, weights, config.class_weight, data.source)
    source = data.request["source"]
    train = training_pipeline(source, data.request.get("data_params") or {}, data.request["seed"])
    return PipelineBatches(train, data.train_samples, config.batch_size, source,
                           config.class_weight, replay=config.pipeline_resume == "replay")


def training_trackables(model, position: dict) -> dict:
    """What a checkpoint holds beside the model: the unfinished epoch's metrics, and `position`,
    the batches' (a pipeline's iterator, unless it is replayed)."""
    return {"metrics": model.metrics_variables, **position}


class EpochOutputs:
    """What each committed epoch leaves beside its checkpoint (the chief's only)."""

    def __init__(self, run: RunDir, config: TrainConfig, state: TrainState,
                 on_epoch_end: EpochCallback | None):
        import tensorflow as tf

        self.run, self.config, self.on_epoch_end = run, config, on_epoch_end
        self.summaries = (tf.summary.create_file_writer(str(run.tensorboard))
                          if state.epoch < config.epochs and state.stopped_early is None
                          else None)

    def epoch_committed(self, state: TrainState, row: dict[str, Any], checkpoint: str) -> None:
        """Once the epoch's checkpoint is committed: history, TensorBoard, log, callback, drill."""
        write_history(self.run, state.history)
        self._write_tensorboard(row)
        log.info("epoch %d/%d: %s (checkpoint %s)", row["epoch"], self.config.epochs,
                 ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"), checkpoint)
        if self.on_epoch_end is not None:
            self.on_epoch_end(row, state)
        maybe_fail_after_epoch(self.run, self.config, state.epoch)

    def close(self) -> None:
        if self.summaries is not None:
            self.summaries.close()

    def _write_tensorboard(self, row: dict[str, Any]) -> None:
        """Per-epoch scalars for `tensorboard --logdir RUN_DIR/tensorboard`, named as Keras'
        callback names them (train/epoch_loss, validation/epoch_accuracy, ...)."""
        import tensorflow as tf

        with self.summaries.as_default():
            for name in (k for k in row if k != "epoch"):
                split = "validation" if name.startswith("val_") else "train"
                tf.summary.scalar(f"{split}/epoch_{name.removeprefix('val_')}", row[name],
                                  step=row["epoch"])
        self.summaries.flush()


def write_history(run: RunDir, history: list[dict[str, Any]]) -> None:
    """The per-epoch history as `metrics/history.csv`, atomically."""
    import pandas as pd

    buffer = io.StringIO()  # a callback may add a column from some epoch on (learning_rate)
    columns = list(dict.fromkeys(k for row in history for k in row)) or ["epoch", "loss",
                                                                         "val_loss"]
    pd.DataFrame(history, columns=columns).to_csv(buffer, index=False)
    atomic_write_bytes(run.history, buffer.getvalue().encode())


def finish_training(run: RunDir, config: TrainConfig, store: CheckpointStore, start: TrainingStart,
                    state: TrainState, latest: Checkpoint, **attempt: Any) -> TrainRecord:
    """Write the history and the manifest's training section (`attempt`: more fields of this
    attempt's entry); return the stage's record."""
    write_history(run, state.history)  # also after a kill between checkpoint and CSV
    record = TrainRecord(
        checkpoint=run.relative(latest.path), commit_sha256=latest.commit_sha256(),
        epoch=state.epoch, batch=latest.batch, step=state.step, resumed_from=start.resumed_from,
        start_epoch=start.start_epoch, start_batch=start.start_batch,
        batches_trained=state.step - start.start_step,
        best_val_accuracy=state.best.get("val_accuracy"), history_path=run.relative(run.history),
        stopped_early=state.stopped_early)
    attempts = read_manifest(run).get("training", {}).get("attempts", [])
    attempts.append({
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "resumed_from": record.resumed_from, "start_epoch": record.start_epoch,
        "start_batch": record.start_batch, "end_epoch": record.epoch,
        "batches_trained": record.batches_trained, **attempt,
    })
    update_manifest(run, parameters={**config.model_dump(), "run_dir": location_of(config.run_dir)},
                    training={**record.model_dump(), "attempts": attempts})
    set_artifacts(run, "checkpoint", [  # only checkpoints that match their commit records
        artifact_entry(run, c.path, "checkpoint", "ckptflow-checkpoint", epoch=c.epoch,
                       batch=c.batch, step=c.step) for c in store.all() if store.verify(c) is None])
    set_artifacts(run, "history", [artifact_entry(run, run.history, "history", "csv")])
    set_artifacts(run, "tensorboard", [
        artifact_entry(run, run.tensorboard, "tensorboard", "tfevents")]
        if run.tensorboard.is_dir() else [])
    return record
