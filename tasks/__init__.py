"""ckptflow stages: each module holds a plain, testable stage function and its thin Prefect task."""

import os

# TensorFlow's C++ log lines (CUDA probing on a CPU machine, graph attribute notices) drown the
# run's own logs; errors that matter still surface as Python exceptions. Override to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
