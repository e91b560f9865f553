"""Models of several outputs: each output's metrics named from the history to verify, labels as
dicts and lists in arrays and in tf.data, an exact mid-epoch resume, and what is refused."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, weights_digest

from ckptflow.config import TrainConfig
from ckptflow.core.errors import BadInputError, InjectedIOError
from ckptflow.core.files import sha256_path
from ckptflow.core.manifest import read_manifest
from ckptflow.core.predictions import load as load_predictions
from ckptflow.core.restore import restore_model
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import load_snapshot
from ckptflow.stages.export import export_each_format
from ckptflow.stages.prepare import prepare_run
from ckptflow.stages.verify import verify_run_dir
from ckptflow.training.stage import train_with_checkpoints

DIABETES = REPO / "examples" / "diabetes_regression"
TWO_HEADS = dict(model=f"{DIABETES}/model.py:build_two_heads", model_params={"learning_rate": 0.1},
                 data=f"{DIABETES}/data.py:load",
                 data_params={"validation_share": 0.2, "high_risk": True})

# A classifier with an auxiliary regression head, outputs as a list; labels as tf.data tuples.
PROJECT = '''
import keras
import numpy as np
import tensorflow as tf


def examples(rows=112, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6)).astype("float32")
    return x, (x.sum(axis=1) > 0).astype("int64"), x[:, :2].sum(axis=1, keepdims=True)


def pipelines():
    x, cls, aux = examples()
    train = tf.data.Dataset.from_tensor_slices((x[:80], (cls[:80], aux[:80]))).shuffle(32)
    test = tf.data.Dataset.from_tensor_slices((x[80:], (cls[80:], aux[80:])))
    return {"train": train, "test": test}


def list_outputs(seed=0):
    inputs = keras.Input((6,), name="features")
    trunk = keras.layers.Dense(8, activation="relu",
                               kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
    trunk = keras.layers.Dropout(0.2, seed=seed)(trunk)
    model = keras.Model(inputs, [keras.layers.Dense(2, name="cls")(trunk),
                                 keras.layers.Dense(1, name="aux")(trunk)])
    model.compile(optimizer="adam",
                  loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"],
                  metrics=[["accuracy"], ["mae"]])
    return model


class Unnamed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cls, self.aux = keras.layers.Dense(2), keras.layers.Dense(1)

    def call(self, x):
        return [self.cls(x), self.aux(x)]


def auto_named_outputs():
    inputs = keras.Input((6,))
    trunk = keras.layers.Dense(8)(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(2)(trunk), keras.layers.Dense(1)(trunk)])
    model.compile(optimizer="adam", loss=["mse", "mse"])
    return model


def unnamed_outputs():
    model = Unnamed()
    model.compile(optimizer="adam", loss=["mse", "mse"])
    return model


def dict_labels_of_other_rows():
    x, cls, aux = examples()
    return {"x_train": x[:80], "y_train": {"cls": cls[:80], "aux": aux[:79]},
            "x_test": x[80:], "y_test": {"cls": cls[80:], "aux": aux[80:]}}
'''


@pytest.fixture
def project(tmp_path) -> Path:
    path = tmp_path / "heads.py"
    path.write_text(textwrap.dedent(PROJECT))
    return path


def config(run_dir: Path, **values) -> TrainConfig:
    defaults = dict(batch_size=16, epochs=2, save_every_batches=2, checkpoint_budget=0.0, seed=5)
    return TrainConfig(run_dir=str(run_dir), **defaults | values)


@pytest.mark.usefixtures("prefect_server")
def test_a_two_headed_model_names_each_outputs_metrics_from_history_to_verify(tmp_path):
    from ckptflow.flows.train_pipeline import train_pipeline

    run = RunDir(tmp_path / "two-heads")
    summary = train_pipeline(config(run.root, **TWO_HEADS, batch_size=64, epochs=3,
                                    formats=["weights_h5", "keras", "h5", "saved_model"]))
    metrics = {"high_risk_accuracy", "progression_mae"}
    losses = {"loss", "high_risk_loss", "progression_loss"}
    history = pd.read_csv(run.history)
    assert set(history.columns) == {"epoch"} | metrics | losses | {
        f"val_{name}" for name in metrics | losses}
    assert len(history) == 3 and set(read_manifest(run)["model"]["metrics"]) == metrics
    evaluation = summary["evaluation"]
    assert set(evaluation["test_metrics"]) == metrics | losses
    assert evaluation["test_metrics"]["progression_mae"] < evaluation["untrained_metrics"][
        "progression_mae"]
    assert set(pd.read_csv(run.evaluation).columns) >= {f"test_{name}" for name in metrics}

    # Each export is scored on each output and compared with the trained model on each output.
    model = restore_model(run.root, summary["training"]["checkpoint"])
    snapshot = load_snapshot(run.root / "data" / "snapshot.npz")
    expected = {name: np.asarray(value) for name, value in
                model(snapshot["x_test"], training=False).items()}
    reference = next(a for a in read_manifest(run)["artifacts"] if a["kind"] == "reference")
    assert (reference["path"], reference["format"]) == ("exports/reference_predictions.npz", "npz")
    saved = load_predictions(run.root / reference["path"])
    assert set(saved) == {"progression", "high_risk"}
    assert all(np.array_equal(saved[name], expected[name]) for name in saved)
    assert not run.reference.exists()  # no single-output .npy beside it
    for export in summary["exports"]:
        assert set(export["metrics"]) == metrics and export["max_abs_diff"] == 0.0
        assert all(export["metrics"][name] == pytest.approx(evaluation["test_metrics"][name],
                                                            rel=1e-5) for name in metrics)
    rows = [r for r in summary["verified"] if r["kind"] == "export"]
    assert len(rows) == 4 and all(r["ok"] and r["max_abs_diff"] == 0.0 for r in rows)
    assert all(r["metrics"] == e["metrics"] for r, e in zip(rows, summary["exports"], strict=True))

    # Verify compares every output: a reference whose second output is off (recorded as it
    # is, so only the comparison can catch it) fails every export, saying by how much.
    np.savez(run.root / reference["path"], **dict(saved, high_risk=saved["high_risk"] + 0.01))
    manifest = read_manifest(run)
    reference["sha256"] = sha256_path(run.root / reference["path"])
    manifest["artifacts"] = [reference if a["kind"] == "reference" else a
                             for a in manifest["artifacts"]]
    (run.root / "manifest.json").write_text(json.dumps(manifest))
    failed = [r for r in verify_run_dir(run.root) if r.kind == "export"]
    assert len(failed) == 4 and all(not r.ok and r.max_abs_diff == pytest.approx(0.01, rel=1e-3)
                                    and "predictions differ by 1.00e-02" in r.problem
                                    for r in failed)


def test_list_outputs_with_tuple_labels_in_tf_data_resume_mid_epoch_bit_identical(tmp_path,
                                                                                  project):
    values = dict(model=f"{project}:list_outputs", data=f"{project}:pipelines")
    straight = config(tmp_path / "straight", **values)
    train_with_checkpoints(straight.run_dir, straight, prepare_run(straight))

    broken = config(tmp_path / "resumed", **values, io_error_at_step=7)  # epoch 2, batch 2
    data = prepare_run(broken)
    assert isinstance(load_snapshot(RunDir(broken.run_dir).root / data.path)["y_test"], list)
    with pytest.raises(InjectedIOError):
        train_with_checkpoints(broken.run_dir, broken, data)
    resumed = config(tmp_path / "resumed", **values)
    record = train_with_checkpoints(resumed.run_dir, resumed, data)
    assert (record.resumed_from, record.step) == ("checkpoints/cp-0001-b000002", 10)
    final = [restore_model(r.run_dir, "checkpoints/cp-0002") for r in (straight, resumed)]
    assert weights_digest(final[0]) == weights_digest(final[1])
    history = [pd.read_csv(RunDir(r.run_dir).history) for r in (straight, resumed)]
    pd.testing.assert_frame_equal(*history)
    assert {"cls_accuracy", "aux_mae", "val_cls_accuracy", "val_aux_mae"} <= set(history[0])

    exports = export_each_format(resumed.run_dir, data, record.checkpoint_ref(),
                                 ["keras", "saved_model"])
    assert all(set(e.metrics) == {"cls_accuracy", "aux_mae"} and e.max_abs_diff == 0.0
               for e in exports)
    saved = load_predictions(RunDir(resumed.run_dir).exports / "reference_predictions.npz")
    assert {name: a.shape for name, a in saved.items()} == {"cls": (32, 2), "aux": (32, 1)}


@pytest.mark.parametrize("values, message", [
    (dict(model="{project}:unnamed_outputs", data="{project}:pipelines"),
     "returns 2 outputs as a list with no output names. Name each output layer"),
    (dict(model="{project}:auto_named_outputs", data="{project}:pipelines"),
     r"returns 2 outputs as a list with outputs named \['dense(_\d+)?', 'dense(_\d+)?'\] by Keras"),
    (dict(model="{project}:list_outputs", data="{project}:dict_labels_of_other_rows"),
     r"x_train and y_train have different numbers of rows \(x_train: 80, y_train\['cls'\]: 80, "
     r"y_train\['aux'\]: 79\)"),
    (dict(model="{project}:list_outputs", data="{project}:pipelines", class_weight={0: 2.0}),
     r"class_weight weighs the labels of a model of one output, and --data .*heads.py:pipelines "
     r"gives several \(tuple labels\)"),
    (dict(model="{project}:list_outputs", data="{project}:pipelines", formats=["onnx"]),
     "format onnx takes models of one input and one output; this model has several outputs"),
])
def test_what_several_outputs_cannot_do_is_one_error_naming_the_fix(tmp_path, project, values,
                                                                    message):
    values = {k: v.format(project=project) if isinstance(v, str) else v for k, v in values.items()}
    request = config(tmp_path / "run", **values)
    with pytest.raises(BadInputError, match=message) as caught:
        data = prepare_run(request)
        record = train_with_checkpoints(request.run_dir, request, data)
        export_each_format(request.run_dir, data, record.checkpoint_ref(), request.formats)
    assert "\n" not in str(caught.value)
    if "formats" not in values:
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_list_of_numbers_is_one_array_and_a_list_of_arrays_is_several():
    from ckptflow.core.datasets import checked_arrays

    x = np.zeros((4, 2), "float32")
    one = checked_arrays("ref", {"x_train": x, "y_train": [0, 1, 0, 1], "x_test": x,
                                 "y_test": [1, 0, 1, 0]})
    assert isinstance(one["y_train"], np.ndarray) and one["y_train"].shape == (4,)
    labels = [np.zeros(4, "int64"), np.ones((4, 1), "float32")]
    several = checked_arrays("ref", {"x_train": x, "y_train": labels, "x_test": x,
                                     "y_test": labels})
    assert [a.shape for a in several["y_train"]] == [(4,), (4, 1)]
    # integer labels may differ in width between splits (as before); features may not
    checked_arrays("ref", {"x_train": x, "y_train": np.zeros(4, "int64"), "x_test": x,
                           "y_test": np.zeros(4, "int32")})
    with pytest.raises(BadInputError, match="differ in shape or dtype"):
        checked_arrays("ref", {"x_train": x, "y_train": np.zeros(4), "x_test": x.astype("float64"),
                               "y_test": np.zeros(4)})


def test_reference_predictions_keep_every_output_name(tmp_path):
    from ckptflow.core.predictions import load, max_abs_diff, to_bytes

    predictions = {"file": np.arange(3.0), "aux": np.ones((3, 1), "float32")}  # np.savez's word
    path = tmp_path / "reference_predictions.npz"
    path.write_bytes(to_bytes(predictions))
    saved = load(path)
    assert {k: (v.dtype, v.shape) for k, v in saved.items()} == {
        "file": (np.float64, (3,)), "aux": (np.float32, (3, 1))}
    assert max_abs_diff(saved, predictions) == 0.0
    assert max_abs_diff(saved, {"file": predictions["file"]}) == float("inf")  # an output lost
    assert max_abs_diff(saved, dict(predictions, aux=np.ones((3, 2)))) == float("inf")
