"""export-each-format: write the trained model in every format, load each back, and compare.

Formats live in one registry (`FORMATS`); adding a format is adding one `ExportFormat` entry.
Each export is written under a temporary name, loaded back the way a user would and checked
against the trained model's predictions before it replaces an earlier export.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from pydantic import BaseModel

from tasks.checkpoints import STATE
from tasks.config import TrainConfig
from tasks.data import DataRecord, load_snapshot
from tasks.files import atomic_write_bytes, atomic_write_json, publish, sha256_path
from tasks.manifest import artifact_entry, set_artifacts
from tasks.policy import cache_while_present, retry_options
from tasks.resume import CheckpointRef, restore_model

log = logging.getLogger("ckptflow.export")

EXPORTS = Path("exports")
INDEX = EXPORTS / "exports.json"
REFERENCE = EXPORTS / "reference_predictions.npy"
TOLERANCE = 1e-5


@dataclass(frozen=True)
class ExportFormat:
    """One export format: where it goes, how to write it, and how a user loads and runs it."""

    name: str
    filename: str
    save: Callable[[object, Path], None]
    predict: Callable[[Path, np.ndarray, dict], np.ndarray]
    loader: str


def _fresh(identity: dict):
    from tasks.model import build_model

    return build_model(identity["units"], identity["dropout"], identity["learning_rate"],
                       identity["seed"])


def _save_tf_checkpoint(model, path: Path) -> None:
    import tensorflow as tf

    path.mkdir()
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(path / "ckpt"))


def _predict_tf_checkpoint(path: Path, x: np.ndarray, identity: dict) -> np.ndarray:
    import tensorflow as tf

    model = _fresh(identity)
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(
        str(path / "ckpt")).assert_existing_objects_matched()
    return model.predict(x, batch_size=256, verbose=0)


def _predict_weights_h5(path: Path, x: np.ndarray, identity: dict) -> np.ndarray:
    model = _fresh(identity)
    model.load_weights(path)
    return model.predict(x, batch_size=256, verbose=0)


def _predict_keras_file(path: Path, x: np.ndarray, identity: dict) -> np.ndarray:
    from tasks.model import load_keras_model

    return load_keras_model(path).predict(x, batch_size=256, verbose=0)


def _predict_saved_model(path: Path, x: np.ndarray, identity: dict) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # keep a reference: its variables die with it
    if "serving_default" not in loaded.signatures:
        raise ValueError(f"{path} has no serving_default signature")
    return loaded.serve(tf.constant(x)).numpy()


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("tf_checkpoint", "tf_checkpoint", _save_tf_checkpoint, _predict_tf_checkpoint,
                 "fresh model + tf.train.Checkpoint(model=..., optimizer=...).read"),
    ExportFormat("weights_h5", "model.weights.h5", lambda m, p: m.save_weights(p),
                 _predict_weights_h5, "fresh model + model.load_weights"),
    ExportFormat("keras", "model.keras", lambda m, p: m.save(p), _predict_keras_file,
                 "keras.models.load_model(safe_mode=True)"),
    ExportFormat("h5", "model.h5", lambda m, p: m.save(p), _predict_keras_file,
                 "keras.models.load_model (legacy HDF5)"),
    ExportFormat("saved_model", "saved_model",
                 lambda m, p: m.export(str(p), format="tf_saved_model", verbose=False),
                 _predict_saved_model, "tf.saved_model.load(...).serve"),
)}


class ExportRecord(BaseModel):
    """One verified export."""

    format: str
    path: str
    sha256: str
    bytes: int
    test_accuracy: float
    max_abs_diff: float
    loader: str


def export_each_format(run_dir: str | Path, data: DataRecord, checkpoint: CheckpointRef,
                       formats: list[str] | None = None) -> list[ExportRecord]:
    """Export `checkpoint.path` in each of `formats` (default: all) and verify each."""
    run_dir = Path(run_dir)
    names = list(FORMATS) if formats is None else formats
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ValueError(f"Unrecognized format={unknown}. Supported formats are: {list(FORMATS)}")
    reusable = intact_exports(run_dir, checkpoint)
    if reusable is not None and [r.format for r in reusable] == names:
        log.info("exports of %s already on disk and unchanged: reusing them", checkpoint.path)
        return reusable
    arrays = load_snapshot(run_dir / data.path)
    x, y = arrays["x_test"], arrays["y_test"]
    model = restore_model(run_dir, checkpoint.path)
    identity = model_identity(run_dir, checkpoint)
    reference = model.predict(x, batch_size=256, verbose=0)
    atomic_write_bytes(run_dir / REFERENCE, _npy_bytes(reference))
    records = []
    for name in names:
        fmt = FORMATS[name]
        final = run_dir / EXPORTS / fmt.filename
        staging = run_dir / EXPORTS / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            fmt.save(model, staging / fmt.filename)
            predictions = fmt.predict(staging / fmt.filename, x, identity)
            diff = float(np.max(np.abs(predictions - reference)))
            if not diff <= TOLERANCE:
                raise RuntimeError(f"{name} export predicts differently from the trained model "
                                   f"(max abs difference {diff:.2e} > {TOLERANCE})")
            publish(staging / fmt.filename, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        entry = artifact_entry(run_dir, final, "export", name)
        records.append(ExportRecord(
            format=name, path=entry["path"], sha256=entry["sha256"], bytes=entry["bytes"],
            test_accuracy=float(np.mean(np.argmax(predictions, axis=1) == y)),
            max_abs_diff=diff, loader=fmt.loader))
        log.info("export %-13s %9d bytes  accuracy %.4f  max |diff| %.1e", name,
                 entry["bytes"], records[-1].test_accuracy, diff)
    set_artifacts(run_dir, "export", [
        {"kind": "export", **r.model_dump(), "checkpoint": checkpoint.path} for r in records])
    atomic_write_json(run_dir / INDEX, {"checkpoint": checkpoint.path,
                                        "commit_sha256": checkpoint.commit_sha256,
                                        "exports": [r.model_dump() for r in records]})
    return records


def intact_exports(run_dir: Path, checkpoint: CheckpointRef) -> list[ExportRecord] | None:
    """The exports recorded for `checkpoint`, if every file still matches its SHA-256."""
    try:
        index = json.loads((Path(run_dir) / INDEX).read_text())
    except (OSError, ValueError):
        return None
    if index.get("commit_sha256") != checkpoint.commit_sha256:
        return None
    records = [ExportRecord(**r) for r in index["exports"]]
    for r in records:
        path = Path(run_dir) / r.path
        if not path.exists() or sha256_path(path) != r.sha256:
            return None
    return records


def export_outputs(run_dir: Path) -> list[Path]:
    """The export index and every file it lists: what must be intact for a cache hit."""
    try:
        index = json.loads((Path(run_dir) / INDEX).read_text())
        return [Path(run_dir) / INDEX] + [Path(run_dir) / r["path"] for r in index["exports"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def model_identity(run_dir: Path, checkpoint: CheckpointRef) -> dict:
    """The settings the checkpoint was trained with, to rebuild its architecture."""
    return json.loads((run_dir / checkpoint.path / STATE).read_text())["identity"]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@task(name="export-each-format", **retry_options(),
      cache_key_fn=cache_while_present(lambda p: export_outputs(Path(p["config"].run_dir))))
def export_task(config: TrainConfig, data: DataRecord, checkpoint: CheckpointRef) -> list[ExportRecord]:
    """Export and verify every format; skipped while the exports of this checkpoint are on disk."""
    from prefect.artifacts import create_table_artifact

    from tasks.reporting import artifact_key

    records = export_each_format(config.run_dir, data, checkpoint)
    create_table_artifact(
        table=[{k: v for k, v in r.model_dump().items() if k != "sha256"} for r in records],
        key=artifact_key(config.run_dir, "exports"),
        description=f"Exports of {checkpoint.path}, each loaded back and compared")
    return records
