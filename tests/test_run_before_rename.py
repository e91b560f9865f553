"""A run directory made before ckptflow became one package still verifies, resumes and exports.

The fixture `tests/fixtures/run-before-rename` was made by the last commit that installed the
top-level packages `tasks` and `flows` (d52940c):
`python -m flows.cli run --run-dir old-run --epochs 2 --units 16 --train-samples 256
--test-samples 128 --data bundled --save-every-batches 3 --checkpoint-budget 0 --keep-checkpoints 2`.
Its `.keras` and `.h5` files name the custom layer's module `tasks.model`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "run-before-rename"
OPTIONS = ["--units", "16", "--train-samples", "256", "--test-samples", "128", "--data", "bundled",
           "--save-every-batches", "3", "--checkpoint-budget", "0", "--keep-checkpoints", "2"]


@pytest.fixture
def old_run(tmp_path):
    run_dir = tmp_path / "old-run"
    shutil.copytree(FIXTURE, run_dir)
    return run_dir


def ckptflow(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "ckptflow", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_fixture_was_made_by_the_old_layout():
    with zipfile.ZipFile(FIXTURE / "exports" / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    (layer,) = [x for x in config["config"]["layers"] if x["class_name"] == "Standardize"]
    assert layer["module"] == "tasks.model"
    assert json.loads((FIXTURE / "manifest.json").read_text())["training"]["epoch"] == 2


@pytest.mark.timeout(600)
def test_an_old_run_directory_verifies_then_resumes_exports_and_verifies(old_run):
    verified = ckptflow("verify", str(old_run), "--json", cwd=old_run.parent)
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]
    rows = json.loads(verified.stdout)
    assert {r["format"] for r in rows if r["kind"] == "export"} >= {"keras", "h5", "saved_model"}
    assert all(r["ok"] for r in rows)

    resumed = ckptflow("run", "--run-dir", "old-run", "--epochs", "3", *OPTIONS, "--formats",
                       "tf_checkpoint,weights_h5,keras,h5,saved_model", cwd=old_run.parent)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed from checkpoints/cp-0002 (epoch 2, batch 0), trained 8 batches to epoch 3" \
        in resumed.stdout
    manifest = json.loads((old_run / "manifest.json").read_text())
    assert manifest["training"]["epoch"] == 3 and manifest["training"]["step"] == 24
    assert [a["end_epoch"] for a in manifest["training"]["attempts"]] == [2, 3]
    assert all(a["checkpoint"] == "checkpoints/cp-0003"
               for a in manifest["artifacts"] if a["kind"] == "export")
    assert ckptflow("verify", str(old_run), cwd=old_run.parent).returncode == 0
