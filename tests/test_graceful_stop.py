"""SIGTERM and SIGINT during training: finish the batch, commit a checkpoint, stop; lose nothing.

Real signals to real processes: the first signal is sent by the training process to itself at
an exact optimizer step (so the test knows where it must stop), the second from outside, to
`ckptflow run`, as Kubernetes or a Prefect worker sends it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CKPTFLOW, REPO, BackgroundRun, descendants, port_is_closed

# Trains small_config (8 batches an epoch, no mid-epoch saves) and signals itself at STEP.
SELF_SIGNAL = """
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/tests")
from conftest import small_config, weights_digest
from ckptflow.core.errors import StopRequested
from ckptflow.core.manifest import read_manifest
from ckptflow.stages.prepare import prepare_run
from ckptflow.core.restore import restore_model
from ckptflow.training.stage import train_with_checkpoints

run_dir, step, signals = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = small_config(run_dir, epochs=3, save_every_batches=0)
data = prepare_run(config)

def at_step(state):
    if state.step == step and not (run_dir / "signalled").exists():
        (run_dir / "signalled").write_text("yes")
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGTERM)

try:
    train_with_checkpoints(run_dir, config, data, on_batch_end=at_step)
    raise SystemExit("training was not stopped")
except StopRequested as exc:
    stopped = str(exc)
attempt = read_manifest(run_dir)["training"]["attempts"][-1]
resumed = train_with_checkpoints(run_dir, config, data)
straight_dir = run_dir.parent / "straight"
straight = small_config(straight_dir, epochs=3, save_every_batches=0)
reference = train_with_checkpoints(straight_dir, straight, prepare_run(straight))
print("RESULT " + json.dumps({
    "message": stopped, "attempt": attempt, "resumed_from": resumed.resumed_from,
    "start": [resumed.start_epoch, resumed.start_batch], "batches": resumed.batches_trained,
    "resumed_digest": weights_digest(restore_model(run_dir, resumed.checkpoint)),
    "straight_digest": weights_digest(restore_model(straight_dir, reference.checkpoint))}))
"""


def self_signal(tmp_path: Path, step: int, signals: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SELF_SIGNAL, str(REPO), str(tmp_path / "run"),
                           str(step), str(signals)], capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(300)
def test_sigterm_mid_epoch_commits_that_batch_and_the_rerun_ends_bit_identical(tmp_path):
    result = self_signal(tmp_path, step=11, signals=1)  # epoch 2, batch 3, no mid-epoch saves
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert "stopped by SIGTERM at epoch 2, batch 3 (optimizer step 11)" in report["message"]
    assert "checkpoints/cp-0001-b000003 is committed" in report["message"]
    assert report["attempt"]["stopped"] == {"signal": "SIGTERM",
                                            "checkpoint": "checkpoints/cp-0001-b000003"}
    assert report["attempt"]["end_epoch"] == 1 and report["attempt"]["batches_trained"] == 11
    waited = report["attempt"]["checkpoints"]["waited_by"]  # the stop's own save, no mid-epoch
    assert waited["stop_or_end"] > 0 and waited["mid_epoch"] == 0 and waited["epoch_end"] > 0
    # the rerun starts at that very batch: zero batches lost, none repeated
    assert report["resumed_from"] == "checkpoints/cp-0001-b000003"
    assert report["start"] == [1, 3] and report["batches"] == 24 - 11
    assert report["resumed_digest"] == report["straight_digest"]


def test_a_second_signal_stops_at_once(tmp_path):
    result = self_signal(tmp_path, step=11, signals=2)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert "SIGTERM again: stopping at once" in result.stderr
    assert not (tmp_path / "run" / "checkpoints" / "cp-0001-b000003").exists()


def test_a_signal_inside_a_log_handler_raises_nothing_there_and_stops_at_the_next_safe_point(
        tmp_path):
    """The signal finds the main thread inside a log handler's write (as in CI): the line is
    written whole, the handler reports no error, and the stop is raised at the next safe point."""
    from ckptflow.core.errors import StopRequested
    from ckptflow.core.stop import StopOnSignal, raise_if_stop_requested, stop_requested
    from ckptflow.training.stop import GracefulStop

    written, errors = tmp_path / "log.txt", []

    class SignalledMidWrite(logging.Handler):
        def emit(self, record):
            with written.open("a") as out:
                out.write("first half, ")
                os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, in this write
                time.sleep(0.2)
                out.write("second half\n")

        def handleError(self, record):
            errors.append(record)

    logger = logging.getLogger("ckptflow.test-stop")
    logger.addHandler(SignalledMidWrite())
    logger.propagate = False
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StopRequested) as stopped:
        with StopOnSignal(30.0, where=lambda: " during a test"):
            logger.warning("a line")
            assert written.read_text() == "first half, second half\n" and not errors
            with GracefulStop(30.0) as training:  # a loop started after the signal sees it
                assert training.requested == "SIGTERM"
            assert training.requested == "SIGTERM"  # and still says so once it ended
            raise_if_stop_requested()
    assert str(stopped.value).startswith("stopped by SIGTERM during a test, outside training")
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    assert stop_requested() is None  # cleared with the outermost scope
    raise_if_stop_requested()  # so the next run in this process is not stopped


# The start-up of `ckptflow run`: TensorFlow importing on its thread, a SIGTERM 0.3 s in; the CLI's
# own exit handler prints the last line.
STOP_DURING_IMPORT = """
import atexit, os, signal, sys, threading
from ckptflow.core.errors import StopRequested
from ckptflow.core.native_output import TensorFlowImport
from ckptflow.core.stop import StopOnSignal, raise_if_stop_requested
from ckptflow.flows.cli import say_last_words

