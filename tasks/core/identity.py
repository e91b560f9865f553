"""A run directory keeps the model and the data it was started with: one refusal for each, the
same words from the stages and from the checks of a request (`ckptflow.stages.preflight`)."""

from __future__ import annotations

from ckptflow.core.errors import BadInputError, describe_difference
from ckptflow.core.run_dir import RunDir


def check_same_model(run: RunDir, recorded: dict | None, identity: dict) -> None:
    """Refuse `identity` if the run directory was started with other model settings."""
    if recorded and recorded.get("identity") != identity:
        raise BadInputError(
            f"run directory {run} was started with a different model or different training "
            f"settings ({describe_difference(recorded.get('identity') or {}, identity)}). Use another "
            "--run-dir, or the original settings.")


def check_same_architecture(run: RunDir, recorded: dict | None, fingerprint: str) -> None:
    """Refuse a model whose architecture or compile settings differ from the run's, though its
    REF and params are the same (its code changed)."""
    before = (recorded or {}).get("fingerprint")
    if before and before != fingerprint:
        raise BadInputError(
            f"run directory {run} was started with a model of another architecture or compile "
            f"settings (fingerprint {before[:12]}, the model built now {fingerprint[:12]}): the "
            "model function's code changed. Use another --run-dir, or the original code.")


def check_same_data(run: RunDir, recorded: dict | None, existing_sha256: str | None,
                    request: dict, sha256: str) -> None:
    """Refuse data of digest `sha256` if the run directory already holds other data."""
    if existing_sha256 is None or existing_sha256 == sha256:
        return
    changed = describe_difference((recorded or {}).get("request") or {}, request)
    raise BadInputError(
        f"run directory {run} already holds different data (sha256 {existing_sha256[:12]}, "
        f"requested {sha256[:12]} from data={request.get('source')!r}"
        + (f"; {changed}" if changed else "") + "). Use another --run-dir, or the data, sample "
        "counts and seed the run was started with.")
