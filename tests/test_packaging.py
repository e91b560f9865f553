"""Installed as one package: the wheel holds `ckptflow` alone, and a user's own `tasks.py` and
`flows.py` beside their work neither break ckptflow nor get shadowed by it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

USER_MODULE = "import pathlib\npathlib.Path('{name}.imported').write_text('yes')\nOWNER = 'user'\n"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                             "--wheel-dir", str(out), str(REPO)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("ckptflow-*.whl")
    return path


def test_the_wheel_installs_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        names = archive.namelist()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"ckptflow"}
    assert "ckptflow/__main__.py" in names and "ckptflow/flows/cli.py" in names
    assert "ckptflow/tutorial/model.py" in names and "ckptflow/training/state.py" in names


@pytest.mark.timeout(600)
def test_python_m_ckptflow_runs_beside_a_users_own_tasks_and_flows(wheel, tmp_path):
    target, project = tmp_path / "site", tmp_path / "project"
    project.mkdir()
    for name in ("tasks", "flows"):
        (project / f"{name}.py").write_text(USER_MODULE.format(name=name))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                              "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)

    where = subprocess.run(
        [sys.executable, "-c", "import ckptflow, tasks, flows; print(ckptflow.__file__); "
         "print(tasks.OWNER, flows.OWNER)"], cwd=project, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    installed_at, owners = where.stdout.split("\n")[:2]
    assert installed_at.startswith(str(target)) and owners == "user user"
    for name in ("tasks", "flows"):
        (project / f"{name}.imported").unlink()

    result = subprocess.run([sys.executable, "-m", "ckptflow", "run", "--epochs", "2", "--data",
                             "bundled", "--train-samples", "256", "--test-samples", "128",
                             "--units", "64", "--formats",
                             "tf_checkpoint,weights_h5,keras,h5,saved_model"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "trained from scratch to epoch 2" in result.stdout
    manifest = json.loads((project / "runs" / "default" / "manifest.json").read_text())
    assert manifest["training"]["epoch"] == 2
    exported = {a["format"] for a in manifest["artifacts"] if a["kind"] == "export"}
    assert {"keras", "h5", "saved_model", "tf_checkpoint", "weights_h5"} <= exported
    # ckptflow imported neither of the user's modules, in any of its processes
    assert not list(project.glob("*.imported"))
    # saved models name ckptflow's own module for the custom layer
    with zipfile.ZipFile(project / "runs" / "default" / "exports" / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    (layer,) = [x for x in config["config"]["layers"] if x["class_name"] == "Standardize"]
    assert layer["module"] == "ckptflow.tutorial.model"
    assert layer["registered_name"] == "ckptflow>Standardize"
