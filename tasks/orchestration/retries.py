"""How stage tasks retry: I/O and network errors with backoff, never bad input or bugs."""

from __future__ import annotations

from typing import Any

from ckptflow.core.errors import is_transient
from prefect.tasks import exponential_backoff


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
