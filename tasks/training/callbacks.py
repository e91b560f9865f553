"""The user's Keras callbacks, called where `fit` calls them, their state in every checkpoint.

A callback's state goes into `state.json` as JSON: Keras' EarlyStopping and ReduceLROnPlateau by
their counters (the learning rate a callback sets is the optimizer's, in the TF checkpoint), a
callback of the user's by its own `get_state()` / `set_state(state)`. One with neither is named
once in the log as "state not checkpointed": a resume gives it a fresh start.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from typing import Any

from ckptflow.core.errors import BadInputError, first_line
from ckptflow.core.user_code import call, resolve

log = logging.getLogger("ckptflow.train")

# Keras callbacks whose whole resume state is these attributes.
STATE_ATTRIBUTES = {
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "cooldown_counter", "best"),
}
# Keras callbacks with no state of their own: what they change is the optimizer's, checkpointed.
STATELESS = ("LearningRateScheduler", "TerminateOnNaN")


class CallbackError(BadInputError):
    """A user's callback raised: never retried (it would raise again), committed work kept."""


class Callbacks:
    """The run's callbacks, each hook called in the order `fit` calls them; none: every hook
    is a no-op."""

    def __init__(self, callbacks: list, ref: str | None = None, model=None):
        self.callbacks, self.ref, self.model = callbacks, ref, model
        self.stopped_by: str | None = None  # the callback that set `model.stop_training`

    @classmethod
    def build(cls, ref: str | None, params: dict[str, Any], seed: int, model, epochs: int,
              steps: int) -> Callbacks:
        """The callbacks `ref`'s function returns, attached to `model` as `fit` attaches them."""
        if ref is None:
            return cls([])
        made = call(resolve(ref, "--callbacks"), ref, "--callbacks", params,
                    optional={"seed": seed})
        callbacks = list(made) if isinstance(made, list | tuple) else [made]
        for callback in callbacks:
            _check_supported(callback, ref)
        built = cls(callbacks, ref, model)
        for callback in callbacks:
            callback.set_model(model)
            callback.set_params({"verbose": 0, "epochs": epochs, "steps": steps})
        return built

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def begin(self, states: list[dict[str, Any]] | None) -> None:
        """`on_train_begin`, then each callback's state as the checkpoint holds it (Keras'
        callbacks reset their counters in `on_train_begin`)."""
        if not self.callbacks:
            return
        self.model.stop_training = False
        self._each("on_train_begin", logs={})
        if states is not None:
            self._restore(states)
        unsaved = [_name(c) for c in self.callbacks if not _has_state(c)]
        if unsaved:
            log.warning("callbacks %s: state not checkpointed (give them get_state() and "
                        "set_state(state) to resume them exactly)", ", ".join(unsaved))

    def on_epoch_begin(self, epoch: int) -> None:
        self._each("on_epoch_begin", epoch, logs={})

    def on_batch_begin(self, batch: int) -> None:
        self._each("on_train_batch_begin", batch, logs={})

    def on_batch_end(self, batch: int, logs) -> None:
        """`logs`: what the train step returned, as Python numbers (as Keras passes them)."""
        from keras.src.utils.python_utils import pythonify_logs

        self._each("on_train_batch_end", batch, logs=pythonify_logs(logs))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        self._each("on_epoch_end", epoch, logs=logs)

    def on_train_end(self, logs: dict[str, Any]) -> None:
        self._each("on_train_end", logs=logs)

    def validation_hooks(self):
        """What `evaluate(callbacks=...)` calls while an epoch is validated, as `fit` passes its
        callbacks there: each callback's `on_test_*` hooks (None: no callbacks)."""
        if not self.callbacks:
            return None
        import keras
        from keras.src.utils.python_utils import pythonify_logs

        each = self._each

        class ValidationHooks(keras.callbacks.CallbackList):
            def on_test_begin(self, logs=None):
                each("on_test_begin", logs=pythonify_logs(logs))

            def on_test_batch_begin(self, batch, logs=None):
                each("on_test_batch_begin", batch, logs=pythonify_logs(logs))

            def on_test_batch_end(self, batch, logs=None):
                each("on_test_batch_end", batch, logs=pythonify_logs(logs))

            def on_test_end(self, logs=None):
                each("on_test_end", logs=pythonify_logs(logs))

        return ValidationHooks()

    def states(self) -> list[dict[str, Any]] | None:
        """Every callback's state, as `state.json` holds it (None: the run has no callbacks)."""
        if not self.callbacks:
            return None
        return [{"class": _name(c), "state": _state_of(c, self.ref)} for c in self.callbacks]

    def _restore(self, states: list[dict[str, Any]]) -> None:
        names = [s.get("class") for s in states]
        if names != [_name(c) for c in self.callbacks]:
            raise BadInputError(
                f"--callbacks {self.ref} returns {[_name(c) for c in self.callbacks]}, but the "
                f"checkpoint holds the state of {names}. Return the callbacks the run was "
                "started with, or use another --run-dir.")
        for callback, saved in zip(self.callbacks, states, strict=True):
            if saved.get("state") is not None:
                _set_state(callback, saved["state"], self.ref)

    def _each(self, hook: str, *args, **kwargs) -> None:
        for callback in self.callbacks:
            stopping = getattr(self.model, "stop_training", False)
            try:
                getattr(callback, hook)(*args, **kwargs)
            except Exception as exc:
                where = f" at epoch {args[0] + 1}" if hook.endswith("epoch_end") else ""
                raise CallbackError(
                    f"callback {_name(callback)} (--callbacks {self.ref}) raised "
                    f"{type(exc).__name__} in {hook}{where}: {first_line(exc)}. Fix the "
                    "callback; committed checkpoints are kept and a rerun resumes from the "
                    "latest.") from exc
            if not stopping and getattr(self.model, "stop_training", False):
                self.stopped_by = self.stopped_by or _name(callback)


