"""Is a run directory intact and complete? Answered from its manifest and file hashes alone.

No file is opened before its path is known to stay inside the run directory (no absolute paths,
no `..`, no links pointing out) and its SHA-256 matches the manifest. Neither TensorFlow nor
Prefect is imported: `ckptflow verify` and a finished run's rerun start here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from ckptflow.core.errors import BadInputError
from ckptflow.core.files import sha256_path
from ckptflow.core.formats import FORMATS
from ckptflow.core.manifest import export_hashes, read_manifest
from ckptflow.core.run_dir import RunDir

REQUIRED_FIELDS = ("kind", "format", "path", "sha256", "bytes")


class VerifyRow(BaseModel):
    """The verdict on one manifest entry."""

    kind: str
    format: str
    path: str
    bytes: int | None = None
    load_seconds: float | None = None
    max_abs_diff: float | None = None
    accuracy: float | None = None  # where the model has an accuracy metric
    metrics: dict[str, float] = {}
    ok: bool
    problem: str = ""


def completeness_rows(manifest: dict) -> list[VerifyRow]:
    """A failed row for each part of a finished run that is missing or stale: of its final
    checkpoint, an evaluation and (unless it is a sweep point) a report and every requested export.
    Hashes alone cannot tell: a run killed before its first export, or while exporting a newer
    checkpoint, lists only files that are intact."""
    training = manifest.get("training")
    if not training or "checkpoint" not in training:
        return [VerifyRow(kind="training", format="-", path="(training)", ok=False,
                          problem="not finished: the manifest records no completed training. "
                          "Run `ckptflow run` on this run directory to finish it.")]
    final, commit, rows = training["checkpoint"], training.get("commit_sha256"), []

    def of_final(entry: dict) -> bool:
        return entry.get("checkpoint", final) == final and entry.get("commit_sha256", commit) == commit

    def failed(kind: str, fmt: str, problem: str) -> None:
        rows.append(VerifyRow(kind=kind, format=fmt, path=f"({kind} {fmt})", ok=False,
                              problem=f"{problem}; training reached {final}. Run `ckptflow run` "
                              "on this run directory to bring it up to date."))

    evaluation = manifest.get("evaluation") or {}
    if not evaluation or not of_final(evaluation):
        failed("evaluation", "csv", f"evaluation is of {evaluation.get('checkpoint') or 'nothing'}")
    if manifest.get("completes_with", "exports") == "evaluation":
        return rows
    artifacts = manifest.get("artifacts", [])
    reports = [a for a in artifacts if a.get("kind") == "report"]
    if problem := _report_problem(reports, of_final, export_hashes(manifest)):
        failed("report", "markdown", problem)
    exported = {a.get("format"): a for a in artifacts if a.get("kind") == "export"}
    requested = (manifest.get("parameters") or {}).get("formats") or [
        f.name for f in FORMATS.values() if not f.requires]
    for name in requested:
        entry = exported.get(name)
        if entry is None:
            failed("export", name, "requested but not exported")
        elif not of_final(entry):
            failed("export", name, f"exported from {entry.get('checkpoint')}")
    return rows


def _report_problem(reports: list[dict], of_final, exports: dict[str, str]) -> str:
    """Why the report is not of the final checkpoint and of the exports listed now (a set
    exported again and killed before the report was rewritten), or ''."""
    stale = [a for a in reports if not of_final(a)]
    if not reports or stale:
        return f"report is of {stale[0].get('checkpoint')}" if stale else "report is missing"
    if any(a.get("exports", exports) != exports for a in reports):  # older reports name none
        return "report describes other exports than those listed"
    return ""


def checked_manifest(run_dir: Path) -> dict:
    """The manifest, with a one-line error if it is missing, not JSON, or lacks fields."""
    path = RunDir(run_dir).manifest
    try:
        path.stat()
    except PermissionError as exc:
        raise BadInputError(f"cannot read run directory {run_dir} ({exc.strerror}). Ask its owner "
                            f"to make it readable (chmod -R a+rX {run_dir}), or verify a copy "
                            "you can read.") from exc
    except OSError:
        pass
    if not path.is_file():
        raise BadInputError(f"{run_dir} has no {path.name}. Expected a ckptflow run "
                            "directory (made by `ckptflow run`).")
    manifest = read_manifest(run_dir)
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, list) or not artifacts:
        raise BadInputError(f"{path} lists no artifacts. Expected a list "
                            "'artifacts' of entries with " + ", ".join(REQUIRED_FIELDS) + ".")
    for i, entry in enumerate(artifacts):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise BadInputError(f"{path}: artifact #{i} lacks {missing}. "
                                "Expected " + ", ".join(REQUIRED_FIELDS) + ".")
    if "model" not in manifest or "identity" not in manifest["model"]:
        raise BadInputError(f"{path} lacks model.identity (the settings that "
                            "rebuild the architecture).")
    return manifest


def safe_path(run_dir: Path, relative: str) -> Path:
    """`run_dir / relative`, refusing absolute paths, `..` and links that lead outside."""
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise BadInputError(f"manifest path {relative!r} leaves the run directory. Expected a "
                            "path relative to it, without '..'.")
    path = run_dir / candidate
    resolved = path.resolve()
    if not resolved.is_relative_to(run_dir):
        raise BadInputError(f"manifest path {relative!r} is a link to {resolved}, outside the "
                            "run directory. Refused.")
    if path.is_dir():
        for inner in path.rglob("*"):
            if not inner.resolve().is_relative_to(run_dir):
                raise BadInputError(f"{inner} links outside the run directory. Refused.")
    return path


def check_file(run_dir: Path, entry: dict) -> tuple[VerifyRow, Path | None]:
    row = VerifyRow(kind=entry["kind"], format=entry["format"], path=str(entry["path"]), ok=False)
    try:
        path = safe_path(run_dir, str(entry["path"]))
        digest = sha256_path(path) if path.exists() else None
    except BadInputError as exc:
        row.problem = str(exc)
    except OSError as exc:  # a file or folder this user may not read
        row.problem = f"unreadable ({exc.strerror})"
    else:
        if digest is None:
            row.problem = "missing"
        else:
            row.bytes, row.ok = entry["bytes"], digest == entry["sha256"]
            if not row.ok:
                row.problem = "SHA-256 does not match the manifest: refused, not opened"
    return row, path if row.ok else None
