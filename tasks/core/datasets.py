"""A user's data, from the function `--data` names: NumPy arrays, or tf.data pipelines.

Arrays (`x_train`, `y_train`, `x_test`, `y_test`, optionally `x_val`, `y_val` and `w_train`,
each training example's weight; features and labels may be a dict or list of arrays, for a model
of several inputs or outputs) are snapshotted whole. Of
`{"train", "test"}` (optionally `"validation"`) pipelines of unbatched `(features, label)`
elements (`(features, label, weight)` for training) the test and validation sets are
snapshotted, the training pipeline fingerprinted and rebuilt by training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptflow.core.errors import BadInputError
from ckptflow.core.models import seed_everything
from ckptflow.core.snapshot import (
    SPLITS,
    TRAIN_WEIGHTS,
    VAL_SPLITS,
    Arrays,
    Nested,
    data_digest,
    row_count,
)
from ckptflow.core.user_code import call, resolve

PIPELINE_SPLITS = ("train", "test")
VALIDATION = "validation"  # the optional pipeline of a validation set


@dataclass
class UserData:
    """Data as loaded (the tutorial's too): arrays for every split, or a training pipeline and
    test arrays."""

    arrays: Arrays
    train: Any = None  # the unbatched tf.data.Dataset, for kind "pipeline"
    train_count: int | None = None
    train_fingerprint: str | None = None

    @property
    def kind(self) -> str:
        return "arrays" if self.train is None else "pipeline"

    @property
    def train_samples(self) -> int:
        if self.train_count is not None:
            return self.train_count
        return row_count(self.arrays["y_train"])

    def digest(self) -> str:
        """What identifies the data: the arrays' digest, or the pipeline's training elements
        (order ignored) with its test set."""
        if self.kind == "arrays":
            return data_digest(self.arrays)
        return hashlib.sha256(f"pipeline:{self.train_count}:{self.train_fingerprint}:"
                              f"{data_digest(self.arrays)}".encode()).hexdigest()


def call_data_function(ref: str, params: dict[str, Any], seed: int):
    """The data function's mapping, after seeding (a shuffle without a seed then repeats)."""
    function = resolve(ref, "--data")
    seed_everything(seed, deterministic=False)
    value = call(function, ref, "--data", params)
    if not isinstance(value, dict):
        raise BadInputError(f"--data {ref} returned {type(value).__name__}. Expected a dict: "
                            "{x_train, y_train, x_test, y_test} arrays or {train, test} "
                            "tf.data pipelines.")
    return value


def load_user_data(ref: str, params: dict[str, Any], seed: int) -> UserData:
    """The validated data of `ref` (a pipeline's test set read, its training set fingerprinted)."""
    value = call_data_function(ref, params, seed)
    if set(value) - {TRAIN_WEIGHTS} in (set(SPLITS), {*SPLITS, *VAL_SPLITS}):
        return UserData(arrays=checked_arrays(ref, value))
    if set(value) in (set(PIPELINE_SPLITS), {*PIPELINE_SPLITS, VALIDATION}):
        train, test = checked_pipelines(ref, value)
        count, print_ = pipeline_fingerprint(train)
        if count == 0:
            raise BadInputError(f"--data {ref}: the train pipeline is empty. Return at least one "
                                "element.")
        arrays = read_elements(ref, test, "test")
        if VALIDATION in value:
            arrays |= read_elements(ref, value[VALIDATION], "val")
        return UserData(arrays=arrays, train=train, train_count=count, train_fingerprint=print_)
    raise BadInputError(f"--data {ref} returned keys {sorted(map(str, value))}. Expected "
                        f"{list(SPLITS)} (arrays, optionally {TRAIN_WEIGHTS!r}) or "
                        f"{list(PIPELINE_SPLITS)} (tf.data), each optionally with a validation "
                        f"set ({list(VAL_SPLITS)}, {VALIDATION!r}).")


def training_pipeline(ref: str, params: dict[str, Any], seed: int):
    """The unbatched training pipeline, rebuilt exactly as fetch-data saw it."""
    value = call_data_function(ref, params, seed)
    if not set(PIPELINE_SPLITS) <= set(value) <= {*PIPELINE_SPLITS, VALIDATION}:
        raise BadInputError(f"--data {ref} no longer returns tf.data pipelines (keys "
                            f"{sorted(map(str, value))}). Use the data the run started with.")
    return checked_pipelines(ref, value)[0]


def checked_arrays(ref: str, value: dict) -> Arrays:
    """The splits as NumPy arrays, refused if rows, feature names or shapes disagree."""
    arrays: Arrays = {}
    for split in [s for s in (*SPLITS, *VAL_SPLITS) if s in value]:
        arrays[split] = _split_arrays(ref, split, value[split])
    for part in [p for p in ("train", "test", "val") if f"y_{p}" in arrays]:
        rows = {name: len(a) for kind in ("x", "y")
                for name, a in _named_leaves(f"{kind}_{part}", arrays[f"{kind}_{part}"])}
        if len(set(rows.values())) > 1:
            raise BadInputError(f"--data {ref}: x_{part} and y_{part} have different numbers of "
                                f"rows ({', '.join(f'{n}: {r}' for n, r in rows.items())}). Give "
                                "one label per example.")
        if set(rows.values()) == {0}:
            raise BadInputError(f"--data {ref}: {part} split is empty. Give at least one example.")
    if TRAIN_WEIGHTS in value:
        arrays[TRAIN_WEIGHTS] = _weights(ref, value[TRAIN_WEIGHTS], row_count(arrays["y_train"]))
    for part in [p for p in ("test", "val") if f"y_{p}" in arrays]:
        for kind, dtypes in (("x", True), ("y", False)):  # integer labels may differ in width
            train = _layout(arrays[f"{kind}_train"], dtypes)
            other = _layout(arrays[f"{kind}_{part}"], dtypes)
            if train != other:
                raise BadInputError(f"--data {ref}: train and {part} examples differ in shape"
                                    f"{' or dtype' if dtypes else ''} ({kind}_train {train} vs "
                                    f"{kind}_{part} {other}). Give every split the same features "
                                    "and labels.")
    return arrays


def _named_leaves(split: str, value: Nested) -> list[tuple[str, np.ndarray]]:
    """One split's arrays with the names an error gives them (`y_train['aux']`)."""
    if isinstance(value, dict):
        return [(f"{split}[{k!r}]", v) for k, v in value.items()]
    if isinstance(value, list):
        return [(f"{split}[{i}]", v) for i, v in enumerate(value)]
    return [(split, value)]


def _split_arrays(ref: str, split: str, item) -> Nested:
    """One split as an array, or a dict or list of arrays (several model inputs or outputs; as
    in Keras, a list of arrays is several, a list of numbers or rows one array)."""
    several_arrays = isinstance(item, list | tuple) and all(
        getattr(v, "ndim", 0) >= 1 for v in item)
    if isinstance(item, dict) or several_arrays:
        if not item:
            raise BadInputError(f"--data {ref}: {split} is an empty {type(item).__name__}. Give "
                                f"one array per model {'input' if split[0] == 'x' else 'output'}.")
        if isinstance(item, dict):
            return {str(k): _numeric(ref, f"{split}[{k!r}]", v) for k, v in item.items()}
        return [_numeric(ref, f"{split}[{i}]", v) for i, v in enumerate(item)]
    return _numeric(ref, split, item)


def _numeric(ref: str, name: str, value) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise BadInputError(f"--data {ref}: {name} is not an array ({exc}). Return NumPy "
                            "arrays.") from exc
    if array.dtype.kind not in "biuf" or array.ndim == 0:
        raise BadInputError(f"--data {ref}: {name} holds {array.dtype} of shape {array.shape}. "
                            "Expected a numeric array with one row per example.")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadInputError(f"--data {ref}: {name} holds NaN or infinite values. Clean or "
                            "impute them first.")
    return array


def _weights(ref: str, value, rows: int) -> np.ndarray:
    """Per-example training weights: one finite number >= 0 per training example."""
    weights = _numeric(ref, TRAIN_WEIGHTS, value)
    if weights.shape not in ((rows,), (rows, 1)) or (weights < 0).any():
        raise BadInputError(f"--data {ref}: {TRAIN_WEIGHTS} holds {weights.dtype} of shape "
                            f"{weights.shape}{', some negative' if (weights < 0).any() else ''}. "
                            f"Expected one weight >= 0 per training example, shape ({rows},).")
    return weights.reshape(rows).astype("float32")


def _layout(value: Nested, dtypes: bool = True) -> dict | list | tuple:
    """Per-example shapes (and dtypes) of one split's arrays: what every split must share."""
    if isinstance(value, dict):
        return {k: _layout(v, dtypes) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_layout(v, dtypes) for v in value]
    return (value.shape[1:], value.dtype.str) if dtypes else value.shape[1:]


def checked_pipelines(ref: str, value: dict):
    """(train, test), refused unless they (and a validation pipeline) are tf.data.Datasets of
    unbatched, matching `(features, label)` elements."""
    import tensorflow as tf

    splits = [s for s in (*PIPELINE_SPLITS, VALIDATION) if s in value]
    for split in splits:
        if not isinstance(value[split], tf.data.Dataset):
            raise BadInputError(f"--data {ref}: {split} is {type(value[split]).__name__}, not a "
                                "tf.data.Dataset. Return tf.data pipelines, or arrays under "
                                f"{list(SPLITS)}.")
    specs = {split: value[split].element_spec for split in splits}
    for split, spec in specs.items():
        sizes = (2, 3) if split == "train" else (2,)  # training elements may carry a weight
        if not (isinstance(spec, tuple) and len(spec) in sizes):
            raise BadInputError(f"--data {ref}: {split} elements are {spec}. Expected "
                                "(features, label) pairs, e.g. Dataset.from_tensor_slices((x, "
                                "y))" + (", or (features, label, weight)" if len(sizes) > 1
                                         else "") + ".")
        leaves = tf.nest.flatten(spec)
        if all(s.shape.rank and s.shape[0] is None for s in leaves):
            raise BadInputError(f"--data {ref}: {split} looks batched (every component's first "
                                f"dimension is unknown: {spec}). Return unbatched elements; "
                                "ckptflow batches with --batch-size.")
    for split in splits[1:]:
        if not _same_structure(specs["train"][:2], specs[split]):
            raise BadInputError(f"--data {ref}: train and {split} elements differ "
                                f"({specs['train']} vs {specs[split]}). Give every pipeline the "
                                "same features and label.")
    return value["train"], value["test"]


def _same_structure(a, b) -> bool:
    import tensorflow as tf

    try:
        tf.nest.assert_same_structure(a, b)
    except (ValueError, TypeError):
        return False
    return all(x.dtype == y.dtype and x.shape.is_compatible_with(y.shape)
               for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b), strict=True))


