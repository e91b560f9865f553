"""The training state: every field a resume needs, in one typed object (nanoGPT's checkpoint dict).

Saved as `state.json` in every checkpoint beside the weights; a resumed run continues from it
exactly: the epoch, the batch within it, the optimizer step, the running sums of the unfinished
epoch, the history so far, the best score, and the settings and data it belongs to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class EpochSums:
    """Running sums over the batches of the unfinished epoch (means come at its end)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: int = 0

    def plus(self, loss_sum: float, correct: float, seen: int) -> EpochSums:
        """These sums with one more stretch of batches added."""
        return EpochSums(self.loss_sum + loss_sum, self.correct + correct, self.seen + seen)


@dataclass
class TrainState:
    """Where training stands, as a checkpoint records it.

    Example:
        state = TrainState.fresh(identity, data_sha256, config)
        state.advance(batch=1, step=1, sums=state.sums.plus(loss * 32, correct, 32))
        row = state.close_epoch(val_loss, val_accuracy)
        TrainState.from_json(state.to_json()) == state
    """

    epoch: int
    batch: int
    step: int
    sums: EpochSums
    history: list[dict[str, Any]]
    best: dict[str, Any]
    identity: dict[str, Any]
    data_sha256: str
    config: dict[str, Any]
    saved_at: str | None = field(default=None)

    @classmethod
    def fresh(cls, identity: dict[str, Any], data_sha256: str, config: dict[str, Any]) -> TrainState:
        """The state before the first batch."""
        return cls(epoch=0, batch=0, step=0, sums=EpochSums(), history=[],
                   best={"val_accuracy": None, "epoch": None}, identity=identity,
                   data_sha256=data_sha256, config=config)

    def advance(self, batch: int, step: int, sums: EpochSums) -> None:
        """Move to `batch` batches into the epoch, optimizer step `step`, with the epoch's `sums`."""
        self.batch, self.step, self.sums = batch, step, sums

    def close_epoch(self, val_loss: float, val_accuracy: float) -> dict[str, Any]:
        """End the epoch: its history row, the best score, counters reset. Returns the row."""
        row = {"epoch": self.epoch + 1, "loss": self.sums.loss_sum / self.sums.seen,
               "accuracy": self.sums.correct / self.sums.seen, "val_loss": val_loss,
               "val_accuracy": val_accuracy}
        self.history.append(row)
        if self.best["val_accuracy"] is None or row["val_accuracy"] > self.best["val_accuracy"]:
            self.best = {"val_accuracy": row["val_accuracy"], "epoch": row["epoch"]}
        self.epoch, self.batch, self.sums = self.epoch + 1, 0, EpochSums()
        self.saved_at = datetime.now(UTC).isoformat(timespec="seconds")
        return row

    def to_json(self) -> dict[str, Any]:
        """The state as `state.json` holds it (the keys checkpoints have always had)."""
        data = {"epoch": self.epoch, "batch": self.batch, "step": self.step,
                "partial": dataclasses.asdict(self.sums), "history": self.history,
                "best": self.best, "identity": self.identity, "data_sha256": self.data_sha256,
                "config": self.config}
        if self.saved_at is not None:
            data["saved_at"] = self.saved_at
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        """The state a checkpoint's `state.json` holds."""
        return cls(epoch=data["epoch"], batch=data["batch"], step=data["step"],
                   sums=EpochSums(**data["partial"]), history=data["history"], best=data["best"],
                   identity=data["identity"], data_sha256=data["data_sha256"],
                   config=data["config"], saved_at=data.get("saved_at"))
