"""Time to draw 10,000 posterior samples from the default NPE estimator, on the whole machine.

Usage:
    python benchmarks/npe_sampling.py [--tasks gaussian_linear bernoulli_glm] [--budget 10000]
                                      [--merge]

Trains the default estimator of each task (seed as in benchmarks/sbibm.py; the training time,
simulations included, is recorded too), then times
`posterior(x_obs).sample(key, 10_000)` for observation 1: one compiling call, then the median
and 90th percentile of 20 calls with fresh keys. Also times one network of each head alone (the
mixture's first spline and first autoregressive flow, weight 1), to show where the time goes,
and the mixture once more with flowjax's own autoregressive inverse (one network pass per
dimension) in place of `flashbayes.sbi._maf_sampling`.
Nothing else should run on the machine. Writes benchmarks/results/npe_sampling.json and .md
(`--merge`: keeping the rows of tasks not rerun).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

import flashbayes as fb
from flashbayes.benchmarks import _sbibm_bench as bench


def time_draws(post, n: int = 10_000, repeats: int = 20) -> tuple[float, float]:
    """Median and 90th percentile seconds of one call drawing n samples (after compiling)."""
    post.sample(jax.random.key(0), n).block_until_ready()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        post.sample(jax.random.key(i + 1), n).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.quantile(times, 0.9))


def single_head(est, head: str):
    """The estimator's first network of `head` alone, or None."""
    import equinox as eqx

    from flashbayes.sbi._npe import NPEEstimator

    for g in getattr(est.net, "groups", ()):
        if g.kind == head:
            first = jax.tree_util.tree_map(lambda a: a[0] if eqx.is_array(a) else a, g)
            return NPEEstimator(first, est.stats, {**est.config, "head": head}, est.history)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["gaussian_linear", "bernoulli_glm", "slcp"])
    ap.add_argument("--budget", type=int, default=10_000)
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of other tasks already in npe_sampling.json")
    args = ap.parse_args()
    rows = []
    for name in args.tasks:
        task = fb.sbi.tasks.get(name)
        t0 = time.perf_counter()
        est = fb.sbi.train_npe(task.prior(), task.simulator, args.budget,
                               key=jax.random.key(bench.training_seed(name, args.budget)),
                               **task.npe_settings())
        train_s = time.perf_counter() - t0
        x = fb.sbi.tasks.load_observation(name, 1)
        row = {"task": name, "dim_theta": task.dim_theta, "members": est.config["members"],
               "weights": est.config["weights"], "train_s": train_s,
               "npe_options": task.npe_kwargs, "cores": len(os.sched_getaffinity(0))}
        row["mixture_s"], row["mixture_p90_s"] = time_draws(est.posterior(x))
        # side by side: the same estimator with flowjax's own autoregressive inverse
        # (one network pass per dimension) instead of the one-pass-per-layer sampler
        layout, est._maf_layout = est._maf_layout, None
        row["mixture_flowjax_s"], _ = time_draws(est.posterior(x))
        est._maf_layout = layout
        for head in ("nsf", "maf"):
            one = single_head(est, head)
            if one is not None:
                row[f"one_{head}_s"], _ = time_draws(one.posterior(x))
        rows.append(row)
        print(row, flush=True)
    from _docs import RESULTS, save

    if args.merge and (RESULTS / "npe_sampling.json").exists():
        import json

        old = json.loads((RESULTS / "npe_sampling.json").read_text())
        if old.get("budget") != args.budget:
            ap.error(f"--merge: npe_sampling.json is at {old.get('budget')} simulations; this run "
                     f"at {args.budget}")
        fresh = {r["task"] for r in rows}
        rows = [r for r in old["rows"] if r["task"] not in fresh] + rows
        order = fb.sbi.tasks.names()
        rows.sort(key=lambda r: order.index(r["task"]))
    lines = ["# Drawing 10,000 samples from the default NPE estimator", "",
             f"{args.budget} simulations per task, observation 1; median of 20 calls after a "
             f"compiling one; CPU cores given to the process: per row (this run: "
             f"{len(os.sched_getaffinity(0))}). Training: seconds to train the estimator, "
             "simulations included (rows from before it was recorded: —).", "",
             "| task | dim θ | cores | networks kept | mixture ms (p90) | mixture, flowjax's MAF "
             "inverse ms | one NSF ms | one MAF ms | training s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = bench._kept(r)

        def ms(key, r=r):
            return "—" if key not in r else f"{1000 * r[key]:.1f}"

        train = "—" if "train_s" not in r else f"{r['train_s']:.0f}"
        lines.append(f"| {r['task']} | {r['dim_theta']} | {r.get('cores', 1)} | {kept} | "
                     f"{ms('mixture_s')} ({ms('mixture_p90_s')}) | {ms('mixture_flowjax_s')} | "
                     f"{ms('one_nsf_s')} | {ms('one_maf_s')} | {train} |")

    table = "\n".join(lines) + "\n"
    save("npe_sampling", {"rows": rows, "budget": args.budget}, table)
    print(table)


if __name__ == "__main__":
    main()
