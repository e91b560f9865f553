"""prefect.yaml stays true to the code: entrypoints import and parameters validate."""

from __future__ import annotations

import importlib.util

import yaml
from conftest import REPO

from ckptflow.config import SweepConfig, TrainConfig

# flow name -> its one parameter and that parameter's typed model
PARAMETERS = {"train-pipeline": ("config", TrainConfig), "sweep": ("sweep", SweepConfig)}


def test_every_deployment_points_at_a_flow_and_valid_parameters():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["deployments"], "prefect.yaml defines no deployment"
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        module_spec = importlib.util.spec_from_file_location("entry", REPO / path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        flow = getattr(module, name)
        parameter, model = PARAMETERS[flow.name]
        assert list(deployment["parameters"]) == [parameter]
        assert list(flow.parameters.properties) == [parameter]
        model(**deployment["parameters"][parameter])
        assert deployment["enforce_parameter_schema"] is True
        assert deployment["work_pool"]["name"] == "ckptflow-process"
        assert "schedules" in deployment  # else an interactive `prefect deploy` asks for one
    # the pull step takes the checkout's path from the build step when `prefect deploy` runs,
    # not from the worker's environment at run time
    [build] = spec["build"]
    assert build["prefect.deployments.steps.run_shell_script"]["script"] == "pwd"
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory":
                             {"directory": "{{ checkout.stdout }}"}}]
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    from prefect.client.schemas.schedules import CronSchedule

    assert CronSchedule(cron=nightly["schedules"][0]["cron"], timezone="UTC").cron == "0 2 * * *"
    assert {d["name"] for d in spec["deployments"]} == {"train", "train-digits", "nightly", "sweep"}


def test_every_deployments_allowlist_is_understood_and_names_functions_that_exist():
    from ckptflow.core.user_code import check_ref
    from ckptflow.orchestration.deployment_allowlist import allowlist_of

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        job_variables = deployment["work_pool"].get("job_variables", {})
        allow = allowlist_of(deployment["name"], deployment["parameters"], job_variables, REPO)
        assert REPO / "runs" in allow.roots
        for kind, refs in job_variables.get("ckptflow_allow", {}).items():
            for ref in refs if kind != "roots" else ():
                check_ref(ref, kind)  # found in the checkout, as the worker will look for it
                allow.check_ref(kind, ref)
    digits = next(d for d in spec["deployments"] if d["name"] == "train-digits")
    assert digits["work_pool"]["job_variables"]["ckptflow_allow"]["model"] == [
        "examples/diabetes_regression/model.py:build"]
