"""The stages' log lines in Prefect's console and run logs, and where a run stands; called by the
entry points, not at import."""

from __future__ import annotations

import logging

from ckptflow.core.errors import BadInputError


def route_logs_to_prefect(name: str = "ckptflow") -> None:
    """Send the stages' plain `logging` lines to Prefect's console and run logs (as
    PREFECT_LOGGING_EXTRA_LOGGERS would, whoever starts the flow), without tracebacks for bad
    input."""
    from prefect.logging.handlers import APILogHandler

    for run_logger in ("prefect.task_runs", "prefect.flow_runs"):
        if _no_traceback_for_bad_input not in logging.getLogger(run_logger).filters:
            logging.getLogger(run_logger).addFilter(_no_traceback_for_bad_input)
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


def current_stage() -> str:
    """` during TASK-NAME` while a task runs, else '': where a run was when it was stopped."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    return f" during {context.task.name}" if context is not None else ""


def _inside_a_run(record: logging.LogRecord) -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _no_traceback_for_bad_input(record: logging.LogRecord) -> bool:
    """Bad input is the user's to fix, not a bug: Prefect's failure line stays, its traceback goes."""
    if record.exc_info and isinstance(record.exc_info[1], BadInputError):
        record.exc_info, record.exc_text = None, None
    return True
