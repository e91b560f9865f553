"""How stage tasks retry and when Prefect may skip them: the shared Prefect options of every stage."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects

from tasks.errors import is_transient
from tasks.files import sha256_path


def route_logs_to_prefect(name: str = "ckptflow") -> None:
    """Send the stages' plain `logging` lines to Prefect's console and run logs (the UI).

    The same as listing the logger in PREFECT_LOGGING_EXTRA_LOGGERS, without depending on the
    environment of whoever starts the flow (CLI, `python flows/...py`, or a worker).
    """
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    for handler in logging.getLogger("prefect.extra").handlers:
        if isinstance(handler, APILogHandler):
            # Stage functions also run outside Prefect (tests, scripts): send to the API only
            # from inside a flow or task run instead of warning on every line.
            own = APILogHandler(level=handler.level)
            own.setFormatter(handler.formatter)
            own.addFilter(_inside_a_run)
            handler = own
        if not any(type(h) is type(handler) for h in logger.handlers):
            logger.addHandler(handler)


def _inside_a_run(record: logging.LogRecord) -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


route_logs_to_prefect()


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry I/O and network errors, never bad input or bugs."""
    try:
        state.result(raise_on_failure=True)
    except Exception as exc:  # the task's own exception, re-raised by Prefect
        return is_transient(exc)
    return False


def retry_options(retries: int = 3) -> dict[str, Any]:
    """Task options: `retries` tries with exponential backoff (1 s, 2 s, 4 s ...) and jitter."""
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=1),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_if_transient,
    }


def cache_while_present(outputs: Callable[[dict[str, Any]], list[Path]]) -> Callable:
    """A `cache_key_fn` that lets Prefect skip a task only while its outputs are on disk, unchanged.

    The key covers the task's source, its inputs and the SHA-256 of each output. A deleted or
    changed output, or changed code, gives a new key, so the task runs instead of returning
    stale paths. Outputs are only known once the task has run, so the first run after outputs
    appear runs the task too; the stages make that cheap by reusing outputs they can verify.
    """

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        paths = outputs(parameters)
        if not paths or not all(Path(p).exists() for p in paths):
            return None
        source = inspect.getsource(context.task.fn)
        return hash_objects(source, parameters, [sha256_path(p) for p in paths])

    return key
