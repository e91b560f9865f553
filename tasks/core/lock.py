"""One run at a time per run directory: an exclusive `flock` on RUN_DIR/.lock.

The kernel drops the lock when the holding process exits or is killed, so a lock left behind by a
killed run is free for the next one. The file names its holder while it is held and is emptied
on release, so a record that the next holder finds was left by a holder that died. Re-entrant within a
thread, so the flow and the stage it calls can both hold it; another thread of the same process
opens its own descriptor and is refused like another process.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from ckptflow.core.errors import BadInputError
from ckptflow.core.run_dir import RunDir

log = logging.getLogger("ckptflow.lock")

_POLL_S = 0.2
_held: dict[tuple[str, int], list] = {}  # (realpath, thread id) -> [file object, depth]
_guard = threading.Lock()


class RunDirBusy(BadInputError):
    """Another live process is using the run directory."""


@contextmanager
def run_dir_lock(run_dir: str | Path, wait_seconds: float = 0.0,
                 note: dict | None = None) -> Iterator[dict | None]:
    """Hold the run directory exclusively, waiting up to `wait_seconds` (else RunDirBusy).

    Yields the record of a previous holder that died holding it, or None. `note` is kept in this
    holder's record, for whoever finds it dead.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = (os.path.realpath(run_dir), threading.get_ident())
    with _guard:
        reentered = key in _held
        if reentered:
            _held[key][1] += 1
    if reentered:
        try:
            yield None
        finally:
            with _guard:
                _held[key][1] -= 1
        return

    lock_file = open(RunDir(run_dir).lock, "a+")  # held open while the lock is held
    try:
        abandoned = _acquire(lock_file, run_dir, wait_seconds, note or {})
        with _guard:
            _held[key] = [lock_file, 1]
        try:
            yield abandoned
        finally:
            with _guard:
                del _held[key]
            lock_file.seek(0)
            lock_file.truncate()  # released: an empty record means nobody died holding it
            lock_file.flush()
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    finally:
        lock_file.close()


def _acquire(lock_file, run_dir: Path, wait_seconds: float, note: dict) -> dict | None:
    deadline = time.monotonic() + wait_seconds
    announced = False
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            record = _read_holder_record(lock_file) or {}
            holder = (f"pid {record.get('pid', '?')} on {record.get('host', '?')} since "
                      f"{record.get('since', '?')}")
            if time.monotonic() >= deadline:
                raise RunDirBusy(
                    f"run directory {run_dir} is in use by {holder}. Wait for that run to finish, "
                    "pass --wait-for-lock SECONDS, or use another --run-dir.") from None
            if not announced:
                log.info("run directory %s is in use by %s; waiting up to %.0f s", run_dir,
                         holder, wait_seconds)
                announced = True
            time.sleep(_POLL_S)
    previous = _read_holder_record(lock_file)
    abandoned = previous if isinstance(previous, dict) else None
    if abandoned:  # the kernel freed the lock of a holder that never released it: it died
        log.warning("taking over run directory %s from pid %s on %s, which ended without "
                    "releasing it", run_dir, abandoned.get("pid"), abandoned.get("host"))
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "since": datetime.now(UTC).isoformat(timespec="seconds"), **note}))
    lock_file.flush()
    return abandoned


def _read_holder_record(lock_file) -> dict | None:
    lock_file.seek(0)
    try:
        return json.loads(lock_file.read() or "null")
    except ValueError:
        return None
