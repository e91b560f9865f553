"""A TF checkpoint in two phases: capture the tensors now (a batch boundary), write them later.

`tf.train.Checkpoint.write` reads every variable and writes the file in one call, so training
waits for the disk. `capture` does the first half on the calling thread: what the checkpoint
would save, as tensors (a variable's value is a copy-on-write read, about one memory copy).
`CapturedState.write`, on any thread, writes them as the usual `PREFIX.index` / `.data-*` files.

TensorFlow's own route (`CheckpointOptions(experimental_enable_async_checkpoint=True)`) fails
on Keras 3 variables at the second save (it creates `tf.Variable`s inside a `tf.function`), so
this uses the two halves of `tf.train.Checkpoint.write` (TensorFlow 2.21's checkpoint module,
pinned in pyproject.toml; tests/test_checkpoints.py exercises them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptflow.core.files import sha256_and_fsync


@dataclass
class CapturedState:
    """The tensors of one checkpoint, held in memory until `write`."""

    tensors: Any  # {trackable: {checkpoint key: tensor}}, as TensorFlow's saver takes them
    root: Any  # the tf.train.Checkpoint they came from (its saver holds it by a weak reference)

    def write(self, directory: Path, prefix: str) -> dict[str, str]:
        """Write `directory/prefix.index` and `.data-*`, fsynced; return {file name: sha256}
        (hashed from the page cache: through TensorFlow's in-memory file system took twice the
        CPU time)."""
        from tensorflow.python.checkpoint import functional_saver

        directory = Path(directory)
        functional_saver.MultiDeviceSaver(self.tensors).save(str(directory / prefix))
        return {p.name: sha256_and_fsync(p) for p in sorted(directory.glob(f"{prefix}.*"))}


def capture(trackables: dict[str, Any]) -> CapturedState:
    """What `tf.train.Checkpoint(**trackables).write` would save, read now."""
    import tensorflow as tf
    from tensorflow.python.training.saving import saveable_object
    from tensorflow.python.util import object_identity

    root = tf.train.Checkpoint(**trackables)
    tensors, feeds, registered, _ = root._saver._gather_serialized_tensors(None)
    if feeds or registered:  # graph-mode feeds, or a custom registered saver: not supported here
        raise TypeError("these objects cannot be captured for a background checkpoint "
                        f"(feeds: {len(feeds)}, registered savers: {len(registered)})")
    captured = object_identity.ObjectIdentityDictionary()
    for trackable, by_key in tensors.items():
        captured[trackable] = {key: _read(value, saveable_object.SaveSpec)
                               for key, value in by_key.items()}
    return CapturedState(captured, root)


def _read(value, spec_type):
    """A SaveSpec (a variable's deferred read) read now; a dict of slices, each read now."""
    if isinstance(value, dict):
        return {k: _read(v, spec_type) for k, v in value.items()}
    return value.tensor if isinstance(value, spec_type) else value
