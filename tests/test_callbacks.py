"""A user's Keras callbacks: called where fit() calls them, their state in every checkpoint, so a
resume is exact; early stopping completes a run; a callback that raises loses nothing."""

from __future__ import annotations

import json
import logging
import textwrap

import pandas as pd
import pytest
from conftest import small_config, weights_digest

from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.errors import BadInputError, InjectedIOError
from ckptflow.core.manifest import read_manifest
from ckptflow.core.restore import restore_model
from ckptflow.core.run_dir import RunDir
from ckptflow.stages.prepare import prepare_run
from ckptflow.training.stage import train_with_checkpoints

CALLBACKS = '''
import keras


class Counter(keras.callbacks.Callback):
    """Counts the hooks it sees; its count is resume state (get_state / set_state)."""

    def __init__(self, raise_at_epoch=None):
        super().__init__()
        self.seen = {"epochs_begun": 0, "batches": 0, "validations": 0, "validated_batches": 0,
                     "epochs_ended": 0}
        self.raise_at_epoch = raise_at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.seen["epochs_begun"] += 1

    def on_train_batch_end(self, batch, logs=None):
        assert isinstance(logs["loss"], float), logs
        self.seen["batches"] += 1

    def on_test_batch_end(self, batch, logs=None):
        assert isinstance(logs["loss"], float), logs
        self.seen["validated_batches"] += 1

    def on_test_end(self, logs=None):
        assert set(logs) == {"loss", "accuracy"}, logs  # val_ names come after, in fit too
        self.seen["validations"] += 1

    def on_epoch_end(self, epoch, logs=None):
        assert self.seen["validations"] == epoch + 1  # validated before the epoch ends
        if epoch == self.raise_at_epoch:
            raise ValueError(f"no good at epoch {epoch}")
        self.seen["epochs_ended"] += 1

    def get_state(self):
        return dict(self.seen)

    def set_state(self, state):
        self.seen = dict(state)


class Recorder(keras.callbacks.Callback):
    """Has no get_state: named in the log as not checkpointed."""


def plateau_and_stop(patience=2, raise_at_epoch=None, restore_best_weights=False):
    # min_delta so large that nothing counts as better after the first epoch: the rate halves
    # at every later epoch end, and EarlyStopping stops after epoch 1 + patience
    return [keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0,
                                              min_delta=100.0),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, min_delta=100.0,
                                          restore_best_weights=restore_best_weights),
            Counter(raise_at_epoch), Recorder()]


def backup(tmp):
    return [keras.callbacks.BackupAndRestore(tmp)]


def not_callbacks():
    return ["early stopping, please"]
'''


@pytest.fixture
def callbacks_file(tmp_path):
    path = tmp_path / "my_callbacks.py"
    path.write_text(textwrap.dedent(CALLBACKS))
    return f"{path}:plateau_and_stop"


def final_state(run_dir) -> dict:
    return CheckpointStore(RunDir(run_dir).checkpoints).latest().read_state()


