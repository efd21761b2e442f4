"""One chunk of Python simulations: what a worker process (or Dask worker) runs.

Every simulation is seeded from (seed, global index) alone, so its result does not depend on the
chunking, on the process that runs it, or on how often the chunk was retried.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np

OK, EXCEPTION, NONFINITE, SHAPE = 0, 1, 2, 3
KINDS = ("exception", "nonfinite", "shape")  # status codes 1, 2, 3
MAX_ERRORS_PER_CHUNK = 3
_MESSAGE_CHARS = 300

# one-argument simulators draw from the process-wide NumPy / `random` state: chunks of them run
# one at a time per process, so threads of one worker cannot interleave their draws
_GLOBAL_STATE_LOCK = threading.Lock()


def rng_for(seed: int, index: int) -> np.random.Generator:
    """The generator a two-argument Python simulator gets for simulation `index`."""
    return np.random.default_rng([seed, index])


def seed_global_state(seed: int, index: int) -> None:
    """Seed NumPy's legacy global state and Python's `random` for simulation `index`."""
    words = np.random.SeedSequence([seed, index]).generate_state(4)
    np.random.seed(words)
    random.seed(int.from_bytes(words.tobytes(), "little"))


def call_python(simulator, takes_rng: bool, theta: np.ndarray, seed: int, index: int) -> Any:
    """Run simulation `index` (theta is a float64 vector the simulator may modify)."""
    if takes_rng:
        return simulator(theta.copy(), rng_for(seed, index))
    seed_global_state(seed, index)
    return simulator(theta.copy())


def _message(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."


def check_output(out: Any, x_shape: tuple[int, ...]) -> tuple[np.ndarray | None, int, str]:
    """(x as float64, status code, message) for one simulator output."""
    try:
        arr = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return None, SHAPE, f"output is not an array of numbers ({_message(exc)})"
    if arr.shape != x_shape:
        return None, SHAPE, f"expected output shape {x_shape}; got {arr.shape}"
    if not np.all(np.isfinite(arr)):
        return None, NONFINITE, "output contains NaN or inf"
    return arr, OK, ""


def run_python_chunk(simulator, takes_rng: bool, theta: np.ndarray, seed: int, start: int,
                     x_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, list]:
    """Simulations start .. start + len(theta) - 1.

    Returns:
        x of shape (m, *x_shape) (NaN where the simulation failed), status codes (m,) int8 and
        up to a few [index, kind, message] records of failures.
    """
    theta = np.asarray(theta, dtype=np.float64)
    m = theta.shape[0]
    x = np.full((m, *x_shape), np.nan)
    status = np.zeros(m, dtype=np.int8)
    errors: list = []
    if takes_rng:
        _fill(simulator, True, theta, seed, start, x_shape, x, status, errors)
    else:
        with _GLOBAL_STATE_LOCK:
            saved = np.random.get_state(), random.getstate()
            try:
                _fill(simulator, False, theta, seed, start, x_shape, x, status, errors)
            finally:
                np.random.set_state(saved[0])
                random.setstate(saved[1])
    return x, status, errors


def _fill(simulator, takes_rng, theta, seed, start, x_shape, x, status, errors) -> None:
    for j in range(theta.shape[0]):
        index = start + j
        try:
            out = call_python(simulator, takes_rng, theta[j], seed, index)
        except Exception as exc:  # a failing simulation is counted, never fatal
            code, message = EXCEPTION, _message(exc)
        else:
            arr, code, message = check_output(out, x_shape)
            if code == OK:
                x[j] = arr
        status[j] = code
        if code != OK and len(errors) < MAX_ERRORS_PER_CHUNK:
            errors.append([index, KINDS[code - 1], message])
