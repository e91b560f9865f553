"""A finished run's rerun is answered from its manifest and file hashes: no TensorFlow, no
Prefect, nothing written; anything left to do or changed goes through the pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import tree_digest

from ckptflow.config import TrainConfig
from ckptflow.core.manifest import artifacts_digest, read_manifest
from ckptflow.stages.finished_run import finished_summary

pytestmark = pytest.mark.xdist_group("finished_run")

PROBE = """
import json, sys
from ckptflow.flows.cli import main
code = main(["run", "--run-dir", sys.argv[1]])
print("PROBE " + json.dumps({"exit": code, "loaded": sorted(
    m for m in ("tensorflow", "keras", "prefect") if m in sys.modules)}))
"""


@pytest.fixture
def copied_run(finished_run, tmp_path):
    """A copy of the default run (10 epochs, every format), for tests that change it."""
    run_dir, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    return copy


def test_a_rerun_of_a_finished_run_loads_neither_tensorflow_nor_prefect_and_writes_nothing(
        copied_run):
    before = tree_digest(copied_run)
    # `--run-dir run`, relative to where it runs, as `make run`'s runs/default is
    result = subprocess.run([sys.executable, "-c", PROBE, copied_run.name], capture_output=True,
                            text=True, cwd=copied_run.parent, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.split("PROBE ", 1)[1])
    assert probe == {"exit": 0, "loaded": []}
    assert tree_digest(copied_run) == before


def test_the_summary_is_the_runs_own_and_says_nothing_was_trained(copied_run):
    manifest = read_manifest(copied_run)
    assert manifest["verified"]["artifacts_sha256"] == artifacts_digest(manifest)  # verify wrote it
    summary = finished_summary(TrainConfig(run_dir=str(copied_run)))
    training = summary["training"]
    assert (training["epoch"], training["batches_trained"], training["step"]) == (10, 0, 320)
    assert training["checkpoint"] == manifest["training"]["checkpoint"] == "checkpoints/cp-0010"
    assert summary["evaluation"] == manifest["evaluation"]
    assert {e["format"] for e in summary["exports"]} == {
        a["format"] for a in manifest["artifacts"] if a["kind"] == "export"}
    assert len(summary["verified"]) == len(manifest["artifacts"])
    assert all(row["ok"] for row in summary["verified"])


@pytest.mark.parametrize("change", ["more epochs", "other formats", "other setting"])
def test_a_different_request_goes_through_the_pipeline(copied_run, change):
    overrides = {"more epochs": {"epochs": 11}, "other formats": {"formats": ["keras"]},
                 "other setting": {"stop_grace_seconds": 21.0}}[change]
    assert finished_summary(TrainConfig(run_dir=str(copied_run), **overrides)) is None


def test_a_changed_file_or_an_unverified_set_goes_through_the_pipeline(copied_run):
    config = TrainConfig(run_dir=str(copied_run))
    onnx = copied_run / "exports" / "model.onnx"
    original = onnx.read_bytes()
    onnx.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert finished_summary(config) is None  # one bit of one export
    onnx.write_bytes(original)
    assert finished_summary(config) is not None

    manifest_path = copied_run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["verified"]["artifacts_sha256"] = "0" * 64  # a verify of other files
    manifest_path.write_text(json.dumps(manifest))
    assert finished_summary(config) is None
    manifest["verified"] = None  # never verified, or the last verify failed
    manifest_path.write_text(json.dumps(manifest))
    assert finished_summary(config) is None


def test_a_run_made_before_a_parameter_existed_is_still_answered_from_its_manifest(copied_run):
    """An upgrade that adds parameters (callbacks, class_weight) leaves finished runs finished;
    asking for a new parameter's non-default value does not."""
    manifest_path = copied_run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for newer in ("callbacks", "callbacks_params", "class_weight"):
        del manifest["parameters"][newer]
    manifest_path.write_text(json.dumps(manifest))
    summary = finished_summary(TrainConfig(run_dir=str(copied_run)))
    assert summary["training"]["batches_trained"] == 0
    assert finished_summary(TrainConfig(run_dir=str(copied_run), class_weight={1: 2.0})) is None


@pytest.mark.parametrize("change", [
    {"training": [1]}, {"verified": "yes"}, {"parameters": ["x"]}, {"evaluation": None},
    {"data": {}}])
def test_a_manifest_of_unexpected_shape_goes_through_the_pipeline_which_names_it(copied_run,
                                                                                 change):
    manifest_path = copied_run / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), **change}))
    assert finished_summary(TrainConfig(run_dir=str(copied_run))) is None  # and raises nothing


def test_a_multi_worker_run_goes_through_the_pipeline_so_its_workers_find_their_chief(copied_run):
    manifest_path = copied_run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["parameters"]["strategy"] = "multi-worker"  # as if trained so
    manifest_path.write_text(json.dumps(manifest))
    assert finished_summary(TrainConfig(run_dir=str(copied_run), strategy="multi-worker")) is None
    manifest["parameters"]["strategy"] = "default"
    manifest_path.write_text(json.dumps(manifest))
    assert finished_summary(TrainConfig(run_dir=str(copied_run))) is not None
