"""Error types that decide what Prefect retries and what the CLI prints as one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class BadInputError(ValueError):
    """A problem with what the user asked for: never retried, printed as one line (what is
    wrong, what was received, how to fix it)."""


class VerificationFailed(RuntimeError):
    """An artifact of a run directory failed `ckptflow verify` (hash, load or predictions)."""


class StopRequested(RuntimeError):
    """Training stopped on SIGTERM or SIGINT after committing a checkpoint; a rerun resumes it."""


class InjectedFailure(RuntimeError):
    """A failure raised on purpose by a fault drill (`fail_after_epoch`), standing in for a crash."""


class InjectedIOError(OSError):
    """A transient I/O error raised on purpose by a fault drill (`io_error_at_step`)."""


class WriteFailed(OSError):
    """A write the disk refused (full, over quota, read-only, a size limit); what stood stays.
    An OSError, retried like other I/O; `errno` is the cause's where known."""


# What to do about each cause `write_failed` knows; it also finds them in a message that carries
# no errno (TensorFlow's).
_FIXES = {
    errno.ENOSPC: "Free space on that file system",
    errno.EDQUOT: "Free space or raise your quota on that file system",
    errno.EFBIG: "Raise the file size limit (ulimit -f)",
    errno.EROFS: "Make that file system writable",
    errno.EACCES: "Make that directory writable",
    errno.EIO: "Check that disk",
}


def write_failed(what: str, path: str | Path, exc: BaseException, rerun: str,
                 kind: type[WriteFailed] = WriteFailed) -> WriteFailed:
    """`writing WHAT PATH failed: No space left on device (ENOSPC). Free space on that file
    system; RERUN.`: one line for what Python, h5py and TensorFlow each word their own way."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno in errno.errorcode else next(
        (c for c in _FIXES if os.strerror(c) in str(exc)), None)
    reason = f"{os.strerror(code)} ({errno.errorcode[code]})" if code else first_line(exc)
    error = kind(f"writing {what} {path} failed: {reason}. "
                 f"{_FIXES.get(code, 'Check that disk')}; {rerun}.")
    error.errno = code
    return error


def tf_write_errors() -> tuple[type[BaseException], ...]:
    """TensorFlow's types for a failed write: a full disk is ResourceExhaustedError, a file over
    RLIMIT_FSIZE OutOfRangeError, a refused one PermissionDeniedError."""
    import tensorflow as tf

    e = tf.errors
    return (e.OutOfRangeError, e.ResourceExhaustedError, e.UnavailableError,
            e.PermissionDeniedError, e.NotFoundError, e.DataLossError, e.AbortedError)


# OSError covers disk, network (ConnectionError) and timeout (TimeoutError) trouble alike.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError,)


def is_transient(exc: BaseException | None) -> bool:
    """True for errors worth retrying: I/O and network trouble, not bad input or bugs."""
    if exc is None or isinstance(exc, BadInputError):
        return False
    return isinstance(exc, TRANSIENT_ERRORS)


def describe_difference(old: dict, new: dict, before: str = "run has") -> str:
    """`units: run has 512, requested 64; ...` for every key whose value differs."""
    return ", ".join(f"{k}: {before} {old.get(k)!r}, requested {new.get(k)!r}"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def first_line(exc: BaseException | None) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line errors."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
