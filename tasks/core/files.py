"""Durable file primitives: hashing, and writes that are all-or-nothing (temp, fsync, rename)."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ckptflow.core.errors import BadInputError

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """SHA-256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_and_fsync(path: Path) -> str:
    """SHA-256 of a file this process has just written, through a memory map of the page cache
    (only for files nobody truncates meanwhile: that faults), then fsync it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                digest.update(mapped)
        os.fsync(f.fileno())
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """SHA-256 of a file, or of a directory as the sorted list of (relative path, file hash)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ensure_writable(directory: Path) -> None:
    """Create `directory` if needed and prove it takes files, or raise a one-line BadInputError."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise BadInputError(f"run directory {directory} is not writable ({exc.strerror}). Choose "
                            "another --run-dir or fix its permissions.") from exc


def discard(path: Path) -> None:
    """Remove what a failed write left, and free its space now: each file is emptied first, as
    a failed writer may still hold it open (Keras' `.weights.h5`, while its error lives)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():  # never made (the write failed before)
        return
    files = [path] if path.is_file() else list(path.rglob("*"))
    for file in (f for f in files if f.is_file() and not f.is_symlink()):
        try:
            os.truncate(file, 0)
        except OSError:
            pass  # removed below all the same
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path`, so a later rename publishes complete data."""
    path = Path(path)
    for p in [*sorted(path.rglob("*"), reverse=True), path]:  # children before their directory
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part. It
    gets `mode`, else the umask's mode for a new file (not a temporary file's 0600), so others can
    read a shared run directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is not None or exc.errno is None:
            raise
        # A failed write() names no file ("[Errno 28] No space left on device"): name it.
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def publish(tmp: Path, final: Path) -> None:
    """Move a finished temp file or directory to `final`, keeping the old one until the new one is
    in (a directory cannot be replaced in one rename: the old one is renamed aside first)."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if tmp.is_dir() and final.exists():
        aside = final.with_name(f".{final.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, final)
        fsync_dir(final.parent)


def clear_abandoned_writes(directory: Path) -> None:
    """Undo what SIGKILLed `atomic_write_bytes` and `publish` calls left in `directory`: a
    directory set aside goes back if it is the only copy. Call it holding the run directory's
    lock: a writer still under way would lose its temporary file."""
    directory = Path(directory)
    for aside in directory.glob(".*.old"):
        final = aside.with_name(aside.name[1:-len(".old")])
        if final.exists():
            discard(aside)
        else:
            os.replace(aside, final)
    for tmp in directory.glob(".*.tmp"):
        discard(tmp)
