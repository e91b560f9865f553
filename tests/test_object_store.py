"""Run directories in S3, against a real S3 API server on 127.0.0.1 (moto's server mode) reached
through s3fs and botocore, unpatched: commit, lease and fence, resume on another machine, verify
from anywhere, bad input. docs/object-storage.md."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import AWS, CKPTFLOW, free_port, machine, moto_server, new_bucket, objects, small_config

pytestmark = pytest.mark.xdist_group("s3")


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    """A new bucket; this process's AWS variables point at the server, its staging at tmp."""
    for key, value in {**AWS, "AWS_ENDPOINT_URL": s3_endpoint,
                       "CKPTFLOW_STAGING_DIR": str(tmp_path / "staging")}.items():
        monkeypatch.setenv(key, value)
    return new_bucket(s3_endpoint)


def stored(bucket: str) -> dict[str, str]:
    """The bucket's objects (and ETags) on this module's server."""
    return objects(os.environ["AWS_ENDPOINT_URL"], bucket)


def checkpoint_prefixes(bucket: str, committed: bool) -> set[str]:
    """The bucket's checkpoint prefixes with (or without) their commit record."""
    files: dict[str, set[str]] = {}
    for key in stored(bucket):
        prefix, _, name = key.rpartition("/")
        if "/checkpoints/" in key and "." in prefix.rpartition("/")[2]:
            files.setdefault(prefix, set()).add(name)
    return {p for p, names in files.items() if ("COMMIT.json" in names) == committed}


def fake_checkpoint(directory: Path, name: str, step: int) -> Path:
    """A checkpoint directory as the local store commits one (files and their commit record)."""
    path = directory / name
    path.mkdir(parents=True)
    data = f"weights at step {step}".encode()
    (path / "train_state.index").write_bytes(data)
    (path / "COMMIT.json").write_text(json.dumps({
        "name": name, "epoch": 0, "batch": step, "step": step,
        "files": {"train_state.index": hashlib.sha256(data).hexdigest()}}))
    return path


def test_lease_is_exclusive_and_a_dead_holders_lease_is_taken_over_once_expired(bucket):
    from ckptflow.core.lease import LeaseBusy, LeaseLost, StoreLease
    from ckptflow.core.object_store import ObjectStore

    store = ObjectStore(f"s3://{bucket}/runs/x")
    first = StoreLease(store, seconds=5, note={"flow_run_id": "run-a"})
    assert first.acquire(0, lambda f: f) is None
    second = StoreLease(store, seconds=5)
    with pytest.raises(LeaseBusy) as busy:
        second.acquire(0, lambda f: f)
    assert f"pid {os.getpid()}" in str(busy.value) and "run-a" in str(busy.value)
    first._stop.set()  # the holder stops renewing, as a SIGKILLed one does
    first._renewer.join()
    started = time.monotonic()
    taken = second.acquire(30, lambda f: {**f, first.token: 7})
    assert 3 < time.monotonic() - started < 15  # after the 5 s term, not before
    assert taken["flow_run_id"] == "run-a"
    record = json.loads(store.read("lease.json"))
    assert record["token"] == second.token and record["fences"] == {first.token: 7}
    with pytest.raises(LeaseLost):
        first.check()  # the old holder learns it lost the lease before committing anything
    second.release(last_step=9)
    record = json.loads(store.read("lease.json"))
    assert record["holder"] is None and record["fences"] == {first.token: 7, second.token: 9}


def test_a_zombie_cannot_commit_over_its_successor_and_its_leftovers_are_never_chosen(
        bucket, tmp_path):
    from ckptflow.core.lease import LeaseLost
    from ckptflow.core.remote_run import RemoteRun, copy_run

    url = f"s3://{bucket}/runs/zombie"
    zombie = RemoteRun(url, keep=3, lease_seconds=5)
    with zombie.open(0):
        zombie.checkpoint_committed(fake_checkpoint(tmp_path / "a", "cp-0000-b000004", 4))
        zombie.lease._stop.set()  # paused (Prefect marks it Crashed), its lease runs out
        zombie.lease._renewer.join()
        successor = RemoteRun(url, keep=3, lease_seconds=5)
        with successor.open(30) as abandoned:
            assert abandoned["pid"] == os.getpid()
            pulled = sorted(p.name for p in (successor.local / "checkpoints").iterdir())
            assert pulled == ["checkpoint", "cp-0000-b000004"]
            with pytest.raises(LeaseLost, match="no longer holds"):  # the zombie's next commit
                zombie.checkpoint_committed(fake_checkpoint(tmp_path / "a", "cp-0000-b000008", 8))
            # Past the check in a race: its commit record lands, fenced out all the same.
            zombie.lease.lost = None
            zombie.lease.check = lambda: None
            zombie.checkpoint_committed(fake_checkpoint(tmp_path / "b", "cp-0000-b000012", 12))
            # A kill during another upload: files, no commit record.
            zombie.store.write("checkpoints/cp-0000-b000016.dead.0/train_state.index", b"part")
            successor.checkpoint_committed(fake_checkpoint(tmp_path / "c", "cp-0000-b000006", 6))
            copy_run(url, tmp_path / "reader")
            assert sorted(p.name for p in (tmp_path / "reader" / "checkpoints").glob("cp-*")) == [
                "cp-0000-b000004", "cp-0000-b000006"]
        zombie.lease.release = lambda last_step: None  # a zombie gives nothing back
    keys = stored(bucket)
    assert any(".dead." in k for k in keys) and any("cp-0000-b000012" in k for k in keys)
    third = RemoteRun(url, keep=3, lease_seconds=5)
    with third.open(0):  # the next writer clears what was never chosen
        pass
    names = {k.split("/")[3].split(".")[0] for k in stored(bucket) if "/checkpoints/" in k}
    assert names == {"cp-0000-b000004", "cp-0000-b000006"}