def _name(callback) -> str:
    return type(callback).__name__


def _keras_class(callback) -> str | None:
    """The Keras callback class `callback` is (or derives from) among those ckptflow knows."""
    import keras

    return next((name for name in (*STATE_ATTRIBUTES, *STATELESS)
                 if isinstance(callback, getattr(keras.callbacks, name))), None)


def _has_state(callback) -> bool:
    return _own_protocol(callback) or _keras_class(callback) is not None


def _own_protocol(callback) -> bool:
    return callable(getattr(callback, "get_state", None)) and callable(
        getattr(callback, "set_state", None))


def _check_supported(callback, ref: str) -> None:
    """Refuse what is not a callback, and what ckptflow cannot resume as `fit` would."""
    import keras

    if not isinstance(callback, keras.callbacks.Callback):
        raise BadInputError(f"--callbacks {ref} returned {type(callback).__name__}, not a "
                            "keras.callbacks.Callback. Return a list of Keras callbacks.")
    if isinstance(callback, keras.callbacks.BackupAndRestore):
        raise BadInputError(f"--callbacks {ref} returned BackupAndRestore: ckptflow's own "
                            "checkpoints already resume a run, mid-epoch too. Remove it.")
    if isinstance(callback, keras.callbacks.EarlyStopping) and callback.restore_best_weights:
        raise BadInputError(f"--callbacks {ref}: EarlyStopping(restore_best_weights=True) is not "
                            "supported (ckptflow evaluates and exports the last checkpoint; the "
                            "best epoch is in the manifest). Pass restore_best_weights=False.")


def _state_of(callback, ref: str) -> Any:
    if _own_protocol(callback):
        try:
            state = callback.get_state()
            json.dumps(state)
        except Exception as exc:
            raise CallbackError(f"callback {_name(callback)} (--callbacks {ref}): get_state "
                                f"raised {type(exc).__name__}: {first_line(exc)}. Return a "
                                "JSON-serializable value.") from exc
        return state
    keras_class = _keras_class(callback)
    if keras_class is None:
        return None
    return {name: _to_json(getattr(callback, name, None))
            for name in STATE_ATTRIBUTES.get(keras_class, ())}


def _set_state(callback, state: Any, ref: str) -> None:
    if _own_protocol(callback):
        try:
            callback.set_state(state)
        except Exception as exc:
            raise CallbackError(f"callback {_name(callback)} (--callbacks {ref}) raised "
                                f"{type(exc).__name__} in set_state: {first_line(exc)}. Fix "
                                "the callback.") from exc
        return
    for name, value in state.items():
        setattr(callback, name, _from_json(value))


def _to_json(value: Any) -> Any:
    """A counter or a monitored value as JSON: a non-finite float as a string."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else repr(number)


def _from_json(value: Any) -> Any:
    return float(value) if value in ("inf", "-inf", "nan") else value
