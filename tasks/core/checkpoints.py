"""The checkpoint store: atomic, verified, pruned checkpoints holding the whole training state.

Every checkpoint is a directory `checkpoints/cp-EEEE` (after epoch EEEE) or `cp-EEEE-bBBBBB`
(BBBBBB batches into the epoch after EEEE): the TF checkpoint of the whole training state,
`state.json`, at epoch ends the tutorial's Keras files, and `COMMIT.json` with every other file's
SHA-256, written last (docs/run-directory.md lists them).

A checkpoint is taken in two phases: `capture` holds the state in memory at a batch boundary
(about a memory copy), `commit` writes it under a temporary name, hashes, fsyncs and renames it
into place (on another thread if need be), so a crash leaves either no checkpoint or a complete
one. Old checkpoints are removed only after a newer one is committed; `checkpoints/checkpoint`
is kept current, so `tf.train.latest_checkpoint("RUN_DIR/checkpoints")` finds the newest one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptflow.core.errors import BadInputError, WriteFailed, tf_write_errors, write_failed
from ckptflow.core.files import (
    atomic_write_bytes,
    discard,
    fsync_dir,
    publish,
    sha256_and_fsync,
    sha256_file,
)
from ckptflow.core.mirror import mirror_of
from ckptflow.core.tf_state import CapturedState, capture

log = logging.getLogger("ckptflow.checkpoints")

COMMIT = "COMMIT.json"
STATE = "state.json"
TF_PREFIX = "train_state"
_NAME = re.compile(r"^cp-(\d{4,})(?:-b(\d{6,}))?$")


class CheckpointWriteError(WriteFailed):
    """A checkpoint could not be written (disk full, refused write); the previous one stands."""


@dataclass(frozen=True)
class Capture:
    """A checkpoint captured in memory at a batch boundary, not yet committed."""

    name: str
    epoch: int
    batch: int
    step: int
    epoch_end: bool
    tf_state: CapturedState
    state: bytes  # state.json
    keras_values: list | None  # every model and optimizer variable, for the Keras files


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint: its directory and where in training it was taken."""

    path: Path
    epoch: int
    batch: int
    step: int

    @property
    def name(self) -> str:
        return self.path.name

    def read_state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE).read_text())

    def commit_sha256(self) -> str:
        return sha256_file(self.path / COMMIT)


def checkpoint_name(epoch: int, batch: int) -> str:
    """`cp-0003` after epoch 3; `cp-0003-b000016` 16 batches into the epoch after it."""
    return f"cp-{epoch:04d}" if batch == 0 else f"cp-{epoch:04d}-b{batch:06d}"


def rng_variables(model) -> list:
    """The dropout seed-generator state, which no Keras file format saves."""
    return [v for v in model.variables if "seed_generator" in v.path]


