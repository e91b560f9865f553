"""export-each-format: write the trained model in every format, load each back, and compare,
before the set replaces the previous exports."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
from prefect import task
from pydantic import BaseModel

from ckptflow.config import TrainConfig
from ckptflow.core.checkpoints import STATE
from ckptflow.core.errors import tf_write_errors, write_failed
from ckptflow.core.files import (
    atomic_write_bytes,
    atomic_write_json,
    clear_abandoned_writes,
    discard,
    publish,
    sha256_path,
)
from ckptflow.core.formats import ExportFormat, predict_logits, select_formats
from ckptflow.core.manifest import artifact_entry, set_artifacts, update_manifest
from ckptflow.core.models import prediction_metrics
from ckptflow.core.native_output import native_output_to
from ckptflow.core.predictions import max_abs_diff, named, suffix, to_bytes
from ckptflow.core.restore import fresh_model_factory, restore_model
from ckptflow.core.resume_point import CheckpointRef
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import TEST_SPLITS, DataRecord, load_snapshot
from ckptflow.core.stop import raise_if_stop_requested
from ckptflow.orchestration.caching import cache_while_present
from ckptflow.orchestration.results import result_record
from ckptflow.orchestration.retries import retry_options

log = logging.getLogger("ckptflow.export")


@result_record
class ExportRecord(BaseModel):
    """One verified export."""

    format: str
    path: str
    sha256: str
    bytes: int
    test_accuracy: float | None = None  # where the model has an accuracy metric
    metrics: dict[str, float] = {}  # the model's compiled metrics of this export's predictions
    max_abs_diff: float
    loader: str


def export_each_format(run_dir: str | Path, data: DataRecord, checkpoint: CheckpointRef,
                       formats: list[str] | None = None) -> list[ExportRecord]:
    """Export `checkpoint.path` in each of `formats` (None: every one installed) and verify each."""
    run = RunDir(run_dir)
    arrays = load_snapshot(run.root / data.path, keys=TEST_SPLITS)
    x, y = arrays["x_test"], arrays["y_test"]
    several = " and ".join(kind for kind, value in (("inputs", x), ("outputs", y))
                           if not isinstance(value, np.ndarray))
    chosen, skipped = select_formats(formats, several=several)
    for note in skipped:
        log.warning("export %s", note)
    names = [f.name for f in chosen]
    update_manifest(run, completes_with="exports")  # from now on verify expects them
    for abandoned in run.exports.glob(".tmp-*"):  # left by a killed export, reused or not
        shutil.rmtree(abandoned, ignore_errors=True)
    clear_abandoned_writes(run.exports)  # its temporary files; a directory set aside goes back
    reusable = intact_exports(run, checkpoint)
    if reusable is not None and [r.format for r in reusable] == names:
        log.info("exports of %s already on disk and unchanged: reusing them", checkpoint.path)
        return reusable
    # The converters and runtimes print natively (LiteRT's XNNPACK line, tf2onnx's warnings):
    with native_output_to(run.native_log):  # to the run's log, not the terminal
        model = restore_model(run, checkpoint.path)
        outputs = getattr(model, "output_names", None)
        fresh_model = fresh_model_factory(run, model_identity(run, checkpoint))
        scorer = fresh_model()  # its compiled metrics score each export's predictions
        reference = named(predict_logits(model, x), outputs)
        reference_path = run.reference.with_suffix(suffix(reference))
        # Every file is written and checked in one staging directory first; only when all of them
        # pass do they (and the reference they were checked against) replace the previous set.
        staging = run.exports / f".tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            checked = []
            for fmt in chosen:
                raise_if_stop_requested()  # between formats: the staged ones are discarded
                _save_export(fmt, model, staging / fmt.filename, run.exports / fmt.filename)
                predictions = named(fmt.predict(staging / fmt.filename, x, fresh_model), outputs)
                diff = max_abs_diff(predictions, reference)
                if not diff <= fmt.tolerance:
                    raise RuntimeError(f"{fmt.name} export predicts differently from the trained "
                                       f"model (max abs difference {diff:.2e} > {fmt.tolerance})")
                checked.append((fmt, prediction_metrics(scorer, y, predictions), diff))
            atomic_write_bytes(staging / reference_path.name, to_bytes(reference))
            for fmt, _, _ in checked:
                publish(staging / fmt.filename, run.exports / fmt.filename)
            publish(staging / reference_path.name, reference_path)
        finally:
            discard(staging)
    records = []
    for fmt, metrics, diff in checked:
        entry = artifact_entry(run, run.exports / fmt.filename, "export", fmt.name)
        records.append(ExportRecord(format=fmt.name, path=entry["path"], sha256=entry["sha256"],
                                    bytes=entry["bytes"], test_accuracy=metrics.get("accuracy"),
                                    metrics=metrics, max_abs_diff=diff, loader=fmt.loader))
        log.info("export %-13s %9d bytes  %s  max |diff| %.1e", fmt.name, entry["bytes"],
                 "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), diff)
    reference_entry = artifact_entry(run, reference_path, "reference", reference_path.suffix[1:],
                                     checkpoint=checkpoint.path)
    set_artifacts(run, "export", [
        {"kind": "export", **r.model_dump(), "checkpoint": checkpoint.path,
         "commit_sha256": checkpoint.commit_sha256} for r in records])
    set_artifacts(run, "reference", [reference_entry])
    atomic_write_json(run.export_index, {"checkpoint": checkpoint.path,
                                        "commit_sha256": checkpoint.commit_sha256,
                                        "reference": reference_entry["path"],
                                        "reference_sha256": reference_entry["sha256"],
                                        "exports": [r.model_dump() for r in records]})
    return records


def intact_exports(run_dir: str | Path, checkpoint: CheckpointRef) -> list[ExportRecord] | None:
    """The exports recorded for `checkpoint`, if every file still matches its SHA-256."""
    run = RunDir(run_dir)
    try:
        index = json.loads(run.export_index.read_text())
    except (OSError, ValueError):
        return None
    if index.get("commit_sha256") != checkpoint.commit_sha256:
        return None
    reference = reference_of(run, index)
    if not reference.exists() or sha256_path(reference) != index.get("reference_sha256"):
        return None
    records = [ExportRecord(**r) for r in index["exports"]]
    for r in records:
        path = run.root / r.path
        if not path.exists() or sha256_path(path) != r.sha256:
            return None
    return records


def export_outputs(run_dir: str | Path) -> list[Path]:
    """The export index, the reference predictions and every export: intact for a cache hit."""
    run = RunDir(run_dir)
    try:
        index = json.loads(run.export_index.read_text())
        return [run.export_index, reference_of(run, index)] + [run.root / r["path"]
                                                               for r in index["exports"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def reference_of(run: RunDir, index: dict) -> Path:
    """The reference predictions an export index names (an index older than multi-output models
    names none: the `.npy` one)."""
    return run.root / index["reference"] if "reference" in index else run.reference


def _save_export(fmt: ExportFormat, model, staged: Path, final: Path) -> None:
    """Write one export into staging; a refused write is one WriteFailed naming `final`."""
    try:
        fmt.save(model, staged)
    except (OSError, *tf_write_errors()) as exc:
        raise write_failed("export", final, exc, "the previous exports are kept and a rerun "
                           "exports again") from exc


def model_identity(run_dir: str | Path, checkpoint: CheckpointRef) -> dict:
    """The settings the checkpoint was trained with, to rebuild its architecture."""
    return json.loads((RunDir(run_dir).root / checkpoint.path / STATE).read_text())["identity"]


@task(name="export-each-format", **retry_options(),
      **cache_while_present(lambda p: export_outputs(p["config"].run_dir)))
def export_task(config: TrainConfig, data: DataRecord, checkpoint: CheckpointRef) -> list[ExportRecord]:
    """Export and verify every format; skipped while the exports of this checkpoint are on disk."""
    from prefect.artifacts import create_table_artifact

    from ckptflow.orchestration.artifacts import artifact_key

    records = export_each_format(config.run_dir, data, checkpoint, config.formats)
    create_table_artifact(
        table=[{k: v for k, v in r.model_dump().items() if k != "sha256"} for r in records],
        key=artifact_key(config.run_dir, "exports"),
        description=f"Exports of {checkpoint.path}, each loaded back and compared")
    return records
