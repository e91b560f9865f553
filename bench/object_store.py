"""A run directory in S3 against the same on local disk and against plain s3fs, on a local S3 server.

Three measures, each a ratio of medians measured in the same run, rounds interleaved (the order
of the two arms swapped every round), against a real S3 API server on 127.0.0.1 (moto's server
mode, started here; `--endpoint` names another S3-compatible server instead):

    training  the training stage (fetch-data and build-model done first, untimed; Prefect not
              involved) with `--run-dir s3://...` against the same parameters on local disk: the
              default checkpoint budget (0.02) and save interval (16 batches). The S3 arm opens
              the run as `ckptflow run` does (tasks/stages/open_run.py: RemoteRun.open, then the
              stages in the working copy), so every committed checkpoint is uploaded by the
              commit thread and each manifest update copies the outputs. Each arm is a fresh
              process; fresh run directories and prefixes every round. Target: <= 1.05x.
    upload    `RemoteRun.checkpoint_committed` of a real epoch-end checkpoint (TF state, the
              tutorial's .weights.h5 and .keras, COMMIT.json; made once per model size) against
              a plain `s3fs.S3FileSystem().put_file` of each of the same files, one after the
              other, to the same server. Throughput (MB/s) and ours / plain. Target: >= 0.8x.
    resume    start-up on a fresh machine: entering `RemoteRun(url).open(0)` (lease taken,
              checkpoints listed and fenced, every output and committed checkpoint pulled and
              verified) with an empty staging directory, against a plain s3fs `get` of the same
              objects into an empty directory (one call: s3fs fetches them concurrently), and a
              plain `get_file` of each, one after the other (as the run pulls them). The run
              pulled is the last S3 training round's (trained, not exported). Reported.

No timing is asserted. Results: bench/results/NAME.json (date, commit, command, medians,
pairs, every row) and a short table on stdout.

Usage:
    python bench/object_store.py                    # 3 rounds, tutorial size (about 5 min here)
    python bench/object_store.py --rounds 2 --epochs 3 --name object_store   # a quick look
    python bench/object_store.py --only upload --upload-units 512,2048,8192
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from overhead import synthetic_mnist  # bench/, beside this script

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MEASURES = ("training", "upload", "resume")
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _median(values) -> float:
    return statistics.median(values)


# --- children: one fresh process per training arm, one that makes the upload's checkpoints ---

def child_training(args) -> dict:
    """The training stage in `args.run_dir` (a path or an s3:// URL), as `ckptflow run` runs it."""
    from ckptflow.config import TrainConfig
    from ckptflow.core.manifest import read_manifest
    from ckptflow.core.object_store import is_url
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.training.stage import train_with_checkpoints

    config = TrainConfig(run_dir=args.run_dir, data=args.data, train_samples=args.train_samples,
                         test_samples=args.test_samples, units=args.units, epochs=args.epochs,
                         formats=["keras"])  # budget, save interval, batch: the defaults
    result: dict = {}
    remote = opened = None
    if is_url(config.run_dir):
        from ckptflow.core.remote_run import RemoteRun

        started = time.perf_counter()
        remote = RemoteRun(config.run_dir, config.keep_checkpoints, config.lease_seconds)
        mirrored = _timed_mirror(remote)
        opened = remote.open(config.wait_for_lock)
        opened.__enter__()  # as tasks/stages/open_run.py does, around every stage
        result["open_s"] = time.perf_counter() - started
        config = config.model_copy(update={"run_dir": str(remote.local)})
    started = time.perf_counter()
    data = prepare_run(config)
    result["prepare_s"] = time.perf_counter() - started
    if remote is not None:
        for seconds in mirrored.values():  # what the stage itself spends in the store, below
            seconds.clear()
    wall, cpu = time.perf_counter(), _cpu()
    train_with_checkpoints(config.run_dir, config, data)
    result["stage_s"] = time.perf_counter() - wall
    if remote is not None:
        for method, seconds in mirrored.items():
            result[f"{method}_calls"], result[f"{method}_s"] = len(seconds), sum(seconds)
    result["cpu_s"] = _cpu() - cpu  # every thread's: the commit thread's uploads included
    costs = read_manifest(config.run_dir)["training"]["attempts"][-1]["checkpoints"]
    result.update({"train_s": costs["training_seconds"], "cost": costs["cost"],
                   "waited_s": costs["waited_seconds"], "waited_by": costs.get("waited_by"),
                   "commit_cpu_s": costs["commit_cpu_seconds"], "committed": costs["committed"],
                   "deferred": costs["deferred"], "bytes_written": costs["bytes_written"]})
    if opened is not None:
        started = time.perf_counter()
        opened.__exit__(None, None, None)  # the outputs copied, the lease given back
        result["close_s"] = time.perf_counter() - started
    return result


def _timed_mirror(remote) -> dict[str, list[float]]:
    """Time each call of the run's two mirror methods (the commit thread's checkpoint uploads,
    the manifest updates' output copies): {method: [seconds of each call]}."""
    calls: dict[str, list[float]] = {"checkpoint_committed": [], "outputs_committed": []}

    def timed(call, seconds: list[float]):
        def wrapper(*args):
            started = time.perf_counter()
            try:
                return call(*args)
            finally:
                seconds.append(time.perf_counter() - started)
        return wrapper

    for method, seconds in calls.items():
        setattr(remote, method, timed(getattr(remote, method), seconds))
    return calls


def child_checkpoints(args) -> dict:
    """One real epoch-end checkpoint per model size (after one optimizer step, so that the
    optimizer's state is in it), committed by CheckpointStore under `args.run_dir`."""
    import numpy as np

    from ckptflow.core.checkpoints import CheckpointStore
    from ckptflow.tutorial.model import create_model

    rng = np.random.default_rng(0)
    made = {}
    for units in map(int, args.upload_units.split(",")):
        model = create_model(units=units, seed=42)
        model.train_on_batch(rng.random((32, 784), dtype=np.float32), rng.integers(0, 10, 32))
        store = CheckpointStore(Path(args.run_dir) / f"units-{units}" / "checkpoints", keep=1)
        checkpoint = store.save(model, {"epoch": 1, "batch": 0, "step": 1, "history": []},
                                epoch_end=True, extra={"metrics": model.metrics_variables})
        made[units] = {"path": str(checkpoint.path), "parameters": int(model.count_params())}
    return made


def run_child(child: str, env: dict, **options) -> dict:
    command = [sys.executable, __file__, "--child", child]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{child} {options} failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


# --- the S3 server ---

class Server:
    """moto's S3 server on a free port of 127.0.0.1 (or an endpoint given), and one bucket."""

    def __init__(self, endpoint: str | None, work: Path):
        self.process = None
        if endpoint is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start")
                time.sleep(0.1)
            endpoint = f"http://127.0.0.1:{port}"
            os.environ.update(AWS)
        self.endpoint = endpoint
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        self.env = {**os.environ}
        self.bucket = f"ckptflow-bench-{uuid.uuid4().hex[:8]}"
        self.fs().mkdir(self.bucket)
        self.work = work
        fs = self.fs()  # the server's first large PUT and GET, untimed
        fs.pipe(f"{self.bucket}/warm-up", os.urandom(8 << 20))
        fs.cat_file(f"{self.bucket}/warm-up")
        fs.rm(f"{self.bucket}/warm-up")

    @staticmethod
    def fs():
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True)

    def cpu(self) -> float:
        """The server's CPU seconds so far (0 for a server not started here)."""
        if self.process is None:
            return 0.0
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def remove(self, prefix: str) -> None:
        fs = self.fs()
        if fs.exists(f"{self.bucket}/{prefix}"):
            fs.rm(f"{self.bucket}/{prefix}", recursive=True)

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


