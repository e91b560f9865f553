"""The data snapshot: the arrays fetch-data chose, saved once into the run directory and read by
every later stage, identified by a digest of their contents."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from ckptflow.core.errors import BadInputError
from ckptflow.core.files import atomic_write_bytes

Arrays = dict[str, np.ndarray]
SPLITS = ("x_train", "y_train", "x_test", "y_test")


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


def load_snapshot(path: str | Path, keys: tuple[str, ...] = SPLITS) -> Arrays:
    """Arrays of a snapshot; only `keys` are read (an .npz reads lazily, so stages that need the
    test set skip 188 MB of training images at 60k)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in keys}
    except FileNotFoundError as exc:
        raise BadInputError(f"data snapshot {path} is missing. Run the fetch-data stage "
                            "(ckptflow run) again.") from exc
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError) as exc:
        raise BadInputError(f"data snapshot {path} is unreadable ({exc}). Move it aside and run "
                            "again to re-fetch.") from exc


def write_snapshot(path: Path, arrays: Arrays) -> None:
    """Save `arrays` as an .npz, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def data_digest(arrays: Arrays) -> str:
    """SHA-256 of the arrays' names, dtypes, shapes and bytes (independent of the zip container)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def load_verified(path: Path, data: DataRecord) -> Arrays:
    """Every array of the snapshot, refused if it no longer matches what fetch-data recorded."""
    arrays = load_snapshot(path)
    if data_digest(arrays) != data.data_sha256:
        raise BadInputError(f"data snapshot {path} changed since fetch-data recorded it. Run the "
                            "flow again to re-check the data.")
    return arrays
