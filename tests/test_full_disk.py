"""A real full disk (ENOSPC): a small tmpfs that a ballast file fills up at a chosen moment.

The failed save or export leaves every committed checkpoint and export as it was, says in one
line what failed, where, and that the disk is full, is retried with growing delays, and once
space is freed the run resumes and ends bit-identical to a run that never failed.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import small_config, tree_digest, weights_digest

from ckptflow.core.checkpoints import CheckpointStore, CheckpointWriteError
from ckptflow.core.errors import WriteFailed, is_transient
from ckptflow.core.files import atomic_write_json, sha256_path
from ckptflow.core.formats import FORMATS
from ckptflow.core.manifest import read_manifest
from ckptflow.core.restore import restore_model
from ckptflow.core.resume_point import checkpoint_ref
from ckptflow.core.run_dir import RunDir
from ckptflow.stages.export import export_each_format, export_task, intact_exports
from ckptflow.stages.prepare import prepare_run
from ckptflow.training.stage import train_task, train_with_checkpoints

DISK_SIZE = "24m"  # a run of small_config with its exports and their staging copies: ~15 MiB


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of DISK_SIZE at tmp_path/disk, unmounted afterwards whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs",
                              str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    yield disk
    gc.collect()  # a failed training attempt's TensorBoard writer still holds its file open
    if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # gone once it is closed


def fill(disk: Path, leave: int) -> None:
    """Take all but about `leave` bytes of the file system with a ballast file, as another
    program filling the disk would."""
    with open(disk / "ballast", "ab") as ballast:
        ballast.write(bytes(max(0, shutil.disk_usage(disk).free - leave)))
    assert shutil.disk_usage(disk).free <= leave + 4096


def disk_bytes(path: Path) -> int:
    """The bytes a file or directory takes on the file system (whole pages, as tmpfs counts)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final weights digest and history of small_config's 2 epochs, never interrupted."""
    config = small_config(tmp_path_factory.mktemp("uninterrupted"), epochs=2)
    record = train_with_checkpoints(config.run_dir, config, prepare_run(config))
    return (weights_digest(restore_model(config.run_dir, record.checkpoint)),
            pd.read_csv(RunDir(config.run_dir).history))


# small_config saves after steps 3, 6, 8 (epoch 1), 11, 14 and 16 (epoch 2). The disk fills up
# after the save of `full_after` and the next save fails half-way through one file: TensorFlow's
# `train_state.data-*` mid-epoch, the `.weights.h5` (Keras, h5py) at the epoch end.
@pytest.mark.parametrize("full_after, committed, fails, start", [
    (11, "cp-0001-b000003", "cp-0001-b000006", (1, 3)),
    (14, "cp-0001-b000006", "cp-0002", (1, 6)),
], ids=["mid-epoch, in the TF checkpoint", "epoch end, in the weights.h5"])
def test_a_full_disk_fails_the_save_keeps_every_checkpoint_and_the_rerun_is_bit_identical(
        small_disk, uninterrupted, full_after, committed, fails, start):
    from prefect.states import Failed

    run_dir = small_disk / "run"
    checkpoints = run_dir / "checkpoints"
    config = small_config(run_dir, epochs=2)
    data = prepare_run(config)
    before = {}

    def fill_disk(state):
        if state.step == full_after and not before:
            # the save of this step is committed in the background: the disk fills up once it
            # is in (the TF index, its last write, names it)
            index, deadline = checkpoints / "checkpoint", time.monotonic() + 60
            while f'"{committed}/train_state"' not in (index.read_text() if index.exists() else ""):
                assert time.monotonic() < deadline, f"{committed} was not committed"
                time.sleep(0.01)
            before.update(tree_digest(checkpoints))
            leave = 256 * 1024  # half of the ~600 KB file that is to fail
            if fails == "cp-0002":  # after the TF files, which fit: as large as the last ones
                leave += disk_bytes(checkpoints / committed)
            fill(small_disk, leave)
            before["free"] = shutil.disk_usage(small_disk).free

    with pytest.raises(CheckpointWriteError) as info:
        train_with_checkpoints(run_dir, config, data, on_batch_end=fill_disk)
    error = info.value
    assert str(error) == (f"writing checkpoint {checkpoints / fails} failed: No space left on "
                          "device (ENOSPC). Free space on that file system; a rerun resumes "
                          "from the last committed checkpoint.")
    assert error.errno == errno.ENOSPC and is_transient(error)
    assert train_task.retry_condition_fn(train_task, None, Failed(data=error))
    # every committed checkpoint and the TF index byte for byte as they were, no temporary
    # directory left, and no space held by the failed write's files (Keras keeps its
    # .weights.h5 open); a page more is free once the released lock file is emptied
    assert shutil.disk_usage(small_disk).free >= before.pop("free")
    assert tree_digest(checkpoints) == before
    assert not (checkpoints / fails).exists() and not list(checkpoints.glob(".*"))
    store = CheckpointStore(checkpoints)
    assert store.latest().name == committed
    assert all(store.verify(c) is None for c in store.all())

    (small_disk / "ballast").unlink()
    record = train_with_checkpoints(run_dir, config, data)
    assert record.resumed_from == f"checkpoints/{committed}"
    assert (record.start_epoch, record.start_batch) == start
    assert record.step == 16 and record.batches_trained == 16 - full_after
    digest, history = uninterrupted
    assert weights_digest(restore_model(run_dir, record.checkpoint)) == digest
    pd.testing.assert_frame_equal(pd.read_csv(RunDir(run_dir).history), history, rtol=1e-5)


