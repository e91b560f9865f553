"""A deployment run uses only the code and the directories its deployment allows.

An ad-hoc run runs its user's own code and is not checked. A deployment run's REFs must be the
built-ins, the deployment's own parameters' or listed in its `ckptflow_allow` job variable; its
paths must lie under an allowed root (default `runs/`). Both come from the deployment's record
on the server, never from what a run overrides. See docs/security.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptflow.config import DATA_SOURCES, SweepConfig, TrainConfig, grid_points
from ckptflow.core.allowlist import DEFAULT_ROOT, JOB_VARIABLE, Allowlist
from ckptflow.core.errors import BadInputError
from ckptflow.core.models import TUTORIAL_MODEL

_KINDS = ("model", "data", "callbacks")


def check_deployment_run(config: TrainConfig) -> None:
    """In a deployment run, refuse a REF or a path its deployment does not allow."""
    if (allow := deployment_allowlist()) is not None:
        check_config(allow, config)


def check_deployment_sweep(sweep: SweepConfig) -> None:
    """In a deployment run, refuse a sweep whose directory, points or scheduler are not allowed."""
    if (allow := deployment_allowlist()) is None:
        return
    allow.check_path("sweep_dir", sweep.sweep_dir)
    allow.check_dask_address(sweep.dask_address)
    for config in grid_points(sweep):
        check_config(allow, config)


def deployment_allowlist() -> Allowlist | None:
    """The current flow run's deployment's allowlist; None outside a deployment run."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow_run.deployment_id is None:
        return None
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(context.flow_run.deployment_id)
    return allowlist_of(f"{context.flow.name}/{deployment.name}", deployment.parameters or {},
                        deployment.job_variables or {}, Path.cwd())


def allowlist_of(name: str, parameters: dict[str, Any], job_variables: dict[str, Any],
                 workdir: Path) -> Allowlist:
    """What deployment `name` allows, from its recorded parameters and job variables."""
    declared = _declared(name, job_variables.get(JOB_VARIABLE) or {})
    # The runs the deployment's own parameters describe: a sweep's points, or a training config.
    own = (grid_points(SweepConfig(**parameters["sweep"])) if "sweep" in parameters
           else [TrainConfig(**parameters.get("config", {}))])
    refs = {kind: {*declared.get(kind, [])} for kind in _KINDS}
    refs["model"].add(TUTORIAL_MODEL)
    refs["data"].update(DATA_SOURCES)  # not functions, but what a run may name instead of one
    for config in own:
        for kind, ref in config.code_refs().items():
            refs[kind].add(ref)
    roots = [*declared.get("roots", [DEFAULT_ROOT])]
    roots += [path for config in own for path in config.paths().values()]
    sweep = parameters.get("sweep")
    if isinstance(sweep, dict):
        roots.append(sweep.get("sweep_dir", SweepConfig().sweep_dir))
    dask = [sweep["dask_address"]] if isinstance(sweep, dict) and sweep.get("dask_address") else []
    return Allowlist(name, refs=refs, roots=roots, workdir=workdir, dask_addresses=dask)


def check_config(allow: Allowlist, config: TrainConfig) -> None:
    """Refuse the first function or path of `config` that `allow` does not allow."""
    for kind, ref in config.code_refs().items():
        allow.check_ref(kind, ref)
    for parameter, path in config.paths().items():
        allow.check_path(parameter, path)


def _declared(name: str, value: Any) -> dict[str, list[str]]:
    """The `ckptflow_allow` job variable, checked: lists of strings under known keys."""
    known = (*_KINDS, "roots")
    if not isinstance(value, dict) or any(
            key not in known or not isinstance(items, list)
            or not all(isinstance(i, str) and i for i in items) for key, items in value.items()):
        raise BadInputError(
            f"deployment {name}: job variable {JOB_VARIABLE} is not understood. Received: "
            f"{value!r}. Expected a mapping of {', '.join(known)} to lists of strings, e.g. "
            "{model: [path/to/model.py:build], roots: [runs]}; fix prefect.yaml and deploy again.")
    return value
