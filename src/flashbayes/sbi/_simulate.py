"""Simulation budgets: draw theta from a prior, run a simulator on each, keep every result on disk.

See `simulate` for the contract; `_store` for the file format and `_backends` / `_dask` for where
the chunks run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from flashbayes.distributions import GMM
from flashbayes.sbi import _store
from flashbayes.sbi._backends import (
    default_workers,
    jax_output_spec,
    run_inline,
    run_jax,
    run_processes,
)
from flashbayes.sbi._chunks import OK, call_python
from flashbayes.sbi._dask import import_distributed, is_client, run_dask

Backend = Literal["auto", "jax", "processes", "dask"]
BACKENDS = ("auto", "jax", "processes", "dask")
_MAX_ERRORS = 10  # failure examples kept in the result
_PILOT_TRIES = 10  # simulations tried in the calling process to learn a Python output's shape


@dataclasses.dataclass(frozen=True)
class SimulationEvent:
    """What the progress callback receives (after each finished chunk, and once at the start).

    Attributes:
        done: simulations finished so far (including those found on disk).
        total: the simulation budget.
        failed: how many of the finished simulations failed (exception, NaN/inf, wrong shape).
        resumed: how many were found on disk from an earlier run and not simulated again.
    """

    done: int
    total: int
    failed: int
    resumed: int


@dataclasses.dataclass(frozen=True, eq=False)
class Simulations:
    """A simulation budget: parameters, outputs and what went wrong.

    Attributes:
        theta: (n, d) parameters drawn from the prior, in the prior's dtype.
        x: (n, *x_shape) simulator outputs; NaN rows where the simulation failed.
        status: (n,) int8: 0 ok, 1 the simulator raised, 2 NaN or inf in its output, 3 output of
            the wrong shape (or not numbers).
        seed: the seed of the run.
        meta: the run's description (``num_simulations``, ``chunk_size``, ``simulator``,
            ``kind``, ``x_shape``, ``failures``, ``errors``: up to 10 examples of failures as
            ``[index, kind, message]``, ...).

    Example:
        >>> import numpy as np, numpyro.distributions as dist
        >>> from flashbayes import sbi
        >>> def noisy(theta, rng):
        ...     return theta + rng.normal(size=2) if theta[0] > -1.0 else np.full(2, np.nan)
        >>> sims = sbi.simulate(dist.Normal(np.zeros(2), 1.0), noisy, 50, seed=0, workers=1)
        >>> sims.num_ok + sims.failures["nonfinite"] == 50
        True
        >>> theta, x = sims.valid()
        >>> theta.shape[0] == x.shape[0] == sims.num_ok
        True
    """

    theta: np.ndarray
    x: np.ndarray
    status: np.ndarray
    seed: int
    meta: dict[str, Any]

    @property
    def ok(self) -> np.ndarray:
        """(n,) bool: the simulations to use."""
        return self.status == OK

    @property
    def num_simulations(self) -> int:
        return int(self.status.shape[0])

    @property
    def num_ok(self) -> int:
        return int(np.sum(self.ok))

    @property
    def failures(self) -> dict[str, int]:
        """Failed simulations by kind: ``exception``, ``nonfinite``, ``shape``."""
        return _store.failure_counts(self.status)

    @property
    def errors(self) -> list:
        """Up to 10 examples of failures, as [index, kind, message], by index."""
        return list(self.meta.get("errors", []))

    def valid(self) -> tuple[np.ndarray, np.ndarray]:
        """(theta, x) of the successful simulations only."""
        ok = self.ok
        return self.theta[ok], self.x[ok]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the simulation file (atomically) and return its path."""
        path = _npz_path(path, "path")
        _store.save_file(path, self.theta, self.x, self.status, self.seed, self.meta)
        return path

    def __repr__(self) -> str:
        failed = ", ".join(f"{k}={v}" for k, v in self.failures.items() if v) or "none"
        return (f"Simulations(n={self.num_simulations}, ok={self.num_ok}, failed: {failed}, "
                f"theta {self.theta.shape}, x {self.x.shape}, seed={self.seed})")


