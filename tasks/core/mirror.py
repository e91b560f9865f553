"""Where a run directory's committed files are copied to as they are committed, if anywhere.

A run directory in an object store is worked on in a local working copy; the copy registers its
mirror here, and the checkpoint store and the manifest tell the mirror of their run as they
commit, so neither needs to know about object stores (tasks/core/remote_run.py).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol


class Mirror(Protocol):
    url: str  # where the run lives

    def checkpoint_committed(self, path: Path) -> None:
        """A checkpoint directory was committed locally: commit it in the store too."""

    def outputs_committed(self) -> None:
        """The manifest was updated: copy every changed output, the manifest last."""


_mirrors: dict[str, Mirror] = {}
_guard = threading.Lock()


def register(root: Path, mirror: Mirror | None) -> None:
    """Mirror run directory `root` to `mirror` (None: no longer)."""
    with _guard:
        if mirror is None:
            _mirrors.pop(os.path.realpath(root), None)
        else:
            _mirrors[os.path.realpath(root)] = mirror


def mirror_of(path: Path) -> Mirror | None:
    """The mirror of the run directory holding `path`, if it has one."""
    if not _mirrors:
        return None
    real = Path(os.path.realpath(path))
    with _guard:
        return next((_mirrors[str(p)] for p in (real, *real.parents) if str(p) in _mirrors), None)


def location_of(run_dir: str | Path) -> str:
    """Where the run in `run_dir` lives, as its user named it: its mirror's URL for a working
    copy (Prefect's artifact keys and descriptions name that), else the path itself."""
    mirror = mirror_of(Path(run_dir))
    return mirror.url if mirror is not None else str(run_dir)
