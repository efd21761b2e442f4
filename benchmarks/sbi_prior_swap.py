"""Prior swap for simulation-based inference: the Distribution Transformer route against importance
re-weighting of an NPE posterior, on the sbibm simulators whose posterior under any GMM prior is
exact: gaussian_linear and gaussian_mixture.

Usage:
    python benchmarks/sbi_prior_swap.py --model CHECKPOINT [--npe ESTIMATOR] [--problems 100]
        [--name sbi_prior_swap]

Held-out problems (seed 20261206, never used in training): a prior from the family of the
model's task (`sbi_gaussian_linear` or `sbi_gaussian_mixture`: 1-5 components, docs/tasks.md),
theta from it, x from the simulator. For the translation-equivariant gaussian_linear, whose
training priors are centred, each problem is moved by a random shift of up to 1.5 prior sd per
coordinate.

- DT: `model.posterior(prior, x)`, one forward pass; KL(exact || DT) by Monte Carlo with 4,000
  exact draws.
- Importance: the default NPE estimator (trained at 10^4 under the sbibm prior; with `--npe`,
  the one saved there) re-weighted to the new prior with 20,000 draws (`fb.sbi.prior_swap`);
  refused when its PSIS k-hat is above 0.7 or more than 1 % of the new prior's mass lies
  outside the old prior's support.
- No swap: the NPE posterior as it is (the answer under the wrong prior).

Each gets a quick C2ST (early stopping) of 2,000 draws against 2,000 exact draws on the first
`--c2st-problems` problems, and the error of its posterior mean in units of the exact posterior
standard deviation (the largest over the coordinates). For gaussian_linear, on sbibm's own prior
(a 1-component GMM) and observations 1-5, the DT's draws get the quick C2ST against the
reference samples. Writes benchmarks/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

import flashbayes as fb
from flashbayes.benchmarks import _sbibm_bench as bench
from flashbayes.diagnostics import c2st, kl_divergence
from flashbayes.sbi._swap import MAX_OUTSIDE, _mass_outside

SEED = 20261206


def shifted(p, task, key):
    """The problem moved by c = sd * U[-1.5, 1.5]^d (prior, theta and x alike): the task's
    training priors are centred (the model is translation equivariant), users' are not."""
    c = task.sd * np.asarray(jax.random.uniform(key, (task.theta_dim,), minval=-1.5,
                                                maxval=1.5), np.float64)
    prior = fb.GMM(weights=p.prior.weights, means=np.asarray(p.prior.means) + c,
                   scale_tril=p.prior.scale_tril)
    return type(p)(prior=prior, theta=p.theta + c, data=p.data + c)


def mean_error(draws_or_mean, exact: fb.GMM) -> float:
    """Largest |mean - exact mean| / exact sd over the coordinates."""
    m = np.asarray(draws_or_mean, np.float64)
    if m.ndim == 2:
        m = m.mean(0)
    sd = np.sqrt(np.diag(np.asarray(exact.cov(), np.float64)))
    return float(np.max(np.abs(m - np.asarray(exact.mean(), np.float64)) / sd))


def kl_exact_to(q: fb.GMM, exact: fb.GMM, key) -> float:
    return kl_divergence(key, exact, q, n=4000)[0]


