"""train-with-checkpoints: train to `epochs`, resuming from the latest checkpoint, saving as it goes."""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from prefect import task
from pydantic import BaseModel

from tasks.checkpoints import Checkpoint, CheckpointStore
from tasks.config import TrainConfig
from tasks.data import DataRecord, data_digest, load_snapshot
from tasks.errors import BadInputError, InjectedFailure, InjectedIOError
from tasks.files import atomic_write_bytes
from tasks.lock import run_dir_lock
from tasks.manifest import artifact_entry, read_manifest, set_artifacts, update_manifest
from tasks.model import INITIAL_MODEL, build_model
from tasks.policy import retry_options
from tasks.resume import CHECKPOINTS, CheckpointRef, find_resume_point

log = logging.getLogger("ckptflow.train")

HISTORY = Path("metrics") / "history.csv"
TENSORBOARD = Path("tensorboard")
FAULTS = Path("faults")
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]

EpochCallback = Callable[[dict[str, Any], dict[str, Any]], None]
BatchCallback = Callable[[dict[str, Any]], None]


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

    def checkpoint_ref(self) -> CheckpointRef:
        """The final checkpoint alone: what evaluation and export depend on."""
        return CheckpointRef(path=self.checkpoint, commit_sha256=self.commit_sha256,
                             epoch=self.epoch, batch=self.batch, step=self.step)


