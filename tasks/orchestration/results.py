"""Results Prefect persists for ckptflow's cached stages: JSON of our own records, never pickle.

For a cached task Prefect writes two things: the result, and a cache record that names the
serializer to read the result with. On the next lookup Prefect believes that name, so a cache
record rewritten to say "pickle" makes the next run unpickle, and execute, whatever the file
holds. That is so even for a task declared with `result_serializer="json"`, and Prefect's JSON
decoder itself imports any class or callable a file names. So here:

- `RecordSerializer` writes and reads plain JSON of the pydantic records registered with
  `@result_record`, and of exceptions (type name and message: Prefect persists the exception of
  every failed flow run); it imports and calls nothing a file names.
- `CacheRecordStorage` refuses, before Prefect parses it, a cache record that names another
  serializer or a storage block: a cache miss, so the task runs again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, TypeVar

from prefect.filesystems import WritableFileSystem
from prefect.serializers import Serializer
from pydantic import BaseModel, Field, ValidationError

from ckptflow.core.files import atomic_write_bytes

log = logging.getLogger("ckptflow.results")

RECORD_SERIALIZER = "ckptflow-records"
# The fields Prefect writes into a cache record (ResultRecordMetadata); anything else is refused.
CACHE_RECORD_FIELDS = {"storage_key", "expiration", "serializer", "prefect_version", "storage_block_id"}

_records: dict[str, type[BaseModel]] = {}
Record = TypeVar("Record", bound=type[BaseModel])


def result_record(cls: Record) -> Record:
    """Register a pydantic model as a result `RecordSerializer` may read back (a class decorator)."""
    _records[record_name(cls)] = cls
    return cls


def record_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class UntrustedResult(ValueError):
    """A persisted result or cache record that ckptflow did not write; never read, recomputed."""


class RecordedFailure(Exception):
    """The exception of a failed run read back from its persisted result: a type name and a
    message, never the original object."""


EXCEPTION = "exception"  # the record name of a persisted exception


class RecordSerializer(Serializer):
    """A record registered with `@result_record`, or a list of them, as JSON:
    `{"record": NAME, "many": ..., "data": ...}`."""

    type: str = Field(default=RECORD_SERIALIZER, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, BaseException):
            return json.dumps({"record": EXCEPTION, "many": False, "data": {
                "type": record_name(type(obj)), "message": str(obj)}}).encode()
        many = isinstance(obj, list)
        items = obj if many else [obj]
        names = {record_name(type(item)) for item in items}
        if len(names) > 1 or not names <= set(_records):
            raise TypeError(f"RecordSerializer writes registered result records only. Received: "
                            f"{sorted(names)}. Expected one of {sorted(_records)}.")
        return json.dumps({"record": next(iter(names), None), "many": many,
                           "data": [item.model_dump(mode="json") for item in items] if many
                           else items[0].model_dump(mode="json")}).encode()

    def loads(self, blob: bytes) -> Any:
        try:
            payload = json.loads(blob)
        except ValueError as exc:
            raise UntrustedResult(f"a persisted result is not JSON ({exc})") from exc
        if not isinstance(payload, dict) or set(payload) != {"record", "many", "data"}:
            raise UntrustedResult("a persisted result is not a ckptflow result record")
        many, data = payload["many"], payload["data"]
        if many is True and data == []:
            return []
        if payload["record"] == EXCEPTION and isinstance(data, dict) and \
                all(isinstance(data.get(k), str) for k in ("type", "message")):
            return RecordedFailure(f"{data['type']}: {data['message']}")
        model = _records.get(payload["record"]) if isinstance(payload["record"], str) else None
        if model is None:
            raise UntrustedResult(f"a persisted result names {payload['record']!r}, which is not "
                                  f"a registered result record")
        if many is True and isinstance(data, list):
            return [model.model_validate(item) for item in data]
        if many is False:
            return model.model_validate(data)
        raise UntrustedResult("a persisted result has a malformed 'many' field")


def check_cache_record(content: bytes, where: str) -> bytes:
    """`content` if it is a cache record of RecordSerializer's, else UntrustedResult (also when
    its result on local disk does not load: a cache miss, not a failed task)."""
    try:
        record = json.loads(content)
    except ValueError as exc:
        raise UntrustedResult(f"cache record {where} is not JSON") from exc
    if not isinstance(record, dict) or not set(record) <= CACHE_RECORD_FIELDS:
        raise UntrustedResult(f"cache record {where} is not a Prefect cache record")
    if record.get("serializer") != {"type": RECORD_SERIALIZER}:
        raise UntrustedResult(f"cache record {where} names the serializer "
                              f"{record.get('serializer')!r}, not {RECORD_SERIALIZER!r}")
    if record.get("storage_block_id") is not None or not isinstance(record.get("storage_key"), str):
        raise UntrustedResult(f"cache record {where} points at another storage")
    result = Path(record["storage_key"])
    if result.is_absolute():
        if not result.resolve().is_relative_to(local_storage_path()) or not result.is_file():
            raise UntrustedResult(f"cache record {where} points outside Prefect's result storage")
        try:
            RecordSerializer().loads(result.read_bytes())
        except OSError as exc:
            raise UntrustedResult(f"the result of cache record {where} is unreadable ({exc})") from exc
        except (UntrustedResult, ValidationError) as exc:
            raise UntrustedResult(f"the result of cache record {where}: {exc}") from exc
    return content


def local_storage_path() -> Path:
    """Prefect's local result storage (PREFECT_RESULTS_LOCAL_STORAGE_PATH), as its settings say now."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path).expanduser().resolve()


class CacheRecordStorage(WritableFileSystem):
    """Prefect cache records as local files under `<PREFECT_RESULTS_LOCAL_STORAGE_PATH>/
    cache-records`, written atomically, each checked by `check_cache_record` when read."""

    _block_type_name = "ckptflow cache records"
    basepath: str | None = Field(default=None, description="overrides the default directory")

    def _resolve(self, key: str) -> Path:
        root = Path(self.basepath or local_storage_path() / "cache-records").expanduser().resolve()
        path = (root / key).resolve()
        if not path.is_relative_to(root) or path == root:
            raise UntrustedResult(f"cache key {key!r} leaves {root}")
        return path

    def read_path(self, path: str, _sync: bool = True) -> bytes:
        file = self._resolve(path)
        try:
            return check_cache_record(file.read_bytes(), str(file))
        except UntrustedResult as exc:
            log.warning("%s: refused, the task runs again instead", exc)
            raise

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        file = self._resolve(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(file, content)
        return str(file)

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)
