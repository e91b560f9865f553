"""How stages and flows retry: I/O and network errors with backoff, never bad input or bugs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect.tasks import exponential_backoff

from ckptflow.core.errors import BadInputError, is_transient
from ckptflow.core.lease import LeaseLost


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


@contextlib.contextmanager
def no_flow_retry_when_futile() -> Iterator[None]:
    """Inside a flow: bad input, or a lease another run took over, ends the flow run Failed at
    once instead of retrying it (flows take no retry condition, so the run's policy is set to no
    retries before the error leaves)."""
    try:
        yield
    except (BadInputError, LeaseLost):
        from prefect.client.orchestration import get_client
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        if context is not None and context.flow_run is not None:
            policy = context.flow_run.empirical_policy.model_copy(update={"retries": 0})
            try:
                with get_client(sync_client=True) as client:
                    client.update_flow_run(context.flow_run.id, empirical_policy=policy)
            except Exception:  # the API is unreachable too: the bad input stays the error
                pass
        raise
