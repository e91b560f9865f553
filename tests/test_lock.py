"""One run per run directory: a clear refusal, waiting when asked, and taking over after a kill."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, small_config

from ckptflow.core.lock import RunDirBusy, run_dir_lock

HOLD = ("import sys, time\nfrom ckptflow.core.lock import run_dir_lock\n"
        "with run_dir_lock(sys.argv[1]):\n    print('held', flush=True)\n"
        "    time.sleep(float(sys.argv[2]))\n")


def hold_lock(run_dir, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    holder = hold_lock(tmp_path, 30)
    try:
        with pytest.raises(RunDirBusy, match=f"in use by pid {holder.pid}") as info:
            with run_dir_lock(tmp_path):
                pass
        assert "--wait-for-lock" in str(info.value) and "\n" not in str(info.value)
    finally:
        holder.kill()
        holder.wait()


def test_waiting_takes_the_lock_once_the_holder_finishes(tmp_path):
    holder = hold_lock(tmp_path, 1.5)
    started = time.monotonic()
    with run_dir_lock(tmp_path, wait_seconds=30):
        waited = time.monotonic() - started
    holder.wait()
    assert 0.5 < waited < 30


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
    holder = hold_lock(tmp_path, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="ckptflow"):
        with run_dir_lock(tmp_path):
            pass
    assert f"from pid {holder.pid} on " in caplog.text and "ended without releasing it" in caplog.text


def test_a_lock_released_normally_leaves_no_record_of_a_holder(tmp_path, caplog):
    holder = hold_lock(tmp_path, 0)
    holder.wait()
    assert (tmp_path / ".lock").read_text() == ""
    with caplog.at_level(logging.WARNING, logger="ckptflow"):
        with run_dir_lock(tmp_path) as abandoned:
            assert abandoned is None
    assert "taking over" not in caplog.text


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with run_dir_lock(tmp_path):
        with run_dir_lock(tmp_path):
            pass
        holder = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "0"], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert holder.returncode != 0 and "RunDirBusy" in holder.stderr


@pytest.mark.usefixtures("prefect_server")
def test_a_flow_on_a_busy_run_dir_fails_with_the_lock_error_and_writes_nothing(tmp_path):
    from ckptflow.flows.train_pipeline import train_pipeline

    holder = hold_lock(tmp_path, 60)
    try:
        with pytest.raises(RunDirBusy):
            train_pipeline.with_options(retries=0)(small_config(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
