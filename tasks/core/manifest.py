"""The run directory's `manifest.json`: every artifact with its format, path, SHA-256 and size.

Each stage updates its own part as soon as its files are committed, so the manifest describes
the run directory even after a crash half-way through a flow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from ckptflow.core.checkpoint_saves import SAVE_KINDS
from ckptflow.core.errors import BadInputError
from ckptflow.core.files import atomic_write_json, sha256_path, size_of
from ckptflow.core.mirror import mirror_of
from ckptflow.core.run_dir import RunDir

SCHEMA_VERSION = 1
_PACKAGES = ("ckptflow", "tensorflow", "keras", "prefect", "numpy", "h5py", "pandas", "pydantic")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest as a dict, `{}` for a run directory that has none yet."""
    path = RunDir(run_dir).manifest
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except PermissionError as exc:
        raise BadInputError(f"cannot read {path} ({exc.strerror}). Ask its owner to make it "
                            "readable, or use a copy you can read.") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(
            f"{path} is not valid JSON ({exc}). Restore it from a backup or move the run "
            "directory aside and start a new run.") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"{path} must hold a JSON object. Received: {type(data).__name__}.")
    return data


def update_manifest(run_dir: Path, **sections: Any) -> dict[str, Any]:
    """Set top-level sections of the manifest and write it atomically."""
    manifest = read_manifest(run_dir)
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    manifest.setdefault("created_at", _now())
    manifest.setdefault("artifacts", [])
    manifest.update(sections)
    manifest["updated_at"] = _now()
    manifest["packages"] = package_versions()
    manifest["code_version"] = code_version()
    atomic_write_json(RunDir(run_dir).manifest, manifest)
    if (mirror := mirror_of(run_dir)) is not None:  # a run in an object store: its outputs too
        mirror.outputs_committed()
    return manifest


def artifact_entry(run_dir: Path, path: Path, kind: str, format: str, **extra: Any) -> dict:
    """A manifest entry for one file or directory of the run directory."""
    run_dir, path = Path(run_dir), Path(path)
    return {
        "kind": kind,
        "format": format,
        "path": path.relative_to(run_dir).as_posix(),
        "sha256": sha256_path(path),
        "bytes": size_of(path),
        **extra,
    }


def set_artifacts(run_dir: Path, kind: str, entries: list[dict]) -> dict[str, Any]:
    """Replace every manifest entry of `kind` with `entries`."""
    manifest = read_manifest(run_dir)
    kept = [a for a in manifest.get("artifacts", []) if a.get("kind") != kind]
    return update_manifest(run_dir, artifacts=kept + entries)


@functools.cache
def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape a run's files."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@functools.cache
def code_version() -> str:
    """The git commit of the ckptflow checkout, or the package version outside a checkout."""
    repo = Path(__file__).resolve().parent.parent.parent  # tasks/core/ -> the checkout
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"ckptflow {package_versions()['ckptflow']}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def checkpoint_cost(training: dict[str, Any]) -> str | None:
    """What checkpoints cost the run, in one line, over the attempts that trained and recorded it
    (not those under a strategy), or None. A finished run's rerun adds nothing: its report stays
    byte for byte the same."""
    costs = [a["checkpoints"] for a in training.get("attempts", [])
             if a.get("checkpoints") and a.get("batches_trained")]
    seconds = sum(c["training_seconds"] for c in costs)
    if not costs or not seconds:
        return None
    waited = sum(c["waited_seconds"] for c in costs)
    by = {k: sum(c.get("waited_by", {}).get(k, 0.0) for c in costs) for k in SAVE_KINDS}
    committed, deferred = sum(c["committed"] for c in costs), sum(c["deferred"] for c in costs)
    written = sum(c["bytes_written"] for c in costs)
    how = "in the background" if all(c["background"] for c in costs) else "as training waited"
    return (f"checkpointing cost {waited / seconds:.1%} of training: it waited {waited:.2f} s of "
            f"{seconds:.2f} s (mid-epoch saves, which the time budget governs, "
            f"{by['mid_epoch'] / seconds:.1%}; epoch ends {by['epoch_end'] / seconds:.1%}; a "
            f"stop's save and the last commit {by['stop_or_end'] / seconds:.1%}); {committed} "
            f"checkpoints committed {how}, {written / 1e6:,.1f} MB written, {deferred} mid-epoch "
            "saves put off by the time budget")


def export_hashes(manifest: dict) -> dict[str, str]:
    """Format → SHA-256 of each export the manifest lists: what a report written now describes."""
    return {a["format"]: a["sha256"] for a in manifest.get("artifacts", [])
            if a.get("kind") == "export"}


def artifacts_digest(manifest: dict) -> str:
    """One SHA-256 of every listed path and its hash: which files a passed verify vouched for."""
    listed = sorted((a["path"], a["sha256"]) for a in manifest.get("artifacts", []))
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()
