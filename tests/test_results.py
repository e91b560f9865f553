"""Results Prefect persists for ckptflow are JSON of our records; a tampered one is never executed.

Prefect reads a cached result with the serializer its cache record names, so a record rewritten
to say "pickle" would run its payload on the next cache lookup. These tests write such payloads
(each would create a marker file if unpickled) and check that nothing runs.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import pkgutil
from importlib import import_module
from pathlib import Path

import cloudpickle
import pytest
from conftest import cache_records, forget_verify, pickled_results, small_config, task_states

from ckptflow.orchestration.results import (
    CacheRecordStorage,
    RecordedFailure,
    RecordSerializer,
    UntrustedResult,
    check_cache_record,
)


class CreatesMarker:
    """Unpickling this creates `path`: the proof that a payload was executed."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def pickled_record(storage_key: str, marker: Path) -> dict:
    """A cache record as Prefect writes one for the pickle serializer, carrying the marker payload."""
    return {"metadata": {"storage_key": storage_key, "expiration": None,
                         "serializer": {"type": "pickle", "picklelib": "cloudpickle"},
                         "prefect_version": "3.9.1", "storage_block_id": None},
            "result": base64.b64encode(cloudpickle.dumps(CreatesMarker(marker))).decode()}


def test_records_round_trip_as_json_and_anything_else_is_refused(tmp_path):
    from ckptflow.core.integrity import VerifyRow
    from ckptflow.stages.export import ExportRecord

    serializer = RecordSerializer()
    row = VerifyRow(kind="export", format="keras", path="exports/model.keras", ok=True, bytes=3)
    export = ExportRecord(format="h5", path="exports/model.h5", sha256="ab", bytes=9,
                          test_accuracy=0.5, max_abs_diff=0.0, loader="keras")
    blob = serializer.dumps([row, row])
    assert json.loads(blob)["record"] == "ckptflow.core.integrity.VerifyRow"
    assert serializer.loads(blob) == [row, row]
    assert serializer.loads(serializer.dumps(export)) == export
    assert serializer.loads(serializer.dumps([])) == []
    from ckptflow.core.errors import InjectedFailure

    failure = serializer.loads(serializer.dumps(InjectedFailure("after epoch 1")))
    assert type(failure) is RecordedFailure  # a name and a message, not the class it names
    assert str(failure) == "ckptflow.core.errors.InjectedFailure: after epoch 1"
    with pytest.raises(TypeError, match="registered result records only"):
        serializer.dumps({"a": 1})
    cloudpickle.loads(cloudpickle.dumps(CreatesMarker(tmp_path / "live")))
    assert (tmp_path / "live").is_dir()  # the payload does run when unpickled
    marker = tmp_path / "marker"
    for blob in (cloudpickle.dumps(CreatesMarker(marker)),
                 json.dumps(pickled_record("x", marker)).encode(),
                 json.dumps({"record": "os.system", "many": False, "data": "touch x"}).encode(),
                 json.dumps({"record": "ckptflow.core.integrity.VerifyRow", "many": False,
                             "data": {"kind": 1}}).encode()):
        with pytest.raises(ValueError):  # UntrustedResult, or the record's ValidationError
            serializer.loads(blob)
    assert not marker.exists()


def test_a_cache_record_naming_another_serializer_is_refused_before_prefect_reads_it(tmp_path):
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    marker = tmp_path / "marker"
    storage = CacheRecordStorage()
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "storage"}):
        result = tmp_path / "storage" / "key1"
        result.parent.mkdir()
        result.write_bytes(RecordSerializer().dumps([]))
        good = {"storage_key": str(result), "expiration": None,
                "serializer": {"type": "ckptflow-records"}, "prefect_version": "3.9.1",
                "storage_block_id": None}
        storage.write_path("key1", json.dumps(good).encode())
        assert json.loads(storage.read_path("key1")) == good
        refused = {"pickle": pickled_record(str(result), marker)["metadata"],
                   "json": {**good, "serializer": {"type": "json", "object_decoder": "os.system"}},
                   "block": {**good, "storage_block_id": "9f7f5ac4-77b5-4a3a-9b8e-3f1c3c6f0f43"},
                   "outside": {**good, "storage_key": "/etc/passwd"}}
        for key, record in refused.items():
            storage.write_path(key, json.dumps(record).encode())
            with pytest.raises(UntrustedResult):
                storage.read_path(key)
        result.write_text(json.dumps(pickled_record(str(result), marker)))  # the result itself
        with pytest.raises(UntrustedResult, match="not a ckptflow result record"):
            storage.read_path("key1")
        with pytest.raises(UntrustedResult, match="leaves"):
            storage.read_path("../key1")
    with pytest.raises(UntrustedResult, match="not JSON"):
        check_cache_record(b"\x80\x04K\x01.", "raw pickle")
    assert not marker.exists()


