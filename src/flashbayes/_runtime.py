"""Process settings the CPU engines need, applied once on first use (never at import)."""

from __future__ import annotations

import functools
import os


@functools.cache
def limit_blas_threads() -> None:
    """Run NumPy's BLAS on one thread, unless FLASHBAYES_BLAS_THREADS says otherwise.

    On a CPU, JAX's own thread pool does the numerical work of the engines. OpenBLAS worker
    threads keep spinning for about a tenth of a second after every NumPy BLAS call, and on a
    machine with few cores they take those cores from JAX: a 1 ms k-hat check was measured at
    120 ms with two spinning workers on 2 cores, and 1 ms with one BLAS thread. NumPy's own
    matrix products are small here, so one thread costs them little.
    """
    from threadpoolctl import threadpool_limits

    n = os.environ.get("FLASHBAYES_BLAS_THREADS", "1")
    if n.strip().lower() not in ("", "0", "off", "none", "default"):
        threadpool_limits(limits=int(n), user_api="blas")