class SavePolicy:
    """When to commit a mid-epoch checkpoint: every `every_batches` batches, within a time budget.

    A save that took t seconds defers the next mid-epoch save until t / `budget` seconds have
    passed, so checkpoints take at most about `budget` of the training time however slow the disk
    or large the model (CheckFreq's idea). At 60,000 images a checkpoint every 16 batches would
    otherwise be 117 saves an epoch. A budget of 0 saves exactly every `every_batches` batches.
    Epoch ends are always saved, and count against the budget too.

    Example:
        policy = SavePolicy(every_batches=16, budget=0.02)
        if policy.due(batch, steps):
            policy.saved(seconds_the_save_took)
    """

    def __init__(self, every_batches: int, budget: float,
                 clock: Callable[[], float] = time.monotonic):
        self.every_batches = every_batches
        self.budget = budget
        self.clock = clock
        self._not_before = -math.inf

    def due(self, batch: int, steps: int) -> bool:
        """Whether to save after `batch` batches of an epoch of `steps` batches."""
        if not self.every_batches or batch % self.every_batches or batch >= steps:
            return False
        return self.clock() >= self._not_before

    def saved(self, seconds: float) -> None:
        """Record a committed save that took `seconds`."""
        if self.budget:
            self._not_before = self.clock() + seconds / self.budget


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The batch order of one epoch: a permutation derived from (seed, epoch) alone.

    Unlike `fit(shuffle=True)` under a global seed (the same order every epoch), each epoch gets
    a fresh order, and a resumed run recomputes exactly the order it was interrupted in.
    """
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_with_checkpoints(run_dir: str | Path, config: TrainConfig, data: DataRecord,
                           on_epoch_end: EpochCallback | None = None,
                           on_batch_end: BatchCallback | None = None) -> TrainRecord:
    """Train until `config.epochs` epochs are done, continuing from the latest valid checkpoint.

    Checkpoints are committed at every epoch end and every `config.save_every_batches` batches,
    as `config.checkpoint_budget` allows (see SavePolicy).
    With the same seed, a run stopped and resumed any number of times ends with the same weights
    as a run that was never stopped. Holds the run directory's lock while it trains.

    Args:
        on_epoch_end: called with the epoch's history row and the state, after its checkpoint.
        on_batch_end: called with the state after every batch (progress, fault drills).
    """
    if config.strategy != "default":  # tf.distribute only when asked for
        from tasks.distributed import train_with_strategy

        return train_with_strategy(run_dir, config, data, on_epoch_end, on_batch_end)
    with run_dir_lock(run_dir, config.wait_for_lock):
        return _train(Path(run_dir), config, data, on_epoch_end, on_batch_end)


def _train(run_dir: Path, config: TrainConfig, data: DataRecord,
           on_epoch_end: EpochCallback | None, on_batch_end: BatchCallback | None) -> TrainRecord:
    arrays = load_snapshot(run_dir / data.path)
    if data_digest(arrays) != data.data_sha256:
        raise BadInputError(f"data snapshot {run_dir / data.path} changed since fetch-data "
                            "recorded it. Run the flow again to re-check the data.")
    store = CheckpointStore(run_dir / CHECKPOINTS, keep=config.keep_checkpoints)
    point = find_resume_point(run_dir, config.identity(), data.data_sha256)
    model = build_model(config.units, config.dropout, config.learning_rate, config.seed,
                        config.deterministic)
    if point is None:
        model.load_weights(run_dir / INITIAL_MODEL)
        state = _fresh_state(config, data)
        latest = None
    else:
        latest = Checkpoint(run_dir / point.path, point.epoch, point.batch, point.step)
        state = store.restore(latest, model)
        if int(model.optimizer.iterations) != state["step"]:
            raise RuntimeError(f"{latest.path}: optimizer restored at step "
                               f"{int(model.optimizer.iterations)}, state says {state['step']}")
        state["config"] = config.model_dump()
        log.info("resuming from %s: epoch %d, batch %d, optimizer step %d", latest.name,
                 state["epoch"], state["batch"], int(model.optimizer.iterations))
    start_epoch, start_batch, start_step = state["epoch"], state["batch"], state["step"]
    if state["epoch"] >= config.epochs:
        log.info("run already has %d epochs (asked for %d): nothing to train", state["epoch"],
                 config.epochs)

    # As tensors, and the arrays let go: one copy of the images, as `fit` makes of a user's.
    x, y = tf.constant(arrays.pop("x_train")), tf.constant(arrays.pop("y_train"))
    steps = math.ceil(len(y) / config.batch_size)
    summaries = _tensorboard_writer(run_dir) if state["epoch"] < config.epochs else None
    policy = SavePolicy(config.save_every_batches, config.checkpoint_budget)
    while state["epoch"] < config.epochs:
        # The rest of this epoch in its order, through Keras' own compiled loop (`fit` costs
        # ~15% less per batch than a `train_on_batch` loop); saves happen between batches.
        rest = epoch_order(config.seed, state["epoch"], len(y))[state["batch"] * config.batch_size:]
        if len(rest):
            saver = _MidEpochSaves(run_dir, config, store, policy, state, len(rest), steps,
                                   on_batch_end)
            model.fit(_batches(x, y, rest, config.batch_size), epochs=1, shuffle=False, verbose=0,
                      callbacks=[saver])
        if int(model.optimizer.iterations) != state["step"]:
            raise RuntimeError(f"optimizer at step {int(model.optimizer.iterations)} after epoch "
                               f"{state['epoch'] + 1}, the checkpoint state says {state['step']}")
        row = _finish_epoch(model, state, arrays, config.batch_size)
        latest = _save(store, model, state, policy, epoch_end=True)
        after_epoch(run_dir, config, state, row, latest.name, summaries, on_epoch_end)

    if summaries is not None:
        summaries.close()
    _write_history(run_dir, state["history"])  # also after a kill between checkpoint and CSV
    record = TrainRecord(
        checkpoint=latest.path.relative_to(run_dir).as_posix(),
        commit_sha256=latest.commit_sha256(), epoch=state["epoch"], batch=latest.batch,
        step=state["step"],
        resumed_from=point.path if point else None, start_epoch=start_epoch,
        start_batch=start_batch, batches_trained=state["step"] - start_step,
        best_val_accuracy=state["best"]["val_accuracy"], history_path=HISTORY.as_posix())
    _record_in_manifest(run_dir, store, record, config)
    return record


def _batches(x, y, order: np.ndarray, batch_size: int):
    """(x, y) batches in `order`, gathered batch by batch (no reordered copy of the images)."""
    indices = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
    return indices.map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))


class _MidEpochSaves(keras.callbacks.Callback):
    """Keeps the resume state in step with `fit`, batch by batch, and commits a checkpoint
    whenever the SavePolicy says so.

    `fit` resets its metrics when it starts, so its logs are means since then; times the
    samples seen since then, added to the sums the state held at the start, they give the
    epoch's running sums a mid-epoch checkpoint stores.
    """

    def __init__(self, run_dir: Path, config: TrainConfig, store: CheckpointStore,
                 policy: SavePolicy, state: dict[str, Any], samples_left: int, steps: int,
                 on_batch_end: BatchCallback | None):
        super().__init__()
        self.run_dir, self.config, self.store, self.policy = run_dir, config, store, policy
        self.state, self.steps, self.on_batch_end = state, steps, on_batch_end
        self.start = {k: state[k] for k in ("batch", "step", "partial")}
        self.samples_left = samples_left

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        state, start = self.state, self.start
        seen = min((batch + 1) * self.config.batch_size, self.samples_left)
        state["batch"], state["step"] = start["batch"] + batch + 1, start["step"] + batch + 1
        state["partial"] = {"loss_sum": start["partial"]["loss_sum"] + logs["loss"] * seen,
                            "correct": start["partial"]["correct"] + logs["accuracy"] * seen,
                            "seen": start["partial"]["seen"] + seen}
        if self.policy.due(state["batch"], self.steps):
            _save(self.store, self.model, state, self.policy, epoch_end=False)
        if self.on_batch_end is not None:
            self.on_batch_end(state)
        _maybe_inject_io_error(self.run_dir, self.config, state["step"])


def _save(store: CheckpointStore, model, state: dict[str, Any], policy: SavePolicy,
          epoch_end: bool) -> Checkpoint:
    started = policy.clock()
    checkpoint = store.save(model, state, epoch_end=epoch_end)
    policy.saved(policy.clock() - started)
    return checkpoint


def _fresh_state(config: TrainConfig, data: DataRecord) -> dict[str, Any]:
    """Everything a resume needs, at the start of training (nanoGPT's checkpoint dict)."""
    return {
        "epoch": 0, "batch": 0, "step": 0,
        "partial": {"loss_sum": 0.0, "correct": 0.0, "seen": 0},
        "history": [],
        "best": {"val_accuracy": None, "epoch": None},
        "identity": config.identity(),
        "data_sha256": data.data_sha256,
        "config": config.model_dump(),
    }


def after_epoch(run_dir: Path, config: TrainConfig, state: dict[str, Any], row: dict[str, Any],
                checkpoint: str, summaries, on_epoch_end: EpochCallback | None) -> None:
    """Once an epoch's checkpoint is committed: history CSV, TensorBoard, log line, callback, drill."""
    _write_history(run_dir, state["history"])
    _write_tensorboard(summaries, row)
    log.info("epoch %d/%d: loss %.4f, accuracy %.4f, val_loss %.4f, val_accuracy %.4f "
             "(checkpoint %s)", row["epoch"], config.epochs, row["loss"], row["accuracy"],
             row["val_loss"], row["val_accuracy"], checkpoint)
    if on_epoch_end is not None:
        on_epoch_end(row, state)
    _maybe_inject_failure(run_dir, config, state["epoch"])


def _finish_epoch(model, state: dict[str, Any], arrays: dict, batch_size: int) -> dict[str, Any]:
    """Close the epoch in `state`: history row, best score, counters. Returns the row."""
    partial = state["partial"]
    val = model.evaluate(arrays["x_test"], arrays["y_test"], batch_size=max(256, batch_size),
                         verbose=0, return_dict=True)
    row = {
        "epoch": state["epoch"] + 1,
        "loss": partial["loss_sum"] / partial["seen"],
        "accuracy": partial["correct"] / partial["seen"],
        "val_loss": float(val["loss"]),
        "val_accuracy": float(val["accuracy"]),
    }
    state["history"].append(row)
    best = state["best"]
    if best["val_accuracy"] is None or row["val_accuracy"] > best["val_accuracy"]:
        state["best"] = {"val_accuracy": row["val_accuracy"], "epoch": row["epoch"]}
    state["epoch"] += 1
    state["batch"] = 0
    state["partial"] = {"loss_sum": 0.0, "correct": 0.0, "seen": 0}
    state["saved_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return row


def _write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    import pandas as pd

    buffer = io.StringIO()
    pd.DataFrame(history, columns=HISTORY_COLUMNS).to_csv(buffer, index=False)
    atomic_write_bytes(run_dir / HISTORY, buffer.getvalue().encode())


def _tensorboard_writer(run_dir: Path):
    return tf.summary.create_file_writer(str(run_dir / TENSORBOARD))


def _write_tensorboard(writer, row: dict[str, Any]) -> None:
    """Per-epoch scalars for `tensorboard --logdir RUN_DIR/tensorboard`, named as Keras' callback
    names them (train/epoch_loss, validation/epoch_accuracy, ...)."""
    with writer.as_default():
        for name in HISTORY_COLUMNS[1:]:
            split = "validation" if name.startswith("val_") else "train"
            tf.summary.scalar(f"{split}/epoch_{name.removeprefix('val_')}", row[name],
                              step=row["epoch"])
    writer.flush()


def _maybe_inject_failure(run_dir: Path, config: TrainConfig, epoch: int) -> None:
    """Fault drill: fail right after epoch `fail_after_epoch` is committed, and in each of the
    next `fail_attempts - 1` attempts at their first epoch end (a marker in faults/ counts them)."""
    if config.fail_after_epoch is None or epoch < config.fail_after_epoch:
        return
    fired = next((k for k in range(1, config.fail_attempts + 1)
                  if _first_time(run_dir, f"fail_after_epoch-{config.fail_after_epoch}-{k}")), None)
    if fired is not None:
        raise InjectedFailure(f"injected failure {fired} of {config.fail_attempts} after epoch {epoch} "
                              f"(fail_after_epoch={config.fail_after_epoch}); "
                              "run again to resume from the checkpoint")


def _maybe_inject_io_error(run_dir: Path, config: TrainConfig, step: int) -> None:
    """Fault drill: a transient I/O error once per run directory at `io_error_at_step`."""
    if config.io_error_at_step == step and _first_time(run_dir, f"io_error_at_step-{step}"):
        raise InjectedIOError(f"injected I/O error at step {step} (io_error_at_step={step})")


def _first_time(run_dir: Path, drill: str) -> bool:
    """True the first time a drill fires in a run directory (it leaves a marker in faults/)."""
    marker = run_dir / FAULTS / drill
    if marker.exists():
        return False
    atomic_write_bytes(marker, b"fired\n")
    return True


def _record_in_manifest(run_dir: Path, store: CheckpointStore, record: TrainRecord,
                        config: TrainConfig) -> None:
    attempts = read_manifest(run_dir).get("training", {}).get("attempts", [])
    attempts.append({
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "resumed_from": record.resumed_from, "start_epoch": record.start_epoch,
        "start_batch": record.start_batch, "end_epoch": record.epoch,
        "batches_trained": record.batches_trained,
    })
    update_manifest(run_dir, parameters=config.model_dump(),
                    training={**record.model_dump(), "attempts": attempts})
    set_artifacts(run_dir, "checkpoint", [  # only checkpoints that match their commit records
        artifact_entry(run_dir, c.path, "checkpoint", "ckptflow-checkpoint", epoch=c.epoch,
                       batch=c.batch, step=c.step) for c in store.all() if store.verify(c) is None])
    set_artifacts(run_dir, "history", [artifact_entry(run_dir, run_dir / HISTORY, "history", "csv")])
    set_artifacts(run_dir, "tensorboard", [
        artifact_entry(run_dir, run_dir / TENSORBOARD, "tensorboard", "tfevents")]
        if (run_dir / TENSORBOARD).is_dir() else [])


@task(name="train-with-checkpoints", **retry_options())
def train_task(config: TrainConfig, data: DataRecord) -> TrainRecord:
    """Train with checkpoints; a retry resumes from the newest checkpoint, not from zero."""
    from tasks.reporting import EpochProgress

    progress = EpochProgress(config)
    record = train_with_checkpoints(config.run_dir, config, data, on_epoch_end=progress.update)
    progress.set(record.epoch)  # also for a resumed or already complete run
    return record
