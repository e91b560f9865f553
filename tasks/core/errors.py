"""Error types that decide what Prefect retries and what the CLI prints as one line."""

from __future__ import annotations


class BadInputError(ValueError):
    """A problem with what the user asked for: never retried, printed as one line.

    The message follows one template: what is wrong, what was received, how to fix it.
    """


class VerificationFailed(RuntimeError):
    """An artifact of a run directory failed `ckptflow verify` (hash, load or predictions)."""


class StopRequested(RuntimeError):
    """Training stopped on SIGTERM or SIGINT after committing a checkpoint; a rerun resumes it."""


class InjectedFailure(RuntimeError):
    """A failure raised on purpose by a fault drill (`fail_after_epoch`), standing in for a crash."""


class InjectedIOError(OSError):
    """A transient I/O error raised on purpose by a fault drill (`io_error_at_step`)."""


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