def load_or_train_npe(path, name):
    task = fb.sbi.tasks.get(name)
    if path:
        return fb.sbi.load_npe(path)
    return fb.sbi.train_npe(task.prior(), task.simulator, 10_000,
                            key=jax.random.key(bench.training_seed(name, 10_000)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="sbi_gaussian_linear DT checkpoint")
    ap.add_argument("--npe", default=None, help="saved NPE estimator (else trained at 10^4)")
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--c2st-problems", type=int, default=30)
    ap.add_argument("--name", default="sbi_prior_swap")
    args = ap.parse_args()
    model = fb.load(args.model)
    task = model.task
    if not getattr(task, "has_exact", False) or not task.name.startswith("sbi_"):
        raise SystemExit(f"--model: expected a prior-swap model of a task with a closed-form "
                         f"posterior (sbi_gaussian_linear, sbi_gaussian_mixture); got {task.name}")
    sbi_task = task.sbi_task
    est = load_or_train_npe(args.npe, sbi_task.name)
    old_prior = sbi_task.prior()
    rows = []
    key = jax.random.key(SEED)
    for i in range(args.problems):
        kp, kq, kk, ks, kc = jax.random.split(jax.random.fold_in(key, i), 5)
        p = task.sample_problem(kp, n=1)
        if task.translation_equivariant:
            p = shifted(p, task, jax.random.fold_in(kp, 1))
        exact = task.exact_posterior(p.prior, p.data)
        t0 = time.perf_counter()
        q = model.posterior(p.prior, p.data)
        t_dt = time.perf_counter() - t0
        npe_post = est.posterior(p.data[0])
        t0 = time.perf_counter()
        swapped = fb.sbi.prior_swap(npe_post, old_prior, p.prior, key=kk, n=20_000, check=False)
        t_is = time.perf_counter() - t0
        outside = _mass_outside(old_prior, p.prior, kk, 20_000)
        row = {"k": p.prior.n_components, "kl_dt": kl_exact_to(q, exact, kq),
               "kl_prior": kl_exact_to(p.prior, exact, kq),
               "mean_err_dt": mean_error(q.mean(), exact),
               "mean_err_is": mean_error(swapped.mean(), exact),
               "mean_err_noswap": mean_error(npe_post.sample(ks, 20_000), exact),
               "khat": float(swapped.psis.khat), "khat_passed": bool(swapped.psis.passed),
               "outside": outside,
               "is_passed": bool(swapped.psis.passed) and outside <= MAX_OUTSIDE,
               "ess": float(swapped.psis.ess), "seconds_dt": t_dt, "seconds_is": t_is}
        if i < args.c2st_problems:
            ref = np.asarray(exact.sample(kc, 2000))
            row["c2st_dt"] = c2st(ref, np.asarray(q.sample(ks, 2000)), early_stopping=True)
            row["c2st_is"] = c2st(ref, swapped.sample(ks, 2000), early_stopping=True)
            row["c2st_noswap"] = c2st(ref, np.asarray(npe_post.sample(ks, 2000)),
                                      early_stopping=True)
        rows.append(row)
        print(i, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
              flush=True)
    # sbibm's own prior and observations (where that prior is a Gaussian)
    shared = [] if sbi_task.name != "gaussian_linear" else shared_observations(model, est)
    write(rows, shared, args, sbi_task.name)


def shared_observations(model, est):
    prior0 = fb.GMM(weights=[1.0], means=[np.zeros(10)], scale_tril=[np.sqrt(0.1) * np.eye(10)])
    shared = []
    for k in range(1, 6):
        x = fb.sbi.tasks.load_observation("gaussian_linear", k)
        ref = fb.sbi.tasks.load_reference_samples("gaussian_linear", k)
        q = model.posterior(prior0, x[None])
        draws = np.asarray(q.sample(jax.random.key(k), ref.shape[0]))
        npe_draws = np.asarray(est.posterior(x).sample(jax.random.key(k), ref.shape[0]))
        shared.append({"observation": k,
                       "c2st_dt": c2st(ref, draws, early_stopping=True),
                       "c2st_npe": c2st(ref, npe_draws, early_stopping=True)})
        print(shared[-1], flush=True)
    return shared


def _m(rows, key, sel=None):
    v = [r[key] for r in rows if key in r and (sel is None or sel(r))]
    return (float(np.mean(v)), float(np.median(v)), len(v)) if v else (float("nan"),) * 2 + (0,)


def write(rows, shared, args, name) -> None:
    passed = [r for r in rows if r["is_passed"]]
    summary = {
        "problems": len(rows), "seed": SEED, "model": os.path.basename(os.path.normpath(
            args.model)),
        "kl_dt_mean_median": _m(rows, "kl_dt")[:2],
        "kl_prior_mean_median": _m(rows, "kl_prior")[:2],
        "is_accepted_fraction": len(passed) / len(rows),
        "dt_ms_median": 1e3 * float(np.median([r["seconds_dt"] for r in rows])),
        "is_ms_median": 1e3 * float(np.median([r["seconds_is"] for r in rows])),
    }
    if shared:
        summary["shared_c2st_dt_mean"] = float(np.mean([s["c2st_dt"] for s in shared]))
        summary["shared_c2st_npe_mean"] = float(np.mean([s["c2st_npe"] for s in shared]))
    lines = [
        f"# Prior swap for SBI: {name} under new GMM priors", "",
        f"{len(rows)} held-out problems (seed {SEED}); priors from the family of "
        f"`sbi_{name}`. Importance re-weighting of the NPE posterior is accepted on "
        f"{len(passed)} of {len(rows)} (PSIS k-hat <= 0.7 on "
        f"{sum(r['khat_passed'] for r in rows)}, and at most 1 % of the new prior outside the "
        "old prior's support). Means over problems (median in "
        "brackets); mean error: largest |mean - exact mean| / exact sd over the coordinates.",
        "",
        "| method | KL(exact ‖ q) | mean error | quick C2ST vs exact | ms per posterior |",
        "|---|---|---|---|---|",
    ]

    def cell(key, sel=None):
        mean, med, n = _m(rows, key, sel)
        return f"{mean:.3f} ({med:.3f}), n={n}" if n else "–"

    lines.append(f"| DT (prior as input) | {cell('kl_dt')} | {cell('mean_err_dt')} | "
                 f"{cell('c2st_dt')} | {summary['dt_ms_median']:.2f} |")
    lines.append(f"| importance re-weighting, all | – | {cell('mean_err_is')} | "
                 f"{cell('c2st_is')} | {summary['is_ms_median']:.1f} |")

    def ok(r):
        return r["is_passed"]

    lines.append(f"| importance re-weighting, accepted only | – | {cell('mean_err_is', ok)} | "
                 f"{cell('c2st_is', ok)} | |")
    lines.append(f"| DT on the same accepted problems | {cell('kl_dt', ok)} | "
                 f"{cell('mean_err_dt', ok)} | {cell('c2st_dt', ok)} | |")
    lines.append(f"| NPE posterior, not swapped | – | {cell('mean_err_noswap')} | "
                 f"{cell('c2st_noswap')} | |")
    lines.append(f"| the new prior itself | {cell('kl_prior')} | | | |")
    if shared:
        lines += ["", "sbibm's prior N(0, 0.1 I) as a 1-component GMM, observations 1-5, quick "
                  "C2ST against the reference samples (10,000 draws):", "",
                  "| observation | DT | NPE (10^4, default) |", "|---|---|---|"]
        lines += [f"| {s['observation']} | {s['c2st_dt']:.3f} | {s['c2st_npe']:.3f} |"
                  for s in shared]
        lines.append(f"| mean | {summary['shared_c2st_dt_mean']:.3f} | "
                     f"{summary['shared_c2st_npe_mean']:.3f} |")
    from _docs import save

    save(args.name, {"summary": summary, "rows": rows, "shared": shared}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
