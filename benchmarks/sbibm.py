"""NPE on the sbibm tasks: C2ST against the reference posteriors, beside the published NPE.

Usage:
    python benchmarks/sbibm.py [--tasks gaussian_linear slcp] [--budgets 1000]
                               [--head nsf] [--observations 1 2 3 4 5] [--max-epochs 1000]
                               [--c2st-draws 10000] [--c2st-early-stopping]
                               [--name sbibm_smoke]

For each task and budget one estimator is trained (single round, amortized: the same network
serves every observation) with `fb.sbi.train_npe` on the task's prior and simulator; for each
observation 10,000 posterior draws are compared with the 10,000 reference draws by C2ST
(`fb.diagnostics.c2st`: z-scored on the reference, MLP with two hidden layers of 10 d, 5-fold
cross-validation, seed 1; `--c2st-draws` uses fewer draws of each for a quick run). The published
NPE column is the mean over observations 1-5 of the paper's NPE runs (`main_paper.csv`; for
gaussian_mixture the authors' rerun with the fixed simulator). Also reported: training time, epochs
and the time of one call drawing 10,000 samples (after a first, compiling call).
Writes benchmarks/results/NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

import flashbayes as fb
from flashbayes._shared import shared_benchmarks_dir

SEED = 20261123
RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_LABELS = {1000: "10³", 10_000: "10⁴", 100_000: "10⁵"}


def published_npe(task: str, budget: int, observations: list[int]) -> float | None:
    """Mean published NPE C2ST over the given observations (None when the budget is not there)."""
    label = BUDGET_LABELS.get(budget)
    if label is None:
        return None
    folder = shared_benchmarks_dir("sbibm") / "published_results"
    fname = "gaussian_mixture_rerun.csv" if task == "gaussian_mixture" else "main_paper.csv"
    with open(folder / fname, newline="") as fh:
        rows = [r for r in csv.DictReader(fh)
                if r["task"] == task and r["algorithm"] == "NPE" and r["num_simulations"] == label
                and int(r["num_observation"]) in observations]
    return float(np.mean([float(r["C2ST"]) for r in rows])) if rows else None


def run_one(task_name: str, budget: int, head: str, observations: list[int], max_epochs: int,
            c2st_draws: int, seed: int, early_stopping: bool = False) -> dict:
    task = fb.sbi.tasks.get(task_name)
    t0 = time.perf_counter()
    est = fb.sbi.train_npe(task.prior(), task.simulator, budget, key=jax.random.key(seed),
                           head=head, max_epochs=max_epochs,
                           parameter_names=list(task.parameter_names))
    train_s = time.perf_counter() - t0
    per_obs = []
    for k in observations:
        x_obs = fb.sbi.tasks.load_observation(task_name, k)
        ref = fb.sbi.tasks.load_reference_samples(task_name, k)
        post = est.posterior(x_obs)
        post.sample(jax.random.key(0), 10_000).block_until_ready()  # compile
        t1 = time.perf_counter()
        draws = np.asarray(post.sample(jax.random.key(seed + k), 10_000).block_until_ready())
        sample_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        score = fb.diagnostics.c2st(ref[:c2st_draws], draws[:c2st_draws], seed=1,
                                    early_stopping=early_stopping)
        per_obs.append({"observation": k, "c2st": score, "sample_10k_s": sample_s,
                        "c2st_s": time.perf_counter() - t2,
                        "finite": bool(np.isfinite(draws).all())})
    return {"task": task_name, "budget": budget, "head": head, "train_s": train_s,
            "epochs": est.config["epochs"], "num_simulations_ok": est.config["num_simulations"],
            "c2st_mean": float(np.mean([r["c2st"] for r in per_obs])),
            "published_npe": published_npe(task_name, budget, observations),
            "observations": per_obs}


def markdown(rows: list[dict], args) -> str:
    lines = ["# NPE on sbibm", "",
             f"Head `{args.head}`, observations {args.observations}, C2ST on "
             f"{args.c2st_draws} draws of each set"
             f"{' (classifier with early stopping)' if args.c2st_early_stopping else ''}.", "",
             "| task | simulations | C2ST (ours) | published NPE (same obs.) | train s | epochs "
             "| 10k draws ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        pub = "—" if r["published_npe"] is None else f"{r['published_npe']:.3f}"
        ms = 1000 * np.median([o["sample_10k_s"] for o in r["observations"]])
        lines.append(f"| {r['task']} | {r['budget']} | {r['c2st_mean']:.3f} | {pub} | "
                     f"{r['train_s']:.1f} | {r['epochs']} | {ms:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=fb.sbi.tasks.names())
    ap.add_argument("--budgets", nargs="+", type=int, default=[1000])
    ap.add_argument("--head", default="nsf", choices=["gmm", "nsf", "maf"])
    ap.add_argument("--observations", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--max-epochs", type=int, default=1000)
    ap.add_argument("--c2st-draws", type=int, default=10_000)
    ap.add_argument("--c2st-early-stopping", action="store_true",
                    help="stop each C2ST fit on a 10 %% validation split (much faster; not the "
                         "published protocol)")
    ap.add_argument("--name", default="sbibm")
    args = ap.parse_args()
    rows = []
    for i, name in enumerate(args.tasks):
        for j, budget in enumerate(args.budgets):
            rows.append(run_one(name, budget, args.head, args.observations, args.max_epochs,
                                args.c2st_draws, SEED + 100 * i + j, args.c2st_early_stopping))
            r = rows[-1]
            print(f"{name} {budget}: C2ST {r['c2st_mean']:.3f} (published "
                  f"{r['published_npe']}), train {r['train_s']:.1f} s", flush=True)
    result = {"args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
