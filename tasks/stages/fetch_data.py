"""fetch-data: load the data from a chosen source, validate it, and snapshot it into the run directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import task

from ckptflow.config import TrainConfig, data_request, is_tutorial_data
from ckptflow.core.datasets import UserData, load_user_data
from ckptflow.core.files import ensure_writable, sha256_file
from ckptflow.core.identity import check_same_data
from ckptflow.core.manifest import artifact_entry, read_manifest, set_artifacts, update_manifest
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import (
    DataRecord,
    data_digest,
    describe_validation,
    load_snapshot,
    row_count,
    write_snapshot,
)
from ckptflow.orchestration.retries import retry_options
from ckptflow.tutorial.data import load_mnist

log = logging.getLogger("ckptflow.data")


def fetch_data(run_dir: str | Path, source: str = "auto", train_samples: int = 1000,
               test_samples: int = 1000, seed: int = 42,
               data_params: dict[str, Any] | None = None) -> DataRecord:
    """Load `source` (a data function's REF, or the tutorial's MNIST), validate it, snapshot it.

    The snapshot is what every later stage reads (of a tf.data pipeline, its test set). A run
    directory holds one data set for life: other data is refused, not written over it.
    """
    run = RunDir(run_dir)
    ensure_writable(run.root)
    request = data_request(source, train_samples, test_samples, seed, data_params)
    recorded = read_manifest(run).get("data")
    snapshot = run.root / recorded["path"] if recorded else run.snapshot_path(
        is_tutorial_data(source))
    if recorded and recorded.get("request") == request and recorded.get("kind") != "pipeline" \
            and snapshot.exists() and sha256_file(snapshot) == recorded["file_sha256"]:
        log.info("data: reusing the run's snapshot %s (sha256 %s)", run.relative(snapshot),
                 recorded["data_sha256"][:12])
        return DataRecord(**recorded)
    if is_tutorial_data(source):
        arrays, used, reason = load_mnist(source, train_samples, test_samples, seed)
        loaded = UserData(arrays)
    else:
        loaded = load_user_data(source, data_params or {}, seed)
        used, reason = source, "data function"
    digest = loaded.digest()
    # The run's data is what the manifest recorded, even if the snapshot file has gone missing.
    existing = (recorded or {}).get("data_sha256")
    if existing is None and snapshot.exists():
        existing = data_digest(load_snapshot(snapshot))
    check_same_data(run, recorded, existing, request, digest)
    if not snapshot.exists():
        write_snapshot(snapshot, loaded.arrays)
    record = DataRecord(source=used, reason=reason, path=run.relative(snapshot),
                        file_sha256=sha256_file(snapshot), data_sha256=digest,
                        train_samples=loaded.train_samples, test_samples=row_count(loaded.arrays["y_test"]),
                        request=request, kind=loaded.kind,
                        validation_samples=row_count(loaded.arrays["y_val"]) if "y_val" in loaded.arrays
                        else None,
                        snapshot_sha256=None if loaded.kind == "arrays" else data_digest(loaded.arrays))
    if recorded == record.model_dump():  # a pipeline read again and found the same: no write
        log.info("data: %s unchanged (sha256 %s)", used, digest[:12])
        return record
    update_manifest(run, data=record.model_dump())
    set_artifacts(run, "data", [artifact_entry(run, snapshot, "data", "npz",
                                               data_sha256=record.snapshot_digest())])
    log.info("data: %s (%s); %d train / %d test examples%s, %s; sha256 %s", used,
             reason, record.train_samples, record.test_samples,
             " (tf.data pipeline)" if loaded.kind == "pipeline" else "",
             describe_validation(record.model_dump()), digest[:12])
    return record


@task(name="fetch-data", persist_result=False, **retry_options())
def fetch_data_task(config: TrainConfig) -> DataRecord:
    """Fetch and snapshot the data; retried on network and disk errors, never on bad input."""
    return fetch_data(config.run_dir, config.data, config.train_samples, config.test_samples,
                      config.seed, config.data_params)
