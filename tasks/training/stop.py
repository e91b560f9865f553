"""Stop on request: SIGTERM or SIGINT during training ends the attempt at the next batch boundary.

What Kubernetes sends before it evicts a pod, a preemptible VM before it shuts down, and a Prefect
worker when a run is cancelled. The first signal only sets a flag; the training loop sees it
after the current batch, commits a checkpoint there and raises StopRequested, so a rerun loses
no batch. A second signal, or a stop that has not finished within `grace_seconds`, ends the
process at once with the signal's usual status (128 + its number).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("ckptflow.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """While active (`with GracefulStop(20.0) as stop:`), `stop.requested` names the first
    SIGTERM or SIGINT received, or is None.

    Signal handlers can only be set from the main thread; elsewhere (a Dask worker's thread)
    this does nothing and the process keeps its own handling.

    Args:
        grace_seconds: float > 0, how long the stop may take before the process exits anyway.
    """

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        self._deadline: threading.Timer | None = None

    def __enter__(self) -> GracefulStop:
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
        log.warning("%s: finishing the current batch and committing a checkpoint, then stopping "
                    "(within %.0f s; a second signal stops at once)", name, self.grace_seconds)
        self._deadline = threading.Timer(self.grace_seconds, self._too_late, args=(number,))
        self._deadline.daemon = True
        self._deadline.start()

    def _too_late(self, number: int) -> None:
        log.error("the stop took longer than %.0f s: exiting without a checkpoint",
                  self.grace_seconds)
        os._exit(128 + number)
