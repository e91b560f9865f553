"""The training loop, for one device and under a tf.distribute strategy alike.

Batch by batch from wherever training stands: Keras 3 `fit` cannot start an epoch mid-way, nor
continue a tf.data iterator. The epoch's metrics are the model's metric objects, saved in every
checkpoint, so a resumed run writes the history an uninterrupted one writes. A SIGTERM or SIGINT
ends training before the next batch, with a checkpoint committed there. The user's callbacks are
called where `fit` calls them, validation's `on_test_*` hooks included (an epoch resumed mid-way
has begun already: no second `on_epoch_begin`), and one that sets `model.stop_training` ends
training as `fit` ends it. What differs between strategies is an adapter with the methods of
`OneDevice` (`Replicas`: under a strategy).
"""

from __future__ import annotations

import copy
import logging
import numbers
from collections.abc import Callable

from ckptflow.config import TrainConfig
from ckptflow.core.checkpoint_saves import CheckpointSaves, SavePolicy
from ckptflow.core.checkpoints import Checkpoint, CheckpointStore, CheckpointWriteError
from ckptflow.core.models import ModelSource, evaluation_batch_size
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import DataRecord, example_rows, validation_split
from ckptflow.training.faults import maybe_io_error_at_step
from ckptflow.training.setup import (
    BatchCallback,
    EpochCallback,
    EpochOutputs,
    TrainingStart,
    TrainRecord,
    finish_training,
    optimizer_step,
    start_training,
    training_trackables,
)
from ckptflow.training.stop import (
    GracefulStop,
    stopped_after_training,
    stopped_in_training,
    stopped_without_checkpoint,
)

log = logging.getLogger("ckptflow.train")


def train_on_one_device(run: RunDir, config: TrainConfig, data: DataRecord,
                        on_epoch_end: EpochCallback | None = None,
                        on_batch_end: BatchCallback | None = None) -> TrainRecord:
    """Train until `config.epochs`, holding the run directory's lock (the caller takes it); a
    SIGTERM or SIGINT raises StopRequested once the batch reached is committed."""
    start = start_training(run, config, data)
    store = CheckpointStore(run.checkpoints, keep=config.keep_checkpoints,
                            keras_files=config.epoch_keras_files)
    saves = CheckpointSaves(
        store, SavePolicy(config.save_every_batches, config.checkpoint_budget),
        keras_model=ModelSource.from_identity(config.identity()).factory(
            *example_rows(start.arrays)),
        extra=training_trackables(start.model, start.batches.trackables()),
        background=config.background_checkpoints, latest=start.resumed)
    loop = TrainingLoop(run, config, start, OneDevice(start), saves, on_epoch_end, on_batch_end)
    with GracefulStop(config.stop_grace_seconds) as stop:
        loop.train(stop)
    return loop.finish(stop.requested)


class OneDevice:
    """One device: each batch is `model.train_function(iterator)`, the very step `fit` runs, on
    an iterator that knows where training stands (`ckptflow.training.batches`)."""

    chief = True

    def __init__(self, start: TrainingStart):
        self.model, self.batches = start.model, start.batches
        self.model.make_train_function()

    def epoch_steps(self, epoch: int, batch: int) -> Callable[[int], dict]:
        """A function that trains one batch and returns the step's logs."""
        iterator = self.batches.iterator(epoch, batch)
        return lambda _: self.model.train_function(iterator)

    def agree_to_stop(self, stop: GracefulStop) -> str | None:
        return stop.requested

    def validation_model(self):
        return self.model

    def beat(self, doing: str) -> None:
        pass  # no other worker to wait for

    def attempt_fields(self, costs: dict) -> dict:
        return {"checkpoints": costs}


