"""Held-out evaluation of an amortized model against the exact posterior of its task."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from flashbayes.diagnostics import kl_divergence


def evaluate(model, *, key: jax.Array, n_priors: int = 1000,
             kl_draws: int = 2000) -> dict[str, Any]:
    """Score a model on `n_priors` fresh (prior, theta, data) draws of its task.

    For tasks with an exact posterior: KL(exact || model) by Monte Carlo with `kl_draws` draws
    and the NLL of the true theta under both. For the others: the NLL of the true theta under
    the model and under the prior (how much the data were used).

    Returns a dict of summary statistics and the per-problem arrays.
    """
    task = model.task
    if not isinstance(n_priors, int) or n_priors < 1:
        raise ValueError(f"n_priors: expected a positive integer; got {n_priors!r}")
    k_prob, k_kl = jax.random.split(key)
    kls, nll_model, nll_ref, ns = [], [], [], []
    t_model = 0.0
    for i in range(n_priors):
        prob = task.sample_problem(jax.random.fold_in(k_prob, i))
        t0 = time.perf_counter()
        q = model.posterior(prob.prior, prob.data)
        t_model += time.perf_counter() - t0
        ns.append(prob.data.shape[0])
        nll_model.append(-float(q.log_prob(prob.theta)))
        if task.has_exact:
            ref_prior = prob.user_prior if prob.user_prior is not None else prob.prior
            exact = task.exact_posterior(ref_prior, prob.data)
            kl, _ = kl_divergence(jax.random.fold_in(k_kl, i), exact, q, n=kl_draws)
            kls.append(kl)
            nll_ref.append(-float(exact.log_prob(prob.theta[None])[0]))
        else:
            nll_ref.append(-float(prob.prior.log_prob(prob.theta)))
    out: dict[str, Any] = {
        "task": task.name,
        "n_priors": n_priors,
        "reference": "exact" if task.has_exact else "prior",
        "nll_model_mean": float(np.mean(nll_model)),
        "nll_reference_mean": float(np.mean(nll_ref)),
        "nll_gap_mean": float(np.mean(np.array(nll_model) - np.array(nll_ref))),
        "nll_gap_se": float(np.std(np.array(nll_model) - np.array(nll_ref), ddof=1)
                            / np.sqrt(n_priors)) if n_priors > 1 else float("nan"),
        "model_seconds_per_posterior": t_model / n_priors,
        "per_problem": {"n": ns, "nll_model": nll_model, "nll_reference": nll_ref},
    }
    if kls:
        k = np.array(kls)
        out.update({"kl_mean": float(k.mean()), "kl_median": float(np.median(k)),
                    "kl_p90": float(np.quantile(k, 0.9)), "kl_max": float(k.max())})
        out["per_problem"]["kl"] = kls
    return out