words = []
atexit.register(say_last_words, words)
with StopOnSignal(20.0):
    importing = TensorFlowImport()
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    try:
        importing.wait(raise_if_stop_requested)
        words.append("imported before the stop was honoured")
    except StopRequested:
        still = [t.name for t in threading.enumerate() if t.name.endswith("import-tensorflow")]
        words.append(f"ckptflow: stopped; import threads still running: {still}")
sys.exit(3)
"""


def test_a_stop_while_tensorflow_imports_ends_at_once_and_nothing_follows_the_last_line():
    """The import cannot be interrupted (and outlasts a stop's grace on a busy machine): the stop
    is honoured while it still runs; none of its native lines reaches the terminal, before or
    after the last line."""
    result = subprocess.run([sys.executable, "-c", STOP_DURING_IMPORT], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stdout == ""
    *before, last = result.stderr.splitlines()
    assert last == "ckptflow: stopped; import threads still running: ['ckptflow-import-tensorflow']"
    # the stop's warning shows if the import restored the terminal in time; nothing of TensorFlow's
    assert set(before) <= {"SIGTERM: stopping at the next safe point (within 20 s; a second "
                           "signal stops at once)"}, before


# `ckptflow run` with a log handler that meets the SIGTERM in its write: it sends the signal itself
# as evaluate logs its result, and finishes the line after the signal's handler ran.
MID_STAGE = """
import logging, os, signal, sys, time
from pathlib import Path
from ckptflow.flows.cli import main

written = Path(sys.argv[1])

class SignalledMidWrite(logging.Handler):
    def emit(self, record):
        if written.exists():
            return
        with written.open("a") as out:
            out.write("first half, ")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            out.write("second half\\n")

logging.getLogger("ckptflow.evaluate").addHandler(SignalledMidWrite())
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.timeout(600)
def test_a_signal_mid_stage_lets_the_stage_finish_and_ends_the_run_before_the_next(tmp_path):
    run_dir, written = tmp_path / "run", tmp_path / "written.txt"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run(
        [sys.executable, "-c", MID_STAGE, str(written), "run", "--run-dir", str(run_dir),
         "--data", "bundled", "--train-samples", "256", "--test-samples", "128", "--units", "64",
         "--batch-size", "32", "--epochs", "1", "--formats", "keras"],
        capture_output=True, text=True, timeout=600, env=env)
    said = result.stdout + result.stderr
    assert result.returncode == 3, said[-3000:]
    assert written.read_text() == "first half, second half\n"  # nothing raised in the write
    assert "Logging error" not in said
    assert re.search(r"Task run 'evaluate-\w+' - Finished in state Completed", said), said[-3000:]
    assert "Finished in state Cancelled" in said and "export-each-format" not in said
    assert [line for line in result.stderr.splitlines() if line.startswith("ckptflow:")] == [
        "ckptflow: stopped by SIGTERM during evaluate, outside training; every committed "
        "checkpoint and export is kept. Run the same command again to continue."]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["evaluation"]["checkpoint"] == manifest["training"]["checkpoint"]
    assert not [a for a in manifest["artifacts"] if a["kind"] == "export"]


@pytest.mark.timeout(900)
def test_signals_at_any_stage_of_ckptflow_run_stop_it_cleanly_and_a_rerun_finishes(tmp_path):
    """SIGTERM at start-up, in training and after it; SIGKILL in training; the temporary
    server SIGKILLed as training resumes. Each time: every process the run started has stopped,
    its temporary server's port is closed, what was committed stays, and the last run finishes
    the job."""
    run_dir = tmp_path / "run"
    args = ["run", "--run-dir", str(run_dir), "--data", "bundled", "--train-samples", "2048",
            "--test-samples", "256", "--units", "256", "--batch-size", "16",
            "--save-every-batches", "0", "--formats", "keras,h5,saved_model,tf_checkpoint"]

    # start-up: TensorFlow still loading, the temporary server starting
    first = BackgroundRun(tmp_path, "startup", [*args, "--epochs", "3"])
    first.wait_for(lambda: "Starting temporary server" in first.said(), "temporary server")
    code, took = first.end(signal.SIGTERM)
    assert code == 3 and took < 20, first.said()[-3000:]
    assert first.said().strip().splitlines()[-1].startswith("ckptflow: stopped by SIGTERM")
    assert not first.left_behind() and port_is_closed(first.server_port())
    assert not (run_dir / "checkpoints").exists()

    # training: some batches into epoch 2, with no mid-epoch saves
    second = BackgroundRun(tmp_path, "training", [*args, "--epochs", "50"])
    second.wait_for(lambda: (run_dir / "checkpoints" / "cp-0001").exists(), "cp-0001")
    code, took = second.end(signal.SIGTERM)
    said = second.said()
    assert code == 3 and took < 60, said[-3000:]
    assert said.strip().splitlines()[-1].startswith("ckptflow: stopped by SIGTERM at epoch")
    assert "Finished in state Cancelled" in said
    assert not second.left_behind() and port_is_closed(second.server_port())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stopped = manifest["training"]["attempts"][-1]["stopped"]
    assert stopped["signal"] == "SIGTERM"
    assert (run_dir / stopped["checkpoint"] / "COMMIT.json").exists()

    # SIGKILL in training: nothing can clean up, yet the kernel stops the temporary server
    third = BackgroundRun(tmp_path, "killed", [*args, "--epochs", "3"])
    third.wait_for(lambda: "resumed from" in third.said() or "epoch 2/3" in third.said(),
                   "training")
    code, _ = third.end(signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not third.left_behind() and port_is_closed(third.server_port())

    # the API lost as training resumes: the temporary server, SIGKILLed, is started again on
    # its port and the run goes on; then SIGTERM after training, in evaluate, export, ...
    fourth = BackgroundRun(tmp_path, "exporting", [*args, "--epochs", "3"])
    fourth.wait_for(lambda: "ckptflow.train - resuming from" in fourth.said(), "training")
    [server] = [p for p in descendants(fourth.process.pid)
                if b"uvicorn" in Path(f"/proc/{p}/cmdline").read_bytes()]
    os.kill(server, signal.SIGKILL)
    # after training: export-each-format has written its formats
    fourth.wait_for(lambda: "ckptflow.export - export keras" in fourth.said(), "the first export")
    code, took = fourth.end(signal.SIGTERM)
    said = fourth.said()
    assert (f"The temporary server on port {fourth.server_port()} exited (status -9); "
            "starting it again") in said
    assert not re.search(r"train-with-checkpoints-\w+' - Finished in state Failed", said)
    assert code == 3 and took < 30, said[-3000:]
    # the stage is named when the signal finds one running; export logs its formats as it
    # ends, so the signal can also land as Prefect closes the task (swallowed by a log handler
    # there, and raised again as the flow ends)
    assert re.search(r"ckptflow: stopped by SIGTERM( during (evaluate|export-each-format|"
                     r"report|verify)\S*)?, outside training", said), said[-3000:]
    assert "Finished in state Cancelled" in said
    assert not fourth.left_behind() and port_is_closed(fourth.server_port())
    assert json.loads((run_dir / "manifest.json").read_text())["training"]["epoch"] == 3

    last = subprocess.run([CKPTFLOW, *args, "--epochs", "3"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED":
                                            "false"})
    assert last.returncode == 0, last.stderr[-3000:]
    assert "already complete at 3 epochs" in last.stdout
    verified = subprocess.run([CKPTFLOW, "verify", str(run_dir)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout
