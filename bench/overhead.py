"""What reliability costs: ckptflow against the plain Keras tutorial (bench/plain.py).

Every measurement is a fresh process, and the variants of one comparison run interleaved
(A B A B ...), so that the noise of this shared 2-core machine hits both sides alike. The report
gives each variant's median and min-max, the ratio of medians and the ratio pair by pair, and the
load average seen before each run. Data is synthetic and MNIST-shaped (seeded), written to a
temporary .npz that both sides read; nothing is downloaded.

Experiments:
    e2e60k   `ckptflow run` vs the plain script at 60k images and 10 epochs, three rounds.
    e2e      the same at the tutorial's size; the stage functions called directly without
             Prefect; a trivial 3-task Prefect flow (the fixed cost); `ckptflow run` against an
             already running Prefect server (PREFECT_API_URL, up during this experiment only);
             earlier commits' `ckptflow run`. Peak memory of every run.
    train    training alone at 60k images: `fit` without checkpoints, `fit` with ModelCheckpoint,
             ckptflow saving at epoch ends only, ckptflow with its default mid-epoch saves; the
             seconds spent inside checkpoint saves, measured in the process.
    sweep    the same at 1k/10k/60k images and 512/2048 hidden units.
    resume   process start to the first training step: a cold start vs a resume.
    lost     work lost after a SIGKILL: ckptflow vs keras.callbacks.BackupAndRestore.
    warm     tutorial-size `ckptflow run` on the warm server (`ckptflow server start`) against
             the same run with its temporary server and against the plain script, 3 rounds;
             wall and CPU seconds (the CPU of every process the run waited for, its temporary
             server included).

Usage:
    python bench/overhead.py --quick                # smoke run, small sizes (~5 min)
    python bench/overhead.py                        # full run (~45 min); bench/results/overhead.*
    python bench/overhead.py --only train,resume    # re-run some experiments, keep the others
    python bench/overhead.py --only warm --name warm  # the warm server alone (~5 min)
    python bench/overhead.py --only fixed --name fixed  # issue 26's fixed cost, 5 rounds (~8 min)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PLAIN = REPO / "bench" / "plain.py"
BIN = Path(sys.executable).parent
EXPERIMENTS = ("train", "e2e60k", "e2e", "fixed", "resume", "lost", "sweep",
               "warm")  # the order they run in
PAGE = os.sysconf("SC_PAGE_SIZE")
# Earlier code to compare with: before any change this benchmark led to, and before the second
# round (overlapped start-up, fit-based training loop, parallel verify).
BEFORE = {"ckptflow_before": "faa5590", "ckptflow_round1": "f24166d"}

# bench/plain.py's variants: the whole tutorial, a cold start, fit with and without checkpoints.
PLAIN_FLAGS = {"plain": [], "plain_cold": ["--no-checkpoints", "--no-export"],
               "fit_no_checkpoints": ["--no-checkpoints", "--no-export"],
               "fit_checkpoints": ["--no-export"]}
# ckptflow's train stage: epoch-end saves only; the default (every 16 batches within a 2% time
# budget); every 16 batches without a budget (how ckptflow saved before this benchmark).
TRAIN_FLAGS = {"train_epoch_saves": ["--save-every-batches", "0"],
               "train_default_saves": [],
               "train_every16_saves": ["--checkpoint-budget", "0"]}

FULL = {
    "e2e60k": [dict(case="60k", train=60000, test=10000, units=512, epochs=10, rounds=3,
                    variants=["plain", "ckptflow"])],
    "e2e": [dict(case="tutorial", train=1000, test=1000, units=512, epochs=10, rounds=3,
                 variants=["plain", "ckptflow", "trivial_flow", "ckptflow_server"]),
            dict(case="tutorial", train=1000, test=1000, units=512, epochs=10, rounds=1,
                 variants=["stages", "ckptflow_before", "ckptflow_round1"])],
    # issue 26's fixed cost: ckptflow - plain script - trivial flow, 5 interleaved rounds
    "fixed": [dict(case="tutorial", train=1000, test=1000, units=512, epochs=10, rounds=5,
                   variants=["plain", "trivial_flow", "ckptflow"])],
    "train": dict(train=60000, test=10000, units=512, epochs=1, rounds=1),
    "sweep": dict(sizes=[1000, 10000, 60000], units=[512, 2048], epochs=1, rounds=1),
    "resume": dict(train=60000, test=10000, units=512, rounds=2),
    "lost": dict(train=30000, test=1000, units=512, epochs=3, kills=3, max_delay=8.0),
    "warm": [dict(case="tutorial", train=1000, test=1000, units=512, epochs=10, rounds=3,
                  variants=["plain", "ckptflow", "ckptflow_warm"])],
}
QUICK = {
    "e2e60k": [dict(case="4k", train=4000, test=1000, units=512, epochs=2, rounds=1,
                    variants=["plain", "ckptflow"])],
    "e2e": [dict(case="tutorial", train=1000, test=1000, units=512, epochs=2, rounds=1,
                 variants=["plain", "ckptflow", "stages", "trivial_flow", "ckptflow_server"])],
    "fixed": [dict(case="tutorial", train=1000, test=1000, units=512, epochs=2, rounds=1,
                   variants=["plain", "trivial_flow", "ckptflow"])],
    "train": dict(train=4000, test=1000, units=512, epochs=1, rounds=1),
    "sweep": dict(sizes=[1000, 4000], units=[512], epochs=1, rounds=1),
    "resume": dict(train=4000, test=1000, units=512, rounds=1),
    "lost": dict(train=4000, test=1000, units=512, epochs=2, kills=1, max_delay=3.0),
    "warm": [dict(case="tutorial", train=1000, test=1000, units=512, epochs=2, rounds=1,
                  variants=["plain", "ckptflow", "ckptflow_warm"])],
}


# --- children: what runs inside the measured processes ------------------------------------------

def _child_config(args, run_dir: Path, **overrides):
    sys.path.insert(0, str(REPO))
    from ckptflow.config import TrainConfig

    values = dict(run_dir=str(run_dir), data=args.data, train_samples=args.train_samples,
                  test_samples=args.test_samples, units=args.units, epochs=args.epochs)
    if args.save_every_batches is not None:
        values["save_every_batches"] = args.save_every_batches
    if args.checkpoint_budget is not None:
        values["checkpoint_budget"] = args.checkpoint_budget
    return TrainConfig(**{**values, **overrides})


def child_stages(args) -> dict:
    """The pipeline's stage functions in the flow's order, called directly: no Prefect."""
    config = _child_config(args, args.run_dir)
    from ckptflow.core.resume_point import find_resume_point
    from ckptflow.stages.evaluate import evaluate
    from ckptflow.stages.export import export_each_format
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.stages.report import write_report
    from ckptflow.stages.verify import verify_run_dir
    from ckptflow.training.stage import train_with_checkpoints

    data = prepare_run(config)
    find_resume_point(config.run_dir, config.identity(), data.data_sha256)
    trained = train_with_checkpoints(config.run_dir, config, data)
    evaluate(config.run_dir, data, trained.checkpoint_ref())
    export_each_format(config.run_dir, data, trained.checkpoint_ref(), config.formats)
    write_report(config.run_dir)
    rows = verify_run_dir(config.run_dir)
    if not all(r.ok for r in rows):
        raise RuntimeError("verify failed")
    return {}


def child_train(args) -> dict:
    """fetch-data, build-model and train-with-checkpoints; what training waited on checkpoints.

    With --exit-after-first-step it stops at the first trained batch (resume latency); with
    --report-steps it prints `start STEP` and `step N TIME` lines (work lost after a kill).
    """
    config = _child_config(args, args.run_dir)
    from ckptflow.core.manifest import read_manifest
    from ckptflow.core.resume_point import find_resume_point
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.training.stage import train_with_checkpoints

    data = prepare_run(config)
    if args.report_steps:
        point = find_resume_point(config.run_dir, config.identity(), data.data_sha256)
        print(f"start {point.step if point else 0}", flush=True)

    def on_batch_end(state):
        if args.exit_after_first_step:
            print(f"result {json.dumps({'first_step_wall': time.time()})}", flush=True)
            os._exit(0)
        if args.report_steps:
            print(f"step {state.step} {time.time()}", flush=True)

    started = time.perf_counter()
    train_with_checkpoints(config.run_dir, config, data, on_batch_end=on_batch_end)
    train_s = time.perf_counter() - started
    # what training waited on checkpoints (with background commits, not the writes themselves)
    costs = read_manifest(config.run_dir)["training"]["attempts"][-1]["checkpoints"]
    return {"train_s": round(train_s, 4), "save_s": costs["waited_seconds"],
            "saves": costs["committed"]}


def child_trivial_flow(args) -> dict:
    """Three tasks that do nothing, in one flow: what any Prefect flow run costs here."""
    from prefect import flow, task

    @task
    def one() -> int:
        return 1

    @task
    def two(x: int) -> int:
        return x + 1

    @task
    def three(x: int) -> int:
        return x + 1

    @flow
    def trivial() -> int:
        return three(two(one()))

    trivial()
    return {}


CHILDREN = {"stages": child_stages, "train": child_train, "trivial_flow": child_trivial_flow}


# --- measuring one process ----------------------------------------------------------------------

def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def measure(cmd: list[str], env: dict, log_path: Path, timeout: float = 3600) -> dict:
    """Run `cmd` to the end; wall seconds, CPU seconds (user + system, of the process and of
    every descendant it waited for), peak RSS (largest process, and the whole process tree
    sampled from /proc every 0.25 s), the load average before it, and its `result` line."""
    load = os.getloadavg()[0]
    started_wall = time.time()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        tree_peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree_peak = max(tree_peak, _tree_rss(proc.pid))
            if time.perf_counter() - started > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.25)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(ProcessLookupError):  # e.g. a Prefect server left behind
        os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-3000:]}")
    result = {}
    for line in text.splitlines():
        if line.startswith("result "):
            result.update(json.loads(line[len("result "):]))
    if "first_step_wall" in result:
        result["first_step_s"] = round(result.pop("first_step_wall") - started_wall, 4)
    return {"wall_s": round(wall, 4), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "maxrss_mb": round(usage.ru_maxrss / 1024, 1),
            "tree_peak_mb": round(tree_peak / 2**20, 1), "load": round(load, 2), **result}


# --- the harness --------------------------------------------------------------------------------

def synthetic_mnist(path: Path, n_train: int, n_test: int) -> Path:
    """Write a seeded MNIST-shaped .npz (uint8 28x28 images, 10 separable classes) to `path`,
    laid out like Keras' mnist.npz; nothing is downloaded."""
    import numpy as np

    rng = np.random.default_rng(0)
    templates = rng.random((10, 784))

    def split(n):
        y = rng.integers(0, 10, n)
        x = np.clip(templates[y] * 160 + rng.normal(0, 60, (n, 784)), 0, 255)
        return x.astype(np.uint8).reshape(n, 28, 28), y.astype(np.uint8)

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


