"""When to commit a mid-epoch checkpoint: every N batches, within a share of the training time."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class SavePolicy:
    """When to commit a mid-epoch checkpoint: every `every_batches` batches, within a time budget.

    A save that kept training waiting t seconds defers the next mid-epoch save until t / `budget`
    seconds have passed, so checkpoints stall training at most about `budget` of its time however
    slow the disk or large the model (CheckFreq's idea); with a budget, a save due while the
    previous checkpoint is still being written in the background is put off too. At 60,000
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
        """Record a save that kept training waiting `seconds` (with background commits, the
        snapshot and any wait for the previous commit; else the whole write)."""
        if self.budget:
            self._not_before = self.clock() + seconds / self.budget
