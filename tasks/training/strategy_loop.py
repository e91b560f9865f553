"""Data-parallel training under tf.distribute, with the same checkpoints and resume as one device.

`mirrored` splits each global batch over the local devices (MirroredStrategy); `multi-worker`
over processes, possibly on several machines, joined by `TF_CONFIG`
(MultiWorkerMirroredStrategy). Keras 3 `fit` fails under MultiWorkerMirroredStrategy (keras
issue 20585), so both use one custom loop around the model's own `train_step` (its loss,
optimizer and metrics, as compiled): batch b of epoch e is still
`epoch_order(seed, e, n)[b*B:(b+1)*B]` for the global batch B, cut into one contiguous slice per
replica; Keras scales each replica's mean loss by the number of replicas, so the all-reduced
gradient is the batch mean that one-device training applies. Validation runs on a one-device
copy of the model in each worker (no collective, every worker the same numbers). Array data
only: a tf.data pipeline is refused under a strategy (a distributed iterator cannot be
checkpointed, tensorflow issue 56372). Checkpoints go through the same CheckpointStore: the chief
commits them to the run directory, the other workers write theirs to a scratch directory (the
usual TF pattern: every worker runs the same save code, so any collective inside it matches)
and every worker restores from the chief's. All workers check that they resume from the same
optimizer step before training.

What is not bit-identical to one device: the gradient is summed in another order (float32
rounding, ~1e-7 relative per step), a last batch that does not split evenly weighs its replicas'
means equally, and each replica draws the same dropout mask for its own slice, so with dropout
> 0 replicas 1.. see other masks than one device would. Counters (epoch, batch, optimizer
iterations) and batch composition are exact.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import tempfile
from pathlib import Path

import numpy as np

from ckptflow.config import TrainConfig
from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.errors import BadInputError
from ckptflow.core.lock import run_dir_lock
from ckptflow.core.models import ModelSource
from ckptflow.core.run_dir import RunDir
from ckptflow.core.save_policy import SavePolicy
from ckptflow.core.snapshot import DataRecord, example_rows
from ckptflow.training.batches import epoch_order
from ckptflow.training.cluster import describe_worker, is_chief, strategy_for, worker_count
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
from ckptflow.training.state import TrainState
from ckptflow.training.stop import GracefulStop, stopped_after_training, stopped_in_training
from ckptflow.training.watchdog import PeerWatchdog

log = logging.getLogger("ckptflow.distributed")

_VAL_BATCH = 256


def train_with_strategy(run_dir: str | Path, config: TrainConfig, data: DataRecord,
                        on_epoch_end: EpochCallback | None = None,
                        on_batch_end: BatchCallback | None = None) -> TrainRecord | dict:
    """Train like one device, each global batch split over the strategy's replicas.

    The chief holds the run directory's lock and returns the TrainRecord; another worker writes
    nothing in the run directory and returns where it stopped (`epoch`, `step`).

    Raises:
        StopRequested: a SIGTERM or SIGINT reached any worker; every worker committed the same
            batch (the chief to the run directory) and the chief recorded the stop.
    """
    run = RunDir(run_dir)
    if data.kind == "pipeline":
        raise BadInputError(
            f"--data {data.request['source']} is a tf.data pipeline, which ckptflow trains on one "
            "device only: a distributed iterator cannot be checkpointed (tensorflow issue 56372), "
            "so a resume could not continue it exactly. Use --strategy default, or return NumPy "
            "arrays.")
    strategy = strategy_for(config.strategy, config.peer_timeout_seconds)
    if not is_chief(strategy):
        with tempfile.TemporaryDirectory(prefix="ckptflow-worker-") as scratch:
            state = StrategyLoop(run, config, data, strategy, CheckpointStore(scratch, keep=1),
                                 on_epoch_end=None, on_batch_end=None).train()
        return {"epoch": state.epoch, "step": state.step}
    with run_dir_lock(run, config.wait_for_lock):
        store = CheckpointStore(run.checkpoints, keep=config.keep_checkpoints)
        loop = StrategyLoop(run, config, data, strategy, store, on_epoch_end, on_batch_end)
        loop.train()
        record = loop.finish()
        if loop.late_signal:  # during the last epoch's close: training is complete, stop now
            raise stopped_after_training(loop.late_signal, record.checkpoint)
        return record


class StrategyLoop:
    """One training attempt under a strategy, in every worker alike (the chief also writes the
    run directory's outputs); each step that needs every worker beats the PeerWatchdog."""

    def __init__(self, run: RunDir, config: TrainConfig, data: DataRecord, strategy,
                 store: CheckpointStore, on_epoch_end: EpochCallback | None,
                 on_batch_end: BatchCallback | None):
        self.run, self.config, self.data, self.strategy, self.store = (
            run, config, data, strategy, store)
        self.chief = is_chief(strategy)
        self.on_epoch_end, self.on_batch_end = on_epoch_end, on_batch_end
        self.workers = worker_count(strategy)
        self.watchdog = (PeerWatchdog(config.peer_timeout_seconds, describe_worker(strategy))
                         if self.workers > 1 else contextlib.nullcontext(_NoWatchdog()))

    def train(self) -> TrainState:
        with GracefulStop(self.config.stop_grace_seconds) as stop, self.watchdog as watchdog:
            self.start = start_training(self.run, self.config, self.data, strategy=self.strategy,
                                        announce=self.chief)
            watchdog.beat("agreeing on the checkpoint to resume from")
            self.state, self.latest = self.start.state, self.start.resumed
            agree_on_start(self.strategy, self.state.step)
            watchdog.beat("training the first batch")
            outputs = EpochOutputs(self.run, self.config, self.state, self.on_epoch_end) \
                if self.chief else None
            try:
                self._train_epochs(stop, watchdog, outputs)
            finally:
                if outputs is not None:
                    outputs.close()
            self.late_signal = stop.requested
        return self.state

    def _train_epochs(self, stop: GracefulStop, watchdog, outputs: EpochOutputs | None) -> None:
        config, model, state, strategy = self.config, self.start.model, self.state, self.strategy
        trackables = training_trackables(model, self.start.batches)
        arrays = self.start.arrays
        validation = ModelSource.from_identity(config.identity()).build(*example_rows(arrays))
        train_step = step_function(model, strategy)
        x, y = self.start.batches.arrays()
        steps = self.start.batches.steps
        # Every worker must join each save at the same batch, so no time budget (it reads own
        # clocks), and a stop is agreed on by all of them.
        every_n_batches = SavePolicy(config.save_every_batches, budget=0.0)
        while state.epoch < config.epochs:
            if state.batch == 0:
                model.reset_metrics()
            order = epoch_order(config.seed, state.epoch, len(y))
            for batch in range(state.batch, steps):
                idx = order[batch * config.batch_size:(batch + 1) * config.batch_size]
                train_step(split_batch(strategy, _rows(x, idx), y[idx]))
                state.advance(batch + 1, optimizer_step(model))
                watchdog.beat("training a batch")
                if every_n_batches.due(state.batch, steps):
                    self.latest = self.store.save(model, state.to_json(), epoch_end=False,
                                                  extra=trackables)
                    watchdog.beat("training a batch")
                if self.chief:
                    if self.on_batch_end is not None:
                        self.on_batch_end(state)
                    maybe_io_error_at_step(self.run, config, state.step)
                if (agreed := self.agree_to_stop(stop)) is not None:
                    self._stop_here(agreed, trackables)
            train = {k: float(v) for k, v in model.get_metrics_result().items()}
            validation.set_weights(model.get_weights())
            val = validation.evaluate(arrays["x_test"], arrays["y_test"], batch_size=_VAL_BATCH,
                                      verbose=0, return_dict=True)
            row = state.close_epoch(train, {k: float(v) for k, v in val.items()})
            watchdog.beat("committing the epoch's checkpoint")
            self.latest = self.store.save(model, state.to_json(), epoch_end=True,
                                          extra=trackables)
            watchdog.beat("training a batch")
            if outputs is not None:
                outputs.epoch_committed(state, row, self.latest.name)

    def agree_to_stop(self, stop: GracefulStop) -> str | None:
        """The signal any worker got (SIGTERM over SIGINT), or None: all stop after the same
        batch."""
        if self.workers == 1:
            return stop.requested
        import tensorflow as tf

        mine = signal.Signals[stop.requested].value if stop.requested else 0
        votes = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant([mine], tf.int32))
        agreed = int(tf.reduce_max(self.strategy.gather(votes, axis=0)))
        return signal.Signals(agreed).name if agreed else None

    def _stop_here(self, signal_name: str, trackables: dict) -> None:
        """Commit the batch reached on every worker, record the stop (chief), raise StopRequested."""
        state = self.state
        if self.latest is None or self.latest.step != state.step:
            self.latest = self.store.save(self.start.model, state.to_json(), epoch_end=False,
                                          extra=trackables)
        checkpoint = self.run.relative(self.latest.path) if self.chief else self.latest.name
        if self.chief:
            self.finish(stopped={"signal": signal_name, "checkpoint": checkpoint})
        raise stopped_in_training(signal_name, state.epoch, state.batch, state.step, checkpoint)

    def finish(self, **attempt) -> TrainRecord:
        """The chief's record of this attempt in the manifest."""
        return finish_training(self.run, self.config, self.store, self.start, self.state,
                               self.latest, strategy=self.config.strategy,
                               replicas=self.strategy.num_replicas_in_sync,
                               cluster=describe_worker(self.strategy), **attempt)


