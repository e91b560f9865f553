"""The registry of export formats: how each is written, loaded with its own runtime, and checked.

Adding a format is adding one `ExportFormat` entry to `FORMATS`. `predict` loads the file the way
a user of that format would (a fresh Keras model + load, `load_model`, `tf.saved_model.load`,
ai-edge-litert's Interpreter, onnxruntime) and returns logits for `x`. Formats whose packages are
missing (the `formats` extra) are skipped with a message saying what to install.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import BadInputError

Predict = Callable[[Path, np.ndarray, dict], np.ndarray]


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Args:
        name: the format's name in `--formats`, the manifest and `ckptflow verify`.
        filename: file or directory name under `exports/`.
        save: writes `model` to a path.
        predict: loads the path with the format's own runtime and predicts `x`.
        loader: how it is loaded, in words, for reports.
        tolerance: largest allowed |prediction - trained model's prediction|.
        requires: importable modules the format needs beyond ckptflow's dependencies.
        hdf5: the file is HDF5, so its groups and dataset shapes can be inspected with h5py.
    """

    name: str
    filename: str
    save: Callable[[object, Path], None]
    predict: Predict
    loader: str
    tolerance: float = 1e-5
    requires: tuple[str, ...] = ()
    hdf5: bool = False

    def missing(self) -> list[str]:
        """The required modules that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


def _fresh(identity: dict):
    from tasks.model import build_from_identity

    return build_from_identity(identity)


def _logits(model, x: np.ndarray) -> np.ndarray:
    from tasks.model import predict_logits

    return predict_logits(model, x)


def _save_tf_checkpoint(model, path: Path) -> None:
    import tensorflow as tf

    path.mkdir()
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(path / "ckpt"))


def _predict_tf_checkpoint(path: Path, x: np.ndarray, identity: dict) -> np.ndarray:
    import tensorflow as tf

    model = _fresh(identity)
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(
        str(path / "ckpt")).assert_existing_objects_matched()
    return _logits(model, x)


def _predict_weights_h5(path: Path, x: np.ndarray, identity: dict) -> np.ndarray:
    model = _fresh(identity)
    model.load_weights(path)
    return _logits(model, x)


def _predict_keras_file(path: Path, x: np.ndarray, identity: dict) -> np.ndarray:
    from tasks.model import load_keras_model

    return _logits(load_keras_model(path), x)


def _predict_saved_model(path: Path, x: np.ndarray, identity: dict) -> np.ndarray:
    """`serve`, the `serving_default` signature and `keras.layers.TFSMLayer` must all agree."""
    import keras
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # keep a reference: its variables die with it
    if "serving_default" not in loaded.signatures:
        raise ValueError(f"{path} has no serving_default signature")
    served = loaded.serve(tf.constant(x)).numpy()
    signature = loaded.signatures["serving_default"](tf.constant(x))
    by_signature = next(iter(signature.values())).numpy()
    by_layer = np.asarray(keras.layers.TFSMLayer(str(path), call_endpoint="serve")(x))
    spread = max(np.max(np.abs(served - by_signature)), np.max(np.abs(served - by_layer)))
    if spread > 1e-6:
        raise ValueError(f"{path}: serve, serving_default and TFSMLayer disagree by {spread:.1e}")
    return served


def _predict_litert(path: Path, x: np.ndarray, identity: dict) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], x.shape)  # the file is exported for batch 1
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def _predict_onnx(path: Path, x: np.ndarray, identity: dict) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def _export(fmt: str) -> Callable[[object, Path], None]:
    return lambda model, path: model.export(str(path), format=fmt, verbose=False)


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("tf_checkpoint", "tf_checkpoint", _save_tf_checkpoint, _predict_tf_checkpoint,
                 "fresh model + tf.train.Checkpoint(model, optimizer).read"),
    ExportFormat("weights_h5", "model.weights.h5", lambda m, p: m.save_weights(p),
                 _predict_weights_h5, "fresh model + model.load_weights", hdf5=True),
    ExportFormat("keras", "model.keras", lambda m, p: m.save(p), _predict_keras_file,
                 "keras.models.load_model(safe_mode=True)"),
    ExportFormat("h5", "model.h5", lambda m, p: m.save(p), _predict_keras_file,
                 "keras.models.load_model (legacy HDF5)", hdf5=True),
    ExportFormat("saved_model", "saved_model", _export("tf_saved_model"), _predict_saved_model,
                 "tf.saved_model.load(...).serve + serving_default + TFSMLayer"),
    ExportFormat("litert", "model.tflite", _export("litert"), _predict_litert,
                 "ai_edge_litert Interpreter (batch resized)", tolerance=5e-5,
                 requires=("ai_edge_litert",)),
    ExportFormat("onnx", "model.onnx", _export("onnx"), _predict_onnx,
                 "onnxruntime InferenceSession (CPU)", tolerance=5e-5,
                 requires=("onnxruntime", "onnx", "tf2onnx")),
)}


def select_formats(names: list[str] | None, registry: dict[str, ExportFormat] | None = None
                   ) -> tuple[list[ExportFormat], list[str]]:
    """The formats to export and a note for each one skipped for a missing package.

    `names=None` means every format whose packages are installed. Asking by name for a format
    whose packages are missing is an error, since the user expects that file.
    """
    registry = FORMATS if registry is None else registry
    if names is not None:
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise BadInputError(f"Unrecognized format={unknown}. Supported formats are: "
                                f"{list(registry)}")
        chosen = [registry[n] for n in names]
        for fmt in chosen:
            if fmt.missing():
                raise BadInputError(
                    f"format {fmt.name} needs {', '.join(fmt.missing())}, which is not installed. "
                    "Install it with `pip install -e '.[formats]'` or leave the format out.")
        return chosen, []
    chosen, skipped = [], []
    for fmt in registry.values():
        if fmt.missing():
            skipped.append(f"{fmt.name}: skipped, needs {', '.join(fmt.missing())} "
                           "(pip install -e '.[formats]')")
        else:
            chosen.append(fmt)
    return chosen, skipped
