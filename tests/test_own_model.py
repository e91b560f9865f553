"""A user's own model and data: the examples through the flow, a subclassed and a multi-input
model, resume refused for another model or data, and every bad input named in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, tree_digest, weights_digest

from ckptflow.config import TrainConfig
from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.errors import BadInputError, InjectedIOError
from ckptflow.core.manifest import read_manifest
from ckptflow.core.restore import restore_model
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import describe_validation, load_snapshot
from ckptflow.stages.build_model import build_model_stage
from ckptflow.stages.export import export_each_format
from ckptflow.stages.fetch_data import fetch_data
from ckptflow.stages.preflight import check_request
from ckptflow.stages.prepare import prepare_run
from ckptflow.training.stage import train_with_checkpoints

EXAMPLES = REPO / "examples"
DIGITS = dict(model=f"{EXAMPLES}/digits_cnn/model.py:build", data=f"{EXAMPLES}/digits_cnn/data.py:load")
DIABETES = dict(model=f"{EXAMPLES}/diabetes_regression/model.py:build",
                data=f"{EXAMPLES}/diabetes_regression/data.py:load")
CKPTFLOW = str(Path(sys.executable).parent / "ckptflow")

# A user's project: arrays, a subclassed model, a two-input model, and things done wrong.
PROJECT = '''
import keras
import numpy as np
import tensorflow as tf


def arrays(rows=96, features=6):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("int64")
    return {"x_train": x[:64], "y_train": y[:64], "x_test": x[64:], "y_test": y[64:]}


def two_inputs():
    data = arrays()
    return {"x_train": {"left": data["x_train"][:, :4], "right": data["x_train"][:, 4:]},
            "y_train": data["y_train"],
            "x_test": {"left": data["x_test"][:, :4], "right": data["x_test"][:, 4:]},
            "y_test": data["y_test"]}


@keras.saving.register_keras_serializable(package="project")
class TwoLayers(keras.Model):
    def __init__(self, hidden=8, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden
        self.first = keras.layers.Dense(hidden, activation="relu")
        self.drop = keras.layers.Dropout(0.2, seed=1)
        self.last = keras.layers.Dense(2)

    def call(self, x, training=False):
        return self.last(self.drop(self.first(x), training=training))

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden}


def subclassed(hidden=8):
    model = TwoLayers(hidden)
    model.compile(optimizer="adam", metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def functional_two_inputs():
    left, right = keras.Input((4,), name="left"), keras.Input((2,), name="right")
    x = keras.layers.Concatenate()([keras.layers.Dense(4)(left), right])
    model = keras.Model({"left": left, "right": right}, keras.layers.Dense(2)(x))
    model.compile(optimizer="adam", metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def uncompiled():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])


def no_model():
    return None


def raises(depth=3):
    raise ValueError(f"depth {depth} is too deep")


def wrong_keys():
    return {"train": arrays()["x_train"]}


def batched():
    data = arrays()
    ds = tf.data.Dataset.from_tensor_slices((data["x_train"], data["y_train"])).batch(8)
    return {"train": ds, "test": ds}


def mismatched():
    data = arrays()
    train = tf.data.Dataset.from_tensor_slices((data["x_train"], data["y_train"]))
    test = tf.data.Dataset.from_tensor_slices((data["x_test"][:, :3], data["y_test"]))
    return {"train": train, "test": test}


def python_state():
    data = arrays()
    train = tf.data.Dataset.from_tensor_slices((data["x_train"], data["y_train"])).map(
        lambda x, y: (tf.py_function(lambda v: v, [x], tf.float32), y))
    test = tf.data.Dataset.from_tensor_slices((data["x_test"], data["y_test"]))
    return {"train": train, "test": test}


def with_validation():
    rng = np.random.default_rng(1)
    x_val = rng.normal(size=(40, 6)).astype("float32")
    y_val = (x_val.sum(axis=1) <= 0).astype("int64")  # the other rule: far from the test set
    return {**arrays(), "x_val": x_val, "y_val": y_val}


def validation_pipeline():
    data = with_validation()
    pairs = {k: tf.data.Dataset.from_tensor_slices((data[f"x_{s}"], data[f"y_{s}"]))
             for k, s in (("train", "train"), ("test", "test"), ("validation", "val"))}
    return pairs


def val_without_labels():
    return {**arrays(), "x_val": arrays()["x_test"]}


def val_of_another_shape():
    data = arrays()
    return {**data, "x_val": data["x_test"][:, :3], "y_val": data["y_test"]}


def one_hot_loss():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy())  # ints given
    return model
'''


@pytest.fixture
def project(tmp_path) -> Path:
    path = tmp_path / "project.py"
    path.write_text(textwrap.dedent(PROJECT))
    return path


def config(run_dir: Path, **values) -> TrainConfig:
    defaults = dict(batch_size=16, epochs=2, save_every_batches=3, checkpoint_budget=0.0, seed=5)
    return TrainConfig(run_dir=str(run_dir), **defaults | values)


@pytest.mark.usefixtures("prefect_server")
def test_the_regression_example_reports_mae_and_every_export_verifies(tmp_path):
    from ckptflow.flows.train_pipeline import train_pipeline

    run = RunDir(tmp_path / "diabetes")
    summary = train_pipeline(config(run.root, **DIABETES, batch_size=32))
    evaluation = summary["evaluation"]
    assert evaluation["test_accuracy"] is None
    assert set(evaluation["test_metrics"]) == {"loss", "mae"}
    assert evaluation["test_metrics"]["mae"] < evaluation["untrained_metrics"]["mae"]
    assert list(pd.read_csv(run.history).columns) == ["epoch", "loss", "mae", "val_loss", "val_mae"]
    exports = {e["format"]: e for e in summary["exports"]}
    assert set(exports) == {"tf_checkpoint", "weights_h5", "keras", "h5", "saved_model", "litert",
                            "onnx"}
    assert all(set(e["metrics"]) == {"mae"} and e["test_accuracy"] is None for e in exports.values())
    verified = summary["verified"]
    assert all(r["ok"] for r in verified)
    assert {r["format"] for r in verified if r["kind"] == "export"} == set(exports)
    manifest = read_manifest(run)
    assert manifest["model"]["metrics"] == ["mae"] and manifest["data"]["kind"] == "arrays"
    assert manifest["model"]["identity"]["model"] == DIABETES["model"]


@pytest.mark.usefixtures("prefect_server")
def test_the_tf_data_example_trains_on_its_pipeline_and_loads_its_custom_layer(tmp_path):
    from ckptflow.flows.train_pipeline import train_pipeline

    run = RunDir(tmp_path / "digits")
    summary = train_pipeline(config(run.root, **DIGITS, batch_size=64, formats=["keras", "h5"]))
    data = read_manifest(run)["data"]
    assert data["kind"] == "pipeline" and data["path"] == "data/snapshot.npz"
    assert (data["train_samples"], data["test_samples"]) == (1348, 449)
    assert summary["training"]["step"] == 2 * 22
    assert summary["evaluation"]["test_accuracy"] > 0.5 > summary["evaluation"]["untrained_accuracy"]
    assert all(r["ok"] for r in summary["verified"])  # .keras and .h5 name digits>Rescale
    before = tree_digest(run.root)  # a pipeline is read again each run; the same data writes nothing
    again = fetch_data(run.root, DIGITS["data"], seed=5)
    assert again.data_sha256 == data["data_sha256"] and tree_digest(run.root) == before


def test_a_subclassed_model_resumes_mid_epoch_bit_identical_and_exports(tmp_path, project):
    values = dict(model=f"{project}:subclassed", data=f"{project}:arrays",
                  model_params={"hidden": 8})
    straight = config(tmp_path / "straight", **values)
    train_with_checkpoints(straight.run_dir, straight, prepare_run(straight))

    broken = config(tmp_path / "resumed", **values, io_error_at_step=7)  # epoch 2, batch 3
    data = prepare_run(broken)
    with pytest.raises(InjectedIOError):
        train_with_checkpoints(broken.run_dir, broken, data)
    resumed = config(tmp_path / "resumed", **values)
    record = train_with_checkpoints(resumed.run_dir, resumed, data)
    assert (record.resumed_from, record.step) == ("checkpoints/cp-0001-b000003", 8)
    final = [restore_model(r.run_dir, "checkpoints/cp-0002") for r in (straight, resumed)]
    assert type(final[0]).__name__ == "TwoLayers"
    assert weights_digest(final[0]) == weights_digest(final[1])
    history = [pd.read_csv(RunDir(r.run_dir).history) for r in (straight, resumed)]
    pd.testing.assert_frame_equal(*history)  # the epoch's metrics were checkpointed too

    exports = export_each_format(resumed.run_dir, data, record.checkpoint_ref(),
                                 ["tf_checkpoint", "weights_h5", "keras"])
    assert [e.format for e in exports] == ["tf_checkpoint", "weights_h5", "keras"]
    assert all(e.max_abs_diff == 0.0 and e.test_accuracy is not None for e in exports)


def test_a_replayed_pipeline_saves_no_iterator_and_resumes_bit_identical(tmp_path):
    """pipeline_resume=replay: checkpoints hold no iterator (no shuffle buffer to serialize as
    training waits); a resume rebuilds the pipeline and skips the batches trained, ending with
    the weights of a run whose checkpoints held the iterator. Either mode resumes the other's."""
    import tensorflow as tf

    def holds_iterator(run_dir) -> bool:
        latest = CheckpointStore(RunDir(run_dir).checkpoints).latest()
        names = [name for name, _ in tf.train.list_variables(str(latest.path / "train_state"))]
        return any(name.split("/")[0] == "data" for name in names)

    values = dict(**DIGITS, batch_size=64, save_every_batches=4)  # 22 batches an epoch
    straight = config(tmp_path / "straight", **values)
    reference = train_with_checkpoints(straight.run_dir, straight, prepare_run(straight))
    assert holds_iterator(straight.run_dir)

    replayed = config(tmp_path / "replayed", **values, pipeline_resume="replay",
                      io_error_at_step=30)  # epoch 2, batch 8: just saved
    data = prepare_run(replayed)
    with pytest.raises(InjectedIOError):
        train_with_checkpoints(replayed.run_dir, replayed, data)
    assert not holds_iterator(replayed.run_dir)
    assert CheckpointStore(RunDir(replayed.run_dir).checkpoints).latest().read_state()[
        "pipeline_replay"] is True
    # resumed in the other mode: the batches replayed, the iterator saved again from there
    record = train_with_checkpoints(replayed.run_dir, replayed.model_copy(
        update={"pipeline_resume": "iterator"}), data)
    assert (record.start_epoch, record.start_batch, record.batches_trained) == (1, 8, 14)
    assert holds_iterator(replayed.run_dir)
    assert weights_digest(restore_model(replayed.run_dir, record.checkpoint)) == \
        weights_digest(restore_model(straight.run_dir, reference.checkpoint))


