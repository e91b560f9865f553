"""Data-parallel training: real MirroredStrategy and MultiWorkerMirroredStrategy processes.

Each strategy run is compared with one-device training on the same global batch. Dropout is off
in these comparisons: with it, each replica draws its own slice's mask from the same RNG state,
so the trajectories differ by design (see ckptflow.training.replicas). What remains is float32
summation order, hence a tolerance instead of bit-identity.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, small_config

from ckptflow.core.checkpoints import CheckpointStore
from ckptflow.core.manifest import read_manifest
from ckptflow.core.restore import restore_model
from ckptflow.stages.prepare import prepare_run
from ckptflow.training.stage import train_with_checkpoints

DRIVER = str(REPO / "tests" / "distributed_driver.py")
CKPTFLOW = str(Path(sys.executable).parent / "ckptflow")
# Largest |weight difference| allowed after 16-24 Adam steps; measured 2.2e-7 for both tests.
WEIGHT_TOLERANCE = 1e-5
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def one_device_weights(run_dir: Path, epochs: int) -> list[np.ndarray]:
    config = small_config(run_dir, epochs=epochs, dropout=0.0)
    record = train_with_checkpoints(run_dir, config, prepare_run(config))
    return [v.numpy() for v in restore_model(run_dir, record.checkpoint).weights]


def max_weight_difference(run_dir: Path, checkpoint: str, reference: list[np.ndarray]) -> float:
    weights = [v.numpy() for v in restore_model(run_dir, checkpoint).weights]
    return max(float(np.max(np.abs(a - b))) for a, b in zip(weights, reference, strict=True))


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.distributed
def test_mirrored_on_two_logical_cpus_resumes_mid_epoch_and_matches_one_device(tmp_path):
    run_dir = tmp_path / "mirrored"
    steps = [{"epochs": 1}, {"drop": "cp-0001"},  # killed before cp-0001
             {"epochs": 2, "sigterm_at_step": 10},  # epoch 2, batch 2: no save due there
             {"epochs": 2}]
    result = subprocess.run(
        [sys.executable, DRIVER, str(run_dir), json.dumps({"strategy": "mirrored", "dropout": 0.0}),
         json.dumps(steps), "2"], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, stopped, resumed = records(result.stdout)
    assert (first["epoch"], first["step"]) == (1, 8)
    assert "stopped by SIGTERM at epoch 2, batch 2 (optimizer step 10)" in stopped["stopped"]
    assert stopped["attempt"]["resumed_from"] == "checkpoints/cp-0000-b000006"
    assert stopped["attempt"]["stopped"] == {"signal": "SIGTERM",
                                             "checkpoint": "checkpoints/cp-0001-b000002"}
    assert stopped["attempt"]["replicas"] == 2
    assert resumed["resumed_from"] == "checkpoints/cp-0001-b000002"
    assert (resumed["start_epoch"], resumed["start_batch"], resumed["batches_trained"]) == (1, 2, 6)
    assert (resumed["epoch"], resumed["step"]) == (2, 16)
    assert int(restore_model(run_dir, resumed["checkpoint"]).optimizer.iterations) == 16
    manifest = read_manifest(run_dir)
    assert manifest["training"]["attempts"][-1]["replicas"] == 2
    assert manifest["parameters"]["strategy"] == "mirrored"

    reference = one_device_weights(tmp_path / "one_device", epochs=2)
    assert max_weight_difference(run_dir, resumed["checkpoint"], reference) < WEIGHT_TOLERANCE


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def option_text(value) -> str:
    """A config value as the command line writes it (lists comma-separated, dicts as JSON)."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)


PEER_TIMEOUT = 10  # seconds a worker waits for the others before it gives up


