"""verify: check a run directory without the flow, as another machine would before trusting it.

Every manifest entry's path and hash are checked first (core.integrity). Every export is then
loaded in a fresh process with its own runtime, predicts the test set, and must match the
reference predictions saved at export time (within the format's tolerance) and the metrics
recorded in the manifest (the model's own: accuracy, mae, ...). HDF5 files are also inspected
with h5py for every trainable weight's shape.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import tempfile
from pathlib import Path

from prefect import task

from ckptflow.config import TrainConfig
from ckptflow.core import predictions
from ckptflow.core.errors import BadInputError, VerificationFailed
from ckptflow.core.formats import FORMATS, load_and_predict
from ckptflow.core.integrity import VerifyRow, check_file, checked_manifest, completeness_rows, safe_path
from ckptflow.core.manifest import artifacts_digest, read_manifest, update_manifest
from ckptflow.core.native_output import last_lines, native_output_to
from ckptflow.core.run_dir import RunDir
from ckptflow.core.stop import raise_if_stop_requested
from ckptflow.orchestration.caching import cache_while_present
from ckptflow.orchestration.results import result_record

log = logging.getLogger("ckptflow.verify")
result_record(VerifyRow)  # a cached verify's rows are read back as VerifyRow


def verify_run_dir(run_dir: str | Path) -> list[VerifyRow]:
    """Verify every artifact of `run_dir`'s manifest; exports are loaded and run. A failed
    artifact is a row whose `ok` is False; an unusable manifest is a BadInputError."""
    run_dir = Path(run_dir).resolve()
    manifest = checked_manifest(run_dir)
    rows, exports = [], []
    for entry in manifest["artifacts"]:
        row, path = check_file(run_dir, entry)
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


def _check_exports(run_dir: Path, manifest: dict, exports: list) -> None:
    reference_entry = next(a for a in manifest["artifacts"] if a["kind"] == "reference")
    reference = predictions.load(run_dir / reference_entry["path"])
    snapshot = safe_path(run_dir, (manifest.get("data") or {}).get("path", "data/mnist.npz"))
    identity = manifest["model"]["identity"]
    shapes = manifest["model"].get("weight_shapes", [])
    loads, (native_log, temporary_log) = [], _native_log(run_dir)
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
        row.load_seconds = round(outcome["seconds"], 3)
        row.max_abs_diff = predictions.max_abs_diff(outcome["predictions"], reference)
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
    if temporary_log and all(row.ok for row, *_ in loads):  # kept where a warning names it
        native_log.unlink(missing_ok=True)


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


def _native_log(run_dir: Path) -> tuple[Path, bool]:
    """(the run directory's native log, False), or where the run directory is read-only (verify
    reads other people's runs) (a new temporary file, True)."""
    path = RunDir(run_dir).native_log
    try:
        path.parent.mkdir(exist_ok=True)
        with path.open("a"):
            return path, False
    except OSError:
        handle, name = tempfile.mkstemp(prefix="ckptflow-verify-", suffix=".log")
        os.close(handle)
        return Path(name), True


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
    width = max(10, len(name))  # a multi-output model's metric is named by its output
    lines = [f"{'kind':<10} {'format':<19} {'bytes':>11} {'load s':>7} {'max|diff|':>10} "
             f"{name:>{width}}  ok  path / problem"]
    for r in rows:
        value = r.metrics.get(name)
        lines.append(
            f"{r.kind:<10} {r.format:<19} {r.bytes if r.bytes is not None else '-':>11} "
            f"{r.load_seconds if r.load_seconds is not None else '-':>7} "
            f"{f'{r.max_abs_diff:.1e}' if r.max_abs_diff is not None else '-':>10} "
            f"{f'{value:.4f}' if value is not None else '-':>{width}}  "
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

    update_manifest(config.run_dir, verified=None)  # until these files pass again
    rows = verify_run_dir(config.run_dir)
    create_table_artifact(table=[r.model_dump() for r in rows],
                          key=artifact_key(config.run_dir, "verify"),
                          description=f"ckptflow verify {config.run_dir}")
    failed = [r for r in rows if not r.ok]
    log.info("verify:\n%s", format_table(rows))
    if failed:
        raise VerificationFailed(f"verify failed for {len(failed)} artifact(s): " + "; ".join(
            f"{r.path}: {r.problem}" for r in failed))
    # a rerun may trust these files, unchanged, without loading them again (stages.finished_run)
    update_manifest(config.run_dir, verified={
        "artifacts_sha256": artifacts_digest(read_manifest(config.run_dir))})
    return rows
