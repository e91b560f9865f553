"""What a deployment's runs may name, decided from the deployment's record alone (no server here:
the flows' use of it against a real server and worker is in test_server.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from ckptflow.config import SweepConfig, TrainConfig, grid_points
from ckptflow.core.allowlist import Allowlist, NotAllowedError
from ckptflow.core.errors import BadInputError
from ckptflow.orchestration.deployment_allowlist import allowlist_of, check_config

DIGITS = {"model": "examples/digits_cnn/model.py:build", "data": "examples/digits_cnn/data.py:load"}


def _train(**config) -> dict:
    return {"config": config}


def _refused(allow: Allowlist, config: TrainConfig) -> NotAllowedError | None:
    try:
        check_config(allow, config)
    except NotAllowedError as exc:
        return exc
    return None


def test_by_default_a_run_may_name_the_deployments_own_functions_and_the_tutorials(tmp_path):
    allow = allowlist_of("train-pipeline/d", _train(run_dir="runs/digits", **DIGITS), {}, tmp_path)
    assert _refused(allow, TrainConfig(**DIGITS, run_dir="runs/other")) is None
    assert _refused(allow, TrainConfig(run_dir="runs/tutorial", data="bundled")) is None
    # the same file spelled another way is the same function
    assert _refused(allow, TrainConfig(model="./examples/../examples/digits_cnn/model.py:build",
                                       data=DIGITS["data"], run_dir="runs/x")) is None
    for config, parameter in [
            (TrainConfig(model="subprocess:getoutput", model_params={"cmd": "true"}), "model"),
            (TrainConfig(data="subprocess:getoutput", data_params={"cmd": "true"}), "data"),
            (TrainConfig(model=DIGITS["data"], data=DIGITS["data"]), "model"),  # a data function as model
            (TrainConfig(model="examples/digits_cnn/model.py:Rescale", data=DIGITS["data"]), "model")]:
        refused = _refused(allow, config)
        assert refused is not None and refused.parameter == parameter, config
        assert refused.received == config.code_refs()[parameter]
        assert isinstance(refused, BadInputError)  # never retried
    refused = _refused(allow, TrainConfig(model="subprocess:getoutput"))
    assert refused.allowed == sorted({"ckptflow.tutorial.model:create_model", DIGITS["model"]})
    assert str(refused).startswith("model 'subprocess:getoutput' is not allowed by deployment "
                                   "train-pipeline/d. It allows: ")
    assert "\n" not in str(refused) and "job_variables.ckptflow_allow.model" in str(refused)


def test_a_declared_allowlist_widens_by_exactly_what_it_names(tmp_path):
    declared = {"ckptflow_allow": {"model": ["pkg.models:wide"], "data": ["pkg.data:load"],
                                   "roots": ["runs", "/srv/shared-runs"]}}
    allow = allowlist_of("train-pipeline/d", _train(), declared, tmp_path)
    assert _refused(allow, TrainConfig(model="pkg.models:wide", data="pkg.data:load",
                                       run_dir="/srv/shared-runs/a")) is None
    assert _refused(allow, TrainConfig(model="pkg.models:other")).received == "pkg.models:other"
    assert _refused(allow, TrainConfig(model="pkg.models:wide", data="pkg.models:wide")) \
        .parameter == "data"
    assert _refused(allow, TrainConfig(model="pkg.data:load")).parameter == "model"


@pytest.mark.parametrize("value", [["runs"], {"models": ["a:b"]}, {"model": "a:b"}, {"roots": [""]},
                                   {"roots": [3]}])
def test_an_allowlist_the_deployer_got_wrong_is_refused_naming_it(tmp_path, value):
    with pytest.raises(BadInputError, match=r"^deployment train-pipeline/d: job variable "
                       r"ckptflow_allow is not understood\. Received: "):
        allowlist_of("train-pipeline/d", _train(), {"ckptflow_allow": value}, tmp_path)


def test_paths_must_resolve_under_an_allowed_root(tmp_path):
    work = tmp_path / "checkout"
    (work / "runs").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (work / "runs" / "link").symlink_to(outside)
    (work / "runs" / "inner").symlink_to(work / "runs")  # a symlink that stays inside
    allow = allowlist_of("train-pipeline/train", _train(run_dir="runs/default"), {}, work)
    assert allow.roots == (work / "runs",)
    for run_dir in ("runs/default", "runs/a/b", "runs", str(work / "runs" / "c"), "runs/inner/x",
                    "runs/x/../y"):
        assert _refused(allow, TrainConfig(run_dir=run_dir)) is None, run_dir
    for run_dir in ("/tmp/elsewhere", "../../x", "runs/../../x", "runs/link", "runs/link/x",
                    "runsx", "~/runs", str(outside)):
        refused = _refused(allow, TrainConfig(run_dir=run_dir))
        assert refused is not None and refused.parameter == "run_dir", run_dir
        assert refused.allowed == [str(work / "runs")]
    data_file = _refused(allow, TrainConfig(data="/etc/mnist.npz"))
    assert (data_file.parameter, data_file.received) == ("data", "/etc/mnist.npz")
    assert _refused(allow, TrainConfig(data="runs/mnist.npz")) is None
    assert _refused(allow, TrainConfig(data="bundled")) is None  # not a file
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkout", "elsewhere", "inner", "link",
                                                           "runs"]  # nothing created


def test_an_object_store_root_allows_urls_under_it_and_nothing_else(tmp_path):
    allow = allowlist_of("train-pipeline/cloud", _train(run_dir="s3://ckpt/runs/nightly"),
                         {"ckptflow_allow": {"roots": ["runs", "s3://ckpt/team/"]}}, tmp_path)
    assert allow.url_roots == ("s3://ckpt/team", "s3://ckpt/runs/nightly")
    for run_dir in ("s3://ckpt/team", "s3://ckpt/team/a", "s3://ckpt/team/a/b/",
                    "s3://ckpt/runs/nightly", "runs/local"):
        assert _refused(allow, TrainConfig(run_dir=run_dir)) is None, run_dir
    for run_dir in ("s3://ckpt/teamx", "s3://ckpt/team/../other", "s3://ckpt/team/./a",
                    "s3://other/team/a", "s3://ckpt/runs/nightly2", "s3://ckpt"):
        refused = _refused(allow, TrainConfig(run_dir=run_dir))
        assert refused is not None and refused.parameter == "run_dir", run_dir
        assert refused.received == run_dir and "s3://ckpt/team" in refused.allowed


def test_the_deployments_own_directories_are_allowed_roots(tmp_path):
    allow = allowlist_of("train-pipeline/x", _train(run_dir="/data/ckpt/x", data="/data/mnist.npz"),
                         {}, tmp_path)
    assert _refused(allow, TrainConfig(run_dir="/data/ckpt/x", data="/data/mnist.npz")) is None
    assert _refused(allow, TrainConfig(run_dir="/data/ckpt/y")).parameter == "run_dir"


def test_a_sweep_deployment_allows_its_sweep_dir_points_and_scheduler_only(tmp_path):
    sweep = {"sweep_dir": "sweeps/default", "settings": {"epochs": 5, "model": "pkg.m:build"},
             "grid": {"filters": [8, 16]},
             "dask_address": "tcp://127.0.0.1:8786"}
    allow = allowlist_of("sweep/sweep", {"sweep": sweep}, {}, tmp_path)
    assert {tmp_path / "runs", tmp_path / "sweeps" / "default"} <= set(allow.roots)
    allow.check_path("sweep_dir", "sweeps/default")
    allow.check_dask_address(None)
    allow.check_dask_address("tcp://127.0.0.1:8786")
    with pytest.raises(NotAllowedError) as refused:
        allow.check_dask_address("tcp://attacker:8786")
    assert (refused.value.parameter, refused.value.allowed) == ("dask_address", ["tcp://127.0.0.1:8786"])
    # a grid key is a point's directory name: one with `..` would leave the sweep directory
    for point in grid_points(SweepConfig(**sweep)):
        assert _refused(allow, point) is None
    [point] = grid_points(SweepConfig(**{**sweep, "grid": {"../../../x": [1]}}))
    assert _refused(allow, point).parameter == "run_dir"


def test_checking_a_ref_runs_no_module_not_even_its_parent_package(tmp_path):
    package = tmp_path / "evilpkg"
    package.mkdir()
    (package / "__init__.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').close()\n")
    (package / "models.py").write_text("def build():\n    pass\n")
    code = ("from ckptflow.core.user_code import check_ref\n"
            "check_ref('evilpkg.models:build', '--model')\n"
            "try:\n    check_ref('evilpkg.models:other', '--model')\n"
            "except ValueError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "defines no 'other'" in result.stdout
    assert not (tmp_path / "RAN").exists()


def test_the_documented_hardened_pool_ignores_a_runs_command_env_and_working_dir(prefect_server):
    """docs/security.md's work-pool template, rendered by Prefect's process worker as it renders
    a flow run's job: a run's job-variable overrides no longer reach the command it starts."""
    import asyncio

    from prefect.workers.process import ProcessJobConfiguration, ProcessWorker

    overrides = {"command": "touch /tmp/ran", "env": {"LD_PRELOAD": "/tmp/x.so"}, "working_dir": "/"}

    def rendered(template):
        return asyncio.run(ProcessJobConfiguration.from_template_and_values(template, overrides))

    assert rendered(ProcessWorker.get_default_base_job_template()).command == "touch /tmp/ran"
    hardened = json.loads(subprocess.run(  # the recipe, as documented
        [sys.executable, "-c", HARDEN], input=json.dumps(ProcessWorker.get_default_base_job_template()),
        capture_output=True, text=True, check=True).stdout)
    job = rendered(hardened)
    assert (job.command, job.env, job.working_dir) == (None, {}, None)
    assert not {"command", "env", "working_dir"} & set(hardened["variables"]["properties"])


HARDEN = next(line.split("python -c '")[1].rsplit("'", 1)[0]
              for line in (REPO / "docs" / "security.md").read_text().splitlines()
              if "python -c '" in line)
