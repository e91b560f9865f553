"""Fault-injection harness: SIGKILL training at random moments, restart it until it finishes,
and compare the final weights with a run that was never interrupted.

Each round trains a fresh run directory under kills; a share of the kills is aimed at the inside
of a checkpoint write (the harness watches for the store's temporary directory and kills as soon
as one appears). After every kill the harness checks each committed checkpoint against its
commit record, and when training restarts it records where it resumed and how many batches
were lost. TensorFlow is imported once here and every training process is forked from this one,
so a restart costs model set-up and tracing, not a 10-second import.

Usage:
    python bench/fault_injection.py --kills 200            # the full drill (~5 min on 2 cores)
    python bench/fault_injection.py --kills 20 --json out.json
    python bench/fault_injection.py --example digits --kills 8   # a tf.data pipeline and a CNN
    python bench/fault_injection.py --stage finish --kills 40    # evaluate, export, report, verify

`--example digits` trains examples/digits_cnn (a registered custom layer, a shuffled and mapped
tf.data pipeline whose iterator every checkpoint holds) instead of the tutorial; `--example
diabetes` the regression example's two-headed model with its own validation set, ReduceLROnPlateau
and EarlyStopping (every other kill after the rate changed).

`--stage finish` kills the stages after training instead: evaluate + export + report, forked
as the flow runs them, in copies of three trained run directories taken in turn (never
exported; finished but one export deleted; exported from an older checkpoint). After each kill
the plain verify function runs (after a share of the kills a `ckptflow verify` is SIGKILLed
first), and every export is loaded on its own to judge a verify pass: the set complete, each
export predicting as an unkilled export of the same weights, the evaluation and the report of
those files. The stages are restarted until they finish, and the final set is judged the same.
tests/test_fault_injection.py runs all three drills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptflow.core.run_dir import RunDir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# A small run: 256 images, 8 batches an epoch, 3 epochs, a checkpoint every 2 batches (no time
# budget; each commit runs in the background while the next 2 batches train, so the bound on
# lost work is 4 batches: a kill as the next save waits for the commit still in flight).
DRILL_CONFIG = dict(data="bundled", train_samples=256, test_samples=128, batch_size=32,
                    save_every_batches=2, checkpoint_budget=0.0, epochs=3, units=64, seed=11,
                    keep_checkpoints=3)
# The tf.data example: 1,348 training digits, 22 batches an epoch, a checkpoint every 2 batches.
EXAMPLES = REPO / "examples" / "digits_cnn"
DIGITS_CONFIG = dict(model=f"{EXAMPLES / 'model.py'}:build", data=f"{EXAMPLES / 'data.py'}:load",
                     batch_size=64, save_every_batches=2, checkpoint_budget=0.0, epochs=2,
                     seed=11, keep_checkpoints=3)
# The regression example's two-headed model (two named outputs, dict labels) with a validation
# set of its own and its callbacks: ReduceLROnPlateau halves the rate and EarlyStopping ends the
# run well before epoch 30 (5 batches an epoch), so a resume is exact only if their counters come
# back from the checkpoint.
REGRESSION = REPO / "examples" / "diabetes_regression"
DIABETES_CONFIG = dict(
    model=f"{REGRESSION / 'model.py'}:build_two_heads", model_params={"learning_rate": 0.1},
    data=f"{REGRESSION / 'data.py'}:load",
    data_params={"validation_share": 0.2, "high_risk": True},
    callbacks=f"{REGRESSION / 'callbacks.py'}:plateau_and_early_stop", batch_size=64,
    save_every_batches=2, checkpoint_budget=0.0, epochs=30, seed=11, keep_checkpoints=3)
CONFIGS = {"tutorial": DRILL_CONFIG, "digits": DIGITS_CONFIG, "diabetes": DIABETES_CONFIG,
           # the tf.data example with no iterator in its checkpoints: each resume replays
           "digits-replay": dict(DIGITS_CONFIG, pipeline_resume="replay")}
_drilled = dict(DRILL_CONFIG)  # what the forked children train (set by run_drill)


@dataclass
class DrillReport:
    """What a drill did and saw."""

    rounds: int = 0
    kills: int = 0
    kills_in_write: int = 0
    kills_that_left_a_partial_write: int = 0
    restarts: int = 0
    resumed_from_checkpoint: int = 0
    finished_rounds: int = 0
    bit_identical_rounds: int = 0
    corrupt_checkpoints_loaded: int = 0
    corrupt_committed_seen: int = 0
    max_batches_lost: int = 0
    save_every_batches: int = DRILL_CONFIG["save_every_batches"]
    reference_sha256: str = ""
    example: str = "tutorial"
    signal: str = "SIGKILL"
    seconds: float = 0.0
    lost_per_kill: list[int] = field(default_factory=list)
    rate_changed_at_step: int | None = None  # where a callback first changed the learning rate
    kills_after_rate_change: int = 0  # every other kill is aimed there, when there is one
    stopped_early: dict | None = None  # the reference's; each round's must match (in the digest)


def _config(run_dir: Path, **overrides):
    from ckptflow.config import TrainConfig

    return TrainConfig(run_dir=str(run_dir), **{**_drilled, **overrides})


def _fork(target, *args) -> tuple[int, int]:
    """Run `target(write_fd, *args)` in a forked child; return (pid, read_fd)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            target(write_fd, *args)
        except BaseException as exc:  # reported to the parent, which decides what it means
            os.write(write_fd, f"error {type(exc).__name__}: {exc}\n".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def _say(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())


def _child_train(fd: int, run_dir: Path) -> None:
    """Set up if needed, report the resume point, then train, reporting every optimizer step."""
    import logging

    logging.getLogger("ckptflow").setLevel(logging.ERROR)
    from ckptflow.core.resume_point import find_resume_point
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.training.stage import train_with_checkpoints

    config = _config(run_dir)
    data = prepare_run(config)
    point = find_resume_point(run_dir, config.identity(), data.data_sha256)
    _say(fd, f"start {point.step if point else 0} {point.path if point else '-'}")
    train_with_checkpoints(run_dir, config, data,
                           on_batch_end=lambda s: _say(fd, f"step {s.step} {time.monotonic()}"))
    _say(fd, "done")


def _child_digest(fd: int, run_dir: Path) -> None:
    """Report the SHA-256 of every variable of the run's final checkpoint."""
    import hashlib

    from ckptflow.core.checkpoints import CheckpointStore
    from ckptflow.core.restore import restore_model

    latest = CheckpointStore(RunDir(run_dir).checkpoints).latest()
    model = restore_model(run_dir, latest.path.relative_to(run_dir).as_posix())
    digest = hashlib.sha256()
    for v in model.variables:
        digest.update(v.numpy().tobytes())
    state = latest.read_state()
    if state.get("callbacks") is not None:  # their counters and the stop, as the run ended
        digest.update(json.dumps([state["callbacks"], state.get("stopped_early")],
                                 sort_keys=True).encode())
    _say(fd, f"digest {latest.step} {digest.hexdigest()}")


class _Child:
    """A forked child and the lines it has reported so far."""

    def __init__(self, target, *args):
        self.pid, self.fd = _fork(target, *args)
        self.buffer = b""
        self.lines: list[str] = []
        self.exit: int | None = None

    def poll(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self._reap()
                return
            self.buffer += chunk
            *complete, self.buffer = self.buffer.split(b"\n")
            self.lines.extend(line.decode() for line in complete)

    def _reap(self) -> None:
        if self.exit is None:
            _, status = os.waitpid(self.pid, 0)
            self.exit = os.waitstatus_to_exitcode(status)
            os.close(self.fd)

    def kill(self, number: int = signal.SIGKILL) -> None:
        os.kill(self.pid, number)
        while self.exit is None:  # drain what it said before it ended
            self.poll(0.5)

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.exit is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"child {self.pid} did not finish in {timeout} s")
            self.poll(0.5)

    def last(self, prefix: str) -> str | None:
        return next((line for line in reversed(self.lines) if line.startswith(prefix)), None)


def _committed_corrupt(checkpoints: Path) -> list[str]:
    """Committed checkpoints whose files do not match COMMIT.json (hashlib only, no TF)."""
    import hashlib

    bad = []
    for commit in checkpoints.glob("cp-*/COMMIT.json"):
        try:
            files = json.loads(commit.read_text())["files"]
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint being pruned; never the one resumed from
        for name, sha in files.items():
            path = commit.parent / name
            if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
                bad.append(commit.parent.name)
                break
    return bad


def _digest(run_dir: Path) -> str:
    child = _Child(_child_digest, run_dir)
    child.wait()
    line = child.last("digest")
    if line is None:
        raise RuntimeError(f"digest child failed: {child.lines}")
    return line.split()[2]


def _callbacks_outcome(run_dir: Path, total_steps: int) -> tuple[int | None, dict | None]:
    """Where a callback first changed the learning rate (the step), and the stop it made."""
    import pandas as pd

    run = RunDir(run_dir)
    history = pd.read_csv(run.history)
    manifest = json.loads((run.root / "manifest.json").read_text())
    stopped = manifest["training"].get("stopped_early")
    if "learning_rate" not in history:
        return None, stopped
    rates = history["learning_rate"].tolist()
    changed = next((i for i, rate in enumerate(rates) if rate != rates[0]), None)
    return (None if changed is None else changed * total_steps // len(rates)), stopped


def _kill_round(run_dir: Path, kills: int, in_write_share: float, rng: random.Random,
                report: DrillReport, step_seconds: float, total_steps: int,
                number: int = signal.SIGKILL) -> None:
    """Train `run_dir` to the end, sending it signal `number` `kills` times on the way."""
    checkpoints = RunDir(run_dir).checkpoints
    last_step_before_kill: int | None = None
    done_kills = 0
    while True:
        leftovers = set(checkpoints.glob(".tmp-cp-*"))  # from earlier kills, cleaned on next save
        child = _Child(_child_train, run_dir)
        report.restarts += 1
        while child.last("start") is None and child.exit is None:
            child.poll(0.2)
        start = child.last("start")
        if start is None:
            raise RuntimeError(f"training child died before starting: {child.lines}")
        _, step, path = start.split()
        if path != "-":
            report.resumed_from_checkpoint += 1
            if path.split("/")[-1] in _committed_corrupt(checkpoints):
                report.corrupt_checkpoints_loaded += 1
        if last_step_before_kill is not None:
            lost = max(0, last_step_before_kill - int(step))
            report.lost_per_kill.append(lost)
            report.max_batches_lost = max(report.max_batches_lost, lost)
        if done_kills >= kills:
            child.wait()
            if child.last("done") is None:
                raise RuntimeError(f"training did not finish: {child.lines[-3:]}")
            report.finished_rounds += 1
            return
        in_write = rng.random() < in_write_share
        step_now = int(step)
        if in_write:  # kill as soon as a checkpoint write is under way
            deadline = time.monotonic() + 120
            while child.exit is None and time.monotonic() < deadline:
                if next(checkpoints.glob(".tmp-cp-*"), None) is not None:
                    time.sleep(rng.uniform(0, 0.004))
                    break
                child.poll(0.0005)
        elif report.rate_changed_at_step is not None and done_kills % 2 == 1:
            # at a random step after a callback changed the rate
            target = rng.randint(max(step_now, report.rate_changed_at_step) + 1, total_steps)
            while child.exit is None and int((child.last("step") or "step 0").split()[1]) < target:
                child.poll(0.01)
        else:  # kill at a random moment of the training still to do (SIGTERM: once it trains)
            while child.last("step") is None and child.exit is None:
                child.poll(0.05)
            delay = rng.uniform(0, max(step_seconds * (total_steps - step_now), 0.05))
            end = time.monotonic() + delay
            while child.exit is None and time.monotonic() < end:
                child.poll(min(0.01, max(0.0, end - time.monotonic())))
        if child.exit is not None:  # it finished (or failed) before the kill
            if child.last("done") is None:
                raise RuntimeError(f"training child failed: {child.lines[-3:]}")
            report.finished_rounds += 1
            return
        child.kill(number)
        done_kills += 1
        report.kills += 1
        report.kills_in_write += int(in_write)
        report.kills_that_left_a_partial_write += int(
            bool(set(checkpoints.glob(".tmp-cp-*")) - leftovers))
        last = child.last("step")
        last_step_before_kill = int(last.split()[1]) if last else step_now
        report.kills_after_rate_change += int(report.rate_changed_at_step is not None
                                              and last_step_before_kill
                                              > report.rate_changed_at_step)
        report.corrupt_committed_seen += len(_committed_corrupt(checkpoints))


def run_drill(work_dir: Path, kills: int, in_write_share: float = 0.3, seed: int = 0,
              kills_per_round: int = 8, example: str = "tutorial",
              number: int = signal.SIGKILL) -> DrillReport:
    """Kill training `kills` times over rounds of fresh run directories; compare each round's
    final weights with one uninterrupted reference run. With SIGTERM (`number`) mid-epoch saves
    are off: only the stop's own checkpoint can keep the batches since the epoch began."""
    import tensorflow  # noqa: F401  (imported once here; every child is forked from this process)

    _drilled.clear()
    _drilled.update(CONFIGS[example])
    if number == signal.SIGTERM:
        _drilled["save_every_batches"] = 0

    import ckptflow.stages.fetch_data  # noqa: F401
    import ckptflow.training.stage  # noqa: F401
    import ckptflow.tutorial.model  # noqa: F401

    work_dir = Path(work_dir)
    rng = random.Random(seed)
    report = DrillReport(save_every_batches=_drilled["save_every_batches"], example=example,
                         signal=signal.Signals(number).name)
    started = time.monotonic()

    reference = work_dir / "reference"
    child = _Child(_child_train, reference)
    child.wait()
    if child.last("done") is None:
        raise RuntimeError(f"reference run failed: {child.lines[-3:]}")
    steps = [line.split() for line in child.lines if line.startswith("step")]
    total_steps = int(steps[-1][1])
    step_seconds = (float(steps[-1][2]) - float(steps[0][2])) / max(len(steps) - 1, 1)
    report.reference_sha256 = _digest(reference)
    report.rate_changed_at_step, report.stopped_early = _callbacks_outcome(reference, total_steps)

    remaining = kills
    while remaining > 0:
        this_round = min(kills_per_round, remaining)
        run_dir = work_dir / f"round-{report.rounds:03d}"
        _kill_round(run_dir, this_round, in_write_share, rng, report, step_seconds, total_steps,
                    number)
        report.rounds += 1
        remaining = kills - report.kills
        if _digest(run_dir) == report.reference_sha256:
            report.bit_identical_rounds += 1
    report.seconds = round(time.monotonic() - started, 1)
    return report

# --- The stages after training: evaluate, export, report (and verify) under SIGKILL -----------

FINISH_FORMATS = ["keras", "h5", "weights_h5", "saved_model", "tf_checkpoint"]  # no converter
# The tutorial's drill run, trained quicker (checkpoints at epoch ends only, two epochs): the
# stale start exports after epoch 1 and trains epoch 2.
FINISH_CONFIG = dict(DRILL_CONFIG, save_every_batches=0, epochs=2)


@dataclass
class FinishReport:
    """What a drill of the stages after training did and saw."""

    rounds: int = 0
    kills: int = 0
    kills_in_export_write: int = 0  # aimed at the export's staging directory
    kills_after_manifest_write: int = 0  # aimed at the moment the manifest was just replaced
    kills_that_left_a_partial_export: int = 0  # a staging directory left behind
    aims_missed: int = 0  # kills aimed, but the stages finished first (which ends a round)
    restarts: int = 0
    verify_runs: int = 0
    verify_passes: int = 0
    verify_passes_on_incomplete_sets: int = 0  # must stay 0
    verify_kills: int = 0
    verify_kills_that_changed_files: int = 0
    exports_lost: int = 0  # a format's path empty after a kill though it held an export before
    broken_exports_seen: int = 0  # a file at an export's path that predicts neither set
    finished_rounds: int = 0
    final_verify_passes: int = 0
    complete_final_sets: int = 0
    identical_final_sets: int = 0  # every format predicts bit-identically to the reference
    leftovers_after_finish: int = 0  # temporary files or directories a finished round kept
    formats: list[str] = field(default_factory=list)
    stage: str = "finish"
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


@dataclass
class StartState:
    """A trained run directory the rounds start from, and what its exports must predict."""

    name: str
    path: Path
    data: object  # DataRecord
    checkpoint: object  # CheckpointRef of the final checkpoint
    expected: dict[str, Path] = field(default_factory=dict)  # label → a .npy per format


@dataclass
class FinishTiming:
    """How the unkilled reference spent its time, to aim the kills."""

    seconds: float = 0.0
    write_seconds: float = 0.0  # how long the export's staging directory lived
    manifest_writes: int = 1
    verify_seconds: float = 0.0  # of the plain function, its loading server already running
    cli_verify_seconds: float = 0.0  # of `ckptflow verify`: the last one that ran to its end


def _child_train_to(fd: int, run_dir: Path, epochs: int) -> None:
    """Train `run_dir` to `epochs` unkilled; report its data record and final checkpoint."""
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.training.stage import train_with_checkpoints

    config = _config(run_dir, epochs=epochs)
    data = prepare_run(config)
    record = train_with_checkpoints(run_dir, config, data)
    _say(fd, "data " + data.model_dump_json())
    _say(fd, "checkpoint " + record.checkpoint_ref().model_dump_json())


def _child_finish(fd: int, run_dir: Path, data, checkpoint) -> None:
    """Evaluate, export and report as the flow does after training, holding the lock as it does."""
    import logging

    logging.getLogger("ckptflow").setLevel(logging.ERROR)
    from ckptflow.core.lock import run_dir_lock
    from ckptflow.stages.evaluate import evaluate
    from ckptflow.stages.export import export_each_format
    from ckptflow.stages.report import write_report

    with run_dir_lock(run_dir):
        evaluate(run_dir, data, checkpoint)
        export_each_format(run_dir, data, checkpoint, _drilled["formats"])
        write_report(run_dir)
    _say(fd, "done")


def _child_inspect(fd: int, run_dir: Path, expected: dict[str, Path], save_to: Path | None) -> None:
    """Load each drilled format at its export path with its own runtime and say what it predicts:
    `equal LABEL` or `close LABEL` (within the format's tolerance) to one of `expected`,
    `differs`, `unloadable` or `missing`. `save_to` keeps the predictions, one .npy a format."""
    import numpy as np

    from ckptflow.core.formats import FORMATS
    from ckptflow.core.manifest import read_manifest
    from ckptflow.core.restore import fresh_model_factory
    from ckptflow.core.snapshot import TEST_SPLITS, load_snapshot

    run = RunDir(run_dir)
    manifest = read_manifest(run)
    x = load_snapshot(run.root / manifest["data"]["path"], keys=TEST_SPLITS)["x_test"]
    fresh_model = fresh_model_factory(run, manifest["model"]["identity"])
    verdicts = {}
    for name in _drilled["formats"]:
        fmt = FORMATS[name]
        if not (run.exports / fmt.filename).exists():
            verdicts[name] = "missing"
            continue
        try:
            predictions = np.asarray(fmt.predict(run.exports / fmt.filename, x, fresh_model))
        except Exception as exc:  # a verdict, not a failure of the drill
            verdicts[name] = f"unloadable {type(exc).__name__}: {str(exc)[:200]}"
            continue
        if save_to is not None:
            save_to.mkdir(parents=True, exist_ok=True)
            np.save(save_to / f"{name}.npy", predictions)
        verdicts[name] = _match(predictions, {k: np.load(v / f"{name}.npy")
                                              for k, v in expected.items()}, fmt.tolerance)
    _say(fd, "inspect " + json.dumps(verdicts))


def _match(predictions, expected: dict, tolerance: float) -> str:
    import numpy as np

    for label, reference in expected.items():
        if predictions.shape == reference.shape and np.array_equal(predictions, reference):
            return f"equal {label}"
    for label, reference in expected.items():
        if (predictions.shape == reference.shape
                and np.max(np.abs(predictions - reference)) <= tolerance):
            return f"close {label}"
    return "differs"


def _line(child: _Child, prefix: str) -> str:
    child.wait()
    line = child.last(prefix)
    if line is None:
        raise RuntimeError(f"child gave no {prefix!r} line: {child.lines[-3:]}")
    return line.split(" ", 1)[1] if " " in line else ""


def _train_to(run_dir: Path, epochs: int) -> tuple[object, object]:
    from ckptflow.core.resume_point import CheckpointRef
    from ckptflow.core.snapshot import DataRecord

    child = _Child(_child_train_to, run_dir, epochs)
    return (DataRecord.model_validate_json(_line(child, "data")),
            CheckpointRef.model_validate_json(_line(child, "checkpoint")))


def _inspect(run_dir: Path, expected: dict[str, Path], save_to: Path | None = None) -> dict:
    return json.loads(_line(_Child(_child_inspect, run_dir, expected, save_to), "inspect"))


def _start_states(work_dir: Path) -> tuple[list[StartState], FinishTiming]:
    """The first two starts of the rounds, and how the stages spent their time unkilled.

    `new`: trained, never exported. `redo`: the unkilled reference of `new` with its first
    export deleted, so that the set is exported again over exports and a report of the same
    checkpoint. The third, `stale` (_stale_state), is built when a round first needs it.
    """
    epochs, final = _drilled["epochs"], work_dir / "predictions-final"
    new = StartState("new", work_dir / "start-new", *_train_to(work_dir / "start-new", epochs),
                     {"final": final})
    reference = work_dir / "reference"
    shutil.copytree(new.path, reference, ignore=shutil.ignore_patterns(".lock"))
    timing = _finish_unkilled(reference, new.data, new.checkpoint)  # a full first export
    _inspect(reference, {}, save_to=final)
    checked = time.monotonic()
    if failures := _verify_failures(reference, FinishReport()):
        raise RuntimeError(f"verify fails on the unkilled reference: {failures}")
    timing.verify_seconds = time.monotonic() - checked
    return [new, _redo_state(work_dir, new, reference)], timing


def _stale_state(work_dir: Path, final: Path) -> StartState:
    """Exported an epoch before the end, then trained on: the old exports are valid, for an
    older checkpoint, until new ones replace them. It resumes to weights bit-identical to the
    new start's (the training drill's point), so it is held to the same `final` predictions."""
    stale_dir, epochs = work_dir / "start-stale", _drilled["epochs"]
    data, older = _train_to(stale_dir, epochs - 1)
    _finish_unkilled(stale_dir, data, older)
    stale = StartState("stale", stale_dir, *_train_to(stale_dir, epochs),
                       {"final": final, "old": work_dir / "predictions-old"})
    verdicts = _inspect(stale_dir, {}, save_to=stale.expected["old"])
    if any(v == "missing" or v.startswith("unloadable") for v in verdicts.values()):
        raise RuntimeError(f"the stale start's exports do not load: {verdicts}")
    return stale


def _redo_state(work_dir: Path, new: StartState, reference: Path) -> StartState:
    from ckptflow.core.formats import FORMATS

    redo = StartState("redo", work_dir / "start-redo", new.data, new.checkpoint, new.expected)
    shutil.copytree(reference, redo.path, ignore=shutil.ignore_patterns(".lock"))
    damaged = RunDir(redo.path).exports / FORMATS[_drilled["formats"][0]].filename
    shutil.rmtree(damaged) if damaged.is_dir() else damaged.unlink()
    return redo


def _finish_unkilled(run_dir: Path, data, checkpoint) -> FinishTiming:
    """Run the stages to their end, watching the staging directory and the manifest."""
    timing, staged_at, seen = FinishTiming(manifest_writes=0), None, _stamp(RunDir(run_dir).manifest)
    started = time.monotonic()
    child = _Child(_child_finish, run_dir, data, checkpoint)
    while child.exit is None:
        child.poll(0.0005)
        stamp = _stamp(RunDir(run_dir).manifest)
        timing.manifest_writes += int(stamp != seen)
        seen = stamp
        staging = _staging(run_dir)
        if staging and staged_at is None:
            staged_at = time.monotonic()
        elif not staging and staged_at is not None and not timing.write_seconds:
            timing.write_seconds = time.monotonic() - staged_at
    if child.last("done") is None:
        raise RuntimeError(f"the unkilled stages failed: {child.lines[-3:]}")
    timing.seconds = time.monotonic() - started
    timing.manifest_writes = max(timing.manifest_writes, 1)
    return timing


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        return ()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _staging(run_dir: Path) -> set[Path]:
    return set(RunDir(run_dir).exports.glob(".tmp-*"))


def _leftovers(run_dir: Path) -> list[str]:
    """Temporary files and directories of killed writes, outside the checkpoint store."""
    run = RunDir(run_dir)
    return [p.relative_to(run.root).as_posix() for p in sorted(run.root.rglob(".*"))
            if p.name != ".lock" and run.checkpoints not in p.parents]


def _present(run_dir: Path) -> set[str]:
    from ckptflow.core.formats import FORMATS

    return {n for n in _drilled["formats"]
            if (RunDir(run_dir).exports / FORMATS[n].filename).exists()}


def _pick_aim(rng: random.Random, in_write_share: float) -> str:
    """Inside an export write with `in_write_share`; the rest split between just after a
    manifest write and a random moment."""
    share = rng.random()
    if share < in_write_share:
        return "export write"
    return "manifest write" if share < (1 + in_write_share) / 2 else "moment"


def _aim_kill(child: _Child, run_dir: Path, aim: str, rng: random.Random,
              timing: FinishTiming, staged: set[Path]) -> None:
    """Let `child` run until the moment `aim` picks (or its end)."""
    if aim == "export write":
        _until(child, lambda: bool(_staging(run_dir) - staged))
        _until(child, _after(rng.uniform(0, timing.write_seconds)))
    elif aim == "manifest write":
        _until(child, _replaced(RunDir(run_dir).manifest, rng.randint(1, timing.manifest_writes)))
    else:
        _until(child, _after(rng.uniform(0, timing.seconds)))


def _until(child: _Child, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while child.exit is None and not condition() and time.monotonic() < deadline:
        child.poll(0.0005)


def _after(seconds: float):
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


def _replaced(path: Path, times: int):
    """A condition true once `path` has been replaced `times` times from now."""
    seen, count = [_stamp(path)], [0]

    def replaced() -> bool:
        stamp = _stamp(path)
        if stamp != seen[0]:
            seen[0], count[0] = stamp, count[0] + 1
        return count[0] >= times
    return replaced


def _verify_failures(run_dir: Path, report: FinishReport) -> list[str]:
    """The plain verify function, as `ckptflow verify` calls it: the rows that fail ([]: passed)."""
    from ckptflow.core.errors import BadInputError
    from ckptflow.stages.verify import verify_run_dir

    report.verify_runs += 1
    try:
        rows = verify_run_dir(run_dir)
    except BadInputError as exc:
        return [str(exc)]
    failures = [f"{r.path}: {r.problem}" for r in rows if not r.ok]
    report.verify_passes += int(not failures)
    return failures


def _killed_verify(run_dir: Path, rng: random.Random, report: FinishReport,
                   timing: FinishTiming) -> None:
    """`ckptflow verify RUN_DIR` in its own process group, SIGKILLed (with its loading processes)
    at a random moment of how long it takes; it must change no file. One that ends before its
    moment only teaches how long it takes, and the next is killed."""
    before = _digests(run_dir)
    while not _cli_verify_killed(run_dir, rng, timing):
        pass
    report.verify_kills += 1
    if _digests(run_dir) != before:
        report.verify_kills_that_changed_files += 1
        report.problems.append(f"{run_dir.name}: a killed verify changed files")


def _cli_verify_killed(run_dir: Path, rng: random.Random, timing: FinishTiming) -> bool:
    import subprocess

    process = subprocess.Popen([sys.executable, "-m", "ckptflow", "verify", str(run_dir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    started = time.monotonic()
    try:
        process.wait(timeout=rng.uniform(0, timing.cli_verify_seconds))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True
    timing.cli_verify_seconds = time.monotonic() - started
    return False


def _digests(run_dir: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(run_dir).rglob("*")) if p.is_file() and p.name != ".lock"}


def _set_problems(run_dir: Path, verdicts: dict[str, str], state: StartState) -> list[str]:
    """What makes `run_dir` not a complete, fresh finished set, judged without verify: an export
    that does not predict as the unkilled reference does, an evaluation or report of another
    checkpoint or other exports, a file the manifest does not list."""
    import csv

    from ckptflow.core.files import size_of
    from ckptflow.core.formats import FORMATS
    from ckptflow.core.manifest import read_manifest

    run, final = RunDir(run_dir), state.checkpoint.path
    problems = [f"{n}: {v}" for n, v in verdicts.items() if not v.endswith(" final")]
    rows = list(csv.DictReader(run.evaluation.open())) if run.evaluation.exists() else []
    if not any(r["model"] == "trained" and r["checkpoint"] == final for r in rows):
        problems.append(f"evaluation.csv is not of {final}")
    report = run.report.read_text() if run.report.exists() else ""
    for name in _drilled["formats"]:
        path = run.exports / FORMATS[name].filename
        if path.exists() and f"| {name} | `{run.relative(path)}` | {size_of(path):,} |" not in report:
            problems.append(f"report.md does not describe the {name} export on disk")
    listed = {(a["kind"], a["format"]) for a in read_manifest(run).get("artifacts", [])}
    needed = {("evaluation", "csv"), ("report", "markdown"), ("report", "png"),
              ("reference", "npy")} | {("export", n) for n in _drilled["formats"]}
    problems += [f"the manifest does not list {kind} {fmt}" for kind, fmt in sorted(needed - listed)]
    return problems


def _check_after_kill(run_dir: Path, state: StartState, held: set[str], rng: random.Random,
                      report: FinishReport, verify_kill_share: float, timing: FinishTiming) -> None:
    """After a kill: every export that was there still loads to the old or the new predictions,
    and verify passes only on a complete, fresh set."""
    inspecting = _Child(_child_inspect, run_dir, state.expected, None)  # alongside verify
    if rng.random() < verify_kill_share:
        _killed_verify(run_dir, rng, report, timing)
    passed = not _verify_failures(run_dir, report)
    verdicts = json.loads(_line(inspecting, "inspect"))
    lost = sorted(n for n in held if verdicts[n] == "missing")
    broken = sorted(n for n, v in verdicts.items() if v.startswith(("unloadable", "differs")))
    report.exports_lost += len(lost)
    report.broken_exports_seen += len(broken)
    for name in lost + broken:
        report.problems.append(f"{run_dir.name} after kill {report.kills}: {name} {verdicts[name]}")
    if passed and (problems := _set_problems(run_dir, verdicts, state)):
        report.verify_passes_on_incomplete_sets += 1
        report.problems.append(f"{run_dir.name}: verify passed after kill {report.kills}: "
                               + "; ".join(problems))


def _finish_round(state: StartState, run_dir: Path, kills: int, rng: random.Random,
                  report: FinishReport, timing: FinishTiming, in_write_share: float,
                  verify_kill_share: float) -> None:
    """Copy `state` to `run_dir` and run the stages to their end, SIGKILLing them `kills` times."""
    shutil.copytree(state.path, run_dir, ignore=shutil.ignore_patterns(".lock"))
    held, done_kills = _present(run_dir), 0
    while True:
        staged = _staging(run_dir)
        child = _Child(_child_finish, run_dir, state.data, state.checkpoint)
        report.restarts += 1
        if done_kills < kills:
            aim = _pick_aim(rng, in_write_share)
            _aim_kill(child, run_dir, aim, rng, timing, staged)
        if done_kills >= kills or child.exit is not None:
            report.aims_missed += int(done_kills < kills)
            child.wait()
            if child.last("done") is None:
                raise RuntimeError(f"the stages failed: {child.lines[-3:]}")
            _check_finished(run_dir, state, report)
            return
        child.kill()
        done_kills += 1
        report.kills += 1
        report.kills_in_export_write += int(aim == "export write")
        report.kills_after_manifest_write += int(aim == "manifest write")
        report.kills_that_left_a_partial_export += int(bool(_staging(run_dir) - staged))
        _check_after_kill(run_dir, state, held, rng, report, verify_kill_share, timing)
        held |= _present(run_dir)


def _check_finished(run_dir: Path, state: StartState, report: FinishReport) -> None:
    """A finished round: verify passes, the set is complete and predicts as the reference does,
    and no temporary file is left."""
    report.finished_rounds += 1
    inspecting = _Child(_child_inspect, run_dir, {"final": state.expected["final"]}, None)
    failures = _verify_failures(run_dir, report)
    verdicts = json.loads(_line(inspecting, "inspect"))
    report.final_verify_passes += int(not failures)
    problems = _set_problems(run_dir, verdicts, state) + [f"verify: {f}" for f in failures]
    report.complete_final_sets += int(not problems)
    report.identical_final_sets += int(all(v == "equal final" for v in verdicts.values()))
    leftovers = _leftovers(run_dir)
    report.leftovers_after_finish += len(leftovers)
    for problem in problems + [f"left {p}" for p in leftovers]:
        report.problems.append(f"{run_dir.name} finished: {problem}")


def run_finish_drill(work_dir: Path, kills: int, in_write_share: float = 0.4, seed: int = 0,
                     kills_per_round: int = 4, formats: list[str] | None = None,
                     verify_kill_share: float = 0.25) -> FinishReport:
    """Kill evaluate + export + report `kills` times over rounds that start from a trained run
    directory (never exported; missing one export; with exports of an older checkpoint), verify
    after each kill, and compare each finished set with an unkilled reference."""
    importing = time.monotonic()
    import tensorflow  # noqa: F401  (imported once here; every child is forked from this process)

    import_seconds = time.monotonic() - importing
    import ckptflow.stages.evaluate  # noqa: F401
    import ckptflow.stages.export  # noqa: F401
    import ckptflow.stages.fetch_data  # noqa: F401
    import ckptflow.stages.report  # noqa: F401
    import ckptflow.training.stage  # noqa: F401
    import ckptflow.tutorial.model  # noqa: F401
    from ckptflow.stages.verify import start_loader

    _drilled.clear()
    _drilled.update(FINISH_CONFIG, formats=list(formats or FINISH_FORMATS))
    work_dir, rng = Path(work_dir), random.Random(seed)
    report = FinishReport(formats=_drilled["formats"])
    started = time.monotonic()
    start_loader()  # verify's loading processes fork from it; its import overlaps the set-up
    states, timing = _start_states(work_dir)
    # `ckptflow verify` imports TensorFlow in its loading server, then verifies as the function
    timing.cli_verify_seconds = import_seconds + timing.verify_seconds
    while report.kills < kills:
        if report.rounds % 3 == 2 and len(states) == 2:  # two trainings and an export: on demand
            states.append(_stale_state(work_dir, states[0].expected["final"]))
        state = states[report.rounds % 3]
        _finish_round(state, work_dir / f"round-{report.rounds:03d}",
                      min(kills_per_round, kills - report.kills), rng, report, timing,
                      in_write_share, verify_kill_share)
        report.rounds += 1
    report.seconds = round(time.monotonic() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs to inflict (default 200)")
    parser.add_argument("--in-write-share", type=float, default=0.3,
                        help="share of kills aimed inside a checkpoint write, or with --stage "
                        "finish an export write (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--signal", choices=("KILL", "TERM"), default="KILL",
                        help="training: SIGKILL (default) or SIGTERM, which must lose no batch "
                        "(mid-epoch saves off)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--example", choices=sorted(CONFIGS), default="tutorial",
                        help="what to train: the tutorial (default), examples/digits_cnn (digits, "
                        "digits-replay) or examples/diabetes_regression's two-headed model "
                        "(diabetes)")
    parser.add_argument("--stage", choices=("train", "finish"), default="train",
                        help="what to kill: training (default), or evaluate, export, report and "
                        "verify after it (the tutorial only)")
    parser.add_argument("--formats", default=",".join(FINISH_FORMATS),
                        help="--stage finish: the formats to export, comma-separated (default: "
                        "those that need no converter)")
    parser.add_argument("--kills-per-round", type=int,
                        help="kills before a round may finish (default 8; --stage finish 4)")
    parser.add_argument("--verify-kill-share", type=float, default=0.25,
                        help="--stage finish: share of kills after which a `ckptflow verify` is "
                        "also killed at a random moment (default 0.25)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckptflow-faults-") as work:
        if args.stage == "finish":
            report = run_finish_drill(Path(work), args.kills, args.in_write_share, args.seed,
                                      args.kills_per_round or 4, args.formats.split(","),
                                      args.verify_kill_share)
        else:
            report = run_drill(Path(work), args.kills, args.in_write_share, args.seed,
                               args.kills_per_round or 8, args.example,
                               signal.Signals[f"SIG{args.signal}"])
    summary = {k: v for k, v in asdict(report).items() if k != "lost_per_kill"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if (finish_ok(report) if args.stage == "finish" else training_ok(report)) else 1


def training_ok(report: DrillReport) -> bool:
    """Every round bit-identical and finished, no corrupt load, at most two intervals lost (a
    commit runs in the background while the next interval trains; after a SIGTERM, none)."""
    allowed = 0 if report.signal == "SIGTERM" else 2 * report.save_every_batches
    return (report.bit_identical_rounds == report.rounds == report.finished_rounds
            and report.corrupt_checkpoints_loaded == 0 and report.max_batches_lost <= allowed)


def finish_ok(report: FinishReport) -> bool:
    """No verify pass on an incomplete set, no export lost or broken, a killed verify changed
    nothing, and every round finished complete, verified and identical, leaving no temp file."""
    return (report.verify_passes_on_incomplete_sets == report.exports_lost
            == report.broken_exports_seen == report.verify_kills_that_changed_files
            == report.leftovers_after_finish == 0
            and report.rounds == report.finished_rounds == report.final_verify_passes
            == report.complete_final_sets == report.identical_final_sets)

if __name__ == "__main__":
    sys.exit(main())
