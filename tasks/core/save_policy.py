"""When to commit a mid-epoch checkpoint: every N batches, within a share of the training time."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class SavePolicy:
    """When to commit a mid-epoch checkpoint: every `every_batches` batches, within a time budget.

    A save that cost training t seconds (the time it waited, plus the CPU time of a background
    commit) defers the next mid-epoch save until t / `budget` seconds have passed, so checkpoints
    cost at most about `budget` of the training time however slow the disk or large the model
    (CheckFreq's idea); a save due while the previous checkpoint is still being written in the
    background is put off too. At 60,000
    images a checkpoint every 16 batches would otherwise be 117 saves an epoch. A budget of 0
    saves exactly every `every_batches` batches (waiting for the previous commit if need be).
    Epoch ends are always saved, and count against the budget too.

    Example:
        policy = SavePolicy(every_batches=16, budget=0.02)
        if policy.due(batch, steps, busy=a_commit_is_in_flight):
            policy.saved(seconds_training_waited)
    """

    def __init__(self, every_batches: int, budget: float,
                 clock: Callable[[], float] = time.monotonic):
        self.every_batches = every_batches
        self.budget = budget
        self.clock = clock
        self._not_before = -math.inf
        self.deferred = 0  # saves the cadence asked for and the budget put off

    def due(self, batch: int, steps: int, busy: bool = False) -> bool:
        """Whether to save after `batch` batches of an epoch of `steps` batches. `busy`: the
        previous checkpoint is still being written; with a budget, this save is put off rather
        than make training wait for the disk."""
        if not self.every_batches or batch % self.every_batches or batch >= steps:
            return False
        if self.clock() < self._not_before or (busy and self.budget):
            self.deferred += 1
            return False
        return True

    def saved(self, seconds: float) -> None:
        """Charge `seconds` a save cost training: what training waited for it (a snapshot, a
        commit in flight, or the whole write), and the CPU time its background commit used,
        which the training threads lose on a busy machine. Charges add up."""
        if self.budget:
            self._not_before = max(self._not_before, self.clock()) + seconds / self.budget
