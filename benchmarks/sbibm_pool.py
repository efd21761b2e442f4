"""Pool the observations of our own of several sbibm runs per task (the same estimators scored
on distinct observations), under the published C2ST protocol.

Usage:
    python benchmarks/sbibm_pool.py --runs sbibm_1e4_full sbibm_1e4_fresh --name sbibm_1e4_new

Reads benchmarks/results/RUN.json for each run (written by benchmarks/sbibm.py with --new K and
without --c2st-early-stopping) and writes benchmarks/results/NAME.json and NAME.md: per task the
number of observations, mean ± standard error of the protocol's and the quick C2ST, and the mean
over tasks. Runs that trained other estimators, or that share an observation, are refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashbayes.benchmarks import _sbibm_bench as bench

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="names of results/NAME.json")
    ap.add_argument("--name", default="sbibm_new_pooled")
    args = ap.parse_args()
    results = [json.loads((RESULTS / f"{run}.json").read_text()) for run in args.runs]
    pooled = bench.pool_new(results)
    from _docs import save

    table = bench.pooled_markdown(pooled, args.runs)
    save(args.name, {"runs": args.runs, **pooled}, table)
    print(table)


if __name__ == "__main__":
    main()