class TcpProxy:
    """127.0.0.1:port forwarding to `target`, each connection at most `bytes_per_second` when it
    is set (a slow link): `stop()` refuses and cuts every connection, as a store that went down;
    `start()` listens again on the same port."""

    CHUNK = 4096

    def __init__(self, target: int):
        self.target, self.port = target, free_port()
        self.bytes_per_second: float | None = None
        self.start()

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def stop(self) -> None:
        self.listener.close()
        for connection in self.connections:
            # shutdown first: a close() alone does not wake a thread blocked in recv(), so the
            # peer would see no reset and wait out its read timeout instead of an outage.
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(self.CHUNK):
                sink.sendall(data)
                if self.bytes_per_second:
                    time.sleep(len(data) / self.bytes_per_second)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def cli(args: list[str], env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CKPTFLOW, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


@pytest.mark.parametrize("make_url, env_change, words", [
    (lambda b: "ftp://host/run", {}, "unknown storage scheme 'ftp'"),
    (lambda b: "gs://bucket/run", {}, "gs:// run directories are not supported yet"),
    (lambda b: "s3://no-such-bucket-here/run", {}, "no such bucket 'no-such-bucket-here'"),
    (lambda b: f"s3://{b}/run", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                                 "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                 "AWS_CONFIG_FILE": "/nonexistent"}, "no credentials for s3://"),
    (lambda b: f"s3://{b}/run", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
     "could not reach s3://"),
    (lambda b: f"s3://{b}/other", {}, "holds 1 objects but no ckptflow run"),
])
def test_bad_store_input_is_one_line_exit_2_and_writes_nothing(bucket, tmp_path, make_url,
                                                              env_change, words):
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).pipe(f"{bucket}/other/notes.txt", b"mine")
    before = stored(bucket)
    cwd, env = machine(tmp_path, "m", os.environ["AWS_ENDPOINT_URL"])
    for key, value in env_change.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = cli(["run", "--run-dir", make_url(bucket), "--data", "bundled"], env, cwd)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptflow: error: ") and words in lines[0]
    assert stored(bucket) == before
    assert not any(cwd.iterdir()) and not any((cwd.parent / "staging").iterdir())


def test_credentials_that_may_not_write_are_refused_in_one_line_and_write_nothing(
        tmp_path, prefect_api_url):
    import boto3

    # A store that checks credentials and policies once its first four requests (below) are done.
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="4") as endpoint:
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1",
                 "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        boto3.client("s3", **admin).create_bucket(Bucket="ckpt-read-only")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Action": ["s3:List*", "s3:Get*", "s3:Head*"],  # moto's HEAD
                "Resource": "*"}]}))
        url = "s3://ckpt-read-only/run"
        for name, key_id, secret, words in [
                ("unknown", "AKIAUNKNOWN", "secret", f"access denied: could not reach {url} ("),
                ("reader", key["AccessKeyId"], key["SecretAccessKey"],
                 f"access denied: could not write {url}/lease.json (Access Denied)")]:
            cwd, env = machine(tmp_path, name, endpoint)
            env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret,
                       PREFECT_API_URL=prefect_api_url)
            result = cli(["run", "--run-dir", url, "--data", "bundled"], env, cwd)
            assert result.returncode == 2, (result.stdout + result.stderr)[-2000:]
            assert [line for line in result.stderr.splitlines() if "ckptflow:" in line] == [
                result.stderr.strip().splitlines()[-1]]
            assert result.stderr.strip().splitlines()[-1].startswith(f"ckptflow: error: {words}")
            assert "Traceback" not in result.stdout + result.stderr
            assert "Run the same command again" not in result.stderr
            reader = boto3.client("s3", **{**admin, "aws_access_key_id": key["AccessKeyId"],
                                           "aws_secret_access_key": key["SecretAccessKey"]})
            assert reader.list_objects_v2(Bucket="ckpt-read-only")["KeyCount"] == 0
            assert not any(cwd.iterdir())


