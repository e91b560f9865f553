"""Stop on request: a SIGTERM or SIGINT only sets a flag; the code reads it at safe points.

A signal handler runs wherever the main thread is (inside a log handler's write, a serializer's
callback), so it raises and logs nothing: it records the signal. Code reads the flag where
stopping is safe: the training loop after each batch, the pipeline between stages and inside
long ones. A second signal, or a stop not finished within `grace_seconds`, ends the process at
once with the signal's usual status (128 + its number). Used as
`with StopOnSignal(20.0): ... raise_if_stop_requested() ...` at each safe point.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from ckptflow.core.errors import StopRequested

log = logging.getLogger("ckptflow.stop")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Flag:
    """The process's stop request (a signal is the whole process's) and the scopes open, innermost
    last. Set only by the handler, with plain assignments: no lock to find held."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.where = ""
        self.scopes: list[StopOnSignal] = []


_FLAG = _Flag()


def stop_requested() -> str | None:
    """The signal ("SIGTERM", "SIGINT") that asked this process to stop, or None."""
    return _FLAG.signal


def raise_if_stop_requested() -> None:
    """A safe point: raise StopRequested if a stop was requested."""
    if _FLAG.signal is not None:
        raise StopRequested(f"stopped by {_FLAG.signal}{_FLAG.where}, outside training; every "
                            "committed checkpoint and export is kept. Run the same command again "
                            "to continue.")


def _on_signal(number: int, frame) -> None:
    name = signal.Signals(number).name
    if _FLAG.signal is not None:  # the second signal: at once
        log.warning("%s again: stopping at once, without a checkpoint", name)
        os._exit(128 + number)
    owner = _FLAG.scopes[-1]
    try:
        _FLAG.where = owner.where()
    except Exception:  # only a message: the stop is what counts
        _FLAG.where = ""
    _FLAG.signal = name
    owner.received = number  # its watcher logs and starts the deadline


class StopOnSignal:
    """While active, the first SIGTERM or SIGINT only records a stop; `where()` says where the
    run is (" during export-each-format"), read as the signal comes.

    Off the main thread (a Dask worker's) this does nothing: only it can set handlers. Scopes nest
    and share one flag: the innermost one open when the signal comes gives the message and the
    deadline; the flag is cleared when the outermost scope ends.
    """

    def __init__(self, grace_seconds: float, where: Callable[[], str] = lambda: ""):
        self.grace_seconds = grace_seconds
        self.where = where
        self.received = 0  # the signal's number, once this scope received it
        self._previous: dict[int, object] = {}
        self._ended = threading.Event()
        self._seen: str | None = None

    @property
    def requested(self) -> str | None:
        """The signal that asked the process to stop while this scope was open, or None."""
        return _FLAG.signal if self._previous and not self._ended.is_set() else self._seen

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            _FLAG.scopes.append(self)
            self._previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
            threading.Thread(target=self._watch, name="ckptflow-stop-deadline",
                             daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if not self._previous:
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        _FLAG.scopes.remove(self)
        self._seen = _FLAG.signal
        if not _FLAG.scopes:
            _FLAG.signal, _FLAG.where = None, ""
        self._ended.set()

    def _watch(self) -> None:
        """Off the main thread: log the stop, and end the process after `grace_seconds`."""
        while not self.received:  # polled: the handler takes no lock to wake a waiter
            if self._ended.wait(0.05):
                return
        self.on_first(signal.Signals(self.received).name)
        if not self._ended.wait(self.grace_seconds):
            log.error("the stop took longer than %.0f s: exiting without a checkpoint",
                      self.grace_seconds)
            os._exit(128 + self.received)

    def on_first(self, name: str) -> None:
        """Logs what the stop will do (on the watcher thread, never in the handler)."""
        log.warning("%s: stopping at the next safe point (within %.0f s; a second signal stops "
                    "at once)", name, self.grace_seconds)
