"""NPE on the sbibm tasks: C2ST against the reference posteriors, beside the published NPE/SNPE.

Usage:
    python benchmarks/sbibm.py [--tasks gaussian_linear slcp] [--budgets 1000]
                               [--head nsf+maf] [--ensemble 5] [--observations 1 2 3 4 5]
                               [--max-epochs 1000]
                               [--c2st-draws 10000] [--c2st-early-stopping] [--new 0]
                               [--obs-seed 31415]
                               [--name sbibm_smoke]

The same run as `flashbayes bench sbibm` (see `flashbayes.benchmarks._sbibm_bench`): one
single-round, amortized estimator per task and budget; for each observation 10,000 posterior
draws against the 10,000 reference draws by C2ST (MLP with two hidden layers of 10 d, 5-fold;
`--c2st-draws` uses fewer of each for a quick run). Also reported: training time, epochs and the
time of one call drawing 10,000 samples (after a first, compiling call). `--new K` also scores
each estimator on K observations of our own (C2ST against `task.reference_posterior`, under the
protocol unless --c2st-early-stopping, and quick).
Writes benchmarks/results/NAME.json and NAME.md; NAME.journal.jsonl lets a rerun continue.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flashbayes as fb
from flashbayes.benchmarks import _sbibm_bench as bench

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=fb.sbi.tasks.names())
    ap.add_argument("--budgets", nargs="+", type=int, default=[1000])
    ap.add_argument("--head", default=None,
                    help="nsf, maf, gmm or several joined by '+' (default: each task's own, "
                         "nsf+maf but for slcp's nsf)")
    ap.add_argument("--ensemble", type=int, default=5, help="networks trained per head")
    ap.add_argument("--observations", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--max-epochs", type=int, default=1000)
    ap.add_argument("--c2st-draws", type=int, default=10_000)
    ap.add_argument("--c2st-early-stopping", action="store_true",
                    help="stop each C2ST fit on a 10 %% validation split (much faster; not the "
                         "published protocol)")
    ap.add_argument("--new", type=int, default=0,
                    help="also score K observations of our own per task (C2ST under the "
                         "protocol, and quick)")
    ap.add_argument("--obs-seed", type=int, default=bench.OBS_SEED,
                    help="seed of the observations of our own (another one: a fresh set)")
    ap.add_argument("--seed", type=int, default=bench.SEED)
    ap.add_argument("--name", default="sbibm")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    result = bench.run(args.tasks, args.budgets, head=args.head, ensemble=args.ensemble,
                       observations=args.observations,
                       max_epochs=args.max_epochs, c2st_draws=args.c2st_draws,
                       early_stopping=args.c2st_early_stopping, seed=args.seed, new=args.new,
                       obs_seed=args.obs_seed,
                       journal=RESULTS / f"{args.name}.journal.jsonl",
                       progress=lambda m: print(f"running {m}", flush=True))
    from _docs import save

    table = bench.markdown(result)
    save(args.name, result, table)  # also recomposes docs/results.md
    print(table)


if __name__ == "__main__":
    main()
