"""A run's model, built from the function its identity names: checked, built, fingerprinted.

A user's identity is `{"model": REF, "model_params": {...}, ...}`, the tutorial's `{"units": ..,
"dropout": .., "learning_rate": .., ...}`. Every stage that needs the architecture builds it here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from ckptflow.core.errors import BadInputError, first_line
from ckptflow.core.user_code import call, resolve

# The built-in model, and the options of its own that TrainConfig has as fields.
TUTORIAL_MODEL = "ckptflow.tutorial.model:create_model"
TUTORIAL_PARAMS = ("units", "dropout", "learning_rate")


def evaluation_batch_size(train_batch_size: int = 0) -> int:
    """Rows per batch to evaluate the test set: 256 (fast on a CPU), or a larger training batch."""
    return max(256, train_batch_size)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy, TensorFlow and Keras; with `deterministic`, make TensorFlow ops
    deterministic (process-wide and for good, so only training asks for it). Called where a run
    starts what follows its seed, never by building a model."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


@dataclass(frozen=True)
class ModelSource:
    """Which function makes a run's model, with what parameters and seed."""

    ref: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 42

    @classmethod
    def from_identity(cls, identity: dict[str, Any]) -> ModelSource:
        """The source a recorded identity names (the tutorial's when it names no REF)."""
        if "model" in identity:
            return cls(identity["model"], dict(identity.get("model_params") or {}), identity["seed"])
        return cls(TUTORIAL_MODEL, {k: identity[k] for k in TUTORIAL_PARAMS}, identity["seed"])

    def build(self, x_sample, y_sample):
        """A fresh compiled keras.Model, built on the samples with its optimizer and metrics (so
        a checkpoint can be restored into it); the global generators are left as they were."""
        import keras

        function = resolve(self.ref, "--model")
        with _generators_restored():  # unseeded layers draw their seeds from them
            model = call(function, self.ref, "--model", self.params, optional={"seed": self.seed})
            if not isinstance(model, keras.Model):
                raise BadInputError(f"--model {self.ref} returned {type(model).__name__}, not a "
                                    "keras.Model. Return the model itself.")
            if not getattr(model, "compiled", False) or model.optimizer is None:
                raise BadInputError(f"--model {self.ref} returned an uncompiled model. Call "
                                    "model.compile(optimizer=..., loss=..., metrics=[...]) "
                                    "before returning it.")
            _build(model, self.ref, x_sample, y_sample)
        return model

    def factory(self, x_sample, y_sample):
        """A function of no arguments that builds a fresh model."""
        return lambda: self.build(x_sample, y_sample)


@contextlib.contextmanager
def _generators_restored():
    """Python's and NumPy's global random states as they were before the block."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _build(model, ref: str, x_sample, y_sample) -> None:
    try:
        y_pred = model(x_sample, training=False)
    except Exception as exc:
        raise BadInputError(f"--model {ref}: the model cannot take the data's features "
                            f"({_shapes(x_sample)}): {type(exc).__name__}: {first_line(exc)}. "
                            "Match the model's inputs to the data.") from exc
    if isinstance(y_pred, list | tuple) and len(y_pred) > 1:
        _check_output_names(model, ref, len(y_pred))
    try:
        model.compute_loss(x=x_sample, y=y_sample, y_pred=y_pred)
        model.compute_metrics(x_sample, y_sample, y_pred, sample_weight=None)
    except Exception as exc:
        raise BadInputError(f"--model {ref}: its loss or metrics cannot take the data's labels "
                            f"({_shapes(y_sample)}) against outputs of "
                            f"{_shapes(y_pred)}: {type(exc).__name__}: {first_line(exc)}. "
                            "Match the loss to the labels (e.g. sparse categorical "
                            "crossentropy for integer classes).") from exc
    model.reset_metrics()
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _check_output_names(model, ref: str, outputs: int) -> None:
    """A list of outputs is named by its layers: refuse names that are missing, or Keras'
    automatic ones (`dense_3`: numbered per process, so a resume or verify would not match)."""
    names = getattr(model, "output_names", None) or []
    automatic = [n for n in names if _automatic_name(model, n)]
    if len(names) != outputs or automatic:
        received = (f"outputs named {automatic} by Keras (numbered per process, so another "
                    "process would name them otherwise)" if automatic else "no output names")
        raise BadInputError(f"--model {ref} returns {outputs} outputs as a list with "
                            f"{received}. Name each output layer (e.g. Dense(1, name=\"aux\")) or "
                            "return a dict of outputs, so that each output's metrics and "
                            "predictions keep their names.")


def _automatic_name(model, name: str) -> bool:
    """Whether an output's name is one Keras gave it (`dense_3`, an op's `add`)."""
    from keras.src.utils.naming import to_snake_case

    try:
        layer = model.get_layer(name)
    except ValueError:  # the output of an op, not of a layer: always named by Keras
        return True
    return re.fullmatch(rf"{re.escape(to_snake_case(type(layer).__name__))}(_\d+)?", name) is not None


def fingerprint(model) -> str:
    """SHA-256 of the model's class, weight shapes and dtypes, and compile settings (without the
    names Keras numbers per process, such as dense_3)."""
    try:
        compiled = model.get_compile_config()
    except Exception:  # a compile argument Keras cannot serialize: its class names stand in
        compiled = {"optimizer": type(model.optimizer).__name__, "loss": repr(model.loss)}
    described = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights": [[list(w.shape), str(w.dtype)] for w in model.weights],
        "compile": _without_names(compiled),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def weight_shapes(model) -> list[list[int]]:
    """The shape of every trainable weight, in order (what an HDF5 export must hold)."""
    return [list(w.shape) for w in model.trainable_weights]


def metric_names(model) -> list[str]:
    """The names the model's compiled metrics report (`accuracy`, `mae`, ...), loss excluded."""
    return [name for name in model.get_metrics_result() if name not in loss_names(model)]


def loss_names(model) -> set[str]:
    """The loss trackers among the results: `loss`, and each output's (`aux_loss`): the model's
    own Mean trackers (its compiled metrics are inside its CompileMetrics)."""
    import keras

    return {"loss"} | {m.name for m in model.metrics if isinstance(m, keras.metrics.Mean)}


def prediction_metrics(model, y, predictions) -> dict[str, float]:
    """The model's compiled metrics (losses excluded) of `predictions` against `y` (for a model
    of several outputs, a dict by output name)."""
    import tensorflow as tf

    model.reset_metrics()
    model.compute_metrics(None, y, tf.nest.map_structure(tf.constant, predictions),
                          sample_weight=None)
    results = {k: float(v) for k, v in model.get_metrics_result().items()
               if k not in loss_names(model)}
    model.reset_metrics()
    return results


def _without_names(value):
    if isinstance(value, dict):
        return {k: _without_names(v) for k, v in value.items() if k != "name"}
    if isinstance(value, list):
        return [_without_names(v) for v in value]
    return value


def _shapes(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {tuple(getattr(v, 'shape', ()))[1:]}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(f"[{i}]: {tuple(getattr(v, 'shape', ()))[1:]}" for i, v in enumerate(value))
    return f"per-example shape {tuple(getattr(value, 'shape', ()))[1:]}"


def describe_metrics(metrics: dict[str, float]) -> str:
    """`accuracy 91.20%, loss 0.3012` (accuracies, `cls_accuracy` too, as percentages and first;
    the rest as numbers)."""
    return ", ".join(f"{k} {v:.2%}" if k.endswith("accuracy") else f"{k} {v:.4g}"
                     for k, v in sorted(metrics.items(), key=lambda kv: not kv[0].endswith("accuracy")))
