"""The data snapshot: the arrays fetch-data chose, saved once into the run directory and read by
every later stage. Features or labels of several arrays (a model of several inputs or outputs) are
a dict stored as `x_train/NAME`, or a list stored as `y_train/[0]`, `y_train/[1]`, ..."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from ckptflow.core.errors import BadInputError
from ckptflow.core.files import atomic_write_bytes

Nested = np.ndarray | dict[str, np.ndarray] | list[np.ndarray]  # one split's array(s)
Arrays = dict[str, Nested]
SPLITS = ("x_train", "y_train", "x_test", "y_test")
TEST_SPLITS = ("x_test", "y_test")
VAL_SPLITS = ("x_val", "y_val")  # optional: a validation set of the user's own
TRAIN_WEIGHTS = "w_train"  # optional: each training example's weight in the loss


class DataRecord(BaseModel):
    """What fetch-data made: where the snapshot is and which data it holds."""

    source: str
    reason: str
    path: str
    file_sha256: str
    data_sha256: str
    train_samples: int
    test_samples: int
    request: dict
    # "arrays": every split is in the snapshot; "pipeline": a tf.data training pipeline (rebuilt
    # from the data function for training) whose test set is in the snapshot.
    kind: str = "arrays"
    snapshot_sha256: str | None = None  # data_digest of the snapshot, when not data_sha256
    # a validation set of the data function's own; None: the test set validates (the tutorial)
    validation_samples: int | None = None

    def snapshot_digest(self) -> str:
        return self.snapshot_sha256 or self.data_sha256


def load_snapshot(path: str | Path, keys: tuple[str, ...] | None = None) -> Arrays:
    """The splits of a snapshot (every one, or `keys`: only those are read)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            flat = {k: npz[k] for k in npz.files
                    if keys is None or k.split("/")[0] in keys}
        missing = [k for k in keys or () if not any(f.split("/")[0] == k for f in flat)]
        if missing:
            raise KeyError(f"no {missing[0]}")
        return unflatten(flat)
    except FileNotFoundError as exc:
        raise BadInputError(f"data snapshot {path} is missing. Run the fetch-data stage "
                            "(ckptflow run) again.") from exc
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError) as exc:
        raise BadInputError(f"data snapshot {path} is unreadable ({exc}). Move it aside and run "
                            "again to re-fetch.") from exc


def write_snapshot(path: Path, arrays: Arrays) -> None:
    """Save `arrays` as an .npz, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **flatten(arrays))
    atomic_write_bytes(path, buffer.getvalue())


def flatten(arrays: Arrays) -> dict[str, np.ndarray]:
    """`{"x_train": {"a": A}, "y_train": [B, C]}` as `{"x_train/a": A, "y_train/[0]": B,
    "y_train/[1]": C}`; plain arrays stay as they are."""
    flat = {}
    for split, value in arrays.items():
        if isinstance(value, dict):
            flat.update({f"{split}/{name}": array for name, array in value.items()})
        elif isinstance(value, list | tuple):
            flat.update({f"{split}/[{i}]": array for i, array in enumerate(value)})
        else:
            flat[split] = value
    return flat


def unflatten(flat: dict[str, np.ndarray]) -> Arrays:
    """The inverse of `flatten`."""
    arrays: Arrays = {}
    for key, array in flat.items():
        split, _, name = key.partition("/")
        if name:
            arrays.setdefault(split, {})[name] = array
        else:
            arrays[split] = array
    for split, value in arrays.items():
        if isinstance(value, dict) and all(n.startswith("[") for n in value):
            arrays[split] = [value[f"[{i}]"] for i in range(len(value))]
    return arrays


def leaves(value: Nested) -> list[np.ndarray]:
    """The arrays of one split, in order."""
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, list | tuple) else [value]


def row_count(value: Nested) -> int:
    """Examples in one split (every array has one row per example)."""
    return len(leaves(value)[0])


def select_rows(value: Nested, rows) -> Nested:
    """The rows `rows` (a slice or an index array) of every array of one split."""
    if isinstance(value, dict):
        return {k: v[rows] for k, v in value.items()}
    return [v[rows] for v in value] if isinstance(value, list | tuple) else value[rows]


def data_digest(arrays: Arrays) -> str:
    """SHA-256 of the arrays' names, dtypes, shapes and bytes (independent of the zip container)."""
    digest = hashlib.sha256()
    flat = flatten(arrays)
    for name in sorted(flat):
        a = np.ascontiguousarray(flat[name])
        digest.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def load_verified(path: Path, data: DataRecord) -> Arrays:
    """Every array of the snapshot, refused if it no longer matches what fetch-data recorded."""
    arrays = load_snapshot(path)
    if data_digest(arrays) != data.snapshot_digest():
        raise BadInputError(f"data snapshot {path} changed since fetch-data recorded it. Run the "
                            "flow again to re-check the data.")
    return arrays


def example_rows(arrays: Arrays, rows: int = 2) -> tuple:
    """The first `rows` test features and labels: what a fresh model is built on."""
    return select_rows(arrays["x_test"], slice(rows)), select_rows(arrays["y_test"], slice(rows))


def validation_split(arrays: Arrays) -> tuple:
    """(x, y) each epoch's `val_*` metrics and the best epoch come from: the data's own
    validation set, else the test set (as the tutorial passes it to `fit`)."""
    x, y = VAL_SPLITS if VAL_SPLITS[1] in arrays else TEST_SPLITS
    return arrays[x], arrays[y]


def describe_validation(data: dict) -> str:
    """Where a run's `val_*` metrics come from, from its data record, in words."""
    if data.get("validation_samples"):
        return f"validated on its own {data['validation_samples']} examples"
    return "validated on the test set (as the tutorial does)"
