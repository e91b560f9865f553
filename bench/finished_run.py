"""What a finished run's rerun costs: `ckptflow run` on a complete run directory.

One tutorial-size run is made first (the defaults, bundled data; not timed). Then, interleaved
for `--rounds` rounds, each a fresh process: the interpreter alone (`python -c pass`, the floor),
the rerun (answered from the manifest and file hashes), and the same rerun made to take the
pipeline (a changed `--stop-grace-seconds`, which changes no output: what every rerun cost before
the manifest answered it). Medians, min-max and the ratio of medians go to
bench/results/finished_run.json.

Usage:
    python bench/finished_run.py              # 5 rounds, about 5 minutes here
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CKPTFLOW = str(Path(sys.executable).parent / "ckptflow")


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckptflow-bench-") as tmp:
        env = {**os.environ, "PREFECT_HOME": f"{tmp}/prefect", "PREFECT_SERVER_ANALYTICS_ENABLED":
               "false"}
        env.pop("PREFECT_API_URL", None)  # ad-hoc use
        run = ["run", "--run-dir", f"{tmp}/run", "--data", "bundled"]
        timed([CKPTFLOW, *run], env)
        shutil.copytree(f"{tmp}/run", f"{tmp}/copy")  # the pipeline's reruns record their grace
        seconds: dict[str, list[float]] = {"python": [], "rerun": [], "pipeline": []}
        for i in range(args.rounds):
            seconds["python"].append(timed([sys.executable, "-c", "pass"], env))
            seconds["rerun"].append(timed([CKPTFLOW, *run], env))
            seconds["pipeline"].append(timed([CKPTFLOW, "run", "--run-dir", f"{tmp}/copy",
                                              "--data", "bundled", "--stop-grace-seconds",
                                              str(30 + i)], env))
    median = {k: statistics.median(v) for k, v in seconds.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "rounds": args.rounds,
              "command": "python bench/finished_run.py", "load_average": os.getloadavg()[0],
              "median_s": {k: round(v, 2) for k, v in median.items()},
              "min_max_s": {k: [round(min(v), 2), round(max(v), 2)] for k, v in seconds.items()},
              "rerun_over_pipeline": round(median["rerun"] / median["pipeline"], 3)}
    (REPO / "bench" / "results" / "finished_run.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