def staging(server: Server, name: str) -> Path:
    """An empty staging directory of its own, as on a fresh machine (read by RemoteRun)."""
    path = server.work / "staging" / name
    path.mkdir(parents=True)
    os.environ["CKPTFLOW_STAGING_DIR"] = str(path)
    return path


def bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- the three measures ---

def measure_training(args, server: Server, data: Path, rows: list[dict]) -> str:
    """Interleaved rounds of the training stage, S3 and local; returns the last S3 run's URL."""
    url = None
    for round_ in range(args.rounds):
        order = ("s3", "local") if round_ % 2 == 0 else ("local", "s3")
        for arm in order:
            name = f"train-{arm}-{round_}"
            env = {**server.env, "CKPTFLOW_STAGING_DIR": str(server.work / "staging" / name)}
            run_dir = (f"s3://{server.bucket}/{name}" if arm == "s3"
                       else str(server.work / name))
            server_cpu = server.cpu()
            row = run_child("training", env, run_dir=run_dir, data=data, units=args.units,
                            train_samples=args.train_samples, test_samples=args.test_samples,
                            epochs=args.epochs)
            row.update({"measure": "training", "arm": arm, "round": round_,
                        "server_cpu_s": round(server.cpu() - server_cpu, 2),
                        "load": os.getloadavg()[0]})
            if arm == "s3":
                keys = server.fs().find(f"{server.bucket}/{name}")
                row["store_checkpoints"] = sum(k.endswith("/COMMIT.json") for k in keys)
                if url is not None:
                    server.remove(url.split("/", 3)[3])
                url = run_dir
            shutil.rmtree(server.work / "staging" / name, ignore_errors=True)
            shutil.rmtree(server.work / name, ignore_errors=True)
            rows.append(row)
            print(f"training round {round_ + 1} {arm}: stage {row['stage_s']:.2f} s, "
                  f"cost {row['cost']:.1%}, {row['committed']} checkpoints "
                  f"({row['deferred']} put off)", flush=True)
    return url


