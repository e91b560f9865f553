"""The registry of export formats: how each is written, loaded with its own runtime, and checked.

Adding a format is adding one `ExportFormat` entry to `FORMATS`. `predict` loads the file the way
a user of that format would and returns the model's outputs for `x` (an array, or a dict of
arrays) as the model returns them (for several outputs, a dict or list). Weights-only formats
load into a model from `fresh_model`, a factory the caller passes (the registry knows no
architecture); `.keras`/`.h5` need the custom layers' modules imported.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ckptflow.core.checkpoints import write_tf_index
from ckptflow.core.errors import BadInputError
from ckptflow.core.native_output import send_native_output_to
from ckptflow.core.predictions import max_abs_diff, named
from ckptflow.core.snapshot import TEST_SPLITS, example_rows, load_snapshot, row_count, select_rows

if TYPE_CHECKING:
    import numpy as np

ModelFactory = Callable[[], object]  # a fresh, compiled keras.Model of the run's architecture
Predict = Callable[[Path, "np.ndarray", ModelFactory], object]


@dataclass(frozen=True)
class ExportFormat:
    """One export format."""

    name: str  # in `--formats`, the manifest and `ckptflow verify`
    filename: str  # under `exports/`
    save: Callable[[object, Path], None]
    predict: Predict  # loads the path with the format's own runtime and predicts `x`
    loader: str  # how it is loaded, in words, for reports
    tolerance: float = 1e-5  # largest allowed |prediction - trained model's prediction|
    requires: tuple[str, ...] = ()  # modules it needs beyond ckptflow's dependencies
    hdf5: bool = False  # its dataset shapes can be inspected with h5py
    multi_io: bool = True  # takes several inputs and outputs (LiteRT and ONNX here: one of each)

    def missing(self) -> list[str]:
        """The required modules that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


def predict_logits(model, x, chunk: int = 4096):
    """The model's outputs for `x` (an array, or a dict or list of arrays for several outputs),
    by direct calls in chunks of `chunk` rows (~10x faster than `model.predict`, which traces a
    new function for every freshly loaded model)."""
    import numpy as np
    import tensorflow as tf

    chunks = [model(select_rows(x, slice(i, i + chunk)), training=False)
              for i in range(0, row_count(x), chunk)]
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts), *chunks)


def _tensors(x):
    import tensorflow as tf

    return tf.nest.map_structure(tf.constant, x)


def load_keras_model(path: str | Path, compile: bool = True):
    """Load a `.keras`/`.h5` model with safe mode on; a BadInputError saying what to do for a
    file that holds Python code (a lambda) or a custom class whose module is not imported."""
    import keras

    try:
        return keras.models.load_model(path, safe_mode=True, compile=compile)
    except (TypeError, ValueError) as exc:
        text = str(exc)
        if "safe_mode" in text or "lambda" in text.lower():
            raise BadInputError(
                f"{path} holds Python code (a Lambda layer); ckptflow loads models with "
                "safe_mode=True and refuses it. Rebuild the model without Lambda layers, or load "
                "it yourself with safe_mode=False only if you trust its source.") from exc
        missing = re.search(r"[Cc]ould not (?:locate|deserialize) class '?([\w.>]+)'?", text)
        if missing:
            raise BadInputError(
                f"{path} uses the custom class {missing.group(1)}, which this program has not "
                "registered. Import the module that defines it (for the tutorial's layer: "
                "`import ckptflow.tutorial.model`) or pass custom_objects={...} to "
                "load_model.") from exc
        raise


def _save_tf_checkpoint(model, path: Path) -> None:
    import tensorflow as tf

    path.mkdir()
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(path / "ckpt"))
    write_tf_index(path, ["ckpt"])  # so `tf.train.latest_checkpoint(path)` finds it


def _predict_tf_checkpoint(path: Path, x: np.ndarray, fresh_model: ModelFactory) -> np.ndarray:
    import tensorflow as tf

    model = fresh_model()
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(
        str(path / "ckpt")).assert_existing_objects_matched()
    return predict_logits(model, x)


def _predict_weights_h5(path: Path, x: np.ndarray, fresh_model: ModelFactory) -> np.ndarray:
    model = fresh_model()
    model.load_weights(path)
    return predict_logits(model, x)


def _predict_saved_model(path: Path, x: np.ndarray, fresh_model: ModelFactory):
    """`serve`, the `serving_default` signature and `keras.layers.TFSMLayer` must all agree (on
    every output: the signature names a list's outputs `output_0`, ...)."""
    import keras
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # keep a reference: its variables die with it
    if "serving_default" not in loaded.signatures:
        raise ValueError(f"{path} has no serving_default signature")
    outputs = loaded.serve(_tensors(x))
    served = named(outputs)
    signature = (loaded.signatures["serving_default"](**_tensors(x)) if isinstance(x, dict)
                 else loaded.signatures["serving_default"](tf.constant(x)))
    by_signature = named(signature if isinstance(served, dict) else next(iter(signature.values())))
    by_layer = named(keras.layers.TFSMLayer(str(path), call_endpoint="serve")(x))
    spread = max(max_abs_diff(served, by_signature), max_abs_diff(served, by_layer))
    if spread > 1e-6:
        raise ValueError(f"{path}: serve, serving_default and TFSMLayer disagree by {spread:.1e}")
    return outputs


