"""A small regression network: disease progression from ten clinical measurements."""

import keras


def build(hidden: int = 32, learning_rate: float = 0.01) -> keras.Model:
    model = keras.Sequential([
        keras.Input((10,), name="measurements"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(1, name="progression"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse", metrics=["mae"])
    return model
