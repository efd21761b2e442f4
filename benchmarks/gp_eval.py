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
from flashbayes.amortized._pfn import load_predictor
from flashbayes.reference import gp_nuts, gp_oracle, gp_type2_ml

METHODS = ("oracle", "type2_ml", "nuts", "pfn")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None,
                    help="PFN checkpoint file or folder, or gp_hyperprior_pfn (the shipped one)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                    help="which predictives to score (pfn needs --checkpoint)")
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
    model = None
    if args.checkpoint is not None:
        if args.checkpoint == "gp_hyperprior_pfn" and not Path(args.checkpoint).exists():
            from flashbayes.amortized import load_pretrained

            model = load_pretrained(args.checkpoint)
        else:
            model = load_predictor(args.checkpoint)
        task = model.task
    if args.latency:
        return latency(model, args)
    if "pfn" in args.methods and model is None:
        ap.error("--methods pfn: expected --checkpoint")
    run = set(args.methods)
    rows = []
    key = jax.random.key(args.seed)
    for n in args.ns:
        for i in range(args.tasks_per_n):
            kp, kt, kn = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, n), i), 3)
            p = task.sample_problem(kp, n=n, n_query=args.n_query)
            preds, secs = {}, {}
            for name in METHODS:
                if name in run:
                    t = time.perf_counter()
                    preds[name] = jax.block_until_ready(
                        _predict(name, task, model, p, kt if name == "type2_ml" else kn, args))
                    secs[name] = time.perf_counter() - t
            row = {"n": n, "i": i}
            if "nuts" in preds:
                row["nuts_problems"] = preds["nuts"].info["problems"]
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


def _predict(name, task, model, p, key, args):
    if name == "oracle":
        return gp_oracle(task, p.hyper, p.context_x, p.context_y, p.query_x)
    if name == "type2_ml":
        return gp_type2_ml(key, task, p.context_x, p.context_y, p.query_x)
    if name == "nuts":
        return gp_nuts(key, task, p.context_x, p.context_y, p.query_x,
                       num_warmup=args.nuts_warmup, num_samples=args.nuts_samples, warn=False)
    return model.predictive(p.context_x, p.context_y, p.query_x, standardize=False)


def latency(model, args, repeats=200):
    """Median wall time of one predictive call (50 context points, 100 queries) of the PFN
    (through PFNPredictor, validation and padding included) and of warm NUTS, side by side."""
    task = model.task
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


def _mean_se(v):
    v = np.asarray(v, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def report(rows, args):
    """Per n: NLPD and 90% coverage of each method, and the PFN's paired gap to the best
    reference scored (NUTS when it ran, else the oracle); one more row pools every n."""
    methods = [m for m in METHODS if m in rows[0]]
    ref = "nuts" if "nuts" in methods else "oracle"
    gap = f"pfn_minus_{ref}"
    has_gap = "pfn" in methods and ref in methods
    summary = {}
    for n in [*args.ns, "all"]:
        sel = [r for r in rows if n == "all" or r["n"] == n]
        s = {}
        for m in methods:
            mean, se = _mean_se([r[m] for r in sel])
            s[m] = {"nlpd": mean, "se": se,
                    "cover90": float(np.mean([r[m + "_cover90"] for r in sel]))}
        if has_gap:
            mean, se = _mean_se([r["pfn"] - r[ref] for r in sel])
            s[gap] = {"mean": mean, "se": se}
        summary[n] = s
    lines = ["| n | " + " | ".join(f"{m} NLPD" for m in methods)
             + (f" | PFN - {ref} |" if has_gap else " |")
             + " " + " | ".join(f"{m} 90% cover" for m in methods) + " |"]
    lines.append("|" + "---|" * (1 + 2 * len(methods) + has_gap))
    for n, s in summary.items():
        cells = [f"{s[m]['nlpd']:.3f} ± {s[m]['se']:.3f}" for m in methods]
        if has_gap:
            cells.append(f"{s[gap]['mean']:+.3f} ± {s[gap]['se']:.3f}")
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
        ns = list(args.ns)
        for m in methods:
            if m == ref:
                continue
            gaps = [np.array([r[m] - r[ref] for r in rows if r["n"] == n]) for n in ns]
            ax.errorbar(ns, [g.mean() for g in gaps],
                        yerr=[g.std(ddof=1) / np.sqrt(len(g)) for g in gaps], marker="o",
                        capsize=3, label=m)
        label = "nuts (Bayes-optimal)" if ref == "nuts" else "oracle (true hyperparameters)"
        ax.axhline(0.0, color="k", lw=0.8, label=label)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("context points n")
        ax.set_ylabel(f"NLPD minus {ref} NLPD (nats per point)")
        ax.set_title(f"gp_hyperprior, {len(rows) // len(ns)} data sets per n")
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    return summary


if __name__ == "__main__":
    main()
