"""What checkpoints cost training, by model size (issue 16), against the floor and the disk.

For each size of the tutorial MLP (hidden units 512, 8192, 65536: about 0.4M, 6.5M and 51M
parameters), each round runs, in fresh processes and interleaved (A B C D A B C D ...):

    every8      ckptflow's training stage, a checkpoint every 8 batches (no time budget)
    epoch_end   the same, checkpoints at epoch ends only
    every8_sync every 8 batches, written while training waits (--no-background-checkpoints:
                what every save cost before background commits)
    every8_budget every 8 batches as the default time budget (0.02) allows: a save due while
                the previous commit is still being written is put off
    plain       `fit` with the tutorial's ModelCheckpoint (weights at each epoch end)

Each process reports the wall and CPU seconds of its training loop (for ckptflow the loop after
the run is set up, as the manifest records it, so that it compares with `fit`; `stage_s` is the
whole training stage) and what its manifest recorded (seconds training waited on checkpoints,
checkpoints committed and put off, bytes written). The `every8` process then
measures, on its final model, the floor and the physical limit in the same process:

    copy_s      copying the whole resume state (weights + optimizer) into preallocated memory
    capture_s   one `CheckpointStore.capture` (what training waits for, with no commit in flight)
    commit_s    one `CheckpointStore.commit` of that capture (write, hash, fsync, publish)
    disk_s      writing as many bytes to the same disk with one fsync (sequential bandwidth)
    state_bytes the state's bytes; mid_bytes, the bytes of one mid-epoch checkpoint

Data is synthetic and MNIST-shaped (seeded); nothing is downloaded.

Usage:
    python bench/checkpoint_cost.py                    # 5 rounds (~40 min): bench/results/checkpoint_cost.*
    python bench/checkpoint_cost.py --rounds 1 --sizes 512 --name smoke   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from overhead import synthetic_mnist  # bench/, beside this script

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
VARIANTS = ("every8", "epoch_end", "every8_sync", "every8_budget", "plain")
# Hidden units -> training images, so that each run trains for roughly 10-20 s here.
SIZES = {512: 8192, 8192: 4000, 65536: 1024}
BATCH, EPOCHS, TEST = 64, 2, 512

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_ckptflow(args) -> dict:
    from ckptflow.config import TrainConfig
    from ckptflow.core.manifest import read_manifest
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.training.stage import train_with_checkpoints

    config = TrainConfig(
        run_dir=args.run_dir, data=args.data, train_samples=SIZES[args.units], test_samples=TEST,
        units=args.units, batch_size=BATCH, epochs=EPOCHS,
        checkpoint_budget=0.02 if args.variant == "every8_budget" else 0.0,
        save_every_batches=0 if args.variant == "epoch_end" else 8,
        background_checkpoints=args.variant != "every8_sync", formats=["keras"])
    data = prepare_run(config)
    wall, cpu = time.perf_counter(), _cpu()
    record = train_with_checkpoints(config.run_dir, config, data)
    costs = read_manifest(config.run_dir)["training"]["attempts"][-1]["checkpoints"]
    result = {"stage_s": time.perf_counter() - wall, "train_s": costs["training_seconds"],
              "cpu_s": _cpu() - cpu, **costs}  # CPU: of the whole stage
    if args.variant == "every8":
        result.update(floor_and_limit(config.run_dir, record.checkpoint))
    return result


def floor_and_limit(run_dir: str, checkpoint: str) -> dict:
    """The in-memory copy (the floor), one capture, one commit, and the disk's bandwidth."""
    import numpy as np

    from ckptflow.core.checkpoints import CheckpointStore
    from ckptflow.core.files import size_of
    from ckptflow.core.restore import restore_model

    model = restore_model(run_dir, checkpoint)
    state = [v.numpy() for v in [*model.variables, *model.optimizer.variables]]
    copies = [np.empty_like(a) for a in state]

    def copy():
        for target, source in zip(copies, state, strict=True):
            np.copyto(target, source)

    store = CheckpointStore(Path(run_dir) / "bench-checkpoints")
    mid = {"epoch": 0, "batch": 1, "step": 1, "history": []}
    copy_s = _median_of(5, copy)
    capture_s = _median_of(5, lambda: store.capture(model, mid, epoch_end=False,
                                                    extra={"metrics": model.metrics_variables}))
    capture = store.capture(model, mid, epoch_end=False, extra={"metrics": model.metrics_variables})
    started = time.perf_counter()
    committed = store.commit(capture)
    commit_s = time.perf_counter() - started
    mid_bytes = size_of(committed.path)
    block = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    target = Path(run_dir) / "bench-disk"
    started = time.perf_counter()
    with open(target, "wb") as f:
        for _ in range(-(-mid_bytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    disk_s = (time.perf_counter() - started) * mid_bytes / target.stat().st_size
    target.unlink()
    return {"copy_s": copy_s, "capture_s": capture_s, "commit_s": commit_s, "disk_s": disk_s,
            "state_bytes": sum(a.nbytes for a in state), "mid_bytes": mid_bytes,
            "parameters": int(model.count_params())}


def _median_of(n: int, function) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def child_plain(args) -> dict:
    """`fit` with the tutorial's ModelCheckpoint: the weights at every epoch end."""
    import keras
    import numpy as np

    from ckptflow.tutorial.model import create_model

    with np.load(args.data) as npz:
        n = SIZES[args.units]
        x = npz["x_train"][:n].reshape(n, 784).astype("float32") / 255
        y, x_test = npz["y_train"][:n], npz["x_test"].reshape(-1, 784).astype("float32") / 255
        y_test = npz["y_test"]
    model = create_model(units=args.units, seed=42)
    callback = keras.callbacks.ModelCheckpoint(
        os.path.join(args.run_dir, "cp-{epoch:04d}.weights.h5"), save_weights_only=True)
    os.makedirs(args.run_dir, exist_ok=True)
    wall, cpu = time.perf_counter(), _cpu()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, validation_data=(x_test, y_test),
              callbacks=[callback], verbose=0)
    return {"train_s": time.perf_counter() - wall, "cpu_s": _cpu() - cpu}


def run_child(variant: str, units: int, data: Path, work: Path, round_: int) -> dict:
    run_dir = work / f"{variant}-{units}-{round_}"
    command = [sys.executable, __file__, "--child", variant, "--units", str(units), "--data",
               str(data), "--run-dir", str(run_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{variant} {units} failed: {done.stderr[-2000:]}")
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    return {"variant": variant, "units": units, "round": round_, "load": os.getloadavg()[0],
            **json.loads(line[len("RESULT "):])}


def summarize(rows: list[dict]) -> list[dict]:
    """Per size: medians, the ratios the issue's targets name, and pair-by-pair ratios."""
    out = []
    for units in sorted({r["units"] for r in rows}):
        of = {v: [r for r in rows if r["units"] == units and r["variant"] == v] for v in VARIANTS}

        def med(variant, key, of=of):
            return statistics.median(r[key] for r in of[variant])

        def pairs(a, b, key, of=of):
            return [round(x[key] / y[key], 3) for x, y in zip(of[a], of[b], strict=True)]

        every8 = of["every8"]
        per_checkpoint = [r["waited_seconds"] / r["committed"] for r in every8]
        out.append({
            "units": units, "parameters": every8[0]["parameters"], "rounds": len(every8),
            **{f"{v}_train_s": round(med(v, "train_s"), 3) for v in VARIANTS},
            **{f"{v}_cpu_s": round(med(v, "cpu_s"), 3) for v in VARIANTS},
            "every8_vs_epoch_end": round(med("every8", "train_s") / med("epoch_end", "train_s"), 3),
            "every8_vs_epoch_end_pairs": pairs("every8", "epoch_end", "train_s"),
            "every8_vs_epoch_end_cpu": round(med("every8", "cpu_s") / med("epoch_end", "cpu_s"), 3),
            "sync_vs_epoch_end": round(med("every8_sync", "train_s") / med("epoch_end", "train_s"), 3),
            "budget_vs_epoch_end": round(med("every8_budget", "train_s")
                                         / med("epoch_end", "train_s"), 3),
            "budget_checkpoints": statistics.median(r["committed"] for r in of["every8_budget"]),
            "budget_deferred": statistics.median(r["deferred"] for r in of["every8_budget"]),
            "every8_vs_plain": round(med("every8", "train_s") / med("plain", "train_s"), 3),
            "epoch_end_vs_plain": round(med("epoch_end", "train_s") / med("plain", "train_s"), 3),
            "checkpoints": every8[0]["committed"],
            "waited_share": round(statistics.median(r["cost"] for r in every8), 4),
            "sync_waited_share": round(statistics.median(r["cost"] for r in of["every8_sync"]), 4),
            "stall_per_checkpoint_s": round(statistics.median(per_checkpoint), 4),
            "capture_s": round(med("every8", "capture_s"), 4),
            "copy_s": round(med("every8", "copy_s"), 4),
            "stall_target_s": round(2 * med("every8", "copy_s") + 0.010, 4),
            "commit_s": round(med("every8", "commit_s"), 4),
            "disk_s": round(med("every8", "disk_s"), 4),
            "commit_vs_disk": round(med("every8", "commit_s") / med("every8", "disk_s"), 2),
            "state_mb": round(every8[0]["state_bytes"] / 1e6, 2),
            "mid_checkpoint_vs_state": round(every8[0]["mid_bytes"] / every8[0]["state_bytes"], 3),
        })
    return out


def markdown(summary: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}. Medians over the rounds; the training loop, 2 epochs, batch "
             f"{BATCH}; checkpoints: those of `every8` (epoch ends included).", "",
             "| parameters | every 8 / epoch ends (pairs) | stage CPU | sync every 8 / epoch ends | "
             "every 8 with the budget / epoch ends (checkpoints, put off) | every 8 / plain fit | "
             "epoch ends / plain fit | training waited | stall per checkpoint | capture | "
             "in-memory copy | commit / disk | mid-epoch checkpoint / state |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(
            f"| {s['parameters'] / 1e6:.1f}M ({s['state_mb']:.0f} MB state) | "
            f"{s['every8_vs_epoch_end']:.3f}x ({', '.join(map(str, s['every8_vs_epoch_end_pairs']))}) | "
            f"{s['every8_vs_epoch_end_cpu']:.3f}x | {s['sync_vs_epoch_end']:.3f}x | "
            f"{s['budget_vs_epoch_end']:.3f}x ({s['budget_checkpoints']:g}, "
            f"{s['budget_deferred']:g}) | {s['every8_vs_plain']:.3f}x | "
            f"{s['epoch_end_vs_plain']:.3f}x | "
            f"{s['waited_share']:.1%} (sync {s['sync_waited_share']:.1%}) | "
            f"{s['stall_per_checkpoint_s'] * 1e3:.1f} ms (target {s['stall_target_s'] * 1e3:.1f}) | "
            f"{s['capture_s'] * 1e3:.1f} ms | {s['copy_s'] * 1e3:.1f} ms | "
            f"{s['commit_s']:.2f} s / {s['disk_s']:.2f} s ({s['commit_vs_disk']:.2f}x) | "
            f"{s['mid_checkpoint_vs_state']:.3f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="hidden units, comma-separated (known: 512, 8192, 65536)")
    parser.add_argument("--name", default="checkpoint_cost", help="results file stem")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--units", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child_plain(args) if args.child == "plain" else child_ckptflow(
            argparse.Namespace(**{**vars(args), "variant": args.child}))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ckptflow-bench-") as work:
        work = Path(work)
        data = {u: synthetic_mnist(work / f"data-{u}.npz", SIZES[u], TEST) for u in sizes}
        for round_ in range(args.rounds):
            for units in sizes:
                order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))
                for variant in order:
                    rows.append(run_child(variant, units, data[units], work, round_))
                    r = rows[-1]
                    print(f"round {round_ + 1} units {units} {variant}: {r['train_s']:.2f} s, "
                          f"CPU {r['cpu_s']:.2f} s", flush=True)
    summary = summarize(rows)
    machine = f"{os.cpu_count()} cores, {os.uname().machine}, Python {sys.version.split()[0]}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"machine": machine, "summary": summary, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(summary, machine))
    print(markdown(summary, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