def upload_once(server: Server, path: Path, arm: str, prefix: str) -> tuple[float, int]:
    """Seconds to upload checkpoint `path` under `prefix`, and the bytes the store then holds."""
    from ckptflow.core.remote_run import RemoteRun

    if arm == "ours":
        staging(server, prefix)
        remote = RemoteRun(f"s3://{server.bucket}/{prefix}", keep=5, lease_seconds=60)
        with remote.open(0):  # the lease taken and the client warm, as in a run
            started = time.perf_counter()
            remote.checkpoint_committed(path)
            seconds = time.perf_counter() - started
    else:
        fs = server.fs()
        fs.ls(server.bucket)  # a warm client, as the run's is
        started = time.perf_counter()
        for p in sorted(path.iterdir()):
            fs.put_file(str(p), f"{server.bucket}/{prefix}/{path.name}/{p.name}")
        seconds = time.perf_counter() - started
    stored = server.fs().find(f"{server.bucket}/{prefix}/", detail=True)
    server.remove(prefix)
    return seconds, sum(v["size"] for k, v in stored.items() if "/cp-" in k)


def measure_upload(args, server: Server, rows: list[dict]) -> None:
    made = run_child("checkpoint", server.env, run_dir=server.work / "checkpoints",
                     upload_units=args.upload_units)
    for arm in ("ours", "plain"):  # this process's first uploads, untimed
        upload_once(server, Path(next(iter(made.values()))["path"]), arm, f"upload-warm-up-{arm}")
    for round_ in range(args.rounds):
        for units, info in made.items():
            path = Path(info["path"])
            files = sorted(p for p in path.iterdir() if p.is_file())
            size = sum(p.stat().st_size for p in files)
            order = ("ours", "plain") if round_ % 2 == 0 else ("plain", "ours")
            for arm in order:
                seconds, uploaded = upload_once(server, path, arm, f"upload-{arm}-{units}-{round_}")
                rows.append({"measure": "upload", "arm": arm, "round": round_,
                             "units": int(units), "parameters": info["parameters"],
                             "files": len(files), "bytes": size, "uploaded": uploaded,
                             "seconds": seconds, "mb_s": size / seconds / 1e6})
                print(f"upload round {round_ + 1} units {units} {arm}: {size / 1e6:.1f} MB in "
                      f"{seconds:.3f} s ({size / seconds / 1e6:.0f} MB/s)", flush=True)