class Bench:
    """Commands, environment and scratch space shared by the experiments."""

    def __init__(self, work: Path):
        self.work = work
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    # the first run in a fresh PREFECT_HOME migrates its database (~30 s)
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                    "PREFECT_HOME": str(work / "prefect_home"),
                    "KERAS_HOME": str(work / "keras_home")}
        self.env.pop("PREFECT_API_URL", None)
        self.server_env: dict | None = None
        self.server: subprocess.Popen | None = None
        # `ckptflow server start` records its server in PREFECT_HOME: the warm variant has a
        # PREFECT_HOME of its own, so that the temporary-server variant never finds it
        self.warm_env = {**self.env, "PREFECT_HOME": str(work / "warm_home")}
        self.warm_server_up = False
        self.warm = False
        self.rows: list[dict] = []
        self.count = 0

    def data(self, n_train: int) -> Path:
        """A seeded synthetic MNIST-shaped .npz (uint8 28x28 images, 10 separable classes)."""
        path = self.work / f"synthetic-{n_train}.npz"
        if not path.exists():
            synthetic_mnist(path, n_train, n_test=10000)
        return path

    def before(self, variant: str) -> Path:
        """A copy of the code at BEFORE[variant], which PYTHONPATH puts ahead of the checkout."""
        path = self.work / variant
        if not path.exists():
            path.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE[variant]],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
        return path

    def scratch(self, name: str) -> Path:
        self.count += 1
        path = self.work / f"{self.count:04d}-{name}"
        path.mkdir(parents=True)
        return path

    def command(self, variant: str, run_dir: Path, p: dict, **extra) -> list[str]:
        data = str(self.data(p["train"]))
        sizes = ["--train-samples", str(p["train"]), "--test-samples", str(p["test"]),
                 "--units", str(p["units"]), "--epochs", str(p.get("epochs", 1))]
        if variant in PLAIN_FLAGS:
            return [sys.executable, str(PLAIN), "--data", data, "--out", str(run_dir), *sizes,
                    *PLAIN_FLAGS[variant], *extra.get("plain_args", [])]
        if variant in ("ckptflow", "ckptflow_server", "ckptflow_warm"):
            return [str(BIN / "ckptflow"), "run", "--run-dir", str(run_dir), "--data", data, *sizes]
        if variant in BEFORE:  # the CLI of an earlier commit; -P: PYTHONPATH's copy, not cwd's
            return [sys.executable, "-P", "-m", "flows.cli", "run", "--run-dir", str(run_dir),
                    "--data", data, *sizes]
        kind = variant if variant in ("stages", "trivial_flow") else "train"
        return [sys.executable, str(Path(__file__)), "--child", kind, "--run-dir", str(run_dir),
                "--data", data, *sizes, *TRAIN_FLAGS.get(variant, []),
                *extra.get("child_args", [])]

    def run(self, experiment: str, case: str, variant: str, round_: int, p: dict,
            run_dir: Path | None = None, **extra) -> dict:
        run_dir = run_dir or self.scratch(variant)
        env = {"ckptflow_server": self.server_env, "ckptflow_warm": self.warm_env}.get(variant,
                                                                                       self.env)
        if variant in BEFORE:
            env = {**env, "PYTHONPATH": str(self.before(variant))}
        cmd = self.command(variant, run_dir, p, **extra)
        row = {"experiment": experiment, "case": case, "variant": variant, "round": round_,
               "train_samples": p["train"], "units": p["units"], "epochs": p.get("epochs", 1),
               **measure(cmd, env, self.work / f"{self.count:04d}-{variant}.log")}
        if "fit_s" in row:  # plain.py's training seconds, under the name ckptflow's child uses
            row["train_s"] = row["fit_s"]
        self.rows.append(row)
        print(f"  {experiment:<6} {case:<10} {variant:<22} round {round_}: "
              f"{row['wall_s']:7.2f} s  rss {row['maxrss_mb']:6.0f} MB  tree "
              f"{row['tree_peak_mb']:6.0f} MB  load {row['load']:.2f}  "
              f"{ {k: v for k, v in row.items() if k in ('train_s', 'save_s', 'fit_s', 'first_step_s')} }",
              flush=True)
        return row

    def start_server(self) -> None:
        """A Prefect server on a free port (SQLite in the scratch PREFECT_HOME)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=open(self.work / "server.log", "w"), stderr=subprocess.STDOUT,
            env={**self.env, "PREFECT_HOME": str(self.work / "server_home")},
            start_new_session=True)
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                self.server_env = {**self.env, "PREFECT_API_URL": url}
                return
            time.sleep(1)
        raise RuntimeError("Prefect server did not start; see server.log")

    def stop_server(self) -> None:
        if self.server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, signal.SIGTERM)
            self.server.wait(30)
            self.server = None
        if self.warm_server_up:
            subprocess.run([str(BIN / "ckptflow"), "server", "stop"], env=self.warm_env,
                           capture_output=True, timeout=60)
            self.warm_server_up = False

    def start_warm_server(self) -> None:
        """`ckptflow server start` on a free port, in the warm variant's PREFECT_HOME."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.warm_server_up = True  # from here on stop_server stops it, whatever happens
        started = subprocess.run([str(BIN / "ckptflow"), "server", "start", "--port", str(port)],
                                 env=self.warm_env, capture_output=True, text=True, timeout=300)
        if started.returncode != 0:
            raise RuntimeError(f"ckptflow server start failed: {started.stderr[-2000:]}")


