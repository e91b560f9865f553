"""Training steps in a fresh process for tests/test_distributed.py.

TensorFlow's devices and collective ops can only be configured before its first op, which the
pytest process has long run. Usage: `python distributed_driver.py RUN_DIR CONFIG_JSON STEPS_JSON
[LOGICAL_CPUS]`, where each step is {"epochs": N} (train to N, print the record as JSON),
{"epochs": N, "sigterm_at_step": S} (the same, sending itself SIGTERM after optimizer step S;
print the stop and the manifest's attempt) or {"drop": "cp-0001"} (remove a checkpoint, as if
the process had been killed before writing it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def signal_at(step: int | None):
    """An on_batch_end callback that sends this process SIGTERM after optimizer step `step`."""
    def callback(state) -> None:
        if state.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return callback


def main(run_dir: str, config_json: str, steps_json: str, logical_cpus: int = 0) -> None:
    import tensorflow as tf

    if logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    from conftest import small_config

    from ckptflow.core.errors import StopRequested
    from ckptflow.core.manifest import read_manifest
    from ckptflow.stages.prepare import prepare_run
    from ckptflow.training.cluster import strategy_for
    from ckptflow.training.stage import train_with_checkpoints

    overrides = json.loads(config_json)
    config = small_config(run_dir, **overrides)
    strategy_for(config.strategy, config.peer_timeout_seconds)  # before the first TensorFlow op
    for step in json.loads(steps_json):
        if "drop" in step:
            shutil.rmtree(Path(run_dir) / "checkpoints" / step["drop"])
            continue
        config = small_config(run_dir, **{**overrides, "epochs": step["epochs"]})
        try:
            record = train_with_checkpoints(run_dir, config, prepare_run(config),
                                            on_batch_end=signal_at(step.get("sigterm_at_step")))
        except StopRequested as exc:
            attempt = read_manifest(run_dir)["training"]["attempts"][-1]
            print(json.dumps({"stopped": str(exc), "attempt": attempt}), flush=True)
            continue
        print(json.dumps(record.model_dump()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:]))
