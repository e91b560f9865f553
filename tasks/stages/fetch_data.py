"""fetch-data: load the data from a chosen source, validate it, and snapshot it into the run directory."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task

from ckptflow.config import TrainConfig
from ckptflow.core.files import ensure_writable, sha256_file
from ckptflow.core.identity import check_same_data
from ckptflow.core.manifest import artifact_entry, read_manifest, set_artifacts, update_manifest
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import DataRecord, data_digest, load_snapshot, write_snapshot
from ckptflow.orchestration.retries import retry_options
from ckptflow.tutorial.data import load_mnist

log = logging.getLogger("ckptflow.data")


def fetch_data(run_dir: str | Path, source: str = "auto", train_samples: int = 1000,
               test_samples: int = 1000, seed: int = 42) -> DataRecord:
    """Load `source`, keep `train_samples`/`test_samples` images, and snapshot them.

    The snapshot (`data/mnist.npz`: x flattened to 784 and scaled to [0, 1], integer labels) is
    what every later stage reads. A run directory holds one data set for life: if it already has a
    snapshot with other contents, this refuses instead of overwriting it.

    Example:
        record = fetch_data("runs/demo", source="bundled", train_samples=500, test_samples=200)
    """
    run = RunDir(run_dir)
    ensure_writable(run.root)
    request = {"source": source, "train_samples": train_samples, "test_samples": test_samples,
               "seed": seed}
    snapshot = run.snapshot
    recorded = read_manifest(run).get("data")
    if recorded and recorded.get("request") == request and snapshot.exists() \
            and sha256_file(snapshot) == recorded["file_sha256"]:
        log.info("data: reusing the run's snapshot %s (sha256 %s)", run.relative(snapshot),
                 recorded["data_sha256"][:12])
        return DataRecord(**recorded)
    arrays, used, reason = load_mnist(source, train_samples, test_samples, seed)
    digest = data_digest(arrays)
    # The run's data is what the manifest recorded, even if the snapshot file has gone missing.
    existing = data_digest(load_snapshot(snapshot)) if snapshot.exists() else (
        recorded or {}).get("data_sha256")
    check_same_data(run, recorded, existing, request, digest)
    if not snapshot.exists():
        write_snapshot(snapshot, arrays)
    record = DataRecord(source=used, reason=reason, path=run.relative(snapshot),
                        file_sha256=sha256_file(snapshot), data_sha256=digest,
                        train_samples=len(arrays["y_train"]), test_samples=len(arrays["y_test"]),
                        request=request)
    update_manifest(run, data=record.model_dump())
    set_artifacts(run, "data", [artifact_entry(run, snapshot, "data", "npz",
                                                   data_sha256=digest)])
    log.info("data: %s (%s); %d train / %d test images; sha256 %s", used, reason,
             record.train_samples, record.test_samples, digest[:12])
    return record


@task(name="fetch-data", persist_result=False, **retry_options())
def fetch_data_task(config: TrainConfig) -> DataRecord:
    """Fetch and snapshot the data; retried on network and disk errors, never on bad input."""
    return fetch_data(config.run_dir, config.data, config.train_samples, config.test_samples,
                      config.seed)