def _metrics_on(model, arrays, split: str) -> dict[str, float]:
    return model.evaluate(arrays[f"x_{split}"], arrays[f"y_{split}"], batch_size=256, verbose=0,
                          return_dict=True)


@pytest.mark.parametrize("data", ["with_validation", "validation_pipeline"])
def test_a_validation_set_of_the_users_own_gives_the_val_metrics_and_the_best_epoch(
        tmp_path, project, data):
    """Each epoch's val_* metrics are the model's on the data's own validation set, not on the
    test set (which the tutorial, and a run without one, validates on)."""
    request = config(tmp_path / "run", model=f"{project}:subclassed", data=f"{project}:{data}")
    record = train_with_checkpoints(request.run_dir, request, prepare_run(request))
    run = RunDir(request.run_dir)
    recorded = read_manifest(run)["data"]
    assert recorded["validation_samples"] == 40
    assert describe_validation(recorded) == "validated on its own 40 examples"
    arrays = load_snapshot(run.root / "data" / "snapshot.npz")
    assert arrays["x_val"].shape == (40, 6)  # in the snapshot, so a resume validates the same
    model = restore_model(run.root, record.checkpoint)
    history, val, test = (pd.read_csv(run.history), _metrics_on(model, arrays, "val"),
                          _metrics_on(model, arrays, "test"))
    assert history.iloc[-1]["val_loss"] == pytest.approx(val["loss"], abs=1e-6)
    assert history.iloc[-1]["val_accuracy"] == pytest.approx(val["accuracy"], abs=1e-6)
    assert abs(val["loss"] - test["loss"]) > 1e-3  # not the test set's
    assert record.best_val_accuracy == history["val_accuracy"].max()


