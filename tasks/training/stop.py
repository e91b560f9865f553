"""Stop on request: SIGTERM or SIGINT end a run cleanly, during training at a batch boundary.

What Kubernetes sends before it evicts a pod, a preemptible VM before it shuts down, and a Prefect
worker when a run is cancelled. During training (`GracefulStop`) the first signal only sets a
flag; the training loop sees it after the current batch, commits a checkpoint there and raises
StopRequested, so a rerun loses no batch. Outside training (`StopOnSignal`: start-up, evaluate,
export) there is no batch to finish, so the first signal raises StopRequested where the main
thread is: `finally` blocks run (the temporary Prefect server stops, temporary files go) instead
of the process dying where it stands; if code there swallows it, it is raised again as the scope
ends. A second signal, or a stop that has not finished within
`grace_seconds`, ends the process at once with the signal's usual status (128 + its number).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from ckptflow.core.errors import StopRequested

log = logging.getLogger("ckptflow.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _SignalScope:
    """While active, SIGTERM and SIGINT call `on_first` once, then exit at once.

    Signal handlers can only be set from the main thread; elsewhere (a Dask worker's thread)
    this does nothing and the process keeps its own handling. Scopes nest: each restores the
    handlers it found.
    """

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        self._deadline: threading.Timer | None = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        if self._deadline is not None:
            self._deadline.cancel()

    def _on_signal(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.requested is not None:  # the second signal: at once
            log.warning("%s again: stopping at once, without a checkpoint", name)
            os._exit(128 + number)
        self.requested = name
        self._deadline = threading.Timer(self.grace_seconds, self._too_late, args=(number,))
        self._deadline.daemon = True
        self._deadline.start()
        self.on_first(name)

    def on_first(self, name: str) -> None:
        raise NotImplementedError

    def _too_late(self, number: int) -> None:
        log.error("the stop took longer than %.0f s: exiting without a checkpoint",
                  self.grace_seconds)
        os._exit(128 + number)


class GracefulStop(_SignalScope):
    """During training (`with GracefulStop(20.0) as stop:`): `stop.requested` names the first
    SIGTERM or SIGINT received, or is None; the loop stops at the next batch boundary.

    Args:
        grace_seconds: float > 0, how long the stop may take before the process exits anyway.
    """

    def on_first(self, name: str) -> None:
        log.warning("%s: finishing the current batch and committing a checkpoint, then stopping "
                    "(within %.0f s; a second signal stops at once)", name, self.grace_seconds)


class StopOnSignal(_SignalScope):
    """Outside training: the first SIGTERM or SIGINT raises StopRequested in the main thread.

    Args:
        grace_seconds: float > 0, how long the stop may take before the process exits anyway.
        where: says where the run is (" during export-each-format"), for the message.
    """

    def __init__(self, grace_seconds: float, where: Callable[[], str] = lambda: ""):
        super().__init__(grace_seconds)
        self.where = where
        self.stop: StopRequested | None = None

    def __exit__(self, exc_type, exc, traceback) -> None:
        super().__exit__(exc_type, exc, traceback)
        if exc is None and self.stop is not None:
            # Raised where the signal found the main thread, the stop was swallowed there (a
            # logging handler reports errors in its own emit and goes on): it ends the scope.
            self.raise_if_stopped()

    def on_first(self, name: str) -> None:
        # No logging here: the signal may have found the main thread inside a log handler's
        # write, and writing again from the handler breaks that stream.
        self.stop = StopRequested(f"stopped by {name}{self.where()}, outside training; every "
                                  "committed checkpoint and export is kept. Run the same command "
                                  "again to continue.")
        raise self.stop

    def raise_if_stopped(self) -> None:
        """Between stages: raise a stop that code inside the last one swallowed."""
        if self.stop is not None:
            raise self.stop

    def stopped(self, exc: BaseException) -> StopRequested | None:
        """The stop that `exc` is, or that it wraps: raised inside a library's callback (pydantic
        calling a serializer), StopRequested can reach the caller as another error."""
        return exc if isinstance(exc, StopRequested) else self.stop


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
