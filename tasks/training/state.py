"""The training state: every field a resume needs, in one typed object (nanoGPT's checkpoint dict),
saved as `state.json` in every checkpoint beside the weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass
class TrainState:
    """Where training stands, as a checkpoint records it (`from_json(to_json())` gives it back)."""

    epoch: int
    batch: int
    step: int
    history: list[dict[str, Any]]
    best: dict[str, Any]
    identity: dict[str, Any]
    data_sha256: str
    config: dict[str, Any]
    saved_at: str | None = field(default=None)
    callbacks: list[dict[str, Any]] | None = field(default=None)  # each user callback's state
    stopped_early: dict[str, Any] | None = field(default=None)  # {"epoch", "by"}: training ended
    pipeline_replay: bool = field(default=False)  # no iterator state: replay `step` batches

    @classmethod
    def fresh(cls, identity: dict[str, Any], data_sha256: str, config: dict[str, Any]) -> TrainState:
        """The state before the first batch."""
        return cls(epoch=0, batch=0, step=0, history=[], best={"epoch": None},
                   identity=identity, data_sha256=data_sha256, config=config)

    def advance(self, batch: int, step: int) -> None:
        """Move to `batch` batches into the epoch, optimizer step `step`."""
        self.batch, self.step = batch, step

    def close_epoch(self, train: dict[str, float], val: dict[str, float]) -> dict[str, Any]:
        """End the epoch with its training and validation metrics; return its history row."""
        names = ["loss", *(k for k in train if k != "loss")]
        names += [k for k in val if k not in names]
        row = {"epoch": self.epoch + 1, **{k: train[k] for k in names if k in train},
               **{f"val_{k}": val[k] for k in names if k in val}}
        self.history.append(row)
        monitor = best_metric(row)
        if self.best.get(monitor) is None or (
                row[monitor] > self.best[monitor] if monitor == "val_accuracy"
                else row[monitor] < self.best[monitor]):
            self.best = {monitor: row[monitor], "epoch": row["epoch"]}
        self.epoch, self.batch = self.epoch + 1, 0
        self.saved_at = datetime.now(UTC).isoformat(timespec="seconds")
        return row

    def to_json(self) -> dict[str, Any]:
        """The state as `state.json` holds it (the keys checkpoints have always had)."""
        data = {"epoch": self.epoch, "batch": self.batch, "step": self.step,
                "metric_state": True, "history": self.history,
                "best": self.best, "identity": self.identity, "data_sha256": self.data_sha256,
                "config": self.config}
        if self.saved_at is not None:
            data["saved_at"] = self.saved_at
        if self.callbacks is not None:
            data["callbacks"] = self.callbacks
        if self.stopped_early is not None:
            data["stopped_early"] = self.stopped_early
        if self.pipeline_replay:
            data["pipeline_replay"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        """The state a checkpoint's `state.json` holds."""
        return cls(epoch=data["epoch"], batch=data["batch"], step=data["step"],
                   history=data["history"], best=data["best"], identity=data["identity"],
                   data_sha256=data["data_sha256"], config=data["config"],
                   saved_at=data.get("saved_at"), callbacks=data.get("callbacks"),
                   stopped_early=data.get("stopped_early"),
                   pipeline_replay=data.get("pipeline_replay", False))


def best_metric(row: dict[str, Any]) -> str:
    """What the best epoch is chosen by: val_accuracy where the model has it, else val_loss."""
    return "val_accuracy" if "val_accuracy" in row else "val_loss"