def test_without_a_validation_set_the_test_set_validates_as_in_the_tutorial(tmp_path, project):
    request = config(tmp_path / "run", model=f"{project}:subclassed", data=f"{project}:arrays",
                     epochs=1)
    record = train_with_checkpoints(request.run_dir, request, prepare_run(request))
    run = RunDir(request.run_dir)
    recorded = read_manifest(run)["data"]
    assert recorded["validation_samples"] is None
    assert describe_validation(recorded) == "validated on the test set (as the tutorial does)"
    model = restore_model(run.root, record.checkpoint)
    arrays = load_snapshot(run.root / "data" / "snapshot.npz")
    assert pd.read_csv(run.history).iloc[-1]["val_loss"] == pytest.approx(
        _metrics_on(model, arrays, "test")["loss"], abs=1e-6)


@pytest.mark.usefixtures("prefect_server")
def test_a_two_input_model_takes_dict_features_and_skips_single_input_formats(tmp_path, project):
    from ckptflow.core.formats import select_formats
    from ckptflow.flows.train_pipeline import train_pipeline

    chosen, skipped = select_formats(None, several="inputs")
    assert [f.name for f in chosen] == ["tf_checkpoint", "weights_h5", "keras", "h5", "saved_model"]
    assert [s.split(":")[0] for s in skipped] == ["litert", "onnx"]
    with pytest.raises(BadInputError, match="format onnx takes models of one input"):
        select_formats(["onnx"], several="inputs")
    run = RunDir(tmp_path / "two")
    summary = train_pipeline(config(run.root, model=f"{project}:functional_two_inputs",
                                    data=f"{project}:two_inputs",
                                    formats=["weights_h5", "keras", "saved_model"]))
    assert {e["format"] for e in summary["exports"]} == {"weights_h5", "keras", "saved_model"}
    assert all(r["ok"] for r in summary["verified"])
    assert set(load_snapshot(run.root / "data" / "snapshot.npz")["x_test"]) == {"left", "right"}


