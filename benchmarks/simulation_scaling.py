"""Simulation throughput on 1 and 2 Dask workers (and 1 and 2 local processes), side by side.

Usage:
    python benchmarks/simulation_scaling.py [--n 1000] [--sleep 0.01] [--rounds 3]
                                           [--chunk-size 20] [--no-processes] [--no-save]

The simulator sleeps `--sleep` seconds per call (10 ms: a stand-in for a slow Python simulator)
and returns theta plus Gaussian noise. Two Dask LocalClusters (1 and 2 single-threaded worker
processes) are started and warmed up first (their workers import flashbayes on the first task);
then each round runs the same budget of `--n` simulations with `fb.sbi.simulate` on every
configuration, in a rotating order, each writing its own simulation file (chunks streamed and
fsynced as they arrive). The processes backend is timed as a user calls it: with 1 worker the
calling process simulates, with 2 a pool is started inside the timed call (forked from the fork
server, which a first, untimed call starts). Every run is
checked to equal the first one bit for bit. Reported: median simulations/s per configuration and
the median over rounds of the 2-worker / 1-worker throughput ratio (ideal 2.0; target >= 1.8 for
Dask). Writes benchmarks/results/simulation_scaling.json and .md, then docs/results.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import flashbayes as fb

SEED = 20261123


def slow_simulator(seconds: float):
    """A slow simulator: sleeps `seconds` per call, then theta plus standard normal noise."""
    return functools.partial(_sleep_then_simulate, seconds=seconds)


def _sleep_then_simulate(theta, rng, seconds=0.01):
    time.sleep(seconds)
    return theta + rng.normal(size=theta.shape)


def markdown(res: dict) -> str:
    lines = [
        f"{res['n']} simulations of a simulator that sleeps {res['sleep_ms']:.0f} ms per call, "
        f"chunks of {res['chunk_size']}, {res['rounds']} rounds side by side "
        f"({res['cpus']} CPU cores shared with other work); every run wrote its simulation file "
        "and equalled the first bit for bit.",
        "",
        "| backend | workers | simulations/s (median) | ideal | seconds per run (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in res["runs"]:
        workers = row["workers"]
        if row["backend"] == "processes" and workers == 1:
            workers = "1 (the calling process)"
        lines.append(f"| {row['backend']} | {workers} | {row['sims_per_second']:.1f} | "
                     f"{row['ideal_sims_per_second']:.1f} | {row['seconds_median']:.2f} |")
    lines.append("")
    st = res["startup_seconds"]
    lines.append(f"Not in the timings: starting a LocalCluster and its first tasks took "
                 f"{st['dask_1']:.1f} s (1 worker) and {st['dask_2']:.1f} s (2 workers)"
                 + (f"; the first process pool of a session {st['processes_2']:.1f} s (it "
                    "starts the fork server, which imports flashbayes once; later pools start "
                    "in milliseconds)" if "processes_2" in st else "") + ".")
    lines.append("")
    for backend, ratio in res["speedup_1_to_2"].items():
        lines.append(f"- {backend}: throughput with 2 workers / 1 worker: **{ratio:.2f}x** "
                     f"(rounds: {', '.join(f'{r:.2f}' for r in res['speedup_rounds'][backend])})")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="simulations per run")
    ap.add_argument("--sleep", type=float, default=0.01, help="seconds per simulator call")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=20)
    ap.add_argument("--no-processes", action="store_true", help="Dask only")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args()
    import distributed

    prior = dist.Normal(jnp.zeros(4), 1.0).to_event(1)
    simulator = slow_simulator(args.sleep)
    clusters, clients = [], {}
    configs = [("dask", 1), ("dask", 2)]
    if not args.no_processes:
        configs += [("processes", 1), ("processes", 2)]
    times = {c: [] for c in configs}
    reference = None
    startup = {}  # seconds: cluster start and warm-up, first process pool of the session
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for w in (1, 2):
                t0 = time.perf_counter()
                cluster = distributed.LocalCluster(n_workers=w, threads_per_worker=1,
                                                   processes=True, dashboard_address=":0")
                clusters.append(cluster)
                clients[w] = distributed.Client(cluster)
                # warm-up: every worker imports flashbayes and unpickles the simulator once
                fb.sbi.simulate(prior, simulator, 4 * w, seed=0, chunk_size=1,
                                scheduler=clients[w])
                startup[f"dask_{w}"] = time.perf_counter() - t0
            if not args.no_processes:  # the first pool of a session starts the fork server
                t0 = time.perf_counter()
                fb.sbi.simulate(prior, simulator, 8, seed=0, chunk_size=1, backend="processes",
                                workers=2)
                startup["processes_2"] = time.perf_counter() - t0
            for r in range(args.rounds):
                for j in range(len(configs)):
                    backend, w = configs[(j + r) % len(configs)]
                    out = Path(tmp) / f"{backend}-{w}-{r}.npz"
                    kwargs = ({"scheduler": clients[w]} if backend == "dask"
                              else {"backend": "processes", "workers": w})
                    t0 = time.perf_counter()
                    sims = fb.sbi.simulate(prior, simulator, args.n, seed=SEED,
                                           chunk_size=args.chunk_size, out=out, **kwargs)
                    seconds = time.perf_counter() - t0
                    times[(backend, w)].append(seconds)
                    if reference is None:
                        reference = sims
                    elif not (np.array_equal(sims.x, reference.x)
                              and np.array_equal(sims.theta, reference.theta)):
                        raise SystemExit(f"{backend} with {w} workers: simulations differ")
                    print(f"round {r}: {backend:9s} {w} worker(s): {seconds:6.2f} s, "
                          f"{args.n / seconds:6.1f} sims/s", flush=True)
        finally:
            for client in clients.values():
                client.close()
            for cluster in clusters:
                cluster.close()
    runs = []
    for (backend, w), secs in times.items():
        med = statistics.median(secs)
        runs.append({"backend": backend, "workers": w, "seconds": secs, "seconds_median": med,
                     "sims_per_second": args.n / med,
                     "ideal_sims_per_second": w / args.sleep})
    speedup_rounds = {}
    for backend in dict.fromkeys(b for b, _ in configs):
        speedup_rounds[backend] = [t1 / t2 for t1, t2 in zip(times[(backend, 1)],
                                                             times[(backend, 2)])]
    res = {"n": args.n, "sleep_ms": args.sleep * 1e3, "chunk_size": args.chunk_size,
           "rounds": args.rounds, "seed": SEED, "cpus": os.cpu_count(),
           "platform": platform.platform(), "python": platform.python_version(),
           "jax": jax.__version__, "dask": distributed.__version__,
           "flashbayes": fb.__version__, "startup_seconds": startup, "runs": runs,
           "speedup_rounds": speedup_rounds,
           "speedup_1_to_2": {b: statistics.median(v) for b, v in speedup_rounds.items()},
           "target_dask_speedup": 1.8}
    md = markdown(res)
    print(md)
    if not args.no_save:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _docs import save

        save("simulation_scaling", res, md)


if __name__ == "__main__":
    main()
