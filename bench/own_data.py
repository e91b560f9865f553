"""What a user's tf.data pipeline costs under ckptflow, and what its iterator checkpoint weighs.

Experiments (each measurement a fresh process; the variants of a comparison interleaved A B A B,
so this shared 2-core machine's noise hits both alike; wall and CPU seconds of training alone,
TensorFlow's import and the data set-up excluded):

    fit      examples/digits_cnn for `--epochs` epochs: ckptflow's training stage (mid-epoch
             checkpoints every 16 batches holding the pipeline's iterator, and epoch-end ones)
             against plain `model.fit(ds.batch(B))` with `ModelCheckpoint` every epoch.
    iterator the iterator checkpoint of a shuffled pipeline of 8x8 float images against the
             shuffle buffer's size: bytes of the TF checkpoint and seconds to write it (median
             of 5), next to buffer x element bytes.

Usage:
    python bench/own_data.py                  # both; bench/results/own_data.json and .md
    python bench/own_data.py --rounds 5 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
EXAMPLE = REPO / "examples" / "digits_cnn"
BATCH = 64


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_ckptflow(work: Path, epochs: int) -> dict:
    """ckptflow's training stage on the example (prepared first, not timed)."""
    from ckptflow.config import TrainConfig
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.training.stage import train_with_checkpoints

    config = TrainConfig(run_dir=str(work / "run"), model=f"{EXAMPLE / 'model.py'}:build",
                         data=f"{EXAMPLE / 'data.py'}:load", batch_size=BATCH, epochs=epochs)
    data = prepare_run(config)
    wall, cpu = time.perf_counter(), _cpu()
    train_with_checkpoints(config.run_dir, config, data)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": _cpu() - cpu}


def child_plain(work: Path, epochs: int) -> dict:
    """The same model and pipeline, as a user writes it without ckptflow."""
    import importlib.util

    import keras

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    keras.utils.set_random_seed(42)
    data = load("data").load()
    model = load("model").build()
    checkpoint = keras.callbacks.ModelCheckpoint(str(work / "cp-{epoch:04d}.keras"))
    wall, cpu = time.perf_counter(), _cpu()
    model.fit(data["train"].batch(BATCH), epochs=epochs, verbose=0, callbacks=[checkpoint],
              validation_data=data["test"].batch(256))  # ckptflow validates every epoch too
    return {"wall_s": time.perf_counter() - wall, "cpu_s": _cpu() - cpu}


def child_iterator(work: Path, buffer: int) -> dict:
    """Bytes and write seconds of a shuffled pipeline's iterator checkpoint after 4 batches."""
    import numpy as np
    import tensorflow as tf

    images = np.random.default_rng(0).random((max(2 * buffer, 4096), 8, 8, 1), dtype=np.float32)
    labels = np.arange(len(images)) % 10
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(buffer, seed=1)
    iterator = iter(ds.batch(BATCH).repeat())
    for _ in range(4):
        next(iterator)
    times, size = [], 0
    for i in range(5):
        prefix = work / f"it-{i}" / "ckpt"
        started = time.perf_counter()
        tf.train.Checkpoint(data=iterator).write(str(prefix))
        times.append(time.perf_counter() - started)
        size = sum(p.stat().st_size for p in prefix.parent.iterdir())
    element = images[0].nbytes + labels[:1].nbytes
    return {"buffer": buffer, "element_bytes": int(element), "buffer_bytes": buffer * element,
            "checkpoint_bytes": size, "write_s": statistics.median(times)}


def _run_child(kind: str, *args) -> dict:
    with tempfile.TemporaryDirectory(prefix="ckptflow-bench-") as work:
        result = subprocess.run([sys.executable, __file__, "--child", kind, work, *map(str, args)],
                                capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def fit_experiment(rounds: int, epochs: int) -> dict:
    runs = {"ckptflow": [], "plain": []}
    for _ in range(rounds):
        for kind in ("ckptflow", "plain"):
            runs[kind].append(_run_child(kind, epochs))
            print(f"  {kind}: {runs[kind][-1]}", flush=True)
    out = {"epochs": epochs, "batch_size": BATCH, "rounds": rounds, "runs": runs}
    for measure in ("wall_s", "cpu_s"):
        medians = {k: statistics.median(r[measure] for r in v) for k, v in runs.items()}
        out[f"{measure}_median"] = medians
        out[f"{measure}_ratio"] = round(medians["ckptflow"] / medians["plain"], 3)
        out[f"{measure}_pair_ratios"] = [round(a[measure] / b[measure], 3)
                                         for a, b in zip(runs["ckptflow"], runs["plain"], strict=True)]
    return out


def markdown(report: dict) -> str:
    fit = report["fit"]
    lines = ["# A tf.data pipeline under ckptflow (bench/own_data.py)", "",
             f"examples/digits_cnn, {fit['epochs']} epochs, batch {fit['batch_size']}, "
             f"{fit['rounds']} interleaved rounds; training alone.", "",
             "| | ckptflow (median) | plain fit + ModelCheckpoint (median) | ratio | pair ratios |",
             "|---|---:|---:|---:|---|"]
    for measure, name in (("wall_s", "wall s"), ("cpu_s", "CPU s")):
        m = fit[f"{measure}_median"]
        lines.append(f"| {name} | {m['ckptflow']:.2f} | {m['plain']:.2f} | "
                     f"{fit[f'{measure}_ratio']:.2f} | {fit[f'{measure}_pair_ratios']} |")
    lines += ["", "| shuffle buffer | buffer bytes | iterator checkpoint bytes | ratio | write s |",
              "|---:|---:|---:|---:|---:|"]
    for row in report["iterator"]:
        lines.append(f"| {row['buffer']:,} | {row['buffer_bytes']:,} | {row['checkpoint_bytes']:,} "
                     f"| {row['checkpoint_bytes'] / row['buffer_bytes']:.2f} | {row['write_s']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--buffers", default="256,1024,4096,16384")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, work, *rest = args.child
        child = {"ckptflow": child_ckptflow, "plain": child_plain, "iterator": child_iterator}[kind]
        print(json.dumps(child(Path(work), *map(int, rest))))
        return 0
    report = {"fit": fit_experiment(args.rounds, args.epochs),
              "iterator": [_run_child("iterator", b) for b in map(int, args.buffers.split(","))]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "own_data.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "own_data.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
