"""fetch-data on its own: every source, the offline fallback, validation, and the one-data rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import tree_digest

from ckptflow.core.errors import BadInputError
from ckptflow.core.manifest import read_manifest
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import data_digest, load_snapshot
from ckptflow.stages.fetch_data import fetch_data


def test_bundled_is_stratified_scaled_and_snapshotted(tmp_path):
    record = fetch_data(tmp_path, "bundled", train_samples=1000, test_samples=500, seed=3)
    arrays = load_snapshot(RunDir(tmp_path).snapshot)
    assert arrays["x_train"].shape == (1000, 784) and arrays["x_test"].shape == (500, 784)
    assert arrays["x_train"].dtype == np.float32
    assert 0.0 <= arrays["x_train"].min() and arrays["x_train"].max() <= 1.0
    assert np.bincount(arrays["y_train"], minlength=10).tolist() == [100] * 10
    assert np.bincount(arrays["y_test"], minlength=10).tolist() == [50] * 10
    assert record.source == "bundled" and record.data_sha256 == data_digest(arrays)
    assert read_manifest(tmp_path)["data"]["data_sha256"] == record.data_sha256


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    a = fetch_data(tmp_path / "a", "bundled", 300, 100, seed=1)
    b = fetch_data(tmp_path / "b", "bundled", 300, 100, seed=1)
    c = fetch_data(tmp_path / "c", "bundled", 300, 100, seed=2)
    assert a.data_sha256 == b.data_sha256 != c.data_sha256


def test_auto_falls_back_to_bundled_offline(tmp_path, offline_keras_home):
    record = fetch_data(tmp_path, "auto", 100, 100)
    assert record.source == "bundled"
    assert "no Keras cache" in record.reason and str(offline_keras_home) in record.reason


def test_auto_survives_a_damaged_keras_cache(tmp_path, monkeypatch):
    # The Keras loader checks mnist.npz against its known hash and re-downloads on a mismatch;
    # offline that fails, and `auto` must still fall back to the bundled images and say why.
    (tmp_path / "keras" / "datasets").mkdir(parents=True)
    (tmp_path / "keras" / "datasets" / "mnist.npz").write_bytes(b"truncated download")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    record = fetch_data(tmp_path / "run", "auto", 10, 10)
    assert record.source == "bundled" and "Keras cache" in record.reason
    with pytest.raises(ConnectionError, match="use data=auto or data=bundled"):
        fetch_data(tmp_path / "run2", "keras", 10, 10)  # asked for keras explicitly: no fallback


def test_npz_in_keras_layout(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (40, 28, 28)).astype(np.uint8),
              "y_train": np.arange(40) % 10, "x_test": rng.integers(0, 256, (30, 784)),
              "y_test": np.arange(30) % 10}
    np.savez(tmp_path / "m.npz", **arrays)
    record = fetch_data(tmp_path / "run", str(tmp_path / "m.npz"), 40, 30)
    got = load_snapshot(RunDir(tmp_path / "run").snapshot)
    np.testing.assert_allclose(got["x_train"], arrays["x_train"].reshape(40, 784) / 255.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(got["y_test"], arrays["y_test"])
    assert record.source.endswith("m.npz")


def test_csv_with_header_is_split_stratified(tmp_path):
    rng = np.random.default_rng(0)
    table = np.hstack([rng.integers(0, 256, (200, 784)), (np.arange(200) % 10)[:, None]])
    pd.DataFrame(table, columns=[f"p{i}" for i in range(784)] + ["label"]).to_csv(
        tmp_path / "d.csv", index=False)
    fetch_data(tmp_path / "run", str(tmp_path / "d.csv"), 100, 50)
    got = load_snapshot(RunDir(tmp_path / "run").snapshot)
    assert np.bincount(got["y_test"], minlength=10).tolist() == [5] * 10


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "not found"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), "not a readable .npz"),
    (lambda p: np.savez(p, x_train=np.zeros((5, 10)), y_train=np.zeros(5), x_test=np.zeros((5, 10)),
                        y_test=np.zeros(5)), "Expected 28x28"),
    (lambda p: np.savez(p, x_train=np.zeros((5, 784)), y_train=np.full(5, 12),
                        x_test=np.zeros((5, 784)), y_test=np.zeros(5)), "labels must be integers 0-9"),
    (lambda p: np.savez(p, x_train=np.zeros((5, 784))), "lacks arrays"),
])
def test_bad_npz_is_refused_with_one_line(tmp_path, make, message):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(BadInputError, match=message) as info:
        fetch_data(tmp_path / "run", str(path), 5, 5)
    assert "\n" not in str(info.value)
    assert not (RunDir(tmp_path / "run").snapshot).exists()


def test_too_many_samples_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="fewer than train_samples"):
        fetch_data(tmp_path, "bundled", 4900, 200)


def test_unwritable_run_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(BadInputError, match="not writable"):
        fetch_data(blocker / "run", "bundled", 10, 10)


def test_other_data_in_an_existing_run_dir_is_refused_and_nothing_changes(tmp_path):
    fetch_data(tmp_path, "bundled", 100, 50, seed=1)
    before = tree_digest(tmp_path)
    with pytest.raises(BadInputError, match="already holds different data"):
        fetch_data(tmp_path, "bundled", 100, 50, seed=2)
    assert tree_digest(tmp_path) == before


def test_second_fetch_reuses_the_snapshot(tmp_path):
    first = fetch_data(tmp_path, "bundled", 100, 50)
    before = tree_digest(tmp_path / "data")
    again = fetch_data(tmp_path, "bundled", 100, 50)
    assert again == first and tree_digest(tmp_path / "data") == before


def test_a_missing_snapshot_does_not_let_other_data_in(tmp_path):
    fetch_data(tmp_path, "bundled", 100, 50, seed=1)
    (RunDir(tmp_path).snapshot).unlink()
    with pytest.raises(BadInputError, match="already holds different data"):
        fetch_data(tmp_path, "bundled", 100, 50, seed=2)
    assert not (RunDir(tmp_path).snapshot).exists()
    fetch_data(tmp_path, "bundled", 100, 50, seed=1)  # the run's own data is restored
    assert (RunDir(tmp_path).snapshot).exists()
