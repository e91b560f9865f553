"""resume-from-latest: where training continues."""

from __future__ import annotations

import logging

from prefect import task

from ckptflow.config import TrainConfig
from ckptflow.core.resume_point import CheckpointRef, find_resume_point
from ckptflow.orchestration.retries import retry_options

log = logging.getLogger("ckptflow.resume")


@task(name="resume-from-latest", persist_result=False, **retry_options())
def resume_from_latest_task(config: TrainConfig, data_sha256: str) -> CheckpointRef | None:
    """Report where training will continue (the train task checks again on each attempt)."""
    point = find_resume_point(config.run_dir, config.identity(), data_sha256)
    if point is None:
        log.info("no checkpoint in %s: training starts from the untrained model", config.run_dir)
    else:
        log.info("latest valid checkpoint: %s (epoch %d, batch %d, step %d)", point.path,
                 point.epoch, point.batch, point.step)
    return point
