"""Honest answers: a wrong option never damages a good run, bad input is one line before Prefect
starts, permanent conditions are exit 2, verify never passes an incomplete or stale run, and
others can read a run directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config, tree_digest

from ckptflow.core.run_dir import RunDir

CKPTFLOW = str(Path(sys.executable).parent / "ckptflow")
NOBODY = 65534


# Another user, as far as files go: root without the capabilities that bypass permissions, on
# files owned by someone else (a real second uid cannot run this interpreter, under /root).
AS_ANOTHER_USER = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                   "--inh-caps", "-dac_override,-dac_read_search"]
another_user = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                  reason="needs root and setpriv (util-linux) to drop file rights")


def run_cli(*args, cwd=None, env_extra=None, as_another_user=False, timeout=300):
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env_extra or {})}
    if "PREFECT_API_URL" not in (env_extra or {}):
        env.pop("PREFECT_API_URL", None)
    prefix = AS_ANOTHER_USER if as_another_user else []
    return subprocess.run([*prefix, CKPTFLOW, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def owned_by_someone_else(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, NOBODY, NOBODY, follow_symlinks=False)


def one_line(result) -> str:
    """The whole of what the command said: exactly one line, with no traceback."""
    said = (result.stdout + result.stderr).strip().splitlines()
    assert len(said) == 1, said[-15:]
    return said[0]


@pytest.fixture
def good_run(finished_run, tmp_path):
    """A copy of a finished default run, to be damaged or not."""
    run_dir = tmp_path / "good"
    shutil.copytree(finished_run[0], run_dir)
    return run_dir


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    """Data files with one fault each, and words the refusal must contain."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 784)).astype(np.uint8)
    y = rng.integers(0, 10, 60)
    files = {}
    narrow = tmp_path / "narrow.csv"
    np.savetxt(narrow, np.column_stack([x[:, :782], y]), fmt="%d", delimiter=",")
    files["783 columns"] = (narrow, ["783 columns", "785"])
    labels = tmp_path / "labels.npz"
    np.savez(labels, x_train=x, y_train=y + 5, x_test=x, y_test=y)
    files["labels out of range"] = (labels, ["labels must be integers 0-9"])
    nan = tmp_path / "nan.npz"
    np.savez(nan, x_train=np.where(x > 250, np.nan, x / 1.0), y_train=y, x_test=x, y_test=y)
    files["NaN pixels"] = (nan, ["outside [0, 255]"])
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"\x93NUMPY not really" * 10)
    files["corrupt npz"] = (corrupt, ["not an .npz file", "no zip header"])
    return files


@pytest.mark.timeout(300)
@pytest.mark.xdist_group("finished_run")  # one default run per session, not two
def test_wrong_requests_on_a_good_run_are_one_line_exit_2_and_change_nothing(good_run, tmp_path):
    before = tree_digest(good_run)
    cases = [(["--formats", "keras,keras"], ["named twice", "keras"]),
             (["--seed", "7"], ["different model", "seed: run has 42, requested 7"])]
    for path, words in bad_files(tmp_path).values():
        cases.append((["--data", str(path), "--train-samples", "40", "--test-samples", "20"],
                      [str(path), *words]))
    for args, words in cases:
        result = run_cli("run", "--run-dir", str(good_run), *args)
        assert result.returncode == 2, (args, result.stdout[-1500:], result.stderr[-1500:])
        line = one_line(result)  # no Prefect server started, no traceback, no retry
        assert line.startswith("ckptflow: error:") and all(w in line for w in words), (args, line)
        assert tree_digest(good_run) == before, args


def test_a_run_directory_that_is_a_file_is_exit_2(tmp_path):
    target = tmp_path / "run"
    target.write_text("not a directory")
    result = run_cli("run", "--run-dir", str(target), "--data", "bundled")
    assert result.returncode == 2
    assert "is a file" in one_line(result) and target.read_text() == "not a directory"