def measure_resume(args, server: Server, url: str, rows: list[dict]) -> None:
    arms = ("ours", "get", "get_file_each")
    for arm in arms:  # this process's first pulls, untimed
        resume_once(server, url, arm, f"resume-warm-up-{arm}")
    for round_ in range(args.rounds):
        for arm in (arms if round_ % 2 == 0 else tuple(reversed(arms))):
            row = {"measure": "resume", "arm": arm, "round": round_,
                   **resume_once(server, url, arm, f"resume-{arm}-{round_}")}
            rows.append(row)
            print(f"resume round {round_ + 1} {arm}: {row['bytes'] / 1e6:.1f} MB, "
                  f"{row['files']} files in {row['seconds']:.3f} s", flush=True)


def resume_once(server: Server, url: str, arm: str, name: str) -> dict:
    """Pull the run at `url` into an empty directory of its own: seconds, bytes, files."""
    from ckptflow.core.remote_run import RemoteRun

    prefix = url.split("/", 3)[3]
    into = staging(server, name)
    row: dict = {}
    started = time.perf_counter()
    if arm == "ours":
        remote = RemoteRun(url, keep=5, lease_seconds=60)
        opened = remote.open(0)
        opened.__enter__()
        row["seconds"] = time.perf_counter() - started
        row["bytes"] = bytes_under(remote.local)
        row["files"] = sum(1 for p in remote.local.rglob("*") if p.is_file())
        started = time.perf_counter()
        opened.__exit__(None, None, None)
        row["close_s"] = time.perf_counter() - started
    else:
        fs = server.fs()  # a fresh client: a fresh machine
        keys = [k for k in fs.find(f"{server.bucket}/{prefix}")
                if not k.endswith("/lease.json")]
        local = [str(into / k[len(server.bucket) + len(prefix) + 2:]) for k in keys]
        for target in {os.path.dirname(x) for x in local}:
            os.makedirs(target, exist_ok=True)
        if arm == "get":
            fs.get(keys, local)
        else:
            for key, target in zip(keys, local, strict=True):
                fs.get_file(key, target)
        row["seconds"] = time.perf_counter() - started
        row["bytes"] = bytes_under(into)
        row["files"] = len(keys)
    shutil.rmtree(into, ignore_errors=True)
    row["mb_s"] = row["bytes"] / row["seconds"] / 1e6
    return row


# --- summary ---

