"""One device: the rest of each epoch, batch by batch, through Keras' own compiled train step.

Each batch is `model.train_function(iterator)`, the very step `fit` runs, on an iterator that
knows where training stands (`ckptflow.training.batches`): Keras 3 `fit` cannot start an epoch
mid-way, nor continue a tf.data iterator. The epoch's metrics are the model's metric objects,
reset when an epoch starts and saved in every checkpoint, so the history a resumed run writes
is the one an uninterrupted run writes. Checkpoints are snapshots in memory at a batch boundary,
committed on a background thread while the next batches train (`BackgroundCommits`); what an
epoch end leaves beside its checkpoint (history, TensorBoard, log line) follows once that
checkpoint is committed. A SIGTERM or SIGINT ends training after the current batch; a
checkpoint is committed there.
"""

from __future__ import annotations

import copy
import logging
import time

from ckptflow.config import TrainConfig
from ckptflow.core.background_commit import BackgroundCommits, Then
from ckptflow.core.checkpoints import Checkpoint, CheckpointStore, CheckpointWriteError
from ckptflow.core.models import ModelSource
from ckptflow.core.run_dir import RunDir
from ckptflow.core.save_policy import SavePolicy
from ckptflow.core.snapshot import DataRecord, example_rows
from ckptflow.training.faults import maybe_io_error_at_step
from ckptflow.training.setup import (
    BatchCallback,
    EpochCallback,
    EpochOutputs,
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
    """Train until `config.epochs`, committing checkpoints as the SavePolicy allows and at every
    epoch end. The caller holds the run directory's lock.

    Raises:
        StopRequested: a SIGTERM or SIGINT arrived; a checkpoint of the batch reached is
            committed and recorded in the manifest.
    """
    return OneDeviceLoop(run, config, data, on_epoch_end, on_batch_end).train()


class OneDeviceLoop:
    """The state of one training attempt on one device, epoch after epoch."""

    def __init__(self, run: RunDir, config: TrainConfig, data: DataRecord,
                 on_epoch_end: EpochCallback | None, on_batch_end: BatchCallback | None):
        self.run, self.config, self.on_batch_end = run, config, on_batch_end
        self.store = CheckpointStore(run.checkpoints, keep=config.keep_checkpoints,
                                     keras_files=config.epoch_keras_files)
        self.start = start_training(run, config, data)
        self.model, self.batches = self.start.model, self.start.batches
        self.state, self.arrays = self.start.state, self.start.arrays
        self.commits = BackgroundCommits(
            self.store, ModelSource.from_identity(config.identity()).factory(
                *example_rows(self.arrays)),
            background=config.background_checkpoints, latest=self.start.resumed)
        self.trackables = training_trackables(self.model, self.batches)
        self.outputs = EpochOutputs(run, config, self.state, on_epoch_end)
        self.policy = SavePolicy(config.save_every_batches, config.checkpoint_budget)
        self.started, self.waited = 0.0, 0.0  # when training began; seconds it waited on saves
        self.charged_cpu = 0.0  # background commits' CPU seconds charged to the policy so far
        self.model.make_train_function()

    @property
    def latest(self) -> Checkpoint | None:
        """The newest committed checkpoint."""
        return self.commits.latest

    def train(self) -> TrainRecord:
        self.started = time.perf_counter()
        try:
            with GracefulStop(self.config.stop_grace_seconds) as stop:
                try:
                    while self.state.epoch < self.config.epochs:
                        self.train_rest_of_epoch(stop)
                        if stop.requested:
                            self.stop_here(stop.requested)
                        self.close_epoch()
                    self.wait_for_commits()
                finally:  # when the attempt fails: the commit in flight lands (a signal meanwhile
                    self.commits.close()  # only sets the flag: still inside GracefulStop)
        finally:  # no events file left open
            self.outputs.close()
        record = finish_training(self.run, self.config, self.store, self.start, self.state,
                                 self.latest, checkpoints=self.costs())
        if stop.requested:  # during the last epoch's close: training is complete, stop now
            raise stopped_after_training(stop.requested, record.checkpoint)
        return record

    def train_rest_of_epoch(self, stop: GracefulStop) -> None:
        """The current epoch from the batch reached to its end, or to a requested stop."""
        state, steps = self.state, self.batches.steps
        if state.batch == 0:
            self.model.reset_metrics()  # as `fit` does when an epoch starts
        iterator = self.batches.iterator(state.epoch, state.batch)
        while state.batch < steps and not stop.requested:
            self.model.train_function(iterator)
            state.advance(state.batch + 1, state.step + 1)
            if self.policy.due(state.batch, steps, busy=self.commits.busy()):
                self.save(epoch_end=False)
            self.commits.poll()
            self.charge_background_cpu()
            if self.on_batch_end is not None:
                self.on_batch_end(state)
            maybe_io_error_at_step(self.run, self.config, state.step)
        if optimizer_step(self.model) != state.step:
            raise RuntimeError(f"optimizer at step {optimizer_step(self.model)} in epoch "
                               f"{state.epoch + 1}, the checkpoint state says {state.step}")

    def close_epoch(self) -> None:
        """Evaluate, close the epoch in the state and commit its checkpoint."""
        train = {k: float(v) for k, v in self.model.get_metrics_result().items()}
        val = self.model.evaluate(self.arrays["x_test"], self.arrays["y_test"],
                                  batch_size=max(256, self.config.batch_size), verbose=0,
                                  return_dict=True)
        row = self.state.close_epoch(train, {k: float(v) for k, v in val.items()})
        closed = copy.deepcopy(self.state)  # as the epoch's checkpoint holds it
        self.save(epoch_end=True, then=lambda checkpoint: self.outputs.epoch_committed(
            closed, row, checkpoint.name))

    def save(self, epoch_end: bool, then: Then | None = None) -> None:
        """Snapshot where training is and hand it to the commits; tell the policy how long
        training waited (the snapshot, and the previous commit if it was still being written)."""
        started, callbacks = self.policy.clock(), self.commits.then_seconds
        snapshot = self.store.snapshot(self.model, self.state.to_json(), epoch_end=epoch_end,
                                       extra=self.trackables,
                                       keras_copy=self.config.background_checkpoints)
        self.commits.submit(snapshot, then=then, training_model=self.model)
        # not the previous epoch's outputs (history, TensorBoard, the progress artifact)
        waited = self.policy.clock() - started - (self.commits.then_seconds - callbacks)
        self.waited += waited
        self.policy.saved(waited)
        self.charge_background_cpu()

    def charge_background_cpu(self) -> None:
        """Charge the policy with the CPU time of the commits finished since last asked: on a
        busy machine, training loses it."""
        spent, self.charged_cpu = self.commits.cpu_seconds - self.charged_cpu, self.commits.cpu_seconds
        if spent:
            self.policy.saved(spent)

    def wait_for_commits(self) -> None:
        """Until the commit in flight is in (training waits: counted, its epoch outputs not)."""
        started, callbacks = time.perf_counter(), self.commits.then_seconds
        self.commits.wait()
        self.waited += time.perf_counter() - started - (self.commits.then_seconds - callbacks)

    def costs(self) -> dict:
        """What checkpoints cost this attempt, for the manifest."""
        seconds = time.perf_counter() - self.started
        return {"training_seconds": round(seconds, 3), "waited_seconds": round(self.waited, 3),
                "cost": round(self.waited / seconds, 4) if seconds else 0.0,
                "commit_cpu_seconds": round(self.commits.cpu_seconds, 3),
                "committed": self.commits.committed, "deferred": self.policy.deferred,
                "bytes_written": self.commits.bytes_written,
                "background": self.config.background_checkpoints}

    def stop_here(self, signal_name: str) -> None:
        """Commit the batch reached (unless just committed), record the stop, raise StopRequested.

        A commit in flight that failed (a full disk) does not turn the stop into a retried
        error; if the stop's own checkpoint cannot be written either, the stop says so."""
        try:
            self.wait_for_commits()
        except CheckpointWriteError as exc:
            log.warning("%s; committing the batch reached instead", exc)
        if self.latest is None or self.latest.step != self.state.step:
            try:
                self.save(epoch_end=False)
                self.wait_for_commits()
            except CheckpointWriteError as exc:
                raise stopped_without_checkpoint(signal_name, self.state.step, exc,
                                                 self.latest and self.run.relative(
                                                     self.latest.path)) from exc
        checkpoint = self.run.relative(self.latest.path)
        finish_training(self.run, self.config, self.store, self.start, self.state, self.latest,
                        stopped={"signal": signal_name, "checkpoint": checkpoint},
                        checkpoints=self.costs())
        raise stopped_in_training(signal_name, self.state.epoch, self.state.batch,
                                  self.state.step, checkpoint)
