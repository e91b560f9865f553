"""The run directory the stages work in: a local path as given, or the local working copy of a
run in an object store, held (lease), pulled and mirrored for as long as the flow runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ckptflow.config import TrainConfig
from ckptflow.core.object_store import is_url


@contextmanager
def opened_run(config: TrainConfig, note: dict | None = None
               ) -> Iterator[tuple[TrainConfig, dict | None]]:
    """Yield `config` with `run_dir` where the stages work, and the record of an earlier holder
    of an object-store run that died holding it (None for a local path: its lock says)."""
    if not is_url(config.run_dir):
        yield config, None
        return
    from ckptflow.core.remote_run import RemoteRun

    remote = RemoteRun(config.run_dir, config.keep_checkpoints, config.lease_seconds)
    with remote.open(config.wait_for_lock, note) as abandoned:
        yield config.model_copy(update={"run_dir": str(remote.local)}), abandoned

