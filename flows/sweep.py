"""sweep: a grid over units, dropout and learning rate, each point a resumable run, in parallel on Dask.

Run it with `ckptflow sweep`, directly (`python flows/sweep.py`), or from the `sweep` deployment
in prefect.yaml. Running it again on the same sweep directory skips finished points and resumes
unfinished ones from their checkpoints.
"""

from __future__ import annotations

# isort: off
from ckptflow.flows.process_defaults import apply_process_defaults

apply_process_defaults()  # before Prefect and TensorFlow load: both read them once
# isort: on
from prefect import flow  # noqa: E402
from prefect.states import Cancelled  # noqa: E402

from ckptflow.config import SweepConfig, TrainConfig, grid_points  # noqa: E402
from ckptflow.core.errors import StopRequested  # noqa: E402
from ckptflow.core.stop import StopOnSignal, raise_if_stop_requested  # noqa: E402
from ckptflow.orchestration.deployment_allowlist import check_deployment_sweep  # noqa: E402
from ckptflow.orchestration.logs import current_stage, route_logs_to_prefect  # noqa: E402
from ckptflow.orchestration.results import RecordSerializer  # noqa: E402
from ckptflow.orchestration.retries import no_flow_retry_when_futile  # noqa: E402
from ckptflow.stages.sweep import (  # noqa: E402
    dask_task_runner,
    failed_row,
    sweep_point_task,
    sweep_summary_task,
)


@flow(name="sweep-points", flow_run_name="points of {sweep.sweep_dir}", persist_result=False,
      result_serializer=RecordSerializer())
def train_points(sweep: SweepConfig, points: list[TrainConfig]) -> list[dict]:
    """Every point as a task on the Dask cluster; a failed point becomes a `failed` row."""
    futures = sweep_point_task.map(points)
    rows = []
    for config, future in zip(points, futures, strict=True):
        while not future.wrapped_future.done():  # a stop is read every second
            raise_if_stop_requested()
            future.wait(timeout=1.0)
        future.wait()
        state = future.state
        rows.append(future.result() if state.is_completed() else failed_row(config, state.message))
    return rows


@flow(name="sweep", flow_run_name="sweep {sweep.sweep_dir}", retries=1, retry_delay_seconds=2,
      validate_parameters=True, persist_result=False,
      result_serializer=RecordSerializer())
def sweep_flow(sweep: SweepConfig = SweepConfig()) -> list[dict]:  # noqa: B008 (frozen)
    """Train and evaluate every grid point in parallel, then rank them in a markdown artifact."""
    route_logs_to_prefect()
    with no_flow_retry_when_futile():
        check_deployment_sweep(sweep)  # before any point starts
    points = grid_points(sweep)
    try:  # a signal only sets a flag, read while the points run and before the summary
        with StopOnSignal(TrainConfig().stop_grace_seconds, where=current_stage):
            rows = train_points.with_options(task_runner=dask_task_runner(sweep))(sweep, points)
            raise_if_stop_requested()
            sweep_summary_task(sweep, rows)
    except StopRequested as exc:  # each point keeps its committed checkpoints
        return Cancelled(message=str(exc))
    failed = [r["point"] for r in rows if r["status"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} points failed ({', '.join(failed)}); "
                           "run the sweep again to resume them")
    return rows


if __name__ == "__main__":
    sweep_flow()
