"""Which NPE head: held-out log density on fresh simulations, no observation involved.

Usage:
    python benchmarks/npe_selection.py [--tasks slcp sir] [--budget 10000]

For each sbibm task: 10^4 training simulations (seed 777) and 20,000 fresh test simulations
(seed 888). Each variant is trained (training keys 100, 101, ...) and scored by the mean
negative log density -log q(theta | x) of the test pairs, in the parameters' own units (the
support bijection's Jacobian included, so every variant is on one scale). Variants: one MAF, one
MAF with two learning-rate cuts, one NSF with two cuts, five of each mixed with equal weights;
then the ten networks weighted by stacking (EM on the weights, fitted on the even test pairs and
scored on the odd ones); and, for box priors, single networks under the flat interval map
(`--variants` picks some). Appends one JSON line per variant to
benchmarks/results/npe_selection.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from flashbayes import sbi
from flashbayes.sbi._npe import _stacking_weights

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = [
    {"label": "maf", "head": "maf", "lr_reductions": 0},
    {"label": "maf_lr2", "head": "maf", "lr_reductions": 2},
    {"label": "nsf_lr2", "head": "nsf", "lr_reductions": 2},
    {"label": "maf_lr2_ens5", "head": "maf", "lr_reductions": 2, "members": 5},
    {"label": "nsf_lr2_ens5", "head": "nsf", "lr_reductions": 2, "members": 5},
    # the box priors' bijection: linear inside the box (interval_map="flat") against the logit
    {"label": "nsf_lr2_flat8", "head": "nsf", "lr_reductions": 2, "interval_map": "flat",
     "interval_width": 8.0},
    {"label": "maf_lr2_flat8", "head": "maf", "lr_reductions": 2, "interval_map": "flat",
     "interval_width": 8.0},
    {"label": "nsf_lr2_flat16", "head": "nsf", "lr_reductions": 2, "interval_map": "flat",
     "interval_width": 16.0},
    {"label": "nsf_lr2_flat4", "head": "nsf", "lr_reductions": 2, "interval_map": "flat",
     "interval_width": 4.0},
    {"label": "maf_lr2_flat4", "head": "maf", "lr_reductions": 2, "interval_map": "flat",
     "interval_width": 4.0},
    # counts (sir): the data through a variance-stabilising transform before z-scoring
    {"label": "nsf_lr2_sqrt", "head": "nsf", "lr_reductions": 2, "x_transform": "sqrt"},
    {"label": "maf_lr2_sqrt", "head": "maf", "lr_reductions": 2, "x_transform": "sqrt"},
    {"label": "nsf_lr2_log1p", "head": "nsf", "lr_reductions": 2, "x_transform": "log1p"},
]
X_TRANSFORMS = {"identity": lambda x: x, "sqrt": np.sqrt, "log1p": np.log1p}


def pair_log_q(est, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log q(theta_i | x_i) for test pairs, in theta's units."""
    tr, st = est._transform, est.stats

    @eqx.filter_jit
    def f(net, theta, x):
        u = tr.inverse(theta)
        z = (u - st["theta_mean"]) / st["theta_std"]
        xz = (x - st["x_mean"]) / st["x_std"]
        lp = jax.vmap(net.log_prob)(z, xz) - jnp.sum(jnp.log(st["theta_std"]))
        return lp - jax.vmap(tr.log_det)(u)

    return np.concatenate([np.asarray(f(est.net, jnp.asarray(theta[i:i + 5000]),
                                        jnp.asarray(x[i:i + 5000])))
                           for i in range(0, len(theta), 5000)])


