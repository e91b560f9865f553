"""The reliability table: every fault ckptflow claims to survive, injected for real, counted.

One command runs the drills (bench/fault_injection.py: SIGKILL and SIGTERM in training, SIGKILL
in the stages after it, a tf.data pipeline) and the fault tests that need a real server, a
real full disk or several processes (each a pytest case, run `--repeat` times), then writes the
table to docs/reliability.md and every number to bench/results/reliability.json.

Usage:
    python bench/reliability.py                       # ~25 min on 2 cores
    python bench/reliability.py --kills 20 --repeat 1 # a quicker pass
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DRILL = REPO / "bench" / "fault_injection.py"

# (fault, drill options); the count of injections is added from --kills.
DRILLS = [
    ("SIGKILL in training (40% aimed inside a checkpoint write; a save every 2 batches)",
     ["--in-write-share", "0.4"]),
    ("SIGTERM in training (no mid-epoch saves: only the stop's own checkpoint)",
     ["--signal", "TERM"]),
    ("SIGKILL in training a tf.data pipeline (examples/digits_cnn; a save every 2 batches)",
     ["--example", "digits", "--in-write-share", "0.3"]),
    ("SIGKILL in evaluate, export, report and verify",
     ["--stage", "finish", "--in-write-share", "0.5", "--kills-per-round", "4"]),
]
# (fault, injections per run of the case, what it asserts of the outcome and of lost work,
# pytest node ids)
CASES = [
    ("Full disk (ENOSPC) at a mid-epoch save, an epoch-end save and in each of 5 exports", 7,
     "bit-identical after space is freed", "0: every committed checkpoint and export intact",
     ["tests/test_full_disk.py"]),
    ("`ckptflow run`: SIGTERM at start-up, in training and after it; SIGKILL in training; "
     "its temporary Prefect server SIGKILLed mid-run", 5,
     "not compared (finishes)", "0 batches at a SIGTERM or a server loss; nothing left running",
     ["tests/test_graceful_stop.py::"
      "test_signals_at_any_stage_of_ckptflow_run_stop_it_cleanly_and_a_rerun_finishes"]),
    ("multi-worker: SIGTERM to a worker, SIGKILL to the chief mid-epoch, a worker that never "
     "arrives", 3, "within 1e-5 of one device",
     "0 batches at the SIGTERM; since the last save at the SIGKILL; no hang",
     ["tests/test_distributed.py::"
      "test_two_workers_stop_together_outlive_no_lost_peer_and_resume_to_match_one_device",
      "tests/test_distributed.py::"
      "test_a_worker_that_never_arrives_ends_the_chief_within_the_peer_timeout"]),
    ("Prefect Cancel on a deployment run (real server and worker)", 1,
     "not compared (finishes)", "0 batches (the next run resumes at the stop's batch)",
     ["tests/test_server.py::test_cancel_commits_the_batch_reached_and_the_next_run_loses_none"]),
]


def run_drill(options: list[str], kills: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        result = subprocess.run([sys.executable, str(DRILL), *options, "--kills", str(kills),
                                 "--seed", str(seed), "--json", str(out)],
                                capture_output=True, text=True)
        report = json.loads(out.read_text()) if out.exists() else {}
    report["exit_status"] = result.returncode
    return report


def drill_row(fault: str, report: dict) -> dict:
    """One table row from a drill's report (training and finishing drills name things apart)."""
    rounds = report.get("rounds", 0)
    if "verify_passes_on_incomplete_sets" in report:  # the finishing stages
        return {"fault": fault, "injected": report.get("kills", 0),
                "finished": f"{report.get('finished_rounds', 0)}/{rounds}",
                "identical": f"{report.get('identical_final_sets', 0)}/{rounds} export sets",
                "lost": f"{report.get('exports_lost', 0)} exports",
                "corrupt": f"{report.get('verify_passes_on_incomplete_sets', 0)} verify passes "
                           "on a half-written set",
                "ok": report["exit_status"] == 0}
    return {"fault": fault, "injected": report.get("kills", 0),
            "finished": f"{report.get('finished_rounds', 0)}/{rounds}",
            "identical": f"{report.get('bit_identical_rounds', 0)}/{rounds} bit-identical",
            "lost": f"max {report.get('max_batches_lost', '?')} batches",
            "corrupt": f"{report.get('corrupt_checkpoints_loaded', 0)} corrupt loads",
            "ok": report["exit_status"] == 0}


def run_case(nodes: list[str]) -> bool:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-o", "addopts=", *nodes], cwd=REPO, capture_output=True, text=True)
    return result.returncode == 0


def write_table(rows: list[dict], path: Path, command: str, seconds: float) -> None:
    lines = [
        "# Reliability: every fault, injected for real",
        "",
        f"Produced by `{command}` ({seconds / 60:.0f} min on this 2-core machine); the numbers",
        "are in `bench/results/reliability.json`. Drills count their own injections and check",
        "every outcome (bench/fault_injection.py); a test case counts as passed only if every",
        "assertion held: the state before the fault intact, the rerun resuming where it must,",
        "bit-identical where the test compares weights.",
        "",
        "| fault | injected | finished | identical to no fault | work lost | corrupt loads | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['fault']} | {r['injected']} | {r['finished']} | {r['identical']} | "
                     f"{r['lost']} | {r['corrupt']} | {'yes' if r['ok'] else '**no**'} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="injections per drill (100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each test case (3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", type=Path, default=REPO / "docs" / "reliability.md")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" /
                        "reliability.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows, raw = [], {}
    for fault, options in DRILLS:
        report = run_drill(options, args.kills, args.seed)
        raw[fault] = report
        rows.append(drill_row(fault, report))
        print(rows[-1], flush=True)
    for fault, per_run, identical, lost, nodes in CASES:
        passed = sum(run_case(nodes) for _ in range(args.repeat))
        raw[fault] = {"runs": args.repeat, "passed": passed, "tests": nodes}
        rows.append({"fault": fault, "injected": per_run * args.repeat,
                     "finished": f"{passed}/{args.repeat} runs", "identical": identical,
                     "lost": lost, "corrupt": "-",
                     "ok": passed == args.repeat})
        print(rows[-1], flush=True)
    command = "python bench/reliability.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    seconds = time.monotonic() - started
    write_table(rows, args.table, command, seconds)
    args.json.write_text(json.dumps({"command": command, "seconds": round(seconds),
                                     "rows": rows, "reports": raw}, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