def load_simulations(path: str | os.PathLike) -> Simulations:
    """Read a simulation file written by `simulate` (or `Simulations.save`), with validation.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if it is not a well-formed simulation file (missing arrays, shapes that
            disagree with its description, an ok mask that disagrees with the status codes...).

    Example:
        >>> import numpy as np, numpyro.distributions as dist, tempfile, os
        >>> from flashbayes import sbi
        >>> out = os.path.join(tempfile.mkdtemp(), "sims.npz")
        >>> sims = sbi.simulate(dist.Uniform(0.0, 1.0), lambda th, rng: 2 * th, 10, seed=3,
        ...                     out=out, workers=1)
        >>> back = sbi.load_simulations(out)
        >>> bool(np.array_equal(back.x, sims.x)), back.seed
        (True, 3)
    """
    path = Path(path)
    theta, x, status, seed, meta = _store.load_file(path)
    return Simulations(theta=theta, x=x, status=status, seed=seed, meta=meta)


def simulate(prior: Any, simulator: Callable, num_simulations: int, *, seed: int,
             out: str | os.PathLike | None = None, chunk_size: int | None = None,
             backend: Backend = "auto", workers: int | None = None, scheduler: Any = None,
             retries: int = 3, x_shape: tuple[int, ...] | None = None,
             progress: Callable[[SimulationEvent], None] | None = None) -> Simulations:
    """Run a simulation budget: theta ~ prior, x = simulator(theta), in chunks, kept on disk.

    theta is drawn up front from ``jax.random.key(seed)``, so every backend simulates the same
    parameters, and every simulation is seeded by (seed, its index), so the result does not
    depend on the backend, the number of workers, the chunk size or on interruptions.

    Simulators:
        * JAX (``backend="jax"``, or "auto" when the first parameter is named ``key``):
          ``simulator(key, theta) -> x``, vmapped and jitted here; simulation i gets
          ``jax.random.fold_in(k, i)`` where ``k`` is the second half of
          ``jax.random.split(jax.random.key(seed))`` (the first draws theta).
        * Python (``"processes"`` or ``"dask"``): ``simulator(theta, rng) -> x`` where theta is a
          float64 vector (d,) and rng is ``numpy.random.default_rng([seed, i])`` (when the
          second positional parameter is required or named ``rng``). A one-argument
          ``simulator(theta)`` instead finds NumPy's legacy global state (``np.random.*``) and
          Python's ``random`` seeded from (seed, i) before each call (the caller's state is
          restored afterwards; such chunks run one at a time per process). The output must be
          an array of numbers of one shape (``x_shape``; if not given, learned by running the
          first simulations that return numbers in this process). For "processes" with more
          than one worker the simulator must be picklable (a function defined at module level;
          Dask also ships closures).

    Bad output is never fatal and never used: a simulation that raises an ``Exception``, returns
    NaN or inf, or an output of the wrong shape is counted by kind (``Simulations.failures``),
    its row of x is NaN and ``Simulations.ok`` is False; ``Simulations.valid()`` leaves it out.

    With ``out``, each finished chunk is written at once (atomically) to ``OUT.parts/``; the
    file ``out`` is assembled when all are done and the journal removed. A crash loses only the
    chunks in flight; running the same call again continues where it stopped (and with the
    file complete, just loads it). A call whose seed, budget, chunk size, simulator name or
    prior draws differ from what is on disk is refused.

    Args:
        prior: a NumPyro distribution or a `flashbayes.GMM`; one draw is flattened to theta (d,).
        simulator: see above.
        num_simulations: the budget n >= 1.
        seed: a non-negative integer below 2**32.
        out: path of the ``.npz`` simulation file, or None to keep everything in memory.
        chunk_size: simulations per chunk (the unit of work, of writing and of loss on a
            crash). Default: ceil(n / 100) clipped to [1, 1000] for Python simulators, min(n,
            4096) for JAX.
        backend: "auto" (jax if the simulator's first parameter is ``key``, dask if a scheduler
            is given, else processes), "jax", "processes" (worker processes on this machine;
            with ``workers=1`` the calling process itself) or "dask".
        workers: worker processes for "processes" (default: the CPUs available) or for the
            LocalCluster that "dask" starts when no scheduler is given.
        scheduler: for "dask": a scheduler address (``"tcp://host:8786"``) or a connected
            ``distributed.Client``; None starts a LocalCluster for the call.
        retries: times a failed chunk task (a dead process, a task error) is run again.
        x_shape: the shape one simulation must return (Python simulators; JAX ones are traced).
        progress: called with a `SimulationEvent` at the start and after each chunk.

    Returns:
        the `Simulations`.

    Raises:
        TypeError, ValueError: for arguments of the wrong type or value, or a file on disk from
            a different run.
        ChunkFailed: (a RuntimeError) when a chunk fails on every attempt; finished chunks are
            kept for the next run.

    Example:
        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist
        >>> from flashbayes import sbi
        >>> prior = dist.Normal(jnp.zeros(2), 1.0).to_event(1)
        >>> def model(key, theta):
        ...     return theta + 0.1 * jax.random.normal(key, (3, 2))
        >>> sims = sbi.simulate(prior, model, 100, seed=0)
        >>> sims.theta.shape, sims.x.shape, sims.num_ok
        ((100, 2), (100, 3, 2), 100)
        >>> again = sbi.simulate(prior, model, 100, seed=0, chunk_size=7)
        >>> bool((again.x == sims.x).all())
        True
    """
    n = _check_int("num_simulations", num_simulations, low=1, high=2**32 - 1)
    seed = _check_int("seed", seed, low=0, high=2**32 - 1)
    retries = _check_int("retries", retries, low=0)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}; got {backend!r}")
    if not callable(simulator):
        raise TypeError(f"simulator: expected a callable; got {type(simulator).__name__}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress: expected a callable or None; got {type(progress).__name__}")
    if workers is not None:
        workers = _check_int("workers", workers, low=1)
    if x_shape is not None:
        x_shape = _check_shape(x_shape)
    out_path = None if out is None else _npz_path(out, "out")
    backend = _resolve_backend(backend, simulator, scheduler)
    if scheduler is not None:
        if backend != "dask":
            raise ValueError(f"scheduler: only used with backend='dask'; got backend={backend!r}")
        if workers is not None:
            raise ValueError("workers: expected None when a scheduler is given (the cluster "
                             f"decides); got {workers}")
        if not (isinstance(scheduler, str) or is_client(scheduler)):
            raise TypeError(f"scheduler: expected an address string or a distributed.Client; "
                            f"got {type(scheduler).__name__}")
    if backend == "dask":
        import_distributed()  # fail early, with the install hint
    kind = "jax" if backend == "jax" else "python"
    if chunk_size is None:
        chunk_size = min(n, 4096) if kind == "jax" else min(1000, max(1, math.ceil(n / 100)))
    chunk_size = min(_check_int("chunk_size", chunk_size, low=1), n)

    key_theta, key_sim = jax.random.split(jax.random.key(seed))
    theta = _draw_theta(prior, key_theta, n)
    wanted = {"seed": seed, "num_simulations": n, "chunk_size": chunk_size, "kind": kind,
              "simulator": _simulator_name(simulator), "theta_shape": list(theta.shape),
              "theta_sha256": hashlib.sha256(np.ascontiguousarray(theta).tobytes()).hexdigest()}

    journal = manifest = None
    if out_path is not None:
        if out_path.exists():
            return _existing_file(out_path, wanted, x_shape)
        journal = _store.Journal(out_path)
        manifest = journal.read_manifest()
        if manifest is not None:
            _refuse_mismatch(journal.dir, manifest, wanted, x_shape)

    takes_rng = False
    if manifest is not None:
        x_shape, x_dtype = tuple(manifest["x_shape"]), np.dtype(manifest["x_dtype"])
        if kind == "python":
            takes_rng = _takes_rng(simulator)
    elif kind == "jax":
        x_shape_traced, x_dtype = jax_output_spec(simulator, key_sim, theta[0])
        if x_shape is not None and x_shape != x_shape_traced:
            raise ValueError(f"x_shape: expected the shape the simulator returns, "
                             f"{x_shape_traced}; got {x_shape}")
        x_shape = x_shape_traced
        if not np.issubdtype(x_dtype, np.floating):
            x_dtype = np.dtype(np.float64)
    else:
        takes_rng = _takes_rng(simulator)
        x_dtype = np.dtype(np.float64)
        if x_shape is None:
            x_shape = _pilot_shape(simulator, takes_rng, theta, seed)
    if kind == "python" and backend == "processes" and (workers or default_workers()) > 1:
        _check_picklable(simulator)

    bounds = [(c, a, min(a + chunk_size, n)) for c, a in enumerate(range(0, n, chunk_size))]
    results: dict[int, tuple] = {}
    if journal is not None:
        if manifest is None:
            manifest = {"format": _store.FORMAT, "version": _store.VERSION, **wanted,
                        "x_shape": list(x_shape), "x_dtype": x_dtype.str}
        journal.start(manifest)
        for c, a, b in bounds:
            found = journal.read_chunk(c, a, b - a, x_shape)
            if found is not None:
                results[c] = found
    todo = [ch for ch in bounds if ch[0] not in results]
    resumed = sum(b - a for c, a, b in bounds if c in results)
    counts = {"done": resumed, "failed": sum(int(np.sum(r[1] != OK)) for r in results.values())}

    def report() -> None:
        if progress is not None:
            progress(SimulationEvent(done=counts["done"], total=n, failed=counts["failed"],
                                     resumed=resumed))

    def on_result(c: int, result: tuple) -> None:
        x, status, errors = result
        x = np.asarray(x, dtype=x_dtype)
        if journal is not None:
            journal.write_chunk(c, bounds[c][1], x, status, errors)
        results[c] = (x, status, errors)
        counts["done"] += len(status)
        counts["failed"] += int(np.sum(status != OK))
        report()

    report()
    if todo:
        if kind == "jax":
            run_jax(simulator, key_sim, theta, chunk_size, x_dtype, todo, on_result)
        else:
            theta64 = theta.astype(np.float64)
            if backend == "dask":
                run_dask(simulator, takes_rng, theta64, seed, x_shape, todo, on_result,
                         scheduler=scheduler, workers=workers, retries=retries)
            else:
                nw = workers or default_workers()
                if nw == 1:
                    run_inline(simulator, takes_rng, theta64, seed, x_shape, todo, on_result)
                else:
                    run_processes(simulator, takes_rng, theta64, seed, x_shape, todo,
                                  on_result, workers=min(nw, len(todo)), retries=retries)

    x = np.concatenate([results[c][0] for c, _, _ in bounds]).astype(x_dtype, copy=False)
    status = np.concatenate([results[c][1] for c, _, _ in bounds])
    errors = sorted((e for c, _, _ in bounds for e in results[c][2]), key=lambda e: e[0])
    meta = {"format": _store.FORMAT, "version": _store.VERSION, **wanted,
            "x_shape": list(x_shape), "x_dtype": x_dtype.str,
            "failures": _store.failure_counts(status), "errors": errors[:_MAX_ERRORS]}
    sims = Simulations(theta=theta, x=x, status=status, seed=seed, meta=meta)
    if journal is not None:
        sims.save(out_path)
        journal.remove()
    return sims


