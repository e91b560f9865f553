"""When Prefect may skip a stage: only while the stage's outputs are on disk, unchanged."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from ckptflow.core.files import sha256_path
from ckptflow.orchestration.results import CacheRecordStorage, RecordSerializer


def cache_while_present(outputs: Callable[[dict[str, Any]], list[Path]]) -> dict[str, Any]:
    """Task options that let Prefect skip a task only while its outputs are on disk, unchanged.

    The cache key covers the task's source, its inputs and the SHA-256 of each output, so a
    deleted or changed output, or changed code, runs the task again. The first run after outputs
    appear runs it too (the stages reuse outputs they can verify). Results are JSON records.
    """

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        paths = outputs(parameters)
        if not paths or not all(Path(p).exists() for p in paths):
            return None
        source = inspect.getsource(context.task.fn)
        return hash_objects(source, parameters, [sha256_path(p) for p in paths])

    return {"cache_policy": CacheKeyFnPolicy(cache_key_fn=key, key_storage=CacheRecordStorage()),
            "result_serializer": RecordSerializer(), "persist_result": True}
