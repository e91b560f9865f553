"""verify: check a run directory without the flow, as another machine would before trusting it.

For every manifest entry: the path must stay inside the run directory (no absolute paths, no
`..`, no links pointing out), the file must exist and match its SHA-256, and only then is it
opened. Every export is then loaded in a fresh process with its own runtime, predicts the test
set, and must match the reference predictions saved at export time (within the format's
tolerance) and the metrics recorded in the manifest (the model's own: accuracy, mae, ...). HDF5
files are also inspected with h5py for every trainable weight's shape.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import tempfile
from pathlib import Path

import numpy as np
from prefect import task
from pydantic import BaseModel

from ckptflow.config import TrainConfig
from ckptflow.core.errors import BadInputError, VerificationFailed
from ckptflow.core.files import sha256_path
from ckptflow.core.formats import FORMATS, load_and_predict
from ckptflow.core.manifest import export_hashes, read_manifest
from ckptflow.core.native_output import last_lines, native_output_to
from ckptflow.core.run_dir import RunDir
from ckptflow.core.stop import raise_if_stop_requested
from ckptflow.orchestration.caching import cache_while_present
from ckptflow.orchestration.results import result_record

log = logging.getLogger("ckptflow.verify")

REQUIRED_FIELDS = ("kind", "format", "path", "sha256", "bytes")


@result_record
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


def verify_run_dir(run_dir: str | Path) -> list[VerifyRow]:
    """Verify every artifact of `run_dir`'s manifest; exports are loaded and run.

    Example:
        rows = verify_run_dir("runs/default")
        assert all(r.ok for r in rows)
    """
    run_dir = Path(run_dir).resolve()
    manifest = checked_manifest(run_dir)
    rows, exports = [], []
    for entry in manifest["artifacts"]:
        row, path = _check_file(run_dir, entry)
        rows.append(row)
        if row.ok and entry["kind"] == "export":
            exports.append((row, entry, path))
    if exports:
        by_kind = {r.kind: r for r in rows}
        for needed in ("data", "reference"):
            if needed not in by_kind or not by_kind[needed].ok:
                raise BadInputError(f"{run_dir}: the {needed} file is missing or changed, so "
                                    "exports cannot be checked. Re-run the flow on this run "
                                    "directory.")
        _check_exports(run_dir, manifest, exports)
    return rows + completeness_rows(manifest)


def completeness_rows(manifest: dict) -> list[VerifyRow]:
    """A failed row for each part of a finished run that is missing or stale.

    A finished run has, of its final checkpoint, an evaluation and (unless it is a sweep point)
    a report and every requested export. Hashes alone cannot tell: a run killed before its first
    export, or while exporting a newer checkpoint, lists only files that are intact.
    """
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


def _check_file(run_dir: Path, entry: dict) -> tuple[VerifyRow, Path | None]:
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


def _check_exports(run_dir: Path, manifest: dict, exports: list) -> None:
    reference_entry = next(a for a in manifest["artifacts"] if a["kind"] == "reference")
    reference = np.load(run_dir / reference_entry["path"], allow_pickle=False)
    snapshot = safe_path(run_dir, (manifest.get("data") or {}).get("path", "data/mnist.npz"))
    identity = manifest["model"]["identity"]
    shapes = manifest["model"].get("weight_shapes", [])
    loads, native_log = [], _native_log(run_dir)
    for row, entry, path in exports:
        fmt = FORMATS.get(entry["format"])
        if fmt is None:
            row.ok, row.problem = False, f"unknown format {entry['format']!r}"
        elif fmt.missing():
            row.ok, row.problem = False, f"needs {', '.join(fmt.missing())} (pip install -e '.[formats]')"
        elif fmt.hdf5 and (problem := inspect_hdf5(path, shapes)):
            row.ok, row.problem = False, problem
        else:
            loads.append((row, entry, fmt, path))
    for (row, entry, fmt, _), outcome in zip(loads, _load_in_fresh_processes(
            snapshot, identity, [(fmt.name, path) for _, _, fmt, path in loads], native_log),
            strict=True):
        if "error" in outcome:
            row.ok, row.problem = False, outcome["error"]
            log.warning("loading %s failed (%s); the last lines of %s:\n%s", row.path,
                        row.problem, native_log, last_lines(native_log))
            continue
        predictions = outcome["predictions"]
        row.load_seconds = round(outcome["seconds"], 3)
        row.max_abs_diff = float(np.max(np.abs(predictions - reference)))
        row.metrics = outcome["metrics"]
        row.accuracy = row.metrics.get("accuracy")
        recorded = entry.get("metrics") or {"accuracy": entry.get("test_accuracy")}
        differs = [k for k in recorded if k not in row.metrics
                   or not math.isclose(row.metrics[k], recorded[k], rel_tol=1e-6, abs_tol=1e-9)]
        if not row.max_abs_diff <= fmt.tolerance:
            row.ok, row.problem = False, (f"predictions differ by {row.max_abs_diff:.2e} "
                                          f"(> {fmt.tolerance})")
        elif differs:
            row.ok, row.problem = False, (f"{differs[0]} {row.metrics.get(differs[0])} differs "
                                          f"from the recorded {recorded[differs[0]]}")


def _load_in_fresh_processes(snapshot: Path, identity: dict, loads: list[tuple[str, Path]],
                             native_log: Path) -> list[dict]:
    """Each (format, path) loaded and run in its own fresh process, one per core (at most 4)
    at a time; one outcome per load, in order: predictions or an error."""
    context = _loader_context()
    start_loader(native_log)
    at_once = max(1, min(4, os.cpu_count() or 1))
    outcomes = []
    for first in range(0, len(loads), at_once):
        raise_if_stop_requested()  # between loads, none running
        started = []
        for name, path in loads[first:first + at_once]:
            receiver, sender = context.Pipe(duplex=False)
            child = context.Process(target=load_and_predict,
                                    args=(sender, name, str(path), str(snapshot), identity,
                                          str(native_log)))
            child.start()
            sender.close()
            started.append((receiver, child))
        for receiver, child in started:
            try:
                outcome = receiver.recv()
            except EOFError:
                outcome = None
            child.join()
            outcomes.append(outcome or {"error": f"the loading process died (exit code "
                                                 f"{child.exitcode})"})
    return outcomes


def _loader_context() -> multiprocessing.context.BaseContext:
    """Each export loads in a process forked from a server that has imported TensorFlow but run
    nothing, so no state of this process (or of another format) leaks into a load."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tensorflow", "ckptflow.core.formats", "ckptflow.core.models",
                                    "ckptflow.tutorial.model"])
    return context


