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

import json
import logging
import math
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from tasks.checkpoints import Checkpoint, CheckpointStore
from tasks.config import TrainConfig
from tasks.data import DataRecord, data_digest, load_snapshot
from tasks.errors import BadInputError
from tasks.lock import run_dir_lock
from tasks.manifest import read_manifest, update_manifest
from tasks.resume import CHECKPOINTS, find_resume_point
from tasks.train import (
    HISTORY,
    BatchCallback,
    EpochCallback,
    SavePolicy,
    TrainRecord,
    _fresh_state,
    _maybe_inject_io_error,
    _record_in_manifest,
    _tensorboard_writer,
    _write_history,
    after_epoch,
    epoch_order,
)

log = logging.getLogger("ckptflow.distributed")

_VAL_BATCH = 256
_POLL_S = 0.5
_strategies: dict[str, Any] = {}  # one per process: collective ops are configured only once


def strategy_for(name: str):
    """The process's tf.distribute strategy called `name`, created on first use.

    Call it before TensorFlow runs any op: MultiWorkerMirroredStrategy cannot be created after
    that ("Collective ops must be configured at program startup"), which is why the flow joins
    the cluster before its first stage.
    """
    if name in _strategies:
        return _strategies[name]
    if name == "multi-worker":
        _check_tf_config()
    import tensorflow as tf

    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif name == "multi-worker":
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: create the strategy (join_cluster) before any TensorFlow "
                               "op runs in this process") from exc
    else:
        raise BadInputError(f"no tf.distribute strategy for strategy={name!r}")
    _strategies[name] = strategy
    log.info("strategy %s: %d replicas in sync (%s)", name, strategy.num_replicas_in_sync,
             describe_worker(strategy))
    return strategy


def _check_tf_config() -> None:
    """A one-line error for a missing or malformed TF_CONFIG, instead of TensorFlow's."""
    fix = ('Set it to e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": '
           '{"type": "worker", "index": 0}} on each worker, with its own index.')
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise BadInputError(f"strategy multi-worker needs the TF_CONFIG environment variable. {fix}")
    try:
        spec = json.loads(text)
        workers = spec["cluster"]["worker"]
        index = int(spec["task"]["index"])
        ok = spec["task"]["type"] in spec["cluster"] and isinstance(workers, list) and index >= 0
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise BadInputError(f"TF_CONFIG is not a valid cluster description. Received: {text}. {fix}")


