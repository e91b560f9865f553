"""`ckptflow` as a user runs it: fast help, one-line errors, run, rerun, refusals, direct flow file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tree_digest

CKPTFLOW = str(Path(sys.executable).parent / "ckptflow")
SMALL = ["--data", "bundled", "--train-samples", "256", "--test-samples", "128", "--units", "64",
         "--epochs", "2", "--save-every-batches", "3", "--formats", "keras,saved_model"]


def run_cli(*args, cwd=None, timeout=300, api_url=None):
    """Run `ckptflow`; with no `api_url` as ad-hoc use does (Prefect's temporary local server)."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return subprocess.run([CKPTFLOW, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_help_imports_neither_tensorflow_nor_prefect():
    code = ("import sys, contextlib, io\nimport ckptflow.flows.cli as cli\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: cli.main(['run', '--help'])\n    except SystemExit: pass\n"
            "assert '--save-every-batches' in out.getvalue()\n"
            "print(sorted(m for m in ('tensorflow', 'keras', 'prefect') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("args, words", [
    (["--epochs", "0"], ["epochs", "greater than 0", "0"]),
    (["--batch-size", "-4"], ["batch_size", "greater than 0", "-4"]),
    (["--data", "mnist-please"], ["unknown data source", "mnist-please", "bundled"]),
    (["--dropout", "1.5"], ["dropout", "less than 1"]),
    (["--epochs", "ten"], ["--epochs", "invalid int value"]),
])
def test_bad_parameters_get_one_line_and_exit_2_before_any_work(tmp_path, args, words):
    result = run_cli("run", "--run-dir", str(tmp_path / "run"), *args, timeout=60)
    assert result.returncode == 2
    line = last_line(result.stderr)
    assert line.startswith(("ckptflow: error:", "ckptflow run: error:"))
    assert all(w in line for w in words), line
    assert not (tmp_path / "run").exists()


def test_run_rerun_and_refusals_from_the_command_line(tmp_path, prefect_api_url):
    run_dir = tmp_path / "run"
    first = run_cli("run", "--run-dir", str(run_dir), *SMALL)  # no server: the ad-hoc path
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [(a["resumed_from"], a["start_epoch"], a["end_epoch"], a["batches_trained"])
            for a in manifest["training"]["attempts"]] == [(None, 0, 2, 16)]
    exported = {a["format"] for a in manifest["artifacts"] if a["kind"] == "export"}
    assert exported == {"keras", "saved_model"}  # --formats honoured
    assert "trained from scratch to epoch 2 (16 batches)" in first.stdout  # the summary says so
    # Prefect's temporary server, started by the CLI while TensorFlow loads, and only that one
    assert "Starting temporary server" in first.stderr and "(while TensorFlow loads)" in first.stderr
    assert first.stderr.count("Starting temporary server") == 1

    # The same command again, this time against a running server (PREFECT_API_URL set):
    # answered from the manifest, nothing written
    before = tree_digest(run_dir)
    again = run_cli("run", "--run-dir", str(run_dir), *SMALL, api_url=prefect_api_url)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete at 2 epochs" in again.stdout
    assert tree_digest(run_dir) == before

    other_model = run_cli("run", "--run-dir", str(run_dir), *SMALL, "--units", "32",
                          api_url=prefect_api_url)
    assert other_model.returncode == 2
    line = last_line(other_model.stderr)
    assert line.startswith("ckptflow: error:") and "units" in line and "--run-dir" in line
    assert tree_digest(run_dir) == before


@pytest.mark.xdist_group("finished_run")
def test_the_flow_file_runs_directly_as_prefect_users_expect(finished_run):
    run_dir, output = finished_run
    history = (run_dir / "metrics" / "history.csv").read_text().splitlines()
    assert len(history) == 11  # header + the tutorial's 10 epochs
    assert "Finished in state Completed" in output


def test_boolean_options_parse_as_flags():
    from ckptflow.flows.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run"]).deterministic is True
    assert parser.parse_args(["run", "--no-deterministic"]).deterministic is False
    assert parser.parse_args(["run", "--wait-for-lock", "30"]).wait_for_lock == 30.0


# TensorFlow's, absl's and the converters' native lines, which a user reads as failures.
NATIVE_NOISE = re.compile(r"absl::InitializeLog|cuInit|cudart_stub|cuda drivers|NodeDef mentions|"
                          r"FutureWarning|XNNPACK|^[IWEF]\d{4} \d\d:\d\d|saving your model as an HDF5",
                          re.MULTILINE)


def test_a_run_prints_its_own_lines_and_the_native_output_goes_to_the_run_log(tmp_path):
    """Every format exported and verified (LiteRT and ONNX too), and not one native line of
    TensorFlow, its converters or verify's loader processes on the terminal: they are in
    logs/native.log."""
    from ckptflow.core.formats import FORMATS
    from ckptflow.core.manifest import artifacts_digest

    run_dir = tmp_path / "run"
    result = run_cli("run", "--run-dir", str(run_dir), "--data", "bundled", "--train-samples",
                     "256", "--test-samples", "128", "--units", "64", "--epochs", "1",
                     timeout=600)
    said = result.stdout + result.stderr
    assert result.returncode == 0, said[-3000:]
    assert not NATIVE_NOISE.findall(said), said[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    exported = {a["format"] for a in manifest["artifacts"] if a["kind"] == "export"}
    assert exported == {f.name for f in FORMATS.values() if not f.missing()} == set(FORMATS)
    # the run's verify passed on exactly these files (each export loaded in a fresh process)
    assert manifest["verified"]["artifacts_sha256"] == artifacts_digest(manifest)
    native = (run_dir / "logs" / "native.log").read_text()
    assert NATIVE_NOISE.search(native), native[-3000:]  # TensorFlow's start-up lines at least
