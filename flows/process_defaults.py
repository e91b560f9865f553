"""Process settings ckptflow's entry points (the CLI, the flow modules) apply before TensorFlow
and Prefect load, never a library module's import. A value set in the environment wins.

Prefect's temporary server can take longer than its 20 s default to come up on a busy 2-core
machine. TensorFlow's C++ start-up lines and tf.function retracing notices drown the run's own
logs (errors still surface as Python exceptions); absl's lines ignore TF_CPP_MIN_LOG_LEVEL and go
to logs/native.log instead (`ckptflow.core.native_output`).
"""

import logging
import os


def apply_process_defaults() -> None:
    """Set the environment defaults and log levels; Prefect reads its settings once, at import."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
