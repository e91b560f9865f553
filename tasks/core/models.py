"""A run's model, built from the function its identity names: checked, built, fingerprinted.

The identity a run records says which function makes its model: a user's `{"model": REF,
"model_params": {...}, ...}`, or, for the tutorial (the fields run directories have always
recorded), `{"units": .., "dropout": .., "learning_rate": .., ...}`. Every stage that needs the
architecture (training, evaluate, export, verify's loaders) builds it here, so a user's model
flows through ckptflow unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from ckptflow.core.errors import BadInputError, first_line
from ckptflow.core.user_code import call, resolve

# The built-in model, and the options of its own that TrainConfig has as fields.
TUTORIAL_MODEL = "ckptflow.tutorial.model:create_model"
TUTORIAL_PARAMS = ("units", "dropout", "learning_rate")


def evaluation_batch_size(train_batch_size: int = 0) -> int:
    """Rows per batch when a model is evaluated on the test set: 256 (fast on a CPU), or the
    training batch size when larger."""
    return max(256, train_batch_size)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy, TensorFlow and Keras; with `deterministic`, make TensorFlow ops
    deterministic.

    Called where a run starts what follows its seed (training, the initial model, a data
    function), never by building a model. Op determinism is process-wide and cannot be switched
    off again in the same process, so only training asks for it (`--no-deterministic` then
    really runs without it).
    """
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
        """A fresh model: called with the params, checked to be a compiled keras.Model, and built
        on `x_sample` with its optimizer and metrics, so a checkpoint can be restored into it and
        its loss and metrics are known to take `y_sample`. Python's and NumPy's generators are
        left as they were (a model built mid-training must not move them): call
        `seed_everything` first where the initial weights should follow the seed.
        """
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
        """A function of no arguments that builds a fresh model (what weights-only formats load
        into)."""
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
    if isinstance(y_pred, dict | list | tuple):
        raise BadInputError(f"--model {ref} has several outputs; ckptflow trains models with one "
                            "output tensor. Return a model with a single output.")
    try:
        model.compute_loss(x=x_sample, y=y_sample, y_pred=y_pred)
        model.compute_metrics(x_sample, y_sample, y_pred, sample_weight=None)
    except Exception as exc:
        raise BadInputError(f"--model {ref}: its loss or metrics cannot take the data's labels "
                            f"({_shapes(y_sample)}) against outputs of shape "
                            f"{tuple(y_pred.shape)}: {type(exc).__name__}: {first_line(exc)}. "
                            "Match the loss to the labels (e.g. sparse categorical "
                            "crossentropy for integer classes).") from exc
    model.reset_metrics()
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def fingerprint(model) -> str:
    """SHA-256 of what makes a model this model: its class, every weight's shape and dtype in
    order, and its compile settings (optimizer, loss, metrics). Names Keras numbers per process
    (dense_3) are left out, so the same code gives the same fingerprint in every process."""
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
    return [name for name in model.get_metrics_result() if name != "loss"]


def prediction_metrics(model, y, predictions) -> dict[str, float]:
    """The model's compiled metrics (loss excluded) of `predictions` against `y`: what any
    export's predictions are scored with."""
    import tensorflow as tf

    model.reset_metrics()
    model.compute_metrics(None, y, tf.constant(predictions), sample_weight=None)
    results = {k: float(v) for k, v in model.get_metrics_result().items() if k != "loss"}
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
    return f"per-example shape {tuple(getattr(value, 'shape', ()))[1:]}"


def describe_metrics(metrics: dict[str, float]) -> str:
    """`accuracy 91.20%, loss 0.3012` (accuracy as a percentage, the rest as numbers)."""
    return ", ".join(f"{k} {v:.2%}" if k == "accuracy" else f"{k} {v:.4g}"
                     for k, v in sorted(metrics.items(), key=lambda kv: kv[0] != "accuracy"))
