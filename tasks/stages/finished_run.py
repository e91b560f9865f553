"""A rerun of a finished run, answered from its manifest and file hashes: no TensorFlow, no
Prefect task, nothing written. Anything else runs the pipeline, which finds what is left."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ckptflow.config import TrainConfig, recorded_parameters
from ckptflow.core.errors import BadInputError
from ckptflow.core.integrity import check_file, checked_manifest, completeness_rows
from ckptflow.core.manifest import artifacts_digest
from ckptflow.core.run_dir import RunDir
from ckptflow.training.setup import TrainRecord

log = logging.getLogger("ckptflow.run")


def finished_summary(config: TrainConfig) -> dict[str, Any] | None:
    """What the pipeline would return for `config`, if its run directory holds all of it intact;
    None if anything is left to do or cannot be vouched for (a manifest of unexpected shape
    too: the pipeline then says what is wrong)."""
    if config.strategy == "multi-worker":  # the other workers expect the chief in their cluster
        return None
    run = RunDir(Path(config.run_dir).resolve())  # safe_path compares resolved paths
    try:
        return _summary(config, run, checked_manifest(run.root))
    except (BadInputError, KeyError, TypeError, AttributeError, ValueError):
        return None


def _summary(config: TrainConfig, run: RunDir, manifest: dict) -> dict[str, Any] | None:
    training, data = manifest.get("training") or {}, manifest["data"]
    requested = config.model_dump(mode="json")  # as the manifest holds it
    recorded = {**recorded_parameters(manifest["parameters"]), "run_dir": config.run_dir}
    trained = training.get("epoch") == config.epochs or training.get("stopped_early")
    if (recorded != requested or not trained
            or data.get("kind") == "pipeline"  # fetch-data reads a pipeline again, every run
            or (manifest.get("verified") or {}).get("artifacts_sha256") != artifacts_digest(manifest)):
        return None
    rows = [check_file(run.root, entry)[0] for entry in manifest["artifacts"]]
    if not all(row.ok for row in rows) or completeness_rows(manifest):
        return None
    exports = [{**a, "metrics": dict(a["metrics"]), "max_abs_diff": float(a["max_abs_diff"])}
               for a in manifest["artifacts"] if a["kind"] == "export"]
    summary = {
        "run_dir": config.run_dir,
        "data": {"source": data["source"], "reason": data["reason"], "sha256": data["data_sha256"],
                 "validation_samples": data.get("validation_samples")},
        "training": TrainRecord(**{
            **{k: v for k, v in training.items() if k in TrainRecord.model_fields},
            "resumed_from": training["checkpoint"], "start_epoch": training["epoch"],
            "start_batch": training["batch"], "batches_trained": 0}).model_dump(),
        "evaluation": dict(manifest["evaluation"]),
        "exports": exports,
        "verified": [row.model_dump() for row in rows],
        "report": str(RunDir(config.run_dir).report),
    }
    log.info("%s is complete: %d files match the manifest, verified before; nothing to do",
             config.run_dir, len(rows))
    return summary
