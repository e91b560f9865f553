"""train_pipeline: fetch-data, build-model, resume-from-latest, train, evaluate, export, report, verify.

Run it directly (`python flows/train_pipeline.py`), through `ckptflow run`, or from a deployment
in prefect.yaml. Running it again on the same run directory resumes the run.
"""

from __future__ import annotations

# isort: off
from ckptflow.flows.process_defaults import apply_process_defaults

apply_process_defaults()  # before Prefect and TensorFlow load: both read them once
# isort: on
from prefect import flow  # noqa: E402
from prefect.states import Cancelled  # noqa: E402

from ckptflow.config import TrainConfig  # noqa: E402
from ckptflow.core.errors import StopRequested  # noqa: E402
from ckptflow.core.lock import run_dir_lock  # noqa: E402
from ckptflow.core.native_output import import_tensorflow  # noqa: E402
from ckptflow.core.run_dir import RunDir  # noqa: E402
from ckptflow.core.stop import StopOnSignal, raise_if_stop_requested  # noqa: E402
from ckptflow.orchestration.abandoned_runs import flow_run_note, mark_crashed  # noqa: E402
from ckptflow.orchestration.deployment_allowlist import check_deployment_run  # noqa: E402
from ckptflow.orchestration.logs import current_stage, route_logs_to_prefect  # noqa: E402
from ckptflow.orchestration.results import RecordSerializer  # noqa: E402
from ckptflow.orchestration.retries import no_flow_retry_when_futile  # noqa: E402
from ckptflow.stages.build_model import build_model_task  # noqa: E402
from ckptflow.stages.evaluate import evaluate_task  # noqa: E402
from ckptflow.stages.export import export_task  # noqa: E402
from ckptflow.stages.fetch_data import fetch_data_task  # noqa: E402
from ckptflow.stages.finished_run import finished_summary  # noqa: E402
from ckptflow.stages.open_run import opened_run  # noqa: E402
from ckptflow.stages.report import report_task  # noqa: E402
from ckptflow.stages.resume import resume_from_latest_task  # noqa: E402
from ckptflow.stages.verify import start_loader, verify_task  # noqa: E402
from ckptflow.training.stage import join_cluster_task, train_task  # noqa: E402


@flow(name="train-pipeline", flow_run_name="train {config.run_dir}", retries=1,
      retry_delay_seconds=2, validate_parameters=True, persist_result=False,
      result_serializer=RecordSerializer())
def train_pipeline(config: TrainConfig = TrainConfig()) -> dict:  # noqa: B008 (frozen)
    """Train a Keras model (the tutorial's MNIST classifier by default, or the one `model` names,
    on the data `data` names) with checkpoints, evaluate it and export every format.

    A failed run retried, by Prefect or by running it again, continues from the latest committed
    checkpoint and skips finished stages. A SIGTERM or SIGINT ends the run Cancelled, what was
    committed kept.
    """
    route_logs_to_prefect()
    location = config.run_dir  # a path, or an object-store URL whose working copy the stages use
    try:  # a signal only sets a flag; it is read between stages and inside the long ones
        with StopOnSignal(config.stop_grace_seconds, where=current_stage), \
                no_flow_retry_when_futile():
            check_deployment_run(config)  # before anything is imported or created
            note = flow_run_note()
            with opened_run(config, note) as (config, abandoned_lease), \
                    run_dir_lock(config.run_dir, config.wait_for_lock, note=note) as abandoned:
                mark_crashed(abandoned_lease or abandoned, location)
                if (summary := finished_summary(config)) is not None:
                    # nothing to do: answered from the manifest and file hashes
                    return {**summary, "run_dir": location, "working_copy": config.run_dir}
                import_tensorflow()  # its native start-up lines (CUDA probing) off the terminal
                join_cluster_task(config)  # before any TensorFlow op, as MultiWorkerMirroredStrategy needs
                raise_if_stop_requested()
                data = fetch_data_task(config)
                build_model_task(config, data)
                resume_from_latest_task(config, data.data_sha256)
                raise_if_stop_requested()
                trained = train_task(config, data)  # reads it after every batch
                start_loader(RunDir(config.run_dir).native_log)  # imports TensorFlow during evaluate, export
                raise_if_stop_requested()
                evaluation = evaluate_task(config, data, trained.checkpoint_ref())
                raise_if_stop_requested()
                exports = export_task(config, data, trained.checkpoint_ref())  # and between formats
                raise_if_stop_requested()
                report = report_task(config)
                raise_if_stop_requested()
                verified = verify_task(config)  # and between files
    except StopRequested as exc:  # in training, after committing the batch reached
        return Cancelled(message=str(exc))
    return {
        "run_dir": location,
        "working_copy": config.run_dir,
        "data": {"source": data.source, "reason": data.reason, "sha256": data.data_sha256,
                 "validation_samples": data.validation_samples},
        "training": trained.model_dump(),
        "evaluation": evaluation.model_dump(),
        "exports": [e.model_dump() for e in exports],
        "verified": [r.model_dump() for r in verified],
        "report": report,
    }


if __name__ == "__main__":
    train_pipeline()
