"""Fault drills: failures raised on purpose, once per run directory, to prove that resume works."""

from __future__ import annotations

from ckptflow.config import TrainConfig
from ckptflow.core.errors import InjectedFailure, InjectedIOError
from ckptflow.core.files import atomic_write_bytes
from ckptflow.core.run_dir import RunDir


def maybe_fail_after_epoch(run: RunDir, config: TrainConfig, epoch: int) -> None:
    """Fail right after epoch `fail_after_epoch` is committed, and in each of the next
    `fail_attempts - 1` attempts at their first epoch end (a marker in faults/ counts them)."""
    if config.fail_after_epoch is None or epoch < config.fail_after_epoch:
        return
    fired = next((k for k in range(1, config.fail_attempts + 1)
                  if first_time(run, f"fail_after_epoch-{config.fail_after_epoch}-{k}")), None)
    if fired is not None:
        raise InjectedFailure(f"injected failure {fired} of {config.fail_attempts} after epoch {epoch} "
                              f"(fail_after_epoch={config.fail_after_epoch}); "
                              "run again to resume from the checkpoint")


def maybe_io_error_at_step(run: RunDir, config: TrainConfig, step: int) -> None:
    """A transient I/O error once per run directory at `io_error_at_step`."""
    if config.io_error_at_step == step and first_time(run, f"io_error_at_step-{step}"):
        raise InjectedIOError(f"injected I/O error at step {step} (io_error_at_step={step})")


def first_time(run: RunDir, drill: str) -> bool:
    """True the first time a drill fires in a run directory (it leaves a marker in faults/)."""
    marker = run.faults / drill
    if marker.exists():
        return False
    atomic_write_bytes(marker, b"fired\n")
    return True
