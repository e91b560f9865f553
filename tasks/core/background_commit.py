"""Commit checkpoints on a background thread while training goes on (CheckFreq's snapshot, then
persist): at most one commit in flight, its outcome reported back on the training thread.

Example:
    commits = BackgroundCommits(store, keras_model=build_model_for_keras_files)
    commits.submit(store.snapshot(model, state, epoch_end=False), then=None)  # returns at once
    ...                                                   # the next batches train meanwhile
    commits.poll()          # at batch boundaries: runs `then` of a finished commit
    commits.wait()          # before a stop or the end: the last commit is in, or its error raised
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ckptflow.core.checkpoints import Checkpoint, CheckpointStore, Snapshot
from ckptflow.core.files import size_of

log = logging.getLogger("ckptflow.checkpoints")

Then = Callable[[Checkpoint], None]


class BackgroundCommits:
    """One writer thread for a store's snapshots; the training thread waits only when a commit is
    still under way as the next one is due.

    A commit's error (a full disk) is raised on the training thread by the next `submit`,
    `wait` or `poll`, the previous checkpoint standing. `then` (history, logs, callbacks of an
    epoch end) runs on the training thread once its checkpoint is committed, never before.

    Args:
        store: where snapshots are committed.
        keras_model: builds a model of the run's architecture for the epoch ends' Keras files
            (the training model keeps changing while they are written); called once, on the
            training thread, at the first epoch end (Keras' settings are per thread).
        background: False commits on the calling thread in `submit` (the Keras files from the
            training model itself): the old behaviour, for comparison.
        latest: the newest committed checkpoint so far (the one training resumed from).
    """

    def __init__(self, store: CheckpointStore, keras_model: Callable[[], Any],
                 background: bool = True, latest: Checkpoint | None = None):
        self.store, self.background = store, background
        self._keras_model_factory, self._keras_model = keras_model, None
        self.latest = latest
        self.committed = 0
        self.bytes_written = 0
        self.cpu_seconds = 0.0  # of the commits made on the writer thread
        self.then_seconds = 0.0  # spent in `then` callbacks (epoch outputs, not checkpoints)
        self._thread: threading.Thread | None = None
        self._outcome: tuple[Checkpoint | BaseException, float] | None = None
        self._then: Then | None = None

    def submit(self, snapshot: Snapshot, then: Then | None = None,
               training_model: Any = None) -> None:
        """Commit `snapshot`: in the background (after the commit in flight, if any, is in), or
        here when not `background` (`training_model` writes the Keras files then)."""
        self.wait()
        if not self.background:
            self._finished(self.store.commit(snapshot, keras_model=lambda: training_model),
                           then, cpu=0.0)
            return
        if snapshot.keras_values is not None and self._keras_model is None:
            self._keras_model = self._keras_model_factory()
        self._then = then
        self._thread = threading.Thread(target=self._commit, args=(snapshot,),
                                        name=f"ckptflow-commit-{snapshot.name}", daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> None:
        """If the commit in flight is done: its `then`, or its error."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Block until no commit is in flight; raise the error of the one that was, if it failed."""
        outcome, then, cpu = self._join()
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is not None:
            self._finished(outcome, then, cpu)

    def close(self) -> None:
        """As the attempt ends on an error (the one that propagates): let the commit in flight
        finish and count it, or say that it failed; its `then` is not run (a rerun writes the
        history again)."""
        outcome, _, cpu = self._join()
        if isinstance(outcome, BaseException):
            log.warning("the checkpoint being committed as training failed was not: %s", outcome)
        elif outcome is not None:
            self._finished(outcome, None, cpu)

    def _join(self) -> tuple[Checkpoint | BaseException | None, Then | None, float]:
        if self._thread is None:
            return None, None, 0.0
        self._thread.join()
        (outcome, cpu), then = self._outcome, self._then
        self._thread, self._outcome, self._then = None, None, None
        return outcome, then, cpu

    def _finished(self, checkpoint: Checkpoint, then: Then | None, cpu: float) -> None:
        self.latest = checkpoint
        self.committed += 1
        self.cpu_seconds += cpu
        self.bytes_written += size_of(checkpoint.path)
        if then is not None:
            started = time.perf_counter()
            try:
                then(checkpoint)
            finally:
                self.then_seconds += time.perf_counter() - started

    def _commit(self, snapshot: Snapshot) -> None:
        started = time.thread_time()
        try:
            outcome = self.store.commit(snapshot, keras_model=lambda: self._keras_model)
        except BaseException as exc:  # handed to the training thread
            outcome = exc
        self._outcome = (outcome, time.thread_time() - started)