def summarize(rows: list[dict]) -> dict:
    def of(measure, arm, **match):
        return [r for r in rows if r["measure"] == measure and r["arm"] == arm
                and all(r[k] == v for k, v in match.items())]

    summary: dict = {}
    s3, local = of("training", "s3"), of("training", "local")
    if s3:
        med = {arm: {k: _median(r[k] for r in rs) for k in ("stage_s", "train_s", "cpu_s",
                                                              "cost", "committed", "deferred")}
               for arm, rs in (("s3", s3), ("local", local))}
        summary["training"] = {
            "rounds": len(s3),
            "s3_stage_s": round(med["s3"]["stage_s"], 3),
            "local_stage_s": round(med["local"]["stage_s"], 3),
            "s3_over_local": round(med["s3"]["stage_s"] / med["local"]["stage_s"], 3),
            "s3_over_local_pairs": [round(a["stage_s"] / b["stage_s"], 3)
                                    for a, b in zip(s3, local, strict=True)],
            "loop_s3_over_local": round(med["s3"]["train_s"] / med["local"]["train_s"], 3),
            "cpu_s3_over_local": round(med["s3"]["cpu_s"] / med["local"]["cpu_s"], 3),
            "cost": {arm: round(med[arm]["cost"], 4) for arm in med},
            "checkpoints": {arm: med[arm]["committed"] for arm in med},
            "deferred": {arm: med[arm]["deferred"] for arm in med},
            "waited_s": {arm: round(_median(r["waited_s"] for r in rs), 3)
                         for arm, rs in (("s3", s3), ("local", local))},
            "waited_at_end_s": {arm: round(_median((r["waited_by"] or {}).get("stop_or_end", 0)
                                                   for r in rs), 3)
                                for arm, rs in (("s3", s3), ("local", local))},
            "s3_checkpoint_uploads": {
                "calls": _median(r["checkpoint_committed_calls"] for r in s3),
                "seconds": round(_median(r["checkpoint_committed_s"] for r in s3), 3)},
            "s3_output_copies": {
                "calls": _median(r["outputs_committed_calls"] for r in s3),
                "seconds": round(_median(r["outputs_committed_s"] for r in s3), 3)},
            "store_checkpoints": _median(r["store_checkpoints"] for r in s3),
            "s3_open_s": round(_median(r["open_s"] for r in s3), 3),
            "s3_close_s": round(_median(r["close_s"] for r in s3), 3),
            "prepare_s": {"s3": round(_median(r["prepare_s"] for r in s3), 3),
                          "local": round(_median(r["prepare_s"] for r in local), 3)},
            "server_cpu_s": {"s3": _median(r["server_cpu_s"] for r in s3),
                             "local": _median(r["server_cpu_s"] for r in local)},
            "target": "<= 1.05",
        }
    sizes = sorted({r["units"] for r in rows if r["measure"] == "upload"})
    if sizes:
        summary["upload"] = []
        for units in sizes:
            ours, plain = of("upload", "ours", units=units), of("upload", "plain", units=units)
            ours_s, plain_s = _median(r["seconds"] for r in ours), _median(r["seconds"] for r in plain)
            size = ours[0]["bytes"]
            summary["upload"].append({
                "units": units, "parameters": ours[0]["parameters"], "files": ours[0]["files"],
                "mb": round(size / 1e6, 2), "rounds": len(ours),
                "ours_s": round(ours_s, 4), "plain_s": round(plain_s, 4),
                "ours_mb_s": round(size / ours_s / 1e6, 1),
                "plain_mb_s": round(size / plain_s / 1e6, 1),
                "ours_over_plain": round(plain_s / ours_s, 3),  # throughput ratio
                "ours_over_plain_pairs": [round(b["seconds"] / a["seconds"], 3)
                                          for a, b in zip(ours, plain, strict=True)],
                "target": ">= 0.8"})
    ours = of("resume", "ours")
    if ours:
        get, each = of("resume", "get"), of("resume", "get_file_each")
        median_s = {arm: _median(r["seconds"] for r in rs)
                    for arm, rs in (("ours", ours), ("get", get), ("get_file_each", each))}
        summary["resume"] = {
            "rounds": len(ours), "mb": round(ours[0]["bytes"] / 1e6, 2),
            "files": ours[0]["files"], "plain_files": get[0]["files"],
            "plain_mb": round(get[0]["bytes"] / 1e6, 2),
            **{f"{arm}_s": round(v, 4) for arm, v in median_s.items()},
            "ours_close_s": round(_median(r["close_s"] for r in ours), 4),
            "ours_over_get": round(median_s["ours"] / median_s["get"], 3),
            "ours_over_get_pairs": [round(a["seconds"] / b["seconds"], 3)
                                    for a, b in zip(ours, get, strict=True)],
            "ours_over_get_file_each": round(median_s["ours"] / median_s["get_file_each"], 3),
            "target": "reported (time ratio: lower is faster)"}
    return summary