def is_chief(strategy) -> bool:
    """True for the one process that commits checkpoints and writes the run directory."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return (resolver.task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


def describe_worker(strategy) -> str:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "one process"
    workers = len(resolver.cluster_spec().as_dict().get("worker", []))
    return f"{resolver.task_type} {resolver.task_id} of {workers} workers"


def train_with_strategy(run_dir: str | Path, config: TrainConfig, data: DataRecord,
                        on_epoch_end: EpochCallback | None = None,
                        on_batch_end: BatchCallback | None = None) -> TrainRecord | dict:
    """Train like `train_with_checkpoints`, each global batch split over the strategy's replicas.

    The chief holds the run directory's lock and returns the TrainRecord; another worker writes
    nothing in the run directory and returns where it stopped (`epoch`, `step`).
    """
    strategy = strategy_for(config.strategy)
    if not is_chief(strategy):
        with tempfile.TemporaryDirectory(prefix="ckptflow-worker-") as scratch:
            state, _, _, _ = _train(Path(run_dir), config, data, strategy,
                                    CheckpointStore(scratch, keep=1), chief=False)
        return {"epoch": state["epoch"], "step": state["step"]}
    with run_dir_lock(run_dir, config.wait_for_lock):
        run_dir = Path(run_dir)
        store = CheckpointStore(run_dir / CHECKPOINTS, keep=config.keep_checkpoints)
        state, latest, point, start = _train(run_dir, config, data, strategy, store, chief=True,
                                             on_epoch_end=on_epoch_end, on_batch_end=on_batch_end)
        record = TrainRecord(
            checkpoint=latest.path.relative_to(run_dir).as_posix(),
            commit_sha256=latest.commit_sha256(), epoch=state["epoch"], batch=latest.batch,
            step=state["step"], resumed_from=point.path if point else None,
            start_epoch=start["epoch"], start_batch=start["batch"],
            batches_trained=state["step"] - start["step"],
            best_val_accuracy=state["best"]["val_accuracy"], history_path=HISTORY.as_posix())
        _record_in_manifest(run_dir, store, record, config)
        training = read_manifest(run_dir)["training"]  # this attempt: how it was spread
        training["attempts"][-1].update(strategy=config.strategy,
                                        replicas=strategy.num_replicas_in_sync,
                                        cluster=describe_worker(strategy))
        update_manifest(run_dir, training=training)
        return record


def _train(run_dir: Path, config: TrainConfig, data: DataRecord, strategy, store: CheckpointStore,
           chief: bool, on_epoch_end: EpochCallback | None = None,
           on_batch_end: BatchCallback | None = None):
    from tasks.model import INITIAL_MODEL, build_model

    arrays = load_snapshot(run_dir / data.path)
    if data_digest(arrays) != data.data_sha256:
        raise BadInputError(f"data snapshot {run_dir / data.path} changed since fetch-data "
                            "recorded it. Run the flow again to re-check the data.")
    point = find_resume_point(run_dir, config.identity(), data.data_sha256)
    with strategy.scope():
        model = build_model(config.units, config.dropout, config.learning_rate, config.seed,
                            config.deterministic)
    if point is None:
        model.load_weights(run_dir / INITIAL_MODEL)
        state = _fresh_state(config, data)
        latest = None
    else:  # every worker restores from the chief's committed checkpoint
        latest = Checkpoint(run_dir / point.path, point.epoch, point.batch, point.step)
        state = CheckpointStore(run_dir / CHECKPOINTS).restore(latest, model)
        state["config"] = config.model_dump()
    if _iterations(model) != state["step"]:
        raise RuntimeError(f"optimizer restored at step {_iterations(model)}, state says {state['step']}")
    _agree_on_start(strategy, state["step"])
    start = {k: state[k] for k in ("epoch", "batch", "step")}
    if chief and point is not None:
        log.info("resuming from %s: epoch %d, batch %d, optimizer step %d (%d replicas)",
                 latest.name, state["epoch"], state["batch"], state["step"],
                 strategy.num_replicas_in_sync)

    train_step, val_logits = _step_functions(model, strategy)
    x, y = arrays["x_train"], arrays["y_train"]
    steps = math.ceil(len(y) / config.batch_size)
    summaries = _tensorboard_writer(run_dir) if chief and state["epoch"] < config.epochs else None
    # Every worker must join each save at the same batch, so no time budget (it reads own clocks).
    every_n_batches = SavePolicy(config.save_every_batches, budget=0.0)
    while state["epoch"] < config.epochs:
        order = epoch_order(config.seed, state["epoch"], len(y))
        for batch in range(state["batch"], steps):
            idx = order[batch * config.batch_size:(batch + 1) * config.batch_size]
            loss_sum, correct = train_step(_split(strategy, x[idx], y[idx]), np.float32(len(idx)))
            partial = state["partial"]
            state["partial"] = {"loss_sum": partial["loss_sum"] + float(loss_sum),
                                "correct": partial["correct"] + float(correct),
                                "seen": partial["seen"] + len(idx)}
            state["batch"], state["step"] = batch + 1, _iterations(model)
            if every_n_batches.due(state["batch"], steps):
                latest = store.save(model, state, epoch_end=False)
            if chief:
                if on_batch_end is not None:
                    on_batch_end(state)
                _maybe_inject_io_error(run_dir, config, state["step"])
        row = _close_epoch(state, *_validate(val_logits, arrays))
        latest = store.save(model, state, epoch_end=True)
        if chief:
            after_epoch(run_dir, config, state, row, latest.name, summaries, on_epoch_end)
    if summaries is not None:
        summaries.close()
    if chief:
        _write_history(run_dir, state["history"])
    return state, latest, point, start


def _iterations(model) -> int:
    return int(model.optimizer.iterations.numpy())  # int() alone refuses a MirroredVariable


def _agree_on_start(strategy, step: int) -> None:
    """Refuse to train if the workers restored different checkpoints (e.g. a run dir not shared)."""
    import tensorflow as tf

    mine = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant([step], tf.int64))
    steps = sorted(set(strategy.gather(mine, axis=0).numpy().tolist()))
    if len(steps) > 1:
        raise BadInputError(
            f"the workers resumed from different optimizer steps {steps}. Every worker must see "
            "the same run directory: put it on a file system all of them mount.")


def _split(strategy, x: np.ndarray, y: np.ndarray):
    """One contiguous slice of the global batch per replica, by global replica id."""
    n = strategy.num_replicas_in_sync
    xs, ys = np.array_split(x, n), np.array_split(y, n)
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: (xs[ctx.replica_id_in_sync_group], ys[ctx.replica_id_in_sync_group]))


def _step_functions(model, strategy):
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


def _validate(val_logits, arrays: dict) -> tuple[float, float]:
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


def _close_epoch(state: dict[str, Any], val_loss: float, val_accuracy: float) -> dict[str, Any]:
    """Close the epoch in `state` as tasks.train does after `model.evaluate`. Returns the row."""
    partial = state["partial"]
    row = {"epoch": state["epoch"] + 1, "loss": partial["loss_sum"] / partial["seen"],
           "accuracy": partial["correct"] / partial["seen"], "val_loss": val_loss,
           "val_accuracy": val_accuracy}
    state["history"].append(row)
    best = state["best"]
    if best["val_accuracy"] is None or row["val_accuracy"] > best["val_accuracy"]:
        state["best"] = {"val_accuracy": row["val_accuracy"], "epoch": row["epoch"]}
    state.update(epoch=state["epoch"] + 1, batch=0,
                 partial={"loss_sum": 0.0, "correct": 0.0, "seen": 0},
                 saved_at=datetime.now(UTC).isoformat(timespec="seconds"))
    return row


def wait_for_chief(config: TrainConfig, timeout_s: float) -> DataRecord:
    """The chief's data record, once its fetch-data and build-model have run on this run dir.

    Another worker reads the run directory only; it starts training when the chief has written
    the data snapshot and the untrained model with the settings this worker was given.
    """
    run_dir = Path(config.run_dir)
    request = {"source": config.data, "train_samples": config.train_samples,
               "test_samples": config.test_samples, "seed": config.seed}
    deadline = time.monotonic() + timeout_s
    while True:
        manifest = read_manifest(run_dir)
        data, model = manifest.get("data"), manifest.get("model")
        if data and data.get("request") == request and model \
                and model.get("identity") == config.identity():
            return DataRecord(**data)
        if time.monotonic() >= deadline:
            raise BadInputError(
                f"no data and model from the chief in {run_dir} after {timeout_s:.0f} s (with "
                f"data={config.data!r}, units={config.units}, ...). Start the chief "
                "(`ckptflow run --strategy multi-worker`, TF_CONFIG index 0) with the same options "
                "and the same run directory, on a file system this worker mounts.")
        time.sleep(_POLL_S)


def run_worker(config: TrainConfig, wait_seconds: float) -> dict:
    """A non-chief worker of a multi-worker run: join, wait for the chief's data, train along."""
    if config.strategy != "multi-worker":
        raise BadInputError(f"ckptflow worker joins a multi-worker run. Received: "
                            f"strategy={config.strategy!r}. Expected: --strategy multi-worker.")
    strategy = strategy_for(config.strategy)  # first, before any TensorFlow op
    if is_chief(strategy):
        raise BadInputError("this process is the chief (TF_CONFIG task index 0); start it with "
                            "`ckptflow run --strategy multi-worker`, and the others with "
                            "`ckptflow worker`.")
    return train_with_strategy(config.run_dir, config, wait_for_chief(config, wait_seconds))


@task(name="join-cluster")
def join_cluster_task(config: TrainConfig) -> str:
    """Create the tf.distribute strategy now, before any stage runs a TensorFlow op."""
    if config.strategy == "default":
        return "one device"
    strategy = strategy_for(config.strategy)
    return f"{config.strategy}: {strategy.num_replicas_in_sync} replicas, {describe_worker(strategy)}"