# -- helpers --------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}: expected an integer; got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an integer {bound}; got {value}")
    return value


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise TypeError(f"x_shape: expected a tuple of non-negative integers; got "
                        f"{type(shape).__name__}") from exc
    if any(s < 0 for s in out):
        raise ValueError(f"x_shape: expected non-negative sizes; got {out}")
    return out


def _npz_path(path: Any, name: str) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name}: expected a path; got {type(path).__name__}")
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{name}: expected a path ending in .npz; got {str(path)!r}")
    return path


def _positional(simulator) -> list[inspect.Parameter] | None:
    try:
        sig = inspect.signature(simulator)
    except (TypeError, ValueError):  # some builtins have no signature
        return None
    return [p for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _resolve_backend(backend: str, simulator, scheduler) -> str:
    if backend != "auto":
        return backend
    if scheduler is not None:
        return "dask"
    params = _positional(simulator)
    if params and params[0].name in ("key", "rng_key"):
        return "jax"
    return "processes"


def _takes_rng(simulator) -> bool:
    """Whether to call simulator(theta, rng): its second positional parameter is required or
    named ``rng`` (or it takes ``*args``); otherwise simulator(theta)."""
    try:
        sig = inspect.signature(simulator)
    except (TypeError, ValueError):
        return False
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    required_kw = [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if len(required) > 2 or required_kw or not (positional or varargs):
        raise TypeError(f"simulator: expected a Python function of (theta, rng) or (theta); "
                        f"got one with signature {sig}")
    if len(positional) >= 2:
        return positional[1].default is positional[1].empty or positional[1].name == "rng"
    return varargs


def _simulator_name(simulator) -> str:
    fn = simulator
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return str(name)


def _check_picklable(simulator) -> None:
    try:
        pickle.dumps(simulator)
    except Exception as exc:
        raise TypeError(
            "simulator: expected a picklable function (defined at module level) to send to "
            f"worker processes; got {_simulator_name(simulator)!r}, which pickle refuses ({exc}). "
            "Use workers=1 (this process) or backend='dask' (which ships closures).") from exc


def _draw_theta(prior, key, n: int) -> np.ndarray:
    import numpyro.distributions as dist

    if isinstance(prior, GMM):
        theta = prior.sample(key, n)
    elif isinstance(prior, dist.Distribution):
        theta = prior.sample(key, (n,))
    else:
        raise TypeError(f"prior: expected a NumPyro distribution or a flashbayes.GMM; got "
                        f"{type(prior).__name__}")
    theta = np.asarray(theta).reshape(n, -1)
    if not np.issubdtype(theta.dtype, np.floating):
        theta = theta.astype(np.float32)
    if theta.shape[1] == 0:
        raise ValueError("prior: expected draws with at least one number; got empty draws")
    if not np.all(np.isfinite(theta)):
        raise ValueError("prior: expected finite draws; got NaN or inf")
    return theta


def _pilot_shape(simulator, takes_rng: bool, theta: np.ndarray, seed: int) -> tuple[int, ...]:
    """The output shape of the first simulations that return numbers, run here."""
    import random

    last = "no simulation tried"
    for i in range(min(_PILOT_TRIES, theta.shape[0])):
        saved = np.random.get_state(), random.getstate()
        try:
            out = call_python(simulator, takes_rng, theta[i].astype(np.float64), seed, i)
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
            continue
        finally:
            np.random.set_state(saved[0])
            random.setstate(saved[1])
        try:
            return tuple(np.asarray(out, dtype=np.float64).shape)
        except (TypeError, ValueError) as exc:
            last = f"output is not an array of numbers ({type(exc).__name__}: {exc})"
    raise ValueError(f"simulator: could not learn the output shape, the first "
                     f"{min(_PILOT_TRIES, theta.shape[0])} simulations failed (last: {last}); "
                     "fix the simulator or pass x_shape=")


def _refuse_mismatch(where: Path, stored: dict, wanted: dict, x_shape) -> None:
    diffs = _store.identity_mismatch(stored, wanted)
    if x_shape is not None and tuple(stored.get("x_shape", ())) != x_shape:
        diffs.append(f"x_shape: stored {tuple(stored.get('x_shape', ()))}, asked {x_shape}")
    if diffs:
        raise ValueError(f"{where}: holds simulations of another run ({'; '.join(diffs)}); "
                         "expected the same arguments to continue it. Delete it or choose "
                         "another out path.")


def _existing_file(path: Path, wanted: dict, x_shape) -> Simulations:
    sims = load_simulations(path)
    _refuse_mismatch(path, sims.meta, wanted, x_shape)
    _store.Journal(path).remove()  # a crash between the final write and the clean-up
    return sims
