"""Weights in the loss, as fit() takes them: class_weight, per-example w_train arrays and
(features, label, weight) tf.data elements; each steers training, each resumes exactly."""

from __future__ import annotations

import textwrap

import pytest
from conftest import small_config, weights_digest
from pydantic import ValidationError

from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.errors import BadInputError, InjectedIOError
from ckptflow.core.restore import restore_model
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import load_snapshot
from ckptflow.stages.prepare import prepare_run
from ckptflow.training.stage import train_with_checkpoints

# Classes 5-9 weigh nothing: a model trained so never predicts them.
ONLY_LOW_DIGITS = {5: 0.0, 6: 0.0, 7: 0.0, 8: 0.0, 9: 0.0}

DATA = '''
import numpy as np
import tensorflow as tf
from ckptflow.tutorial.data import load_mnist


SEED = 7  # small_config's: the very arrays the tutorial data gives it


def arrays(weights="low", shape="flat"):
    data, _, _ = load_mnist("bundled", 256, 128, SEED)
    if weights == "low":
        data["w_train"] = (data["y_train"] < 5).astype("float32")
    elif weights == "negative":
        data["w_train"] = -np.ones(len(data["y_train"]), "float32")
    if shape == "short":
        data["w_train"] = data["w_train"][:10]
    return data


def pipelines(weighted=True):
    data, _, _ = load_mnist("bundled", 256, 128, SEED)
    x, y = data["x_train"], data["y_train"]
    train = ((x, y, (y < 5).astype("float32")) if weighted else (x, y))
    return {"train": tf.data.Dataset.from_tensor_slices(train),
            "test": tf.data.Dataset.from_tensor_slices((data["x_test"], data["y_test"]))}
'''


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "weighted_data.py"
    path.write_text(textwrap.dedent(DATA))
    return path


def own_data(tmp_path, data_file, name: str, function: str, **overrides):
    """small_config on a data function (the tutorial's sample sizes left at their defaults)."""
    return small_config(tmp_path / name, data=f"{data_file}:{function}", train_samples=1000,
                        test_samples=1000, **overrides)


def trained(config):
    """The run trained: (its final model, its test features)."""
    data = prepare_run(config)
    record = train_with_checkpoints(config.run_dir, config, data)
    x_test = load_snapshot(RunDir(config.run_dir).root / data.path, ("x_test",))["x_test"]
    return restore_model(config.run_dir, record.checkpoint), x_test


def high_digit_share(model, x) -> float:
    return float((model.predict(x, verbose=0).argmax(axis=1) >= 5).mean())


def test_class_weight_steers_training_and_resumes_mid_epoch_exactly(tmp_path, data_file):
    plain = small_config(tmp_path / "plain")
    model, x_test = trained(plain)
    assert high_digit_share(model, x_test) > 0.3  # it learns every digit

    weighted = small_config(tmp_path / "weighted", class_weight=ONLY_LOW_DIGITS)
    weighted_model, _ = trained(weighted)
    assert high_digit_share(weighted_model, x_test) < 0.02  # weight 0: never learned
    assert weighted.identity()["class_weight"] == {str(k): 0.0 for k in ONLY_LOW_DIGITS}

    # the same run failing 6 batches into epoch 2, resumed from there: bit-identical
    resumed = small_config(tmp_path / "resumed", class_weight=ONLY_LOW_DIGITS, io_error_at_step=14)
    data = prepare_run(resumed)
    with pytest.raises(InjectedIOError):
        train_with_checkpoints(resumed.run_dir, resumed, data)
    again = train_with_checkpoints(resumed.run_dir, resumed, data)
    assert (again.start_epoch, again.start_batch) == (1, 6)
    assert weights_digest(restore_model(resumed.run_dir, again.checkpoint)) == \
        weights_digest(weighted_model)

    # per-example weights saying the same thing train the same bits
    per_example, _ = trained(own_data(tmp_path, data_file, "w_train", "arrays"))
    assert weights_digest(per_example) == weights_digest(weighted_model)

    # another class_weight on the run is other settings
    with pytest.raises(BadInputError, match="class_weight"):
        prepare_run(weighted.model_copy(update={"class_weight": {0: 2.0}}))


def test_weighted_pipeline_elements_train_as_class_weight_does(tmp_path, data_file):
    model, x_test = trained(own_data(tmp_path, data_file, "elements", "pipelines"))
    assert high_digit_share(model, x_test) < 0.02
    by_class, _ = trained(own_data(tmp_path, data_file, "by_class", "pipelines",
                                   data_params={"weighted": False}, class_weight=ONLY_LOW_DIGITS))
    assert weights_digest(by_class) == weights_digest(model)


@pytest.mark.parametrize("function, overrides, words", [
    ("arrays", {"data_params": {"shape": "short"}},
     ["w_train holds float32 of shape (10,)", "Expected one weight >= 0 per training example, "
      "shape (256,)"]),
    ("arrays", {"data_params": {"weights": "negative"}}, ["some negative"]),
    ("arrays", {"class_weight": {1: 2.0}}, ["gives w_train and class_weight is given too"]),
    ("pipelines", {"class_weight": {1: 2.0}},
     ["weighs each example ((x, y, weight) elements) and class_weight is given too"]),
])
def test_weights_that_cannot_be_used_are_one_error_before_any_batch(tmp_path, data_file,
                                                                   function, overrides, words):
    config = own_data(tmp_path, data_file, "run", function, **overrides)
    with pytest.raises(BadInputError) as raised:
        train_with_checkpoints(config.run_dir, config, prepare_run(config))
    assert all(w in str(raised.value) for w in words), raised.value
    assert CheckpointStore(RunDir(config.run_dir).checkpoints).all() == []


def test_class_weight_is_checked_as_the_config_is_made(tmp_path):
    for bad in ({1: -1.0}, {-1: 1.0}, {}, {1: float("inf")}):
        with pytest.raises(ValidationError, match="class indices >= 0 with finite weights"):
            small_config(tmp_path, class_weight=bad)
    with pytest.raises(ValidationError, match="class_weight trains on one device"):
        small_config(tmp_path, class_weight={1: 2.0}, strategy="mirrored")
    # JSON keys (the CLI, a deployment's parameters) are class indices, in order
    assert small_config(tmp_path, class_weight={"3": 2, "1": 0.5}).class_weight == {1: 0.5, 3: 2.0}
