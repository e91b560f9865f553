"""A grid sweep over model params: one resumable run directory per point.

Each point is the pipeline's stages up to evaluate; exports are left to `ckptflow run --run-dir`
on the point you keep.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import task

from ckptflow.config import RUN_FIELDS, SweepConfig, TrainConfig, recorded_parameters
from ckptflow.core.files import atomic_write_bytes
from ckptflow.core.lock import run_dir_lock
from ckptflow.core.manifest import read_manifest, update_manifest
from ckptflow.core.models import TUTORIAL_PARAMS
from ckptflow.core.object_store import ObjectStore, is_url
from ckptflow.core.remote_run import stored_manifest
from ckptflow.orchestration.logs import route_logs_to_prefect
from ckptflow.orchestration.retries import retry_options
from ckptflow.stages.open_run import opened_run

log = logging.getLogger("ckptflow.sweep")

SUMMARY = "summary.md"


def point_manifest(run_dir: str) -> dict[str, Any]:
    """A point's manifest, from its directory or its object store ({} before its first run)."""
    return stored_manifest(run_dir) if is_url(run_dir) else read_manifest(Path(run_dir))


def is_finished(config: TrainConfig, manifest: dict[str, Any] | None = None) -> bool:
    """True when the point's run directory is evaluated at `epochs` (or where a callback stopped
    it) with these very settings (`manifest`: its manifest, if already read)."""
    if manifest is None:
        manifest = point_manifest(config.run_dir)
    done = recorded_parameters(manifest.get("parameters") or {})
    same = all(done.get(k) == v for k, v in config.model_dump(mode="json").items()
               if k in (*RUN_FIELDS, "epochs"))
    evaluation, training = manifest.get("evaluation") or {}, manifest.get("training") or {}
    stopped_early = training.get("stopped_early") and evaluation.get("epoch") == training["epoch"]
    return same and (evaluation.get("epoch", 0) >= config.epochs or bool(stopped_early))


def run_point(config: TrainConfig) -> dict[str, Any]:
    """Train and evaluate one grid point, or skip it if finished; return its summary row."""
    manifest = point_manifest(config.run_dir)
    if is_finished(config, manifest):
        log.info("%s: finished earlier, skipped", config.run_dir)
        return point_row(config, "skipped", manifest)
    from ckptflow.stages.evaluate import evaluate
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.training.stage import train_with_checkpoints

    with opened_run(config) as (local, _), run_dir_lock(local.run_dir, local.wait_for_lock):
        data = prepare_run(local)
        trained = train_with_checkpoints(local.run_dir, local, data)
        evaluate(local.run_dir, data, trained.checkpoint_ref())
        # verify expects no exports; the manifest returned is the one the store now holds too
        manifest = update_manifest(local.run_dir, completes_with="evaluation")
    return point_row(config, "resumed" if trained.resumed_from else "trained", manifest)