def test_without_s3fs_the_extra_is_named(tmp_path):
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from ckptflow.flows.cli import main\n"
            "sys.exit(main(['verify', 's3://bucket/run']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("ckptflow: error: s3://bucket/run needs the s3fs package, "
                                     "which is not installed. Install it with: pip install "
                                     "'ckptflow[s3]'.")


# 96 batches, a checkpoint every 4: A is killed in its second upload to the store, long before
# the end even on a loaded machine.
RUN_ARGS = ["--data", "bundled", "--train-samples", "1024", "--test-samples", "128",
            "--batch-size", "32", "--save-every-batches", "4", "--checkpoint-budget", "0",
            "--epochs", "3", "--units", "64", "--seed", "7", "--formats", "keras",
            "--lease-seconds", "5", "--wait-for-lock", "60"]


def test_a_run_killed_on_one_machine_resumes_on_another_bit_identical(
        bucket, tmp_path, prefect_api_url):
    from ckptflow.flows.train_pipeline import train_pipeline

    reference = train_pipeline(small_config(
        tmp_path / "reference", train_samples=1024, save_every_batches=4, epochs=3,
        formats=["keras"]))
    expected = hashlib.sha256((tmp_path / "reference" / "exports" /
                               "reference_predictions.npy").read_bytes()).hexdigest()

    url = f"s3://{bucket}/runs/moved"
    link_a = TcpProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    cwd_a, env_a = machine(tmp_path, "a", f"http://127.0.0.1:{link_a.port}")
    env_a["PREFECT_API_URL"] = prefect_api_url
    with (tmp_path / "a.log").open("w") as log:
        run_a = subprocess.Popen([CKPTFLOW, "run", "--run-dir", url, *RUN_ARGS], env=env_a,
                                 cwd=cwd_a, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300

    def wait_for(condition):
        while not (found := condition()):
            assert run_a.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return found

    wait_for(lambda: checkpoint_prefixes(bucket, committed=True))  # one committed there
    link_a.bytes_per_second = 20_000  # a slow link: the next upload takes seconds
    uploading = wait_for(lambda: checkpoint_prefixes(bucket, committed=False))
    link_a.stop()  # machine A is gone mid-upload: its link cut, it killed, its disk deleted
    run_a.send_signal(signal.SIGKILL)
    run_a.wait(timeout=60)
    time.sleep(0.5)  # any request the server had whole is answered
    committed_by_a = sorted(k for k in stored(bucket) if k.endswith("COMMIT.json"))
    assert uploading <= checkpoint_prefixes(bucket, committed=False)  # left as it was
    for path in (tmp_path / "a").iterdir():
        subprocess.run(["rm", "-rf", os.path.realpath(path), str(path)], check=True)

    # Machine B reaches the store through a proxy that goes down for 3 s once B has committed.
    proxy = TcpProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    cwd_b, env_b = machine(tmp_path, "b", f"http://127.0.0.1:{proxy.port}")
    env_b["PREFECT_API_URL"] = prefect_api_url
    with (tmp_path / "b.log").open("w") as log:
        run_b = subprocess.Popen([CKPTFLOW, "run", "--run-dir", url, *RUN_ARGS], env=env_b,
                                 cwd=cwd_b, stdout=log, stderr=subprocess.STDOUT)
    while not set(k for k in stored(bucket) if k.endswith("COMMIT.json")) - set(committed_by_a):
        assert run_b.poll() is None, (tmp_path / "b.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proxy.stop()
    time.sleep(3)
    proxy.start()
    assert run_b.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()[-3000:]
    proxy.stop()
    said = (tmp_path / "b.log").read_text()
    assert "took over run directory" in said
    assert re.search(r"failed \(.*\); retrying in", said), said[-3000:]  # the outage, outlasted
    resumed = re.search(r"training: resumed from checkpoints/(cp-\S+)", said)
    assert resumed, said[-3000:]
    assert any(f"/{resumed.group(1)}." in k for k in committed_by_a)  # from A's last commit
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    manifest = json.loads(fs.cat_file(f"{bucket}/runs/moved/manifest.json"))
    assert manifest["training"]["step"] == reference["training"]["step"] == 96
    assert manifest["training"]["attempts"][-1]["resumed_from"] == f"checkpoints/{resumed.group(1)}"
    assert manifest["parameters"]["run_dir"] == url  # where the run lives, not B's working copy
    # Again on machine B: its working copy is current, nothing is downloaded, nothing trained.
    again = cli(["run", "--run-dir", url, *RUN_ARGS],
                {**env_b, "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}, cwd_b)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "training: already complete at 3 epochs" in again.stdout
    assert re.search(r"pulled s3://\S+: 0 objects downloaded, \d+ outputs and 5 checkpoints "
                     "already here", again.stdout + again.stderr), again.stdout[-3000:]

    assert not checkpoint_prefixes(bucket, committed=False)  # B cleared what A left half-way
    assert hashlib.sha256(fs.cat_file(f"{bucket}/runs/moved/exports/reference_predictions.npy")
                          ).hexdigest() == expected  # bit-identical to the uninterrupted run

    # verify from a third machine: passes; then one flipped byte in the store is named.
    cwd_c, env_c = machine(tmp_path, "c", os.environ["AWS_ENDPOINT_URL"])
    assert cli(["verify", url], env_c, cwd_c).returncode == 0
    key = f"{bucket}/runs/moved/exports/model.keras"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x01
    fs.pipe(key, bytes(data))
    flipped = cli(["verify", url], env_c, cwd_c)
    assert flipped.returncode == 1
    assert "exports/model.keras" in flipped.stderr.strip().splitlines()[-1]


def test_a_sweep_in_an_object_store_trains_each_point_there_and_another_machine_skips_them(
        bucket, tmp_path, prefect_api_url):
    url = f"s3://{bucket}/sweeps/s"
    args = ["sweep", "--sweep-dir", url, "--workers", "1", "--units", "16,24", "--dropout", "0",
            "--data", "bundled", "--train-samples", "256", "--test-samples", "64", "--epochs", "1",
            "--save-every-batches", "3", "--seed", "7"]
    cwd_a, env_a = machine(tmp_path, "a", os.environ["AWS_ENDPOINT_URL"])
    first = cli(args, {**env_a, "PREFECT_API_URL": prefect_api_url}, cwd_a, timeout=300)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert first.stdout.splitlines()[0] == (
        "2 points: units16-dropout0-lr0.001 trained, units24-dropout0-lr0.001 trained")
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for point in ("units16-dropout0-lr0.001", "units24-dropout0-lr0.001"):
        manifest = json.loads(fs.cat_file(f"{bucket}/sweeps/s/{point}/manifest.json"))
        assert manifest["evaluation"]["epoch"] == 1 and manifest["training"]["step"] == 8
        assert any(f"/{point}/checkpoints/" in k
                   for k in checkpoint_prefixes(bucket, committed=True))
    summary = fs.cat_file(f"{bucket}/sweeps/s/summary.md").decode()
    assert summary.startswith(f"# Sweep {url}\n") and summary.count("| trained |") == 2
    assert not list(cwd_a.iterdir())  # nothing made locally under a folder named `s3:`

    # Another machine: each point is finished in the store, so nothing is pulled or trained.
    cwd_b, env_b = machine(tmp_path, "b", os.environ["AWS_ENDPOINT_URL"])
    again = cli(args, {**env_b, "PREFECT_API_URL": prefect_api_url}, cwd_b, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert again.stdout.splitlines()[0] == (
        "2 points: units16-dropout0-lr0.001 skipped, units24-dropout0-lr0.001 skipped")
    assert not list((tmp_path / "b" / "staging").iterdir())
    assert fs.cat_file(f"{bucket}/sweeps/s/summary.md").decode().count("| skipped |") == 2


def test_a_working_copy_keeps_what_is_current_and_fetches_what_changed(bucket, tmp_path):
    from ckptflow.core.remote_run import RemoteRun

    url = f"s3://{bucket}/runs/cached"
    first = RemoteRun(url, keep=3, lease_seconds=5)
    with first.open(0):
        (first.local / "exports").mkdir()
        (first.local / "exports" / "model.bin").write_bytes(b"weights v1")
        (first.local / "report.md").write_text("report v1")
        (first.local / "manifest.json").write_text("{}")
        first.outputs_committed()
        first.checkpoint_committed(fake_checkpoint(first.local / "checkpoints", "cp-0000-b000004", 4))
    kept = {p: p.stat().st_mtime_ns for p in first.local.rglob("*") if p.is_file()
            and ".synced" not in p.name}

    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe(f"{bucket}/runs/cached/exports/model.bin", b"weights v2")  # changed in the store
    (first.local / "report.md").write_text("edited here")  # changed in the working copy
    second = RemoteRun(url, keep=3, lease_seconds=5)
    with second.open(0):
        assert (second.local / "exports" / "model.bin").read_bytes() == b"weights v2"
        assert (second.local / "report.md").read_text() == "report v1"  # the store's, again
        unchanged = [p for p, mtime in kept.items() if p.stat().st_mtime_ns == mtime]
        assert sorted(p.relative_to(second.local).as_posix() for p in unchanged) == [
            "checkpoints/cp-0000-b000004/COMMIT.json",
            "checkpoints/cp-0000-b000004/train_state.index", "manifest.json"]
