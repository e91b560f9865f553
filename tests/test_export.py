"""export-each-format and the manifest: every file loads back the user's way and predicts the same."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ckptflow.core.files import sha256_path
from ckptflow.core.formats import FORMATS
from ckptflow.core.manifest import read_manifest
from ckptflow.core.snapshot import load_snapshot

# Tests of the one finished default run stay on one pytest worker, so it runs once.
pytestmark = pytest.mark.xdist_group("finished_run")


def _load_and_predict(fmt: str, path, x, identity: dict):
    """Load an export as a user of that format would, independently of ckptflow's registry."""
    import keras
    import tensorflow as tf

    from ckptflow.tutorial.model import Standardize, create_model

    if fmt == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path))
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        interpreter.resize_tensor_input(inp["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"])
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    if fmt == "saved_model":
        loaded = tf.saved_model.load(str(path))
        return loaded.signatures["serving_default"](tf.constant(x))["output_0"].numpy()
    if fmt in ("keras", "h5"):
        return keras.models.load_model(path, custom_objects={"Standardize": Standardize}) \
            .predict(x, verbose=0)
    model = create_model(identity["units"], identity["dropout"], identity["learning_rate"],
                        identity["seed"])
    if fmt == "weights_h5":
        model.load_weights(path)
    else:
        tf.train.Checkpoint(model=model).read(str(path / "ckpt")).expect_partial()
    return model.predict(x, verbose=0)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_export_loads_back_and_matches(finished_run, fmt):
    run_dir, _ = finished_run
    manifest = read_manifest(run_dir)
    entry = next(a for a in manifest["artifacts"]
                 if a["kind"] == "export" and a["format"] == fmt)
    path = run_dir / entry["path"]
    assert sha256_path(path) == entry["sha256"]
    x = load_snapshot(run_dir / "data" / "mnist.npz")["x_test"]
    y = load_snapshot(run_dir / "data" / "mnist.npz")["y_test"]
    reference = np.load(run_dir / "exports" / "reference_predictions.npy")
    predictions = _load_and_predict(fmt, path, x, manifest["model"]["identity"])
    assert np.max(np.abs(predictions - reference)) <= FORMATS[fmt].tolerance
    accuracy = float(np.mean(predictions.argmax(axis=1) == y))
    assert accuracy == pytest.approx(entry["test_accuracy"], abs=1e-6)  # a float32 Keras metric
    assert accuracy == pytest.approx(manifest["evaluation"]["test_accuracy"], abs=1e-6)


def test_manifest_names_every_artifact_with_hash_size_and_provenance(finished_run):
    run_dir, _ = finished_run
    manifest = read_manifest(run_dir)
    kinds = {a["kind"] for a in manifest["artifacts"]}
    assert kinds >= {"data", "model", "checkpoint", "history", "evaluation", "export", "reference"}
    for artifact in manifest["artifacts"]:
        assert {"format", "path", "sha256", "bytes"} <= artifact.keys()
        assert not artifact["path"].startswith("/") and ".." not in artifact["path"]
        assert sha256_path(run_dir / artifact["path"]) == artifact["sha256"], artifact["path"]
    assert {a["format"] for a in manifest["artifacts"] if a["kind"] == "export"} == set(FORMATS)
    assert manifest["data"]["source"] == "bundled" and len(manifest["data"]["data_sha256"]) == 64
    assert "no Keras cache" in manifest["data"]["reason"]  # auto, offline: the fallback
    assert manifest["packages"]["tensorflow"].startswith("2.21")
    assert manifest["model"]["identity"]["units"] == 512  # the tutorial's defaults
    assert manifest["code_version"]


def test_trained_beats_untrained_as_in_the_tutorial(finished_run):
    run_dir, _ = finished_run
    evaluation = read_manifest(run_dir)["evaluation"]
    assert evaluation["untrained_accuracy"] < 0.25 < 0.8 < evaluation["test_accuracy"]


def test_saved_model_has_a_serving_signature(finished_run):
    import tensorflow as tf

    run_dir, _ = finished_run
    loaded = tf.saved_model.load(str(run_dir / "exports" / "saved_model"))
    signature = loaded.signatures["serving_default"]
    assert signature.structured_input_signature[1]  # a named input
    index = json.loads((run_dir / "exports" / "exports.json").read_text())
    assert index["checkpoint"] == "checkpoints/cp-0010"


def test_report_curve_and_tensorboard_logs_describe_the_run(finished_run):
    import tensorflow as tf

    run_dir, output = finished_run
    report = (run_dir / "report.md").read_text()
    for section in ("## Training curve", "## Per-epoch metrics", "## Exports", "## Parameters"):
        assert section in report
    assert report.count("\n| ") >= 10 + 7  # a row per epoch and per export, at least
    assert "data:image/png;base64," in report
    assert (run_dir / "metrics" / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = {}
    for event_file in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                steps.setdefault(value.tag, set()).add(event.step)
    assert steps["validation/epoch_accuracy"] == set(range(1, 11))
    assert steps["train/epoch_loss"] == set(range(1, 11))
    assert read_manifest(run_dir)["parameters"]["epochs"] == 10
    assert "Finished in state Completed" in output