def exp_e2e(bench: Bench, cases: list[dict], experiment: str = "e2e") -> None:
    """Whole runs: ckptflow (temporary Prefect server, or a running one) vs the plain script.

    The Prefect server the `ckptflow_server` variant needs runs only during these cases.
    """
    if not bench.warm:  # the first run in a fresh PREFECT_HOME migrates its database
        bench.run("warmup", "-", "trivial_flow", 0, {"train": 1000, "test": 1000, "units": 512})
        bench.warm = True
    if any("ckptflow_server" in p["variants"] for p in cases):
        bench.start_server()
    try:
        for p in cases:
            for round_ in range(p["rounds"]):
                for variant in p["variants"]:
                    bench.run(experiment, p["case"], variant, round_, p)
    finally:
        bench.stop_server()


def exp_warm(bench: Bench, cases: list[dict]) -> None:
    """Whole tutorial-size runs: on the warm server, with a temporary server, the plain script."""
    if not bench.warm:  # the first run in a fresh PREFECT_HOME migrates its database
        bench.run("warmup", "-", "trivial_flow", 0, {"train": 1000, "test": 1000, "units": 512})
        bench.warm = True
    bench.start_warm_server()  # migrates the warm variant's own database before any round
    try:
        for p in cases:
            for round_ in range(p["rounds"]):
                for variant in p["variants"]:
                    bench.run("warm", p["case"], variant, round_, p)
    finally:
        bench.stop_server()


