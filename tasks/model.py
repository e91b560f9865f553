"""build-model: the tutorial's classifier, with one registered custom layer, saved as the run's start."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import keras
import tensorflow as tf
from prefect import task
from pydantic import BaseModel

from tasks.config import TrainConfig
from tasks.errors import BadInputError
from tasks.files import publish, sha256_file
from tasks.manifest import artifact_entry, read_manifest, set_artifacts, update_manifest
from tasks.policy import retry_options

log = logging.getLogger("ckptflow.model")
# tf.function retracing notices fire whenever a fresh model is loaded to be checked; not news.
logging.getLogger("tensorflow").setLevel(logging.ERROR)

INITIAL_MODEL = Path("model") / "initial.keras"
# MNIST pixel statistics after scaling to [0, 1].
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@keras.saving.register_keras_serializable(package="ckptflow")
class Standardize(keras.layers.Layer):
    """Shift and scale inputs: `(x - mean) / std`.

    The tutorial's custom-objects step in a form every format must carry: its behaviour lives in
    its config, so a format that loses the config loses the predictions too.

    Args:
        mean: float, subtracted from every input. Defaults to 0.0.
        std: float > 0, divides the shifted input. Defaults to 1.0.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if std <= 0:
            raise ValueError(f"std must be positive. Received: std={std}")
        self.mean = float(mean)
        self.std = float(std)

    def call(self, inputs):
        return (inputs - self.mean) / self.std

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


class ModelRecord(BaseModel):
    """What build-model made: the untrained model file and what defines it."""

    path: str
    sha256: str
    parameters: int
    identity: dict


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and TensorFlow; with `deterministic`, make TensorFlow ops deterministic.

    Op determinism is process-wide and cannot be switched off again in the same process, so only
    training asks for it (`--no-deterministic` then really runs without it).
    """
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def build_model(units: int = 512, dropout: float = 0.2, learning_rate: float = 1e-3,
                seed: int = 42, deterministic: bool = False) -> keras.Model:
    """The tutorial's model: Standardize → Dense(units, relu) → Dropout → Dense(10), compiled.

    Example:
        model = build_model(units=64)
        logits = model(np.zeros((1, 784), "float32"))

    Args:
        deterministic: also enable TensorFlow op determinism (process-wide). Defaults to False;
            training passes its `deterministic` setting.
    """
    seed_everything(seed, deterministic)
    # The seeds Keras would draw for unseeded initializers right after set_random_seed(seed), but
    # from a private generator: another thread drawing from the process-wide `random` (Dask's,
    # Prefect's) in between would otherwise change the initial weights.
    draws = random.Random(seed)
    hidden_seed, logits_seed = draws.randint(1, int(1e9)), draws.randint(1, int(1e9))
    inputs = keras.Input((784,), name="pixels")
    x = Standardize(MNIST_MEAN, MNIST_STD, name="standardize")(inputs)
    x = keras.layers.Dense(units, activation="relu", name="hidden",
                           kernel_initializer=keras.initializers.GlorotUniform(hidden_seed))(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(10, name="logits",
                                 kernel_initializer=keras.initializers.GlorotUniform(logits_seed))(x)
    model = keras.Model(inputs, outputs, name="mnist_mlp")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    model.optimizer.build(model.trainable_variables)  # so optimizer state can be restored into it
    return model


def build_from_identity(identity: dict) -> keras.Model:
    """A fresh, untrained model from the settings recorded with a run (its `identity`)."""
    return build_model(identity["units"], identity["dropout"], identity["learning_rate"],
                       identity["seed"])


def predict_logits(model: keras.Model, x, chunk: int = 4096):
    """The model's logits for `x`, by direct calls in chunks of `chunk` rows.

    For a few thousand rows this is ~10x faster than `model.predict`, which traces a new
    function for every freshly loaded model; exports are compared on these logits.
    """
    import numpy as np

    return np.concatenate([np.asarray(model(x[i:i + chunk], training=False))
                           for i in range(0, len(x), chunk)])


def load_keras_model(path: str | Path) -> keras.Model:
    """Load a `.keras`/`.h5` model with safe mode on and ckptflow's custom layer known.

    Raises BadInputError with what to do, instead of Keras' traceback, for a file that holds
    Python code (a lambda) or a custom class this program does not know.
    """
    try:
        return keras.models.load_model(path, custom_objects={"Standardize": Standardize},
                                       safe_mode=True)
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
                "registered. Import the module that defines it (for ckptflow's layer: "
                "`import tasks.model`) or pass custom_objects={...} to load_model.") from exc
        raise


def build_model_stage(run_dir: str | Path, identity: dict) -> ModelRecord:
    """Build the model from `identity` (units, dropout, learning_rate, seed, ...) and save it.

    The untrained model is the run's starting point and the "untrained accuracy" baseline. A run
    directory keeps the model it was started with: a different request is refused.
    """
    run_dir = Path(run_dir)
    path = run_dir / INITIAL_MODEL
    recorded = read_manifest(run_dir).get("model")
    if recorded and recorded["identity"] != identity:  # whether or not the file is still there
        raise BadInputError(
            f"run directory {run_dir} was started with a different model "
            f"({_diff(recorded['identity'], identity)}). Use another --run-dir, or the "
            "original settings.")
    if recorded and path.exists() and sha256_file(path) == recorded["sha256"]:
        return ModelRecord(**recorded)
    model = build_from_identity(identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.keras")
    model.save(tmp)
    publish(tmp, path)
    record = ModelRecord(path=INITIAL_MODEL.as_posix(), sha256=sha256_file(path),
                         parameters=model.count_params(), identity=identity)
    update_manifest(run_dir, model=record.model_dump())
    set_artifacts(run_dir, "model", [artifact_entry(run_dir, path, "model", "keras")])
    log.info("model: %d parameters, saved untrained to %s", record.parameters, record.path)
    return record


def _diff(old: dict, new: dict) -> str:
    return ", ".join(f"{k}: run has {old.get(k)!r}, requested {new.get(k)!r}"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


@task(name="build-model", **retry_options())
def build_model_task(config: TrainConfig) -> ModelRecord:
    """Build and save the untrained model; a run directory keeps the model it started with."""
    return build_model_stage(config.run_dir, config.identity())