def test_a_full_disk_in_each_format_of_a_reexport_keeps_the_previous_exports(small_disk):
    run_dir = small_disk / "run"
    run = RunDir(run_dir)
    config = small_config(run_dir, epochs=2, save_every_batches=0)
    data = prepare_run(config)
    newer = train_with_checkpoints(run_dir, config, data).checkpoint_ref()
    store = CheckpointStore(run.checkpoints)
    older = checkpoint_ref(run_dir, next(c for c in store.all() if c.name == "cp-0001"))
    export_each_format(run_dir, data, older, config.formats)
    exported = tree_digest(run.exports)

    def export_records() -> list[dict]:
        return [a for a in read_manifest(run_dir)["artifacts"]
                if a["kind"] in ("export", "reference")]

    records = export_records()
    staged = 64 * 1024  # room for the manifest's rewrite and the reference predictions
    for fmt in config.formats:  # the disk fills up half-way through this format's file(s)
        filename = FORMATS[fmt].filename
        size = disk_bytes(run.exports / filename)
        fill(small_disk, leave=staged + size // 2)
        free = shutil.disk_usage(small_disk).free
        with pytest.raises(WriteFailed) as info:
            export_each_format(run_dir, data, newer, config.formats)
        assert str(info.value) == (
            f"writing export {run.exports / filename} failed: No space left on device (ENOSPC). "
            "Free space on that file system; the previous exports are kept and a rerun exports "
            "again."), fmt
        assert info.value.errno == errno.ENOSPC and is_transient(info.value)
        assert tree_digest(run.exports) == exported and not list(run.exports.glob(".tmp-*"))
        assert shutil.disk_usage(small_disk).free == free  # the staged files are gone for good
        assert export_records() == records
        assert intact_exports(run_dir, older) is not None  # the files match their records
        (small_disk / "ballast").unlink()
        staged += size

    exports = export_each_format(run_dir, data, newer, config.formats)
    assert [e.format for e in exports] == config.formats
    assert intact_exports(run_dir, newer) is not None and intact_exports(run_dir, older) is None
    for entry in export_records():
        assert entry["checkpoint"] == newer.path
        assert sha256_path(run_dir / entry["path"]) == entry["sha256"]


def test_a_full_disk_keeps_the_old_file_of_an_atomic_write_and_names_the_path(small_disk):
    manifest = small_disk / "manifest.json"
    atomic_write_json(manifest, {"stage": "before"})
    fill(small_disk, leave=0)
    with pytest.raises(OSError) as info:
        atomic_write_json(manifest, {"stage": "after", "padding": "x" * 8192})
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(manifest))
    assert str(info.value) == f"[Errno 28] No space left on device: '{manifest}'"
    assert json.loads(manifest.read_text()) == {"stage": "before"}
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast", "manifest.json"]


def test_a_full_disk_is_retried_with_growing_delays():
    from prefect.states import Failed

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here to get a real ENOSPC from")
    with pytest.raises(OSError) as info, open("/dev/full", "wb") as full:  # the kernel's ENOSPC
        full.write(b"checkpoint")
    assert info.value.errno == errno.ENOSPC
    for task in (train_task, export_task):
        assert task.retry_condition_fn(task, None, Failed(data=info.value))
        # three retries, after on average 1, 2 and 4 s (jitter: at most 1.5 times that)
        assert task.retries == 3 and task.retry_delay_seconds == [1, 2, 4]
        assert task.retry_jitter_factor == 0.5
