"""Posterior predictives on held-out `gp_hyperprior` tasks: a trained PFN against the oracle GP
(true hyperparameters), type-II maximum likelihood, NUTS over the hyperparameters and the same
Bayes-optimal predictive by quadrature.

    OPENBLAS_NUM_THREADS=1 python benchmarks/gp_eval.py --checkpoint gp_hyperprior_pfn \
        --dt-checkpoint gp_hyperprior_dt --tasks-per-n 6 --out benchmarks/results/gp_eval_nuts60

Reports, per context size n, the mean NLPD (nats per query point) of each method with its standard
error, each network's paired gap to each Bayes-optimal reference scored (NUTS, quadrature; else
the oracle), and the coverage of central 90% intervals;
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
from flashbayes.amortized import GP_PRETRAINED, load_pretrained
from flashbayes.amortized._pfn import load_predictor
from flashbayes.reference import gp_nuts, gp_oracle, gp_quadrature, gp_type2_ml

METHODS = ("oracle", "type2_ml", "nuts", "quadrature", "pfn", "dt")
BAYES = ("nuts", "quadrature")
NETWORKS = ("pfn", "dt")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None,
                    help="PFN checkpoint file or folder, or gp_hyperprior_pfn (the shipped one)")
    ap.add_argument("--dt-checkpoint", default=None,
                    help="GMM-head (DT variant) checkpoint, or gp_hyperprior_dt")
    ap.add_argument("--reuse", type=Path, nargs="*", default=[],
                    help="earlier runs' JSON or rows.jsonl: scores found there for the same "
                         "(n, i) data set are taken, not recomputed (also resumes a run)")
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
    models = {name: _load(path) for name, path in (("pfn", args.checkpoint),
                                                    ("dt", args.dt_checkpoint)) if path}
    if models:
        task = next(iter(models.values())).task
    if args.latency:
        if not models:
            ap.error("--latency: expected --checkpoint and/or --dt-checkpoint")
        return latency(models, args)
    # a network is scored when its checkpoint is given
    args.methods = [m for m in args.methods if m not in NETWORKS or m in models]
    # scores of earlier runs (--reuse) and of this run's own journal (a resumed run), taken
    # where the method ran with the same setting on the same data set (seed, n, i, n_query)
    paths = list(args.reuse)
    journal = None
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        jpath = args.out.with_suffix(".rows.jsonl")
        paths += [jpath] if jpath.exists() else []
        journal = open(jpath, "a")
    old = _reused(paths)
    settings = {m: _setting(m, args, models.get(m)) for m in args.methods}
    rows = []
    key = jax.random.key(args.seed)
    for n in args.ns:
        for i in range(args.tasks_per_n):
            kp, kt, kn = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, n), i), 3)
            p = task.sample_problem(kp, n=n, n_query=args.n_query)
            row = {"n": n, "i": i, "settings": {}}
            for name in args.methods:
                if old.get((n, i), {}).get(name) == settings[name]:
                    row.update(old[(n, i)]["scores"][name])
                else:
                    t = time.perf_counter()
                    pred = jax.block_until_ready(_predict(
                        name, task, models.get(name), p, kt if name == "type2_ml" else kn, args))
                    row.update(_scores(name, pred, p.query_y, time.perf_counter() - t))
                row["settings"][name] = settings[name]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if journal is not None:
                journal.write(json.dumps(row) + "\n")
                journal.flush()
    return report(rows, args)


def _load(path):
    if path in GP_PRETRAINED and not Path(path).exists():
        return load_pretrained(path)
    return load_predictor(path)


def _setting(name, args, model):
    """What a method's score on a data set depends on besides the data set."""
    out = f"seed={args.seed},n_query={args.n_query}"
    if name == "nuts":
        out += f",warmup={args.nuts_warmup},samples={args.nuts_samples}"
    if model is not None:
        out += f",model={Path(model.meta.get('path', '?')).resolve()}@{model.meta.get('step')}"
    return out


def _reused(paths):
    """{(n, i): {method: setting, "scores": {method: its row entries}}} from earlier runs (a
    JSON with "rows", or a rows.jsonl journal); rows without settings are not reused."""
    found = {}
    for path in paths:
        text = path.read_text()
        rows = (json.loads(text)["rows"] if path.suffix == ".json" else
                [json.loads(line) for line in text.splitlines() if line.strip()])
        for r in rows:
            entry = found.setdefault((r["n"], r["i"]), {"scores": {}})
            for m, setting in r.get("settings", {}).items():
                entry[m] = setting
                entry["scores"][m] = {k: v for k, v in r.items()
                                      if k == m or k.startswith(m + "_")}
    return found


def _scores(name, pred, query_y, seconds):
    y = jnp.asarray(query_y, pred.means.dtype if hasattr(pred, "means") else pred.logits.dtype)
    lo = np.asarray(pred.quantile(0.05), np.float64)
    hi = np.asarray(pred.quantile(0.95), np.float64)
    out = {name: float(-np.mean(np.asarray(pred.log_prob(y), np.float64))),
           name + "_cover90": float(np.mean((query_y >= lo) & (query_y <= hi))),
           name + "_seconds": seconds}
    if name == "nuts":
        out["nuts_problems"] = pred.info["problems"]
    return out