def read_elements(ref: str, pipeline, part: str) -> Arrays:
    """A test or validation pipeline's elements as arrays `x_PART`, `y_PART`, in order (the
    snapshot holds them: evaluation, export and verify use the test set)."""
    import tensorflow as tf

    elements = list(pipeline.as_numpy_iterator())
    if not elements:
        raise BadInputError(f"--data {ref}: the {'validation' if part == 'val' else part} "
                            "pipeline is empty. Return at least one element.")
    x, y = (tf.nest.map_structure(lambda *rows: np.stack(rows), *[e[i] for e in elements])
            for i in (0, 1))
    return {f"x_{part}": _untupled(x), f"y_{part}": _untupled(y)}


def _untupled(value):
    """tf.data's tuples of several labels as the list the snapshot stores."""
    return list(value) if isinstance(value, tuple) else value


def pipeline_fingerprint(train) -> tuple[int, str]:
    """(elements, SHA-256 of their multiset) of one pass over `train`: a shuffle without a seed
    does not change it, other data does."""
    import tensorflow as tf

    total, count = 0, 0
    for element in train.as_numpy_iterator():
        digest = hashlib.sha256()
        for leaf in tf.nest.flatten(element):
            leaf = np.ascontiguousarray(leaf)
            digest.update(f"{leaf.dtype.str}:{leaf.shape}".encode())
            digest.update(leaf.tobytes())
        total = (total + int.from_bytes(digest.digest(), "big")) % (1 << 256)
        count += 1
    return count, f"{total:064x}"
