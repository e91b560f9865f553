"""A small CNN for scikit-learn's 8x8 digits, with a custom layer of its own."""

import keras


@keras.saving.register_keras_serializable(package="digits")
class Rescale(keras.layers.Layer):
    """Multiply the inputs by `factor` (the digits' pixels run from 0 to 16)."""

    def __init__(self, factor: float = 1 / 16, **kwargs):
        super().__init__(**kwargs)
        self.factor = float(factor)

    def call(self, inputs):
        return inputs * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def build(filters: int = 8, learning_rate: float = 0.005, seed: int = 0) -> keras.Model:
    """Rescale -> Conv2D -> MaxPool -> Flatten -> Dropout -> Dense(10), compiled."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = Rescale(name="rescale")(inputs)
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.1, seed=seed)(x)
    outputs = keras.layers.Dense(10, kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(x)
    model = keras.Model(inputs, outputs, name="digits_cnn")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model
