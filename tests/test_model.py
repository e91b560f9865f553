"""build-model: the same seed gives the same initial model, whatever other threads are doing."""

from __future__ import annotations

import random
import threading

from conftest import weights_digest

from ckptflow.tutorial.model import create_model


def test_initial_weights_do_not_depend_on_other_threads_drawing_random_numbers():
    quiet = weights_digest(create_model(32, 0.0, 1e-3, seed=42))
    stop = threading.Event()

    def draw():  # as Dask's and Prefect's threads may, while a sweep point builds its model
        while not stop.is_set():
            random.random()

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        busy = [weights_digest(create_model(32, 0.0, 1e-3, seed=42)) for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    assert busy == [quiet] * 3
    assert weights_digest(create_model(32, 0.0, 1e-3, seed=43)) != quiet