def exp_train(bench: Bench, p: dict, experiment: str = "train", case: str | None = None,
              variants=("fit_no_checkpoints", "fit_checkpoints", "train_epoch_saves",
                        "train_default_saves", "train_every16_saves")) -> None:
    """Training alone, in-process timers: fit's seconds vs ckptflow's train stage."""
    case = case or f"{p['train'] // 1000}k-{p['units']}"
    for round_ in range(p["rounds"]):
        for variant in variants:
            bench.run(experiment, case, variant, round_, p)


def exp_sweep(bench: Bench, p: dict) -> None:
    for units in p["units"]:
        for n in p["sizes"]:
            exp_train(bench, {**p, "train": n, "test": 1000, "units": units}, "sweep",
                      variants=("fit_checkpoints", "train_default_saves"))


def exp_resume(bench: Bench, p: dict) -> None:
    """Process start to first step: cold (fresh run directory) vs resumed (one epoch done)."""
    prepared = bench.scratch("resume-prepared")
    bench.run("prep", "-", "train_default_saves", 0, {**p, "epochs": 1}, run_dir=prepared)
    first = {"child_args": ["--exit-after-first-step"]}
    for round_ in range(p["rounds"]):
        bench.run("resume", "first-step", "cold", round_, {**p, "epochs": 2}, **first)
        bench.run("resume", "first-step", "resumed", round_, {**p, "epochs": 2},
                  run_dir=prepared, **first)
        bench.run("resume", "first-step", "plain_cold", round_, {**p, "epochs": 2})


