"""The checkpoint store alone: complete restore, retention, and refusing damaged checkpoints."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
from conftest import weights_digest

from ckptflow.core.checkpoints import COMMIT, CheckpointStore, CheckpointWriteError, rng_variables
from ckptflow.tutorial.model import create_model


def _trained_model(batches: int, seed: int = 1):
    model = create_model(units=16, seed=seed)
    rng = np.random.default_rng(0)
    for _ in range(batches):
        model.train_on_batch(rng.random((8, 784), dtype=np.float32), rng.integers(0, 10, 8))
    return model


def _state(step: int, epoch: int = 0, batch: int = 0) -> dict:
    return {"epoch": epoch, "batch": batch, "step": step, "history": [], "marker": step}


def test_restore_brings_back_weights_optimizer_and_dropout_rng(tmp_path):
    model = _trained_model(batches=5)
    store = CheckpointStore(tmp_path, keep=2)
    saved = store.save(model, _state(5, batch=5), epoch_end=False)
    fresh = create_model(units=16, seed=99)
    assert weights_digest(fresh) != weights_digest(model)
    state = store.restore(store.latest(), fresh)
    assert state["marker"] == 5 and saved.name == "cp-0000-b000005"
    assert int(fresh.optimizer.iterations) == 5
    assert weights_digest(fresh) == weights_digest(model)  # includes the seed-generator state
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert rng_variables(fresh) and all(
        np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(rng_variables(model), rng_variables(fresh), strict=True))


def test_epoch_end_checkpoints_hold_the_tutorials_keras_files(tmp_path):
    store = CheckpointStore(tmp_path)
    checkpoint = store.save(_trained_model(1), _state(1, epoch=1), epoch_end=True)
    names = sorted(p.name for p in checkpoint.path.iterdir())
    assert names == sorted([COMMIT, "state.json", "train_state.index",
                            "train_state.data-00000-of-00001", "cp-0001.keras",
                            "cp-0001.weights.h5"])


def test_keeps_only_the_newest_n_and_updates_the_tf_index(tmp_path):
    import tensorflow as tf

    model = _trained_model(1)
    store = CheckpointStore(tmp_path, keep=3)
    for step in range(1, 7):
        store.save(model, _state(step, batch=step), epoch_end=False)
    assert [c.step for c in store.all()] == [4, 5, 6]
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("cp-0000-b000006/train_state")
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop-commit"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
    model = _trained_model(1)
    store = CheckpointStore(tmp_path, keep=5)
    store.save(model, _state(1, batch=1), epoch_end=False)
    newest = store.save(model, _state(2, batch=2), epoch_end=False)
    data = newest.path / "train_state.data-00000-of-00001"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    else:
        (newest.path / COMMIT).unlink()
    with caplog.at_level(logging.WARNING, logger="ckptflow"):
        latest = store.latest()
    assert latest.step == 1
    assert newest.name in caplog.text


def test_an_unfinished_write_is_invisible_and_cleaned_up(tmp_path):
    model = _trained_model(1)
    store = CheckpointStore(tmp_path)
    store.save(model, _state(1, batch=1), epoch_end=False)
    half = tmp_path / ".tmp-cp-0000-b000002-deadbeef"  # what a kill mid-write leaves
    half.mkdir()
    (half / "train_state.index").write_bytes(b"partial")
    assert store.latest().step == 1
    store.save(model, _state(3, batch=3), epoch_end=False)
    assert not half.exists()


def test_commit_record_lists_every_file_with_its_hash(tmp_path):
    checkpoint = CheckpointStore(tmp_path).save(_trained_model(1), _state(1), epoch_end=False)
    commit = json.loads((checkpoint.path / COMMIT).read_text())
    assert set(commit["files"]) == {p.name for p in checkpoint.path.iterdir()} - {COMMIT}
    assert all(len(h) == 64 for h in commit["files"].values())


def test_a_snapshot_keeps_the_state_it_was_taken_at_while_training_goes_on(tmp_path):
    """Capture at a batch boundary, train on (weights, optimizer, dropout RNG and the tf.data
    iterator all move), then commit on another thread: the checkpoint and its Keras files hold
    the state of the capture, as `save` at that moment would have."""
    import tensorflow as tf

    model = _trained_model(batches=3)
    rng = np.random.default_rng(1)
    x, y = rng.random((64, 784), dtype=np.float32), rng.integers(0, 10, 64)
    pipeline = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64, seed=3).batch(8).repeat()
    iterator = iter(pipeline)
    store = CheckpointStore(tmp_path)
    capture = store.capture(model, _state(3, epoch=1), epoch_end=True, extra={"data": iterator})
    digest, trainable = weights_digest(model), [w.numpy() for w in model.trainable_weights]
    expected_next = next(iterator)  # what the capture's iterator yields next
    for _ in range(4):
        model.train_on_batch(*next(iterator))
    assert weights_digest(model) != digest and int(model.optimizer.iterations) == 7

    shell = create_model(units=16, seed=5)  # the Keras files are written from another model
    committed = []
    writer = threading.Thread(target=lambda: committed.append(
        store.commit(capture, keras_model=lambda: shell)))
    writer.start()
    writer.join()
    [checkpoint] = committed
    assert store.verify(checkpoint) is None and store.latest() == checkpoint
    fresh, fresh_iterator = create_model(units=16, seed=99), iter(pipeline)
    state = store.restore(checkpoint, fresh, extra={"data": fresh_iterator})
    assert state["marker"] == 3 and int(fresh.optimizer.iterations) == 3
    assert weights_digest(fresh) == digest
    for a, b in zip(next(fresh_iterator), expected_next, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    from_h5 = create_model(units=16, seed=98)
    from_h5.load_weights(checkpoint.path / "cp-0001.weights.h5")
    for a, b in zip(from_h5.trainable_weights, trainable, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    import keras

    assert int(keras.models.load_model(checkpoint.path / "cp-0001.keras").optimizer.iterations) == 3


def test_a_failed_background_commit_is_raised_on_the_training_thread(tmp_path):
    from ckptflow.core.checkpoint_saves import CheckpointSaves, SavePolicy

    model = _trained_model(batches=1)
    store = CheckpointStore(tmp_path / "checkpoints")
    saves = CheckpointSaves(store, SavePolicy(every_batches=1, budget=0.0))
    first = []
    saves.save(model, _state(1, batch=1), epoch_end=False, then=first.append)
    saves.wait()
    assert saves.latest.step == 1 and first == [saves.latest] and saves.committed == 1
    assert saves.bytes_written == sum(p.stat().st_size for p in saves.latest.path.iterdir())
    (tmp_path / "a-file").write_text("")
    store.directory = tmp_path / "a-file" / "checkpoints"  # cannot be created: the write fails
    saves.save(model, _state(2, batch=2), epoch_end=False, then=first.append)
    with pytest.raises(CheckpointWriteError, match="writing checkpoint .*cp-0000-b000002 failed"):
        saves.wait()
    assert saves.latest.step == 1 and len(first) == 1 and saves.committed == 1
    # as an attempt fails: close lets the commit in flight land and counts it, runs no `then`
    store.directory = tmp_path / "checkpoints"
    saves.save(model, _state(3, batch=3), epoch_end=False, then=first.append)
    saves.close()
    assert saves.latest.step == 3 and store.latest().step == 3 and len(first) == 1
    costs = saves.costs()
    assert (costs["committed"], costs["background"], costs["deferred"]) == (2, True, 0)
