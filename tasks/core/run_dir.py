"""The run directory: every path a run makes, in one place, so no module needs another to learn
where a file lives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (`root` relative stays relative to the current directory)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def __str__(self) -> str:
        return str(self.root)

    def __fspath__(self) -> str:
        return str(self.root)

    def relative(self, path: str | Path) -> str:
        """`path` relative to the run directory, as the manifest records it."""
        return Path(path).relative_to(self.root).as_posix()

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def snapshot(self) -> Path:
        """The tutorial's MNIST as fetch-data snapshotted it (the manifest's data.path says
        which snapshot a run holds)."""
        return self.root / "data" / "mnist.npz"

    def snapshot_path(self, tutorial_data: bool) -> Path:
        """Where a new run's snapshot goes: `data/mnist.npz`, or `data/snapshot.npz` for a data
        function's data."""
        return self.snapshot if tutorial_data else self.root / "data" / "snapshot.npz"

    @property
    def initial_model(self) -> Path:
        """The untrained model: the run's starting point and the "untrained" baseline."""
        return self.root / "model" / "initial.keras"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def history(self) -> Path:
        return self.root / "metrics" / "history.csv"

    @property
    def evaluation(self) -> Path:
        return self.root / "metrics" / "evaluation.csv"

    @property
    def curve(self) -> Path:
        return self.root / "metrics" / "training_curve.png"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def native_log(self) -> Path:
        """What TensorFlow, the converters and verify's loader processes print natively."""
        return self.root / "logs" / "native.log"

    @property
    def faults(self) -> Path:
        """Markers of fault drills that fired (each fires once per run directory)."""
        return self.root / "faults"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def export_index(self) -> Path:
        return self.exports / "exports.json"

    @property
    def reference(self) -> Path:
        """The trained model's predictions every export was checked against."""
        return self.exports / "reference_predictions.npy"
