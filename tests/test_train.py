"""train-with-checkpoints and resume-from-latest as plain functions: counters, exactness, refusals."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from conftest import small_config, tree_digest, weights_digest

from ckptflow.core.checkpoint_saves import SavePolicy
from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.errors import BadInputError, InjectedFailure
from ckptflow.core.files import size_of
from ckptflow.core.manifest import checkpoint_cost, read_manifest
from ckptflow.core.restore import restore_model
from ckptflow.core.resume_point import find_resume_point
from ckptflow.core.run_dir import RunDir
from ckptflow.stages.build_model import build_model_stage
from ckptflow.stages.prepare import prepare_run
from ckptflow.training.stage import train_with_checkpoints


def written_mb(costs: dict) -> str:
    return f"{costs['bytes_written'] / 1e6:,.1f}"


def final_digest(run_dir, record) -> str:
    return weights_digest(restore_model(run_dir, record.checkpoint))


def test_fresh_training_counts_epochs_batches_and_optimizer_steps(tmp_path):
    config = small_config(tmp_path, epochs=2)
    record = train_with_checkpoints(tmp_path, config, prepare_run(config))
    assert (record.epoch, record.step, record.start_epoch, record.resumed_from) == (2, 16, 0, None)
    assert int(restore_model(tmp_path, record.checkpoint).optimizer.iterations) == 16
    history = pd.read_csv(RunDir(tmp_path).history)
    assert history["epoch"].tolist() == [1, 2]
    assert list(history.columns) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert history["loss"].iloc[1] < history["loss"].iloc[0]
    # saves every 3 batches inside an epoch (3, 6) and at each epoch end, newest 5 kept
    names = [c.name for c in CheckpointStore(tmp_path / "checkpoints").all()]
    assert names == ["cp-0000-b000006", "cp-0001", "cp-0001-b000003", "cp-0001-b000006",
                     "cp-0002"]
    # the attempt's checkpoint cost: 6 committed in the background, what each wrote counted
    costs = read_manifest(tmp_path)["training"]["attempts"][-1]["checkpoints"]
    assert costs["committed"] == 6 and costs["deferred"] == 0 and costs["background"]
    kept = sum(size_of(c.path) for c in CheckpointStore(tmp_path / "checkpoints").all())
    assert kept < costs["bytes_written"] < 2 * kept  # one more, smaller, was pruned
    assert 0 < costs["waited_seconds"] < costs["training_seconds"]
    assert costs["cost"] == pytest.approx(costs["waited_seconds"] / costs["training_seconds"],
                                          abs=2e-3)  # each rounded on its own
    # what it waited for, apart: the saves the budget governs (mid-epoch) and those it does not
    by = costs["waited_by"]
    assert sum(by.values()) == pytest.approx(costs["waited_seconds"], abs=3e-3)
    assert by["mid_epoch"] > 0 and by["epoch_end"] > 0 and by["stop_or_end"] >= 0
    said = checkpoint_cost(read_manifest(tmp_path)["training"])
    assert said.startswith("checkpointing cost ") and "% of training: it waited " in said
    assert f"; 6 checkpoints committed in the background, {written_mb(costs)} MB written" in said


def test_the_save_policy_keeps_mid_epoch_saves_within_the_time_budget():
    now = [0.0]
    policy = SavePolicy(every_batches=4, budget=0.02, clock=lambda: now[0])
    assert [b for b in range(1, 13) if policy.due(b, steps=12)] == [4, 8]  # never the epoch end
    policy.saved(0.5)  # a 0.5 s save: the next one waits 0.5 / 0.02 = 25 s
    now[0] = 24.9
    assert not policy.due(8, steps=12)
    now[0] = 25.0
    assert policy.due(8, steps=12) and not policy.due(9, steps=12)
    # the previous checkpoint still being written: put off, not waited for
    assert not policy.due(8, steps=12, busy=True) and policy.deferred == 2
    unlimited = SavePolicy(every_batches=4, budget=0.0, clock=lambda: now[0])
    unlimited.saved(100.0)
    assert unlimited.due(4, steps=12) and unlimited.due(4, steps=12, busy=True)  # it waits
    # a save's stall and then its background commit's CPU time add up: 2 x 0.1 s / 0.05 = 4 s
    now[0] = 100.0
    charged = SavePolicy(every_batches=4, budget=0.05, clock=lambda: now[0])
    charged.saved(0.1)
    charged.saved(0.1)
    now[0] = 103.9
    assert not charged.due(4, steps=12)
    now[0] = 104.0
    assert charged.due(4, steps=12)
    assert not SavePolicy(every_batches=0, budget=0.0).due(4, steps=12)


def test_the_default_budget_skips_mid_epoch_saves_that_would_cost_too_much(tmp_path):
    config = small_config(tmp_path, epochs=1, checkpoint_budget=0.02)
    train_with_checkpoints(tmp_path, config, prepare_run(config))
    # a save takes tens of milliseconds and an epoch here well under a second: after the first
    # mid-epoch save (batch 3) the budget defers the rest; the epoch end is always saved
    names = [c.name for c in CheckpointStore(tmp_path / "checkpoints").all()]
    assert names == ["cp-0000-b000003", "cp-0001"]
    assert read_manifest(tmp_path)["training"]["attempts"][-1]["checkpoints"]["deferred"] == 1


def test_more_epochs_continue_from_the_latest_checkpoint(tmp_path):
    config = small_config(tmp_path, epochs=2)
    data = prepare_run(config)
    train_with_checkpoints(tmp_path, config, data)
    record = train_with_checkpoints(tmp_path, small_config(tmp_path, epochs=3), data)
    assert (record.start_epoch, record.start_batch, record.epoch) == (2, 0, 3)
    assert record.batches_trained == 8 and record.step == 24
    assert record.resumed_from == "checkpoints/cp-0002"
    assert pd.read_csv(RunDir(tmp_path).history)["epoch"].tolist() == [1, 2, 3]


def test_a_complete_run_trains_nothing(tmp_path):
    config = small_config(tmp_path, epochs=1)
    data = prepare_run(config)
    first = train_with_checkpoints(tmp_path, config, data)
    before = tree_digest(tmp_path / "checkpoints")
    again = train_with_checkpoints(tmp_path, config, data)
    assert again.batches_trained == 0 and again.checkpoint == first.checkpoint
    assert tree_digest(tmp_path / "checkpoints") == before


def test_resume_mid_epoch_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight = small_config(tmp_path / "straight", epochs=3)
    reference = train_with_checkpoints(straight.run_dir, straight, prepare_run(straight))

    resumed = small_config(tmp_path / "resumed", epochs=2)
    data = prepare_run(resumed)
    train_with_checkpoints(resumed.run_dir, resumed, data)
    # as if killed 6 batches into epoch 2: its end-of-epoch checkpoint never got written
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "cp-0002")
    point = find_resume_point(resumed.run_dir, resumed.identity(), data.data_sha256)
    assert (point.epoch, point.batch, point.step) == (1, 6, 14)
    record = train_with_checkpoints(resumed.run_dir, small_config(tmp_path / "resumed", epochs=3),
                                    data)
    assert (record.start_epoch, record.start_batch, record.batches_trained) == (1, 6, 10)
    assert record.step == reference.step == 24
    assert final_digest(resumed.run_dir, record) == final_digest(straight.run_dir, reference)
    pd.testing.assert_frame_equal(pd.read_csv(RunDir(tmp_path / "resumed").history),
                                  pd.read_csv(RunDir(tmp_path / "straight").history), rtol=1e-5)


def test_fault_drill_fails_once_after_the_committed_epoch(tmp_path):
    config = small_config(tmp_path, epochs=3, fail_after_epoch=1)
    data = prepare_run(config)
    with pytest.raises(InjectedFailure):
        train_with_checkpoints(tmp_path, config, data)
    assert CheckpointStore(tmp_path / "checkpoints").latest().name == "cp-0001"
    record = train_with_checkpoints(tmp_path, config, data)
    assert (record.start_epoch, record.epoch, record.batches_trained) == (1, 3, 16)


@pytest.mark.parametrize("change", [{"units": 32}, {"dropout": 0.5}, {"learning_rate": 0.01},
                                    {"batch_size": 16}])
def test_resuming_with_other_settings_is_refused_and_nothing_changes(tmp_path, change):
    config = small_config(tmp_path, epochs=1)
    data = prepare_run(config)
    train_with_checkpoints(tmp_path, config, data)
    before = tree_digest(tmp_path)
    with pytest.raises(BadInputError, match="trained with other settings") as info:
        train_with_checkpoints(tmp_path, small_config(tmp_path, epochs=2, **change), data)
    assert "\n" not in str(info.value) and "--run-dir" in str(info.value)
    assert tree_digest(tmp_path) == before


def test_checkpoints_without_commit_records_are_refused_not_silently_restarted(tmp_path):
    config = small_config(tmp_path, epochs=1)
    data = prepare_run(config)
    train_with_checkpoints(tmp_path, config, data)
    for commit in (tmp_path / "checkpoints").glob("cp-*/COMMIT.json"):
        commit.unlink()
    before = tree_digest(tmp_path)
    with pytest.raises(BadInputError, match="no valid checkpoint"):
        train_with_checkpoints(tmp_path, small_config(tmp_path, epochs=2), data)
    assert tree_digest(tmp_path) == before


def test_a_missing_untrained_model_does_not_let_other_settings_in(tmp_path):
    config = small_config(tmp_path, epochs=1)
    data = prepare_run(config)
    train_with_checkpoints(tmp_path, config, data)
    (tmp_path / "model" / "initial.keras").unlink()
    before = tree_digest(tmp_path)
    with pytest.raises(BadInputError, match="started with a different model"):
        build_model_stage(tmp_path, small_config(tmp_path, units=32).identity(), data)
    assert tree_digest(tmp_path) == before


def test_no_deterministic_really_leaves_op_determinism_off(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import sys\nfrom pathlib import Path\n"
        "sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + '/tests')\n"
        "from conftest import small_config\n"
        "from ckptflow.stages.prepare import prepare_run\n"
        "from ckptflow.training.stage import train_with_checkpoints\n"
        "from tensorflow.python.framework import config as tf_config\n"
        "for flag in (False, True):\n"
        "    c = small_config(Path(sys.argv[2]) / str(flag), epochs=1, deterministic=flag)\n"
        "    train_with_checkpoints(c.run_dir, c, prepare_run(c))\n"
        "    print(flag, tf_config.is_op_determinism_enabled())\n")
    result = subprocess.run([sys.executable, "-c", code, str(REPO), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "False", "True", "True"]


def test_a_model_built_mid_training_leaves_the_global_generators_alone(tmp_path):
    import random

    import numpy as np
    from conftest import REPO
    from keras.src.random.seed_generator import global_seed_generator

    from ckptflow.core.models import ModelSource

    config = small_config(tmp_path, epochs=1)
    sides = [  # the tutorial's model, and one whose layers draw their seeds from `random`
        (ModelSource.from_identity(config.identity()), np.zeros((2, 784), "float32"),
         np.zeros(2, "int64")),
        (ModelSource(f"{REPO}/examples/diabetes_regression/model.py:build", seed=7),
         np.zeros((2, 10), "float32"), np.zeros(2, "float32"))]

    def generators():
        numpy_state = np.random.get_state()
        return (random.getstate(), numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:],
                global_seed_generator().state.numpy().tolist())

    unchanged = []

    def mid_training(state) -> None:
        if state.step == 2:
            random.random(), np.random.rand(), global_seed_generator().next()  # as other code may
            before = generators()
            for source, x, y in sides:
                source.build(x, y)
            unchanged.append(generators() == before)

    train_with_checkpoints(tmp_path, config, prepare_run(config), on_batch_end=mid_training)
    assert unchanged == [True]
