"""Chunks of Python simulations on Dask distributed (the optional ``distributed`` extra).

One task per chunk. Dask reruns the tasks of a worker that dies on the surviving workers (up to
its ``distributed.scheduler.allowed-failures`` setting) and a task that raises is retried
``retries`` times; since every simulation is seeded by its global index, a rerun gives the same
numbers wherever it runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from flashbayes.sbi._backends import Chunk, ChunkFailed, OnResult, default_workers
from flashbayes.sbi._chunks import run_python_chunk

INSTALL_HINT = 'pip install -e ".[distributed]"  (or: pip install "dask[distributed]")'


def import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(f"backend='dask' needs Dask distributed, which is not installed; "
                          f"install the optional extra: {INSTALL_HINT}") from exc
    return distributed


def is_client(obj: Any) -> bool:
    """Whether obj is a distributed.Client (without importing distributed for other objects)."""
    return any(cls.__module__.startswith("distributed") and cls.__name__ == "Client"
               for cls in type(obj).__mro__)


def run_dask(simulator, takes_rng: bool, theta: np.ndarray, seed: int,
             x_shape: tuple[int, ...], chunks: Sequence[Chunk], on_result: OnResult, *,
             scheduler, workers: int | None, retries: int) -> None:
    """Run the chunks on a Dask cluster.

    Args:
        scheduler: None (a LocalCluster of `workers` single-threaded processes, closed at the
            end), a scheduler address such as ``"tcp://10.0.0.1:8786"``, or a connected
            ``distributed.Client`` (left open).
    """
    distributed = import_distributed()
    cluster = client = None
    own_client = True
    try:
        if scheduler is None:
            cluster = distributed.LocalCluster(
                n_workers=workers or default_workers(), threads_per_worker=1, processes=True,
                dashboard_address=":0")
            client = distributed.Client(cluster)
        elif isinstance(scheduler, str):
            try:
                client = distributed.Client(scheduler)
            except OSError as exc:
                raise ConnectionError(f"scheduler: could not connect to the Dask scheduler at "
                                      f"{scheduler!r} ({exc})") from exc
        else:
            client, own_client = scheduler, False
        _run(client, distributed, simulator, takes_rng, theta, seed, x_shape, chunks, on_result,
             retries)
    finally:
        if own_client and client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def _run(client, distributed, simulator, takes_rng, theta, seed, x_shape, chunks, on_result,
         retries) -> None:
    run_id = uuid.uuid4().hex[:12]
    by_future = {}
    for chunk in chunks:
        c, a, b = chunk
        fut = client.submit(run_python_chunk, simulator, takes_rng, theta[a:b], seed, a, x_shape,
                            key=f"flashbayes-simulate-{run_id}-chunk-{c}", retries=retries,
                            pure=False)
        by_future[fut] = chunk
    try:
        for fut in distributed.as_completed(list(by_future), raise_errors=False):
            chunk = by_future[fut]
            if fut.status != "finished":
                exc = fut.exception()
                raise ChunkFailed(
                    f"chunk {chunk[0]} (simulations {chunk[1]}..{chunk[2] - 1}) failed on the "
                    f"Dask cluster after {retries} retries: {type(exc).__name__}: {exc}. Finished "
                    "chunks are kept: run again with the same arguments to continue.") from exc
            result = fut.result()
            fut.release()
            on_result(chunk[0], result)
    finally:
        client.cancel([f for f in by_future if not f.done()])
