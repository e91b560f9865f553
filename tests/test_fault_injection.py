"""Crash anywhere, lose nothing: SIGKILL training 20 times (the tutorial) and 6 times (a tf.data
pipeline), some inside checkpoint writes.

The drill runs as its own process (bench/fault_injection.py): it forks its training processes
from a process that has imported TensorFlow but run no op, which a pytest process cannot promise.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_twenty_random_sigkills_end_bit_identical_with_no_corrupt_load(tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fault_injection.py"), "--kills", "20",
         "--in-write-share", "0.4", "--seed", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["kills"] == 20
    assert report["kills_in_write"] >= 4 and report["kills_that_left_a_partial_write"] >= 1
    assert report["finished_rounds"] == report["rounds"] >= 3
    assert report["bit_identical_rounds"] == report["rounds"]
    assert report["corrupt_checkpoints_loaded"] == 0 and report["corrupt_committed_seen"] == 0
    assert report["resumed_from_checkpoint"] >= 10
    assert report["max_batches_lost"] <= report["save_every_batches"]
    # the uninterrupted reference run ends with the weights the recorded 200-kill drill had
    recorded = json.loads((REPO / "bench" / "results" / "fault_injection.json").read_text())
    assert report["reference_sha256"] == recorded["reference_sha256"]


def test_a_tf_data_pipeline_killed_mid_epoch_resumes_bit_identical(tmp_path):
    """examples/digits_cnn: a shuffled, mapped tf.data pipeline whose iterator (position and
    shuffle buffer) every checkpoint holds; six SIGKILLs, then the weights of an unkilled run."""
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fault_injection.py"), "--example", "digits",
         "--kills", "6", "--in-write-share", "0.3", "--seed", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["example"] == "digits" and report["kills"] == 6
    assert report["finished_rounds"] == report["bit_identical_rounds"] == report["rounds"] >= 1
    assert report["corrupt_checkpoints_loaded"] == 0 and report["corrupt_committed_seen"] == 0
    assert report["resumed_from_checkpoint"] >= 3
    assert report["max_batches_lost"] <= report["save_every_batches"] == 2