@another_user
def test_a_run_directory_that_is_not_writable_is_exit_2(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    owned_by_someone_else(shared)  # others may read it, not write
    result = run_cli("run", "--run-dir", str(shared / "run"), "--data", "bundled",
                     as_another_user=True)
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_line(result)
    assert "not writable" in line and "Permission denied" in line and "Run the same" not in line
    assert not (shared / "run").exists()


def test_an_unreachable_prefect_api_is_exit_2_naming_it(tmp_path):
    url = "http://127.0.0.1:9/api"  # the discard port: nothing listens
    result = run_cli("run", "--run-dir", str(tmp_path / "run"), "--data", "bundled",
                     env_extra={"PREFECT_API_URL": url}, timeout=120)
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    line = result.stderr.strip().splitlines()[-1]
    assert url in line and "unreachable" in line and "PREFECT_API_URL" in line
    assert "Run the same command again" not in result.stderr


@pytest.mark.timeout(300)
def test_verify_fails_a_run_whose_exports_were_never_made(tmp_path):
    from ckptflow.stages.evaluate import evaluate
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.stages.verify import verify_run_dir
    from ckptflow.training.stage import train_with_checkpoints

    config = small_config(tmp_path, epochs=1)
    data = prepare_run(config)
    trained = train_with_checkpoints(tmp_path, config, data)
    evaluate(tmp_path, data, trained.checkpoint_ref())  # then killed before its first export
    rows = verify_run_dir(tmp_path)
    failed = {(r.kind, r.format): r.problem for r in rows if not r.ok}
    assert {("export", f) for f in ("tf_checkpoint", "weights_h5", "keras", "h5", "saved_model")} \
        <= set(failed)
    assert "requested but not exported" in failed[("export", "keras")]
    assert ("report", "markdown") in failed
    assert all(r.ok for r in rows if not r.path.startswith("("))  # every file present is intact
    result = run_cli("verify", str(tmp_path))
    assert result.returncode == 1 and "verify failed" in result.stderr


@pytest.mark.timeout(300)
@pytest.mark.xdist_group("finished_run")  # one default run per session, not two
def test_verify_fails_exports_of_an_older_checkpoint_than_training_reached(good_run):
    from ckptflow.config import TrainConfig
    from ckptflow.core.manifest import read_manifest
    from ckptflow.core.snapshot import DataRecord
    from ckptflow.stages.verify import verify_run_dir
    from ckptflow.training.stage import train_with_checkpoints

    manifest = read_manifest(good_run)
    config = TrainConfig(**{**manifest["parameters"], "run_dir": str(good_run), "epochs": 11})
    train_with_checkpoints(good_run, config, DataRecord(**manifest["data"]))  # then killed
    failed = {(r.kind, r.format): r.problem for r in verify_run_dir(good_run) if not r.ok}
    assert "exported from checkpoints/cp-0010" in failed[("export", "keras")]
    assert "training reached checkpoints/cp-0011" in failed[("export", "keras")]
    assert "evaluation is of checkpoints/cp-0010" in failed[("evaluation", "csv")]
    assert "report is of checkpoints/cp-0010" in failed[("report", "markdown")]


@pytest.mark.xdist_group("finished_run")  # one default run per session, not two
def test_files_of_a_run_follow_the_umask(finished_run):
    run_dir = finished_run[0]
    expected = 0o666 & ~current_umask()
    for relative in ("manifest.json", "data/mnist.npz", "report.md", "metrics/history.csv",
                     "metrics/evaluation.csv", "exports/exports.json",
                     "exports/reference_predictions.npy"):
        assert (run_dir / relative).stat().st_mode & 0o777 == expected, relative


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.timeout(300)
@another_user
@pytest.mark.xdist_group("finished_run")  # one default run per session, not two
def test_another_user_verifies_a_run_directory_or_is_told_in_one_line(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)  # files 0644, directories 0755 under umask 022
    owned_by_someone_else(run_dir)
    # the other user's temporary directory, short: the loader's socket lives there too (AF_UNIX
    # paths end at 107 bytes)
    scratch = Path(tempfile.mkdtemp(prefix="ckv-", dir="/tmp"))
    scratch.chmod(0o1777)
    try:
        result = run_cli("verify", str(run_dir), as_another_user=True,
                         env_extra={"TMPDIR": str(scratch)})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert result.stdout.count(" OK ") >= 10
        # the native log it could not keep in the run directory is gone once every load passed
        assert list(scratch.glob("ckptflow-*")) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    run_dir.chmod(0o700)  # now closed to others
    result = run_cli("verify", str(run_dir), as_another_user=True)
    assert result.returncode == 2
    line = one_line(result)
    assert "cannot read" in line and str(run_dir) in line and "Permission denied" in line


@pytest.mark.xdist_group("finished_run")  # one default run per session, not two
def test_a_snapshot_already_scaled_is_taken_as_it_is(finished_run, tmp_path):
    from ckptflow.core.snapshot import data_digest, load_snapshot
    from ckptflow.stages.fetch_data import fetch_data

    snapshot = RunDir(finished_run[0]).snapshot
    original = load_snapshot(snapshot)
    record = fetch_data(tmp_path / "again", str(snapshot), train_samples=1000, test_samples=1000)
    assert record.data_sha256 == data_digest(original)  # not divided by 255 a second time
    assert float(load_snapshot(RunDir(tmp_path / "again").snapshot)["x_train"].max()) == 1.0


@pytest.mark.xdist_group("finished_run")  # one default run per session, not two
def test_tf_latest_checkpoint_finds_the_export_and_the_newest_checkpoint(finished_run):
    """The run was made as `runs/default`, relative to its working directory."""
    import tensorflow as tf

    run = RunDir(finished_run[0])
    exported = run.exports / "tf_checkpoint"
    assert tf.train.latest_checkpoint(str(exported)) == str(exported / "ckpt")
    assert tf.train.latest_checkpoint(str(run.checkpoints)) == str(
        run.checkpoints / "cp-0010" / "train_state")


def test_artifact_keys_of_different_run_directories_differ():
    from ckptflow.orchestration.artifacts import artifact_key

    keys = {artifact_key(d, "summary") for d in ("runs/a/r1", "runs/a_r1", "RUNS/A/R1")}
    assert len(keys) == 3
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") for k in keys)
    assert artifact_key("runs/a/r1/", "summary") == artifact_key("runs/a/r1", "summary")


@pytest.mark.timeout(600)
def test_a_killed_run_is_marked_crashed_by_the_next_run(tmp_path, prefect_api_url):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    run_dir = tmp_path / "killed"
    args = ["run", "--run-dir", str(run_dir), "--data", "bundled", "--train-samples", "256",
            "--test-samples", "128", "--units", "16", "--formats", "keras", "--epochs"]
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    first = subprocess.Popen([CKPTFLOW, *args, "200"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(RunDir(run_dir).checkpoints.glob("cp-0001")) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    name = FlowRunFilter(name=FlowRunFilterName(any_=[f"train {run_dir}"]))
    with get_client(sync_client=True) as client:
        (killed,) = client.read_flow_runs(flow_run_filter=name)
        assert killed.state.is_running()  # what Prefect shows until someone looks
    again = run_cli(*args, "2", env_extra={"PREFECT_API_URL": prefect_api_url})
    assert again.returncode == 0, again.stderr[-2000:]
    with get_client(sync_client=True) as client:
        states = {r.id: r.state for r in client.read_flow_runs(flow_run_filter=name)}
    assert states[killed.id].is_crashed() and "without releasing" in states[killed.id].message
    assert [s.is_completed() for i, s in states.items() if i != killed.id] == [True]


@pytest.mark.timeout(300)
def test_bad_input_inside_the_flow_is_not_retried_by_the_flow(tmp_path, prefect_server):
    from ckptflow.flows.train_pipeline import train_pipeline
    from ckptflow.stages.prepare import prepare_run

    prepare_run(small_config(tmp_path, seed=7))
    state = train_pipeline(small_config(tmp_path, seed=8), return_state=True)
    assert state.is_failed() and "different" in state.message
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).run_count == 1