def table(summary: dict) -> str:
    lines = ["| measure | ours (median) | baseline (median) | ratio | pairs | target |",
             "|---|---:|---:|---:|---|---|"]
    if t := summary.get("training"):
        lines.append(
            f"| training stage, S3 / local disk (checkpoints {t['checkpoints']['s3']:g} / "
            f"{t['checkpoints']['local']:g}, cost {t['cost']['s3']:.1%} / {t['cost']['local']:.1%}) "
            f"| {t['s3_stage_s']:.2f} s | {t['local_stage_s']:.2f} s | **{t['s3_over_local']:.3f}x** "
            f"| {', '.join(map(str, t['s3_over_local_pairs']))} | <= 1.05x |")
    for u in summary.get("upload", []):
        lines.append(
            f"| upload, {u['parameters'] / 1e6:.1f}M parameters ({u['mb']:.1f} MB, {u['files']} "
            f"files): throughput ours / `put_file` | {u['ours_mb_s']:.0f} MB/s | "
            f"{u['plain_mb_s']:.0f} MB/s | **{u['ours_over_plain']:.3f}x** | "
            f"{', '.join(map(str, u['ours_over_plain_pairs']))} | >= 0.8x |")
    if r := summary.get("resume"):
        lines.append(
            f"| resume start-up ({r['mb']:.1f} MB, {r['files']} files): `open` / s3fs `get` "
            f"| {r['ours_s']:.3f} s | {r['get_s']:.3f} s | **{r['ours_over_get']:.3f}x** | "
            f"{', '.join(map(str, r['ours_over_get_pairs']))} | reported |")
        lines.append(
            f"| resume start-up: `open` / `get_file` of each in turn | {r['ours_s']:.3f} s | "
            f"{r['get_file_each_s']:.3f} s | {r['ours_over_get_file_each']:.3f}x | | reported |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(MEASURES),
                        help="measures to run, comma-separated: training, upload, resume")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="training (and the run resume "
                        "pulls): epochs (default: the tutorial's 10)")
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--units", type=int, default=512, help="training: hidden units")
    parser.add_argument("--upload-units", default="512,2048",
                        help="upload: hidden units of each checkpoint's model, comma-separated "
                        "(512: 5 MB of TF state, 2048: 20 MB, 8192: 78 MB)")
    parser.add_argument("--endpoint", help="an S3-compatible server to use instead of starting "
                        "moto's (AWS credentials from the environment)")
    parser.add_argument("--name", default="object_store", help="results file stem")
    parser.add_argument("--child", choices=("training", "checkpoint"), help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child_training(args) if args.child == "training" else child_checkpoints(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    measures = [m.strip() for m in args.only.split(",") if m.strip()]
    if unknown := set(measures) - set(MEASURES):
        parser.error(f"unknown measure(s) {sorted(unknown)}; known: {', '.join(MEASURES)}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ckptflow-bench-") as work:
        work = Path(work)
        server = Server(args.endpoint, work)
        try:
            data = synthetic_mnist(work / "data.npz", args.train_samples, args.test_samples)
            url = None
            if "training" in measures:
                url = measure_training(args, server, data, rows)
            if "upload" in measures:
                measure_upload(args, server, rows)
            if "resume" in measures:
                if url is None:  # a run to pull: one S3 training run, untimed
                    url = f"s3://{server.bucket}/resume-run"
                    run_child("training", {**server.env, "CKPTFLOW_STAGING_DIR": str(
                        work / "staging" / "resume-run")}, run_dir=url, data=data,
                        units=args.units, train_samples=args.train_samples,
                        test_samples=args.test_samples, epochs=args.epochs)
                measure_resume(args, server, url, rows)
        finally:
            server.close()
    from ckptflow.config import TrainConfig

    summary = summarize(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--", "tasks", "flows"],
                             capture_output=True, text=True, cwd=REPO).stdout.split("\n")
    report = {
        "date": time.strftime("%Y-%m-%d"), "commit": commit,
        "uncommitted_code": sorted(line[3:] for line in changed if line.strip()),
        "command": "python bench/object_store.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": f"{os.cpu_count()} cores, {os.uname().machine}, Python "
                   f"{sys.version.split()[0]}",
        "server": "moto " + _moto_version() if args.endpoint is None else args.endpoint,
        "load_average": os.getloadavg()[0],
        "parameters": {"rounds": args.rounds, "epochs": args.epochs,
                       "train_samples": args.train_samples, "test_samples": args.test_samples,
                       "units": args.units, "upload_units": args.upload_units,
                       **{k: TrainConfig.model_fields[k].default for k in (
                           "checkpoint_budget", "save_every_batches", "batch_size",
                           "keep_checkpoints", "lease_seconds")}},
        "summary": summary, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(summary))
    print(f"bench/results/{args.name}.json")
    return 0


def _moto_version() -> str:
    from importlib.metadata import version

    return version("moto")


if __name__ == "__main__":
    sys.exit(main())
