"""scikit-learn's bundled diabetes table (442 patients) as NumPy arrays."""

import numpy as np
from sklearn.datasets import load_diabetes


def load(test_share: float = 0.2) -> dict:
    x, y = load_diabetes(return_X_y=True)
    x, y = x.astype("float32"), y.astype("float32").reshape(-1, 1)
    order = np.random.default_rng(0).permutation(len(y))
    n_test = int(len(y) * test_share)
    test, train = order[:n_test], order[n_test:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}
