"""Prefect artifacts of a run: live training progress, the metrics table and a markdown summary."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from ckptflow.config import TrainConfig
from ckptflow.core.errors import first_line
from ckptflow.core.mirror import location_of

log = logging.getLogger("ckptflow.train")


def artifact_key(run_dir: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) naming the run directory, with
    a digest of the path to tell `runs/a/r1` from `runs/a_r1`."""
    path = os.path.normpath(location_of(run_dir))
    slug = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")[-32:].strip("-") or "run"
    return f"ckptflow-{slug}-{hashlib.sha256(path.encode()).hexdigest()[:8]}-{what}"


class EpochProgress:
    """A progress artifact that follows the epochs of one training attempt."""

    def __init__(self, config: TrainConfig):
        self.total, self.lost = config.epochs, False
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=artifact_key(config.run_dir, "progress"),
            description=f"Epochs done of {config.epochs} in {location_of(config.run_dir)}")

    def update(self, row: dict[str, Any], state: Any) -> None:
        """An epoch callback; a lost API is logged once and training goes on (the bar is for
        people, the checkpoints are what count)."""
        if self.lost:
            return
        try:
            self.set(row["epoch"])
        except Exception as exc:  # httpx and Prefect errors alike
            self.lost = True
            log.warning("could not update the progress artifact (%s); training goes on without "
                        "it", first_line(exc))

    def set(self, epochs_done: int) -> None:
        update_progress_artifact(self.artifact_id,
                                 progress=min(100.0, 100.0 * epochs_done / self.total))


def publish_evaluation(run_dir: str, rows: list[dict[str, Any]], summary_md: str) -> None:
    """Show the evaluation as a keyed table artifact and a keyed markdown summary."""
    create_table_artifact(table=rows, key=artifact_key(run_dir, "metrics"),
                          description=f"Test metrics of {location_of(run_dir)}")
    create_markdown_artifact(markdown=summary_md, key=artifact_key(run_dir, "summary"),
                             description=f"ckptflow run summary of {location_of(run_dir)}")