def start_job(run_dir: Path, epochs: int, alone: bool = False):
    """A chief (the training stage) and a worker (`ckptflow worker`) joined by TF_CONFIG; with
    `alone`, the chief only, the worker never arriving."""
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]

    def env(index: int) -> dict:
        return {**ENV, "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                                "task": {"type": "worker", "index": index}})}

    options = {"strategy": "multi-worker", "dropout": 0.0, "peer_timeout_seconds": PEER_TIMEOUT}
    chief = subprocess.Popen(
        [sys.executable, DRIVER, str(run_dir), json.dumps(options), json.dumps([{"epochs": epochs}])],
        env=env(0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if alone:
        return chief, None
    config = small_config(run_dir, epochs=epochs, **options)
    flags = [f"--{k.replace('_', '-')}={option_text(v)}" for k, v in config.model_dump().items()
             if v is not None and not isinstance(v, bool)]
    worker = subprocess.Popen([CKPTFLOW, "worker", *flags], env=env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    return chief, worker


def wait_for_checkpoint(store: CheckpointStore, beyond_step: int, *processes) -> None:
    deadline = time.monotonic() + 180
    while not any(c.step > beyond_step for c in store.all()):
        for p in processes:
            assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no checkpoint beyond step {beyond_step} in 180 s"
        time.sleep(0.05)


@pytest.mark.distributed
def test_two_workers_stop_together_outlive_no_lost_peer_and_resume_to_match_one_device(tmp_path):
    """SIGTERM to the worker: both commit the same batch and stop. SIGKILL to the chief: the
    worker gives up within its peer timeout instead of waiting for ever. Then the job, started
    again, resumes and ends where one device does."""
    run_dir = tmp_path / "multi"
    store = CheckpointStore(run_dir / "checkpoints")
    chief, worker = start_job(run_dir, epochs=3)
    wait_for_checkpoint(store, 7, chief, worker)  # epoch 1 is committed
    worker.send_signal(signal.SIGTERM)
    chief_out, chief_err = chief.communicate(timeout=60)
    worker_out, worker_err = worker.communicate(timeout=60)
    assert chief.returncode == 0, chief_err[-3000:]
    assert worker.returncode == 3, worker_err[-3000:]
    [stopped] = records(chief_out)
    step = int(re.search(r"optimizer step (\d+)", stopped["stopped"]).group(1))
    assert f"optimizer step {step});" in worker_err  # the same batch in both
    assert stopped["attempt"]["stopped"]["signal"] == "SIGTERM"
    stop_checkpoint = store.latest()
    assert stopped["attempt"]["stopped"]["checkpoint"] == f"checkpoints/{stop_checkpoint.name}"
    assert stop_checkpoint.step == step and 8 <= step < 24

    chief, worker = start_job(run_dir, epochs=3)  # the job restarted, on fresh ports
    wait_for_checkpoint(store, step, chief, worker)
    chief.kill()
    killed = time.monotonic()
    _, worker_err = worker.communicate(timeout=PEER_TIMEOUT + 60)
    chief.communicate()
    # its watchdog's SIGKILL, or TensorFlow's own error if it noticed the lost peer first
    assert worker.returncode in (-signal.SIGKILL, 1), worker_err[-3000:]
    assert time.monotonic() - killed < PEER_TIMEOUT + 30
    assert re.search(r"^ckptflow: .*(start|restart) every worker", worker_err, re.M | re.I)
    killed_at = store.latest()
    assert step < killed_at.step < 24

    chief, worker = start_job(run_dir, epochs=3)
    chief_out, chief_err = chief.communicate(timeout=300)
    worker_out, worker_err = worker.communicate(timeout=60)
    assert chief.returncode == 0, chief_err[-3000:]
    assert worker.returncode == 0, worker_err[-3000:]
    [record] = records(chief_out)
    assert record["resumed_from"] == f"checkpoints/{killed_at.name}"
    assert (record["start_epoch"], record["start_batch"]) == (killed_at.epoch, killed_at.batch)
    assert record["batches_trained"] == 24 - killed_at.step
    assert (record["epoch"], record["step"]) == (3, 24)
    assert "worker done: epoch 3, optimizer step 24" in worker_out
    assert not list(run_dir.glob("checkpoints/.tmp-*"))  # the worker wrote nothing here
    last = read_manifest(run_dir)["training"]["attempts"][-1]
    assert (last["strategy"], last["cluster"]) == ("multi-worker", "worker 0 of 2 workers")

    reference = one_device_weights(tmp_path / "one_device", epochs=3)
    assert max_weight_difference(run_dir, record["checkpoint"], reference) < WEIGHT_TOLERANCE


@pytest.mark.distributed
def test_a_worker_that_never_arrives_ends_the_chief_within_the_peer_timeout(tmp_path):
    chief, _ = start_job(tmp_path / "alone", epochs=1, alone=True)
    _, err = chief.communicate(timeout=PEER_TIMEOUT + 90)
    assert chief.returncode == -signal.SIGKILL, err[-3000:]  # by its watchdog
    [line] = [x for x in err.splitlines() if x.startswith("ckptflow: ")]
    assert line.startswith(f"ckptflow: no progress for {PEER_TIMEOUT} s while joining the other "
                           "workers (worker 0 of 2 workers (127.0.0.1:")
    assert "start every worker of the run again" in line
    assert not (tmp_path / "alone" / "checkpoints").exists()


@pytest.mark.parametrize("tf_config", [None, '{"cluster": {}}', '{"cluster": {"worker": ["h:1"]}}'])
def test_multi_worker_without_a_valid_tf_config_is_one_line_naming_the_fix(monkeypatch, tf_config):
    from ckptflow.core.errors import BadInputError
    from ckptflow.training.cluster import strategy_for

    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(BadInputError, match="TF_CONFIG") as info:
        strategy_for("multi-worker")  # refused before TensorFlow is touched
    assert "\n" not in str(info.value) and '"index": 0' in str(info.value)
