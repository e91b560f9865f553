"""Stop on request during training: SIGTERM or SIGINT end it at a batch boundary, committed."""

from __future__ import annotations

import logging

from ckptflow.core.errors import StopRequested
from ckptflow.core.stop import StopOnSignal

log = logging.getLogger("ckptflow.train")


class GracefulStop(StopOnSignal):
    """`StopOnSignal` during training, whose log line says a checkpoint comes first."""

    def on_first(self, name: str) -> None:
        log.warning("%s: finishing the current batch and committing a checkpoint, then stopping "
                    "(within %.0f s; a second signal stops at once)", name, self.grace_seconds)


def stopped_in_training(signal_name: str, epoch: int, batch: int, step: int,
                        checkpoint: str) -> StopRequested:
    """The error a training loop raises once it has committed the stop's checkpoint."""
    return StopRequested(f"stopped by {signal_name} at epoch {epoch + 1}, batch {batch} "
                         f"(optimizer step {step}); checkpoint {checkpoint} is committed. Run the "
                         "same command again to continue from it.")


def stopped_after_training(signal_name: str, checkpoint: str) -> StopRequested:
    """The error for a signal during the last epoch's close: training is complete."""
    return StopRequested(f"stopped by {signal_name} as training ended; its last checkpoint "
                         f"{checkpoint} is committed. Run the same command again to evaluate and "
                         "export.")


def stopped_without_checkpoint(signal_name: str, step: int, error: Exception,
                               last: str | None) -> StopRequested:
    """The error for a stop whose own checkpoint could not be written (a full disk)."""
    since = f"from {last}, the last committed checkpoint" if last else "from the start"
    return StopRequested(f"stopped by {signal_name} at optimizer step {step}, but its checkpoint "
                         f"could not be written: {error} Run the same command again to continue "
                         f"{since}.")
