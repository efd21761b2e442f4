"""Full-rank VI alone on chosen posteriordb posteriors (the VI column of `flashbayes bench
posteriordb`, with the same key), printed as JSON.

    python benchmarks/posteriordb_vi.py hudson_lynx_hare-lotka_volterra
"""

from __future__ import annotations

import json
import sys

import jax


def main() -> None:
    jax.config.update("jax_enable_x64", True)  # as the bench runs (x64, like the references)
    from flashbayes._runtime import limit_blas_threads
    from flashbayes.benchmarks import posteriordb as pdb
    from flashbayes.benchmarks._posteriordb_bench import STARTS, run_vi

    limit_blas_threads()
    import numpy as np

    for name in sys.argv[1:]:
        entry = pdb.get(name)
        ref = {k: np.asarray(v).reshape(-1) for k, v in entry.reference_draws().items()}
        _, _, k4 = jax.random.split(jax.random.key(0), 3)  # run_posterior's VI key, seed 0
        res = run_vi(entry, ref, k4, STARTS.get(name))
        res.pop("per_param", None)
        print(json.dumps({"name": name, **res}))


if __name__ == "__main__":
    main()