class _NoWatchdog:
    """One process holds every replica: nothing to wait for."""

    def beat(self, doing: str) -> None:
        pass


def agree_on_start(strategy, step: int) -> None:
    """Refuse to train if the workers restored different checkpoints (e.g. a run dir not shared)."""
    import tensorflow as tf

    mine = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant([step], tf.int64))
    steps = sorted(set(strategy.gather(mine, axis=0).numpy().tolist()))
    if len(steps) > 1:
        raise BadInputError(
            f"the workers resumed from different optimizer steps {steps}. Every worker must see "
            "the same run directory: put it on a file system all of them mount.")


def split_batch(strategy, x, y: np.ndarray):
    """One contiguous slice of the global batch per replica, by global replica id."""
    n = strategy.num_replicas_in_sync
    ys = np.array_split(y, n)
    if isinstance(x, dict):
        parts = {k: np.array_split(v, n) for k, v in x.items()}
        xs = [{k: v[i] for k, v in parts.items()} for i in range(n)]
    else:
        xs = np.array_split(x, n)
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: (xs[ctx.replica_id_in_sync_group], ys[ctx.replica_id_in_sync_group]))


def _rows(x, idx):
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def step_function(model, strategy):
    """One global batch through the model's own compiled `train_step` on every replica."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def train_step(inputs):
        strategy.run(model.train_step, args=(inputs,))

    return train_step