class CheckpointStore:
    """Save, find and restore the run's checkpoints in `directory` (created if missing), keeping
    the newest `keep`; with `keras_files`, epoch ends also get the tutorial's Keras files.

    `extra` (to save and restore) names more trackables to hold beside the model, such as
    `{"metrics": model.metrics_variables, "data": iterator}`.
    """

    def __init__(self, directory: str | Path, keep: int = 5, keras_files: bool = True):
        if keep < 1:
            raise BadInputError(f"keep must be at least 1. Received: keep={keep}.")
        self.directory = Path(directory)
        self.keep = keep
        self.keras_files = keras_files

    def save(self, model, state: dict[str, Any], epoch_end: bool,
             extra: dict[str, Any] | None = None) -> Checkpoint:
        """Commit a checkpoint of `model`, `extra` and `state` now, on this thread."""
        capture = self.capture(model, state, epoch_end, extra, keras_copy=False)
        return self.commit(capture, keras_model=lambda: model)

    def capture(self, model, state: dict[str, Any], epoch_end: bool,
                extra: dict[str, Any] | None = None, keras_copy: bool = True) -> Capture:
        """Take a checkpoint in memory, as it is now; with `keras_copy`, an epoch end's also holds
        every model and optimizer variable's value, for `commit` to write the Keras files from
        another model."""
        keras = epoch_end and self.keras_files and keras_copy
        return Capture(
            name=checkpoint_name(int(state["epoch"]), int(state["batch"])),
            epoch=int(state["epoch"]), batch=int(state["batch"]), step=int(state["step"]),
            epoch_end=epoch_end, tf_state=capture(_trackables(model, extra)),
            state=json.dumps(state, indent=2).encode(),
            keras_values=[_read(v) for v in _keras_variables(model)] if keras else None)

    def commit(self, capture: Capture, keras_model: Callable[[], Any] | None = None
               ) -> Checkpoint:
        """Write, hash, fsync and publish `capture` atomically; prune old checkpoints. Safe on
        another thread than training's. `keras_model` returns the model an epoch end's Keras
        files are written from (the captured model, or one given its `keras_values`)."""
        write_errors = (OSError, *tf_write_errors())
        name = capture.name
        tmp = self.directory / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            files = capture.tf_state.write(tmp, TF_PREFIX)
            files[STATE] = _write_hashing(tmp / STATE, capture.state)
            if capture.epoch_end and self.keras_files:
                files.update(_write_keras_files(keras_model(), capture, tmp))
            commit = {"name": name, "epoch": capture.epoch, "batch": capture.batch,
                      "step": capture.step, "files": dict(sorted(files.items()))}
            (tmp / COMMIT).write_text(json.dumps(commit, indent=2))
            publish(tmp, self.directory / name)  # fsyncs every file, then renames
        except write_errors as exc:  # a full disk, however worded: one OSError, retried as I/O
            discard(tmp)
            raise write_failed("checkpoint", self.directory / name, exc,
                               "a rerun resumes from the last committed checkpoint",
                               CheckpointWriteError) from exc
        except BaseException:
            discard(tmp)
            raise
        checkpoint = Checkpoint(self.directory / name, capture.epoch, capture.batch,
                                capture.step)
        if (mirror := mirror_of(self.directory)) is not None:  # a run in an object store
            try:
                mirror.checkpoint_committed(checkpoint.path)
            except BaseException:  # not committed where the run lives, so not committed at all
                discard(checkpoint.path)
                raise
        self._prune(newest=checkpoint)
        write_tf_index(self.directory, [f"{c.name}/{TF_PREFIX}" for c in self._committed()])
        return checkpoint

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint whose files match its commit record, or None."""
        for checkpoint in reversed(self._committed(warn=True)):
            problem = self.verify(checkpoint)
            if problem is None:
                return checkpoint
            log.warning("skipping checkpoint %s: %s; falling back to an older one",
                        checkpoint.path, problem)
        return None

    def all(self) -> list[Checkpoint]:
        """Every checkpoint with a commit record, oldest first (not re-hashed)."""
        return self._committed()

    def uncommitted(self) -> list[Path]:
        """Checkpoint directories without a readable commit record (damaged, not in-flight)."""
        committed = {c.path for c in self._committed()}
        return sorted(p for p in self.directory.glob("cp-*")
                      if p.is_dir() and _NAME.match(p.name) and p not in committed)

    def verify(self, checkpoint: Checkpoint) -> str | None:
        """None if every file of `checkpoint` matches its commit record, else what is wrong."""
        try:
            commit = json.loads((checkpoint.path / COMMIT).read_text())
            files = commit["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"unreadable commit record ({exc})"
        present = {p.name for p in checkpoint.path.iterdir()} - {COMMIT}
        if present != set(files):
            return f"files differ from the commit record ({sorted(present ^ set(files))})"
        for file_name, expected in files.items():
            if sha256_file(checkpoint.path / file_name) != expected:
                return f"{file_name} does not match its SHA-256 (truncated or changed)"
        return None

    def restore(self, checkpoint: Checkpoint, model, extra: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        """Load the checkpoint into `model` (built and compiled) and `extra`; return the state."""
        import tensorflow as tf

        status = tf.train.Checkpoint(**_trackables(model, extra)).read(
            str(checkpoint.path / TF_PREFIX))
        status.assert_existing_objects_matched()
        status.expect_partial()  # what is not asked for (a pipeline's position) stays unread
        return checkpoint.read_state()

    def _committed(self, warn: bool = False) -> list[Checkpoint]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            if not (path.is_dir() and _NAME.match(path.name)):
                continue
            try:
                commit = json.loads((path / COMMIT).read_text())
                found.append(Checkpoint(path, int(commit["epoch"]), int(commit["batch"]),
                                        int(commit["step"])))
            except (OSError, ValueError, KeyError, TypeError):
                if warn:
                    log.warning("skipping checkpoint %s: no valid commit record (incomplete "
                                "write or damaged)", path)
        return sorted(found, key=lambda c: (c.step, c.epoch, c.batch))

    def _prune(self, newest: Checkpoint) -> None:
        """Remove all but the newest `keep` checkpoints, and abandoned temporary writes."""
        for stale in [*self.directory.glob(".tmp-cp-*"), *self.directory.glob(".trash-cp-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a writer or pruner that was killed
        committed = [c for c in self._committed() if c.step <= newest.step]
        for old in committed[: max(0, len(committed) - self.keep)]:
            # Renamed away first, so a kill mid-delete never leaves a half checkpoint behind.
            trash = self.directory / f".trash-{old.name}"
            os.replace(old.path, trash)
            shutil.rmtree(trash)
        fsync_dir(self.directory)


def write_tf_index(directory: Path, prefixes: list[str]) -> None:
    """The `checkpoint` file by which `tf.train.latest_checkpoint(directory)` finds the last of
    `prefixes` (relative to `directory`: TensorFlow's own writer makes them relative to the
    current directory, so a moved run directory's index would point nowhere)."""
    lines = [f'model_checkpoint_path: "{prefixes[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{p}"' for p in prefixes]
    atomic_write_bytes(Path(directory) / "checkpoint", ("\n".join(lines) + "\n").encode())


def _keras_variables(model) -> list:
    """What the Keras files hold: the model's variables and its optimizer's."""
    return [*model.variables, *model.optimizer.variables]


def _read(variable):
    """The variable's value now (copy-on-write: later updates do not change it)."""
    import tensorflow as tf

    return tf.identity(variable.value)


def _write_keras_files(model, capture: Capture, directory: Path) -> dict[str, str]:
    """The tutorial's `cp-EEEE.weights.h5` and `cp-EEEE.keras`, written from `model` (given the
    capture's values first) and hashed."""
    if capture.keras_values is not None:
        variables = _keras_variables(model)
        if len(variables) != len(capture.keras_values):
            raise RuntimeError(
                f"cannot write {capture.name}'s Keras files: a second model of the architecture "
                f"has {len(variables)} variables, the trained one {len(capture.keras_values)} "
                "(variables made after the model was built?). Pass --no-epoch-keras-files, or "
                "--no-background-checkpoints to write them from the trained model itself.")
        for variable, value in zip(variables, capture.keras_values, strict=True):
            variable.assign(value)
    paths = [directory / f"{capture.name}.weights.h5", directory / f"{capture.name}.keras"]
    model.save_weights(paths[0])
    model.save(paths[1])
    return {p.name: sha256_and_fsync(p) for p in paths}


def _write_hashing(path: Path, data: bytes) -> str:
    """Write `data` to `path` (fsynced); its SHA-256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _trackables(model, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": model, "optimizer": model.optimizer, "rng": rng_variables(model),
            **(extra or {})}