class TrainingLoop:
    """One training attempt, in every worker alike (the chief also writes the run directory)."""

    def __init__(self, run: RunDir, config: TrainConfig, start: TrainingStart, strategy,
                 saves: CheckpointSaves, on_epoch_end: EpochCallback | None,
                 on_batch_end: BatchCallback | None):
        self.run, self.config, self.start, self.strategy, self.saves = (
            run, config, start, strategy, saves)
        self.model, self.state, self.steps = start.model, start.state, start.batches.steps
        self.callbacks = start.callbacks
        self.on_batch_end = on_batch_end if strategy.chief else None
        self.outputs = (EpochOutputs(run, config, self.state, on_epoch_end)
                        if strategy.chief else None)
        self.stopping: str | None = None  # the stop every worker agreed on

    def train(self, stop: GracefulStop) -> None:
        """Train to `config.epochs`, or commit where a stop finds training and raise StopRequested."""
        try:
            self.callbacks.begin(self.state.callbacks)
            while self.state.epoch < self.config.epochs and self.state.stopped_early is None:
                self.train_rest_of_epoch(stop)
                if self.agreed_stop(stop):
                    self.stop_here(self.stopping)
                self.close_epoch()
            self.saves.wait()
            self.callbacks.on_train_end(logs=self.last_logs())
        finally:  # when the attempt fails: the commit in flight lands (a signal meanwhile only
            self.saves.close()  # sets the flag: still inside GracefulStop); no events file left open
            if self.outputs is not None:
                self.outputs.close()

    def agreed_stop(self, stop: GracefulStop) -> str | None:
        """Whether every worker stops before the next batch (once agreed, asked no more)."""
        self.stopping = self.stopping or self.strategy.agree_to_stop(stop)
        return self.stopping

    def train_rest_of_epoch(self, stop: GracefulStop) -> None:
        state = self.state
        if state.batch == 0:
            self.model.reset_metrics()  # as `fit` does when an epoch starts
        train_batch = self.strategy.epoch_steps(state.epoch, state.batch)
        callbacks = self.callbacks
        while state.batch < self.steps and not self.agreed_stop(stop):
            if callbacks:
                if state.batch == 0:
                    callbacks.on_epoch_begin(state.epoch)
                callbacks.on_batch_begin(state.batch)
            logs = train_batch(state.batch)
            state.advance(state.batch + 1, state.step + 1)
            if callbacks:
                callbacks.on_batch_end(state.batch - 1, logs)
            self.strategy.beat("training a batch")
            if self.saves.due(state.batch, self.steps):
                self.saves.save(self.model, self.state_to_save(), epoch_end=False)
                self.strategy.beat("training a batch")
            self.saves.poll()
            if self.on_batch_end is not None:
                self.on_batch_end(state)
            if self.strategy.chief:
                maybe_io_error_at_step(self.run, self.config, state.step)
            if callbacks.stopped_by is not None:
                break  # the epoch closes as `fit` closes it: validated, its checkpoint committed
        if optimizer_step(self.model) != state.step:
            raise RuntimeError(f"optimizer at step {optimizer_step(self.model)} in epoch "
                               f"{state.epoch + 1}, the checkpoint state says {state.step}")

    def close_epoch(self) -> None:
        """Evaluate, close the epoch in the state and commit its checkpoint."""
        train = {k: float(v) for k, v in self.model.get_metrics_result().items()}
        val = self.strategy.validation_model().evaluate(
            *validation_split(self.start.arrays), callbacks=self.callbacks.validation_hooks(),
            batch_size=evaluation_batch_size(self.config.batch_size), verbose=0, return_dict=True)
        row = self.state.close_epoch(train, {k: float(v) for k, v in val.items()})
        if self.callbacks:
            self.end_epoch_in_callbacks(row)
        state = self.state_to_save()
        closed = copy.deepcopy(self.state)  # as the epoch's checkpoint holds it
        then = None if self.outputs is None else (
            lambda checkpoint: self.outputs.epoch_committed(closed, row, checkpoint.name))
        self.strategy.beat("committing the epoch's checkpoint")
        self.saves.save(self.model, state, epoch_end=True, then=then)
        self.strategy.beat("training a batch")

    def end_epoch_in_callbacks(self, row: dict) -> None:
        """`on_epoch_end` with the epoch's logs; what the callbacks add to them (ReduceLROnPlateau's
        learning_rate) joins the history row; a callback's stop ends training here."""
        logs = {k: v for k, v in row.items() if k != "epoch"}
        self.callbacks.on_epoch_end(row["epoch"] - 1, logs)
        row.update({k: float(v) for k, v in logs.items()
                    if k not in row and isinstance(v, numbers.Real)})
        if self.callbacks.stopped_by is not None:
            self.state.stopped_early = {"epoch": row["epoch"], "by": self.callbacks.stopped_by}
            log.info("%s stopped training after epoch %d", self.callbacks.stopped_by, row["epoch"])

    def state_to_save(self) -> dict:
        """The state as a checkpoint of this moment holds it, the callbacks' own included."""
        self.state.callbacks = self.callbacks.states()
        return self.state.to_json()

    def last_logs(self) -> dict:
        """The last epoch's logs, as `fit` passes them to `on_train_end`."""
        history = self.state.history
        return {k: v for k, v in history[-1].items() if k != "epoch"} if history else {}

    def stop_here(self, signal_name: str) -> None:
        """Commit the batch reached (unless just committed), record the stop, raise StopRequested;
        a failed commit in flight (a full disk) does not turn the stop into a retried error."""
        try:
            self.saves.wait()
        except CheckpointWriteError as exc:
            log.warning("%s; committing the batch reached instead", exc)
        latest = self.saves.latest
        if latest is None or latest.step != self.state.step:
            try:
                self.saves.save(self.model, self.state_to_save(), epoch_end=False, stop=True)
                self.saves.wait()
            except CheckpointWriteError as exc:
                raise stopped_without_checkpoint(signal_name, self.state.step, exc,
                                                 latest and self.where(latest)) from exc
        checkpoint = self.where(self.saves.latest)
        if self.strategy.chief:
            self.finish(None, stopped={"signal": signal_name, "checkpoint": checkpoint})
        raise stopped_in_training(signal_name, self.state.epoch, self.state.batch,
                                  self.state.step, checkpoint)

    def where(self, checkpoint: Checkpoint) -> str:
        """The checkpoint as the run directory names it (another worker's: its name only)."""
        return self.run.relative(checkpoint.path) if self.strategy.chief else checkpoint.name

    def finish(self, late_signal: str | None, **attempt) -> TrainRecord:
        """The chief's record of this attempt; a signal during the last epoch's close stops now."""
        record = finish_training(self.run, self.config, self.saves.store, self.start, self.state,
                                 self.saves.latest, **self.strategy.attempt_fields(
                                     self.saves.costs()), **attempt)
        if late_signal:
            raise stopped_after_training(late_signal, record.checkpoint)
        return record
