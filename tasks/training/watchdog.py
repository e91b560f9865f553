"""A bound on waiting for the other workers of a multi-worker run.

MultiWorkerMirroredStrategy waits without end for a worker that never starts or died, blocked
inside TensorFlow (its constructor even holds the GIL). `PeerWatchdog`, as PyTorch's NCCL
watchdog, is a separate process told after each shared step what comes next; after
`timeout_seconds` without word it prints one line and SIGKILLs this process (status 137).
"""

from __future__ import annotations

import os
import subprocess
import sys

# The watcher: a plain Python without TensorFlow, reading what the process does from stdin.
WATCHER = r"""
import os, select, signal, sys
parent, timeout, cluster = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
doing, pending = "starting", b""
while True:
    ready, _, _ = select.select([sys.stdin.buffer], [], [], timeout)
    if not ready:
        print(f"ckptflow: no progress for {timeout:.0f} s while {doing} ({cluster}): another "
              "worker is gone or never arrived. Nothing committed is lost; start every worker "
              "of the run again (same TF_CONFIG) and they resume from the chief's latest "
              "checkpoint.", file=sys.stderr, flush=True)
        os.kill(parent, signal.SIGKILL)
        sys.exit(0)
    chunk = os.read(sys.stdin.fileno(), 65536)
    if not chunk:  # the process ended or finished its shared steps
        sys.exit(0)
    *lines, pending = (pending + chunk).split(b"\n")
    if lines:
        doing = lines[-1].decode()
"""


class PeerWatchdog:
    """While active, `beat(doing)` after each step that needs every worker; `cluster` ("worker 0
    of 2 workers") is for the message."""

    def __init__(self, timeout_seconds: float, cluster: str):
        self.timeout_seconds, self.cluster = timeout_seconds, cluster
        self._watcher: subprocess.Popen | None = None

    def __enter__(self) -> PeerWatchdog:
        self._watcher = subprocess.Popen(
            [sys.executable, "-c", WATCHER, str(os.getpid()), str(self.timeout_seconds),
             self.cluster], stdin=subprocess.PIPE, close_fds=True)
        self.beat("joining the other workers")
        return self

    def __exit__(self, *exc) -> None:
        self._watcher.stdin.close()
        self._watcher.wait()

    def beat(self, doing: str) -> None:
        """The step just finished; `doing` names the one that follows."""
        self._watcher.stdin.write(doing.encode() + b"\n")
        self._watcher.stdin.flush()