def test_resuming_with_another_model_or_other_data_is_refused_naming_the_difference(tmp_path,
                                                                                    project):
    run = tmp_path / "run"
    first = config(run, model=f"{project}:subclassed", data=f"{project}:arrays",
                   model_params={"hidden": 8}, epochs=1)
    data = prepare_run(first)
    train_with_checkpoints(first.run_dir, first, data)
    before = tree_digest(run)
    with pytest.raises(BadInputError, match=r"model_params: run has \{'hidden': 8\}, requested "
                                            r"\{'hidden': 16\}"):
        check_request(first.model_copy(update={"model_params": {"hidden": 16}}))
    with pytest.raises(BadInputError, match="already holds different data"):
        fetch_data(run, f"{project}:arrays", seed=5, data_params={"rows": 80})
    # The same REF whose code now builds another architecture: its fingerprint differs.
    project.write_text(project.read_text().replace("self.last = keras.layers.Dense(2)",
                                                   "self.last = keras.layers.Dense(3)"))
    for name in [m for m in sys.modules if m.startswith("ckptflow_user_project")]:
        del sys.modules[name]
    with pytest.raises(BadInputError, match="another architecture"):
        build_model_stage(run, first.identity(), data)
    assert tree_digest(run) == before


@pytest.mark.parametrize("values, message", [
    (dict(model="no_such_package.models:build"), "no module named 'no_such_package.models'"),
    (dict(model="{project}:not_there"), "defines no 'not_there'"),
    (dict(model="missing/file.py:build"), "file missing/file.py not found"),
    (dict(model="{project}:raises"), r"raised ValueError: depth 3 is too deep"),
    (dict(model="{project}:raises", model_params={"width": 2}), "takes no parameter 'width'"),
    (dict(model="{project}:uncompiled"), "returned an uncompiled model. Call model.compile"),
    (dict(model="{project}:no_model"), "returned NoneType, not a keras.Model"),
    (dict(model="{project}:one_hot_loss"), "loss or metrics cannot take the data's labels"),
    (dict(data="{project}:wrong_keys"), r"returned keys \['train'\]. Expected"),
    (dict(data="{project}:batched"), "looks batched"),
    (dict(data="{project}:mismatched"), "train and test elements differ"),
    (dict(data="{project}:python_state"), "cannot be checkpointed"),
    (dict(data="{project}:val_without_labels"), r"returned keys .*'x_val'.*\. Expected"),
    (dict(data="{project}:val_of_another_shape"), "train and val examples differ in shape"),
])
def test_each_bad_model_or_data_is_one_error_naming_the_ref_and_the_fix(tmp_path, project, values,
                                                                       message):
    values = {"model": f"{project}:subclassed", "data": f"{project}:arrays"} | {
        k: v.format(project=project) if isinstance(v, str) else v for k, v in values.items()}
    request = config(tmp_path / "run", **values)
    with pytest.raises(BadInputError, match=message) as caught:
        check_request(request)
        train_with_checkpoints(request.run_dir, request, prepare_run(request))
    text = str(caught.value)
    assert "\n" not in text and (values["model"] in text or values["data"] in text)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tutorial_options_with_an_own_model_are_refused():
    with pytest.raises(ValueError, match="--units is an option of the tutorial model"):
        TrainConfig(model="project:build", units=64)
    with pytest.raises(ValueError, match="the tutorial model takes no parameter 'filters'"):
        TrainConfig(model_params={"filters": 8})
    with pytest.raises(ValueError, match="--train-samples is an option of the tutorial data"):
        TrainConfig(data="project:load", train_samples=10)


