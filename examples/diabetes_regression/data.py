"""scikit-learn's bundled diabetes table (442 patients) as NumPy arrays."""

import numpy as np
from sklearn.datasets import load_diabetes


def load(test_share: float = 0.2, validation_share: float = 0.0, high_risk: bool = False) -> dict:
    """Train and test arrays; with `validation_share`, also a validation set of its own (the
    per-epoch val_* metrics, the best epoch and the callbacks then watch it, not the test set).
    With `high_risk`, the labels of model.py's two heads: a dict of the progression and whether
    it is above the training set's median (1) or not (0)."""
    x, y = load_diabetes(return_X_y=True)
    x, y = x.astype("float32"), y.astype("float32").reshape(-1, 1)
    order = np.random.default_rng(0).permutation(len(y))
    n_test, n_val = int(len(y) * test_share), int(len(y) * validation_share)
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    median = np.median(y[train])

    def labels(rows):
        if not high_risk:
            return y[rows]
        return {"progression": y[rows], "high_risk": (y[rows] > median).astype("float32")}

    arrays = {"x_train": x[train], "y_train": labels(train), "x_test": x[test],
              "y_test": labels(test)}
    if n_val:
        arrays |= {"x_val": x[val], "y_val": labels(val)}
    return arrays
