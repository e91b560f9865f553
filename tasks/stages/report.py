"""report: one markdown report of the run and its training curve, written into the run directory
from the run directory alone, so it describes what is on disk."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

from prefect import task

from ckptflow.config import TrainConfig
from ckptflow.core.files import atomic_write_bytes, clear_abandoned_writes
from ckptflow.core.manifest import (
    artifact_entry,
    checkpoint_cost,
    export_hashes,
    read_manifest,
    set_artifacts,
)
from ckptflow.core.mirror import location_of
from ckptflow.core.models import describe_metrics
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import describe_validation

log = logging.getLogger("ckptflow.report")


def write_report(run_dir: str | Path) -> str:
    """Write `report.md` and `metrics/training_curve.png`; return the markdown. Call it holding
    the run directory's lock: it clears what killed writes left."""
    import pandas as pd

    run = RunDir(run_dir)
    for directory in (run.root, run.curve.parent):  # the last writer of a run: what killed
        clear_abandoned_writes(directory)  # writes of the manifest, metrics and report left
    manifest = read_manifest(run)
    history = pd.read_csv(run.history)
    atomic_write_bytes(run.curve, training_curve_png(history))
    markdown = _markdown(run, manifest, history)
    atomic_write_bytes(run.report, markdown.encode())
    checkpoint = manifest.get("training", {}).get("checkpoint")  # what the report describes
    set_artifacts(run, "report", [
        artifact_entry(run, run.report, "report", "markdown", checkpoint=checkpoint,
                       exports=export_hashes(manifest)),
        artifact_entry(run, run.curve, "report", "png", checkpoint=checkpoint)])
    return markdown


def training_curve_png(history) -> bytes:
    """Loss and the model's first metric per epoch, training and validation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    metrics = ["loss"] + [c for c in history.columns
                          if c not in ("epoch", "loss") and not c.startswith("val_")][:1]
    figure, panels = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), dpi=100,
                                  squeeze=False)
    for axes, metric in zip(panels[0], metrics, strict=True):
        axes.plot(history["epoch"], history[metric], marker="o", label=f"train {metric}")
        if f"val_{metric}" in history:
            axes.plot(history["epoch"], history[f"val_{metric}"], marker="o", label=f"val {metric}")
        axes.set_xlabel("epoch")
        axes.set_title(metric)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _markdown(run: RunDir, manifest: dict, history) -> str:
    data, training = manifest.get("data", {}), manifest.get("training", {})
    evaluation, model = manifest.get("evaluation", {}), manifest.get("model", {})
    config = manifest.get("parameters") or {}
    attempts = training.get("attempts", [])
    resumed = attempts[-1]["resumed_from"] if attempts else None
    lines = [
        f"# ckptflow run `{run.root.name}`",
        "",
        f"- **Data**: {data.get('source')} ({data.get('reason')}), "
        f"{data.get('train_samples')} train / {data.get('test_samples')} test examples, "
        f"{describe_validation(data)}, "
        f"sha256 `{str(data.get('data_sha256'))[:16]}…`",
        f"- **Model**: {model.get('parameters')} parameters, "
        + ", ".join(f"{k}={v}" for k, v in model.get("identity", {}).items()),
        f"- **Training**: {training.get('epoch')} epochs, {training.get('step')} optimizer steps; "
        + (f"this run resumed from `{resumed}`" if resumed else "this run started from scratch")
        + (f"; stopped early by {stop['by']} after epoch {stop['epoch']} of {config.get('epochs')}"
           if (stop := training.get("stopped_early")) else ""),
        *([f"- **Checkpoints**: {cost}"] if (cost := checkpoint_cost(training)) else []),
        f"- **Test**: {_metrics_text(evaluation, 'test')} "
        f"(untrained model: {_metrics_text(evaluation, 'untrained')})",
        f"- **Code**: `{manifest.get('code_version')}`, TensorFlow "
        f"{manifest.get('packages', {}).get('tensorflow')}, Prefect "
        f"{manifest.get('packages', {}).get('prefect')}",
        "",
        "## Training curve",
        "",
        f"![training curve](data:image/png;base64,"
        f"{base64.b64encode(run.curve.read_bytes()).decode()})",
        "",
        f"(also `{run.relative(run.curve)}` in the run directory)",
        "",
        "## Per-epoch metrics",
        "",
        "| " + " | ".join(history.columns) + " |",
        "|" + "---:|" * len(history.columns),
    ]
    for row in history.itertuples(index=False):
        lines.append(f"| {row[0]} | " + " | ".join(f"{v:.4f}" for v in row[1:]) + " |")
    exports = [a for a in manifest.get("artifacts", []) if a.get("kind") == "export"]
    names = list((exports[0].get("metrics") or {"accuracy": None}) if exports else [])
    lines += ["", "## Exports", "", "| format | file | bytes | " + " | ".join(
        f"test {n}" for n in names) + " | max abs diff |", "|---|---|---:|" + "---:|" * len(names)
        + "---:|"]
    for entry in exports:
        values = entry.get("metrics") or {"accuracy": entry.get("test_accuracy")}
        lines.append(f"| {entry['format']} | `{entry['path']}` | {entry['bytes']:,} | "
                     + " | ".join(f"{values.get(n) or 0:.4f}" for n in names)
                     + f" | {entry.get('max_abs_diff', 0):.1e} |")
    if config:
        lines += ["", "## Parameters", "", "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in config.items()]
    return "\n".join(lines) + "\n"


def _metrics_text(evaluation: dict, which: str) -> str:
    """`accuracy 91.20%, loss 0.3012` of the trained (`test`) or the untrained model."""
    return describe_metrics(evaluation.get(f"{which}_metrics") or {})


@task(name="report", persist_result=False)
def report_task(config: TrainConfig) -> str:
    """Write the run report and show it (and the metrics table) as keyed Prefect artifacts."""
    import pandas as pd
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from ckptflow.orchestration.artifacts import artifact_key

    run = RunDir(config.run_dir)
    markdown = write_report(run)
    create_markdown_artifact(markdown=markdown, key=artifact_key(config.run_dir, "report"),
                             description=f"ckptflow report of {location_of(config.run_dir)}")
    history = pd.read_csv(run.history).round(4).to_dict(orient="records")
    create_table_artifact(table=history, key=artifact_key(config.run_dir, "history"),
                          description=f"Per-epoch metrics of {location_of(config.run_dir)}")
    log.info("report: %s", run.report)
    return str(run.report)