def test_a_broken_model_on_an_existing_run_is_exit_2_in_one_line_and_touches_nothing(
        tmp_path, project, prefect_api_url):
    """Detected inside the flow (the model function runs there), after a finished epoch."""
    first = config(tmp_path / "run", model=f"{project}:subclassed", data=f"{project}:arrays",
                   epochs=1)
    train_with_checkpoints(first.run_dir, first, prepare_run(first))
    project.write_text(project.read_text().replace(
        "def subclassed(hidden=8):\n", "def subclassed(hidden=8):\n    raise KeyError('oops')\n"))
    before = tree_digest(tmp_path / "run")
    result = subprocess.run(
        [CKPTFLOW, "run", "--run-dir", first.run_dir, "--model", first.model, "--data",
         first.data, "--batch-size", "16", "--seed", "5", "--epochs", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PREFECT_API_URL": prefect_api_url})
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ckptflow: error: --model {first.model} raised KeyError: 'oops'"), last
    assert "Traceback" not in result.stderr
    assert tree_digest(tmp_path / "run") == before
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["training"]["epoch"] == 1


def test_a_sweep_grid_over_any_model_params_makes_one_point_per_combination():
    from ckptflow.config import SweepConfig, grid_points

    sweep = SweepConfig(sweep_dir="s", grid={"filters": [8, 16], "learning_rate": [0.001, 0.01]},
                        settings={**DIGITS, "epochs": 1, "model_params": {"seed": 3}})
    points = grid_points(sweep)
    assert [Path(p.run_dir).name for p in points] == [
        "filters8-learning_rate0.001", "filters8-learning_rate0.01",
        "filters16-learning_rate0.001", "filters16-learning_rate0.01"]
    assert points[3].identity()["model_params"] == {"seed": 3, "filters": 16, "learning_rate": 0.01}
    with pytest.raises(ValueError, match="--units and --grid both set the grid"):
        SweepConfig(grid={"units": [8]}, units=[64])
    with pytest.raises(ValueError, match="values repeat"):
        SweepConfig(grid={"filters": [8, 8]})


def test_a_tf_data_pipeline_under_a_strategy_is_refused_before_training(tmp_path):
    request = config(tmp_path / "run", **DIGITS, batch_size=64, strategy="mirrored")
    data = prepare_run(request)
    with pytest.raises(BadInputError, match="trains on one device only: a distributed iterator"):
        train_with_checkpoints(request.run_dir, request, data)
    assert not (tmp_path / "run" / "checkpoints").exists()
