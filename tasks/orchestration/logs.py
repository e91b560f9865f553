"""The stages' log lines in Prefect's console and run logs; called by the entry points, not at import."""

from __future__ import annotations

import logging


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
