"""fb.infer(method="auto") on the shipped models: which path, why, and how long each stage took.

Usage:
    python benchmarks/infer.py [--n 200] [--n-far 20]

For each shipped model, `--n` held-out in-distribution problems (seed 20261123): the fraction
answered by the amortized path, the k-hat distribution, and the median seconds of the amortized
stage and of the k-hat check (warm: every size bucket compiled before timing). For
logistic_regression, `--n-far` problems whose covariates are scaled by 20 (far outside the
training range): the fraction that fell back to NUTS and its time. Writes
benchmarks/results/infer.json and infer.md, then docs/results.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import jax
import numpy as np

import flashbayes as fb
from flashbayes._padding import size_bucket
from flashbayes.reference import ConvergenceWarning

HELD_OUT_SEED = 20261123


def in_distribution(name: str, n: int) -> dict:
    model = fb.load_pretrained(name)
    task = model.task
    key = jax.random.fold_in(jax.random.key(HELD_OUT_SEED), 7)
    probs = [task.sample_problem(jax.random.fold_in(key, i)) for i in range(n)]
    for b in sorted({size_bucket(p.data.shape[0]) for p in probs}):
        # compile every bucket once (network, k-hat check and NUTS) before timing
        p = next(p for p in probs if size_bucket(p.data.shape[0]) == b)
        fb.infer(model, p.data, prior=p.prior, key=jax.random.key(0), khat_threshold=-1e9,
                 warn=False)
    paths, khats, t_amort, t_khat, t_nuts, t_total = [], [], [], [], [], []
    for i, p in enumerate(probs):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            post = fb.infer(model, p.data, prior=p.prior, key=jax.random.key(i))
        post.mean()
        t_total.append(time.perf_counter() - t0)
        info = post.info
        paths.append(info["path"])
        khats.append(info["khat"])
        t_amort.append(info["seconds"]["amortized"])
        t_khat.append(info["seconds"]["khat"])
        if "nuts" in info["seconds"]:
            t_nuts.append(info["seconds"]["nuts"])
    k = np.array(khats, np.float64)
    amort = np.array(paths) == "amortized"
    return {"model": name, "problems": n, "fraction_amortized": float(amort.mean()),
            "khat_median": float(np.median(k)), "khat_q90": float(np.quantile(k, 0.9)),
            "khat_max": float(k.max()),
            "amortized_stage_median_s": float(np.median(t_amort)),
            "khat_stage_median_s": float(np.median(t_khat)),
            "total_median_s_when_amortized": float(np.median(np.array(t_total)[amort]))
            if amort.any() else None,
            "nuts_stage_median_s": float(np.median(t_nuts)) if t_nuts else None,
            "per_problem_khat": khats}


def far_outside(n: int) -> dict:
    model = fb.load_pretrained("logistic_regression")
    task = model.task
    key = jax.random.fold_in(jax.random.key(HELD_OUT_SEED), 8)
    paths, reasons, t_nuts, rhat = [], [], [], []
    for i in range(n):
        p = task.sample_problem(jax.random.fold_in(key, i))
        x = np.array(p.data)
        x[:, : task.p] *= 20.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            post = fb.infer(model, x, prior=p.prior, key=jax.random.key(i))
        paths.append(post.info["path"])
        reasons.append(post.info["reason"])
        t_nuts.append(post.info["seconds"].get("nuts", float("nan")))
        if post.rhat is not None:
            rhat.append(float(np.max(post.rhat)))
    return {"model": "logistic_regression", "problems": n, "covariate_scale": 20.0,
            "fraction_nuts": float(np.mean(np.array(paths) == "nuts")),
            "nuts_stage_median_s": float(np.nanmedian(t_nuts)),
            "nuts_max_rhat": float(np.max(rhat)) if rhat else None,
            "example_reason": reasons[0]}


def to_markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']}; JAX {res['jax']}; {res['date']}.", "",
             "| model | problems | answered amortized | k-hat median / 90 % / max | "
             "amortized stage | k-hat check | total when amortized | NUTS stage when used |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["in_distribution"]:
        tot = r["total_median_s_when_amortized"]
        nuts = r["nuts_stage_median_s"]
        lines.append(
            f"| {r['model']} | {r['problems']} | {100 * r['fraction_amortized']:.1f} % | "
            f"{r['khat_median']:.2f} / {r['khat_q90']:.2f} / {r['khat_max']:.2f} | "
            f"{1e3 * r['amortized_stage_median_s']:.2f} ms | "
            f"{1e3 * r['khat_stage_median_s']:.2f} ms | "
            + (f"{1e3 * tot:.2f} ms | " if tot is not None else "- | ")
            + (f"{nuts:.2f} s |" if nuts is not None else "- |"))
    f = res["far_outside"]
    lines += ["", f"Far outside the training range (logistic_regression, covariates x "
                  f"{f['covariate_scale']:.0f}, {f['problems']} problems): "
                  f"{100 * f['fraction_nuts']:.0f} % answered by NUTS (median "
                  f"{f['nuts_stage_median_s']:.2f} s, max R-hat {f['nuts_max_rhat']:.3f}). "
                  f"Reason given: \"{f['example_reason']}\"."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--n-far", type=int, default=20)
    args = parser.parse_args()
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d"),
           "in_distribution": [in_distribution(name, args.n) for name in
                               ("gmm_linear", "gaussian_variance", "logistic_regression")],
           "far_outside": far_outside(args.n_far)}
    md = to_markdown(res)
    from _docs import save

    save("infer", res, md)
    print(md)


if __name__ == "__main__":
    main()