def _predict_litert(path: Path, x: np.ndarray, fresh_model: ModelFactory) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], x.shape)  # the file is exported for batch 1
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x.astype(inp["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def _predict_onnx(path: Path, x: np.ndarray, fresh_model: ModelFactory) -> np.ndarray:
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int32)": np.int32,
             "tensor(int64)": np.int64}.get(inp.type, np.float32)
    return session.run(None, {inp.name: x.astype(dtype)})[0]


def _export(fmt: str) -> Callable[[object, Path], None]:
    return lambda model, path: model.export(str(path), format=fmt, verbose=False)


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("tf_checkpoint", "tf_checkpoint", _save_tf_checkpoint, _predict_tf_checkpoint,
                 "fresh model + tf.train.Checkpoint(model, optimizer).read"),
    ExportFormat("weights_h5", "model.weights.h5", lambda m, p: m.save_weights(p),
                 _predict_weights_h5, "fresh model + model.load_weights", hdf5=True),
    ExportFormat("keras", "model.keras", lambda m, p: m.save(p),
                 lambda p, x, _: predict_logits(load_keras_model(p), x),
                 "keras.models.load_model(safe_mode=True)"),
    # Uncompiled: Keras 3.15 cannot deserialize a string loss such as "mse" from legacy HDF5
    # ("Could not deserialize 'keras.metrics.mse'"); predictions need no compile settings.
    ExportFormat("h5", "model.h5", lambda m, p: m.save(p),
                 lambda p, x, _: predict_logits(load_keras_model(p, compile=False), x),
                 "keras.models.load_model(compile=False) (legacy HDF5)", hdf5=True),
    ExportFormat("saved_model", "saved_model", _export("tf_saved_model"), _predict_saved_model,
                 "tf.saved_model.load(...).serve + serving_default + TFSMLayer"),
    ExportFormat("litert", "model.tflite", _export("litert"), _predict_litert,
                 "ai_edge_litert Interpreter (batch resized)", tolerance=5e-5,
                 requires=("ai_edge_litert",), multi_io=False),
    ExportFormat("onnx", "model.onnx", _export("onnx"), _predict_onnx,
                 "onnxruntime InferenceSession (CPU)", tolerance=5e-5,
                 requires=("onnxruntime", "onnx", "tf2onnx"), multi_io=False),
)}
FORMAT_NAMES = tuple(FORMATS)


def load_and_predict(sender, name: str, path: str, snapshot: str, identity: dict,
                     native_log: str) -> None:
    """In a fresh process (verify's): load one export with its own runtime, predict the test set,
    score the predictions, and send the outcome (or the error, in one line) through `sender`."""
    send_native_output_to(Path(native_log))
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # this process's entry point
    from ckptflow.core.models import ModelSource, prediction_metrics
    from ckptflow.core.user_code import resolve

    try:
        arrays = load_snapshot(snapshot, keys=TEST_SPLITS)
        source = ModelSource.from_identity(identity)
        resolve(source.ref, "--model")  # imports the module that registers its custom layers
        fresh_model = source.factory(*example_rows(arrays))
        started = time.perf_counter()
        outputs = FORMATS[name].predict(Path(path), arrays["x_test"], fresh_model)
        seconds = time.perf_counter() - started
        scorer = fresh_model()
        predictions = named(outputs, getattr(scorer, "output_names", None))
        sender.send({"predictions": predictions, "seconds": seconds,
                     "metrics": prediction_metrics(scorer, arrays["y_test"], predictions)})
    except Exception as exc:  # reported as the row's problem, in one line
        sender.send({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
    finally:
        sender.close()


def select_formats(names: list[str] | None, registry: dict[str, ExportFormat] | None = None,
                   several: str = "") -> tuple[list[ExportFormat], list[str]]:
    """The formats to export and a note for each one skipped (a missing package; a model of
    `several` inputs, outputs, or inputs and outputs). `names=None`: every format that can be
    exported; naming one that cannot is an error, since the user expects that file."""
    registry = FORMATS if registry is None else registry
    if names is not None:
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise BadInputError(f"Unrecognized format={unknown}. Supported formats are: "
                                f"{list(registry)}")
        chosen = [registry[n] for n in names]
        for fmt in chosen:
            if several and not fmt.multi_io:
                raise BadInputError(f"format {fmt.name} takes models of one input and one "
                                    f"output; this model has several {several}. Leave the "
                                    "format out.")
            if fmt.missing():
                raise BadInputError(
                    f"format {fmt.name} needs {', '.join(fmt.missing())}, which is not installed. "
                    "Install it with `pip install -e '.[formats]'` or leave the format out.")
        return chosen, []
    chosen, skipped = [], []
    for fmt in registry.values():
        if several and not fmt.multi_io:
            skipped.append(f"{fmt.name}: skipped, takes models of one input and one output only")
        elif fmt.missing():
            skipped.append(f"{fmt.name}: skipped, needs {', '.join(fmt.missing())} "
                           "(pip install -e '.[formats]')")
        else:
            chosen.append(fmt)
    return chosen, skipped
