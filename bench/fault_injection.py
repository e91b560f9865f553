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

`--example digits` trains examples/digits_cnn (a registered custom layer, a shuffled and mapped
tf.data pipeline whose iterator every checkpoint holds) instead of the tutorial.
tests/test_fault_injection.py runs both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
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
# budget, so the bound on lost work is exactly 2 batches).
DRILL_CONFIG = dict(data="bundled", train_samples=256, test_samples=128, batch_size=32,
                    save_every_batches=2, checkpoint_budget=0.0, epochs=3, units=64, seed=11,
                    keep_checkpoints=3)
# The tf.data example: 1,348 training digits, 22 batches an epoch, a checkpoint every 2 batches.
EXAMPLES = REPO / "examples" / "digits_cnn"
DIGITS_CONFIG = dict(model=f"{EXAMPLES / 'model.py'}:build", data=f"{EXAMPLES / 'data.py'}:load",
                     batch_size=64, save_every_batches=2, checkpoint_budget=0.0, epochs=2,
                     seed=11, keep_checkpoints=3)
CONFIGS = {"tutorial": DRILL_CONFIG, "digits": DIGITS_CONFIG}
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
    seconds: float = 0.0
    lost_per_kill: list[int] = field(default_factory=list)


def _config(run_dir: Path):
    from ckptflow.config import TrainConfig

    return TrainConfig(run_dir=str(run_dir), **_drilled)


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
    from ckptflow.stages.resume import restore_model

    latest = CheckpointStore(RunDir(run_dir).checkpoints).latest()
    model = restore_model(run_dir, latest.path.relative_to(run_dir).as_posix())
    digest = hashlib.sha256()
    for v in model.variables:
        digest.update(v.numpy().tobytes())
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

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        while self.exit is None:  # drain what it said before it died
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


def _kill_round(run_dir: Path, kills: int, in_write_share: float, rng: random.Random,
                report: DrillReport, step_seconds: float, total_steps: int) -> None:
    """Train `run_dir` to the end, SIGKILLing it `kills` times on the way."""
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
        else:  # kill at a random moment of the training still to do
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
        child.kill()
        done_kills += 1
        report.kills += 1
        report.kills_in_write += int(in_write)
        report.kills_that_left_a_partial_write += int(
            bool(set(checkpoints.glob(".tmp-cp-*")) - leftovers))
        last = child.last("step")
        last_step_before_kill = int(last.split()[1]) if last else step_now
        report.corrupt_committed_seen += len(_committed_corrupt(checkpoints))


def run_drill(work_dir: Path, kills: int, in_write_share: float = 0.3, seed: int = 0,
              kills_per_round: int = 8, example: str = "tutorial") -> DrillReport:
    """Kill training `kills` times over rounds of fresh run directories; compare each round's
    final weights with one uninterrupted reference run."""
    import tensorflow  # noqa: F401  (imported once here; every child is forked from this process)

    _drilled.clear()
    _drilled.update(CONFIGS[example])

    import ckptflow.stages.fetch_data  # noqa: F401
    import ckptflow.training.stage  # noqa: F401
    import ckptflow.tutorial.model  # noqa: F401

    work_dir = Path(work_dir)
    rng = random.Random(seed)
    report = DrillReport(save_every_batches=_drilled["save_every_batches"], example=example)
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

    remaining = kills
    while remaining > 0:
        this_round = min(kills_per_round, remaining)
        run_dir = work_dir / f"round-{report.rounds:03d}"
        _kill_round(run_dir, this_round, in_write_share, rng, report, step_seconds, total_steps)
        report.rounds += 1
        remaining = kills - report.kills
        if _digest(run_dir) == report.reference_sha256:
            report.bit_identical_rounds += 1
    report.seconds = round(time.monotonic() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs to inflict (default 200)")
    parser.add_argument("--in-write-share", type=float, default=0.3,
                        help="share of kills aimed inside a checkpoint write (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--example", choices=sorted(CONFIGS), default="tutorial",
                        help="what to train: the tutorial (default) or examples/digits_cnn")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckptflow-faults-") as work:
        report = run_drill(Path(work), args.kills, args.in_write_share, args.seed,
                           example=args.example)
    summary = {k: v for k, v in asdict(report).items() if k != "lost_per_kill"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    ok = (report.bit_identical_rounds == report.rounds == report.finished_rounds
          and report.corrupt_checkpoints_loaded == 0
          and report.max_batches_lost <= report.save_every_batches)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
