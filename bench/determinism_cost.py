"""What deterministic mode costs: training time with TensorFlow op determinism on vs off.

Op determinism is process-wide and cannot be switched off again, so every measurement is a fresh
process. Pairs run interleaved (on, off, on, off, ...) so that machine noise hits both alike; the
report gives each side's median and min-max and the ratio of medians.

Usage:
    python bench/determinism_cost.py                       # 4,000 images, 3 epochs, 5 pairs
    python bench/determinism_cost.py --pairs 3 --train-samples 1000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def child(deterministic: bool, run_dir: Path, train_samples: int, epochs: int) -> None:
    """Train once (no mid-epoch saves) and print the seconds spent in training alone."""
    sys.path.insert(0, str(REPO))
    from ckptflow.config import TrainConfig
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.training.stage import train_with_checkpoints

    config = TrainConfig(run_dir=str(run_dir), data="bundled", train_samples=train_samples,
                         test_samples=1000, epochs=epochs, save_every_batches=0,
                         deterministic=deterministic)
    data = prepare_run(config)
    started = time.perf_counter()
    train_with_checkpoints(run_dir, config, data)
    print(f"seconds {time.perf_counter() - started:.4f}")


def measure(deterministic: bool, train_samples: int, epochs: int) -> float:
    with tempfile.TemporaryDirectory(prefix="ckptflow-det-") as run_dir:
        out = subprocess.run(
            [sys.executable, __file__, "--child", "on" if deterministic else "off",
             "--run-dir", run_dir, "--train-samples", str(train_samples), "--epochs", str(epochs)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return float(next(line for line in out.stdout.splitlines() if line.startswith("seconds"))
                 .split()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child == "on", args.run_dir, args.train_samples, args.epochs)
        return 0
    times: dict[str, list[float]] = {"on": [], "off": []}
    for pair in range(args.pairs):
        for mode in ("on", "off"):
            times[mode].append(measure(mode == "on", args.train_samples, args.epochs))
        print(f"pair {pair + 1}: on {times['on'][-1]:.2f} s, off {times['off'][-1]:.2f} s",
              flush=True)
    medians = {m: statistics.median(v) for m, v in times.items()}
    report = {
        "train_samples": args.train_samples, "epochs": args.epochs, "pairs": args.pairs,
        "seconds": times, "median_on": medians["on"], "median_off": medians["off"],
        "ratio_on_over_off": medians["on"] / medians["off"],
        "pair_ratios": [a / b for a, b in zip(times["on"], times["off"], strict=True)],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "determinism_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"deterministic: median {medians['on']:.2f} s (min {min(times['on']):.2f}, max "
          f"{max(times['on']):.2f}); non-deterministic: median {medians['off']:.2f} s (min "
          f"{min(times['off']):.2f}, max {max(times['off']):.2f}); ratio "
          f"{report['ratio_on_over_off']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