class Warnings(logging.Handler):
    """The warnings one logger emits, each once (caplog may be handed a record twice once
    Prefect's logging is set up in the process)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warned():
    handler, logger = Warnings(), logging.getLogger("ckptflow.train")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_callbacks_steer_training_and_resume_mid_epoch_exactly(tmp_path, callbacks_file, warned):
    straight = small_config(tmp_path / "straight", epochs=5, callbacks=callbacks_file)
    reference = train_with_checkpoints(straight.run_dir, straight, prepare_run(straight))
    # EarlyStopping (patience 2) ends the run after epoch 3 of 5: the run is complete there
    assert reference.stopped_early == {"epoch": 3, "by": "EarlyStopping"}
    assert (reference.epoch, reference.step) == (3, 24)
    history = pd.read_csv(RunDir(straight.run_dir).history)
    # ReduceLROnPlateau's learning_rate joins the history as fit's History has it: the rate the
    # epoch trained with; it halved after epochs 2 and 3
    assert history["learning_rate"].tolist() == pytest.approx([1e-3, 1e-3, 5e-4])
    model = restore_model(straight.run_dir, reference.checkpoint)
    assert float(model.optimizer.learning_rate) == pytest.approx(2.5e-4)
    state = final_state(straight.run_dir)
    assert state["stopped_early"] == {"epoch": 3, "by": "EarlyStopping"}
    assert [c["class"] for c in state["callbacks"]] == [
        "ReduceLROnPlateau", "EarlyStopping", "Counter", "Recorder"]
    assert state["callbacks"][1]["state"]["wait"] == 2
    # validation calls on_test_*, one batch of the 128 test examples an epoch, before on_epoch_end
    assert state["callbacks"][2]["state"] == {"epochs_begun": 3, "batches": 24, "validations": 3,
                                              "validated_batches": 3, "epochs_ended": 3}
    assert state["callbacks"][3]["state"] is None
    unsaved = [m for m in warned.messages if "state not checkpointed" in m]
    assert len(unsaved) == 1 and "Recorder" in unsaved[0] and "Counter" not in unsaved[0]

    # the same run, failing 6 batches into epoch 3: after the rate was halved, with
    # EarlyStopping one epoch short of its patience
    resumed = small_config(tmp_path / "resumed", epochs=5, callbacks=callbacks_file,
                           io_error_at_step=22)
    data = prepare_run(resumed)
    with pytest.raises(InjectedIOError):
        train_with_checkpoints(resumed.run_dir, resumed, data)
    latest = final_state(resumed.run_dir)
    assert (latest["epoch"], latest["batch"], latest["step"]) == (2, 6, 22)
    assert latest["callbacks"][2]["state"] == {"epochs_begun": 3, "batches": 22, "validations": 2,
                                               "validated_batches": 2, "epochs_ended": 2}
    record = train_with_checkpoints(resumed.run_dir, resumed, data)
    assert (record.start_epoch, record.start_batch, record.batches_trained) == (2, 6, 2)
    # restored counters stop it at the same epoch; the epoch begun before is not begun again
    assert record.stopped_early == reference.stopped_early
    assert final_state(resumed.run_dir)["callbacks"] == state["callbacks"]
    assert weights_digest(restore_model(resumed.run_dir, record.checkpoint)) == \
        weights_digest(model)
    pd.testing.assert_frame_equal(pd.read_csv(RunDir(resumed.run_dir).history), history)

    # a run stopped early is complete: a rerun, even asking for more epochs, trains nothing
    again = train_with_checkpoints(resumed.run_dir, resumed, data)
    assert (again.batches_trained, again.epoch, again.stopped_early) == (
        0, 3, {"epoch": 3, "by": "EarlyStopping"})
    assert read_manifest(resumed.run_dir)["training"]["stopped_early"]["by"] == "EarlyStopping"


def test_a_callback_that_raises_is_one_error_naming_it_and_loses_no_checkpoint(
        tmp_path, callbacks_file):
    config = small_config(tmp_path, epochs=3, callbacks=callbacks_file,
                          callbacks_params={"raise_at_epoch": 1})
    data = prepare_run(config)
    with pytest.raises(BadInputError) as raised:
        train_with_checkpoints(tmp_path, config, data)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"callback Counter (--callbacks {callbacks_file}) raised "
                              "ValueError in on_epoch_end at epoch 2: no good at epoch 1.")
    # what was committed before stays, the mid-epoch commit in flight included
    names = [c.name for c in CheckpointStore(RunDir(tmp_path).checkpoints).all()]
    assert names[-3:] == ["cp-0001", "cp-0001-b000003", "cp-0001-b000006"]
    assert final_state(tmp_path)["callbacks"][2]["state"]["batches"] == 14


@pytest.mark.parametrize("function, params, words", [
    ("plateau_and_stop", {"restore_best_weights": True},
     ["EarlyStopping(restore_best_weights=True) is not supported", "restore_best_weights=False"]),
    ("backup", {"tmp": "/tmp/x"}, ["BackupAndRestore", "Remove it"]),
    ("not_callbacks", {}, ["returned str, not a keras.callbacks.Callback"]),
    ("plateau_and_stop", {"patience_please": 2}, ["takes no parameter 'patience_please'"]),
])
def test_callbacks_ckptflow_cannot_resume_are_refused_before_any_batch(
        tmp_path, callbacks_file, function, params, words):
    ref = callbacks_file.replace("plateau_and_stop", function)
    config = small_config(tmp_path / "run", callbacks=ref, callbacks_params=params)
    data = prepare_run(config)
    with pytest.raises(BadInputError) as raised:
        train_with_checkpoints(config.run_dir, config, data)
    assert all(w in str(raised.value) for w in words), raised.value
    assert CheckpointStore(RunDir(config.run_dir).checkpoints).all() == []


def test_other_callbacks_on_a_run_are_refused_as_other_settings(tmp_path, callbacks_file):
    config = small_config(tmp_path, epochs=1, callbacks=callbacks_file)
    data = prepare_run(config)
    train_with_checkpoints(tmp_path, config, data)
    before = json.dumps(final_state(tmp_path), sort_keys=True)
    for other in ({"callbacks_params": {"patience": 5}}, {"callbacks": None}):
        with pytest.raises(BadInputError, match="different model or different training settings"):
            prepare_run(config.model_copy(update={**other, "epochs": 2}))
    assert json.dumps(final_state(tmp_path), sort_keys=True) == before


def test_callback_options_are_checked_as_the_config_is_made(tmp_path, callbacks_file):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="callbacks_params without callbacks"):
        small_config(tmp_path, callbacks_params={"patience": 1})
    with pytest.raises(ValidationError, match="callbacks run on one device for now"):
        small_config(tmp_path, callbacks=callbacks_file, strategy="mirrored")
    with pytest.raises(ValidationError, match="not a REF"):
        small_config(tmp_path, callbacks="EarlyStopping")