def exact_nll(task: str, theta: np.ndarray, x: np.ndarray) -> float | None:
    """Mean -log p(theta | x) of the test pairs under the exact posterior (closed-form tasks)."""
    from scipy.stats import norm

    theta, x = np.asarray(theta, np.float64), np.asarray(x, np.float64)
    if task == "gaussian_linear":  # N(x / 2, 0.05 I)
        return float(-norm.logpdf(theta, x / 2, np.sqrt(0.05)).sum(1).mean())
    if task == "gaussian_linear_uniform":  # N(x, 0.1 I) truncated to [-1, 1]^10
        s = np.sqrt(0.1)
        mass = norm.cdf((1 - x) / s) - norm.cdf((-1 - x) / s)
        return float(-(norm.logpdf(theta, x, s) - np.log(mass)).sum(1).mean())
    if task == "gaussian_mixture":  # 0.5 N(x, I) + 0.5 N(x, 0.01 I) on [-10, 10]^2
        lp, mass = [], []
        for s in (1.0, 0.1):
            lp.append(norm.logpdf(theta, x, s).sum(1))
            mass.append(np.prod(norm.cdf((10 - x) / s) - norm.cdf((-10 - x) / s), 1))
        return float(-(logsumexp(np.stack(lp), axis=0) - np.log(mass[0] + mass[1])).mean())
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=sbi.tasks.names())
    ap.add_argument("--budget", type=int, default=10_000)
    ap.add_argument("--variants", nargs="+", default=[v["label"] for v in VARIANTS],
                    choices=[v["label"] for v in VARIANTS])
    args = ap.parse_args()
    out = open(RESULTS / "npe_selection.jsonl", "a")
    for name in args.tasks:
        task = sbi.tasks.get(name)
        prior = task.prior()
        train = sbi.simulate(prior, task.simulator, args.budget, seed=777, backend="jax").valid()
        test = sbi.simulate(prior, task.simulator, 20_000, seed=888, backend="jax").valid()
        theta_t, x_t = np.asarray(test[0], np.float32), np.asarray(test[1], np.float32)
        member_lps = {}
        exact = exact_nll(name, theta_t, x_t)
        if exact is not None:
            rec = {"task": name, "budget": args.budget, "label": "exact_posterior", "nll": exact}
            print(json.dumps(rec), flush=True)
            out.write(json.dumps(rec) + "\n")
        for v in [v for v in VARIANTS if v["label"] in args.variants]:
            t0, lps, epochs = time.time(), [], []
            tx = X_TRANSFORMS[v.get("x_transform", "identity")]
            for m in range(v.get("members", 1)):
                est = sbi.train_npe(prior, (np.asarray(train[0]), tx(np.asarray(train[1]))),
                                    key=jax.random.key(100 + m), head=v["head"], ensemble=1,
                                    lr_reductions=v["lr_reductions"],
                                    interval_map=v.get("interval_map", "logit"),
                                    interval_width=v.get("interval_width", 8.0))
                lps.append(pair_log_q(est, theta_t, tx(x_t)))
                epochs.append(est.config["epochs"])
            lps = np.stack(lps)
            member_lps[v["label"]] = lps
            mix = logsumexp(lps, axis=0) - np.log(len(lps))
            rec = {"task": name, "budget": args.budget, "label": v["label"],
                   "nll": float(-np.mean(mix)), "se": float(np.std(mix) / np.sqrt(len(mix))),
                   "single_nll": [float(-np.mean(lp)) for lp in lps],
                   "train_s": time.time() - t0, "epochs": epochs}
            print(json.dumps(rec), flush=True)
            out.write(json.dumps(rec) + "\n")
            out.flush()
        if not {"nsf_lr2_ens5", "maf_lr2_ens5"} <= set(member_lps):
            continue
        both = np.concatenate([member_lps["nsf_lr2_ens5"], member_lps["maf_lr2_ens5"]])
        w = _stacking_weights(both[:, ::2])
        held = both[:, 1::2]
        rec = {"task": name, "budget": args.budget, "label": "stacked_5nsf_5maf",
               "nll": float(-np.mean(logsumexp(np.log(w)[:, None] + held, axis=0))),
               "equal_weights_nll": float(-np.mean(logsumexp(held, axis=0) - np.log(len(w)))),
               "weights": w.tolist()}
        print(json.dumps(rec), flush=True)
        out.write(json.dumps(rec) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
