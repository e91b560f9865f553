"""The sweep: a real `ckptflow sweep` on a local Dask cluster, SIGKILLed midway and run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import pickled_results, tree_digest
from pydantic import ValidationError

from ckptflow.config import SweepConfig, describe_validation_error, grid_points
from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.manifest import read_manifest
from ckptflow.stages.sweep import SUMMARY, is_finished

CKPTFLOW = str(Path(sys.executable).parent / "ckptflow")
GRID = ["--units", "16,24,32", "--dropout", "0", "--learning-rate", "0.001"]
SHARED = {"data": "bundled", "train_samples": 256, "test_samples": 128, "epochs": 2,
          "save_every_batches": 3, "seed": 7}


def sweep_command(sweep_dir: Path, workers: int) -> list[str]:
    shared = [f"--{k.replace('_', '-')}={v}" for k, v in SHARED.items()]
    return [CKPTFLOW, "sweep", "--sweep-dir", str(sweep_dir), "--workers", str(workers), *GRID,
            *shared]


def env_for(api_url: str, home: Path) -> dict:
    return {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "TF_CPP_MIN_LOG_LEVEL": "3", "PREFECT_HOME": str(home)}


@pytest.mark.distributed
def test_a_killed_sweep_run_again_skips_finished_points_and_resumes_the_rest(tmp_path,
                                                                              prefect_api_url):
    sweep_dir = tmp_path / "sweep"
    env = env_for(prefect_api_url, tmp_path / "prefect_home")
    points = grid_points(SweepConfig(sweep_dir=str(sweep_dir), units=[16, 24, 32], dropout=[0.0],
                                     learning_rate=[0.001], settings=SHARED))
    # One Dask worker: points run one after another, so the kill finds some finished, one
    # part-trained and maybe some not started.
    first = subprocess.Popen(sweep_command(sweep_dir, workers=1), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while True:
            finished = [p for p in points if is_finished(p)]
            partial = [p for p in points if p not in finished
                       and CheckpointStore(Path(p.run_dir) / "checkpoints").all()]
            if finished and partial:
                break
            assert first.poll() is None, "the sweep ended before it could be killed midway"
            assert time.monotonic() < deadline, "no finished and part-trained point within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the CLI, its Dask cluster and its workers
        first.wait()
    expected = {Path(p.run_dir).name: "skipped" if p in finished else
                "resumed" if p in partial else "trained" for p in points}
    finished_files = {p.run_dir: tree_digest(Path(p.run_dir)) for p in finished}
    partial_steps = {p.run_dir: CheckpointStore(Path(p.run_dir) / "checkpoints").latest().step
                     for p in partial}

    again = subprocess.run(sweep_command(sweep_dir, workers=2), env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    statuses = dict(item.rsplit(" ", 1) for item in
                    again.stdout.splitlines()[0].split(": ", 1)[1].split(", "))
    assert statuses == expected
    for p in finished:  # skipped: not a file touched
        assert tree_digest(Path(p.run_dir)) == finished_files[p.run_dir]
    for p in points:
        training = read_manifest(Path(p.run_dir))["training"]
        assert (training["epoch"], training["step"]) == (2, 16)
    for p in partial:  # resumed where the kill left it, not from zero
        attempt = read_manifest(Path(p.run_dir))["training"]["attempts"][-1]
        assert attempt["resumed_from"] is not None
        assert attempt["batches_trained"] == 16 - partial_steps[p.run_dir]

    table = [line for line in (sweep_dir / SUMMARY).read_text().splitlines()
             if line.startswith("| ") and line[2].isdigit()]
    accuracies = [float(line.split("|")[6].strip().rstrip("%")) for line in table]
    assert len(table) == 3 and accuracies == sorted(accuracies, reverse=True)
    assert (tmp_path / "prefect_home").is_dir()  # the CLI's and the Dask workers' Prefect files
    assert pickled_results(tmp_path / "prefect_home") == []


def test_sweep_parameters_are_checked_per_point_before_anything_runs():
    with pytest.raises(ValidationError) as info:
        SweepConfig(units=[64, 0])
    assert "units" in describe_validation_error(info.value)
    with pytest.raises(ValidationError, match="set per point"):
        SweepConfig(settings={"units": 32})
    with pytest.raises(ValidationError, match="values repeat"):
        SweepConfig(dropout=[0.1, 0.1])
    names = [Path(p.run_dir).name for p in grid_points(SweepConfig(units=[8], dropout=[0.0, 0.5]))]
    assert names == ["units8-dropout0-lr0.001", "units8-dropout0.5-lr0.001"]


def test_bad_sweep_options_get_one_line_and_exit_2_before_any_work(tmp_path):
    result = subprocess.run([CKPTFLOW, "sweep", "--sweep-dir", str(tmp_path / "s"), "--units",
                             "64,0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("ckptflow: error:") and "units" in line and "greater than 0" in line
    assert not (tmp_path / "s").exists()


def test_a_point_is_finished_at_its_epochs_or_where_a_callback_stopped_it_in_any_version(tmp_path):
    """From the manifest alone: evaluated at `epochs` with these settings, or at the epoch a
    callback stopped training; a manifest made before a parameter existed counts it at its
    default."""
    [point] = grid_points(SweepConfig(sweep_dir=str(tmp_path), units=[16], dropout=[0.0],
                                      learning_rate=[0.001], settings={"epochs": 5}))
    older = {k: v for k, v in point.model_dump(mode="json").items()
             if k not in ("callbacks", "callbacks_params", "class_weight", "pipeline_resume")}
    done = {"parameters": older, "evaluation": {"epoch": 5}, "training": {"epoch": 5}}
    assert is_finished(point, done)
    stopped = {"parameters": older, "evaluation": {"epoch": 3},
               "training": {"epoch": 3, "stopped_early": {"epoch": 3, "by": "EarlyStopping"}}}
    assert is_finished(point, stopped)
    assert not is_finished(point, {**stopped, "training": {"epoch": 3}})  # just unfinished
    assert not is_finished(point, {**stopped, "evaluation": {"epoch": 2}})  # not evaluated there
    assert not is_finished(point.model_copy(update={"class_weight": {1: 2.0}}), done)
