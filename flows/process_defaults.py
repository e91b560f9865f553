"""Process settings ckptflow's entry points apply before TensorFlow and Prefect load.

Called first by the CLI and the flow modules (the entry points of ad-hoc runs, `python flows/...py`
and deployment runs), never at the import of a library module:
- Prefect's temporary server can take longer than Prefect's 20 s default to come up on a busy
  2-core machine, and nothing is sent to Prefect's analytics;
- TensorFlow's C++ start-up lines (CUDA probing on a CPU machine) and tf.function retracing
  notices (each freshly loaded model being checked) drown the run's own logs; errors that
  matter still surface as Python exceptions. absl's lines ("All log messages before
  absl::InitializeLog()", CUDA probing) ignore TF_CPP_MIN_LOG_LEVEL: a run sends them, with the
  converters' and verify's loader processes' output, to its logs/native.log
  (`ckptflow.core.native_output`).
A value the user sets in the environment wins.
"""

import logging
import os


def apply_process_defaults() -> None:
    """Set the environment defaults and log levels; Prefect reads its settings once, at import."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
