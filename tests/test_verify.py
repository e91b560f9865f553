"""`ckptflow verify`: a good run directory passes anywhere; damage and tricks fail, naming the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptflow.core.errors import BadInputError
from ckptflow.core.files import sha256_path
from ckptflow.core.formats import FORMATS, ExportFormat, select_formats
from ckptflow.core.run_dir import RunDir

# Tests of the one finished default run stay on one pytest worker, so it runs once.
pytestmark = pytest.mark.xdist_group("finished_run")

CKPTFLOW = str(Path(sys.executable).parent / "ckptflow")


def verify(run_dir: Path) -> tuple[int, list[dict], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    result = subprocess.run([CKPTFLOW, "verify", str(run_dir), "--json"], capture_output=True,
                            text=True, timeout=300, env=env)
    rows = json.loads(result.stdout) if result.stdout.strip().startswith("[") else []
    return result.returncode, rows, result.stderr


@pytest.fixture
def copied_run(finished_run, tmp_path) -> Path:
    """The finished run copied to another place, as to another machine."""
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(finished_run[0], copy)
    return copy


def _flip_one_byte(path: Path) -> None:
    target = path if path.is_file() else max((p for p in path.rglob("*") if p.is_file()),
                                               key=lambda p: p.stat().st_size)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))


def _add_entries(run_dir: Path, entries: list[dict]) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["artifacts"].extend(entries)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_copied_run_directory_verifies_with_every_format(copied_run):
    code, rows, stderr = verify(copied_run)
    assert code == 0, stderr[-2000:]
    assert "Starting temporary server" not in stderr  # verify needs no Prefect at all
    exports = {r["format"]: r for r in rows if r["kind"] == "export"}
    assert set(exports) == set(FORMATS)  # the formats extra is part of `make test`'s install
    for row in exports.values():
        assert row["ok"] and row["max_abs_diff"] <= FORMATS[row["format"]].tolerance
        assert row["load_seconds"] is not None and row["accuracy"] > 0.5
    assert all(r["ok"] for r in rows)


def test_every_kind_of_damage_fails_and_names_the_file(copied_run, tmp_path):
    manifest = json.loads((copied_run / "manifest.json").read_text())
    exports = [a for a in manifest["artifacts"] if a["kind"] == "export"]
    for entry in exports:
        _flip_one_byte(copied_run / entry["path"])
    (copied_run / "metrics" / "history.csv").unlink()

    lambda_keras = copied_run / "exports" / "lambda.keras"
    subprocess.run([sys.executable, "-c", (
        "import keras, sys\n"
        "i = keras.Input((784,))\n"
        "m = keras.Model(i, keras.layers.Lambda(lambda t: t * 2)(keras.layers.Dense(10)(i)))\n"
        "m.save(sys.argv[1])\n"), str(lambda_keras)], check=True, capture_output=True,
        timeout=120)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not part of the run")
    (copied_run / "exports" / "link.bin").symlink_to(outside)
    _add_entries(copied_run, [
        {"kind": "export", "format": "keras", "path": "exports/lambda.keras",
         "sha256": sha256_path(lambda_keras), "bytes": 1, "test_accuracy": 0.5},
        {"kind": "export", "format": "onnx", "path": "../outside.bin", "sha256": "0", "bytes": 1},
        {"kind": "export", "format": "onnx", "path": str(outside), "sha256": "0", "bytes": 1},
        {"kind": "export", "format": "onnx", "path": "exports/link.bin",
         "sha256": sha256_path(outside), "bytes": 1},
    ])
    code, rows, stderr = verify(copied_run)
    assert code == 1
    by_path = {r["path"]: r for r in rows}
    for entry in exports:
        row = by_path[entry["path"]]
        assert not row["ok"] and "SHA-256 does not match" in row["problem"], row
        assert entry["path"] in stderr
    assert by_path["metrics/history.csv"]["problem"] == "missing"
    assert "Lambda" in by_path["exports/lambda.keras"]["problem"]
    assert "safe_mode" in by_path["exports/lambda.keras"]["problem"]
    assert "leaves the run directory" in by_path["../outside.bin"]["problem"]
    assert "leaves the run directory" in by_path[str(outside)]["problem"]
    assert "outside the run directory" in by_path["exports/link.bin"]["problem"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"artifacts": [{"kind": "export", "path": "x"}]}', "lacks ['format', 'sha256', 'bytes']"),
    ('{"artifacts": []}', "lists no artifacts"),
])
def test_an_unusable_manifest_gets_a_one_line_error(tmp_path, content, message):
    (tmp_path / "manifest.json").write_text(content)
    code, _, stderr = verify(tmp_path)
    assert code == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("ckptflow: error:") and message in last


def test_a_wrongly_shaped_hdf5_file_is_caught_by_inspection(tmp_path):
    from ckptflow.core.models import weight_shapes
    from ckptflow.stages.verify import inspect_hdf5
    from ckptflow.tutorial.model import create_model

    model = create_model(units=32, seed=1)
    model.save_weights(tmp_path / "small.weights.h5")
    assert weight_shapes(model) == [[784, 32], [32], [32, 10], [10]]
    assert inspect_hdf5(tmp_path / "small.weights.h5", weight_shapes(model)) == ""
    problem = inspect_hdf5(tmp_path / "small.weights.h5", [[784, 64], [64], [64, 10], [10]])
    assert "lacks datasets of shapes" in problem and "(784, 64)" in problem


def test_an_unregistered_custom_class_gets_a_clear_message(tmp_path):
    code = (
        "import keras, sys\n"
        "@keras.saving.register_keras_serializable(package='elsewhere')\n"
        "class Twice(keras.layers.Layer):\n"
        "    def call(self, x): return x * 2\n"
        "i = keras.Input((4,))\n"
        "keras.Model(i, Twice()(i)).save(sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "custom.keras")], check=True,
                   capture_output=True, timeout=120)
    from ckptflow.core.formats import load_keras_model

    with pytest.raises(BadInputError, match=r"custom class .*Twice.*Import the module") as info:
        load_keras_model(tmp_path / "custom.keras")
    assert "\n" not in str(info.value)


def test_formats_with_missing_packages_are_skipped_with_a_message():
    absent = ExportFormat("future", "model.future", lambda m, p: None, lambda p, x, i: x,
                          "n/a", requires=("no_such_runtime_pkg",))
    registry = {"keras": FORMATS["keras"], "future": absent}
    chosen, skipped = select_formats(None, registry)
    assert [f.name for f in chosen] == ["keras"]
    assert skipped == ["future: skipped, needs no_such_runtime_pkg (pip install -e '.[formats]')"]
    with pytest.raises(BadInputError, match="needs no_such_runtime_pkg"):
        select_formats(["future"], registry)
    with pytest.raises(BadInputError, match="Unrecognized format"):
        select_formats(["gguf"], registry)


def test_a_deleted_reference_makes_the_exports_stale(copied_run):
    from ckptflow.core.resume_point import CheckpointRef
    from ckptflow.stages.export import intact_exports

    index = json.loads((copied_run / "exports" / "exports.json").read_text())
    ref = CheckpointRef(path=index["checkpoint"], commit_sha256=index["commit_sha256"],
                        epoch=10, batch=0, step=320)
    assert intact_exports(copied_run, ref) is not None
    RunDir(copied_run).reference.unlink()
    assert intact_exports(copied_run, ref) is None