def test_every_task_and_flow_persists_nothing_or_json_records():
    """No Prefect object of the package can fall back to Prefect's default (pickle) serializer,
    whatever PREFECT_RESULTS_PERSIST_BY_DEFAULT says."""
    from prefect import Flow, Task

    import ckptflow
    import ckptflow.flows

    found = {}
    for package in (ckptflow, ckptflow.flows):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name == "ckptflow.__main__":  # runs the CLI when imported
                continue
            for _, obj in inspect.getmembers(import_module(info.name)):
                if isinstance(obj, Task | Flow):
                    found[f"{obj.fn.__module__}.{obj.fn.__name__}"] = obj
    assert len(found) == 14, sorted(found)  # 11 tasks, 3 flows
    for name, obj in found.items():
        if isinstance(obj, Flow):  # Prefect persists a failed flow run's exception regardless
            assert obj.persist_result is False, name
            assert isinstance(obj.result_serializer, RecordSerializer), name
        elif obj.persist_result is not False:
            assert isinstance(obj.result_serializer, RecordSerializer), name
            assert isinstance(obj.cache_policy.key_storage, CacheRecordStorage), name
    cached = sorted(n for n, o in found.items() if isinstance(o, Task) and o.persist_result is not False)
    assert cached == ["ckptflow.stages.evaluate.evaluate_task", "ckptflow.stages.export.export_task",
                      "ckptflow.stages.verify.verify_task"]


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.timeout(600)
def test_tampered_results_are_recomputed_never_executed(tmp_path):
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from ckptflow.flows.train_pipeline import train_pipeline

    home, marker = tmp_path / "home", tmp_path / "marker"
    config = small_config(tmp_path / "run", epochs=1, formats=["keras"])
    cached = ("evaluate", "export-each-format", "verify")

    def run(**options):  # through the pipeline, not answered from the manifest
        if (tmp_path / "run" / "manifest.json").exists():
            forget_verify(tmp_path / "run")
        return train_pipeline(config, **options)

    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: home / "storage"}):
        for _ in range(2):  # the second run finds every output, so every cached stage writes one
            run()
        third = task_states(run(return_state=True))
        assert {third[t] for t in cached} == {"Cached"}, third
        records = cache_records(home)
        assert len(records) >= 3 and {r["serializer"]["type"] for r in records} == {"ckptflow-records"}
        assert pickled_results(home) == []

        files = [p for p in (home / "storage").rglob("*") if p.is_file()]
        for path in files:  # results and cache records alike now carry the pickled payload
            record = pickled_record(str(path), marker)
            path.write_text(json.dumps(record if path.parent.name == "storage" else record["metadata"]))
        state = run(return_state=True)
        assert state.is_completed()
        assert not marker.exists(), "a tampered result was unpickled"
        states = task_states(state)
        assert {states[t] for t in cached} == {"Completed"}  # recomputed, not served from the cache
        rewritten = [r for r in cache_records(home) if r["serializer"] == {"type": "ckptflow-records"}]
        assert len(rewritten) >= 3  # the reruns' fresh records (older keys keep the tampered ones)
        again = task_states(run(return_state=True))
        assert {again[t] for t in cached} == {"Cached"}, again
    assert not marker.exists()


@pytest.mark.xdist_group("finished_run")
def test_a_full_run_writes_json_records_and_no_pickle_anywhere(finished_run):
    run_dir, _ = finished_run
    home = run_dir.parents[1] / "prefect_home"  # `python flows/train_pipeline.py`'s PREFECT_HOME
    records = cache_records(home)
    assert records and all(r["serializer"] == {"type": "ckptflow-records"} for r in records)
    assert (home / "prefect.db").is_file()  # the temporary server's database is scanned too
    assert pickled_results(home) == []


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.timeout(300)
def test_a_failed_runs_exception_is_persisted_as_json(tmp_path):
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from ckptflow.flows.train_pipeline import train_pipeline

    storage = tmp_path / "storage"
    config = small_config(tmp_path / "run", epochs=2, fail_after_epoch=1, formats=["keras"])
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        state = train_pipeline.with_options(retries=0)(config, return_state=True)
    assert state.is_failed()
    assert state.data.metadata.serializer.type == "ckptflow-records"
    result = Path(state.data.metadata.storage_key)
    assert result.parent == storage
    failure = RecordSerializer().loads(result.read_bytes())
    assert str(failure).startswith("ckptflow.core.errors.InjectedFailure: injected failure 1 of 1")
    assert pickled_results(storage) == [] and not [p for p in storage.rglob("*") if
                                                   p.is_file() and p.read_bytes()[:2] == b"gA"]
