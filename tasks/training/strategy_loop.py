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

import logging
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
from ckptflow.training.cluster import describe_worker, is_chief, strategy_for
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
    if data.kind == "pipeline":
        raise BadInputError(
            f"--data {data.request['source']} is a tf.data pipeline, which ckptflow trains on one "
            "device only: a distributed iterator cannot be checkpointed (tensorflow issue 56372), "
            "so a resume could not continue it exactly. Use --strategy default, or return NumPy "
            "arrays.")
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
    start = start_training(run, config, data, strategy=strategy, announce=chief)
    model, state, arrays, latest = start.model, start.state, start.arrays, start.resumed
    agree_on_start(strategy, state.step)
    trackables = training_trackables(model, start.batches)
    validation = ModelSource.from_identity(config.identity()).build(*example_rows(arrays))
    train_step = step_function(model, strategy)
    x, y = start.batches.arrays()
    steps = start.batches.steps
    outputs = EpochOutputs(run, config, state, on_epoch_end) if chief else None
    # Every worker must join each save at the same batch, so no time budget (it reads own clocks).
    every_n_batches = SavePolicy(config.save_every_batches, budget=0.0)
    while state.epoch < config.epochs:
        if state.batch == 0:
            model.reset_metrics()
        order = epoch_order(config.seed, state.epoch, len(y))
        for batch in range(state.batch, steps):
            idx = order[batch * config.batch_size:(batch + 1) * config.batch_size]
            train_step(split_batch(strategy, _rows(x, idx), y[idx]))
            state.advance(batch + 1, optimizer_step(model))
            if every_n_batches.due(state.batch, steps):
                latest = store.save(model, state.to_json(), epoch_end=False, extra=trackables)
            if chief:
                if on_batch_end is not None:
                    on_batch_end(state)
                maybe_io_error_at_step(run, config, state.step)
        train = {k: float(v) for k, v in model.get_metrics_result().items()}
        validation.set_weights(model.get_weights())
        val = validation.evaluate(arrays["x_test"], arrays["y_test"], batch_size=_VAL_BATCH,
                                  verbose=0, return_dict=True)
        row = state.close_epoch(train, {k: float(v) for k, v in val.items()})
        latest = store.save(model, state.to_json(), epoch_end=True, extra=trackables)
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
