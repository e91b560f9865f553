"""A rerun of a finished run, answered from its manifest and file hashes: no TensorFlow, no
Prefect task, nothing written. Anything else runs the pipeline, which finds what is left."""

from __future__ import annotations

import json
import logging
from typing import Any

from ckptflow.config import TrainConfig
from ckptflow.core.errors import BadInputError
from ckptflow.core.integrity import check_file, checked_manifest, completeness_rows
from ckptflow.core.manifest import artifacts_digest
from ckptflow.core.run_dir import RunDir

log = logging.getLogger("ckptflow.run")

TRAINING_FIELDS = ("checkpoint", "commit_sha256", "epoch", "batch", "step", "best_val_accuracy",
                   "history_path")


def finished_summary(config: TrainConfig) -> dict[str, Any] | None:
    """What the pipeline would return for `config`, if its run directory holds all of it intact;
    None if anything is left to do or cannot be vouched for."""
    run = RunDir(config.run_dir)
    try:
        manifest = checked_manifest(run.root)
    except BadInputError:  # none yet, or not one a run wrote
        return None
    training = manifest.get("training") or {}
    requested = json.loads(json.dumps(config.model_dump()))  # as the manifest holds it
    recorded = {**(manifest.get("parameters") or {}), "run_dir": config.run_dir}  # it may move
    if (recorded != requested or training.get("epoch") != config.epochs
            or (manifest.get("verified") or {}).get("artifacts_sha256") != artifacts_digest(manifest)):
        return None
    rows = [check_file(run.root, entry)[0] for entry in manifest["artifacts"]]
    if not all(row.ok for row in rows) or completeness_rows(manifest):
        return None
    log.info("%s is complete: %d files match the manifest, verified before; nothing to do",
             config.run_dir, len(rows))
    data = manifest["data"]
    return {
        "run_dir": config.run_dir,
        "data": {"source": data["source"], "reason": data["reason"], "sha256": data["data_sha256"],
                 "validation_samples": data.get("validation_samples")},
        "training": {**{k: training.get(k) for k in TRAINING_FIELDS},
                     "resumed_from": training["checkpoint"], "start_epoch": training["epoch"],
                     "start_batch": training["batch"], "batches_trained": 0},
        "evaluation": manifest["evaluation"],
        "exports": [a for a in manifest["artifacts"] if a["kind"] == "export"],
        "verified": [row.model_dump() for row in rows],
        "report": str(run.report),
    }