def _spawn(cmd: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, Path]:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True), log


def _lines(log: Path, prefix: str) -> list[str]:
    return [x for x in log.read_text(errors="replace").splitlines() if x.startswith(prefix)]


def _wait_for(proc: subprocess.Popen, log: Path, prefix: str, timeout: float = 300) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _lines(log, prefix)
        if found:
            return found
        if proc.poll() is not None:
            raise RuntimeError(f"process ended before '{prefix}': {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"no '{prefix}' within {timeout} s")


def exp_lost(bench: Bench, p: dict, seed: int = 0) -> None:
    """SIGKILL training after the same random delays, restart it, and count the batches that
    must be trained again: ckptflow (its default saves) vs keras.callbacks.BackupAndRestore."""
    rng = random.Random(seed)
    for kill in range(p["kills"]):
        delay = rng.uniform(0.5, p["max_delay"])
        for variant in ("ckptflow", "backup_and_restore"):
            run_dir = bench.scratch(f"lost-{variant}")
            if variant == "ckptflow":
                cmd = bench.command("train_default_saves", run_dir, p,
                                    child_args=["--report-steps"])
            else:
                cmd = bench.command("fit_no_checkpoints", run_dir, p, plain_args=[
                    "--report-steps",
                    "--backup-dir", str(run_dir / "backup")])
            proc, log = _spawn(cmd, bench.env, run_dir / "first.log")
            steps = _wait_for(proc, log, "step")
            start_time = float(steps[0].split()[2])
            time.sleep(max(0.0, start_time + delay - time.time()))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            steps = _lines(log, "step")
            last = int(steps[-1].split()[1])
            step_s = (float(steps[-1].split()[2]) - start_time) / max(len(steps) - 1, 1)
            proc, log = _spawn(cmd, bench.env, run_dir / "restart.log")
            restart = int(_wait_for(proc, log, "start")[0].split()[1])
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            row = {"experiment": "lost", "case": f"{p['train'] // 1000}k-{p['units']}",
                   "variant": variant, "round": kill, "train_samples": p["train"],
                   "units": p["units"], "epochs": p["epochs"], "kill_after_s": round(delay, 3),
                   "last_step": last, "resumed_step": restart, "lost_batches": last - restart,
                   "lost_s": round((last - restart) * step_s, 3), "load": os.getloadavg()[0]}
            bench.rows.append(row)
            print(f"  lost   kill {kill} {variant:<20} after {delay:.2f} s: step {last} -> "
                  f"resumed at {restart}: {last - restart} batches lost", flush=True)


# --- summary ------------------------------------------------------------------------------------

def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def _values(rows, experiment, case, variant, metric):
    return [r[metric] for r in sorted(rows, key=lambda r: r["round"])
            if r["experiment"] == experiment and r["case"] == case and r["variant"] == variant
            and r.get(metric) is not None]


def comparisons(rows: list[dict]) -> list[dict]:
    """Each comparison: A vs B on one metric, with medians, min-max, ratio and pair ratios."""
    out = []

    def compare(what, experiment, case, a, b, metric, target=None):
        va, vb = _values(rows, experiment, case, a, metric), _values(rows, experiment, case, b, metric)
        if not va or not vb:
            return
        sa, sb = _stats(va), _stats(vb)
        ratio = sa["median"] / sb["median"]
        out.append({"what": what, "case": case, "a": a, "b": b, "metric": metric,
                    "a_stats": sa, "b_stats": sb, "ratio": ratio,
                    "pair_ratios": [x / y for x, y in zip(va, vb, strict=False)],
                    "target": target, "met": None if target is None else ratio <= target})

    cases = sorted({(r["experiment"], r["case"]) for r in rows})
    for experiment, case in cases:
        if experiment in ("e2e", "e2e60k"):
            compare("ckptflow run vs plain script", experiment, case, "ckptflow", "plain",
                    "wall_s", 1.10 if case == "60k" else None)
            compare("ckptflow run, server running, vs plain", experiment, case,
                    "ckptflow_server", "plain", "wall_s", 1.5)
            for variant, commit in BEFORE.items():
                compare(f"before (commit {commit}) vs plain", experiment, case, variant,
                        "plain", "wall_s")
            compare("ckptflow run vs stage functions without Prefect", experiment, case,
                    "ckptflow", "stages", "wall_s")
            compare("stage functions without Prefect vs plain", experiment, case, "stages",
                    "plain", "wall_s")
            for metric in ("maxrss_mb", "tree_peak_mb"):
                compare(f"peak memory ({metric})", experiment, case, "ckptflow", "plain",
                        metric, 1.2)
        if experiment == "warm":
            for metric in ("wall_s", "cpu_s"):
                compare("ckptflow run, warm server, vs plain", experiment, case, "ckptflow_warm",
                        "plain", metric, 1.5 if metric == "wall_s" else None)
                compare("ckptflow run, temporary server, vs plain", experiment, case, "ckptflow",
                        "plain", metric)
                compare("ckptflow run, warm server, vs temporary server", experiment, case,
                        "ckptflow_warm", "ckptflow", metric)
        if experiment in ("train", "sweep"):
            compare("ckptflow training (default saves) vs fit + ModelCheckpoint", experiment,
                    case, "train_default_saves", "fit_checkpoints", "train_s")
            compare("ckptflow training (default saves) vs fit without checkpoints", experiment,
                    case, "train_default_saves", "fit_no_checkpoints", "train_s")
            compare("ckptflow training (epoch-end saves) vs fit without checkpoints",
                    experiment, case, "train_epoch_saves", "fit_no_checkpoints", "train_s")
            compare("before: every 16 batches, no budget, vs fit without checkpoints",
                    experiment, case, "train_every16_saves", "fit_no_checkpoints", "train_s")
            compare("fit + ModelCheckpoint vs fit without checkpoints", experiment, case,
                    "fit_checkpoints", "fit_no_checkpoints", "train_s")
        if experiment == "resume":
            compare("resume vs cold start, time to first step", experiment, case, "resumed",
                    "cold", "first_step_s", 1.2)
            compare("ckptflow cold vs plain cold, time to first step", experiment, case,
                    "cold", "plain_cold", "first_step_s")
    return out


def derived(rows: list[dict]) -> list[dict]:
    """Numbers that are not a ratio of two variants: save share, fixed costs, work lost."""
    out = []
    for r in rows:
        if r.get("save_s") is not None and r.get("train_s"):
            r["save_share"] = r["save_s"] / r["train_s"]
    for experiment, case in sorted({(r["experiment"], r["case"]) for r in rows}):
        for variant in ("train_epoch_saves", "train_default_saves", "train_every16_saves"):
            shares = _values(rows, experiment, case, variant, "save_share")
            if shares:
                out.append({"what": f"time inside checkpoint saves, {variant}", "case": case,
                            "experiment": experiment, "stats": _stats(shares), "unit": "share",
                            "target": 0.035 if variant == "train_epoch_saves" else None})
        if experiment in ("e2e", "fixed"):
            med = {v: statistics.median(_values(rows, experiment, case, v, "wall_s") or [0])
                   for v in ("ckptflow", "plain", "trivial_flow", "stages")}
            if med["trivial_flow"] and med["ckptflow"]:
                out.append({"what": "ckptflow run - plain - trivial flow (s)", "case": case,
                            "experiment": experiment, "unit": "s",
                            "stats": {"median": med["ckptflow"] - med["plain"] - med["trivial_flow"]},
                            "target": 1.0})
                if med["stages"]:
                    out.append({"what": "Prefect's cost: ckptflow run - stages (s)", "case": case,
                                "experiment": experiment, "unit": "s",
                                "stats": {"median": med["ckptflow"] - med["stages"]},
                                "target": None})
                out.append({"what": "trivial 3-task flow (s)", "case": case, "experiment":
                            experiment, "unit": "s", "stats": _stats(
                                _values(rows, experiment, case, "trivial_flow", "wall_s")),
                            "target": None})
        if experiment == "lost":
            for variant in ("ckptflow", "backup_and_restore"):
                for metric in ("lost_batches", "lost_s"):
                    values = _values(rows, experiment, case, variant, metric)
                    if values:
                        out.append({"what": f"work lost per kill ({metric}), {variant}",
                                    "case": case, "experiment": experiment, "unit": metric,
                                    "stats": _stats(values), "target": None})
    return out


def _fmt(x: float, unit: str = "") -> str:
    if unit == "share":
        return f"{100 * x:.2f}%"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"Started {report['started']}, {report['minutes']:.1f} min; load average (1 min) "
             f"before the runs: median {report['load_median']:.2f}, max {report['load_max']:.2f} "
             "(2 cores; the benchmark's own runs keep it near 1.5-2).", "",
             "| comparison | case | A | B | metric | A median (min–max) | B median (min–max) "
             "| ratio A/B | pair ratios | target | met |", "|" + "---|" * 11]
    for c in report["comparisons"]:
        a, b = c["a_stats"], c["b_stats"]
        target = "" if c["target"] is None else f"≤ {c['target']}"
        met = "" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(
            f"| {c['what']} | {c['case']} | {c['a']} | {c['b']} | {c['metric']} | "
            f"{_fmt(a['median'])} ({_fmt(a['min'])}–{_fmt(a['max'])}) | {_fmt(b['median'])} "
            f"({_fmt(b['min'])}–{_fmt(b['max'])}) | **{c['ratio']:.3f}** | "
            f"{', '.join(f'{x:.2f}' for x in c['pair_ratios'])} | {target} | {met} |")
    lines += ["", "| measure | case | median (min–max) | target | met |", "|---|---|---|---|---|"]
    for d in report["derived"]:
        s, unit = d["stats"], d["unit"]
        span = f" ({_fmt(s['min'], unit)}–{_fmt(s['max'], unit)})" if "min" in s else ""
        target = "" if d["target"] is None else f"≤ {_fmt(d['target'], unit)}"
        met = "" if d["target"] is None else ("yes" if s["median"] <= d["target"] else "**no**")
        lines.append(f"| {d['what']} | {d['case']} | {_fmt(s['median'], unit)}{span} | "
                     f"{target} | {met} |")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    """Left: ratio of medians per comparison, with targets. Right: the sweep's training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = [c for c in report["comparisons"] if "memory" not in c["what"]
             or c["metric"] == "maxrss_mb"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, max(4, 0.42 * len(comps) + 1)))
    labels = [f"{c['what']} [{c['case']}]" for c in comps]
    ratios = [c["ratio"] for c in comps]
    colors = ["tab:gray" if c["met"] is None else ("tab:green" if c["met"] else "tab:red")
              for c in comps]
    left.barh(range(len(comps)), ratios, color=colors)
    for i, c in enumerate(comps):
        left.plot(c["pair_ratios"], [i] * len(c["pair_ratios"]), "k.", ms=4)
        if c["target"] is not None:
            left.plot([c["target"]] * 2, [i - 0.4, i + 0.4], "k--", lw=1)
    left.set_yticks(range(len(comps)), labels, fontsize=7)
    left.axvline(1.0, color="k", lw=0.5)
    left.set_xlabel("ratio of medians A/B (dots: pairs; dashes: targets)")
    left.invert_yaxis()
    sweep = [r for r in report["rows"] if r["experiment"] == "sweep"]
    for variant, marker in (("fit_checkpoints", "o--"), ("train_default_saves", "s-")):
        for units in sorted({r["units"] for r in sweep}):
            pts = sorted((r["train_samples"], r["train_s"]) for r in sweep
                         if r["variant"] == variant and r["units"] == units)
            if pts:
                right.plot(*zip(*pts, strict=True), marker, label=f"{variant}, {units} units")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("training images (1 epoch)")
    right.set_ylabel("training seconds")
    if sweep:
        right.legend(fontsize=7)
    right.set_title("scaling sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(report: dict, stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    keys = sorted({k for r in report["rows"] for k in r})
    order = ["experiment", "case", "variant", "round"]
    keys = order + [k for k in keys if k not in order]
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(report["rows"])
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    chart(report, RESULTS / f"{stem}.png")


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    wanted = ("Model name", "CPU(s):")
    cpu = "; ".join(" ".join(x.split()) for x in lscpu if x.startswith(wanted))
    mem = next((x.split()[1] for x in open("/proc/meminfo") if x.startswith("MemTotal")), "?")
    return f"{cpu}; {int(mem) // 2**20} GiB RAM; no GPU; Python {sys.version.split()[0]}"


def run_experiment(bench: Bench, plan: dict, name: str) -> None:
    {"e2e": exp_e2e, "e2e60k": lambda b, p: exp_e2e(b, p, "e2e60k"),
     "fixed": lambda b, p: exp_e2e(b, p, "fixed"), "train": exp_train,
     "sweep": exp_sweep, "resume": exp_resume, "lost": exp_lost, "warm": exp_warm}[name](
        bench, plan[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(EXPERIMENTS)}")
    parser.add_argument("--name", default=None, help="results file stem (default overhead or "
                        "overhead-quick)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    for flag in ("--data", "--run-dir"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--train-samples", "--test-samples", "--units", "--epochs",
                 "--save-every-batches"):
        parser.add_argument(flag, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--exit-after-first-step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report-steps", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # a SIGTERM'd benchmark still stops its Prefect server and removes its scratch directory
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.child:
        args.run_dir = Path(args.run_dir) if args.run_dir else None
        result = CHILDREN[args.child](args)
        print("result " + json.dumps(result), flush=True)
        return 0

    plan = QUICK if args.quick else FULL
    chosen = args.only.split(",") if args.only else list(EXPERIMENTS)
    stem = args.name or ("overhead-quick" if args.quick else "overhead")
    previous = RESULTS / f"{stem}.json"
    kept = []
    if args.only and previous.exists():
        kept = [r for r in json.loads(previous.read_text())["rows"]
                if r["experiment"] not in chosen]
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="ckptflow-bench-"))
    bench = Bench(work)
    try:
        for name in chosen:
            print(f"{name}:", flush=True)
            try:
                run_experiment(bench, plan, name)
            except Exception as exc:  # keep the other experiments' results
                print(f"  {name} failed: {exc}", flush=True)
            report(args, kept + bench.rows, started, stem)  # after each: a stopped run keeps them
    finally:
        bench.stop_server()
        shutil.rmtree(work, ignore_errors=True)
    print((RESULTS / f"{stem}.md").read_text())
    return 0


def report(args, rows: list[dict], started: float, stem: str) -> None:
    """Write every result file from the rows measured so far."""
    rows = [r for r in rows if r["experiment"] not in ("warmup", "prep")]
    if not rows:
        return
    loads = [r["load"] for r in rows]
    result = {"command": "python bench/overhead.py" + (" --quick" if args.quick else "")
              + (f" --only {args.only}" if args.only else "")
              + (f" --name {args.name}" if args.name else ""),
              "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M UTC",
                                                             time.gmtime(started)),
              "minutes": (time.time() - started) / 60, "load_median": statistics.median(loads),
              "load_max": max(loads), "rows": rows}
    result["derived"] = derived(rows)
    result["comparisons"] = comparisons(rows)
    write_results(result, stem)

if __name__ == "__main__":
    sys.exit(main())
