"""Damage drills: a damaged newest checkpoint, a failing disk, and a failure mid-epoch in Prefect."""

from __future__ import annotations

import logging
import resource
import signal

import numpy as np
import pytest
from conftest import small_config

from ckptflow.core.checkpoints import CheckpointStore, CheckpointWriteError
from ckptflow.core.errors import is_transient
from ckptflow.core.manifest import read_manifest
from ckptflow.stages.prepare import prepare_run
from ckptflow.training.stage import train_with_checkpoints
from ckptflow.tutorial.model import create_model


def test_a_flipped_byte_in_the_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    config = small_config(tmp_path, epochs=1)
    data = prepare_run(config)
    train_with_checkpoints(tmp_path, config, data)
    newest = tmp_path / "checkpoints" / "cp-0001"
    weights = newest / "train_state.data-00000-of-00001"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    weights.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="ckptflow"):
        record = train_with_checkpoints(tmp_path, small_config(tmp_path, epochs=2), data)
    assert record.resumed_from == "checkpoints/cp-0000-b000006"
    assert (record.start_epoch, record.start_batch, record.epoch) == (0, 6, 2)
    assert "skipping checkpoint" in caplog.text and "cp-0001" in caplog.text


def test_a_full_disk_keeps_the_previous_checkpoint_and_is_retryable(tmp_path):
    model = create_model(units=64, seed=3)
    store = CheckpointStore(tmp_path)
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.random((8, 784), dtype=np.float32), rng.integers(0, 10, 8))
    good = store.save(model, {"epoch": 0, "batch": 1, "step": 1}, epoch_end=False)
    model.train_on_batch(rng.random((8, 784), dtype=np.float32), rng.integers(0, 10, 8))
    # A real write failure: the kernel refuses to grow any file past 64 KiB (EFBIG).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointWriteError, match="File too large") as info:
            store.save(model, {"epoch": 0, "batch": 2, "step": 2}, epoch_end=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert is_transient(info.value)
    assert store.latest() == good and store.verify(good) is None
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.usefixtures("prefect_server")
def test_an_error_mid_epoch_is_retried_by_the_task_and_resumes_mid_epoch(tmp_path):
    from ckptflow.flows.train_pipeline import train_pipeline

    # 8 batches an epoch, saves after batches 3 and 6: step 13 is batch 5 of epoch 2, so the
    # newest checkpoint then is step 11 (epoch 1 + 3 batches).
    config = small_config(tmp_path, epochs=2, io_error_at_step=13)
    summary = train_pipeline.with_options(retries=0)(config)
    attempts = read_manifest(tmp_path)["training"]["attempts"]
    assert [(a["resumed_from"], a["start_epoch"], a["start_batch"]) for a in attempts] == \
        [("checkpoints/cp-0001-b000003", 1, 3)]
    assert summary["training"]["step"] == 16 and summary["training"]["batches_trained"] == 5
