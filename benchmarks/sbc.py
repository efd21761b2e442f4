"""Calibration of the shipped models: SBC, expected coverage and TARP, and the same for a posterior
whose covariance is shrunk by half (which every check must reject).

Usage:
    python benchmarks/sbc.py [--sims 1000]

Held-out simulations use seed 20261123. Writes benchmarks/results/sbc.json and sbc.md, then
docs/results.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

import flashbayes as fb
from flashbayes.diagnostics import expected_coverage, sbc, scale_covariance, tarp

HELD_OUT_SEED = 20261123
MODELS = ("gmm_linear", "gaussian_variance", "logistic_regression")


def check(model, key, n_sims: int) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    t0 = time.perf_counter()
    s = sbc(k1, model, n_sims=n_sims)
    c = expected_coverage(k2, model, n_sims=n_sims)
    t = tarp(k3, model, n_sims=n_sims)
    return {"sbc_passed": bool(s.passed), "sbc_min_p": float(np.min(s.p_values)),
            "sbc_p_values": dict(zip(s.statistics, map(float, s.p_values))),
            "sbc_threshold": s.level / len(s.statistics),
            "coverage_passed": bool(c.passed), "coverage_max_dev": c.max_deviation,
            "coverage_bound": c.bound, "coverage_signed_area": c.signed_area,
            "tarp_passed": bool(t.passed), "tarp_max_dev": t.max_deviation,
            "tarp_bound": t.bound, "seconds": time.perf_counter() - t0}


def to_markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']}; JAX {res['jax']}; {res['date']}; {res['n_sims']} "
             "simulations per check, 99 posterior draws each.", "",
             "| model | posterior | SBC min p (Bonferroni threshold) | SBC | coverage max dev "
             "(bound) | coverage | TARP max dev (bound) | TARP |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ok = {True: "pass", False: "**flagged**"}
        lines.append(
            f"| {r['model']} | {r['posterior']} | {r['sbc_min_p']:.3g} "
            f"({r['sbc_threshold']:.3g}) | {ok[r['sbc_passed']]} | "
            f"{r['coverage_max_dev']:.3f} ({r['coverage_bound']:.3f}) | "
            f"{ok[r['coverage_passed']]} | {r['tarp_max_dev']:.3f} ({r['tarp_bound']:.3f}) | "
            f"{ok[r['tarp_passed']]} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sims", type=int, default=1000)
    args = parser.parse_args()
    rows = []
    key = jax.random.key(HELD_OUT_SEED)
    for i, name in enumerate(MODELS):
        model = fb.load_pretrained(name)
        for j, (label, m) in enumerate((("shipped DT", model),
                                        ("DT, covariance x 0.5", scale_covariance(model, 0.5)))):
            row = check(m, jax.random.fold_in(key, 10 * i + j), args.sims)
            rows.append({"model": name, "posterior": label, **row})
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d"), "n_sims": args.sims, "rows": rows}
    md = to_markdown(res)
    from _docs import save

    save("sbc", res, md)
    print(md)


if __name__ == "__main__":
    main()
