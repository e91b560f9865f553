"""Joining a tf.distribute strategy: which strategy, which role (chief or worker), and TF_CONFIG.

A `multi-worker` run is one process per worker joined by `TF_CONFIG`; the chief (task index 0)
writes the run directory, the other workers read it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from ckptflow.config import TrainConfig
from ckptflow.core.errors import BadInputError
from ckptflow.core.manifest import read_manifest
from ckptflow.core.run_dir import RunDir
from ckptflow.core.snapshot import DataRecord
from ckptflow.training.watchdog import PeerWatchdog

log = logging.getLogger("ckptflow.distributed")

_POLL_S = 0.5
_strategies: dict[str, Any] = {}  # one per process: collective ops are configured only once


def strategy_for(name: str, peer_timeout_seconds: float = 300.0):
    """The process's tf.distribute strategy called `name`, created on first use: before any
    TensorFlow op, as MultiWorkerMirroredStrategy requires ("Collective ops must be configured at
    program startup")."""
    if name in _strategies:
        return _strategies[name]
    if name == "multi-worker":
        check_tf_config()
    import tensorflow as tf

    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif name == "multi-worker":
        try:
            with PeerWatchdog(peer_timeout_seconds, describe_tf_config()):
                strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: create the strategy (join_cluster) before any TensorFlow "
                               "op runs in this process") from exc
    else:
        raise BadInputError(f"no tf.distribute strategy for strategy={name!r}")
    _strategies[name] = strategy
    log.info("strategy %s: %d replicas in sync (%s)", name, strategy.num_replicas_in_sync,
             describe_worker(strategy))
    return strategy


def describe_tf_config() -> str:
    """`worker 0 of 2 workers (127.0.0.1:20000, 127.0.0.1:20001)`, from a checked TF_CONFIG."""
    spec = json.loads(os.environ["TF_CONFIG"])
    workers = spec["cluster"]["worker"]
    return (f"{spec['task']['type']} {spec['task']['index']} of {len(workers)} workers "
            f"({', '.join(workers)})")


def _resolver(strategy):
    """The strategy's cluster resolver, or None for one process (mirrored, default)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver if resolver is not None and resolver.task_type else None


def worker_count(strategy) -> int:
    """How many processes share the strategy's replicas (1 for mirrored)."""
    if (resolver := _resolver(strategy)) is None:
        return 1
    return sum(len(tasks) for tasks in resolver.cluster_spec().as_dict().values())


def check_tf_config() -> None:
    """A one-line error for a missing or malformed TF_CONFIG, instead of TensorFlow's."""
    fix = ('Set it to e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": '
           '{"type": "worker", "index": 0}} on each worker, with its own index.')
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise BadInputError(f"strategy multi-worker needs the TF_CONFIG environment variable. {fix}")
    try:
        spec = json.loads(text)
        workers = spec["cluster"]["worker"]
        index = int(spec["task"]["index"])
        ok = spec["task"]["type"] in spec["cluster"] and isinstance(workers, list) and index >= 0
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise BadInputError(f"TF_CONFIG is not a valid cluster description. Received: {text}. {fix}")


def is_chief(strategy) -> bool:
    """True for the one process that commits checkpoints and writes the run directory."""
    if (resolver := _resolver(strategy)) is None or resolver.task_type == "chief":
        return True
    return (resolver.task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


def describe_worker(strategy) -> str:
    if (resolver := _resolver(strategy)) is None:
        return "one process"
    workers = len(resolver.cluster_spec().as_dict().get("worker", []))
    return f"{resolver.task_type} {resolver.task_id} of {workers} workers"


def wait_for_chief(config: TrainConfig, timeout_s: float) -> DataRecord:
    """The chief's data record, once it has written the data and the model with this worker's
    settings."""
    run_dir = RunDir(config.run_dir)
    request = config.data_request()
    deadline = time.monotonic() + timeout_s
    while True:
        manifest = read_manifest(run_dir)
        data, model = manifest.get("data"), manifest.get("model")
        if data and data.get("request") == request and model \
                and model.get("identity") == config.identity():
            return DataRecord(**data)
        if time.monotonic() >= deadline:
            raise BadInputError(
                f"no data and model from the chief in {run_dir} after {timeout_s:.0f} s (with "
                f"data={config.data!r}, units={config.units}, ...). Start the chief "
                "(`ckptflow run --strategy multi-worker`, TF_CONFIG index 0) with the same options "
                "and the same run directory, on a file system this worker mounts.")
        time.sleep(_POLL_S)
