"""A model's predictions on the test set: one array, or for a model of several outputs a dict of
arrays by output name. Saved beside the exports (`.npy`, or `.npz` by output name) and compared
output by output, so every export of a multi-output model is checked on each of its outputs."""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np

Predictions = np.ndarray | dict[str, np.ndarray]


def named(outputs, names: list[str] | None = None) -> Predictions:
    """A model's outputs (a tensor, or a dict, list or tuple of them) as Predictions: a list is
    named in order by `names` (the model's `output_names`; `output_0`, ... without them)."""
    if isinstance(outputs, dict):
        return {str(k): np.asarray(v) for k, v in outputs.items()}
    if isinstance(outputs, list | tuple):
        if len(outputs) == 1:
            return np.asarray(outputs[0])
        names = names or [f"output_{i}" for i in range(len(outputs))]
        return dict(zip(names, (np.asarray(v) for v in outputs), strict=True))
    return np.asarray(outputs)


def max_abs_diff(a: Predictions, b: Predictions) -> float:
    """The largest |a - b| over every output; infinite when the outputs differ in names or
    shapes (so no tolerance accepts them)."""
    if isinstance(a, dict) != isinstance(b, dict) or (isinstance(a, dict) and set(a) != set(b)):
        return math.inf
    pairs = [(a[k], b[k]) for k in a] if isinstance(a, dict) else [(a, b)]
    if any(x.shape != y.shape for x, y in pairs):
        return math.inf
    return max(float(np.max(np.abs(x - y), initial=0.0)) for x, y in pairs)


def suffix(predictions: Predictions) -> str:
    """The file type that holds them: `.npz` (one array per output name) or `.npy`."""
    return ".npz" if isinstance(predictions, dict) else ".npy"


def to_bytes(predictions: Predictions) -> bytes:
    """An .npy, or an .npz of one `NAME.npy` per output (written here, not by `np.savez`, whose
    keywords would refuse an output named `file`)."""
    buffer = io.BytesIO()
    if not isinstance(predictions, dict):
        np.save(buffer, predictions)
        return buffer.getvalue()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in predictions.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()


def load(path: str | Path) -> Predictions:
    """Predictions saved by `to_bytes`."""
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    return loaded
