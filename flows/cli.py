"""`ckptflow`: run the pipeline locally (no server, no network needed).

`ckptflow --help` imports neither TensorFlow nor Prefect; they load only once a run starts.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import types
import typing

from tasks.config import TrainConfig

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _option_type(annotation):
    """The parser behind an annotation such as `int`, `float`, `int | None` or `list[str]`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return lambda text: [item.strip() for item in text.split(",") if item.strip()]
    return annotation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptflow",
        description="Train the TensorFlow 'Save and load models' MNIST model under Prefect "
        "without losing work: checkpoints every N batches and every epoch, resume from the "
        "latest valid checkpoint, evaluation, and an export in every format.",
        epilog="Run the same command again to resume an unfinished run, or to be told it is "
        "complete. See README.md.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run", help="run the whole pipeline locally (Prefect's temporary local API; no server)",
        description="Run fetch-data, build-model, resume-from-latest, train-with-checkpoints, "
        "evaluate and export-each-format as one Prefect flow. A run directory that already "
        "has checkpoints is resumed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, field in TrainConfig.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        if field.annotation is bool:
            run.add_argument(flag, dest=name, default=field.default, help=field.description,
                             action=argparse.BooleanOptionalAction)
        else:
            run.add_argument(flag, dest=name, default=field.default, help=field.description,
                             type=_option_type(field.annotation), metavar=name.upper())
    verify = sub.add_parser(
        "verify", help="check a run directory: hashes, safe paths, every export loaded and run",
        description="For each manifest entry: refuse paths that leave the run directory, check "
        "the SHA-256 before opening anything, then load every export in a fresh process with "
        "its own runtime, predict the test set and compare with the reference predictions and "
        "the recorded accuracy. Exits 1 if any row fails. Needs no Prefect server.")
    verify.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to check")
    verify.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def run_verify(run_dir: str, as_json: bool) -> int:
    """`ckptflow verify`: print the table, exit 1 if any row fails, 2 for an unusable manifest."""
    import json

    from tasks.errors import BadInputError
    from tasks.verify import format_table, verify_run_dir

    try:
        rows = verify_run_dir(run_dir)
    except BadInputError as exc:
        print(f"ckptflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps([r.model_dump() for r in rows], indent=2) if as_json else format_table(rows))
    failed = [r for r in rows if not r.ok]
    if failed:
        print(f"ckptflow: verify failed: {len(failed)} of {len(rows)} artifacts "
              f"({', '.join(r.path for r in failed)})", file=sys.stderr)
        return EXIT_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        return run_verify(args.run_dir, args.json)
    from pydantic import ValidationError

    from tasks.config import describe_validation_error
    from tasks.errors import BadInputError

    try:
        config = TrainConfig(**{k: v for k, v in vars(args).items() if k != "command"})
    except ValidationError as exc:
        print(f"ckptflow: error: {describe_validation_error(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect stops its temporary server at exit and logs it; an error registered before that
    # handler is printed after it (atexit runs last-in, first-out), so it stays the last line.
    last_words: list[str] = []
    atexit.register(lambda: last_words and print(last_words[0], file=sys.stderr))
    try:
        from flows.train_pipeline import train_pipeline

        summary = train_pipeline(config)
    except BadInputError as exc:
        last_words.append(f"ckptflow: error: {exc}")
        return EXIT_BAD_INPUT
    except Exception as exc:
        last_words.append(f"ckptflow: run failed: {type(exc).__name__}: {exc}. Run the same "
                          "command again to resume from the latest checkpoint.")
        return EXIT_FAILED
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """A few lines a person reads after a run: where it stands and what it made."""
    t, e = summary["training"], summary["evaluation"]
    if t["batches_trained"] == 0:
        status = f"already complete at {t['epoch']} epochs; nothing to train"
    elif t["resumed_from"]:
        status = (f"resumed from {t['resumed_from']} (epoch {t['start_epoch']}, batch "
                  f"{t['start_batch']}), trained {t['batches_trained']} batches to epoch {t['epoch']}")
    else:
        status = f"trained from scratch to epoch {t['epoch']} ({t['batches_trained']} batches)"
    lines = [
        f"run directory: {summary['run_dir']}",
        f"data: {summary['data']['source']} ({summary['data']['reason']})",
        f"training: {status}",
        f"test accuracy: {e['test_accuracy']:.2%} (untrained model: {e['untrained_accuracy']:.2%})",
        "exports (each loaded back and compared with the trained model):",
    ]
    for x in summary["exports"]:
        lines.append(f"  {x['format']:<13} {x['path']:<28} {x['bytes']:>10,} bytes  "
                     f"accuracy {x['test_accuracy']:.4f}  max |diff| {x['max_abs_diff']:.1e}")
    lines.append(f"manifest: {os.path.join(summary['run_dir'], 'manifest.json')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
