"""The whole pipeline through a real Prefect API server: stages, retries, caching and resume."""

from __future__ import annotations

import pytest
from conftest import forget_verify, small_config, task_states, tree_digest

from ckptflow.core.errors import InjectedFailure
from ckptflow.core.files import sha256_path
from ckptflow.core.manifest import read_manifest
from ckptflow.flows.train_pipeline import train_pipeline

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_a_failed_flow_run_again_continues_at_the_next_epoch(tmp_path):
    config = small_config(tmp_path, epochs=3, fail_after_epoch=2)
    with pytest.raises(InjectedFailure):
        train_pipeline.with_options(retries=0)(config)
    assert read_manifest(tmp_path).get("training") is None  # training never finished
    summary = train_pipeline.with_options(retries=0)(config)
    training = summary["training"]
    assert training["resumed_from"] == "checkpoints/cp-0002"
    assert (training["start_epoch"], training["start_batch"]) == (2, 0)
    assert training["batches_trained"] == 8 and training["step"] == 24  # optimizer iterations
    assert summary["evaluation"]["epoch"] == 3


def test_the_flow_retry_resumes_from_the_checkpoint(tmp_path):
    config = small_config(tmp_path, epochs=2, fail_after_epoch=1)
    state = train_pipeline(config, return_state=True)
    assert state.is_completed()
    attempts = read_manifest(tmp_path)["training"]["attempts"]
    assert [(a["start_epoch"], a["end_epoch"], a["batches_trained"]) for a in attempts] == [(1, 2, 8)]


def test_a_new_flow_run_skips_finished_stages(tmp_path):
    config = small_config(tmp_path, epochs=1)
    first = train_pipeline(config, return_state=True)
    assert set(task_states(first).values()) == {"Completed"}
    # the same request again: answered from the manifest, no task run, nothing written
    before, exports = tree_digest(tmp_path), tree_digest(tmp_path / "exports")
    second = train_pipeline(config, return_state=True)
    assert second.result()["training"]["batches_trained"] == 0 and task_states(second) == {}
    assert tree_digest(tmp_path) == before
    # without the record of a passed verify the pipeline runs: the first such run reuses the
    # outputs (nothing rewritten) and caches that, the next is served from Prefect's cache
    forget_verify(tmp_path)
    assert train_pipeline(config)["training"]["batches_trained"] == 0
    assert tree_digest(tmp_path / "exports") == exports
    forget_verify(tmp_path)
    states = task_states(train_pipeline(config, return_state=True))
    assert states["evaluate"] == "Cached" and states["export-each-format"] == "Cached"
    # a deleted output is not papered over by the cache: the stage runs again and rebuilds it
    (tmp_path / "exports" / "model.keras").unlink()
    fourth = train_pipeline(config, return_state=True)
    assert task_states(fourth)["export-each-format"] == "Completed"
    assert (tmp_path / "exports" / "model.keras").exists()
    keras_entry = next(a for a in read_manifest(tmp_path)["artifacts"]
                       if a["kind"] == "export" and a["format"] == "keras")
    assert keras_entry["sha256"] == sha256_path(tmp_path / "exports" / "model.keras")


def test_transient_errors_are_retried_and_bad_input_is_not(tmp_path):
    from prefect import flow

    from ckptflow.stages.fetch_data import fetch_data_task

    @flow(retries=0)
    def fetch_only(config) -> tuple:
        state = fetch_data_task(config, return_state=True)
        return state.state_details.task_run_id, state.is_failed()

    bad = fetch_only(small_config(tmp_path / "bad", data=str(tmp_path / "missing.npz")))
    offline = fetch_only(small_config(tmp_path / "offline", data="keras"))  # no network here
    assert bad[1] and offline[1]
    from prefect import get_client

    with get_client(sync_client=True) as client:
        run_counts = [client.read_task_run(run_id).run_count for run_id, _ in (bad, offline)]
    assert run_counts == [1, 4]  # bad input: no retry; network error: 1 try + 3 retries
