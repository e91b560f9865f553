"""scikit-learn's bundled 8x8 digits (1,797 images) as tf.data pipelines: shuffled, mapped."""

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits


def load(test_share: float = 0.25, shuffle_buffer: int = 256) -> dict:
    """{"train", "test"}: unbatched (image, label) pipelines; the training one reshuffles each epoch."""
    digits = load_digits()
    images = digits.images.astype("uint8")[..., np.newaxis]  # (1797, 8, 8, 1), pixels 0-16
    labels = digits.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(labels))
    n_test = int(len(labels) * test_share)
    test, train = order[:n_test], order[n_test:]

    def to_float(image, label):
        return tf.cast(image, tf.float32), label

    train_ds = (tf.data.Dataset.from_tensor_slices((images[train], labels[train]))
                .shuffle(shuffle_buffer)
                .map(to_float, num_parallel_calls=tf.data.AUTOTUNE))
    test_ds = tf.data.Dataset.from_tensor_slices((images[test], labels[test])).map(to_float)
    return {"train": train_ds, "test": test_ds}
