"""An object store's few operations a remote run directory needs, over fsspec: whole-object
writes (create-only and compare-and-swap among them), reads, listings and deletes, with
transient errors retried and every other error said in one line.

Only `s3://` (AWS and S3-compatible stores, through s3fs) is built and tested; gs:// and Azure are
refused by name until their create-only and compare-and-swap writes are (docs/object-storage.md).
Credentials and the endpoint come from the store's own chain (for S3 the AWS environment
variables, AWS_ENDPOINT_URL among them, ~/.aws and instance roles); nothing here records them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ckptflow.core.errors import BadInputError, WriteFailed, first_line

log = logging.getLogger("ckptflow.store")

T = TypeVar("T")
SUPPORTED = {"s3": ("s3fs", "s3")}  # scheme -> (package, ckptflow's extra)
PLANNED = ("gs", "gcs", "az", "abfs", "abfss")
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # backoff of a transient error, ~15 s in all
_ANSWERED = (FileNotFoundError, FileExistsError)  # the store's own answers


class StoreFailed(WriteFailed):
    """The object store kept failing (unreachable, 5xx, throttled) after retries; what is
    committed there stands, and a rerun resumes from it."""


class AccessDenied(BadInputError):
    """The credentials may not do what the run needs there: no retry or rerun helps."""


class PreconditionFailed(Exception):
    """A create-only write found the object, or a compare-and-swap found it changed."""


def is_url(location: str | Path) -> bool:
    """Whether a run location names an object store (`scheme://...`) rather than a local path."""
    return "://" in str(location)


class ObjectStore:
    """The objects under one URL prefix (`s3://bucket/runs/x`), addressed by relative keys."""

    def __init__(self, url: str, connect_timeout_s: float = 5.0):
        scheme, _, rest = url.partition("://")
        self.url = url.rstrip("/")
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/")
        if scheme in PLANNED:
            raise BadInputError(f"{scheme}:// run directories are not supported yet. Received: "
                                f"{url}. Use an s3:// URL (AWS or an S3-compatible store) or a "
                                "local path (docs/object-storage.md).")
        if scheme not in SUPPORTED:
            raise BadInputError(f"unknown storage scheme {scheme!r}. Received: {url}. Expected "
                                "s3://BUCKET/PREFIX or a local path.")
        if not self.bucket:
            raise BadInputError(f"no bucket in {url}. Expected s3://BUCKET/PREFIX.")
        package, extra = SUPPORTED[scheme]
        try:
            import s3fs
        except ImportError:
            raise BadInputError(f"{url} needs the {package} package, which is not installed. "
                                f"Install it with: pip install 'ckptflow[{extra}]'.") from None
        # Bounded: an unreachable endpoint is said in seconds, not after botocore's long retries.
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
            "connect_timeout": connect_timeout_s, "read_timeout": 60,
            "retries": {"max_attempts": 2, "mode": "standard"}})

    def __str__(self) -> str:
        return self.url

    def _key(self, rel: str) -> str:
        """`bucket/prefix/rel`, as fsspec names it."""
        return f"{self.bucket}/{self._object_key(rel)}".rstrip("/")

    def _object_key(self, rel: str) -> str:
        """`prefix/rel`, as the S3 API names it within the bucket."""
        return "/".join(p for p in (self.prefix, rel) if p)

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def check_access(self) -> None:
        """Prove the bucket exists and the credentials may list it, or say which fails (one
        line, exit 2). An unreachable endpoint is retried briefly first."""
        try:
            self._retrying(lambda: self.fs.ls(self._key(""), refresh=True), "reach",
                           self.url, delays=RETRY_DELAYS_S[:3], quiet=True)
        except FileNotFoundError as exc:
            if "bucket" in str(exc).lower():
                raise BadInputError(f"no such bucket {self.bucket!r} in {self.url}. Create it, or "
                                    "fix the URL.") from None
        except StoreFailed as exc:
            raise BadInputError(f"could not reach {self.url} ({exc.attempts} attempts in "
                                f"{sum(RETRY_DELAYS_S[:3]):.1f} s): {first_line(exc.__cause__)}. "
                                "Check AWS_ENDPOINT_URL and the network.") from None
        except Exception as exc:
            if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
                raise BadInputError(f"no credentials for {self.url}. Set AWS_ACCESS_KEY_ID and "
                                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run where an "
                                    "instance role applies.") from None
            raise

    def list(self, rel_prefix: str = "") -> dict[str, str]:
        """Every object under `rel_prefix`, as {relative key: ETag} (the version stored)."""
        base = self._key("")
        found = self._retrying(lambda: self.fs.find(self._key(rel_prefix), detail=True,
                                                    withdirs=False, refresh=True),
                               "list", self.url_of(rel_prefix))
        return {k[len(base) + 1:]: str(v.get("ETag", "")) for k, v in found.items()
                if v.get("type") != "directory"}

    def read(self, rel: str) -> bytes | None:
        """An object's bytes, or None if there is none."""
        try:
            return self._retrying(lambda: self.fs.cat_file(self._key(rel)), "read",
                                  self.url_of(rel))
        except FileNotFoundError:
            return None

    def read_tagged(self, rel: str) -> tuple[bytes, str] | None:
        """An object's bytes and ETag (the version a compare-and-swap names), or None."""
        def get():  # the ETag first: bytes newer than it make a compare-and-swap fail, safely
            etag = self.fs.call_s3("head_object", Bucket=self.bucket,
                                   Key=self._object_key(rel))["ETag"]
            return self.fs.cat_file(self._key(rel)), etag
        try:
            data, etag = self._retrying(get, "read", self.url_of(rel))
        except FileNotFoundError:
            return None
        return data, etag

    def write(self, rel: str, data: bytes, create_only: bool = False,
              if_match: str | None = None) -> str:
        """Write a whole object (one PUT: it appears entire or not at all); its new ETag.
        `create_only`: only if there is none; `if_match`: only if it is still that version.
        Either refused raises PreconditionFailed."""
        conditions = {"IfNoneMatch": "*"} if create_only else {}
        if if_match is not None:
            conditions = {"IfMatch": if_match}

        def put():
            return self.fs.call_s3("put_object", Bucket=self.bucket,
                                   Key=self._object_key(rel), Body=data,
                                   **conditions)["ETag"]
        try:
            return self._retrying(put, "write", self.url_of(rel))
        except FileExistsError:
            raise PreconditionFailed(self.url_of(rel)) from None
        except OSError as exc:  # s3fs says a failed If-Match as EINVAL with the store's words
            if conditions and "pre-condition" in str(exc).lower():
                raise PreconditionFailed(self.url_of(rel)) from None
            raise

    def upload(self, files: dict[str, Path]) -> None:
        """Upload local files {relative key: local path}, concurrently, each whole (one PUT, or
        a multipart upload completed at once: an object appears entire or not at all)."""
        if files:
            self._retrying(lambda: self.fs.put([str(p) for p in files.values()],
                                               [self._key(r) for r in files]),
                           "upload", self.url_of(next(iter(files))))

    def download(self, files: dict[str, Path]) -> None:
        """Download objects {relative key: local path}, concurrently."""
        for local in files.values():
            local.parent.mkdir(parents=True, exist_ok=True)
        if files:
            self._retrying(lambda: self.fs.get([self._key(r) for r in files],
                                               [str(p) for p in files.values()]),
                           "download", self.url)

    def delete(self, rels: list[str]) -> None:
        if rels:
            self._retrying(lambda: self.fs.rm([self._key(r) for r in rels]), "delete", self.url)

    def _retrying(self, call: Callable[[], T], what: str, url: str,
                  delays: tuple[float, ...] = RETRY_DELAYS_S, quiet: bool = False) -> T:
        """`call()`, retried with backoff while the store fails transiently (unreachable, 5xx,
        throttling, a reset connection); then one StoreFailed naming the URL and the error."""
        for attempt in range(len(delays) + 1):
            try:
                return call()
            except PermissionError as exc:
                raise AccessDenied(
                    f"access denied: could not {what} {url} ({first_line(exc)}). A run needs "
                    "credentials that may list, read, write and delete under its URL: check "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws, and the "
                    "bucket's policy.") from None
            except _ANSWERED:
                raise
            except Exception as exc:
                if not _transient(exc):
                    raise
                if attempt == len(delays):
                    failed = StoreFailed(f"could not {what} {url} after {attempt + 1} attempts: "
                                         f"{first_line(exc)}. What is committed there stands; a "
                                         "rerun resumes from it.")
                    failed.attempts = attempt + 1
                    raise failed from exc
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "%s %s failed (%s); retrying in %.1f s", what, url, first_line(exc),
                        delays[attempt])
                time.sleep(delays[attempt])
        raise AssertionError("unreachable")


def _transient(exc: BaseException) -> bool:
    """Connection trouble, timeouts, a 5xx or throttling: worth another try."""
    name = type(exc).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError"):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = str(exc)
    return isinstance(exc, OSError) and any(
        s in text for s in ("SlowDown", "ServiceUnavailable", "InternalError", "503", "500",
                            "Throttl", "RequestTimeout"))
