"""The tutorial's data: MNIST from the Keras loader, the 5,000 bundled images, or a user's file,
as x flattened to 784 and scaled to [0, 1] and integer labels 0-9."""

from __future__ import annotations

import logging
import os
import socket
import zipfile
from pathlib import Path

import numpy as np

from ckptflow.core.errors import BadInputError
from ckptflow.core.snapshot import SPLITS, Arrays

log = logging.getLogger("ckptflow.data")

PIXELS = 784
CLASSES = 10
DOWNLOAD_TIMEOUT_S = 20
_SCALE_BLOCK = 4096  # images scaled at a time


def load_mnist(source: str, train_samples: int, test_samples: int,
               seed: int) -> tuple[Arrays, str, str]:
    """The validated arrays of `source`, the source actually used, and why it was used."""
    raw, used, reason = _load(source)
    return _select(raw, train_samples, test_samples, used, seed), used, reason


def keras_cache_path() -> Path:
    """Where the Keras loader caches mnist.npz (KERAS_HOME or ~/.keras, then datasets/)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "datasets" / "mnist.npz"


def bundled_csv_path() -> Path:
    """The 5,000 real MNIST images shipped with ckptflow (784 pixels + label per row, sorted by
    class; mnist_5k.NOTICE.md says where from)."""
    return Path(__file__).with_name("mnist_5k.csv.gz")


def _load(source: str) -> tuple[Arrays | np.ndarray, str, str]:
    """Raw data from `source`, the source actually used, and why."""
    if source == "bundled":
        return _read_csv(bundled_csv_path()), "bundled", "requested"
    if source == "keras":
        try:
            return _keras_loader(), "keras", "requested"
        except Exception as exc:  # network trouble: transient, so Prefect retries it
            raise ConnectionError(
                f"data=keras: the Keras MNIST loader failed ({str(exc).rsplit(' -- ', 1)[-1]}). "
                "Check the network, or use data=auto or data=bundled offline.") from exc
    if source == "auto":
        cache = keras_cache_path()
        try:
            used_cache = cache.exists()
            arrays = _keras_loader()
            return arrays, "keras", (f"Keras cache {cache}" if used_cache
                                     else "downloaded by the Keras loader")
        except Exception as exc:  # any Keras loader failure falls back to the offline data
            cause = str(exc).rsplit(" -- ", 1)[-1][:160]
            where = f"the Keras cache {cache} failed" if used_cache else f"no Keras cache at {cache}"
            why = f"{where} and the download failed: {cause}"
            log.warning("data=auto: %s; using the bundled images", why)
            return _read_csv(bundled_csv_path()), "bundled", why
    path = Path(source).expanduser()
    if not path.is_file():
        raise BadInputError(f"data file not found. Received: data={source!r}. Give an existing "
                            ".npz or .csv path, or data=bundled.")
    if path.name.lower().endswith(".npz"):
        return _read_npz(path), str(path), "user file"
    return _read_csv(path), str(path), "user file"


def _keras_loader() -> Arrays:
    import keras  # lazy: only this source needs TensorFlow

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    finally:
        socket.setdefaulttimeout(previous)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _read_npz(path: Path) -> Arrays:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # else numpy takes it for a pickle and says so
                raise BadInputError(f"{path} is not an .npz file (no zip header). Expected the "
                                    "arrays x_train, y_train, x_test, y_test saved by numpy.savez.")
        with np.load(path, allow_pickle=False) as npz:
            missing = set(SPLITS) - set(npz.files)
            if missing:
                raise BadInputError(
                    f"{path} lacks arrays {sorted(missing)}. Expected the layout of Keras' "
                    "mnist.npz: x_train, y_train, x_test, y_test.")
            return {k: npz[k] for k in SPLITS}
    except BadInputError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        raise BadInputError(f"{path} is not a readable .npz file ({exc}). Check the file or "
                            "use data=bundled.") from exc


def _read_csv(path: Path) -> np.ndarray:
    import pandas as pd  # lazy: pandas costs ~0.3 s to import

    try:
        frame = pd.read_csv(path, header=None)
        if not all(pd.api.types.is_numeric_dtype(d) for d in frame.dtypes):  # a header row
            frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError,
            EOFError, zipfile.BadZipFile) as exc:
        raise BadInputError(f"{path} is not a readable CSV ({exc}). Expected 784 pixel columns "
                            "and a label column per row.") from exc
    if frame.shape[1] != PIXELS + 1:
        raise BadInputError(f"{path} has {frame.shape[1]} columns. Expected {PIXELS + 1}: "
                            f"{PIXELS} pixels then the label.")
    if not all(pd.api.types.is_numeric_dtype(d) for d in frame.dtypes):
        raise BadInputError(f"{path} holds non-numeric values. Expected numbers only: {PIXELS} "
                            "pixels then the label per row.")
    # Integers stay integers: raw 0-255 pixels, told apart from floats already in [0, 1].
    return frame.to_numpy()


def _select(raw: Arrays | np.ndarray, n_train: int, n_test: int, source: str,
            seed: int) -> Arrays:
    if isinstance(raw, np.ndarray):  # one table: split it, stratified
        x, y = raw[:, :PIXELS], raw[:, PIXELS]
        (x,), y = _in_unit_range([_check_images(x, source)], source), _check_labels(y, source)
        if n_train + n_test > len(y):
            raise BadInputError(
                f"{source} has {len(y)} images, fewer than train_samples + test_samples = "
                f"{n_train + n_test}. Lower --train-samples/--test-samples.")
        order = _stratified_order(y, seed)
        test, train = order[:n_test], order[n_test:n_test + n_train]
        return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = raw[f"x_{split}"], raw[f"y_{split}"]
        if len(x) != len(y):
            raise BadInputError(f"{source}: x_{split} has {len(x)} rows but y_{split} has {len(y)}.")
        if n > len(y):
            raise BadInputError(f"{source} has {len(y)} {split} images, fewer than "
                                f"{split}_samples={n}. Lower --{split}-samples.")
        out[f"x_{split}"] = _check_images(x[:n], source)
        out[f"y_{split}"] = _check_labels(y[:n], source)
    out["x_train"], out["x_test"] = _in_unit_range([out["x_train"], out["x_test"]], source)
    return out


def _check_images(x: np.ndarray, source: str) -> np.ndarray:
    """`x` as rows of 784 numbers, refused if any is not a pixel intensity in [0, 255]."""
    x = np.asarray(x)
    if x.ndim < 2 or int(np.prod(x.shape[1:])) != PIXELS:
        raise BadInputError(f"{source}: images have shape {x.shape[1:]}. Expected 28x28 or "
                            f"{PIXELS} pixels per image.")
    x = x.reshape(len(x), PIXELS)
    if x.dtype.kind not in "buif":
        x = x.astype(np.float64)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 255:
        raise BadInputError(f"{source}: pixel values outside [0, 255]. Expected raw MNIST "
                            "pixel intensities.")
    return x


def _in_unit_range(xs: list[np.ndarray], source: str) -> list[np.ndarray]:
    """The images of one source as float32 in [0, 1], decided once for all its splits: raw pixels
    are divided by 255; floats all in [0, 1] already (a ckptflow snapshot) are taken as they are."""
    if all(x.dtype.kind == "f" and x.max() <= 1.0 for x in xs):
        log.info("data: %s holds floats in [0, 1]: taken as already scaled", source)
        return [x.astype(np.float32) for x in xs]
    return [_divided_by_255(x) for x in xs]


def _divided_by_255(x: np.ndarray) -> np.ndarray:
    # Scaled in float64 then rounded to float32, as always (the data hash depends on it), but
    # a block at a time: 60,000 images as float64 would be two extra 376 MB copies at once.
    scaled = np.empty(x.shape, np.float32)
    for start in range(0, len(x), _SCALE_BLOCK):
        scaled[start:start + _SCALE_BLOCK] = x[start:start + _SCALE_BLOCK].astype(np.float64) / 255.0
    return scaled


def _check_labels(y: np.ndarray, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.all(np.mod(y, 1) == 0) or y.min() < 0 or y.max() >= CLASSES:
        bad = y[(np.mod(y, 1) != 0) | (y < 0) | (y >= CLASSES)][:3] if y.ndim == 1 else y.shape
        raise BadInputError(f"{source}: labels must be integers 0-9. Received e.g. {bad}.")
    return y.astype(np.int64)


def _stratified_order(y: np.ndarray, seed: int) -> np.ndarray:
    """A seeded shuffle in which every prefix holds the classes in near-equal shares (ordered by
    each image's rank within its class)."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(y))
    rank = np.empty(len(y), dtype=np.int64)
    for cls in np.unique(y):
        members = shuffled[y[shuffled] == cls]
        rank[members] = np.arange(len(members))
    tiebreak = np.empty(len(y), dtype=np.int64)
    tiebreak[shuffled] = np.arange(len(y))
    return np.lexsort((tiebreak, rank))
