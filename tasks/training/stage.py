"""train-with-checkpoints: train to `epochs`, resuming from the latest checkpoint, saving as it goes."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ckptflow.config import TrainConfig
from ckptflow.core.lock import run_dir_lock
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import DataRecord
from ckptflow.orchestration.retries import retry_options
from ckptflow.training.cluster import describe_worker, strategy_for
from ckptflow.training.loop import train_on_one_device
from ckptflow.training.setup import BatchCallback, EpochCallback, TrainRecord


def train_with_checkpoints(run_dir: str | Path, config: TrainConfig, data: DataRecord,
                           on_epoch_end: EpochCallback | None = None,
                           on_batch_end: BatchCallback | None = None) -> TrainRecord:
    """Train until `config.epochs` epochs are done, continuing from the latest valid checkpoint.

    A run stopped and resumed any number of times ends with the weights of a run never stopped.

    Args:
        on_epoch_end: called with the epoch's history row and the state, after its checkpoint.
        on_batch_end: called with the state after every batch (progress, fault drills).
    """
    if config.strategy != "default":  # tf.distribute only when asked for
        from ckptflow.training.replicas import train_with_strategy

        return train_with_strategy(run_dir, config, data, on_epoch_end, on_batch_end)
    with run_dir_lock(run_dir, config.wait_for_lock):
        return train_on_one_device(RunDir(run_dir), config, data, on_epoch_end, on_batch_end)


@task(name="train-with-checkpoints", persist_result=False, **retry_options())
def train_task(config: TrainConfig, data: DataRecord) -> TrainRecord:
    """Train with checkpoints; a retry resumes from the newest checkpoint, not from zero."""
    from ckptflow.orchestration.artifacts import EpochProgress

    progress = EpochProgress(config)
    record = train_with_checkpoints(config.run_dir, config, data, on_epoch_end=progress.update)
    progress.set(record.epoch)  # also for a resumed or already complete run
    return record


@task(name="join-cluster", persist_result=False)
def join_cluster_task(config: TrainConfig) -> str:
    """Create the tf.distribute strategy now, before any stage runs a TensorFlow op."""
    if config.strategy == "default":
        return "one device"
    strategy = strategy_for(config.strategy, config.peer_timeout_seconds)
    return f"{config.strategy}: {strategy.num_replicas_in_sync} replicas, {describe_worker(strategy)}"
