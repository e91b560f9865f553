"""Flow runs whose process died holding a run directory: found by the next run, marked Crashed
(a SIGKILLed flow process cannot report its end; the lock's holder record names it)."""

from __future__ import annotations

import logging

log = logging.getLogger("ckptflow.runs")


def flow_run_note() -> dict:
    """What the run directory's lock records of the current flow run (nothing outside a run)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return {}
    return {"flow_run_id": str(context.flow_run.id), "flow_run_name": context.flow_run.name}


def mark_crashed(abandoned: dict | None, run_dir: str) -> None:
    """Mark the flow run an abandoned lock names Crashed, if Prefect still shows it running."""
    if not abandoned or not abandoned.get("flow_run_id"):
        return
    if abandoned["flow_run_id"] == flow_run_note().get("flow_run_id"):
        return  # this very run, retried (the UI's Retry) after its process was killed
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            try:
                flow_run = client.read_flow_run(abandoned["flow_run_id"])
            except ObjectNotFound:  # recorded by another Prefect server (another PREFECT_API_URL)
                return
            if flow_run.state is None or flow_run.state.is_final():
                return
            client.set_flow_run_state(flow_run.id, Crashed(
                message=f"its process (pid {abandoned.get('pid')} on {abandoned.get('host')}) "
                        f"ended without releasing run directory {run_dir}; found by the next run"),
                force=True)
    except Exception as exc:  # bookkeeping only: never a reason to fail this run
        log.warning("could not mark flow run %s Crashed: %s", abandoned["flow_run_id"], exc)
        return
    log.warning("flow run %s (%s) had died holding %s: marked Crashed", abandoned.get("flow_run_name"),
                abandoned["flow_run_id"], run_dir)
