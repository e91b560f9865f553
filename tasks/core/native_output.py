"""Native output of TensorFlow and the converters into the run directory, not the user's terminal.

TensorFlow's C++ logging, absl, the LiteRT runtime and the converters write to file descriptors 1
and 2 directly, past `sys.stderr` and TF_CPP_MIN_LOG_LEVEL ("failed call to cuInit", "All log
messages before absl::InitializeLog()"). Where that happens in a run, those descriptors point at
the run's `logs/native.log`; its last lines are logged when that work fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ckptflow.core.errors import StopRequested, first_line

log = logging.getLogger("ckptflow.native")


@contextlib.contextmanager
def native_output_to(path: Path) -> Iterator[None]:
    """While active, this process's descriptors 1 and 2 (and those of a process started
    meanwhile) append to `path`, unless it cannot be opened (a full disk)."""
    try:
        log_fd = _open_log(path)
    except OSError:
        yield
        return
    saved = (os.dup(1), os.dup(2))
    _flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    failed = None
    try:
        yield
    except Exception as exc:
        failed = exc
        raise
    finally:
        _flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        if failed is not None and not isinstance(failed, StopRequested):
            log.error("%s: %s; the last lines of %s:\n%s", type(failed).__name__,
                      first_line(failed), path, last_lines(path))


def import_tensorflow() -> None:
    """Import TensorFlow now (if not yet), its native start-up lines (CUDA probing, absl) into a
    temporary file that is shown only if the import fails: no run directory is written for them
    (bad input found later must leave an existing one as it was)."""
    if "tensorflow" not in sys.modules:
        with tempfile.TemporaryDirectory(prefix="ckptflow-import-") as folder, \
                native_output_to(Path(folder) / "native.log"):
            import tensorflow  # noqa: F401


def send_native_output_to(path: Path) -> None:
    """In a helper process, first thing: its descriptors 1 and 2 append to `path` from now on
    (unless the log cannot be opened)."""
    try:
        log_fd = _open_log(path)
    except OSError:
        return
    _flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)


def last_lines(path: Path, count: int = 20) -> str:
    """The last `count` lines of a log, or '' if there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * count * 4))
            return b"\n".join(f.read().splitlines()[-count:]).decode(errors="replace")
    except OSError:
        return ""


def _open_log(path: Path) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
