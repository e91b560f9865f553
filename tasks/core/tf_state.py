"""A TF checkpoint in two phases: capture the tensors now (a batch boundary), write them later.

`tf.train.Checkpoint.write` reads every variable and writes the file in one call, so training
waits for the disk. Here `capture` does only the first half on the calling thread: it gathers
what `tf.train.Checkpoint` would save (every variable's value, a tf.data iterator's serialized
state, the object graph) as tensors. A variable's value is a copy-on-write read: the optimizer's
next update copies the variable rather than the saved value, so the capture costs about one
memory copy of the state, paid as training goes on. `CapturedState.write`, on any thread, writes
those tensors as the same `PREFIX.index` / `PREFIX.data-*` files, which `tf.train.Checkpoint.read`
restores as usual, hashing each file as it is written.

TensorFlow's own route (`CheckpointOptions(experimental_enable_async_checkpoint=True)`) fails
on Keras 3 variables at the second save (it creates `tf.Variable`s inside a `tf.function`), so
this uses the two halves of `tf.train.Checkpoint.write` (TensorFlow 2.21's checkpoint module,
pinned in pyproject.toml; tests/test_checkpoints.py exercises them).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHUNK = 8 << 20


@dataclass
class CapturedState:
    """The tensors of one checkpoint, held in memory until `write`."""

    tensors: Any  # {trackable: {checkpoint key: tensor}}, as TensorFlow's saver takes them
    root: Any  # the tf.train.Checkpoint they came from (its saver holds it by a weak reference)

    def write(self, directory: Path, prefix: str) -> dict[str, tuple[str, int]]:
        """Write `directory/prefix.index` and `.data-*`; return {file name: (sha256, bytes)}.

        The saver writes into TensorFlow's in-memory file system; each file is then copied to
        `directory` once, hashed on the way, so no file is read back from disk to be hashed.
        """
        import tensorflow as tf
        from tensorflow.python.checkpoint import functional_saver

        scratch = f"ram://ckptflow-{uuid.uuid4().hex}"
        try:
            functional_saver.MultiDeviceSaver(self.tensors).save(f"{scratch}/{prefix}")
            written = {}
            for source in sorted(tf.io.gfile.glob(f"{scratch}/{prefix}*")):
                name = source.rsplit("/", 1)[1]
                written[name] = _copy_hashing(source, Path(directory) / name)
            return written
        finally:
            for leftover in tf.io.gfile.glob(f"{scratch}/*"):
                tf.io.gfile.remove(leftover)


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


def _copy_hashing(source: str, target: Path) -> tuple[str, int]:
    """Copy a file of TensorFlow's file systems to `target`; its SHA-256 and size."""
    import tensorflow as tf

    digest, size = hashlib.sha256(), 0
    with tf.io.gfile.GFile(source, "rb") as f, open(target, "wb") as out:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size
