"""Data-parallel training under tf.distribute: the one training loop with a `Replicas` adapter.

`mirrored` splits each global batch over the local devices (MirroredStrategy); `multi-worker`
over processes joined by `TF_CONFIG` (MultiWorkerMirroredStrategy, which Keras 3 `fit` cannot
drive, keras issue 20585). Each step runs the model's own compiled `train_step` on every
replica: batch b of epoch e is still `epoch_order(seed, e, n)[b*B:(b+1)*B]` for the global batch
B, one contiguous slice per replica, and Keras scales each replica's mean loss so that the
all-reduced gradient is the batch mean one device applies (float32 summation order aside; with
dropout each replica draws its slice's mask from the same RNG state). Validation runs on a
one-device copy of the model in each worker. Array data only: a distributed iterator cannot be
checkpointed (tensorflow issue 56372). The chief commits checkpoints to the run directory, the
other workers the same saves to a scratch directory (any collective inside a save matches), on
the training thread, exactly every `save_every_batches` batches (docs/distributed.md says why).
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ckptflow.config import TrainConfig
from ckptflow.core.checkpoint_saves import CheckpointSaves, SavePolicy
from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.errors import BadInputError
from ckptflow.core.lock import run_dir_lock
from ckptflow.core.models import ModelSource
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import DataRecord, example_rows, row_count, select_rows
from ckptflow.training.batches import epoch_order
from ckptflow.training.cluster import describe_worker, is_chief, strategy_for, worker_count
from ckptflow.training.loop import TrainingLoop
from ckptflow.training.setup import (
    BatchCallback,
    EpochCallback,
    TrainingStart,
    TrainRecord,
    start_training,
    training_trackables,
)
from ckptflow.training.stop import GracefulStop
from ckptflow.training.watchdog import PeerWatchdog


def train_with_strategy(run_dir: str | Path, config: TrainConfig, data: DataRecord,
                        on_epoch_end: EpochCallback | None = None,
                        on_batch_end: BatchCallback | None = None) -> TrainRecord | dict:
    """Train like one device, each global batch split over the strategy's replicas.

    The chief holds the run directory's lock and returns the TrainRecord; another worker writes
    nothing there and returns where it stopped (`epoch`, `step`). A signal to any worker stops
    every worker at the same batch (StopRequested).
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
            loop, _ = train_replicas(run, config, data, strategy, CheckpointStore(scratch, keep=1))
        return {"epoch": loop.state.epoch, "step": loop.state.step}
    with run_dir_lock(run, config.wait_for_lock):
        store = CheckpointStore(run.checkpoints, keep=config.keep_checkpoints,
                                keras_files=config.epoch_keras_files)
        loop, late_signal = train_replicas(run, config, data, strategy, store, on_epoch_end,
                                           on_batch_end)
        return loop.finish(late_signal)


def train_replicas(run: RunDir, config: TrainConfig, data: DataRecord, strategy,
                   store: CheckpointStore, on_epoch_end: EpochCallback | None = None,
                   on_batch_end: BatchCallback | None = None) -> tuple[TrainingLoop, str | None]:
    """One attempt in this worker, set up inside the stop and the watchdog (a signal during
    set-up must not end one worker alone); the loop and a signal that came after training."""
    watchdog = (PeerWatchdog(config.peer_timeout_seconds, describe_worker(strategy))
                if worker_count(strategy) > 1 else contextlib.nullcontext(None))
    with GracefulStop(config.stop_grace_seconds) as stop, watchdog as watchdog:
        start = start_training(run, config, data, strategy=strategy, announce=is_chief(strategy))
        replicas = Replicas(strategy, config, start, watchdog)
        replicas.beat("agreeing on the checkpoint to resume from")
        agree_on_start(strategy, start.state.step)
        replicas.beat("training the first batch")
        # budget 0 and on this thread: every worker saves at the same batches (docs/distributed.md)
        saves = CheckpointSaves(store, SavePolicy(config.save_every_batches, budget=0.0),
                                extra=training_trackables(start.model, start.batches.trackables()),
                                background=False, latest=start.resumed)
        loop = TrainingLoop(run, config, start, replicas, saves, on_epoch_end, on_batch_end)
        loop.train(stop)
    return loop, stop.requested


class Replicas:
    """The loop's adapter under a tf.distribute strategy (see the module docstring)."""

    def __init__(self, strategy, config: TrainConfig, start: TrainingStart,
                 watchdog: PeerWatchdog | None):
        self.strategy, self.config, self.start, self.watchdog = strategy, config, start, watchdog
        self.chief, self.workers = is_chief(strategy), worker_count(strategy)
        self.step = step_function(start.model, strategy)
        self.validation = ModelSource.from_identity(config.identity()).build(
            *example_rows(start.arrays))

    def epoch_steps(self, epoch: int, batch: int) -> Callable[[int], None]:
        x, y = self.start.batches.arrays()
        order, size = epoch_order(self.config.seed, epoch, row_count(y)), self.config.batch_size

        def train_batch(b: int) -> None:
            idx = order[b * size:(b + 1) * size]
            self.step(split_batch(self.strategy, select_rows(x, idx), select_rows(y, idx)))

        return train_batch

    def agree_to_stop(self, stop: GracefulStop) -> str | None:
        """The signal any worker got (SIGTERM over SIGINT), or None."""
        if self.workers == 1:
            return stop.requested
        import tensorflow as tf

        mine = signal.Signals[stop.requested].value if stop.requested else 0
        votes = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant([mine], tf.int32))
        agreed = int(tf.reduce_max(self.strategy.gather(votes, axis=0)))
        return signal.Signals(agreed).name if agreed else None

    def validation_model(self):
        self.validation.set_weights(self.start.model.get_weights())
        return self.validation

    def beat(self, doing: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(doing)

    def attempt_fields(self, costs: dict) -> dict:
        return {"strategy": self.config.strategy, "replicas": self.strategy.num_replicas_in_sync,
                "cluster": describe_worker(self.strategy)}


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


def split_batch(strategy, x, y):
    """One contiguous slice of the global batch per replica, by global replica id (features and
    labels an array, or a dict or list of arrays)."""
    n, rows = strategy.num_replicas_in_sync, row_count(y)
    bounds = np.cumsum([0] + [rows // n + (i < rows % n) for i in range(n)])  # as np.array_split
    parts = [(select_rows(x, slice(a, b)), select_rows(y, slice(a, b)))
             for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: parts[ctx.replica_id_in_sync_group])


def step_function(model, strategy):
    """One global batch through the model's own compiled `train_step` on every replica."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def train_step(inputs):
        strategy.run(model.train_step, args=(inputs,))

    return train_step
