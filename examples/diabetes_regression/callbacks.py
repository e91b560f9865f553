"""The callbacks a careful regression run uses: halve the rate when the validation loss stalls,
stop when it has not improved for a while. ckptflow checkpoints their counters with the rest."""

import keras


def plateau_and_early_stop(rate_patience: int = 1, stop_patience: int = 3,
                           min_delta: float = 50.0) -> list:
    return [
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                          patience=rate_patience, min_delta=min_delta),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=stop_patience,
                                      min_delta=min_delta),
    ]
