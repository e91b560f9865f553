"""Data-parallel training under tf.distribute, with the same checkpoints and resume as one device.

`mirrored` splits each global batch over the local devices (MirroredStrategy); `multi-worker`
over processes, possibly on several machines, joined by `TF_CONFIG`
(MultiWorkerMirroredStrategy). Keras 3 `fit` fails under MultiWorkerMirroredStrategy (keras
issue 20585), so both use one custom loop: batch b of epoch e is still
`epoch_order(seed, e, n)[b*B:(b+1)*B]` for the global batch B, cut into one contiguous slice per
replica; the loss is scaled by the global batch, so the all-reduced gradient is the batch mean
that one-device training applies. Checkpoints go through the same CheckpointStore: the chief
commits them to the run directory, the other workers write theirs to a scratch directory (the
usual TF pattern: every worker runs the same save code, so any collective inside it matches)
and every worker restores from the chief's. All workers check that they resume from the same
optimizer step before training.

What is not bit-identical to one device: the gradient is summed in another order (float32
rounding, ~1e-7 relative per step), and each replica draws the same dropout mask for its own
slice, so with dropout > 0 replicas 1.. see other masks than one device would. Counters (epoch,
batch, optimizer iterations) and batch composition are exact.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import numpy as np

from ckptflow.config import TrainConfig
from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.errors import BadInputError
from ckptflow.core.lock import run_dir_lock
from ckptflow.core.run_dir import RunDir
from ckptflow.core.save_policy import SavePolicy
from ckptflow.core.snapshot import DataRecord
from ckptflow.training.cluster import describe_worker, is_chief, strategy_for
from ckptflow.training.faults import maybe_io_error_at_step
from ckptflow.training.setup import (
    BatchCallback,
    EpochCallback,
    EpochOutputs,
    TrainRecord,
    epoch_order,
    finish_training,
    optimizer_step,
    start_training,
)
from ckptflow.tutorial.model import create_model

log = logging.getLogger("ckptflow.distributed")

_VAL_BATCH = 256


def train_with_strategy(run_dir: str | Path, config: TrainConfig, data: DataRecord,
                        on_epoch_end: EpochCallback | None = None,
                        on_batch_end: BatchCallback | None = None) -> TrainRecord | dict:
    """Train like one device, each global batch split over the strategy's replicas.

    The chief holds the run directory's lock and returns the TrainRecord; another worker writes
    nothing in the run directory and returns where it stopped (`epoch`, `step`).
    """
    run = RunDir(run_dir)
    strategy = strategy_for(config.strategy)
    if not is_chief(strategy):
        with tempfile.TemporaryDirectory(prefix="ckptflow-worker-") as scratch:
            state = _train(run, config, data, strategy, CheckpointStore(scratch, keep=1),
                           chief=False, on_epoch_end=None, on_batch_end=None)[0]
        return {"epoch": state.epoch, "step": state.step}
    with run_dir_lock(run, config.wait_for_lock):
        store = CheckpointStore(run.checkpoints, keep=config.keep_checkpoints)
        state, start, latest = _train(run, config, data, strategy, store, chief=True,
                                      on_epoch_end=on_epoch_end, on_batch_end=on_batch_end)
        return finish_training(run, config, store, start, state, latest,
                               strategy=config.strategy, replicas=strategy.num_replicas_in_sync,
                               cluster=describe_worker(strategy))


def _train(run: RunDir, config: TrainConfig, data: DataRecord, strategy, store: CheckpointStore,
           chief: bool, on_epoch_end: EpochCallback | None, on_batch_end: BatchCallback | None):
    with strategy.scope():
        model = create_model(config.units, config.dropout, config.learning_rate, config.seed,
                             config.deterministic)
    start = start_training(run, config, data, model, announce=chief)
    state, arrays, latest = start.state, start.arrays, start.resumed
    agree_on_start(strategy, state.step)
    train_step, val_logits = step_functions(model, strategy)
    x, y = arrays["x_train"], arrays["y_train"]
    steps = math.ceil(len(y) / config.batch_size)
    outputs = EpochOutputs(run, config, state, on_epoch_end) if chief else None
    # Every worker must join each save at the same batch, so no time budget (it reads own clocks).
    every_n_batches = SavePolicy(config.save_every_batches, budget=0.0)
    while state.epoch < config.epochs:
        order = epoch_order(config.seed, state.epoch, len(y))
        for batch in range(state.batch, steps):
            idx = order[batch * config.batch_size:(batch + 1) * config.batch_size]
            loss_sum, correct = train_step(split_batch(strategy, x[idx], y[idx]),
                                           np.float32(len(idx)))
            state.advance(batch + 1, optimizer_step(model),
                          state.sums.plus(float(loss_sum), float(correct), len(idx)))
            if every_n_batches.due(state.batch, steps):
                latest = store.save(model, state.to_json(), epoch_end=False)
            if chief:
                if on_batch_end is not None:
                    on_batch_end(state)
                maybe_io_error_at_step(run, config, state.step)
        row = state.close_epoch(*validate(val_logits, arrays))
        latest = store.save(model, state.to_json(), epoch_end=True)
        if chief:
            outputs.epoch_committed(state, row, latest.name)
    if chief:
        outputs.close()
    return state, start, latest


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


def split_batch(strategy, x: np.ndarray, y: np.ndarray):
    """One contiguous slice of the global batch per replica, by global replica id."""
    n = strategy.num_replicas_in_sync
    xs, ys = np.array_split(x, n), np.array_split(y, n)
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: (xs[ctx.replica_id_in_sync_group], ys[ctx.replica_id_in_sync_group]))


def step_functions(model, strategy):
    import keras
    import tensorflow as tf

    per_example = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def replica_step(x, y, global_batch):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            losses = per_example(y, logits)
            # Divided by the global batch, so the optimizer's all-reduced sum is the batch mean.
            loss = tf.reduce_sum(losses) / global_batch
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply(grads, model.trainable_variables)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(y, tf.int64)),
                                        tf.float32))
        return tf.reduce_sum(losses), correct

    @tf.function(reduce_retracing=True)
    def train_step(inputs, global_batch):
        x, y = inputs
        loss_sum, correct = strategy.run(replica_step, args=(x, y, global_batch))
        total = tf.distribute.ReduceOp.SUM
        return strategy.reduce(total, loss_sum, axis=None), strategy.reduce(total, correct, axis=None)

    @tf.function(reduce_retracing=True)
    def val_logits(x):
        return model(x, training=False)

    return train_step, val_logits


def validate(val_logits, arrays: dict) -> tuple[float, float]:
    """Test loss and accuracy, computed locally by each worker (no collective, same result)."""
    import keras

    x, y = arrays["x_test"], arrays["y_test"]
    per_example = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    loss_sum = correct = 0.0
    for i in range(0, len(y), _VAL_BATCH):
        logits = val_logits(x[i:i + _VAL_BATCH])
        loss_sum += float(np.sum(per_example(y[i:i + _VAL_BATCH], logits)))
        correct += float(np.sum(np.argmax(logits, -1) == y[i:i + _VAL_BATCH]))
    return loss_sum / len(y), correct / len(y)