def start_loader(native_log: Path | None = None) -> None:
    """Start the loading process now (if not yet), so its TensorFlow import (~10 s here)
    overlaps the stages after training (not training: it would take a core)."""
    from multiprocessing import forkserver

    _loader_context()
    with native_output_to(native_log) if native_log else contextlib.nullcontext():
        forkserver.ensure_running()


def _native_log(run_dir: Path) -> Path:
    """The run directory's native log, or a temporary file where the run directory is read-only
    (verify reads other people's runs)."""
    path = RunDir(run_dir).native_log
    try:
        path.parent.mkdir(exist_ok=True)
        with path.open("a"):
            return path
    except OSError:
        return Path(tempfile.gettempdir()) / f"ckptflow-verify-{os.getpid()}.log"


def inspect_hdf5(path: Path, weight_shapes: list[list[int]]) -> str:
    """'' if the HDF5 file holds a dataset of every trainable weight's shape, else what is wrong."""
    import h5py

    expected = {tuple(shape) for shape in weight_shapes}
    shapes = set()
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda _, obj: shapes.add(obj.shape)
                         if isinstance(obj, h5py.Dataset) else None)
    except OSError as exc:
        return f"not a readable HDF5 file ({exc})"
    missing = expected - shapes
    return f"HDF5 lacks datasets of shapes {sorted(missing)}" if missing else ""


def format_table(rows: list[VerifyRow]) -> str:
    """The verdicts as a text table, with the model's first metric (the tutorial's accuracy)."""
    name = next((next(iter(r.metrics)) for r in rows if r.metrics), "accuracy")
    lines = [f"{'kind':<10} {'format':<19} {'bytes':>11} {'load s':>7} {'max|diff|':>10} "
             f"{name[:10]:>10}  ok  path / problem"]
    for r in rows:
        value = r.metrics.get(name)
        lines.append(
            f"{r.kind:<10} {r.format:<19} {r.bytes if r.bytes is not None else '-':>11} "
            f"{r.load_seconds if r.load_seconds is not None else '-':>7} "
            f"{f'{r.max_abs_diff:.1e}' if r.max_abs_diff is not None else '-':>10} "
            f"{f'{value:.4f}' if value is not None else '-':>10}  "
            f"{'OK' if r.ok else 'FAIL':<3} {r.path}{'  ' + r.problem if r.problem else ''}")
    return "\n".join(lines)


def manifest_outputs(run_dir: str | Path) -> list[Path]:
    """Every file the manifest lists: verify's result holds while they are unchanged."""
    try:
        return [RunDir(run_dir).root / a["path"] for a in read_manifest(run_dir).get("artifacts", [])]
    except (BadInputError, KeyError, TypeError):
        return []


@task(name="verify", **cache_while_present(lambda p: manifest_outputs(p["config"].run_dir)))
def verify_task(config: TrainConfig) -> list[VerifyRow]:
    """Verify the run directory as `ckptflow verify` does; fail the run if any artifact fails."""
    from prefect.artifacts import create_table_artifact

    from ckptflow.orchestration.artifacts import artifact_key

    rows = verify_run_dir(config.run_dir)
    create_table_artifact(table=[r.model_dump() for r in rows],
                          key=artifact_key(config.run_dir, "verify"),
                          description=f"ckptflow verify {config.run_dir}")
    failed = [r for r in rows if not r.ok]
    log.info("verify:\n%s", format_table(rows))
    if failed:
        raise VerificationFailed(f"verify failed for {len(failed)} artifact(s): " + "; ".join(
            f"{r.path}: {r.problem}" for r in failed))
    return rows