def point_row(config: TrainConfig, status: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The summary row of a point, from its manifest."""
    training, evaluation = manifest.get("training") or {}, manifest.get("evaluation") or {}
    return {
        "point": Path(config.run_dir).name, **config.model_kwargs(), "status": status,
        "epochs": training.get("epoch"), "best_val_accuracy": training.get("best_val_accuracy"),
        "test_accuracy": evaluation.get("test_accuracy"), "test_loss": evaluation.get("test_loss"),
        "attempts": len(training.get("attempts", [])), "run_dir": config.run_dir,
    }


def failed_row(config: TrainConfig, error: str) -> dict[str, Any]:
    return {**point_row(config, "failed", point_manifest(config.run_dir)), "error": error}


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best test accuracy (else test loss) first; failed points last."""
    if any(r.get("test_accuracy") is not None for r in rows):
        return sorted(rows, key=lambda r: (r["test_accuracy"] is None, -(r["test_accuracy"] or 0.0)))
    return sorted(rows, key=lambda r: (r.get("test_loss") is None, r.get("test_loss") or 0.0))


def summary_markdown(sweep: SweepConfig, rows: list[dict[str, Any]]) -> str:
    """The ranked table, as the sweep's markdown artifact and SWEEP_DIR/summary.md."""
    def pct(value):
        return "–" if value is None else f"{value:.2%}"

    def shown(value):
        return f"{value:g}" if isinstance(value, float) else str(value)

    params = list(sweep.grid or TUTORIAL_PARAMS)
    by_accuracy = any(r.get("test_accuracy") is not None for r in rows)
    lines = [f"# Sweep {sweep.sweep_dir}", "",
             f"{len(rows)} points, ranked by {'test accuracy' if by_accuracy else 'test loss'}. "
             "Status: trained (from zero), resumed (from a checkpoint), skipped (finished by an "
             "earlier run), failed.", "",
             "| rank | point | " + " | ".join(p.replace("_", " ") for p in params)
             + " | test accuracy | test loss | best val accuracy | epochs | status | attempts |",
             "|---|---|" + "---|" * len(params) + "---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        loss = r.get("test_loss")
        lines.append(f"| {i} | `{r['point']}` | " + " | ".join(shown(r.get(p)) for p in params)
                     + f" | {pct(r['test_accuracy'])} | {'–' if loss is None else f'{loss:.4g}'} | "
                     f"{pct(r['best_val_accuracy'])} | {r['epochs'] or 0} | {r['status']} | "
                     f"{r['attempts']} |")
    return "\n".join(lines) + "\n"


@task(name="sweep-point", task_run_name="point {config.run_dir}", persist_result=False,
      **retry_options())
def sweep_point_task(config: TrainConfig) -> dict[str, Any]:
    """One grid point; a retry (or the next sweep run) resumes it from its latest checkpoint."""
    route_logs_to_prefect()  # it runs in a Dask worker process, which imported no flow module
    return run_point(config)


@task(name="sweep-summary", persist_result=False)
def sweep_summary_task(sweep: SweepConfig, rows: list[dict[str, Any]]) -> str:
    """Rank the points into SWEEP_DIR/summary.md and a keyed markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    from ckptflow.orchestration.artifacts import artifact_key

    markdown = summary_markdown(sweep, rank(rows))
    if is_url(sweep.sweep_dir):
        ObjectStore(sweep.sweep_dir).write(SUMMARY, markdown.encode())
    else:
        atomic_write_bytes(Path(sweep.sweep_dir) / SUMMARY, markdown.encode())
    create_markdown_artifact(markdown=markdown, key=artifact_key(sweep.sweep_dir, "sweep"),
                             description=f"ckptflow sweep {sweep.sweep_dir}, ranked")
    return markdown


def dask_task_runner(sweep: SweepConfig):
    """prefect-dask's runner: the given Dask scheduler, or a local cluster of worker processes."""
    from prefect_dask import DaskTaskRunner

    if sweep.dask_address:  # its workers need PREFECT_API_URL of a server they can reach
        return DaskTaskRunner(address=sweep.dask_address)
    # One thread per process: each point trains with TensorFlow's process-wide settings. The
    # worker processes report to this process's API, which without PREFECT_API_URL is the warm
    # or temporary server the CLI chose (left alone, each worker would start its own and time
    # out), with the credentials it requires.
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": sweep.workers, "threads_per_worker": 1, "processes": True,
        "env": current_api_environment()})


def current_api_environment() -> dict[str, str]:
    """PREFECT_API_URL (and PREFECT_API_AUTH_STRING, if set) of the API this flow run reports to."""
    from prefect.context import get_run_context
    from prefect.settings import get_current_settings

    env = {"PREFECT_API_URL": str(get_run_context().client.api_url).rstrip("/")}
    if (auth := get_current_settings().api.auth_string) is not None:
        env["PREFECT_API_AUTH_STRING"] = auth.get_secret_value()
    return env
