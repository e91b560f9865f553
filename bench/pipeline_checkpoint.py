"""What checkpointing costs a shuffled tf.data pipeline: its iterator saved, or replayed.

The pipeline is the one tutorials write (CIFAR-sized uint8 images, `shuffle(8192)` before
`map`), a small CNN, batch 64, 2 epochs, ckptflow's defaults (a save every 16 batches within a
2% time budget, and every epoch end). Each run is a fresh process; the two modes alternate
(iterator, replay, iterator, ...) so the machine's noise hits both. Figures are ckptflow's own
checkpoint summary (the manifest's attempt): the share of training time training waited for
checkpoints, and the saves made. Resume: seconds from a replay-mode checkpoint one epoch in to
its first batch (the replay of that epoch's batches) against the iterator-mode restore of the
same point.

Usage:
    python bench/pipeline_checkpoint.py --rounds 3      # results/pipeline_checkpoint.json
    python bench/pipeline_checkpoint.py --only resume
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
IMAGES = 8192 * 2  # 256 batches an epoch

PROJECT = f'''
import numpy as np
import keras
import tensorflow as tf


def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, ({IMAGES}, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, {IMAGES})
    test = rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 512)

    def scale(image, label):
        return tf.cast(image, tf.float32) / 255.0, label

    train = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(8192).map(scale)
    return {{"train": train, "test": tf.data.Dataset.from_tensor_slices(test).map(scale)}}


def model(seed=0):
    keras.utils.set_random_seed(seed)
    net = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(10)])
    net.compile(optimizer="adam", metrics=["accuracy"],
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return net
'''


def _config(work: Path, mode: str, **overrides):
    from ckptflow.config import TrainConfig

    values = dict(run_dir=str(work / "run"), model=f"{work / 'project.py'}:model",
                  data=f"{work / 'project.py'}:data", batch_size=64, epochs=2,
                  pipeline_resume=mode, formats=["keras"])
    return TrainConfig(**values | overrides)


def child_train(work: Path, mode: str) -> dict:
    """Train both epochs; ckptflow's own summary of what checkpoints cost."""
    from ckptflow.core.manifest import read_manifest
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.training.stage import train_with_checkpoints

    (work / "project.py").write_text(PROJECT)
    config = _config(work, mode)
    data = prepare_run(config)
    started = time.perf_counter()
    train_with_checkpoints(config.run_dir, config, data)
    costs = read_manifest(config.run_dir)["training"]["attempts"][-1]["checkpoints"]
    return {"mode": mode, "stage_s": time.perf_counter() - started, "cost": costs["cost"],
            "waited_s": costs["waited_seconds"], "training_s": costs["training_seconds"],
            "waited_by": costs["waited_by"], "deferred": costs["deferred"],
            "committed": costs["committed"], "bytes_written": costs["bytes_written"]}


def child_resume(work: Path, mode: str) -> dict:
    """Train one epoch, then time a fresh start from its checkpoint to the first batch trained."""
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.training.stage import train_with_checkpoints

    (work / "project.py").write_text(PROJECT)
    config = _config(work, mode, epochs=1, save_every_batches=0)
    data = prepare_run(config)
    train_with_checkpoints(config.run_dir, config, data)
    more = config.model_copy(update={"epochs": 2})
    first: list[float] = []
    started = time.perf_counter()
    try:
        train_with_checkpoints(config.run_dir, more, data, on_batch_end=lambda s: (
            first.append(time.perf_counter()), _stop()))
    except _FirstBatch:
        pass
    return {"mode": mode, "to_first_batch_s": first[0] - started}


class _FirstBatch(Exception):
    pass


def _stop():
    raise _FirstBatch


def _run_child(kind: str, mode: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="ckptflow-bench-") as work:
        result = subprocess.run([sys.executable, __file__, "--child", kind, work, mode],
                                capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} {mode} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each mode (default 3)")
    parser.add_argument("--only", choices=("train", "resume"),
                        help="one experiment (its figures replace those in the JSON)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, work, mode = args.child
        target = child_train if kind == "train" else child_resume
        print(json.dumps(target(Path(work), mode)))
        return 0
    out = RESULTS / "pipeline_checkpoint.json"
    report = json.loads(out.read_text()) if args.only and out.exists() else {}
    report.update({"images": IMAGES, "batch_size": 64, "epochs": 2})
    for kind in ("train", "resume"):
        if args.only not in (None, kind):
            continue
        found = {"iterator": [], "replay": []}
        for _ in range(args.rounds if kind == "train" else 1):
            for mode in found:
                found[mode].append(_run_child(kind, mode))
                print(f"  {kind} {mode}: {found[mode][-1]}", flush=True)
        report[kind] = found
        measure = "cost" if kind == "train" else "to_first_batch_s"
        for mode, runs in found.items():
            report[f"{kind}_{mode}_{measure}_median"] = statistics.median(r[measure] for r in runs)
            if kind == "train":
                report[f"train_{mode}_stage_s_median"] = round(
                    statistics.median(r["stage_s"] for r in runs), 2)
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("train", "resume")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
