"""What a deployment lets its runs name: which functions (REFs) and which directories.

Whoever may start a deployment's run sets its parameters, but only its deployer chose the code
and the disk it runs against. The checks read strings and resolve paths, nothing more, so a
refused run has run nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptflow.core.errors import BadInputError
from ckptflow.core.object_store import is_url

# Where a deployer widens the allowlist: a job variable of the deployment (prefect.yaml's
# work_pool.job_variables), read from the deployment's record, never from a run's overrides.
JOB_VARIABLE = "ckptflow_allow"
DEFAULT_ROOT = "runs"  # under the deployment's working directory


class NotAllowedError(BadInputError):
    """A deployment run named a function or a path its deployment does not allow: `parameter`
    (`model`, `run_dir`, ...), what the run gave it (`received`), what is `allowed`."""

    def __init__(self, message: str, parameter: str, received: str, allowed: list[str]):
        super().__init__(message)
        self.parameter, self.received, self.allowed = parameter, received, allowed


@dataclass(frozen=True)
class Allowlist:
    """The functions and directories one deployment's runs may name.

    A path is allowed when it resolves (symlinks followed) to one of `roots` or below one;
    relative names start at `workdir`, the deployment's working directory. A root may be an
    object-store URL (`s3://bucket/runs`): URLs under it are allowed.
    """

    deployment: str
    refs: Mapping[str, Iterable[str]]
    roots: Iterable[str | Path]
    workdir: str | Path
    dask_addresses: Iterable[str] = field(default_factory=frozenset)
    url_roots: tuple[str, ...] = field(init=False, default=())  # object-store roots, as given

    def __post_init__(self):
        workdir = Path(self.workdir)
        object.__setattr__(self, "workdir", workdir)
        object.__setattr__(self, "refs", {kind: frozenset(self._ref_key(r) for r in refs)
                                          for kind, refs in self.refs.items()})
        given = list(self.roots)
        object.__setattr__(self, "url_roots", tuple(
            dict.fromkeys(str(r).rstrip("/") for r in given if is_url(r))))
        roots = dict.fromkeys(_resolved(r, workdir) for r in given if not is_url(r))
        object.__setattr__(self, "roots", tuple(r for r in roots if not any(  # the outermost
            r != other and r.is_relative_to(other) for other in roots)))
        object.__setattr__(self, "dask_addresses", frozenset(self.dask_addresses))

    def check_ref(self, kind: str, ref: str) -> None:
        """Refuse `ref` as the `kind` function unless allowed (a file REF compared by the file it
        resolves to, a module REF by its name)."""
        if self._ref_key(ref) in self.refs.get(kind, ()):
            return
        allowed = sorted(self._shown(r) for r in self.refs.get(kind, ()))
        raise NotAllowedError(
            f"{kind} {ref!r} is not allowed by deployment {self.deployment}. It allows: "
            f"{', '.join(allowed) or 'none'}. To allow it, its deployer lists it under "
            f"work_pool.job_variables.{JOB_VARIABLE}.{kind} in prefect.yaml and deploys again.",
            kind, ref, allowed)

    def check_path(self, parameter: str, path: str) -> None:
        """Refuse `path` unless it resolves (after `..` and symlinks) to an allowed root or below;
        an object-store URL must be an allowed URL root or below it, with no `.` or `..` part."""
        if is_url(path):
            where = path.rstrip("/")
            plain = not {".", ".."} & set(where.partition("://")[2].split("/"))
            if plain and any(where == r or where.startswith(r + "/") for r in self.url_roots):
                return
        else:
            where = _resolved(path, self.workdir)
            if any(where == root or where.is_relative_to(root) for root in self.roots):
                return
        allowed = [str(root) for root in self.roots] + list(self.url_roots)
        raise NotAllowedError(
            f"{parameter} {path!r} is outside what deployment {self.deployment} allows (it "
            f"resolves to {where}; allowed: {', '.join(allowed)}). Name a path under one of "
            f"those, or its deployer lists a root under work_pool.job_variables.{JOB_VARIABLE}."
            "roots in prefect.yaml and deploys again.", parameter, path, allowed)

    def check_dask_address(self, address: str | None) -> None:
        """Refuse a Dask scheduler the deployment did not name: points and results travel to it
        as pickles, so it could run code here."""
        if address is None or address in self.dask_addresses:
            return
        allowed = sorted(self.dask_addresses)
        raise NotAllowedError(
            f"dask_address {address!r} is not allowed by deployment {self.deployment} (it "
            f"allows: {', '.join(allowed) or 'a local cluster only'}). Leave it empty, or its "
            "deployer sets it in the deployment's parameters.", "dask_address", address, allowed)

    def _ref_key(self, ref: str) -> str:
        where, _, name = ref.rpartition(":")
        if where.endswith(".py"):
            return f"{_resolved(where, self.workdir)}:{name}"
        return ref

    def _shown(self, key: str) -> str:
        """A REF as a deployer writes it: a file relative to the working directory."""
        where, _, name = key.rpartition(":")
        if where.endswith(".py") and Path(where).is_relative_to(self.workdir):
            return f"{Path(where).relative_to(self.workdir)}:{name}"
        return key


def _resolved(path: str | Path, workdir: Path) -> Path:
    """`path` made absolute from `workdir`, `~` expanded, `..` and symlinks resolved."""
    return Path(os.path.realpath(Path(workdir, Path(path).expanduser())))
