"""The typed parameters of a training run and of a sweep, shared by the CLI, the flows and the Prefect UI."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ckptflow.core.formats import FORMAT_NAMES
from ckptflow.core.models import TUTORIAL_MODEL, TUTORIAL_PARAMS
from ckptflow.core.object_store import is_url
from ckptflow.core.user_code import is_ref

DATA_SOURCES = ("auto", "keras", "bundled")
TUTORIAL_DATA_FIELDS = ("train_samples", "test_samples")  # the tutorial data's own options
DATA_FILE_SUFFIXES = (".npz", ".csv", ".csv.gz")
Strategy = Literal["default", "mirrored", "multi-worker"]

# Settings that define the tutorial model and its training trajectory (as run directories have
# always recorded them). On resume they come from the checkpoint; a different value is refused
# rather than silently mixed into the run. A user's model adds its REF and params.
IDENTITY_FIELDS = (*TUTORIAL_PARAMS, "batch_size", "seed")
# Everything that makes one run what it is: the model, the data and the fields above.
RUN_FIELDS = ("model", "model_params", *IDENTITY_FIELDS, "data", "data_params", *TUTORIAL_DATA_FIELDS,
              "callbacks", "callbacks_params", "class_weight")


class TrainConfig(BaseModel):
    """Parameters of one ckptflow run. Unknown keys and ill-typed values are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_dir: Annotated[str, Field(
        min_length=1,
        description="Directory that holds everything the run makes, or an object-store URL "
        "(s3://BUCKET/PREFIX: the run lives there, worked on in a local copy under "
        "CKPTFLOW_STAGING_DIR). Running again with the same directory resumes it, from any "
        "machine for a URL; another directory starts another run.")] = "runs/default"
    epochs: Annotated[int, Field(
        gt=0, le=100_000,
        description="Total epochs to reach. More than already done continues to the new total.")] = 10
    model: Annotated[str, Field(
        min_length=1,
        description="The model: a function returning a compiled keras.Model, as "
        "package.module:function or path/to/file.py:function (called with --model-params as "
        "keywords, and seed=--seed if it takes one). Default: the tutorial's MNIST "
        "classifier.")] = TUTORIAL_MODEL
    model_params: Annotated[dict[str, Any], Field(
        description="Keyword arguments of the model function, as JSON, e.g. "
        "'{\"filters\": 16}'. For the tutorial model: units, dropout, learning_rate.")] = {}
    data: Annotated[str, Field(
        min_length=1,
        description="The data: a function returning {x_train, y_train, x_test, y_test} NumPy "
        "arrays or {train, test} unbatched tf.data pipelines (optionally x_val, y_val or "
        "validation: a validation set of its own), as package.module:function or "
        "path/to/file.py:function; or the tutorial's MNIST: auto (Keras cache or download, else "
        "bundled), keras, bundled (5,000 real images shipped with ckptflow), or a path to an "
        ".npz laid out like Keras' mnist.npz or a CSV of 784 pixels + label.")] = "auto"
    data_params: Annotated[dict[str, Any], Field(
        description="Keyword arguments of the data function, as JSON.")] = {}
    callbacks: Annotated[str | None, Field(
        description="Your Keras callbacks: a function returning a list of them (EarlyStopping, "
        "ReduceLROnPlateau, LearningRateScheduler, your own), as package.module:function or "
        "path/to/file.py:function (called with --callbacks-params as keywords, and seed=--seed "
        "if it takes one). They are called where fit() calls them, and their state is in every "
        "checkpoint (your own callback's through get_state()/set_state()). Default: "
        "none.")] = None
    callbacks_params: Annotated[dict[str, Any], Field(
        description="Keyword arguments of the callbacks function, as JSON, e.g. "
        "'{\"patience\": 3}'.")] = {}
    class_weight: Annotated[dict[int, float] | None, Field(
        description="Weight of each class in the training loss, as fit's class_weight, as "
        "JSON, e.g. '{\"0\": 1.0, \"1\": 5.0}' (integer or one-hot labels; a class not "
        "named weighs 1). Not with per-example weights (w_train or (x, y, weight) "
        "elements).")] = None
    train_samples: Annotated[int, Field(gt=0, description="Tutorial data: training images to "
                                        "use.")] = 1000
    test_samples: Annotated[int, Field(gt=0, description="Tutorial data: test images to "
                                       "use.")] = 1000
    batch_size: Annotated[int, Field(gt=0, le=65_536, description="Batch size.")] = 32
    save_every_batches: Annotated[int, Field(
        ge=0,
        description="Also checkpoint every N batches inside an epoch, as the checkpoint budget "
        "allows (0: only at epoch ends).")] = 16
    checkpoint_budget: Annotated[float, Field(
        ge=0.0, le=1.0,
        description="Most share of training time that mid-epoch checkpoints may cost: after a "
        "save that cost t seconds (training waiting for it, plus its background commit's CPU "
        "time), the next mid-epoch save waits t / budget seconds, and one due while a commit is "
        "in flight is put off (0: no limit, save exactly every N batches). One device only: under "
        "a strategy every worker must save at the same batch, so saves come exactly every N "
        "batches.")] = 0.02
    background_checkpoints: Annotated[bool, Field(
        description="Commit checkpoints on a background thread: training waits only for a copy "
        "of the state in memory, and for the previous commit if it is still being written. One "
        "device only (under a strategy every save is written as training waits).")] = True
    pipeline_resume: Annotated[Literal["iterator", "replay"], Field(
        description="Where a tf.data training pipeline stands in a checkpoint. iterator: its "
        "exact state, shuffle buffer included, serialized while training waits at each save. "
        "replay: nothing saved; a resume rebuilds the pipeline and skips the batches already "
        "trained, which costs a pass over them and needs a deterministic pipeline (shuffles "
        "seeded, or by the run's seed as ckptflow seeds them).")] = "iterator"
    epoch_keras_files: Annotated[bool, Field(
        description="Also write the tutorial's cp-EEEE.weights.h5 and cp-EEEE.keras into each "
        "epoch-end checkpoint (resuming reads only the TF checkpoint beside them).")] = True
    stop_grace_seconds: Annotated[float, Field(
        gt=0, le=3600,
        description="On SIGTERM or SIGINT, training finishes the current batch, commits a "
        "checkpoint and stops (under a strategy, every worker at the same batch); if that takes "
        "longer than this, the process exits anyway (a second signal exits at once). Under "
        "Kubernetes' default 30 s grace, keep it below 30.")] = 20.0
    keep_checkpoints: Annotated[int, Field(
        ge=1, description="Newest checkpoints to keep; older ones are removed after a newer "
        "one is committed.")] = 5
    units: Annotated[int, Field(gt=0, le=65_536, description="Tutorial model: hidden Dense "
                                "units.")] = 512
    dropout: Annotated[float, Field(ge=0.0, lt=1.0, description="Tutorial model: dropout "
                                    "rate.")] = 0.2
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0, description="Tutorial model: Adam "
                                          "learning rate.")] = 1e-3
    seed: Annotated[int, Field(ge=0, lt=2**31, description="Seed for data split, init, "
                               "dropout and batch order.")] = 42
    formats: Annotated[list[str] | None, Field(
        description="Export formats (comma-separated on the command line); empty: every format "
        "whose packages are installed. Known: " + ", ".join(FORMAT_NAMES) + ".")] = None
    deterministic: Annotated[bool, Field(
        description="Make TensorFlow ops deterministic, so a resumed run ends bit-identical to "
        "an uninterrupted one (costs some speed; see README).")] = True
    strategy: Annotated[Strategy, Field(
        description="How training is spread: default (one device), mirrored (every local GPU, "
        "or logical CPU devices), multi-worker (processes joined by TF_CONFIG; start the other "
        "workers with `ckptflow worker`). The global batch is --batch-size in every case.")] = "default"
    peer_timeout_seconds: Annotated[float, Field(
        gt=0, le=86_400,
        description="multi-worker: the longest any step shared with the other workers (joining, "
        "a batch, a save) may take; a worker that waits longer (another one died or never "
        "started) is ended by its watchdog (status 137) with one line saying why, and starting "
        "every worker again resumes.")] = 300.0
    wait_for_lock: Annotated[float, Field(
        ge=0, description="Seconds to wait while another run holds the run directory "
        "(0: fail at once).")] = 0.0
    lease_seconds: Annotated[float, Field(
        ge=5, le=3600,
        description="Run directory in an object store: the term of the run's lease, renewed "
        "every third of it while the run lives. A run killed holding it is taken over once it "
        "expires.")] = 60.0
    fail_after_epoch: Annotated[int | None, Field(
        ge=1,
        description="Fault drill: fail once right after this epoch's checkpoint is committed, "
        "as a crash would (the flow's retry resumes). Leave empty for normal runs.")] = None
    fail_attempts: Annotated[int, Field(
        ge=1, le=10,
        description="Fault drill: how many attempts in a row fail_after_epoch fails, each at its "
        "first epoch end from that epoch on. 2 outlasts the flow's one automatic retry, so the "
        "run ends Failed and can be retried from the UI.")] = 1
    io_error_at_step: Annotated[int | None, Field(
        ge=1,
        description="Fault drill: raise a transient I/O error once when training reaches this "
        "optimizer step (the task's retry resumes mid-epoch). Leave empty for normal runs.")] = None

    @field_validator("data")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in DATA_SOURCES or value.lower().endswith(DATA_FILE_SUFFIXES) or is_ref(value):
            return value
        raise ValueError(
            f"unknown data source. Received: data={value!r}. Expected package.module:function, "
            f"path/to/file.py:function, one of {', '.join(DATA_SOURCES)} or a path ending in "
            f"{', '.join(DATA_FILE_SUFFIXES)}")

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        if is_ref(value):
            return value
        raise ValueError(f"not a REF. Received: model={value!r}. Expected "
                         "package.module:function or path/to/file.py:function")

    @field_validator("callbacks")
    @classmethod
    def _callbacks_ref(cls, value: str | None) -> str | None:
        if value is None or is_ref(value):
            return value or None
        raise ValueError(f"not a REF. Received: callbacks={value!r}. Expected "
                         "package.module:function or path/to/file.py:function")

    @field_validator("class_weight")
    @classmethod
    def _class_weights(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if value is None:
            return None
        bad = {k: w for k, w in value.items() if k < 0 or not 0 <= w < float("inf")}
        if not value or bad:
            raise ValueError(f"expected class indices >= 0 with finite weights >= 0. Received: "
                             f"{bad or value}")
        return dict(sorted(value.items()))

    @model_validator(mode="after")
    def _callbacks_and_class_weight(self) -> TrainConfig:
        if self.callbacks_params and self.callbacks is None:
            raise ValueError(f"callbacks_params without callbacks. Received: callbacks_params="
                             f"{self.callbacks_params}. Name the function they are for with "
                             "--callbacks")
        if self.callbacks is not None and self.strategy != "default":
            raise ValueError(f"callbacks run on one device for now. Received: strategy="
                             f"{self.strategy!r} with callbacks={self.callbacks!r}. Use "
                             "strategy default, or drop the callbacks")
        if self.class_weight is not None and self.strategy != "default":
            raise ValueError(f"class_weight trains on one device for now. Received: strategy="
                             f"{self.strategy!r}. Use strategy default, or drop class_weight")
        return self

    @model_validator(mode="after")
    def _one_device_in_an_object_store(self) -> TrainConfig:
        if is_url(self.run_dir) and self.strategy != "default":
            raise ValueError(f"a run directory in an object store trains on one device for now. "
                             f"Received: strategy={self.strategy!r} with run_dir="
                             f"{self.run_dir!r}. Use a shared local path for {self.strategy}")
        return self

    @model_validator(mode="after")
    def _options_of_their_own_model(self) -> TrainConfig:
        """The tutorial's options go with the tutorial's model and data, and only there (given
        means not the default: the Prefect UI's form sends every field)."""
        if not self.uses_tutorial_model():
            named = [f for f in TUTORIAL_PARAMS if _changed(self, f)]
            if named:
                raise ValueError(f"--{named[0].replace('_', '-')} is an option of the tutorial "
                                 f"model, not of {self.model}. Pass your model's parameters as "
                                 f"--model-params '{{\"{named[0]}\": ...}}'")
        else:
            unknown = [k for k in self.model_params if k not in TUTORIAL_PARAMS]
            if unknown:
                raise ValueError(f"the tutorial model takes no parameter {unknown[0]!r}. "
                                 f"Expected some of {list(TUTORIAL_PARAMS)}")
            both = [k for k in self.model_params if _changed(self, k)]
            if both:
                raise ValueError(f"{both[0]} is given twice (--{both[0].replace('_', '-')} and "
                                 "--model-params). Give it once")
        if self.uses_tutorial_data():
            if self.data_params:
                raise ValueError(f"data={self.data!r} takes no data_params. Received: "
                                 f"{self.data_params}. Expected data_params only with a data "
                                 "function REF")
        else:
            named = [f for f in TUTORIAL_DATA_FIELDS if _changed(self, f)]
            if named:
                raise ValueError(f"--{named[0].replace('_', '-')} is an option of the tutorial "
                                 f"data, not of {self.data}. Pass your data function's own "
                                 "parameters as --data-params")
        return self

    def uses_tutorial_model(self) -> bool:
        return self.model == TUTORIAL_MODEL

    def uses_tutorial_data(self) -> bool:
        return is_tutorial_data(self.data)

    def model_kwargs(self) -> dict[str, Any]:
        """What the model function is called with (its seed comes from `seed`)."""
        if self.uses_tutorial_model():
            return {name: getattr(self, name) for name in TUTORIAL_PARAMS} | self.model_params
        return dict(self.model_params)

    def code_refs(self) -> dict[str, str]:
        """The functions this run imports, by kind: {"model": REF, "data": REF (a function's)}."""
        return ({"model": self.model} | ({} if self.uses_tutorial_data() else {"data": self.data})
                | ({"callbacks": self.callbacks} if self.callbacks else {}))

    def paths(self) -> dict[str, str]:
        """The files and directories this run reads or writes, by parameter name."""
        reads_file = self.uses_tutorial_data() and self.data not in DATA_SOURCES
        return {"run_dir": self.run_dir} | ({"data": self.data} if reads_file else {})

    def data_request(self) -> dict[str, Any]:
        """What fetch-data is asked for, as the manifest records it (to tell a rerun's request)."""
        return data_request(self.data, self.train_samples, self.test_samples, self.seed,
                            self.data_params)

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str] | None) -> list[str] | None:
        unknown = [f for f in value or [] if f not in FORMAT_NAMES]
        if unknown:
            raise ValueError(f"unknown export format {unknown}. Expected some of {list(FORMAT_NAMES)}")
        repeated = sorted({f for f in value or [] if value.count(f) > 1})
        if repeated:
            raise ValueError(f"export format {repeated} is named twice. Expected each format once")
        return value or None

    def identity(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        steering = ({"callbacks": self.callbacks, "callbacks_params": self.callbacks_params}
                     if self.callbacks else {})  # they steer training (a stop, the rate)
        if self.class_weight:  # keys as JSON has them: a checkpoint's identity compares equal
            steering["class_weight"] = {str(k): w for k, w in self.class_weight.items()}
        if self.uses_tutorial_model():
            kwargs = self.model_kwargs()
            return {name: kwargs.get(name, getattr(self, name)) for name in IDENTITY_FIELDS} | steering
        return {"model": self.model, "model_params": self.model_params,
                "batch_size": self.batch_size, "seed": self.seed} | steering


def recorded_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """A manifest's parameters as this version dumps a TrainConfig (JSON): a parameter added since
    the run was made stands at its default."""
    return {**TrainConfig.model_construct().model_dump(mode="json"), **parameters}


def _changed(config: BaseModel, name: str) -> bool:
    """Whether field `name` holds something other than its default."""
    return getattr(config, name) != type(config).model_fields[name].default


def is_tutorial_data(source: str) -> bool:
    """Whether `source` names the tutorial's MNIST (a source or a file), not a data function."""
    return not is_ref(source)


def data_request(source: str, train_samples: int, test_samples: int, seed: int,
                 data_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A fetch-data request as the manifest records it; the tutorial's as it always has."""
    if is_tutorial_data(source):
        return {"source": source, "train_samples": train_samples, "test_samples": test_samples,
                "seed": seed}
    return {"source": source, "data_params": data_params or {}, "seed": seed}


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each refused parameter, its value and what is expected."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "parameters"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        # A whole-model check (no field) already names the value in its message.
        parts.append(f"{name}: {msg} (received {err.get('input')!r})" if err["loc"] else msg)
    return "invalid parameters: " + "; ".join(parts)


# Set per point by the sweep (its grid is the tutorial model's options by default): not shared.
NOT_SHARED = (*TUTORIAL_PARAMS, "run_dir", "strategy")


class SweepConfig(BaseModel):
    """A grid sweep: every combination of `grid`'s model params (the tutorial's `units`,
    `dropout` and `learning_rate` lists by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sweep_dir: Annotated[str, Field(
        min_length=1, description="Directory holding one run directory per grid point, or an "
        "object-store URL (s3://BUCKET/PREFIX) holding one run per point. The same directory "
        "again skips finished points and resumes the others.")] = "sweeps/default"
    units: Annotated[list[int], Field(min_length=1, description="Hidden units to try.")] = [64, 128]
    dropout: Annotated[list[float], Field(min_length=1, description="Dropout rates to try.")] = [0.0, 0.2]
    learning_rate: Annotated[list[float], Field(
        min_length=1, description="Adam learning rates to try.")] = [1e-3]
    grid: Annotated[dict[str, list[Any]] | None, Field(
        description="Model params to try, every combination, as JSON, e.g. "
        "'{\"filters\": [8, 16], \"learning_rate\": [0.001, 0.01]}' (for any model; replaces "
        "--units/--dropout/--learning-rate).")] = None
    settings: Annotated[dict[str, Any], Field(
        description="Settings shared by every point (any run parameter but run_dir, units, "
        "dropout, learning_rate and strategy), e.g. {\"epochs\": 5, \"data\": \"bundled\"}.")] = {}
    dask_address: Annotated[str | None, Field(
        description="Address of an existing Dask scheduler (e.g. tcp://10.0.0.5:8786); empty: "
        "a local Dask cluster of `workers` processes.")] = None
    workers: Annotated[int, Field(gt=0, le=256, description="Processes of the local Dask cluster "
                                  "(ignored with dask_address).")] = 2

    @field_validator(*TUTORIAL_PARAMS)
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError(f"values repeat. Received: {values}. Expected each value once")
        return values

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, grid: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        for name, values in (grid or {}).items():
            if not values:
                raise ValueError(f"grid {name!r} has no values. Give at least one")
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"grid {name!r} values repeat. Received: {values}. Expected "
                                 "each value once")
        return grid or None

    @model_validator(mode="after")
    def _grid_or_lists(self) -> SweepConfig:
        named = [f for f in TUTORIAL_PARAMS if _changed(self, f)]
        if self.grid is not None and named:
            raise ValueError(f"--{named[0].replace('_', '-')} and --grid both set the grid. "
                             f"Put {named[0]} into --grid instead")
        return self

    @field_validator("settings")
    @classmethod
    def _shared_only(cls, settings: dict[str, Any]) -> dict[str, Any]:
        named = [k for k in settings if k in NOT_SHARED]
        if named:
            raise ValueError(f"{named} are set per point by the sweep, not shared. Use the "
                             "sweep's own units/dropout/learning_rate lists instead")
        return settings

    @model_validator(mode="after")
    def _points_valid(self) -> SweepConfig:
        try:  # every point's parameters, checked before any point starts
            grid_points(self)
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc).removeprefix("invalid parameters: ")) \
                from None
        return self


def grid_point_name(params: dict[str, Any]) -> str:
    """`filters8-learning_rate0.001`: a `--grid` point's run directory name."""
    def text(value) -> str:
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        return re.sub(r"[^A-Za-z0-9.+_-]", "_", shown)

    return "-".join(f"{name}{text(value)}" for name, value in params.items())


def point_dir(sweep: SweepConfig, name: str) -> str:
    """A point's run directory: `name` under the sweep directory, a local path or a URL."""
    if is_url(sweep.sweep_dir):
        return f"{sweep.sweep_dir.rstrip('/')}/{name}"
    return str(Path(sweep.sweep_dir) / name)


def grid_points(sweep: SweepConfig) -> list[TrainConfig]:
    """One validated TrainConfig per grid point (pydantic's error names a bad value)."""
    if sweep.grid is None:
        return [TrainConfig(**sweep.settings, units=u, dropout=d, learning_rate=lr,
                            run_dir=point_dir(sweep, f"units{u}-dropout{d:g}-lr{lr:g}"))
                for u, d, lr in itertools.product(sweep.units, sweep.dropout,
                                                  sweep.learning_rate)]
    shared = {k: v for k, v in sweep.settings.items() if k != "model_params"}
    base = sweep.settings.get("model_params") or {}
    points = []
    for values in itertools.product(*sweep.grid.values()):
        params = dict(zip(sweep.grid, values, strict=True))
        points.append(TrainConfig(**shared, model_params=base | params,
                                  run_dir=point_dir(sweep, grid_point_name(params))))
    return points
