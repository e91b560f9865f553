"""Native output of TensorFlow and the converters into the run directory, not the user's terminal.

TensorFlow's C++ logging, absl, the LiteRT runtime and the converters write to file descriptors 1
and 2 directly, past `sys.stderr` and TF_CPP_MIN_LOG_LEVEL ("failed call to cuInit", "All log
messages before absl::InitializeLog()"). Where that happens in a run, those descriptors point at
the run's `logs/native.log`; its last lines are logged when that work fails.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ckptflow.core.errors import StopRequested, first_line

log = logging.getLogger("ckptflow.native")
_IMPORT_THREAD = "ckptflow-import-tensorflow"


@contextlib.contextmanager
def native_output_to(path: Path) -> Iterator[None]:
    """While active, this process's descriptors 1 and 2 (and those of a process started
    meanwhile) append to `path`, unless it cannot be opened (a full disk)."""
    redirect = _Redirect.to(path)
    failed = None
    try:
        yield
    except Exception as exc:
        failed = exc
        raise
    finally:
        if redirect:
            redirect.end()
        if failed is not None and not isinstance(failed, StopRequested):
            log.error("%s: %s; the last lines of %s:\n%s", type(failed).__name__,
                      first_line(failed), path, last_lines(path))


def import_tensorflow() -> None:
    """Import TensorFlow now (if not yet), its native start-up lines (CUDA probing, absl) into a
    temporary file that is shown only if the import fails: no run directory is written for them
    (bad input found later must leave an existing one as it was)."""
    TensorFlowImport().wait()


class TensorFlowImport:
    """TensorFlow imported on a thread, started now, while the main thread waits for something
    else (Prefect's server starting); its native lines into a temporary file, shown only if the
    import fails, until the import ends.

    The main thread stays free to honour a stop: an import cannot be interrupted, and on a busy
    machine it outlasts a stop's grace, so `wait()` reads the stop flag while it runs. Until the
    import ends, the main thread's own output lands in that file too; if the process exits
    first (a stop), descriptors 1 and 2 are pointed back at exit, before the exit handlers
    registered earlier (last-in, first-out) print the caller's last words, after which
    `silence_unfinished_import()` keeps the import's later lines from following them.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None
        self._native = ""
        if "tensorflow" in sys.modules:
            return
        self._lock = threading.Lock()
        self._folder = tempfile.mkdtemp(prefix="ckptflow-import-")
        self._redirect = _Redirect.to(Path(self._folder) / "native.log")
        atexit.register(self._end)
        self._thread = threading.Thread(target=self._import, daemon=True,
                                        name=_IMPORT_THREAD)
        self._thread.start()

    def wait(self, between: Callable[[], None] = lambda: None) -> None:
        """Until TensorFlow is imported, calling `between()` (a safe point) every 0.1 s; raises
        what the import raised, its native lines logged."""
        while self._thread is not None and self._thread.is_alive():
            between()
            self._thread.join(0.1)
        if self._failed is not None:
            log.error("importing TensorFlow failed; the last lines it wrote:\n%s", self._native)
            raise self._failed

    def _import(self) -> None:
        try:
            import tensorflow  # noqa: F401
        except BaseException as exc:  # raised again by wait(), on the main thread
            self._failed = exc
            self._native = last_lines(Path(self._folder) / "native.log")
        finally:
            self._end()

    def _end(self) -> None:
        with self._lock:
            atexit.unregister(self._end)
            if self._redirect:
                self._redirect.end()
                self._redirect = None
            shutil.rmtree(self._folder, ignore_errors=True)


def silence_unfinished_import() -> None:
    """After a process's last line: if a `TensorFlowImport` is still running (the process ends
    on a stop at start-up), descriptors 1 and 2 go to /dev/null from now on, so that none of the
    import's native lines follows that line."""
    if any(t.name == _IMPORT_THREAD and t.is_alive() for t in threading.enumerate()):
        _point_at(os.open(os.devnull, os.O_WRONLY))


def send_native_output_to(path: Path) -> None:
    """In a helper process, first thing: its descriptors 1 and 2 append to `path` from now on
    (unless the log cannot be opened)."""
    with contextlib.suppress(OSError):
        _point_at(_open_log(path))


def last_lines(path: Path, count: int = 20) -> str:
    """The last `count` lines of a log, or '' if there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * count * 4))
            return b"\n".join(f.read().splitlines()[-count:]).decode(errors="replace")
    except OSError:
        return ""


class _Redirect:
    """Descriptors 1 and 2 appending to a log until `end()` points them back."""

    def __init__(self, log_fd: int):
        self._saved = (os.dup(1), os.dup(2))
        _point_at(log_fd)

    @classmethod
    def to(cls, path: Path) -> _Redirect | None:
        """A redirect to `path`, or None if the log cannot be opened (a full disk)."""
        try:
            log_fd = _open_log(path)
        except OSError:
            return None
        return cls(log_fd)

    def end(self) -> None:
        _flush()
        for target, saved in enumerate(self._saved, start=1):
            os.dup2(saved, target)
            os.close(saved)


def _point_at(log_fd: int) -> None:
    """Descriptors 1 and 2 become `log_fd` (which is closed), what was buffered written first."""
    _flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)


def _open_log(path: Path) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
