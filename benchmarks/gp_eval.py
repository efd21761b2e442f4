"""Posterior predictives on held-out `gp_hyperprior` tasks: a trained PFN against the oracle GP
(true hyperparameters), type-II maximum likelihood and NUTS over the hyperparameters.

    OPENBLAS_NUM_THREADS=1 python benchmarks/gp_eval.py --checkpoint RUN/ckpt_00005500.safetensors \
        --ns 1 2 5 10 20 50 100 --tasks-per-n 8 --out benchmarks/results/gp_pfn_eval

Reports, per context size n, the mean NLPD (nats per query point) of each method with its standard
error, the PFN's and NUTS' gaps to each other (paired), and the coverage of central 90% intervals;
writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flashbayes import tasks
from flashbayes.amortized._pfn import load_pfn
from flashbayes.distributions import BarDistribution
from flashbayes.reference import gp_nuts, gp_oracle, gp_type2_ml

METHODS = ("oracle", "type2_ml", "nuts", "pfn")


def pfn_predictive(net, task):
    @jax.jit
    def run(cx, cy, cm, qx):
        return net(cx, cy, cm, qx)

    def predict(cx, cy, qx):
        n = cx.shape[0]
        xp = np.zeros((task.n_max, task.x_dim), np.float32)
        yp = np.zeros(task.n_max, np.float32)
        xp[:n], yp[:n] = cx, cy
        logits = run(jnp.asarray(xp), jnp.asarray(yp), jnp.asarray(np.arange(task.n_max) < n),
                     jnp.asarray(qx, jnp.float32))
        return BarDistribution(jnp.asarray(net.config.borders, jnp.float32), logits)

    return predict


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100])
    ap.add_argument("--tasks-per-n", type=int, default=8)
    ap.add_argument("--n-query", type=int, default=20)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--nuts-warmup", type=int, default=500)
    ap.add_argument("--nuts-samples", type=int, default=500)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of NLPD against n")
    ap.add_argument("--latency", action="store_true",
                    help="only time the PFN (50 context points, 100 queries) and warm NUTS")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="re-plot / re-tabulate a previous run's JSON instead of running")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        rows = json.loads(args.from_json.read_text())["rows"]
        args.ns = sorted({r["n"] for r in rows})
        return report(rows, args)

    task = tasks.get_predictive("gp_hyperprior")
    predict_pfn = None
    if args.checkpoint is not None:
        net, header = load_pfn(args.checkpoint)
        task = tasks.get_predictive(header["task"], **header["task_params"])
        predict_pfn = pfn_predictive(net, task)
    if args.latency:
        return latency(net, task, args)
    rows = []
    key = jax.random.key(args.seed)
    for n in args.ns:
        for i in range(args.tasks_per_n):
            kp, kt, kn = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, n), i), 3)
            p = task.sample_problem(kp, n=n, n_query=args.n_query)
            preds, secs = {}, {}
            t = time.perf_counter()
            preds["oracle"] = gp_oracle(task, p.hyper, p.context_x, p.context_y, p.query_x)
            secs["oracle"] = time.perf_counter() - t
            t = time.perf_counter()
            preds["type2_ml"] = gp_type2_ml(kt, task, p.context_x, p.context_y, p.query_x)
            secs["type2_ml"] = time.perf_counter() - t
            t = time.perf_counter()
            preds["nuts"] = gp_nuts(kn, task, p.context_x, p.context_y, p.query_x,
                                    num_warmup=args.nuts_warmup, num_samples=args.nuts_samples,
                                    warn=False)
            secs["nuts"] = time.perf_counter() - t
            if predict_pfn is not None:
                t = time.perf_counter()
                preds["pfn"] = predict_pfn(p.context_x, p.context_y, p.query_x)
                secs["pfn"] = time.perf_counter() - t
            row = {"n": n, "i": i, "nuts_problems": preds["nuts"].info["problems"]}
            for name, pred in preds.items():
                y = jnp.asarray(p.query_y, jnp.float64 if name != "pfn" else jnp.float32)
                row[name] = float(-np.mean(np.asarray(pred.log_prob(y), np.float64)))
                lo = np.asarray(pred.quantile(0.05), np.float64)
                hi = np.asarray(pred.quantile(0.95), np.float64)
                row[name + "_cover90"] = float(np.mean((p.query_y >= lo) & (p.query_y <= hi)))
                row[name + "_seconds"] = secs[name]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return report(rows, args)


def latency(net, task, args, repeats=200):
    """Median wall time of one predictive call (50 context points, 100 queries) of the PFN
    (through PFNPredictor, validation and padding included) and of warm NUTS, side by side."""
    from flashbayes.amortized._pfn import PFNPredictor

    model = PFNPredictor(net, task)
    p = task.sample_problem(jax.random.key(args.seed), n=50, n_query=100)
    jax.block_until_ready(model.predictive(p.context_x, p.context_y, p.query_x).logits)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(model.predictive(p.context_x, p.context_y, p.query_x).logits)
        times.append(time.perf_counter() - t)
    pfn = float(np.median(times))
    nuts_times = []
    for i in range(4):  # the first call compiles; the others are warm
        t = time.perf_counter()
        pred = gp_nuts(jax.random.key(i), task, p.context_x, p.context_y, p.query_x,
                       num_warmup=args.nuts_warmup, num_samples=args.nuts_samples, warn=False)
        jax.block_until_ready(pred.means)
        nuts_times.append(time.perf_counter() - t)
    nuts = float(np.median(nuts_times[1:]))
    out = {"pfn_seconds_median": pfn, "nuts_warm_seconds_median": nuts,
           "speedup": nuts / pfn, "context": 50, "queries": 100,
           "nuts": {"num_warmup": args.nuts_warmup, "num_samples": args.nuts_samples,
                    "num_chains": 4}}
    print(json.dumps(out))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    return out


def report(rows, args):
    methods = [m for m in METHODS if m in rows[0]]
    summary = {}
    for n in args.ns:
        sel = [r for r in rows if r["n"] == n]
        s = {}
        for m in methods:
            v = np.array([r[m] for r in sel])
            s[m] = {"nlpd": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v)))
                    if len(v) > 1 else float("nan"),
                    "cover90": float(np.mean([r[m + "_cover90"] for r in sel]))}
        if "pfn" in methods:
            d = np.array([r["pfn"] - r["nuts"] for r in sel])
            s["pfn_minus_nuts"] = {"mean": float(d.mean()),
                                   "se": float(d.std(ddof=1) / np.sqrt(len(d)))
                                   if len(d) > 1 else float("nan")}
        summary[n] = s
    lines = ["| n | " + " | ".join(f"{m} NLPD" for m in methods)
             + (" | PFN - NUTS |" if "pfn" in methods else " |")
             + " " + " | ".join(f"{m} 90% cover" for m in methods) + " |"]
    lines.append("|" + "---|" * (1 + 2 * len(methods) + ("pfn" in methods)))
    for n, s in summary.items():
        cells = [f"{s[m]['nlpd']:.3f} ± {s[m]['se']:.3f}" for m in methods]
        if "pfn" in methods:
            cells.append(f"{s['pfn_minus_nuts']['mean']:+.3f} ± {s['pfn_minus_nuts']['se']:.3f}")
        cells += [f"{s[m]['cover90']:.2f}" for m in methods]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
             "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(table + "\n")
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ns = list(summary)
        for m in methods:
            if m == "nuts":
                continue
            gaps = [np.array([r[m] - r["nuts"] for r in rows if r["n"] == n]) for n in ns]
            ax.errorbar(ns, [g.mean() for g in gaps],
                        yerr=[g.std(ddof=1) / np.sqrt(len(g)) for g in gaps], marker="o",
                        capsize=3, label=m)
        ax.axhline(0.0, color="k", lw=0.8, label="nuts (Bayes-optimal)")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("context points n")
        ax.set_ylabel("NLPD minus NUTS NLPD (nats per point)")
        ax.set_title(f"gp_hyperprior, {len(rows) // len(ns)} data sets per n")
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    return summary


if __name__ == "__main__":
    main()
