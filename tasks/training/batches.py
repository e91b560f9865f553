"""Where training batches come from, so that a checkpoint can say exactly where it stands.

Arrays are read in an order derived from (seed, epoch) alone, so (epoch, batch) is the whole
position; a tf.data pipeline is one iterator for the run, saved in every checkpoint.
"""

from __future__ import annotations

import math
import tempfile

import numpy as np

from ckptflow.core.errors import BadInputError, first_line
from ckptflow.core.snapshot import row_count


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The batch order of one epoch, derived from (seed, epoch) alone: a fresh order each epoch,
    recomputed exactly by a resumed run."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def class_weight_vector(class_weight: dict[int, float], classes: int = 0) -> np.ndarray:
    """Weight by class index, as fit's class_weight: a class not named weighs 1."""
    weights = np.ones(max(max(class_weight) + 1, classes), dtype="float32")
    weights[list(class_weight)] = list(class_weight.values())
    return weights


def class_indices(y, batched: bool):
    """The class of a label (`batched`: of each label of a batch): an integer label as it is,
    a one-hot one by its argmax."""
    import tensorflow as tf

    y = tf.convert_to_tensor(y)
    if y.shape.rank - int(batched) >= 1 and (y.shape[-1] or 0) > 1:
        return tf.argmax(y, axis=-1)
    return tf.cast(tf.reshape(y, [-1] if batched else []), tf.int64)


def several_labels_weighed_by_class(ref: str, labels) -> BadInputError:
    return BadInputError(f"class_weight weighs the labels of a model of one output, and --data "
                         f"{ref} gives several ({type(labels).__name__} labels"
                         f"{f' {sorted(labels)}' if isinstance(labels, dict) else ''}). Weigh "
                         "each example instead (w_train, or (x, y, weight) elements), or drop "
                         "class_weight.")


class ArrayBatches:
    """Batches of in-memory arrays (features an array or a dict of arrays) in each epoch's order,
    each with its examples' weights when there are any (`weights`, or from `class_weight`)."""

    def __init__(self, x, y, seed: int, batch_size: int, weights: np.ndarray | None = None,
                 class_weight: dict[int, float] | None = None, ref: str = ""):
        if class_weight is not None:
            if not isinstance(y, np.ndarray):
                raise several_labels_weighed_by_class(ref, y)
            classes = class_indices(y, batched=True).numpy()
            weights = class_weight_vector(class_weight, int(classes.max()) + 1)[classes]
        self.weighted = weights is not None
        x, y = (tuple(v) if isinstance(v, list) else v for v in (x, y))  # tf.data stacks lists
        self._arrays, self._tensors = (x, y) + ((weights,) if self.weighted else ()), None
        self.seed, self.batch_size, self.count = seed, batch_size, row_count(y)
        self.steps = math.ceil(self.count / batch_size)

    def trackables(self) -> dict:
        return {}

    def resumed_at(self, step: int, replayed: bool) -> dict:
        """What a checkpoint holds of where the batches stand: nothing, (epoch, batch) says it."""
        return {}

    def arrays(self):
        """(x, y) as NumPy arrays, for a loop that slices batches itself (unweighted only)."""
        if self.weighted:
            raise BadInputError("per-example weights train on one device for now. Use "
                                "--strategy default, or drop the weights.")
        return self._arrays

    def iterator(self, epoch: int, batch: int):
        """The batches of `epoch` from `batch` on: (x, y), or (x, y, weights)."""
        import tensorflow as tf

        if self._tensors is None:  # one copy of the data, as tensors; the arrays let go
            self._tensors = tf.nest.map_structure(tf.constant, self._arrays)
            self._arrays = None
        tensors = self._tensors
        rest = epoch_order(self.seed, epoch, self.count)[batch * self.batch_size:]
        indices = tf.data.Dataset.from_tensor_slices(rest).batch(self.batch_size)
        return iter(indices.map(
            lambda idx: tf.nest.map_structure(lambda a: tf.gather(a, idx), tensors)))


class PipelineBatches:
    """A tf.data pipeline, batched by ckptflow, as one iterator over all epochs of
    `ceil(count / batch_size)` batches each (with `class_weight`, each element weighted by its
    label's class). Checkpoints hold the iterator's state, or with `replay` nothing: batch N of
    the run is then the iterator's Nth, found again by skipping N."""

    def __init__(self, train, count: int, batch_size: int, ref: str,
                 class_weight: dict[int, float] | None = None, replay: bool = False):
        import tensorflow as tf

        options = tf.data.Options()
        # A pipeline whose state lives outside TensorFlow (py_function, a Python generator)
        # cannot be restored exactly: refuse to save it rather than save it wrong.
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.FAIL
        if class_weight is not None:
            if len(train.element_spec) == 3:
                raise BadInputError(f"--data {ref} weighs each example ((x, y, weight) "
                                    "elements) and class_weight is given too. Give one of them.")
            if not isinstance(train.element_spec[1], tf.TensorSpec):
                raise several_labels_weighed_by_class(ref, train.element_spec[1])
            vector = tf.constant(class_weight_vector(class_weight))
            train = train.map(
                lambda x, y: (x, y, tf.gather(vector, class_indices(y, batched=False))))
        self.steps, self.replay, self.ref = math.ceil(count / batch_size), replay, ref
        self._batches = train.batch(batch_size).repeat().with_options(options)
        self._skip, self._iterator = 0, None

    def trackables(self) -> dict:
        """What this run's checkpoints hold of the pipeline."""
        return {} if self.replay else {"data": self.iterator(0, 0)}

    def resumed_at(self, step: int, replayed: bool) -> dict:
        """What a checkpoint at `step` holds of the pipeline: its iterator, to restore; or, saved
        `replayed`, nothing: the iterator then stands at `step` by skipping the batches before
        it. Before the iterator is made: each new iterator of a shuffled pipeline draws a new
        order."""
        if self._iterator is not None:
            raise RuntimeError("resumed_at after the iterator was made")
        if replayed:
            self._skip = step
            return {}
        return {"data": self.iterator(0, 0)}

    def iterator(self, epoch: int, batch: int):
        """The run's one iterator (where it stands is in its own state), made on first use."""
        if self._iterator is None:
            self._iterator = iter(self._batches.skip(self._skip) if self._skip else self._batches)
            if not self.replay:
                _check_checkpointable(self._iterator, self.ref)
        return self._iterator


def _check_checkpointable(iterator, ref: str) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="ckptflow-probe-") as scratch:
        try:
            tf.train.Checkpoint(data=iterator).write(f"{scratch}/probe")
        except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError) as exc:
            raise BadInputError(
                f"--data {ref}: the training pipeline cannot be checkpointed, so a resume could "
                f"not continue it exactly ({first_line(exc)}). Replace py_function, "
                "from_generator and other Python state with TensorFlow ops, or return NumPy "
                "arrays (x_train, y_train, x_test, y_test) instead.") from exc
