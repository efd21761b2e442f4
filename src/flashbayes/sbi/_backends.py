"""Where chunks run: in this process, in worker processes, or (JAX simulators) vmapped here.

A runner calls ``on_result(c, (x, status, errors))`` in the calling thread as each chunk
finishes, in whatever order they finish; the caller writes the chunk before the next one is
handed over.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import jax
import jax.numpy as jnp
import numpy as np

from flashbayes.sbi._chunks import NONFINITE, OK, run_python_chunk

Chunk = tuple[int, int, int]  # (chunk index, first simulation, one past the last)
OnResult = Callable[[int, tuple], None]


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class ChunkFailed(RuntimeError):
    """A chunk failed on every attempt."""


def _failed(chunk: Chunk, attempts: int, exc: BaseException) -> ChunkFailed:
    c, a, b = chunk
    return ChunkFailed(f"chunk {c} (simulations {a}..{b - 1}) failed on {attempts} attempt(s); "
                       f"last error: {type(exc).__name__}: {exc}. Finished chunks are kept: run "
                       "again with the same arguments to continue.")


def run_inline(simulator, takes_rng: bool, theta: np.ndarray, seed: int,
               x_shape: tuple[int, ...], chunks: Sequence[Chunk], on_result: OnResult) -> None:
    for c, a, b in chunks:
        on_result(c, run_python_chunk(simulator, takes_rng, theta[a:b], seed, a, x_shape))


def run_processes(simulator, takes_rng: bool, theta: np.ndarray, seed: int,
                  x_shape: tuple[int, ...], chunks: Sequence[Chunk], on_result: OnResult, *,
                  workers: int, retries: int) -> None:
    """Chunks on a pool of worker processes, never forked from this (multithreaded JAX)
    process: on POSIX they are forked from multiprocessing's fork server, a clean process that
    imports flashbayes once and stays up for the next call; elsewhere they are spawned.

    A chunk whose task fails (its process died, or the simulator raised a BaseException such as
    SystemExit) is resubmitted up to `retries` times. When a process dies the pool breaks and
    every chunk then in flight is charged one attempt.
    """
    ctx = _mp_context()
    todo: deque[Chunk] = deque(chunks)
    attempts: dict[int, int] = {}
    window = 2 * workers
    while todo:
        pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx)
        inflight: dict = {}
        broken = False
        try:
            while (todo or inflight) and not broken:
                while todo and len(inflight) < window:
                    chunk = todo.popleft()
                    c, a, b = chunk
                    try:
                        fut = pool.submit(run_python_chunk, simulator, takes_rng, theta[a:b],
                                          seed, a, x_shape)
                    except BrokenProcessPool:  # a process died meanwhile; not this chunk's fault
                        todo.appendleft(chunk)
                        broken = True
                        break
                    inflight[fut] = chunk
                if broken and not inflight:
                    break
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: inflight[f][0]):
                    chunk = inflight.pop(fut)
                    try:
                        result = fut.result()
                    except BaseException as exc:
                        if not isinstance(exc, Exception) and not isinstance(exc, SystemExit):
                            raise
                        broken = broken or isinstance(exc, BrokenProcessPool)
                        _retry(chunk, exc, attempts, retries, todo)
                    else:
                        on_result(chunk[0], result)
            if broken:  # every chunk still in flight died with the pool
                for fut, chunk in inflight.items():
                    exc = fut.exception() if fut.done() else BrokenProcessPool("pool broken")
                    if fut.done() and exc is None:
                        on_result(chunk[0], fut.result())
                    else:
                        _retry(chunk, exc, attempts, retries, todo)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _mp_context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # the default preload ('__main__') plus the chunk runner and NumPyro, which a script
        # that defines a simulator usually imports (workers import the main script again)
        ctx.set_forkserver_preload(["__main__", "flashbayes.sbi._chunks",
                                    "numpyro.distributions"])
        return ctx
    return multiprocessing.get_context("spawn")


def _retry(chunk: Chunk, exc: BaseException, attempts: dict[int, int], retries: int,
           todo: deque) -> None:
    c = chunk[0]
    attempts[c] = attempts.get(c, 0) + 1
    if attempts[c] > retries:
        raise _failed(chunk, attempts[c], exc) from exc
    todo.appendleft(chunk)


def jax_output_spec(simulator, key_sim: jax.Array, theta0: jax.Array):
    """Shape and dtype of one JAX simulation, by tracing (nothing is run)."""
    def one(i, th):
        return simulator(jax.random.fold_in(key_sim, i), th)

    try:
        spec = jax.eval_shape(one, jax.ShapeDtypeStruct((), jnp.uint32), theta0)
    except Exception as exc:
        raise TypeError(f"simulator: expected a JAX function of (key, theta) that can be traced; "
                        f"tracing it failed with {type(exc).__name__}: {exc}") from exc
    if not hasattr(spec, "shape") or not hasattr(spec, "dtype"):
        raise TypeError(f"simulator: expected a JAX function returning one array; got "
                        f"{type(spec).__name__}")
    return tuple(spec.shape), np.dtype(spec.dtype)


def run_jax(simulator, key_sim: jax.Array, theta: np.ndarray, chunk_size: int,
            x_dtype: np.dtype, chunks: Sequence[Chunk], on_result: OnResult) -> None:
    """Vmapped, jitted chunks; the key of simulation i is fold_in(key_sim, i), so results do not
    depend on the chunking. The last chunk is padded to the chunk size (one compilation)."""

    @jax.jit
    def batch(idx, th):
        return jax.vmap(lambda i, t: simulator(jax.random.fold_in(key_sim, i), t))(idx, th)

    for c, a, b in chunks:
        m = b - a
        idx = np.arange(a, a + chunk_size, dtype=np.uint32)
        th = theta[a:b]
        if m < chunk_size:
            idx[m:] = idx[m - 1]
            th = np.concatenate([th, np.repeat(th[-1:], chunk_size - m, axis=0)])
        x = np.asarray(batch(idx, th))[:m].astype(x_dtype)
        finite = np.isfinite(x.reshape(m, -1)).all(axis=1)
        status = np.where(finite, OK, NONFINITE).astype(np.int8)
        x[~finite] = np.nan
        errors = [[a + int(j), "nonfinite", "output contains NaN or inf"]
                  for j in np.flatnonzero(~finite)[:3]]
        on_result(c, (x, status, errors))
