"""A run directory in an object store (`s3://bucket/prefix`), worked on in a local working copy.

The store is the run's truth. Opening the run takes its lease (tasks/core/lease.py), clears what
earlier writers left uncommitted or fenced, and pulls the run into a fresh working copy: every
output, and every committed checkpoint whose files match its commit record. While the run is
open, each checkpoint the local store commits is committed in the store too, by the thread that
committed it: its files uploaded whole under a prefix never used before
(`checkpoints/cp-0003-b000016.TOKEN.N/`), the lease checked, then its `COMMIT.json` written
create-only, last. A prefix without a commit record is never chosen. Each manifest update copies
every changed output, the manifest last. The working copy (under CKPTFLOW_STAGING_DIR, by default
~/.cache/ckptflow/staging) can be deleted whenever no run is using it. docs/object-storage.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ckptflow.core.checkpoints import COMMIT, TF_PREFIX, Checkpoint, CheckpointStore, write_tf_index
from ckptflow.core.errors import BadInputError
from ckptflow.core.files import discard
from ckptflow.core.lease import LEASE, Fences, StoreLease, read_lease
from ckptflow.core.mirror import register
from ckptflow.core.object_store import ObjectStore
from ckptflow.core.run_dir import RunDir

log = logging.getLogger("ckptflow.store")

STAGING_ENV = "CKPTFLOW_STAGING_DIR"
CHECKPOINTS = "checkpoints/"
MANIFEST = "manifest.json"
SYNCED = ".synced.json"  # in the working copy: which outputs it holds as the store has them
RUN_MARKERS = (MANIFEST, LEASE)  # what a prefix holding a ckptflow run has


def staging_root() -> Path:
    return Path(os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "ckptflow" / "staging")


def stored_manifest(url: str) -> dict:
    """The manifest of the run at `url` as the store holds it ({} before the run's first)."""
    data = ObjectStore(url).read(MANIFEST)
    return json.loads(data) if data else {}


def working_copy_path(url: str) -> Path:
    """The local working copy of the run at `url` (one per URL and machine)."""
    return staging_root() / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A checkpoint committed in the store: its prefix, and who committed which step."""

    prefix: str  # checkpoints/NAME.TOKEN.N
    name: str
    token: str
    step: int
    commit: bytes

    @property
    def files(self) -> dict[str, str]:
        return json.loads(self.commit)["files"]


def list_checkpoints(store: ObjectStore) -> tuple[list[RemoteCheckpoint], list[str]]:
    """The store's committed checkpoints (oldest first) and the prefixes with no readable
    commit record."""
    prefixes: dict[str, set[str]] = {}
    for rel in store.list(CHECKPOINTS):
        parts = rel.split("/")
        if len(parts) == 3:
            prefixes.setdefault("/".join(parts[:2]), set()).add(parts[2])
    committed, uncommitted = [], []
    for prefix, files in sorted(prefixes.items()):
        name, _, rest = prefix.removeprefix(CHECKPOINTS).partition(".")
        token = rest.partition(".")[0]
        data = store.read(f"{prefix}/{COMMIT}") if COMMIT in files else None
        try:
            commit = json.loads(data)
            committed.append(RemoteCheckpoint(prefix, name, token, int(commit["step"]), data))
        except (TypeError, ValueError, KeyError):
            uncommitted.append(prefix)
    return sorted(committed, key=lambda c: c.step), uncommitted


def chosen(checkpoints: list[RemoteCheckpoint], fences: Fences,
           holder: str | None) -> list[RemoteCheckpoint]:
    """Of the committed checkpoints, those a run may use: the lease holder's, and each earlier
    token's up to its fence."""
    return [c for c in checkpoints
            if c.token == holder or (c.token in fences and c.step <= fences[c.token])]


def download_run(store: ObjectStore, checkpoints: list[RemoteCheckpoint], into: Path,
                 current: dict[str, str] | None = None) -> tuple[list[RemoteCheckpoint], dict]:
    """Make `into` the store's run: every output, and those of `checkpoints` whose files match
    their commit records (the others dropped, with a warning). What `into` already holds is kept
    where it is the same: an output listed in `current` ({key: ETag}) with the ETag the store
    has, a checkpoint with the same commit record; everything else there is removed first.
    Returns the checkpoints kept and the outputs' ETags."""
    into.mkdir(parents=True, exist_ok=True)
    local_store = CheckpointStore(RunDir(into).checkpoints)
    listing = store.list()
    outputs = {rel: etag for rel, etag in listing.items() if rel != LEASE and _is_output(Path(rel))}
    same = {rel for rel, etag in outputs.items() if (current or {}).get(rel) == etag}
    held = {c.name for c in checkpoints if _read_bytes(local_store.directory / c.name / COMMIT)
            == c.commit}
    for path in sorted(into.rglob("*"), reverse=True):  # what is not the store's goes
        rel = path.relative_to(into)
        if rel.as_posix() in same or (len(rel.parts) > 1 and rel.parts[0] == "checkpoints"
                                      and rel.parts[1] in held):
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()
    files = {rel: into / rel for rel in outputs if rel not in same}
    files.update({f"{remote.prefix}/{name}": local_store.directory / remote.name / name
                  for remote in checkpoints if remote.name not in held for name in remote.files
                  if f"{remote.prefix}/{name}" in listing})  # a missing one fails verify below
    store.download(files)
    kept = []
    for remote in checkpoints:
        path = local_store.directory / remote.name
        if remote.name not in held:
            path.mkdir(parents=True, exist_ok=True)
            (path / COMMIT).write_bytes(remote.commit)
        problem = local_store.verify(Checkpoint(path, 0, 0, remote.step))
        if problem is None:
            kept.append(remote)
        else:
            log.warning("skipping checkpoint %s: %s", store.url_of(remote.prefix), problem)
            discard(path)
    if kept:
        write_tf_index(local_store.directory, [f"{c.name}/{TF_PREFIX}" for c in kept])
    log.info("pulled %s: %d objects downloaded, %d outputs and %d checkpoints already here",
             store, len(files), len(same), len(held))
    return kept, outputs


def copy_run(url: str, into: Path) -> None:
    """Copy the run at `url` into `into` as any reader sees it (no lease taken): for
    `ckptflow verify URL`, from any machine."""
    store = ObjectStore(url)
    check_store(store)
    lease = read_lease(store)
    committed, _ = list_checkpoints(store)
    holder = lease.get("token") if lease.get("holder") else None
    download_run(store, chosen(committed, lease.get("fences") or {}, holder), into)


def check_store(store: ObjectStore) -> None:
    """Before anything starts: the bucket, credentials and endpoint of `store` work, and it is
    empty or a ckptflow run (else one BadInputError; nothing written)."""
    store.check_access()
    check_is_run(store)


def check_is_run(store: ObjectStore) -> None:
    """A prefix that holds objects but no ckptflow run is refused (nothing written)."""
    objects = store.list()
    if objects and not any(m in objects for m in RUN_MARKERS) and not any(
            k.startswith(CHECKPOINTS) for k in objects):
        raise BadInputError(f"{store} holds {len(objects)} objects but no ckptflow run (no "
                            "manifest.json or lease.json). Choose an empty prefix or an existing "
                            "run's URL.")


class RemoteRun:
    """The run at `url`, open for writing in its working copy while `open()` is held."""

    def __init__(self, url: str, keep: int, lease_seconds: float):
        self.store = ObjectStore(url)
        self.url = self.store.url
        self.local = working_copy_path(self.url)
        self.keep = keep
        self.lease_seconds = lease_seconds
        self.lease: StoreLease | None = None
        self._committed: list[RemoteCheckpoint] = []  # the chosen ones, oldest first
        self._uncommitted: list[str] = []
        self._unchosen: list[str] = []
        self._pushed: dict[str, tuple[int, int]] = {}  # output -> (size, mtime_ns) copied
        self._sequence = itertools.count()
        self._last_step = -1  # of this run's own commits
        self._push_guard = threading.Lock()

    @contextmanager
    def open(self, wait_seconds: float, note: dict | None = None) -> Iterator[dict | None]:
        """Hold the run: lease taken, working copy pulled, commits mirrored. Yields the record
        of an earlier holder whose lease expired (it died holding it), or None."""
        check_store(self.store)
        self.lease = StoreLease(self.store, self.lease_seconds, note)
        abandoned = self.lease.acquire(wait_seconds, self._fence)
        try:
            self._clear_unchosen()
            self.pull()
            register(self.local, self)
            try:
                yield abandoned
            finally:
                register(self.local, None)
            self.outputs_committed()
            self._record_synced()
        finally:
            self.lease.release(self._last_step)

    def _fence(self, fences: Fences) -> Fences:
        """Fence every token with checkpoints here that the lease does not fence yet, at its
        last committed step; remember the chosen checkpoints."""
        committed, self._uncommitted = list_checkpoints(self.store)
        for token in {c.token for c in committed} - set(fences):
            fences[token] = max(c.step for c in committed if c.token == token)
        self._committed = chosen(committed, fences, holder=None)
        self._unchosen = [c.prefix for c in committed if c not in self._committed]
        return fences

    def _clear_unchosen(self) -> None:
        """Remove what earlier writers left uncommitted, or committed past their fence."""
        doomed = [*self._uncommitted, *self._unchosen]
        if doomed:
            log.warning("clearing %d uncommitted or fenced checkpoint prefixes in %s: %s",
                        len(doomed), self.store, ", ".join(doomed))
            self.store.delete([k for k in self.store.list(CHECKPOINTS)
                               if any(k.startswith(p + "/") for p in doomed)])

    def pull(self) -> None:
        """Make the working copy the store's run, downloading only what it does not hold: the
        outputs recorded as the store's when the last run here ended (their ETags), unchanged
        since, are kept. The record goes first, so a run that dies leaves none."""
        record = self.local / SYNCED
        try:
            synced = json.loads(record.read_text())
        except (OSError, ValueError):
            synced = {}
        record.unlink(missing_ok=True)
        current = {rel: etag for rel, (etag, size, mtime_ns) in synced.items()
                   if _signature_or_none(self.local / rel) == (size, mtime_ns)}
        self._committed, _ = download_run(self.store, self._committed, self.local, current)
        self._pushed = {p.relative_to(self.local).as_posix(): _signature(p)
                        for p in self.local.rglob("*") if p.is_file()
                        and _is_output(p.relative_to(self.local))}

    def _record_synced(self) -> None:
        """As the run ends well: record the store's ETag of every output the working copy
        holds unchanged since it was copied, for the next run here to keep."""
        listing = self.store.list()
        synced = {rel: [listing[rel], *signature] for rel, signature in self._pushed.items()
                  if rel in listing and _signature_or_none(self.local / rel) == signature}
        (self.local / SYNCED).write_text(json.dumps(synced))

    def checkpoint_committed(self, path: Path) -> None:
        """Commit the local checkpoint at `path` in the store; then prune the oldest there."""
        commit = (path / COMMIT).read_bytes()
        prefix = f"{CHECKPOINTS}{path.name}.{self.lease.token}.{next(self._sequence)}"
        self.store.upload({f"{prefix}/{name}": path / name for name in json.loads(commit)["files"]})
        self.lease.check()  # a run that lost its lease stops here; a race past it is fenced
        self.store.write(f"{prefix}/{COMMIT}", commit, create_only=True)
        self._last_step = int(json.loads(commit)["step"])
        self._committed.append(RemoteCheckpoint(prefix, path.name, self.lease.token,
                                                self._last_step, commit))
        while len(self._committed) > self.keep:
            old = self._committed.pop(0)  # its commit record first: never half a checkpoint
            self.store.delete([f"{old.prefix}/{COMMIT}"])
            self.store.delete([f"{old.prefix}/{f}" for f in old.files])

    def outputs_committed(self) -> None:
        """Copy every output changed since the last copy, the manifest last, and remove from
        the store the outputs the working copy no longer has."""
        with self._push_guard:
            self.lease.check()
            files = {p.relative_to(self.local).as_posix(): p for p in self.local.rglob("*")
                     if p.is_file() and _is_output(p.relative_to(self.local))}
            changed = {r: _signature(p) for r, p in files.items()
                       if self._pushed.get(r) != _signature(p)}
            manifest = changed.pop(MANIFEST, None)
            self.store.upload({rel: files[rel] for rel in changed})
            if manifest is not None:  # last: it never names an output the store lacks
                self.store.upload({MANIFEST: files[MANIFEST]})
                changed[MANIFEST] = manifest
            self._pushed.update(changed)
            gone = [rel for rel in self._pushed if rel not in files]
            self.store.delete(gone)
            for rel in gone:
                del self._pushed[rel]


def _is_output(rel: Path) -> bool:
    """Outputs are mirrored by the manifest's updates; checkpoints by their commits; hidden
    files (the lock, temporary writes) not at all."""
    return rel.parts[0] != CHECKPOINTS.rstrip("/") and not any(
        p.startswith(".") for p in rel.parts)


def _signature_or_none(path: Path) -> tuple[int, int] | None:
    try:
        return _signature(path)
    except OSError:
        return None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
