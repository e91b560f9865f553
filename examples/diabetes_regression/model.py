"""A small regression network: disease progression from ten clinical measurements; and the same
with a second head that says whether the progression is high (a model of two named outputs)."""

import keras


def build(hidden: int = 32, learning_rate: float = 0.01) -> keras.Model:
    model = keras.Sequential([
        keras.Input((10,), name="measurements"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(1, name="progression"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse", metrics=["mae"])
    return model


def build_two_heads(hidden: int = 32, learning_rate: float = 0.01) -> keras.Model:
    """One trunk, two named outputs: `progression` (MSE, MAE) and `high_risk` (a probability;
    binary cross-entropy, accuracy). Labels: data.py's load(high_risk=True)."""
    inputs = keras.Input((10,), name="measurements")
    trunk = keras.layers.Dense(hidden, activation="relu")(inputs)
    outputs = {"progression": keras.layers.Dense(1, name="progression")(trunk),
               "high_risk": keras.layers.Dense(1, activation="sigmoid", name="high_risk")(trunk)}
    model = keras.Model(inputs, outputs, name="diabetes_two_heads")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss={"progression": "mse", "high_risk": "binary_crossentropy"},
                  metrics={"progression": ["mae"], "high_risk": ["accuracy"]})
    return model
