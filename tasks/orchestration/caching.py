"""When Prefect may skip a stage: only while the stage's outputs are on disk, unchanged."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from ckptflow.core.files import sha256_path


def cache_while_present(outputs: Callable[[dict[str, Any]], list[Path]]) -> Callable:
    """A `cache_key_fn` that lets Prefect skip a task only while its outputs are on disk, unchanged.

    The key covers the task's source, its inputs and the SHA-256 of each output. A deleted or
    changed output, or changed code, gives a new key, so the task runs instead of returning
    stale paths. Outputs are only known once the task has run, so the first run after outputs
    appear runs the task too; the stages make that cheap by reusing outputs they can verify.
    """

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        paths = outputs(parameters)
        if not paths or not all(Path(p).exists() for p in paths):
            return None
        source = inspect.getsource(context.task.fn)
        return hash_objects(source, parameters, [sha256_path(p) for p in paths])

    return key
