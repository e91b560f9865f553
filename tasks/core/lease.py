"""One writer at a time for a run directory in an object store: a lease object, fenced.

The lease (`lease.json` under the run's URL) is taken with a create-only write, or, once its
holder stopped renewing it and it expired, replaced with a compare-and-swap on its ETag; the
holder renews it the same way every third of its term. Each holder has a fresh token, and every
checkpoint it commits carries that token. Taking the lease over fences the tokens before it: the
lease records, for each earlier token, the last step it had committed, and a checkpoint of an
earlier token past its fence is never chosen. So a run Prefect marked Crashed that still lives
(a zombie) can neither commit over its successor nor be resumed from; it learns it lost the
lease at its next commit and stops, saying so (docs/object-storage.md).

Expiry compares the holder's wall clock with the taker's: machines must agree within seconds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from ckptflow.core.errors import BadInputError
from ckptflow.core.object_store import ObjectStore, PreconditionFailed, StoreFailed

log = logging.getLogger("ckptflow.lease")

LEASE = "lease.json"
Fences = dict[str, int]  # token -> the last step it committed (-1: none)
_POLL_S = 1.0


class LeaseBusy(BadInputError):
    """A live holder has the run's lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it stopped renewing in time): it must not commit."""


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


class StoreLease:
    """The lease on `store`'s run for `seconds`, renewed in the background while held.

    `fence(fences)` is given the fences the lease records and returns them with every earlier
    token that has checkpoints in the store added (at its last committed step); it runs as the
    lease is taken, so the new holder's view of the run is the fenced one.
    """

    def __init__(self, store: ObjectStore, seconds: float, note: dict | None = None):
        self.store, self.seconds, self.note = store, seconds, note or {}
        self.token = uuid.uuid4().hex[:12]
        self.fences: Fences = {}
        self.lost: str | None = None
        self._etag: str | None = None
        self._expires = 0.0
        self._since = ""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._guard = threading.Lock()

    def acquire(self, wait_seconds: float, fence: Callable[[Fences], Fences]) -> dict | None:
        """Take the lease, waiting up to `wait_seconds` for a live holder (else LeaseBusy).
        Returns the record of an expired holder taken over (it died holding it), else None."""
        deadline = time.monotonic() + wait_seconds
        announced = False
        while True:
            current = self.store.read_tagged(LEASE)
            record = _parse(current[0]) if current else {}
            holder = record.get("holder")
            if holder and record.get("expires_unix", 0) > time.time():
                who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
                       + (f" (flow run {holder['flow_run_id']})" if holder.get("flow_run_id") else "")
                       + f" since {holder.get('since', '?')}, lease until "
                       f"{_iso(record['expires_unix'])} unless renewed")
                if time.monotonic() >= deadline:
                    raise LeaseBusy(f"run directory {self.store} is in use by {who}. Wait for that "
                                    "run to finish (a dead holder's lease expires within "
                                    f"{record.get('seconds', self.seconds):.0f} s), pass "
                                    "--wait-for-lock SECONDS, or use another --run-dir.")
                if not announced:
                    log.info("run directory %s is in use by %s; waiting up to %.0f s",
                             self.store, who, wait_seconds)
                    announced = True
                time.sleep(_POLL_S)
                continue
            self.fences = fence(dict(record.get("fences") or {}))
            self._since = _iso(time.time())
            try:
                with self._guard:
                    self._write(if_match=current[1] if current else None,
                                create_only=current is None)
            except PreconditionFailed:
                continue  # another taker was first: look again
            if holder:
                log.warning("took over run directory %s from pid %s on %s, whose lease expired "
                            "at %s", self.store, holder.get("pid"), holder.get("host"),
                            _iso(record.get("expires_unix", 0)))
            self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                             name="ckptflow-lease")
            self._renewer.start()
            return holder or None

    def check(self) -> None:
        """Raise LeaseLost unless this run still holds the lease (read from the store)."""
        if self.lost is None:
            current = self.store.read_tagged(LEASE)
            if current is None or _parse(current[0]).get("token") != self.token:
                self.lost = "another run took it over"
        if self.lost is not None:
            raise LeaseLost(f"this run no longer holds run directory {self.store}: "
                            f"{self.lost}. Nothing more is committed by it; the run that holds "
                            "it continues from its own latest checkpoint.")

    def release(self, last_step: int) -> None:
        """Give the lease up, fencing this run's token at `last_step` (its last commit)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.lost is not None:
            return
        self.fences[self.token] = last_step
        try:
            with self._guard:
                self._write(if_match=self._etag, holder=False)
        except (PreconditionFailed, StoreFailed) as exc:
            log.warning("could not release the lease on %s (%s); it expires by itself at %s",
                        self.store, type(exc).__name__, _iso(self._expires))

    def _write(self, if_match: str | None, create_only: bool = False, holder: bool = True) -> None:
        expires = time.time() + self.seconds if holder else 0.0
        record = {"token": self.token, "expires_unix": expires,
                  "expires_at": _iso(expires), "seconds": self.seconds,
                  "holder": {"pid": os.getpid(), "host": socket.gethostname(),
                             "since": self._since, **self.note} if holder else None,
                  "fences": self.fences}
        self._etag = self.store.write(LEASE, json.dumps(record, indent=2).encode(),
                                      create_only=create_only, if_match=if_match)
        self._expires = expires

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                with self._guard:
                    self._write(if_match=self._etag)
            except PreconditionFailed:
                self.lost = "another run took it over"
                log.error("lost the lease on %s: another run took it over", self.store)
                return
            except StoreFailed as exc:
                if time.time() >= self._expires:
                    self.lost = f"it could not be renewed before it expired ({exc})"
                    log.error("lost the lease on %s: %s", self.store, self.lost)
                    return


def read_lease(store: ObjectStore) -> dict:
    """The lease record as it stands (`{}` if the run has none)."""
    data = store.read(LEASE)
    return _parse(data) if data is not None else {}


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
