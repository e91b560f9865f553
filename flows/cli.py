"""`ckptflow`: run the pipeline locally (no server, no network needed).

`ckptflow --help` imports neither TensorFlow nor Prefect; they load only once a command runs.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
import types
import typing

from ckptflow.config import NOT_SHARED, SweepConfig, TrainConfig, grid_points
from ckptflow.flows.process_defaults import apply_process_defaults

EXIT_FAILED = 1  # a rerun resumes from the latest checkpoint
EXIT_BAD_INPUT = 2  # bad input or a condition to fix first; nothing changed
EXIT_STOPPED = 3  # stopped by SIGTERM/SIGINT after committing a checkpoint; a rerun continues


def _option_type(annotation):
    """The parser behind an annotation such as `int`, `float`, `int | None` or `list[int]`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is dict:
        return _json_object
    if typing.get_origin(annotation) is list:
        item_type = typing.get_args(annotation)[0]

        def parse_list(text: str) -> list:
            return [item_type(item.strip()) for item in text.split(",") if item.strip()]

        parse_list.__name__ = f"comma-separated {item_type.__name__}"  # argparse's error names it
        return parse_list
    return annotation


def _json_object(text: str) -> dict:
    """A JSON object from the command line (`--model-params '{"filters": 16}'`)."""
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}). Expected an object such as "
                                         "'{\"filters\": 16}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON {type(value).__name__}, not an object. "
                                         "Expected an object such as '{\"filters\": 16}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptflow",
        description="Train a Keras model (the TensorFlow 'Save and load models' tutorial's MNIST "
        "classifier by default, or your own) under Prefect without losing work: checkpoints "
        "every N batches and every epoch, resume from the latest valid checkpoint, evaluation, "
        "and an export in every format.",
        epilog="Run the same command again to resume an unfinished run, or to be told it is "
        "complete. Exit status: 0 done; 1 failed, and running the same command again resumes "
        "it; 2 bad input or a condition to fix first (the one-line message says what), nothing "
        "changed; 3 stopped by SIGTERM or SIGINT (in training after committing the batch "
        "reached), and running it again continues from there; 137 a multi-worker process ended "
        "by its watchdog, the other workers lost. See README.md.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run", help="run the whole pipeline locally (no server needed)",
        description="Run fetch-data, build-model, resume-from-latest, train-with-checkpoints, "
        "evaluate and export-each-format as one Prefect flow. A run directory that already "
        "has checkpoints is resumed. The run reports to PREFECT_API_URL if one is configured, "
        "else to the warm server of `ckptflow server start` if it is up, else to Prefect's "
        "temporary local server, started for this run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_options(run)
    verify = sub.add_parser(
        "verify", help="check a run directory: hashes, safe paths, every export loaded and run",
        description="For each manifest entry: refuse paths that leave the run directory, check "
        "the SHA-256 before opening anything, then load every export in a fresh process with "
        "its own runtime, predict the test set and compare with the reference predictions and "
        "the recorded accuracy. Exits 1 if any row fails. Needs no Prefect server.")
    verify.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to check: a "
                        "path, or an s3:// URL (checked in a temporary local copy)")
    verify.add_argument("--json", action="store_true", help="print the rows as JSON")
    worker = sub.add_parser(
        "worker", help="join a multi-worker run as a non-chief worker (TF_CONFIG index 1, 2, ...)",
        description="Train along with the chief (`ckptflow run --strategy multi-worker`, TF_CONFIG "
        "index 0) of a MultiWorkerMirroredStrategy run. Give it the chief's options; it waits for "
        "the chief's data snapshot in the shared run directory, restores the chief's latest "
        "checkpoint and writes nothing into the run directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_options(worker)
    worker.add_argument("--wait-for-chief", type=float, default=600.0, metavar="SECONDS",
                        help="seconds to wait for the chief's data snapshot and model")
    sweep = sub.add_parser(
        "sweep", help="train a grid of units × dropout × learning rate in parallel on Dask",
        description="Train and evaluate every grid point, each in its own run directory under "
        "--sweep-dir, as tasks on a Dask cluster (a local one by default), and rank them. Run "
        "again to skip finished points and resume unfinished ones. Other options are shared by "
        "every point.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_options(sweep, SweepConfig.model_fields, skip=("settings",))
    _add_config_options(sweep, TrainConfig.model_fields, skip=(*NOT_SHARED, "formats"),
                        shared=True)  # a sweep exports nothing
    server = sub.add_parser(
        "server", help="keep one local Prefect server up for ad-hoc runs: start, stop, status",
        description="`ckptflow run` and `ckptflow sweep` without PREFECT_API_URL start Prefect's "
        "temporary server and stop it when they end. `ckptflow server start` keeps one up "
        "instead (`prefect server start` on 127.0.0.1, in the background, with credentials of "
        "its own, recorded in PREFECT_HOME/ckptflow-server.json); runs use it while it is up.")
    actions = server.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = actions.add_parser("start", help="start the warm server (no-op if it is up)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    start.add_argument("--port", type=int, default=4200, help="port on 127.0.0.1")
    actions.add_parser("stop", help="stop the warm server")
    actions.add_parser("status", help="say whether the warm server is up (exit 1 if not)")
    return parser


def _add_config_options(parser: argparse.ArgumentParser, fields=None, skip: tuple = (),
                        shared: bool = False) -> None:
    """One option per typed parameter, so the CLI cannot drift from the pydantic models; a
    `shared` one (a sweep's setting) has no default, so only those given reach `settings`."""
    for name, field in (fields or TrainConfig.model_fields).items():
        if name in skip:
            continue
        flag = f"--{name.replace('_', '-')}"
        common = {"dest": f"shared.{name}" if shared else name,
                  "help": f"{field.description} (default: {field.default})" if shared
                  else field.description,
                  "default": argparse.SUPPRESS if shared else field.default}
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(field.annotation) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(field.annotation), **common)
        else:
            parser.add_argument(flag, type=_option_type(field.annotation), metavar=name.upper(),
                                **common)


def run_verify(run_dir: str, as_json: bool) -> int:
    """`ckptflow verify`: print the table, exit 1 if any row fails, 2 for an unusable manifest."""
    import json
    import tempfile
    from pathlib import Path

    from ckptflow.core.errors import BadInputError
    from ckptflow.core.object_store import StoreFailed, is_url
    from ckptflow.stages.verify import format_table, verify_run_dir

    try:
        if is_url(run_dir):  # checked in a fresh local copy, as any machine would see it
            from ckptflow.core.remote_run import copy_run

            with tempfile.TemporaryDirectory(prefix="ckptflow-verify-") as copy:
                copy_run(run_dir, Path(copy) / "run")
                rows = verify_run_dir(Path(copy) / "run")
        else:
            rows = verify_run_dir(run_dir)
    except BadInputError as exc:
        print(f"ckptflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StoreFailed as exc:
        print(f"ckptflow: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps([r.model_dump() for r in rows], indent=2) if as_json else format_table(rows))
    failed = [r for r in rows if not r.ok]
    if failed:
        print(f"ckptflow: verify failed: {len(failed)} of {len(rows)} artifacts "
              f"({', '.join(r.path for r in failed)})", file=sys.stderr)
        return EXIT_FAILED
    return 0


def run_worker(config: TrainConfig, wait_for_chief: float) -> int:
    """`ckptflow worker`: train along with a multi-worker run's chief, without Prefect."""
    from ckptflow.core.errors import BadInputError, StopRequested, first_line
    from ckptflow.training import cluster
    from ckptflow.training.replicas import train_with_strategy

    try:
        if config.strategy != "multi-worker":
            raise BadInputError(f"ckptflow worker joins a multi-worker run. Received: "
                                f"strategy={config.strategy!r}. Expected: --strategy multi-worker.")
        strategy = cluster.strategy_for(config.strategy, config.peer_timeout_seconds)  # before any TF op
        if cluster.is_chief(strategy):
            raise BadInputError("this process is the chief (TF_CONFIG task index 0); start it with "
                                "`ckptflow run --strategy multi-worker`, and the others with "
                                "`ckptflow worker`.")
        done = train_with_strategy(config.run_dir, config,
                                   cluster.wait_for_chief(config, wait_for_chief))
    except BadInputError as exc:
        print(f"ckptflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StopRequested as exc:  # with the chief, at the same batch
        print(f"ckptflow: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as exc:
        print(f"ckptflow: worker failed: {type(exc).__name__}: {first_line(exc)}. Restart every "
              "worker of the run; they resume from the chief's latest checkpoint.",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"worker done: epoch {done['epoch']}, optimizer step {done['step']}")
    return 0


def run_server(action: str, port: int) -> int:
    """`ckptflow server start|stop|status`: the warm local Prefect server for ad-hoc runs."""
    from ckptflow.core.errors import BadInputError
    from ckptflow.flows import warm_server

    if action == "start":
        try:
            server, started = warm_server.start(port)
        except BadInputError as exc:
            print(f"ckptflow: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except RuntimeError as exc:
            print(f"ckptflow: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"warm server {'started' if started else 'already up'} on {server.ui} "
              f"(pid {server.pid}); `ckptflow run` and `ckptflow sweep` use it until "
              "`ckptflow server stop`")
        print(f"UI login: {server.auth}")
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:
            print(f"note: PREFECT_API_URL is set ({get_current_settings().api.url}): runs report "
                  "there, not to the warm server")
        return 0
    if action == "stop":
        server = warm_server.stop()
        print(f"warm server on {server.ui} stopped" if server else "no warm server recorded")
        return 0
    server = warm_server.recorded()
    if server is None:
        print("no warm server (`ckptflow server start` starts one)")
        return EXIT_FAILED
    if not warm_server.answers(server):
        print(f"warm server on {server.ui} recorded but not answering (pid {server.pid}); "
              "`ckptflow server stop` forgets it")
        return EXIT_FAILED
    print(f"warm server up on {server.ui} (pid {server.pid}, since {server.started}, log "
          f"{server.log})\nUI login: {server.auth}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_process_defaults()  # before Prefect and TensorFlow load: both read them once
    if args.command == "verify":
        return run_verify(args.run_dir, args.json)
    if args.command == "server":
        return run_server(args.action, getattr(args, "port", None))

    from pydantic import ValidationError

    from ckptflow.config import describe_validation_error
    from ckptflow.core.errors import BadInputError

    options = {k: v for k, v in vars(args).items() if k not in ("command", "wait_for_chief")}
    try:
        if args.command == "sweep":
            shared = {k.removeprefix("shared."): options.pop(k) for k in list(options)
                      if k.startswith("shared.")}
            config = SweepConfig(**options, settings=shared)
        else:
            config = TrainConfig(**options)
    except ValidationError as exc:
        print(f"ckptflow: error: {describe_validation_error(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "worker":
        return run_worker(config, args.wait_for_chief)
    from ckptflow.stages.preflight import check_request

    try:  # before Prefect's server starts and TensorFlow loads: bad input costs seconds
        for point in grid_points(config) if args.command == "sweep" else [config]:
            check_request(point)
    except BadInputError as exc:
        print(f"ckptflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from ckptflow.core.object_store import is_url

    if args.command == "run" and not is_url(config.run_dir):  # a URL's is answered once pulled
        from ckptflow.stages.finished_run import finished_summary

        if (summary := finished_summary(config)) is not None:  # no server, no TensorFlow
            print(format_summary(summary))
            return 0
    from ckptflow.flows.local_server import ad_hoc_server

    # If Prefect starts its own temporary server (the fallback) it stops it at exit and logs it;
    # an error registered before that handler is printed after it (atexit runs last-in,
    # first-out), so it stays the last line.
    last_words: list[str] = []
    atexit.register(say_last_words, last_words)
    from ckptflow.core.errors import StopRequested
    from ckptflow.core.lease import LeaseLost
    from ckptflow.core.native_output import TensorFlowImport
    from ckptflow.core.stop import StopOnSignal, raise_if_stop_requested

    # A sweep's points share the default grace.
    grace = (config if isinstance(config, TrainConfig) else TrainConfig()).stop_grace_seconds
    try:  # a signal only sets a flag: read before and after the flow, which reads it too
        with StopOnSignal(grace), \
                ad_hoc_server() as wait_until_ready:  # a temporary one starts as the flow loads
            if args.command == "sweep":
                from ckptflow.flows.sweep import sweep_flow as run_flow
            else:
                from ckptflow.flows.train_pipeline import train_pipeline as run_flow
            raise_if_stop_requested()
            # TensorFlow (~10 s) loads beside the server's start (~10 s), not after it; not for a
            # run in a store, which may be finished (known once pulled, in the flow)
            importing = TensorFlowImport() if args.command == "run" \
                and not is_url(config.run_dir) else None
            wait_until_ready()
            if importing:
                importing.wait(raise_if_stop_requested)
            raise_if_stop_requested()
            state = run_flow(config, return_state=True)
            if state.is_cancelled():  # stopped by a signal, its checkpoint committed
                last_words.append(f"ckptflow: {state.message}")
                return EXIT_STOPPED
            result = state.result()  # the flow's own exception, if it failed; a signal
            # from here on finds the work done: the run ends as it is, status 0
    except BadInputError as exc:
        last_words.append(f"ckptflow: error: {exc}")
        return EXIT_BAD_INPUT
    except StopRequested as exc:
        last_words.append(f"ckptflow: {exc}")
        return EXIT_STOPPED
    except LeaseLost as exc:  # another run holds the run directory now: rerunning this one won't help
        last_words.append(f"ckptflow: {exc}")
        return EXIT_FAILED
    except Exception as exc:
        last_words.append(f"ckptflow: run failed: {type(exc).__name__}: {exc}. Run the same "
                          "command again to resume from the latest checkpoint.")
        return EXIT_FAILED
    if args.command == "sweep":
        from ckptflow.stages.sweep import SUMMARY

        print(f"{len(result)} points: " + ", ".join(f"{r['point']} {r['status']}" for r in result))
        print(f"ranked summary: {os.path.join(config.sweep_dir, SUMMARY)}")
        return 0
    print(format_summary(result))
    return 0


def say_last_words(words: list[str]) -> None:
    """At exit, after the exit handlers registered later: the run's last line, if it has one;
    nothing after it."""
    from ckptflow.core.native_output import silence_unfinished_import

    if words:
        print(words[0], file=sys.stderr)
    silence_unfinished_import()


def format_summary(summary: dict) -> str:
    """A few lines a person reads after a run: where it stands and what it made."""
    from ckptflow.core.manifest import checkpoint_cost, read_manifest
    from ckptflow.core.models import describe_metrics
    from ckptflow.core.snapshot import describe_validation

    t, e = summary["training"], summary["evaluation"]
    if t["batches_trained"] == 0:
        status = f"already complete at {t['epoch']} epochs; nothing to train"
        if not any(r.get("load_seconds") for r in summary["verified"]):
            status += " (every file matches the manifest and was verified before: none reloaded)"
    elif t["resumed_from"]:
        status = (f"resumed from {t['resumed_from']} (epoch {t['start_epoch']}, batch "
                  f"{t['start_batch']}), trained {t['batches_trained']} batches to epoch {t['epoch']}")
    else:
        status = f"trained from scratch to epoch {t['epoch']} ({t['batches_trained']} batches)"
    if t.get("stopped_early"):
        status += f"; stopped early by {t['stopped_early']['by']} after epoch {t['epoch']}"
    lines = [
        f"run directory: {summary['run_dir']}",
        f"data: {summary['data']['source']} ({summary['data']['reason']}); "
        f"{describe_validation(summary['data'])}",
        f"training: {status}",
        f"test accuracy: {e['test_accuracy']:.2%} (untrained model: {e['untrained_accuracy']:.2%})"
        if e.get("test_accuracy") is not None else
        f"test: {describe_metrics(e['test_metrics'])} "
        f"(untrained model: {describe_metrics(e['untrained_metrics'])})",
        "exports (each loaded back and compared with the trained model):",
    ]
    for x in summary["exports"]:
        scores = "  ".join(f"{k} {v:.4f}" for k, v in x["metrics"].items())
        lines.append(f"  {x['format']:<13} {x['path']:<28} {x['bytes']:>10,} bytes  {scores}  "
                     f"max |diff| {x['max_abs_diff']:.1e}")
    working_copy = summary.get("working_copy") or summary["run_dir"]
    if t["batches_trained"] and (cost := checkpoint_cost({"attempts": [read_manifest(
            working_copy)["training"]["attempts"][-1]]})):
        lines.append(f"checkpoints: {cost}")
    lines.append(f"manifest: {os.path.join(summary['run_dir'], 'manifest.json')}")
    return "\n".join(lines)


def entry_point() -> None:
    """The `ckptflow` command and `python -m ckptflow`: `main()`, then exit without the
    interpreter's last garbage collection, which walks every object TensorFlow and Prefect made
    (~1.5 s here) though nothing in an ending process needs freeing."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
