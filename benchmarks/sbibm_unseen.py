"""NPE on observations of our own: the same estimators on the shared and on new observations.

Usage:
    python benchmarks/sbibm_unseen.py [--tasks gaussian_linear ...] [--budget 10000]
                                      [--new 5] [--name sbibm_unseen_1e4] [--merge]

The sbibm targets must hold on observations the estimator was not tuned to. For each task this
trains the default estimator with the seed `benchmarks/sbibm.py` uses for the same task and
budget, then scores by C2ST (quick: classifier with early stopping) 10,000 of its draws against
10,000 reference draws from `task.reference_posterior` (the closed form for gaussian_linear,
gaussian_linear_uniform and gaussian_mixture; a refined grid for sir; NUTS for bernoulli_glm
and slcp), on the shared observations 1-5 and on `--new` observations of our own (theta drawn
from the prior, x from the simulator, seed 31415 + task index). On the shared observations the
reference draws are also scored against the shared reference draws ("reference check": near
0.5 when both are right). Writes benchmarks/results/NAME.json and NAME.md (with `--merge`,
keeping the rows of the other tasks).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

import flashbayes as fb
from flashbayes.benchmarks import _sbibm_bench as bench
from flashbayes.sbi._reference import reference_method

RESULTS = Path(__file__).resolve().parent / "results"
OBS_SEED = bench.OBS_SEED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = fb.sbi.tasks.names()
    ap.add_argument("--tasks", nargs="+", default=names, choices=names)
    ap.add_argument("--budget", type=int, default=10_000)
    ap.add_argument("--new", type=int, default=5)
    ap.add_argument("--name", default="sbibm_unseen_1e4")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of other tasks already in NAME.json (same budget and "
                         "number of new observations) and replace those of --tasks")
    args = ap.parse_args()
    if args.new < 2:
        ap.error(f"--new: expected at least 2 new observations (for a standard error); got "
                 f"{args.new}")
    rows = []
    for name in args.tasks:
        task = fb.sbi.tasks.get(name)
        seed = bench.training_seed(name, args.budget)
        t0 = time.perf_counter()
        est = fb.sbi.train_npe(task.prior(), task.simulator, args.budget,
                               key=jax.random.key(seed), parameter_names=list(task.parameter_names),
                               **task.npe_settings())
        train_s = time.perf_counter() - t0
        new_x = bench.new_observations(name, args.new)
        observations = [("shared", k, np.asarray(fb.sbi.tasks.load_observation(name, k)))
                        for k in range(1, 6)]
        observations += [("new", j + 1, x) for j, x in enumerate(new_x)]
        scores = []
        for kind, k, x in observations:
            key = jax.random.fold_in(jax.random.key(seed), 1000 * (kind == "new") + k)
            k_ref, k_draw = jax.random.split(key)
            t_ref = time.perf_counter()
            ref = task.reference_posterior(k_ref, x, 10_000)
            entry = {"kind": kind, "observation": k, "x": x.tolist(),
                     "reference_s": time.perf_counter() - t_ref}
            draws = np.asarray(est.posterior(x).sample(k_draw, 10_000))
            entry["c2st"] = fb.diagnostics.c2st(ref, draws, seed=1, early_stopping=True)
            if kind == "shared":
                shared_ref = np.asarray(fb.sbi.tasks.load_reference_samples(name, k))
                entry["reference_check"] = fb.diagnostics.c2st(shared_ref, ref, seed=1,
                                                               early_stopping=True)
            scores.append(entry)
            print(name, kind, k, round(entry["c2st"], 3), entry.get("reference_check"),
                  flush=True)
        shared = [s["c2st"] for s in scores if s["kind"] == "shared"]
        new = [s["c2st"] for s in scores if s["kind"] == "new"]
        checks = [s["reference_check"] for s in scores if s["kind"] == "shared"]
        rows.append({"task": name, "budget": args.budget, "seed": seed, "train_s": train_s,
                     "reference_check_max": float(np.max(checks)),
                     "shared_mean": float(np.mean(shared)), "new_mean": float(np.mean(new)),
                     "new_se": float(np.std(new, ddof=1) / np.sqrt(len(new))),
                     "published_npe": bench.published(name, args.budget, range(1, 6), "NPE"),
                     "scores": scores})
    lines = ["# NPE on observations of our own", "",
             f"Default estimator at {args.budget} simulations (seeds as in benchmarks/sbibm.py); "
             "quick C2ST of 10,000 draws against 10,000 draws of `task.reference_posterior`. "
             "\"shared\": observations 1-5; \"new\": observations drawn from the prior "
             f"predictive (seed {OBS_SEED} + task index). Reference check: the largest C2ST of "
             "our reference draws against the shared ones over observations 1-5.", "",
             "| task | reference | reference check | C2ST shared 1-5 | C2ST new (± se) "
             "| published NPE, shared 1-5 |", "|---|---|---|---|---|---|"]
    if args.merge and (RESULTS / f"{args.name}.json").exists():
        import json

        old = json.loads((RESULTS / f"{args.name}.json").read_text())
        if old.get("new") != args.new or old.get("obs_seed") != OBS_SEED:
            ap.error(f"--merge: {args.name}.json holds {old.get('new')} new observations from "
                     f"seed {old.get('obs_seed')}; this run {args.new} from {OBS_SEED}")
        fresh = {r["task"]: r for r in rows}
        kept = {r["task"]: r for r in old["rows"]
                if r["task"] not in fresh and r["budget"] == args.budget}
        rows = [fresh.get(t) or kept[t] for t in names if t in fresh or t in kept]
    for r in rows:
        pub = "—" if r["published_npe"] is None else f"{r['published_npe']:.3f}"
        kind = reference_method(fb.sbi.tasks.get(r["task"]))
        lines.append(f"| {r['task']} | {kind} | {r['reference_check_max']:.3f} | "
                     f"{r['shared_mean']:.3f} | {r['new_mean']:.3f} ± {r['new_se']:.3f} | {pub} |")
    from _docs import save

    table = "\n".join(lines) + "\n"
    save(args.name, {"rows": rows, "new": args.new, "obs_seed": OBS_SEED}, table)
    print(table)


if __name__ == "__main__":
    main()
