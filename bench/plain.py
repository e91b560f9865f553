"""The tutorial in plain Keras 3, as the honest baseline for ckptflow's benchmarks.

The same steps as *Save and load models*, with nothing of ckptflow: load MNIST-shaped data, take
the first N images, flatten and scale; Dense(units, relu) → Dropout(0.2) → Dense(10), Adam,
sparse cross-entropy from logits; save the untrained weights, then `fit` with
`ModelCheckpoint(save_weights_only=True)` every epoch; evaluate; save the model the ways the
tutorial does (weights, SavedModel, HDF5, plus Keras 3's native `.keras`) and load each back and
evaluate it, as the tutorial does. It prints one JSON line of timings for bench/overhead.py.

Usage:
    python bench/plain.py --data train.npz --out /tmp/plain                 # tutorial settings
    python bench/plain.py --data train.npz --train-samples 60000 --no-checkpoints --no-export
    python bench/plain.py --data train.npz --backup-dir /tmp/b --report-steps  # BackupAndRestore
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the imports: they are part of what a user waits for

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def since_start() -> float:
    return round(time.perf_counter() - STARTED, 4)


def load(path: str, train_samples: int, test_samples: int):
    """The tutorial's data step, on an .npz laid out like Keras' mnist.npz."""
    import numpy as np

    with np.load(path) as npz:
        x_train, y_train = npz["x_train"][:train_samples], npz["y_train"][:train_samples]
        x_test, y_test = npz["x_test"][:test_samples], npz["y_test"][:test_samples]
    return ((x_train.reshape(-1, 784) / 255.0).astype("float32"), y_train,
            (x_test.reshape(-1, 784) / 255.0).astype("float32"), y_test)


def create_model(units: int):
    """The tutorial's `create_model()` in Keras 3 spelling."""
    import keras

    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(units, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy()])
    return model


def step_reporter():
    """Prints `start STEP` when training begins (after BackupAndRestore restored, if any) and
    `step N T` after every batch, for the work-lost measurement."""
    import keras

    class Report(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            print(f"start {int(self.model.optimizer.iterations)}", flush=True)

        def on_train_batch_end(self, batch, logs=None):
            print(f"step {int(self.model.optimizer.iterations)} {time.time()}", flush=True)

    return Report()


def first_step_timer(timings: dict):
    """Records the seconds from process start to the end of the first training step."""
    import keras

    class FirstStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if "first_step" not in timings:
                timings["first_step"] = since_start()
                timings["first_step_wall"] = time.time()

    return FirstStep()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help=".npz with x_train, y_train, x_test, y_test")
    parser.add_argument("--out", type=Path, default=Path("plain-out"), help="where files go")
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--checkpoints", action=argparse.BooleanOptionalAction, default=True,
                        help="ModelCheckpoint(save_weights_only=True) every epoch")
    parser.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                        help="the tutorial's saves after training, each loaded back")
    parser.add_argument("--backup-dir", type=Path, help="add keras.callbacks.BackupAndRestore")
    parser.add_argument("--report-steps", action="store_true", help="print every step")
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    timings: dict = {"import": since_start()}
    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_test, y_test = load(args.data, args.train_samples, args.test_samples)
    for sub in ("training", "checkpoints"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    model = create_model(args.units)
    callbacks = [first_step_timer(timings)]
    if args.backup_dir:
        callbacks.insert(0, keras.callbacks.BackupAndRestore(str(args.backup_dir)))
    if args.report_steps:
        callbacks.append(step_reporter())
    if args.checkpoints:
        model.save_weights(args.out / "training" / "cp-0000.weights.h5")
        callbacks.append(keras.callbacks.ModelCheckpoint(
            str(args.out / "training" / "cp-{epoch:04d}.weights.h5"), save_weights_only=True))
    timings["setup"] = since_start()
    fit_started = time.perf_counter()
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
              validation_data=(x_test, y_test), callbacks=callbacks, verbose=0)
    timings["fit_s"] = round(time.perf_counter() - fit_started, 4)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    timings["test_accuracy"] = float(accuracy)
    if args.export:
        export_started = time.perf_counter()
        out = args.out
        model.save_weights(out / "checkpoints" / "my_checkpoint.weights.h5")
        model.export(str(out / "saved_model" / "my_model"), format="tf_saved_model", verbose=0)
        model.save(out / "my_model.h5")
        model.save(out / "my_model.keras")
        restored = create_model(args.units)
        restored.load_weights(out / "checkpoints" / "my_checkpoint.weights.h5")
        restored.evaluate(x_test, y_test, verbose=0)
        serving = tf.saved_model.load(str(out / "saved_model" / "my_model"))
        serving.serve(tf.constant(x_test))
        for name in ("my_model.h5", "my_model.keras"):
            keras.models.load_model(out / name).evaluate(x_test, y_test, verbose=0)
        timings["export_s"] = round(time.perf_counter() - export_started, 4)
    timings["total"] = since_start()
    print("result " + json.dumps(timings), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
