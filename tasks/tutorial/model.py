"""The tutorial's classifier: Standardize → Dense → Dropout → Dense(10), with one registered custom layer.

Importing this module registers the layer as `ckptflow>Standardize`, which is what `.keras` and
`.h5` files made by any ckptflow version name, so `keras.models.load_model` finds it.
"""

from __future__ import annotations

import random

import keras

# MNIST pixel statistics after scaling to [0, 1].
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@keras.saving.register_keras_serializable(package="ckptflow")
class Standardize(keras.layers.Layer):
    """Shift and scale inputs: `(x - mean) / std`.

    The tutorial's custom-objects step in a form every format must carry: its behaviour lives in
    its config, so a format that loses the config loses the predictions too.
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


def create_model(units: int = 512, dropout: float = 0.2, learning_rate: float = 1e-3,
                 seed: int = 42) -> keras.Model:
    """The tutorial's `create_model()`, compiled; every seed comes from `seed`, so the same seed
    gives the same model wherever and whenever it is built."""
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
