"""One handle on a run's checkpoint saves (Orbax's CheckpointManager holds its async state):
when (SavePolicy), in the background (CheckFreq's capture, then persist), and at what cost."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from ckptflow.core.checkpoints import Capture, Checkpoint, CheckpointStore
from ckptflow.core.files import size_of

log = logging.getLogger("ckptflow.checkpoints")

Then = Callable[[Checkpoint], None]
SAVE_KINDS = ("mid_epoch", "epoch_end", "stop_or_end")  # stop: a stop's save, end: the last wait


class SavePolicy:
    """When to commit a mid-epoch checkpoint: every `every_batches` batches, within a time budget.

    A save that cost training t seconds (the time it waited, plus the CPU time of a background
    commit) defers the next mid-epoch save until t / `budget` seconds have passed, so checkpoints
    cost at most about `budget` of the training time however slow the disk or large the model
    (CheckFreq's idea); a save due while a commit is in flight is put off too. A budget of 0
    saves exactly every `every_batches` batches. Epoch ends are always saved, and count.
    """

    def __init__(self, every_batches: int, budget: float,
                 clock: Callable[[], float] = time.monotonic):
        self.every_batches = every_batches
        self.budget = budget
        self.clock = clock
        self._not_before = -math.inf
        self.deferred = 0  # saves the cadence asked for and the budget put off

    def due(self, batch: int, steps: int, busy: bool = False) -> bool:
        """Whether to save after `batch` of `steps` batches; `busy`: a commit is in flight."""
        if not self.every_batches or batch % self.every_batches or batch >= steps:
            return False
        if self.clock() < self._not_before or (busy and self.budget):
            self.deferred += 1
            return False
        return True

    def saved(self, seconds: float) -> None:
        """Charge `seconds` a save cost training (waited, or a background commit's CPU time)."""
        if self.budget:
            self._not_before = max(self._not_before, self.clock()) + seconds / self.budget


class CheckpointSaves:
    """Saves a training run's checkpoints as `policy` allows, at most one commit in flight on a
    writer thread, and counts what they cost: the seconds training waited, the writer's CPU
    seconds (both charged to the policy), checkpoints committed and bytes written.

    Example:
        saves = CheckpointSaves(store, SavePolicy(every_batches=16, budget=0.02), build_model)
        if saves.due(batch, steps):
            saves.save(model, state, epoch_end=False)  # returns once captured
        saves.poll()  # at each batch boundary; saves.wait() before a stop or the end

    A commit's error (a full disk) is raised on the training thread by the next `save`, `poll`
    or `wait`, the previous checkpoint standing. `then` (an epoch end's history, logs and
    callbacks) runs on the training thread once its checkpoint is committed; its time is not
    counted as a checkpoint's.

    `keras_model` builds a model of the run's architecture for the epoch ends' Keras files (the
    training model changes while they are written); called here, on the training thread (Keras'
    settings are per thread) and before training's clock starts: at the first epoch end
    training would wait for it. `background=False` commits in `save`, on the training thread.
    """

    def __init__(self, store: CheckpointStore, policy: SavePolicy,
                 keras_model: Callable[[], Any] | None = None, extra: dict | None = None,
                 background: bool = True, latest: Checkpoint | None = None):
        self.store, self.policy, self.background, self.extra = store, policy, background, extra
        self._keras_model = keras_model() if keras_model and background and store.keras_files \
            else None
        self.latest, self.committed, self.bytes_written = latest, 0, 0
        self.cpu_seconds = 0.0  # of the commits made on the writer thread
        self._charged_cpu = 0.0  # of cpu_seconds, what the policy has been charged
        # seconds training waited, by SAVE_KINDS (the budget governs mid-epoch saves only)
        self._waited = dict.fromkeys(SAVE_KINDS, 0.0)
        self._then_seconds = 0.0  # spent in `then` callbacks (epoch outputs, not checkpoints)
        self._started = time.perf_counter()
        self._thread: threading.Thread | None = None
        self._outcome: tuple[Checkpoint | BaseException, float] | None = None
        self._then: Then | None = None

    def due(self, batch: int, steps: int) -> bool:
        return self.policy.due(batch, steps, busy=self._thread is not None and self._thread.is_alive())

    def save(self, model, state: dict[str, Any], epoch_end: bool, then: Then | None = None,
             stop: bool = False) -> None:
        """Capture `model` and `state` now and commit them (in the background, after the commit
        in flight); what training waited is charged to the policy, a `then` is not. `stop`: the
        save a stop makes of the batch reached (not one the policy chose)."""
        started, then_before = self.policy.clock(), self._then_seconds
        capture = self.store.capture(model, state, epoch_end=epoch_end, extra=self.extra,
                                     keras_copy=self.background)
        self._finish_commit()
        if self.background:
            self._start_commit(capture, then)
        else:
            self._finished(self.store.commit(capture, keras_model=lambda: model), then, cpu=0.0)
        waited = self.policy.clock() - started - (self._then_seconds - then_before)
        self._waited["stop_or_end" if stop else "epoch_end" if epoch_end else "mid_epoch"] += waited
        self.policy.saved(waited)
        self._charge_cpu()

    def poll(self) -> None:
        """At a batch boundary: a finished commit's `then`, or its error; charge its CPU time."""
        if self._thread is not None and not self._thread.is_alive():
            self._finish_commit()
        self._charge_cpu()

    def wait(self) -> None:
        """Until the commit in flight is in (training waits: counted, its `then` not)."""
        started, then_before = time.perf_counter(), self._then_seconds
        self._finish_commit()
        self._waited["stop_or_end"] += (time.perf_counter() - started
                                        - (self._then_seconds - then_before))

    def close(self) -> None:
        """As the attempt ends on an error: let the commit in flight finish and count it, or log
        that it failed; its `then` is not run (a rerun writes the history again)."""
        outcome, _, cpu = self._join()
        if isinstance(outcome, BaseException):
            log.warning("the checkpoint being committed as training failed was not: %s", outcome)
        elif outcome is not None:
            self._finished(outcome, None, cpu)

    def costs(self) -> dict:
        """What checkpoints cost this attempt, for the manifest."""
        seconds, waited = time.perf_counter() - self._started, sum(self._waited.values())
        return {"training_seconds": round(seconds, 3), "waited_seconds": round(waited, 3),
                "cost": round(waited / seconds, 4) if seconds else 0.0,
                "waited_by": {k: round(v, 3) for k, v in self._waited.items()},
                "commit_cpu_seconds": round(self.cpu_seconds, 3),
                "committed": self.committed, "deferred": self.policy.deferred,
                "bytes_written": self.bytes_written, "background": self.background}

    def _charge_cpu(self) -> None:
        spent, self._charged_cpu = self.cpu_seconds - self._charged_cpu, self.cpu_seconds
        if spent:
            self.policy.saved(spent)

    def _start_commit(self, capture: Capture, then: Then | None) -> None:
        self._then = then
        self._thread = threading.Thread(target=self._commit, args=(capture,),
                                        name=f"ckptflow-commit-{capture.name}", daemon=True)
        self._thread.start()

    def _finish_commit(self) -> None:
        """Block until no commit is in flight; raise the error of the one that was, if it failed."""
        outcome, then, cpu = self._join()
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is not None:
            self._finished(outcome, then, cpu)

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
                self._then_seconds += time.perf_counter() - started

    def _commit(self, capture: Capture) -> None:
        started = time.thread_time()
        try:
            outcome = self.store.commit(capture, keras_model=lambda: self._keras_model)
        except BaseException as exc:  # handed to the training thread
            outcome = exc
        self._outcome = (outcome, time.thread_time() - started)