def _predict(name, task, model, p, key, args):
    if name == "oracle":
        return gp_oracle(task, p.hyper, p.context_x, p.context_y, p.query_x)
    if name == "type2_ml":
        return gp_type2_ml(key, task, p.context_x, p.context_y, p.query_x)
    if name == "nuts":
        return gp_nuts(key, task, p.context_x, p.context_y, p.query_x,
                       num_warmup=args.nuts_warmup, num_samples=args.nuts_samples, warn=False)
    if name == "quadrature":
        return gp_quadrature(task, p.context_x, p.context_y, p.query_x)
    if model.task.n_max < p.context_x.shape[0] or model.task.x_dim != task.x_dim:
        raise SystemExit(f"{name}: expected a model for {p.context_x.shape[0]} context points "
                         f"in {task.x_dim} dimensions; it takes up to {model.task.n_max} in "
                         f"{model.task.x_dim}")
    return model.predictive(p.context_x, p.context_y, p.query_x, standardize=False)


def latency(models, args, repeats=200):
    """Median wall time of one predictive call (50 context points, 100 queries) of each network
    (through PFNPredictor, validation and padding included) and of warm NUTS, side by side in
    one run: the networks' calls interleaved, then NUTS."""
    task = next(iter(models.values())).task
    p = task.sample_problem(jax.random.key(args.seed), n=50, n_query=100)
    times = {name: [] for name in models}
    for model in models.values():  # compile
        jax.block_until_ready(model.predictive(p.context_x, p.context_y, p.query_x))
    for _ in range(repeats):
        for name, model in models.items():
            t = time.perf_counter()
            jax.block_until_ready(model.predictive(p.context_x, p.context_y, p.query_x))
            times[name].append(time.perf_counter() - t)
    nuts_times = []
    for i in range(4):  # the first call compiles; the others are warm
        t = time.perf_counter()
        pred = gp_nuts(jax.random.key(i), task, p.context_x, p.context_y, p.query_x,
                       num_warmup=args.nuts_warmup, num_samples=args.nuts_samples, warn=False)
        jax.block_until_ready(pred.means)
        nuts_times.append(time.perf_counter() - t)
    nuts = float(np.median(nuts_times[1:]))
    out = {"context": 50, "queries": 100, "repeats": repeats, "nuts_warm_seconds_median": nuts,
           "nuts": {"num_warmup": args.nuts_warmup, "num_samples": args.nuts_samples,
                    "num_chains": 4}}
    for name, ts in times.items():
        out[f"{name}_seconds_median"] = float(np.median(ts))
        out[f"{name}_seconds_p90"] = float(np.quantile(ts, 0.9))
        out[f"{name}_speedup_over_nuts"] = nuts / float(np.median(ts))
    print(json.dumps(out))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    return out


def _mean_se(v):
    v = np.asarray(v, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def report(rows, args):
    """Per n: NLPD and 90% coverage of each method, and each network's paired gap to each
    Bayes-optimal reference scored (NUTS, quadrature; the oracle when neither ran), and the
    quadrature's gap to NUTS; one more row pools every n. The plot is relative to the first
    of those references."""
    methods = [m for m in METHODS if m in rows[0]]
    refs = [m for m in BAYES if m in methods] or ["oracle"]
    ref = refs[0]
    gaps = [(m, r) for r in refs for m in NETWORKS if m in methods]
    if set(BAYES) <= set(methods):
        gaps.append(("quadrature", "nuts"))
    summary = {}
    for n in [*args.ns, "all"]:
        sel = [r for r in rows if n == "all" or r["n"] == n]
        s = {}
        for m in methods:
            mean, se = _mean_se([r[m] for r in sel])
            s[m] = {"nlpd": mean, "se": se,
                    "cover90": float(np.mean([r[m + "_cover90"] for r in sel]))}
        for m, r0 in gaps:
            mean, se = _mean_se([r[m] - r[r0] for r in sel])
            s[f"{m}_minus_{r0}"] = {"mean": mean, "se": se}
        summary[n] = s
    lines = ["| n | " + " | ".join(f"{m} NLPD" for m in methods)
             + "".join(f" | {m} - {r0}" for m, r0 in gaps) + " | "
             + " | ".join(f"{m} 90% cover" for m in methods) + " |"]
    lines.append("|" + "---|" * (1 + 2 * len(methods) + len(gaps)))
    for n, s in summary.items():
        cells = [f"{s[m]['nlpd']:.3f} ± {s[m]['se']:.3f}" for m in methods]
        cells += [f"{s[g]['mean']:+.3f} ± {s[g]['se']:.3f}"
                  for g in (f"{m}_minus_{r0}" for m, r0 in gaps)]
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
            diffs = [np.array([r[m] - r[ref] for r in rows if r["n"] == n]) for n in ns]
            ax.errorbar(ns, [g.mean() for g in diffs],
                        yerr=[g.std(ddof=1) / np.sqrt(len(g)) for g in diffs], marker="o",
                        capsize=3, label=m)
        label = (f"{ref} (Bayes-optimal)" if ref in BAYES else
                 "oracle (true hyperparameters)")
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
